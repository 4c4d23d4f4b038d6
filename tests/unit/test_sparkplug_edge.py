"""Report by exception, aliases, births, publish-time stamping, bdSeq/seq, STATE and commands."""

from __future__ import annotations

import pytest

from drivers.base import PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import (
    AliasTable,
    NodeIdentity,
    build_dbirth,
    build_ddeath,
    build_nbirth,
    build_ndeath,
    stamp_data,
)
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.node import (
    BdSeqStore,
    PrimaryHostState,
    SeqCounter,
    parse_dcmd,
    parse_ncmd,
)
from gateway.sparkplug.payload import DataType, Metric, Payload, decode_payload, encode_payload

NODE = NodeIdentity("g", "e")
POINTS = {
    "d1": [PointInfo("t", "float32", unit="C", deadband=0.5, max_report_interval=10.0),
           PointInfo("n", "int16", writable=True, min=-10, max=10),
           PointInfo("s", "string")],
    "d2": [PointInfo("on", "bool", writable=True), PointInfo("big", "uint64", writable=True)],
}


def s(device: str, point: str, value, ts: int, quality: Quality = Quality.GOOD) -> Sample:
    return Sample(device, point, value, ts, quality)


def test_deadband_interval_and_quality_decide_what_is_reported() -> None:
    rbe = ReportByException(NODE, POINTS)
    assert rbe.offer(s("d1", "t", 20.0, 1000))             # first value
    assert not rbe.offer(s("d1", "t", 20.4, 2000))         # within the deadband
    assert rbe.offer(s("d1", "t", 20.6, 3000))             # beyond it (from the last reported)
    assert not rbe.offer(s("d1", "t", 20.6, 12_000))       # 9 s after the last report
    assert rbe.offer(s("d1", "t", 20.6, 13_000))           # max report interval reached
    assert rbe.offer(s("d1", "t", None, 14_000, Quality.BAD))   # quality change
    assert not rbe.offer(s("d1", "t", None, 15_000, Quality.BAD))
    assert rbe.offer(s("d1", "t", 20.6, 16_000))           # back to good
    assert rbe.offer(s("d1", "s", "a", 1000)) and not rbe.offer(s("d1", "s", "a", 2000))
    assert rbe.offer(s("d1", "n", 1, 1000)) and rbe.offer(s("d1", "n", 2, 1001))  # no deadband
    assert not rbe.offer(s("dX", "t", 1.0, 1000))          # unknown device: ignored
    assert rbe.suppressed == 4


def test_drain_batches_one_record_per_device_in_the_shared_format() -> None:
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(s("d1", "t", 21.5, 1000))
    rbe.offer(s("d2", "on", True, 1001))
    rbe.offer(s("d1", "n", -3, 1002))
    rbe.offer(s("d1", "t", None, 1003, Quality.STALE))
    recs = rbe.drain()
    assert rbe.drain() == []
    assert [r.stream for r in recs] == ["g/e/d1", "g/e/d2"]
    r = recs[0]
    assert r.headers == {"topic": "spBv1.0/g/DDATA/e/d1", "type": "DDATA", "gateway": "g/e"}
    assert r.ts_ms == 1003
    p = decode_payload(r.payload)
    assert p.seq is None  # seq is stamped at publish time
    assert [(m.name, m.datatype, m.value, m.timestamp) for m in p.metrics] == [
        ("t", DataType.Float, 21.5, 1000), ("n", DataType.Int16, -3, 1002),
        ("t", DataType.Float, None, 1003)]
    assert all(m.alias is None for m in p.metrics)
    assert p.metrics[0].properties is None           # good quality: no property
    assert p.metrics[2].quality is Quality.STALE


def test_value_out_of_range_is_reported_as_bad_not_raised() -> None:
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(s("d1", "n", 70_000, 1000))
    m = decode_payload(rbe.drain()[0].payload).metrics[0]
    assert m.value is None and m.quality is Quality.BAD


