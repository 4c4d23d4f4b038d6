"""Is the wall clock right? Unsynchronised-clock and time-jump detection, and timestamp repair.

A Raspberry Pi has no real-time clock: it boots with the time fake-hwclock saved at the
last shutdown (or 1970) and is corrected only when NTP syncs, which may be minutes later
or, on a site without network, never. Readings stamped before that are wrong.

Policy (documented in gateway/diagnostics/README.md):
- The kernel's own view decides "synced" (adjtimex: STA_UNSYNC / TIME_ERROR), and a wall
  clock earlier than this release's date (or than the newest stored record) is never
  trusted, whatever the kernel says.
- Readings are never delayed or kept only in memory: they are buffered at once. A record
  made while the clock is not trusted carries headers (`clock=unsynced`, the wall-minus-
  monotonic offset at the time, the boot id). Once the clock syncs, `ClockGuard` knows the
  true offset and turns the stored offset into a correction in ms for every timestamp in
  that record (`correction_ms`, `correct`). An uplink therefore holds such a record (it is
  safe in the buffer) until a correction is possible, for at most `max_hold_s`; after that,
  or when the record comes from an earlier boot, it is published flagged instead
  (`resolve_record`).
- Once synced in this boot, a later loss of sync (NTP unreachable for hours) is holdover:
  the free-running clock stays within seconds, so readings are trusted but the status shows
  it. A time jump (wall vs monotonic) beyond the threshold is reported and re-anchors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gateway.errors import OutpostError

# Record headers written for readings stamped by an untrusted clock (named in gateway.records).
from gateway.records import H_CLOCK
from gateway.records import H_CLOCK_BOOT as H_BOOT
from gateway.records import H_CLOCK_OFFSET as H_OFFSET

# Update with each release: no correct clock can be earlier than the day the code was built.
RELEASE_FLOOR = datetime(2026, 11, 1, tzinfo=UTC)
RELEASE_FLOOR_MS = int(RELEASE_FLOOR.timestamp() * 1000)

# From <sys/timex.h>.
STA_UNSYNC = 0x0040
TIME_ERROR = 5


class ClockError(OutpostError):
    """Root of clock problems."""


class ClockNotSynced(ClockError):
    """No sync has been observed in this boot yet, so no correction is known."""

    retriable = True


class ClockUncorrectable(ClockError):
    """The reading comes from another boot (the monotonic clock restarted), or lacks headers."""


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    # The legacy (long-based) layout that the unversioned `adjtimex` symbol uses on every
    # Linux ABI the gateway targets (x86_64, aarch64, armhf). Trailing padding as in glibc.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_padding", ctypes.c_int * 11),
    ]


@dataclass(frozen=True, slots=True)
class ClockStatus:
    """One reading of the kernel's clock discipline state."""

    synced: bool                # kernel says synchronised (no STA_UNSYNC, not TIME_ERROR)
    source: str                 # "adjtimex" or "unavailable: <why>"
    maxerror_us: int = -1       # kernel's maximum error estimate, -1 when unknown
    esterror_us: int = -1
    status_flags: int = 0

    @property
    def available(self) -> bool:
        return self.source == "adjtimex"


_libc: ctypes.CDLL | None = None


