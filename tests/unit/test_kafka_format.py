"""Record -> Kafka message formatting: keys, headers, sparkplug/json/raw (pure)."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import pytest

from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.uplinks.kafka.format import (
    H_GATEWAY,
    H_SEQ,
    H_STREAM,
    H_TOPIC,
    H_TYPE,
    KafkaFormatError,
    MessageFactory,
    estimate_size,
    format_record,
)
from gateway.uplinks.kafka.mappings import Mapping


@dataclass
class Rec:
    seq: int
    stream: str
    payload: bytes
    ts_ms: int = 1_700_000_000_123
    headers: dict[str, str] = field(default_factory=dict)


def _ddata() -> bytes:
    p = pb.Payload(timestamp=1_700_000_000_200)
    m = p.metrics.add(name="voltage_l1", datatype=9, timestamp=1_700_000_000_100)
    m.float_value = 230.1
    m = p.metrics.add(name="temp", datatype=2, timestamp=1_700_000_000_101, is_historical=True)
    m.int_value = (-12) & 0xFFFFFFFF  # Sparkplug carries signed ints two's complement
    m = p.metrics.add(name="energy", datatype=4, timestamp=1_700_000_000_102)
    m.long_value = (-5) & 0xFFFFFFFFFFFFFFFF
    m = p.metrics.add(name="running", datatype=11, timestamp=1_700_000_000_103)
    m.boolean_value = True
    m = p.metrics.add(name="status", datatype=12, timestamp=1_700_000_000_104)
    m.string_value = "ok"
    m = p.metrics.add(name="pressure", datatype=10, timestamp=1_700_000_000_105, is_null=True)
    m.properties.keys.append("Quality")
    m.properties.values.add(type=3, int_value=0)
    m = p.metrics.add(name="flow", datatype=9, timestamp=1_700_000_000_106)
    m.float_value = 1.5
    m.properties.keys.append("Quality")
    m.properties.values.add(type=3, int_value=500)
    m = p.metrics.add(name="curve", datatype=30, timestamp=1_700_000_000_107)
    m.bytes_value = struct.pack("<3f", 0.5, 1.25, -2.0)
    return p.SerializeToString()


DDATA_HEADERS = {
    "topic": "spBv1.0/plant-7/DDATA/pump-3/meter1",
    "type": "DDATA",
    "gateway": "plant-7/pump-3",
}


def _mapping(**kw) -> Mapping:
    base = {"name": "m", "mqtt_topic_filters": ("spBv1.0/#",), "kafka_topic": "plant.telemetry"}
    return Mapping(**{**base, **kw})


def test_sparkplug_format_keeps_bytes_keys_by_device_and_sets_dedup_headers() -> None:
    payload = _ddata()
    rec = Rec(42, "plant-7/pump-3/meter1", payload, headers=DDATA_HEADERS)
    msg = format_record(rec, _mapping(), "plant-7/pump-3")
    assert msg.topic == "plant.telemetry"
    assert msg.value == payload
    assert msg.key == b"plant-7/pump-3/meter1"
    assert msg.timestamp_ms == rec.ts_ms
    assert dict(msg.headers) == {
        H_GATEWAY: b"plant-7/pump-3",
        H_STREAM: b"plant-7/pump-3/meter1",
        H_SEQ: b"42",
        H_TOPIC: b"spBv1.0/plant-7/DDATA/pump-3/meter1",
        H_TYPE: b"DDATA",
    }


def test_topic_key_uses_the_source_topic() -> None:
    rec = Rec(1, "plant-7/pump-3/meter1", _ddata(), headers=DDATA_HEADERS)
    msg = format_record(rec, _mapping(key="topic"), "g/e")
    assert msg.key == b"spBv1.0/plant-7/DDATA/pump-3/meter1"


def test_json_format_decodes_names_types_timestamps_quality_and_history() -> None:
    rec = Rec(7, "plant-7/pump-3/meter1", _ddata(), headers=DDATA_HEADERS)
    doc = json.loads(format_record(rec, _mapping(format="json"), "plant-7/pump-3").value)
    assert doc["gateway"] == "plant-7/pump-3"
    assert doc["topic"] == "spBv1.0/plant-7/DDATA/pump-3/meter1"
    assert doc["type"] == "DDATA"
    assert doc["seq"] == 7
    assert doc["timestamp"] == 1_700_000_000_200
    by_name = {m["name"]: m for m in doc["metrics"]}
    assert by_name["voltage_l1"] == {
        "name": "voltage_l1",
        "datatype": "Float",
        "timestamp": 1_700_000_000_100,
        "value": 230.1,  # float32 shown as its shortest decimal, not 230.10000610351562
        "quality": "good",
        "is_historical": False,
    }
    assert by_name["temp"]["value"] == -12
    assert by_name["temp"]["is_historical"] is True
    assert by_name["temp"]["datatype"] == "Int16"
    assert by_name["energy"]["value"] == -5
    assert by_name["running"]["value"] is True
    assert by_name["status"]["value"] == "ok"
    assert by_name["pressure"]["value"] is None
    assert by_name["pressure"]["quality"] == "bad"
    assert by_name["flow"]["quality"] == "stale"
    assert by_name["curve"]["value"] == [0.5, 1.25, -2.0]
    assert [m["name"] for m in doc["metrics"]][:2] == ["voltage_l1", "temp"]  # order kept


def test_json_of_a_non_sparkplug_payload_is_a_format_error_naming_seq_and_topic() -> None:
    rec = Rec(9, "lab/line1/temp", b'{"t": 21.5}', headers={"topic": "lab/line1/temp"})
    with pytest.raises(KafkaFormatError) as err:
        format_record(rec, _mapping(format="json"), "g/e")
    assert "seq 9" in str(err.value)
    assert "lab/line1/temp" in str(err.value)
    assert err.value.retriable is False


def test_raw_bridged_record_passes_bytes_and_marks_type() -> None:
    rec = Rec(
        3,
        "lab/line1/temp",
        b"\x00\xffraw",
        headers={"topic": "lab/line1/temp", "type": "bridged", "gateway": "g/e"},
    )
    msg = format_record(rec, _mapping(format="raw", key="topic"), "g/e")
    assert msg.value == b"\x00\xffraw"
    assert msg.key == b"lab/line1/temp"
    assert dict(msg.headers)[H_TYPE] == b"bridged"


def test_missing_topic_header_falls_back_to_the_stream() -> None:
    rec = Rec(4, "a/b", b"x")
    msg = format_record(rec, _mapping(format="raw", key="topic"), "g/e")
    assert msg.key == b"a/b"
    assert dict(msg.headers)[H_TOPIC] == b"a/b"


@pytest.mark.parametrize("fmt", ["sparkplug", "json", "raw"])
@pytest.mark.parametrize("key", ["device", "topic"])
def test_message_factory_makes_what_format_record_makes(fmt: str, key: str) -> None:
    factory = MessageFactory("plant-7/pump-3")
    mapping = _mapping(format=fmt, key=key)
    for seq in (1, 99, 100_000):
        for device in ("meter1", "meter2"):
            headers = {**DDATA_HEADERS, "topic": f"spBv1.0/plant-7/DDATA/pump-3/{device}"}
            rec = Rec(seq, f"plant-7/pump-3/{device}", _ddata(), headers=headers)
            msg, size = factory.make(rec, mapping)
            assert msg == format_record(rec, mapping, "plant-7/pump-3")
            assert size == estimate_size(msg)


def test_json_of_a_payload_made_by_the_project_codec() -> None:
    from drivers.base import Quality
    from gateway.sparkplug.payload import (
        DataType,
        Metric,
        Payload,
        encode_payload,
        quality_properties,
    )

    payload = encode_payload(Payload(timestamp=5, metrics=[
        Metric(name="rpm", datatype=DataType.UInt32, value=4_000_000_000, timestamp=4),
        Metric(name="level", datatype=DataType.Float, value=None, timestamp=4,
               properties=quality_properties(Quality.STALE), is_historical=True),
        Metric(name="flags", datatype=DataType.BooleanArray, value=[True, False, True],
               timestamp=4),
    ]))
    rec = Rec(11, "plant-7/pump-3/meter1", payload, headers=DDATA_HEADERS)
    doc = json.loads(format_record(rec, _mapping(format="json"), "plant-7/pump-3").value)
    assert doc["metrics"] == [
        {"name": "rpm", "datatype": "UInt32", "timestamp": 4, "value": 4_000_000_000,
         "quality": "good", "is_historical": False},
        {"name": "level", "datatype": "Float", "timestamp": 4, "value": None,
         "quality": "stale", "is_historical": True},
        {"name": "flags", "datatype": "BooleanArray", "timestamp": 4,
         "value": [True, False, True], "quality": "good", "is_historical": False},
    ]


# -- exact names, sizes and edges -----------------------------------------------------------------
def test_header_names_are_the_documented_ones() -> None:
    msg = format_record(Rec(5, "s", b"x", headers={"topic": "t", "type": "DDATA"}), _mapping(), "g/e")
    assert [k for k, _ in msg.headers] == [
        "outpost-gateway", "outpost-stream", "outpost-seq", "outpost-topic", "outpost-type"]
    assert dict(msg.headers)["outpost-type"] == b"DDATA"
    assert dict(format_record(Rec(5, "s", b"x"), _mapping(), "g/e").headers)[H_TYPE] == b""


def test_estimate_size_is_the_v2_record_bound() -> None:
    from gateway.uplinks.kafka.format import KafkaMessage

    msg = KafkaMessage("t", b"key", b"value", [("h1", b"v"), ("head2", b"")], 0)
    # 21 bytes per record (length, attributes, deltas, key/value lengths) + 10 per header
    assert estimate_size(msg) == 21 + 3 + 5 + (10 + 2 + 1) + (10 + 5 + 0)
    assert estimate_size(KafkaMessage("t", b"", b"", [], 0)) == 21


@pytest.mark.parametrize("payload", [b"abc", bytearray(b"abc"), memoryview(b"abc")])
def test_message_factory_gives_bytes_for_any_buffer_type(payload) -> None:
    factory = MessageFactory("g/e")
    msg, size = factory.make(Rec(3, "s", payload, headers={"topic": "t"}), _mapping(format="raw"))
    assert type(msg.value) is bytes and msg.value == b"abc"
    assert dict(msg.headers)[H_TYPE] == b"" and dict(msg.headers)[H_TOPIC] == b"t"
    assert size == estimate_size(msg)
    msg, _ = factory.make(Rec(3, "s", b"abc"), _mapping(format="raw", key="topic"))
    assert msg.key == b"s" and dict(msg.headers)[H_TOPIC] == b"s"


def test_message_factory_cache_is_per_mapping_stream_topic_and_type_and_bounded() -> None:
    factory = MessageFactory("g/e")
    a, b = _mapping(name="a", kafka_topic="ta"), _mapping(name="b", kafka_topic="tb", key="topic")
    pa = factory.parts(a, "s1", "top1", "DDATA")
    assert factory.parts(a, "s1", "top1", "DDATA") is pa
    assert factory.parts(b, "s1", "top1", "DDATA")[:2] == ("tb", b"top1")
    assert factory.parts(a, "s2", "top1", "DDATA")[1] == b"s2"
    assert factory.parts(a, "s1", "top1", "NDATA")[5] == (H_TYPE, b"NDATA")
    for i in range(4096 - 4):                   # the bound: 4096 (mapping, stream, topic, type)
        factory.parts(a, f"x{i}", "t", "")
    assert len(factory._cache) == 4096
    factory.parts(a, "one-more", "t", "")
    assert len(factory._cache) == 1           # a full cache starts over
    assert factory.parts(a, "s1", "top1", "DDATA") == pa


def test_json_values_of_every_kind() -> None:
    from gateway.sparkplug.payload import DataSet, DataType, Template
    from gateway.uplinks.kafka.format import _jsonable, shortest_float32

    assert _jsonable(True) is True and _jsonable(None) is None and _jsonable(7) == 7
    assert _jsonable(float("nan")) == "nan" and _jsonable(float("-inf")) == "-inf"
    assert _jsonable(b"\x00\xff") == {"base64": "AP8="}
    assert _jsonable(bytearray(b"a")) == {"base64": "YQ=="}
    assert _jsonable([1.5, b"a"]) == [1.5, {"base64": "YQ=="}]
    f32 = struct.unpack("<f", struct.pack("<f", 0.1))[0]
    assert _jsonable(f32) == f32 and _jsonable(f32, float32=True) == 0.1
    assert _jsonable([f32], float32=True) == [0.1]
    assert _jsonable((f32,), float32=True) == [0.1]
    ds = DataSet(["a", "b"], [DataType.Int8, DataType.Bytes], [[1, b"\x01"], [None, b""]])
    assert _jsonable(ds) == {"columns": ["a", "b"], "types": ["Int8", "Bytes"],
                             "rows": [[1, {"base64": "AQ=="}], [None, {"base64": ""}]]}
    assert _jsonable(Template()) == {"unsupported": "Template"}
    # the shortest decimal, even for a float32 subnormal that needs only 6 digits
    tiny = struct.unpack("<f", struct.pack("<f", 6.91567e-40))[0]
    assert shortest_float32(tiny) == 6.91567e-40
    assert shortest_float32(float("inf")) == float("inf")
    assert shortest_float32(16777216.0) == 16777216.0


def test_json_document_layout_alias_only_metrics_and_escapes() -> None:
    from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload

    payload = encode_payload(Payload(metrics=[
        Metric(None, DataType.Double, 1.5, alias=4),
        Metric("ü", DataType.String, "é"),
    ]))
    value = format_record(Rec(2, "s/d", payload, headers={"topic": "t", "type": "DDATA"}),
                          _mapping(format="json"), "g/e").value
    assert value.startswith(b'{"gateway":"g/e","topic":"t","type":"DDATA","stream":"s/d","seq":2,')
    assert "ü".encode() in value and b"\\u" not in value   # UTF-8, not ASCII escapes
    doc = json.loads(value)
    assert doc["timestamp"] is None
    assert doc["metrics"][0] == {"alias": 4, "datatype": "Double", "value": 1.5, "quality": "good",
                                 "is_historical": False}
    assert "timestamp" not in doc["metrics"][1]


def test_json_float_arrays_use_the_shortest_float32_decimals() -> None:
    from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload

    payload = encode_payload(Payload(metrics=[Metric("f", DataType.FloatArray, [0.1, 21.3]),
                                              Metric("d", DataType.DoubleArray, [0.1])]))
    doc = json.loads(format_record(Rec(1, "s", payload), _mapping(format="json"), "g/e").value)
    assert [m["value"] for m in doc["metrics"]] == [[0.1, 21.3], [0.1]]


def test_json_fast_path_gives_what_the_full_codec_gives_for_every_scalar_type() -> None:
    from gateway.uplinks.kafka.format import _decoded_metrics, _scalar_metrics

    p = pb.Payload(timestamp=10)
    cases = [  # (datatype, oneof field, raw value): edges of every scalar the drivers produce
        (1, "int_value", 0xFFFFFF80), (1, "int_value", 0x7F), (2, "long_value", 0xFFFF8000),
        (3, "int_value", 0x80000000), (4, "long_value", (-5) & 0xFFFFFFFFFFFFFFFF),
        (5, "int_value", 0x1FF), (6, "int_value", 65535), (7, "long_value", 4_000_000_000),
        (8, "long_value", 2**64 - 1), (9, "float_value", 0.1), (9, "float_value", float("nan")),
        (10, "double_value", float("-inf")), (10, "float_value", 2.5), (11, "boolean_value", True),
        (12, "string_value", 'é"\\'), (13, "long_value", 1_700_000_000_000),
        (14, "string_value", "t"), (15, "string_value", "u"),
    ]
    for i, (dt, kind, raw) in enumerate(cases):
        m = p.metrics.add(name=f"m{i}", datatype=dt, timestamp=100 + i, is_historical=bool(i % 2))
        setattr(m, kind, raw)
    p.metrics.add(name="null", datatype=4, is_null=True)  # no timestamp either
    payload = p.SerializeToString()
    fast = _scalar_metrics(p, 7)
    assert fast is not None and len(fast) == len(cases) + 1
    assert json.dumps(fast) == json.dumps(_decoded_metrics(payload, "t", 1, 7))
    assert fast[0]["value"] == -128 and fast[0]["timestamp"] == 107 and fast[9]["value"] == 0.1


@pytest.mark.parametrize("odd", ["alias", "properties", "array", "wrong_kind", "no_datatype"])
def test_json_fast_path_leaves_anything_else_to_the_full_codec(odd: str) -> None:
    from gateway.uplinks.kafka.format import _scalar_metrics

    p = pb.Payload(timestamp=10)
    p.metrics.add(name="fine", datatype=3, int_value=1)
    m = p.metrics.add(name="odd", datatype=3, int_value=1)
    if odd == "alias":
        m.ClearField("name")
        m.alias = 5
    elif odd == "properties":
        m.properties.keys.append("Quality")
        m.properties.values.add(type=3, int_value=0)
    elif odd == "array":
        m.datatype = 30
        m.bytes_value = b"\x00\x00\x80\x3f"
    elif odd == "wrong_kind":
        m.string_value = "1"
    else:
        m.ClearField("datatype")
    assert _scalar_metrics(p, 0) is None
    rec = Rec(3, "s", p.SerializeToString(), headers=DDATA_HEADERS)
    if odd == "wrong_kind":  # the full codec's error, with seq and topic
        with pytest.raises(KafkaFormatError, match=r"seq 3.*Int32 expects int_value"):
            format_record(rec, _mapping(format="json"), "g/e")
    else:
        doc = json.loads(format_record(rec, _mapping(format="json"), "g/e").value)
        assert len(doc["metrics"]) == 2


def test_json_of_an_unsynced_record_carries_the_clock_once_not_per_metric() -> None:
    from gateway.records import ClockFix

    rec = Rec(3, "s", _ddata(), headers={**DDATA_HEADERS, "clock": "unsynced"})
    fixed = format_record(rec, _mapping(format="json"), "g/e", ClockFix(0, True))
    plain = format_record(rec, _mapping(format="json"), "g/e")
    assert fixed.value == plain.value[:-1] + b',"clock":"unsynced"}'
    shifted = json.loads(format_record(rec, _mapping(format="json"), "g/e", ClockFix(1000, False)).value)
    assert shifted["timestamp"] == 1_700_000_000_200 + 1000
    assert [m["timestamp"] for m in shifted["metrics"]][:2] == [1_700_000_000_100 + 1000, 1_700_000_000_101 + 1000]
    assert fixed.timestamp_ms == rec.ts_ms and format_record(
        rec, _mapping(format="json"), "g/e", ClockFix(1000, False)).timestamp_ms == rec.ts_ms + 1000
