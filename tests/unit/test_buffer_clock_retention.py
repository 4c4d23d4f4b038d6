"""max_age and the clock rule (issue 13 item 4): a reading stamped on an unsynchronised
clock is never dropped as too old because the clock was corrected later; the clock floor's
`newest_ts_ms`."""

from __future__ import annotations

import time

from buffer import Buffer, BufferSettings, NewRecord
from buffer.diagnostics import stats_for_path
from gateway.clock import H_BOOT, H_CLOCK, H_OFFSET, ClockGuard, ClockStatus

DAY_MS = 86400 * 1000


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=64 * 1024 * 1024, max_age_s=7 * 86400.0)
    base.update(kw)
    return BufferSettings(**base)


def slow_clock_records(n: int, days_slow: float, boot_id: str) -> list[NewRecord]:
    """Readings stamped by a clock `days_slow` behind, with the headers ClockGuard writes."""
    wall_ns = time.time_ns() - int(days_slow * DAY_MS) * 1_000_000
    mono_ns = time.monotonic_ns()
    headers = {H_CLOCK: "unsynced", H_OFFSET: str(wall_ns - mono_ns), H_BOOT: boot_id}
    return [NewRecord("g/n/d1", b"r%04d" % i, wall_ns // 1_000_000, headers) for i in range(n)]


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def test_readings_from_a_slow_unsynced_clock_survive_the_sync(path):
    # The reproduction: 500 records stamped by a clock 10 days slow, then one
    # append after the clock synced. Their real age is seconds, not 10 days.
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(slow_clock_records(500, 10, boot_id()))
        buf.append([NewRecord("g/n/d1", b"after-sync", time.time_ns() // 1_000_000, {})])
        st = buf.stats()
        assert st["dropped"]["age"] == 0
        assert st["records"] == 501


def test_the_headers_match_what_clockguard_writes(path):
    # The buffer reads the gateway's own headers: a stamp taken by a real ClockGuard on an
    # unsynced clock, replayed 10 days later on the (now synced) wall clock, is kept.
    unsynced = ClockStatus(synced=False, source="adjtimex")
    start_wall = time.time_ns()
    guard = ClockGuard(probe=lambda: unsynced, floor_ms=0, boot_id=boot_id())
    headers = guard.record_headers()
    assert headers[H_CLOCK] == "unsynced"
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append([NewRecord("s", b"x", start_wall // 1_000_000, headers)])
        # The wall clock is stepped 10 days forward (NTP sync); monotonic time moves on.
        buf._wall_ns = lambda: time.time_ns() + 10 * DAY_MS * 1_000_000
        buf._next_age_check = 0
        buf.append([NewRecord("s", b"y", buf._wall_ns() // 1_000_000, {})])
        assert buf.stats()["dropped"]["age"] == 0
        # ... and once it is really older than max_age on the monotonic clock, it goes.
        buf._mono_ns = lambda: time.monotonic_ns() + 8 * DAY_MS * 1_000_000
        buf._wall_ns = lambda: time.time_ns() + 18 * DAY_MS * 1_000_000
        buf._next_age_check = 0
        buf.append([NewRecord("s", b"z", buf._wall_ns() // 1_000_000, {})])
        assert buf.stats()["dropped"]["age"] == 2


def test_unsynced_readings_of_an_earlier_boot_have_no_known_age(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(slow_clock_records(20, 30, "another-boot"))
        buf.append([NewRecord("s", b"now", time.time_ns() // 1_000_000, {})])
        st = buf.stats()
        assert st["dropped"]["age"] == 0 and st["records"] == 21


def test_trusted_readings_still_expire(path):
    # The rule only spares untrusted stamps: a trusted 10-day-old reading is old.
    old = time.time_ns() // 1_000_000 - 10 * DAY_MS
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append([NewRecord("s", b"%d" % i, old, {}) for i in range(30)])
        buf._next_age_check = 0
        buf.append([NewRecord("s", b"now", time.time_ns() // 1_000_000, {})])
        st = buf.stats()
        assert st["dropped"]["age"] == 30 and st["records"] == 1


def test_expiry_stops_at_an_unsynced_reading_then_resumes_behind_it(path):
    old = time.time_ns() // 1_000_000 - 10 * DAY_MS
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append([NewRecord("s", b"old", old, {}) for _ in range(5)])
        buf.append(slow_clock_records(3, 10, boot_id()))
        buf.append([NewRecord("s", b"old", old, {}) for _ in range(4)])
        buf._next_age_check = 0
        buf.append([NewRecord("s", b"now", time.time_ns() // 1_000_000, {})])
        st = buf.stats()
        # The 5 trusted old ones go; the slow-clock ones are young, so the 4 behind them
        # wait (records leave from the oldest end only).
        assert st["dropped"]["age"] == 5 and st["first_seq"] == 6


def test_stats_report_newest_trusted_timestamp_for_the_clock_floor(path):
    now = time.time_ns() // 1_000_000
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["newest_ts_ms"] is None
        buf.append([NewRecord("s", b"a", now - 5000, {}), NewRecord("s", b"b", now - 1000, {})])
        assert buf.stats()["newest_ts_ms"] == now - 1000
        # A reading stamped on an untrusted clock does not raise the floor.
        buf.append(slow_clock_records(2, -3, boot_id()))      # 3 days *fast*
        assert buf.stats()["newest_ts_ms"] == now - 1000
    assert stats_for_path(path)["newest_ts_ms"] == now - 1000
    with Buffer.open(path, settings()) as buf:                 # after a restart too
        assert buf.stats()["newest_ts_ms"] == now - 1000
