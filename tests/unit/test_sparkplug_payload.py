"""Sparkplug B payload codec and topics: exact bytes, round trips, ranges and errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import DATATYPES, Quality
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.errors import PayloadError, TopicError
from gateway.sparkplug.payload import (
    DRIVER_DATATYPES,
    DataSet,
    DataType,
    Metric,
    Parameter,
    Payload,
    PropertyValue,
    Template,
    decode_payload,
    driver_datatype,
    encode_payload,
    pack_array,
    quality_properties,
    unpack_array,
)
from gateway.sparkplug.topics import (
    MessageType,
    Topic,
    device_topic,
    node_topic,
    parse_topic,
    state_topic,
)


def one(datatype: DataType, value) -> pb.Payload.Metric:
    p = pb.Payload()
    p.ParseFromString(encode_payload(Payload(metrics=[Metric("m", datatype, value)])))
    return p.metrics[0]


def roundtrip(datatype: DataType, value):
    data = encode_payload(Payload(metrics=[Metric("m", datatype, value)]))
    return decode_payload(data).metrics[0].value


def test_small_signed_ints_are_sign_extended_to_32_bits() -> None:
    assert one(DataType.Int8, -1).int_value == 0xFFFFFFFF
    assert one(DataType.Int16, -2).int_value == 0xFFFFFFFE
    assert one(DataType.Int32, -(2**31)).int_value == 0x80000000
    assert one(DataType.Int8, 5).int_value == 5


def test_64_bit_and_uint32_go_in_long_value_twos_complement() -> None:
    assert one(DataType.Int64, -1).long_value == 2**64 - 1
    m = one(DataType.UInt32, 2**32 - 1)
    assert m.WhichOneof("value") == "long_value" and m.long_value == 2**32 - 1
    assert one(DataType.DateTime, 1_700_000_000_000).long_value == 1_700_000_000_000


def test_decoder_accepts_small_ints_that_were_not_sign_extended() -> None:
    p = pb.Payload()
    m = p.metrics.add()
    m.name, m.datatype, m.int_value = "x", DataType.Int8, 0xFF
    assert decode_payload(p.SerializeToString()).metrics[0].value == -1


@pytest.mark.parametrize("datatype,bits,signed", [
    (DataType.Int8, 8, True), (DataType.Int16, 16, True), (DataType.Int32, 32, True),
    (DataType.Int64, 64, True), (DataType.UInt8, 8, False), (DataType.UInt16, 16, False),
    (DataType.UInt32, 32, False), (DataType.UInt64, 64, False)])
def test_integer_limits_round_trip_and_overflow_is_refused(datatype, bits, signed) -> None:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    assert roundtrip(datatype, lo) == lo
    assert roundtrip(datatype, hi) == hi
    with pytest.raises(PayloadError, match=f"out of range for {datatype.name}"):
        encode_payload(Payload(metrics=[Metric("m", datatype, hi + 1)]))
    with pytest.raises(PayloadError, match="'m'"):
        encode_payload(Payload(metrics=[Metric("m", datatype, lo - 1)]))


@given(st.integers(-(2**63), 2**63 - 1))
def test_int64_round_trip(v: int) -> None:
    assert roundtrip(DataType.Int64, v) == v


@given(st.integers(-(2**15), 2**15 - 1))
def test_int16_round_trip(v: int) -> None:
    assert roundtrip(DataType.Int16, v) == v


def test_scalar_types_round_trip() -> None:
    assert roundtrip(DataType.Float, 1.5) == 1.5
    assert roundtrip(DataType.Double, 0.1) == 0.1
    assert roundtrip(DataType.Boolean, False) is False
    for t in (DataType.String, DataType.Text, DataType.UUID):
        assert roundtrip(t, "ü") == "ü"
    assert roundtrip(DataType.Bytes, b"\x00\x01") == b"\x00\x01"
    assert roundtrip(DataType.File, b"abc") == b"abc"
    assert roundtrip(DataType.Float, None) is None


def test_wrong_python_type_is_refused_with_the_metric_name() -> None:
    with pytest.raises(PayloadError, match=r"'speed'.*needs a number"):
        encode_payload(Payload(metrics=[Metric("speed", DataType.Float, "fast")]))
    with pytest.raises(PayloadError, match="Boolean"):
        encode_payload(Payload(metrics=[Metric("b", DataType.Boolean, 1)]))


def test_arrays_are_little_endian_packed() -> None:
    assert pack_array(DataType.Int16Array, [-2, 1]) == b"\xfe\xff\x01\x00"
    assert pack_array(DataType.FloatArray, [1.0]) == struct.pack("<f", 1.0)
    # BooleanArray: 4-byte count, then bits most significant first.
    assert pack_array(DataType.BooleanArray, [True, False, True]) == b"\x03\x00\x00\x00\xa0"
    assert pack_array(DataType.StringArray, ["ab", "c"]) == b"ab\x00c\x00"
    for t, v in [(DataType.Int8Array, [-128, 127]), (DataType.UInt64Array, [2**64 - 1]),
                 (DataType.DateTimeArray, [1, 2]), (DataType.BooleanArray, [True] * 9),
                 (DataType.StringArray, []), (DataType.DoubleArray, [0.5, -1e10])]:
        assert unpack_array(t, pack_array(t, v)) == v
        assert roundtrip(t, v) == v
    with pytest.raises(PayloadError, match="whole number"):
        unpack_array(DataType.Int32Array, b"\x00\x00\x00")
    with pytest.raises(PayloadError, match="cannot pack"):
        pack_array(DataType.UInt8Array, [256])


def test_dataset_template_and_property_sets_round_trip() -> None:
    ds = DataSet(["a", "b"], [DataType.Int32, DataType.String], [[-1, "x"], [None, "y"]])
    assert roundtrip(DataType.DataSet, ds) == ds
    tpl = Template(metrics=[Metric("inner", DataType.Int8, -3)],
                   parameters=[Parameter("p", DataType.Int64, -9)], version="3",
                   template_ref="Motor")
    got = roundtrip(DataType.Template, tpl)
    assert got.template_ref == "Motor" and got.version == "3" and not got.is_definition
    assert got.metrics[0].value == -3 and got.parameters == tpl.parameters
    props = {"nested": PropertyValue(DataType.PropertySet, {"k": PropertyValue(DataType.Int16, -4)}),
             "list": PropertyValue(DataType.PropertySetList, [{"a": PropertyValue(DataType.Boolean, True)}]),
             "none": PropertyValue(DataType.String, None)}
    data = encode_payload(Payload(metrics=[Metric("m", DataType.Int32, 1, properties=props)]))
    assert decode_payload(data).metrics[0].properties == props
    with pytest.raises(PayloadError, match="row 0 has 1 values"):
        encode_payload(Payload(metrics=[Metric("d", DataType.DataSet,
                                               DataSet(["a", "b"], [DataType.Int32] * 2, [[1]]))]))


def test_quality_property_codes() -> None:
    for q, code in ((Quality.BAD, 0), (Quality.GOOD, 192), (Quality.STALE, 500)):
        m = Metric("m", DataType.Float, None, properties=quality_properties(q))
        decoded = decode_payload(encode_payload(Payload(metrics=[m]))).metrics[0]
        assert decoded.properties["Quality"] == PropertyValue(DataType.Int32, code)
        assert decoded.quality is q
    assert Metric("m", DataType.Float, 1.0).quality is Quality.GOOD


def test_every_driver_datatype_has_a_sparkplug_type() -> None:
    assert set(DRIVER_DATATYPES) == set(DATATYPES)
    assert driver_datatype("float32") is DataType.Float
    with pytest.raises(PayloadError, match="'decimal'"):
        driver_datatype("decimal")


def test_data_metrics_without_datatype_use_the_lookup() -> None:
    p = pb.Payload()
    m = p.metrics.add()
    m.alias, m.int_value = 7, 0xFFFFFFFE
    data = p.SerializeToString()
    assert decode_payload(data).metrics[0].value == 0xFFFFFFFE  # raw without a birth
    types = {7: DataType.Int16}
    assert decode_payload(data, lambda n, a: types.get(a)).metrics[0].value == -2


def test_garbage_and_mismatched_values_raise_payload_error() -> None:
    with pytest.raises(PayloadError, match="not a Sparkplug B payload"):
        decode_payload(b"\xff\xff\xff")
    p = pb.Payload()
    m = p.metrics.add()
    m.name, m.datatype, m.string_value = "x", DataType.Int32, "nope"
    with pytest.raises(PayloadError, match=r"'x'.*expects int_value"):
        decode_payload(p.SerializeToString())


def test_payload_fields_round_trip() -> None:
    p = Payload(metrics=[], timestamp=5, seq=255, uuid="u", body=b"b")
    assert decode_payload(encode_payload(p)) == p


def test_topics() -> None:
    assert node_topic("g", MessageType.NBIRTH, "e") == "spBv1.0/g/NBIRTH/e"
    assert device_topic("g", MessageType.DDATA, "e", "d") == "spBv1.0/g/DDATA/e/d"
    assert state_topic("scada") == "spBv1.0/STATE/scada"
    assert parse_topic("spBv1.0/g/DCMD/e/d") == Topic(MessageType.DCMD, "g", "e", "d")
    assert parse_topic("spBv1.0/STATE/h") == Topic(MessageType.STATE, host_id="h")
    assert str(parse_topic("spBv1.0/g/NCMD/e")) == "spBv1.0/g/NCMD/e"
    for bad in ("spAv1.0/g/NBIRTH/e", "spBv1.0/g/NBIRTH/e/d", "spBv1.0/g/DDATA/e",
                "spBv1.0/g/XDATA/e", "spBv1.0/g/DDATA/e/d/x", "spBv1.0//NBIRTH/e"):
        with pytest.raises(TopicError):
            parse_topic(bad)
    with pytest.raises(TopicError):
        node_topic("g", MessageType.DDATA, "e")
    with pytest.raises(TopicError):
        state_topic("a/b")
