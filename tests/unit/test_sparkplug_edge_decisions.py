"""Report by exception, births and publish-time stamping: each decision at its boundary."""

from __future__ import annotations

import logging
import math

from drivers.base import PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import (
    CLOCK_MARKER,
    AliasTable,
    NodeIdentity,
    build_dbirth,
    build_nbirth,
    build_ndeath,
    clock_flags,
    datatypes_of,
    stamp_data,
)
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.payload import DataType, decode_payload
from gateway.sparkplug.topics import MessageType

NODE = NodeIdentity("g", "e")
POINTS = {
    "d1": [PointInfo("t", "float32", deadband=0.5), PointInfo("n", "int16"),
           PointInfo("raw", "float64", deadband=0.0)],
    "d2": [PointInfo("on", "bool", deadband=5.0), PointInfo("txt", "string")],
}


def s(device: str, point: str, value, ts: int, quality: Quality = Quality.GOOD) -> Sample:
    return Sample(device, point, value, ts, quality)


def test_node_identity_names_streams_and_topics() -> None:
    assert NODE.gateway_id == "g/e"
    assert NODE.stream(None) == "g/e" and NODE.stream("d1") == "g/e/d1"
    assert NODE.topic(MessageType.NDATA) == "spBv1.0/g/NDATA/e"
    assert NODE.topic(MessageType.DDATA, "d1") == "spBv1.0/g/DDATA/e/d1"
    try:
        NODE.device_of_stream("g/other/d1")
    except PayloadError as e:
        assert "'g/other/d1' does not belong to edge node g/e" in str(e)
    else:
        raise AssertionError("a foreign stream was accepted")
    assert NODE.device_of_stream("g/e/a/b") == "a/b"


def test_alias_table_size_and_order() -> None:
    table = AliasTable(POINTS)
    assert len(table) == 5
    assert [table.point(a) for a in range(1, 6)] == [
        ("d1", "t"), ("d1", "n"), ("d1", "raw"), ("d2", "on"), ("d2", "txt")]
    assert len(AliasTable({})) == 0


def test_deadband_is_strictly_beyond() -> None:
    rbe = ReportByException(NODE, POINTS)
    assert rbe.offer(s("d1", "t", 20.0, 1))
    assert not rbe.offer(s("d1", "t", 20.5, 2))      # exactly the deadband: not beyond it
    assert not rbe.offer(s("d1", "t", 19.5, 3))
    assert rbe.offer(s("d1", "t", 20.5000001, 4))
    # a zero deadband reports every change and nothing else
    assert rbe.offer(s("d1", "raw", 1.0, 1))
    assert not rbe.offer(s("d1", "raw", 1.0, 2))
    assert rbe.offer(s("d1", "raw", 1.0 + 1e-12, 3))
    assert rbe.suppressed == 3


def test_a_quality_change_alone_is_reported() -> None:
    rbe = ReportByException(NODE, POINTS)
    assert rbe.offer(s("d1", "n", 5, 1))
    assert rbe.offer(s("d1", "n", 5, 2, Quality.STALE))
    assert not rbe.offer(s("d1", "n", 5, 3, Quality.STALE))
    assert rbe.offer(s("d1", "n", 5, 4))


def test_nan_is_reported_once_and_leaving_nan_is_reported() -> None:
    # Regression: the value after a NaN was compared with abs(new - nan) > deadband, which is
    # always False, so a sensor recovering from NaN stayed NaN on the host until the next
    # max-report-interval (forever without one).
    rbe = ReportByException(NODE, POINTS)
    assert rbe.offer(s("d1", "t", 1.0, 1))
    assert rbe.offer(s("d1", "t", math.nan, 2))
    assert not rbe.offer(s("d1", "t", math.nan, 3))
    assert rbe.offer(s("d1", "t", 1.0, 4))


def test_booleans_and_strings_are_compared_not_deadbanded() -> None:
    rbe = ReportByException(NODE, POINTS)
    assert rbe.offer(s("d2", "on", True, 1))
    assert rbe.offer(s("d2", "on", False, 2))        # a deadband of 5 must not hide a bool change
    assert not rbe.offer(s("d2", "on", False, 3))
    assert rbe.offer(s("d2", "txt", "a", 1)) and rbe.offer(s("d2", "txt", "b", 2))
    # a value that changes kind is reported, not subtracted
    assert rbe.offer(s("d1", "t", 1.0, 5)) and rbe.offer(s("d1", "t", "err", 6))
    assert rbe.offer(s("d1", "t", None, 7)) and not rbe.offer(s("d1", "t", None, 8))
    assert rbe.offer(s("d1", "t", 2.0, 9))


def test_unknown_points_are_logged_once_each(caplog) -> None:
    rbe = ReportByException(NODE, POINTS)
    with caplog.at_level(logging.WARNING, logger="gateway.pipeline.report"):
        for _ in range(3):
            assert not rbe.offer(s("d1", "nope", 1, 1))
        assert not rbe.offer(s("dX", "t", 1, 1))
    lines = [(r.getMessage(), r.outpost_fields["device"], r.outpost_fields["point"])
             for r in caplog.records if r.name == "gateway.pipeline.report"]
    assert lines == [("sample for unknown point ignored", "d1", "nope"),
                     ("sample for unknown point ignored", "dX", "t")]
    assert rbe.suppressed == 0 and rbe.drain() == []


