"""Publishing readings taken on an untrusted clock: corrected once synced, else flagged."""

from __future__ import annotations

from drivers.base import PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.records import NO_FIX, ClockFix, clock_fix
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import NodeIdentity, clock_flags, stamp_data
from gateway.uplinks.kafka.format import H_CLOCK, format_record
from gateway.uplinks.kafka.mappings import Mapping
from tests.unit.test_clock_guard import REAL_NOW_NS, FakeHost, S, stamped_then_synced


def _record(ts_ms: int) -> bytes:
    rbe = ReportByException(NodeIdentity("g", "e"), {"d": [PointInfo(name="p", datatype="float64", unit="")]})
    rbe.offer(Sample("d", "p", 1.5, ts_ms, Quality.GOOD))
    (rec,) = rbe.drain()
    return rec.payload


def test_trusted_records_are_untouched() -> None:
    assert clock_fix(None, {"topic": "x"}) == NO_FIX


def test_unsynced_record_is_corrected_after_sync() -> None:
    guard, headers, stamped_ms = stamped_then_synced(10)
    assert headers, "an unsynced clock must mark the record"
    fix = clock_fix(guard, headers)
    delta, flagged = fix.correction_ms, fix.unsynced
    assert not flagged
    true_ms = (REAL_NOW_NS - 10 * S) // 1_000_000
    assert stamped_ms + delta == true_ms
    p = pb.Payload()
    p.ParseFromString(stamp_data(_record(stamped_ms), seq=1, ts_ms=REAL_NOW_NS // 1_000_000, device="d",
                                 aliases=None, historical=True, correction_ms=delta))
    assert p.metrics[0].timestamp == true_ms


def test_still_unsynced_record_is_flagged_not_held() -> None:
    host = FakeHost(1_000 * S, synced=False)
    guard = host.guard()
    guard.poll()
    headers = guard.record_headers()
    fix = clock_fix(guard, headers)
    assert fix.unsynced and fix.correction_ms == 0
    data = stamp_data(_record(host.wall // 1_000_000), seq=1, ts_ms=1, device="d", aliases=None,
                      historical=False, clock_unsynced=fix.unsynced)
    p = pb.Payload.FromString(data)
    assert p.metrics[0].timestamp == host.wall // 1_000_000  # published, not held, not shifted
    assert clock_flags(data) == [True]  # the clock marker of the payload flags its metric


def test_record_from_an_earlier_boot_is_flagged() -> None:
    host = FakeHost(1_000 * S, synced=False)
    old = host.guard(boot_id="boot-a")
    old.poll()
    headers = old.record_headers()
    host.ntp_step_to(REAL_NOW_NS)
    new = host.guard(boot_id="boot-b")
    new.poll()
    assert clock_fix(new, headers) == ClockFix(0, True)


def test_unsynced_headers_stay_the_same_until_the_clock_jumps() -> None:
    # The buffer stores each distinct header set once: one set per clock epoch, not per record.
    host = FakeHost(1_000 * S, synced=False)
    guard = host.guard()
    guard.poll()
    seen = set()
    for _ in range(1000):
        host.mono += 1_234_567  # wall and monotonic advance together (ms truncation varies)
        host.wall += 1_234_567
        seen.add(tuple(sorted(guard.record_headers().items())))
    assert len(seen) == 1
    host.wall += 5 * S  # a step of the wall clock
    seen.add(tuple(sorted(guard.record_headers().items())))
    assert len(seen) == 2


# -- the same rule on Kafka ---------------------------------------------------------------

class _Rec:
    def __init__(self, payload: bytes, ts_ms: int, headers: dict[str, str]) -> None:
        self.seq, self.stream, self.payload, self.ts_ms = 7, "g/e/d", payload, ts_ms
        self.headers = {"topic": "spBv1.0/g/DDATA/e/d", "type": "DDATA", **headers}


def _kafka(fmt: str) -> Mapping:
    return Mapping(name="m", mqtt_topic_filters=("spBv1.0/#",), kafka_topic="t", format=fmt)


def test_kafka_gets_corrected_timestamps_once_the_clock_synced() -> None:
    guard, headers, stamped_ms = stamped_then_synced(10)
    fix = clock_fix(guard, headers)
    true_ms = (REAL_NOW_NS - 10 * S) // 1_000_000
    rec = _Rec(_record(stamped_ms), stamped_ms, headers)
    msg = format_record(rec, _kafka("sparkplug"), "g/e", fix)
    p = pb.Payload()
    p.ParseFromString(msg.value)
    assert p.metrics[0].timestamp == true_ms and msg.timestamp_ms == true_ms
    assert dict(msg.headers)[H_CLOCK] == b"corrected"
    doc = format_record(rec, _kafka("json"), "g/e", fix).value
    assert f'"timestamp":{true_ms}'.encode() in doc and b'"clock":"corrected"' in doc


def test_kafka_flags_what_cannot_be_corrected() -> None:
    host = FakeHost(1_000 * S, synced=False)
    guard = host.guard()
    guard.poll()
    headers = guard.record_headers()
    stamped_ms = host.wall // 1_000_000
    fix = clock_fix(guard, headers)
    rec = _Rec(_record(stamped_ms), stamped_ms, headers)
    msg = format_record(rec, _kafka("sparkplug"), "g/e", fix)
    p = pb.Payload()
    p.ParseFromString(msg.value)
    props = dict(zip(p.metrics[0].properties.keys, p.metrics[0].properties.values, strict=True))
    assert props["clock_unsynced"].boolean_value is True
    assert p.metrics[0].timestamp == stamped_ms
    assert dict(msg.headers)[H_CLOCK] == b"unsynced"
    assert b'"clock":"unsynced"' in format_record(rec, _kafka("json"), "g/e", fix).value


def test_kafka_leaves_trusted_records_alone() -> None:
    rec = _Rec(_record(123), 123, {})
    msg = format_record(rec, _kafka("sparkplug"), "g/e", clock_fix(None, rec.headers))
    assert msg.value == rec.payload and H_CLOCK not in dict(msg.headers)