def test_alias_table_is_unique_across_the_node_and_stable() -> None:
    a, b = AliasTable(POINTS), AliasTable(dict(POINTS))
    aliases = [a.alias(d, p.name) for d, pts in POINTS.items() for p in pts]
    assert aliases == [1, 2, 3, 4, 5]
    assert [b.alias(d, p.name) for d, pts in POINTS.items() for p in pts] == aliases
    assert a.point(4) == ("d2", "on") and a.point(99) is None and a.alias("d1", "zz") is None


def test_nbirth_ndeath_dbirth_ddeath() -> None:
    nb = decode_payload(build_nbirth(7, 1234))
    assert nb.seq == 0 and nb.timestamp == 1234
    by = {m.name: m for m in nb.metrics}
    assert by["bdSeq"].datatype is DataType.Int64 and by["bdSeq"].value == 7
    assert by["Node Control/Rebirth"].value is False and by["Node Control/Rebirth"].alias is None
    nd = decode_payload(build_ndeath(7))
    assert [(m.name, m.datatype, m.value) for m in nd.metrics] == [("bdSeq", DataType.Int64, 7)]
    snap = {"t": s("d1", "t", 20.5, 999)}
    db = decode_payload(build_dbirth("d1", POINTS["d1"], snap, AliasTable(POINTS), 2000, 3))
    assert db.seq == 3 and db.timestamp == 2000
    t, n, st = db.metrics
    assert (t.name, t.alias, t.datatype, t.value, t.timestamp) == ("t", 1, DataType.Float, 20.5, 999)
    assert t.properties["engUnit"].value == "C" and t.properties["readOnly"].value is True
    assert n.value is None and n.quality is Quality.STALE  # never read yet
    assert n.properties["engLow"].value == -10.0 and n.properties["engHigh"].value == 10.0
    assert n.properties["readOnly"].value is False
    assert st.datatype is DataType.String
    dd = decode_payload(build_ddeath(3000, 9))
    assert dd.seq == 9 and dd.timestamp == 3000 and dd.metrics == []


def test_stamp_data_sets_seq_aliases_historical_and_keeps_source_timestamps() -> None:
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(s("d2", "big", 2**64 - 1, 1000))
    stored = rbe.drain()[0].payload
    out = stamp_data(stored, seq=42, ts_ms=5000, device="d2", aliases=AliasTable(POINTS),
                     historical=True)
    p = pb.Payload()
    p.ParseFromString(out)
    assert p.seq == 42 and p.timestamp == 5000
    m = p.metrics[0]
    assert m.alias == 5 and not m.HasField("name") and not m.HasField("datatype")
    assert m.is_historical and m.timestamp == 1000 and m.long_value == 2**64 - 1
    named = pb.Payload()
    named.ParseFromString(stamp_data(stored, seq=0, ts_ms=1, device="d2", aliases=None,
                                     historical=False))
    assert named.metrics[0].name == "big" and not named.metrics[0].is_historical
    with pytest.raises(PayloadError, match="'d2'"):
        stamp_data(b"\xff\xff", seq=0, ts_ms=1, device="d2", aliases=None, historical=False)
    assert NODE.device_of_stream("g/e/d2") == "d2" and NODE.device_of_stream("g/e") is None


def test_bdseq_store_persists_and_wraps_at_255(tmp_path) -> None:
    store = BdSeqStore(tmp_path / "data")
    assert [store.next() for _ in range(3)] == [0, 1, 2]
    assert BdSeqStore(tmp_path / "data").next() == 3       # survives a restart
    store.path.write_text("255\n")
    assert store.next() == 0
    store.path.write_text("garbage")
    assert store.next() == 0                                # corrupt: restart at 0
    assert not list(store.path.parent.glob("*.tmp"))


def test_seq_counter_wraps() -> None:
    c = SeqCounter()
    assert c.reset() == 0
    got = [c.take() for _ in range(256)]
    assert got[0] == 1 and got[254] == 255 and got[255] == 0
    assert c.reset() == 0 and c.take() == 1