def test_snapshot_keeps_the_newest_sample_reported_or_not_and_forget_reports_again() -> None:
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(s("d1", "t", 20.0, 1))
    rbe.offer(s("d1", "t", 20.25, 2))                # suppressed, still the newest value
    assert rbe.snapshot("d1") == {"t": s("d1", "t", 20.25, 2)}
    assert rbe.snapshot("dX") == {}
    rbe.drain()
    assert not rbe.offer(s("d1", "t", 20.25, 3))
    rbe.forget("d1")
    rbe.forget("dX")                                  # unknown device: nothing to forget
    assert rbe.offer(s("d1", "t", 20.25, 4))          # after a DDEATH every point is new again
    assert [m.value for m in decode_payload(rbe.drain()[0].payload).metrics] == [20.25]


def test_a_value_that_does_not_fit_is_logged_with_the_point(caplog) -> None:
    rbe = ReportByException(NODE, POINTS)
    with caplog.at_level(logging.WARNING, logger="gateway.sparkplug.edge"):
        rbe.offer(s("d1", "n", 70_000, 1))
        rec = rbe.drain()[0]
    (rec_log,) = [r for r in caplog.records if r.name == "gateway.sparkplug.edge"]
    assert "reported as bad quality" in rec_log.getMessage() and rec_log.outpost_fields["point"] == "n"
    m = pb.Payload.FromString(rec.payload).metrics[0]
    assert m.is_null and m.WhichOneof("value") is None
    assert list(m.properties.keys) == ["Quality"] and m.properties.values[0].int_value == 0


def test_nbirth_carries_every_node_control_metric() -> None:
    p = decode_payload(build_nbirth(3, 1234))
    assert [(m.name, m.datatype, m.value, m.timestamp, m.alias) for m in p.metrics] == [
        ("bdSeq", DataType.Int64, 3, 1234, None),
        ("Node Control/Rebirth", DataType.Boolean, False, 1234, None),
        ("Node Control/Next Server", DataType.Boolean, False, 1234, None),
        ("Properties/Software", DataType.String, "outpost", 1234, None),
    ]
    assert decode_payload(build_nbirth(3, 1, seq=0, software="outpost 9")).metrics[3].value == "outpost 9"
    assert pb.Payload.FromString(build_ndeath(3)).metrics[0].HasField("timestamp") is False


def test_dbirth_without_aliases_and_without_properties() -> None:
    pts = [PointInfo("x", "uint16"), PointInfo("y", "float32", unit="", min=0, max=None)]
    p = decode_payload(build_dbirth("d", pts, {}, None, 10, 1))
    x, y = p.metrics
    assert x.alias is None and set(x.properties) == {"readOnly", "Quality"}
    assert y.properties["engLow"].value == 0.0 and "engHigh" not in y.properties
    aliases = AliasTable({"other": pts})
    assert decode_payload(build_dbirth("d", pts, {}, aliases, 10, 1)).metrics[0].alias is None


def test_stamp_data_corrects_timestamps_and_marks_unsynced_clocks() -> None:
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(s("d1", "t", 1.0, 1000))
    rbe.offer(s("d1", "n", 2, 1001))
    stored = rbe.drain()[0].payload
    plain = pb.Payload.FromString(stamp_data(stored, seq=1, ts_ms=5, device="d1", aliases=None,
                                             historical=False))
    assert [m.timestamp for m in plain.metrics] == [1000, 1001]
    assert all(len(m.properties.keys) == 0 for m in plain.metrics)
    shifted = pb.Payload.FromString(stamp_data(stored, seq=1, ts_ms=5, device="d1", aliases=None,
                                               historical=False, correction_ms=250))
    assert [m.timestamp for m in shifted.metrics] == [1250, 1251]
    flagged = stamp_data(stored, seq=1, ts_ms=5, device="d1", aliases=None,
                         historical=False, clock_unsynced=True)
    unsynced = pb.Payload.FromString(flagged)
    *samples, marker = unsynced.metrics
    assert [m.name for m in samples] == ["t", "n"] and all(len(m.properties.keys) == 0 for m in samples)
    # one marker for the payload, by name without aliases, at the newest timestamp, last
    assert marker.name == CLOCK_MARKER and marker.boolean_value is True and marker.timestamp == 1001
    assert clock_flags(flagged) == [True, True] and clock_flags(stamp_data(
        stored, seq=1, ts_ms=5, device="d1", aliases=None, historical=False)) == [False, False]
    # a metric without a timestamp is left without one
    bare = pb.Payload()
    bm = bare.metrics.add()
    bm.name, bm.int_value = "n", 1
    out = pb.Payload.FromString(stamp_data(bare.SerializeToString(), seq=0, ts_ms=1, device=None,
                                           aliases=AliasTable(POINTS), historical=False, correction_ms=9))
    assert not out.metrics[0].HasField("timestamp") and out.metrics[0].name == "n"


def test_datatypes_of_points() -> None:
    assert datatypes_of(POINTS["d2"]) == {"on": DataType.Boolean, "txt": DataType.String}