def read_clock_status() -> ClockStatus:
    """Ask the kernel (adjtimex with modes=0: read only, needs no privilege)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        tx = _Timex()
        state = _libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError) as exc:
        return ClockStatus(synced=False, source=f"unavailable: {exc}")
    if state < 0:
        errno = ctypes.get_errno()
        return ClockStatus(synced=False, source=f"unavailable: adjtimex errno {errno}")
    synced = state != TIME_ERROR and not (tx.status & STA_UNSYNC)
    return ClockStatus(
        synced=synced,
        source="adjtimex",
        maxerror_us=int(tx.maxerror),
        esterror_us=int(tx.esterror),
        status_flags=int(tx.status),
    )


def read_boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        # Without a boot id, corrections are limited to this process's lifetime.
        return f"pid-{time.monotonic_ns()}"


class ClockEventKind(enum.StrEnum):
    SYNCED = "synced"           # first sync in this boot, or sync regained
    SYNC_LOST = "sync_lost"     # kernel reports unsynchronised again (holdover)
    JUMP = "jump"               # wall clock moved against the monotonic clock


@dataclass(frozen=True, slots=True)
class ClockEvent:
    kind: ClockEventKind
    detail: str
    jump_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Stamp:
    ts_ms: int          # wall clock UTC ms at the time of the reading
    mono_ns: int        # monotonic clock at the same moment
    trusted: bool       # the wall clock was synced (or in holdover after a sync) and plausible


class Resolution(enum.StrEnum):
    PUBLISH = "publish"     # timestamps are right after adding `delta_ms` (0 for trusted records)
    HOLD = "hold"           # wait: the clock may still sync and make a correction possible
    FLAG = "flag"           # publish with the timestamps as stored, marked as unsynchronised


@dataclass(frozen=True, slots=True)
class RecordClock:
    action: Resolution
    delta_ms: int = 0
    reason: str = ""


@dataclass(slots=True)
class _Anchor:
    mono_ns: int
    wall_ns: int

    @property
    def offset_ns(self) -> int:
        return self.wall_ns - self.mono_ns


@dataclass(slots=True)
class _Counters:
    jumps: int = 0
    last_jump_s: float = 0.0
    unsynced_stamps: int = 0
    events: list[ClockEvent] = field(default_factory=list)


class ClockGuard:
    """Tracks clock trust for the whole gateway. Call `poll()` every few seconds.

    Pure apart from the injected probes, so tests drive it with fake clocks.
    """

    def __init__(
        self,
        *,
        probe: Callable[[], ClockStatus] = read_clock_status,
        floor_ms: int = RELEASE_FLOOR_MS,
        jump_threshold_s: float = 2.0,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        boot_id: str | None = None,
    ) -> None:
        self._probe = probe
        self.floor_ms = floor_ms
        self._jump_threshold_ns = int(jump_threshold_s * 1e9)
        self._wall_ns = wall_ns
        self._mono_ns = mono_ns
        self.boot_id = boot_id if boot_id is not None else read_boot_id()
        self._status = ClockStatus(synced=False, source="not polled yet")
        self._anchor: _Anchor | None = None     # (mono, wall) when sync was (last) observed
        self._last_offset_ns: int | None = None  # for jump detection
        self._synced_once = False
        self._holdover_valid = True
        self._since_mono_ns = mono_ns()
        self._counters = _Counters()
        self._offset_headers: dict[str, str] | None = None  # see record_headers()
        self.poll()

    def raise_floor(self, ts_ms: int) -> None:
        """A clock earlier than data already stored went backwards: never trust it."""
        self.floor_ms = max(self.floor_ms, ts_ms)

    def poll(self) -> list[ClockEvent]:
        """Re-read the kernel state; returns what changed (for one log line each)."""
        status = self._probe()
        mono = self._mono_ns()
        wall = self._wall_ns()
        events: list[ClockEvent] = []
        offset = wall - mono
        if self._last_offset_ns is not None:
            drift = offset - self._last_offset_ns
            if abs(drift) > self._jump_threshold_ns:
                jump_s = drift / 1e9
                self._counters.jumps += 1
                self._counters.last_jump_s = jump_s
                events.append(
                    ClockEvent(ClockEventKind.JUMP, f"wall clock jumped {jump_s:+.3f}s", jump_s)
                )
                if status.synced and self._anchor is not None:
                    # A step while synced (NTP correction, an operator's `date -s`): the new
                    # offset is the truth from now on.
                    self._anchor = _Anchor(mono, wall)
                elif not status.synced:
                    # Stepped without sync (an operator, a bad source): stop trusting the
                    # wall clock; the last anchor still corrects stamps made from now on.
                    self._holdover_valid = False
        self._last_offset_ns = offset
        plausible = wall // 1_000_000 >= self.floor_ms
        was_synced = self._status.synced
        if status.synced and plausible:
            self._holdover_valid = True
            if not was_synced or self._anchor is None:
                self._anchor = _Anchor(mono, wall)
                self._since_mono_ns = mono
                events.append(ClockEvent(
                    ClockEventKind.SYNCED,
                    "clock synchronised" if not self._synced_once else "clock synchronised again",
                ))
            self._synced_once = True
        elif was_synced:
            self._since_mono_ns = mono
            events.append(
                ClockEvent(ClockEventKind.SYNC_LOST, "clock no longer synchronised (holdover)")
            )
        if status.synced and not plausible:
            status = ClockStatus(
                synced=False, source=status.source, maxerror_us=status.maxerror_us,
                esterror_us=status.esterror_us, status_flags=status.status_flags,
            )
        self._status = status
        self._counters.events = (self._counters.events + events)[-20:]
        return events

    @property
    def synced(self) -> bool:
        return self._status.synced

    @property
    def trusted(self) -> bool:
        """Stamps are trustworthy now: synced, or holdover after a sync in this boot."""
        if self._wall_ns() // 1_000_000 < self.floor_ms:
            return False
        return self._status.synced or (self._anchor is not None and self._holdover_valid)

    def stamp(self) -> Stamp:
        mono = self._mono_ns()
        wall = self._wall_ns()
        trusted = self.trusted
        if not trusted:
            self._counters.unsynced_stamps += 1
        return Stamp(ts_ms=wall // 1_000_000, mono_ns=mono, trusted=trusted)

    def record_headers(self, stamp: Stamp | None = None) -> dict[str, str]:
        """Headers to add to a buffer record made now; empty when the clock is trusted."""
        stamp = stamp if stamp is not None else self.stamp()
        if stamp.trusted:
            return {}
        offset = stamp.ts_ms * 1_000_000 - stamp.mono_ns
        # The buffer stores each distinct header set once, and an unsynced clock is not
        # slewed, so its wall-minus-monotonic offset only changes when the clock jumps. Keep
        # one value per such epoch (to the millisecond the correction works in) instead of
        # a new header set for every record.
        cached = self._offset_headers
        if cached is None or abs(int(cached[H_OFFSET]) - offset) > 1_000_000:
            cached = self._offset_headers = {H_CLOCK: "unsynced", H_OFFSET: str(offset), H_BOOT: self.boot_id}
        return dict(cached)

    def correct(self, ts_ms: int, mono_ns: int, boot_id: str | None = None) -> int:
        """The true UTC ms of a reading stamped `ts_ms` at monotonic `mono_ns`."""
        return ts_ms + self._delta_ms(ts_ms * 1_000_000 - mono_ns, boot_id)

    def correction_ms(self, headers: Mapping[str, str]) -> int:
        """Milliseconds to add to every timestamp of a record with these headers (0 if trusted)."""
        if headers.get(H_CLOCK) != "unsynced":
            return 0
        try:
            offset = int(headers[H_OFFSET])
        except (KeyError, ValueError) as exc:
            raise ClockUncorrectable(
                f"record marked clock=unsynced has no valid {H_OFFSET} header: {exc}"
            ) from exc
        return self._delta_ms(offset, headers.get(H_BOOT))

    def resolve_record(
        self, headers: Mapping[str, str], held_for_s: float, max_hold_s: float
    ) -> RecordClock:
        """What an uplink does with a record: publish (with a correction), hold, or flag."""
        try:
            return RecordClock(Resolution.PUBLISH, self.correction_ms(headers))
        except ClockNotSynced as exc:
            if held_for_s < max_hold_s:
                return RecordClock(Resolution.HOLD, reason=str(exc))
            return RecordClock(Resolution.FLAG, reason=f"{exc}; held {held_for_s:.0f}s")
        except ClockUncorrectable as exc:
            return RecordClock(Resolution.FLAG, reason=str(exc))

    def _delta_ms(self, stamped_offset_ns: int, boot_id: str | None) -> int:
        if boot_id is not None and boot_id != self.boot_id:
            raise ClockUncorrectable(
                f"reading from boot {boot_id}, now in boot {self.boot_id}: "
                "the monotonic reference restarted"
            )
        if self._anchor is None:
            raise ClockNotSynced("the clock has not synchronised since boot")
        return round((self._anchor.offset_ns - stamped_offset_ns) / 1_000_000)

    def status(self) -> dict[str, object]:
        """The `clock` section of the status document."""
        now_mono = self._mono_ns()
        return {
            "synced": self._status.synced,
            "trusted": self.trusted,
            "holdover": (not self._status.synced) and self._anchor is not None
            and self._holdover_valid,
            "source": self._status.source,
            "since_s": round((now_mono - self._since_mono_ns) / 1e9, 1),
            "maxerror_us": self._status.maxerror_us,
            "esterror_us": self._status.esterror_us,
            "wall_ms": self._wall_ns() // 1_000_000,
            "floor_ms": self.floor_ms,
            "jumps": self._counters.jumps,
            "last_jump_s": self._counters.last_jump_s,
            "unsynced_stamps": self._counters.unsynced_stamps,
        }
