"""Publishing readings taken on an untrusted clock: corrected once synced, else flagged."""

from __future__ import annotations

from drivers.base import PointInfo, Quality, Sample
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import NodeIdentity, ReportByException, stamp_data
from gateway.uplinks.mqtt import clock_fix
from tests.unit.test_clock_guard import REAL_NOW_NS, FakeHost, S


def _record(ts_ms: int) -> bytes:
    rbe = ReportByException(NodeIdentity("g", "e"), {"d": [PointInfo(name="p", datatype="float64", unit="")]})
    rbe.offer(Sample("d", "p", 1.5, ts_ms, Quality.GOOD))
    (rec,) = rbe.drain()
    return rec.payload


def test_trusted_records_are_untouched() -> None:
    assert clock_fix(None, {"topic": "x"}) == (0, False)


def test_unsynced_record_is_corrected_after_sync() -> None:
    host = FakeHost(1_000 * S, synced=False)  # booted thinking it is 1970
    guard = host.guard()
    guard.poll()
    headers = guard.record_headers()
    assert headers, "an unsynced clock must mark the record"
    stamped_ms = host.wall // 1_000_000
    host.advance(10)
    host.ntp_step_to(REAL_NOW_NS)
    guard.poll()
    delta, flagged = clock_fix(guard, headers)
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
    delta, flagged = clock_fix(guard, headers)
    assert flagged and delta == 0
    p = pb.Payload()
    p.ParseFromString(stamp_data(_record(host.wall // 1_000_000), seq=1, ts_ms=1, device="d", aliases=None,
                                 historical=False, clock_unsynced=True))
    props = dict(zip(p.metrics[0].properties.keys, p.metrics[0].properties.values, strict=True))
    assert props["clock_unsynced"].boolean_value is True


def test_record_from_an_earlier_boot_is_flagged() -> None:
    host = FakeHost(1_000 * S, synced=False)
    old = host.guard(boot_id="boot-a")
    old.poll()
    headers = old.record_headers()
    host.ntp_step_to(REAL_NOW_NS)
    new = host.guard(boot_id="boot-b")
    new.poll()
    assert clock_fix(new, headers) == (0, True)


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
