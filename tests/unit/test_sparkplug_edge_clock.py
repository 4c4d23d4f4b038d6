"""gateway/sparkplug/edge.py for consumers other than MQTT and for node metrics: the clock rule
applied to a stored record (`correct_timestamps`, used by the Kafka formats) and the node
metrics an NBIRTH declares."""

from __future__ import annotations

import pytest

from gateway.sparkplug.edge import build_nbirth, correct_timestamps
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.node_metrics import NodeMetricsReporter, node_metric_defs, values_from_status
from gateway.sparkplug.payload import DataType, Metric, Payload, decode_payload, encode_payload

TS = 1_700_000_000_000


def stored(*, with_ts: bool = True) -> bytes:
    return encode_payload(Payload(timestamp=TS if with_ts else None, metrics=[
        Metric(name="a", datatype=DataType.Double, value=1.5, timestamp=TS - 10),
        Metric(name="b", datatype=DataType.Int32, value=7),                    # no timestamp
    ]))


def test_a_correction_shifts_the_payload_and_each_stamped_metric() -> None:
    out = decode_payload(correct_timestamps(stored(), correction_ms=5_000, clock_unsynced=False))
    assert out.timestamp == TS + 5_000
    a, b = out.metrics
    assert (a.timestamp, a.value, b.timestamp, b.value) == (TS - 10 + 5_000, 1.5, None, 7)
    assert not (a.properties or {}) and not (b.properties or {})
    back = decode_payload(correct_timestamps(stored(), correction_ms=-5_000, clock_unsynced=False))
    assert back.timestamp == TS - 5_000 and back.metrics[0].timestamp == TS - 10 - 5_000


def test_no_payload_timestamp_stays_none_and_no_correction_changes_nothing() -> None:
    out = decode_payload(correct_timestamps(stored(with_ts=False), correction_ms=5_000, clock_unsynced=False))
    assert out.timestamp is None and out.metrics[0].timestamp == TS - 10 + 5_000
    same = correct_timestamps(stored(), correction_ms=0, clock_unsynced=False)
    assert decode_payload(same) == decode_payload(stored())


def test_an_unsynced_clock_marks_every_metric_and_shifts_nothing() -> None:
    out = decode_payload(correct_timestamps(stored(), correction_ms=0, clock_unsynced=True))
    assert out.timestamp == TS and out.metrics[0].timestamp == TS - 10
    for m in out.metrics:
        prop = m.properties["clock_unsynced"]
        assert (prop.type, prop.value) == (DataType.Boolean, True)


def test_a_stored_record_that_is_not_sparkplug_is_refused() -> None:
    with pytest.raises(PayloadError, match="not a Sparkplug payload"):
        correct_timestamps(b"\xff\xff\xff not protobuf", correction_ms=1, clock_unsynced=False)


def test_nbirth_declares_every_node_metric_with_its_type_at_the_birth_time() -> None:
    defs = node_metric_defs(["mqtt"])
    status = {"version": "1.2.3", "uptime_s": 5.0, "clock": {"synced": True}, "links": {"mqtt": {"up": True}},
              "buffer": {"cursors": {"mqtt": {"records": 3}}}, "system": {}}
    metrics = NodeMetricsReporter(defs).birth(values_from_status(status, ["mqtt"]))
    p = decode_payload(build_nbirth(4, TS, node_metrics=metrics))
    by_name = {m.name: m for m in p.metrics}
    assert [m.name for m in p.metrics[:4]] == ["bdSeq", "Node Control/Rebirth", "Node Control/Next Server",
                                               "Properties/Software"]
    assert set(by_name) == {"bdSeq", "Node Control/Rebirth", "Node Control/Next Server",
                            "Properties/Software"} | {d.name for d in defs}
    for d in defs:
        m = by_name[d.name]
        assert m.datatype is d.datatype and m.timestamp == TS
    assert by_name["Properties/Version"].value == "1.2.3"
    assert (p.seq, p.timestamp, by_name["bdSeq"].value) == (0, TS, 4)