def test_primary_host_state_ignores_older_timestamps() -> None:
    h = PrimaryHostState("scada")
    assert h.update(b'{"online": true, "timestamp": 100}') and h.online
    assert not h.update(b'{"online": false, "timestamp": 50}') and h.online
    assert h.update(b'{"online": false, "timestamp": 100}') and not h.online
    with pytest.raises(PayloadError, match="scada"):
        h.update(b"ONLINE")
    with pytest.raises(PayloadError, match="wrong types"):
        h.update(b'{"online": "yes", "timestamp": 200}')


def _cmd(*metrics: Metric) -> bytes:
    return encode_payload(Payload(timestamp=1, metrics=list(metrics)))


def test_dcmd_checks_writable_type_and_range_by_alias_or_name() -> None:
    aliases = AliasTable(POINTS)
    writes, rejected = parse_dcmd("d1", _cmd(
        Metric(alias=2, datatype=DataType.Int16, value=-10),      # by alias
        Metric("n", DataType.Int16, 10),                         # by name
        Metric("n", DataType.Int16, 11),                         # above max
        Metric("t", DataType.Float, 1.0),                        # read-only
        Metric(alias=4, datatype=DataType.Boolean, value=True),  # alias of another device
        Metric("n", DataType.String, "5"),                       # wrong type
        Metric("n", DataType.Double, 2.5)), POINTS["d1"], aliases)
    assert [(w.point, w.value) for w in writes] == [("n", -10), ("n", 10)]
    msgs = [str(r) for r in rejected]
    assert len(msgs) == 5
    assert "above the point's max" in msgs[0] and "read-only" in msgs[1]
    assert "no such point" in msgs[2] and "expects a number" in msgs[3]
    assert "expects an integer" in msgs[4]
    # Without a datatype on the wire, the point's type decodes the value.
    w, r = parse_dcmd("d2", _cmd(Metric(alias=5, value=None)), POINTS["d2"], aliases)
    assert w == [] and "null" in str(r[0])
    raw = pb.Payload()
    m = raw.metrics.add()
    m.alias, m.long_value = 5, 2**64 - 2
    w, r = parse_dcmd("d2", raw.SerializeToString(), POINTS["d2"], aliases)
    assert [(x.point, x.value) for x in w] == [("big", 2**64 - 2)] and r == []
    w, r = parse_dcmd("d2", b"\xff\xff", POINTS["d2"], aliases)
    assert w == [] and "DCMD for device 'd2'" in str(r[0])


def test_a_metric_with_an_unknown_property_datatype_does_not_take_the_others_with_it() -> None:
    raw = pb.Payload()
    bad = raw.metrics.add()
    bad.name, bad.datatype, bad.int_value = "n", int(DataType.Int16), 3
    bad.properties.keys.append("x")
    bad.properties.values.add().type = 99           # no such datatype
    odd = raw.metrics.add()
    odd.name, odd.datatype = "n", 12345              # no such datatype either
    good = raw.metrics.add()
    good.name, good.datatype, good.int_value = "n", int(DataType.Int16), 7
    writes, rejected = parse_dcmd("d1", raw.SerializeToString(), POINTS["d1"], AliasTable(POINTS))
    assert [(w.point, w.value) for w in writes] == [("n", 7)]
    assert len(rejected) == 2 and "unknown datatype 99" in str(rejected[0])
    assert "unknown datatype 12345" in str(rejected[1])


def test_ncmd() -> None:
    cmd, rej = parse_ncmd(_cmd(Metric("Node Control/Rebirth", DataType.Boolean, True)))
    assert cmd.rebirth and not cmd.next_server and rej == []
    cmd, rej = parse_ncmd(_cmd(Metric("Node Control/Reboot", DataType.Boolean, True),
                               Metric("Node Control/Rebirth", DataType.Boolean, False)))
    assert not cmd.rebirth and len(rej) == 2
