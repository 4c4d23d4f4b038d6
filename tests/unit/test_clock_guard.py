"""Clock trust: unsynchronised boots, NTP steps, holdover, and the record correction policy."""

from __future__ import annotations

import ctypes

import pytest

from gateway.clock import (
    H_BOOT,
    H_CLOCK,
    H_OFFSET,
    RELEASE_FLOOR_MS,
    ClockEventKind,
    ClockGuard,
    ClockNotSynced,
    ClockStatus,
    ClockUncorrectable,
    Resolution,
    _Timex,
    read_clock_status,
)

S = 1_000_000_000
REAL_NOW_NS = 1_795_000_000 * S  # a late-2026 instant: what NTP will say


class FakeHost:
    """A machine's clocks: wall can be stepped, monotonic only advances."""

    def __init__(self, wall_ns: int, synced: bool) -> None:
        self.mono = 5 * S
        self.wall = wall_ns
        self.synced = synced

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * S)
        self.wall += int(seconds * S)

    def ntp_step_to(self, true_wall_ns: int) -> None:
        self.wall = true_wall_ns
        self.synced = True

    def guard(self, boot_id: str = "boot-a", **kw: object) -> ClockGuard:
        return ClockGuard(
            probe=lambda: ClockStatus(synced=self.synced, source="adjtimex", maxerror_us=100),
            wall_ns=lambda: self.wall,
            mono_ns=lambda: self.mono,
            boot_id=boot_id,
            **kw,  # type: ignore[arg-type]
        )


def stamped_then_synced(seconds: int = 10) -> tuple[ClockGuard, dict[str, str], int]:
    """A reading stamped on a clock that booted thinking it is 1970, then NTP steps that
    clock to REAL_NOW_NS `seconds` later: (the guard, the reading's clock headers, the ts_ms
    it was stamped with). Its true time is REAL_NOW_NS - seconds."""
    host = FakeHost(1_000 * S, synced=False)
    guard = host.guard()
    guard.poll()
    headers = guard.record_headers()
    stamped_ms = host.wall // 1_000_000
    host.advance(seconds)
    host.ntp_step_to(REAL_NOW_NS)
    guard.poll()
    return guard, headers, stamped_ms


def test_synced_clock_stamps_are_trusted_and_need_no_headers() -> None:
    host = FakeHost(REAL_NOW_NS, synced=True)
    guard = host.guard()
    stamp = guard.stamp()
    assert stamp.trusted and stamp.ts_ms == REAL_NOW_NS // 1_000_000
    assert guard.record_headers(stamp) == {}
    assert guard.correction_ms({}) == 0
    assert guard.resolve_record({}, held_for_s=0, max_hold_s=60).action is Resolution.PUBLISH
    assert guard.status()["synced"] is True


def test_a_1970_boot_is_corrected_after_ntp_steps_the_clock() -> None:
    host = FakeHost(wall_ns=3 * S, synced=False)  # booted at 1970-01-01T00:00:03
    guard = host.guard()
    assert not guard.trusted
    host.advance(10)
    stamp = guard.stamp()
    assert not stamp.trusted and stamp.ts_ms == 13_000
    headers = guard.record_headers(stamp)
    assert headers[H_CLOCK] == "unsynced" and headers[H_BOOT] == "boot-a"

    # Before sync, no correction is known: the uplink holds, and flags after max_hold.
    with pytest.raises(ClockNotSynced) as info:
        guard.correction_ms(headers)
    assert info.value.retriable
    assert guard.resolve_record(headers, held_for_s=5, max_hold_s=300).action is Resolution.HOLD
    flagged = guard.resolve_record(headers, held_for_s=301, max_hold_s=300)
    assert flagged.action is Resolution.FLAG and "held 301s" in flagged.reason

    host.advance(20)  # the reading is now 20 s old
    host.ntp_step_to(REAL_NOW_NS)
    events = guard.poll()
    kinds = [e.kind for e in events]
    assert ClockEventKind.JUMP in kinds and ClockEventKind.SYNCED in kinds
    assert guard.trusted and guard.status()["jumps"] == 1

    true_reading_ms = REAL_NOW_NS // 1_000_000 - 20_000
    delta = guard.correction_ms(headers)
    assert stamp.ts_ms + delta == true_reading_ms
    assert guard.correct(stamp.ts_ms, stamp.mono_ns) == true_reading_ms
    resolved = guard.resolve_record(headers, held_for_s=30, max_hold_s=300)
    assert resolved.action is Resolution.PUBLISH and resolved.delta_ms == delta
    # New readings are trusted and carry no clock headers.
    assert guard.record_headers() == {}


def test_readings_from_an_earlier_boot_cannot_be_corrected_and_are_flagged() -> None:
    host = FakeHost(wall_ns=3 * S, synced=False)
    old = host.guard(boot_id="boot-a")
    headers = old.record_headers()
    host2 = FakeHost(REAL_NOW_NS, synced=True)
    guard = host2.guard(boot_id="boot-b")
    with pytest.raises(ClockUncorrectable, match="boot-a"):
        guard.correction_ms(headers)
    assert guard.resolve_record(headers, held_for_s=0, max_hold_s=300).action is Resolution.FLAG


def test_a_restart_within_the_same_boot_still_corrects_with_a_fresh_anchor() -> None:
    host = FakeHost(wall_ns=3 * S, synced=False)
    headers = host.guard().record_headers()  # gateway run 1, before sync; then it dies
    host.advance(7)
    host.ntp_step_to(REAL_NOW_NS)
    host.advance(60)
    restarted = host.guard()  # run 2 starts with the clock already synced
    reading_true_ms = (REAL_NOW_NS - 7 * S) // 1_000_000
    stamped_ms = 3_000
    assert stamped_ms + restarted.correction_ms(headers) == reading_true_ms


def test_holdover_after_sync_loss_stays_trusted_until_the_clock_is_stepped() -> None:
    host = FakeHost(REAL_NOW_NS, synced=True)
    guard = host.guard()
    host.advance(3600)
    host.synced = False  # NTP unreachable for hours
    assert [e.kind for e in guard.poll()] == [ClockEventKind.SYNC_LOST]
    assert guard.trusted and guard.status()["holdover"] is True
    assert guard.record_headers() == {}

    before_step = guard.stamp()
    host.wall -= 3600 * S  # somebody runs `date -s` with a wrong time
    events = guard.poll()
    assert [e.kind for e in events] == [ClockEventKind.JUMP]
    assert events[0].jump_s == pytest.approx(-3600)
    assert not guard.trusted
    stamp = guard.stamp()
    headers = guard.record_headers(stamp)
    # The anchor from the last sync still knows the truth.
    assert stamp.ts_ms + guard.correction_ms(headers) == before_step.ts_ms


def test_a_step_while_synced_re_anchors() -> None:
    host = FakeHost(REAL_NOW_NS, synced=True)
    guard = host.guard()
    host.wall += 5 * S
    events = guard.poll()
    assert [e.kind for e in events] == [ClockEventKind.JUMP]
    assert guard.trusted
    host.advance(1)
    stamp = guard.stamp()
    assert guard.correct(stamp.ts_ms, stamp.mono_ns) == stamp.ts_ms


def test_small_drift_is_not_a_jump() -> None:
    host = FakeHost(REAL_NOW_NS, synced=True)
    guard = host.guard(jump_threshold_s=2.0)
    host.wall += int(1.5 * S)
    assert guard.poll() == []


def test_a_kernel_that_claims_sync_with_a_1970_clock_is_not_trusted() -> None:
    host = FakeHost(wall_ns=3 * S, synced=True)
    guard = host.guard()
    assert not guard.synced and not guard.trusted
    assert guard.record_headers()[H_CLOCK] == "unsynced"
    assert guard.status()["unsynced_stamps"] == 1


def test_a_clock_behind_stored_data_is_not_trusted() -> None:
    host = FakeHost(REAL_NOW_NS, synced=False)
    guard = host.guard()
    assert guard.floor_ms == RELEASE_FLOOR_MS and REAL_NOW_NS // 1_000_000 > RELEASE_FLOOR_MS
    guard.raise_floor(REAL_NOW_NS // 1_000_000 + 86_400_000)  # the buffer holds tomorrow's data
    assert not guard.trusted


def test_headers_without_an_offset_are_uncorrectable() -> None:
    guard = FakeHost(REAL_NOW_NS, synced=True).guard()
    with pytest.raises(ClockUncorrectable, match=H_OFFSET):
        guard.correction_ms({H_CLOCK: "unsynced"})


def test_the_real_kernel_answers_adjtimex() -> None:
    if ctypes.sizeof(ctypes.c_long) == 8:
        assert ctypes.sizeof(_Timex) == 208  # sizeof(struct timex) on 64-bit glibc
    status = read_clock_status()
    assert status.available, status.source
    assert isinstance(status.synced, bool)
    assert status.maxerror_us >= 0
