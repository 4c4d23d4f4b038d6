"""The SQLite store-and-forward buffer: durable records, named cursors and retention.

`Buffer` is synchronous and confined to the thread that opened it (the gateway uses it
through `AsyncBuffer`, which owns one dedicated thread). A batch is stored in one
transaction and nothing is reported as stored before its commit. Each uplink reads after
its own cursor and acknowledges what its remote side acknowledged; a record is gone once
every cursor has passed it: an ack retires it at once (no longer counted, read or exported)
and `reclaim` deletes its row later, when the buffer is idle or its space is needed, so that
draining a backlog does not also pay for deleting it row by row. Retention (size cap,
maximum age, full disk) either drops the oldest records, counted per reason and logged once
per state change, or refuses the batch with `BufferFull`, per the configured policy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from buffer import schema
from buffer.errors import (
    BufferClosed,
    BufferCorrupt,
    BufferError,
    BufferFull,
    BufferIOError,
    BufferLocked,
    BufferSchemaError,
    UnknownCursor,
)

log = logging.getLogger("outpost.buffer")

WHEN_FULL = ("drop_oldest", "block")
SYNCHRONOUS = ("full", "normal")
DROP_REASONS = ("age", "size", "disk_full", "purged", "uplink_removed", "corrupt",
                "quarantine_dropped")
# Drops that are an operator's or a recovery's act, not a retention episode to log as one.
_NOT_EPISODES = frozenset({"purged", "uplink_removed", "corrupt", "quarantine_dropped"})

# Record headers the gateway writes for a reading stamped on an untrusted clock (see
# gateway/clock.py: H_CLOCK, H_OFFSET, H_BOOT). The buffer reads them only to measure a
# record's age for `max_age` (see README, "Age and the clock").
CLOCK_HEADER = "clock"
CLOCK_UNSYNCED = "unsynced"
CLOCK_OFFSET_HEADER = "clock_offset_ns"
CLOCK_BOOT_HEADER = "boot_id"
# A header key no caller may use: marks records re-sent (quarantine retry) or salvaged for
# some cursors only. It is stored in the header set and hidden from `Record.headers`.
TARGET_KEY = "\x00outpost.for"

# Bytes a record costs on disk beyond its payload, used only to look ahead before an
# append whether the batch will fit under the size cap (measured ~30-35 B, see README).
_RECORD_OVERHEAD_ESTIMATE = 40
_AGE_CHECK_INTERVAL_S = 1.0
_VACUUM_INTERVAL_S = 5.0
_DISK_CHECK_INTERVAL_S = 10.0
_VACUUM_STEP_PAGES = 2048
_DISK_FULL_RETRIES = 6
_PIN_RECHECK_S = 1.0
_BUSY_TIMEOUT_MS = 5000
_SALVAGE_BATCH = 1000


@dataclass(frozen=True, slots=True)
class BufferSettings:
    max_size_bytes: int
    max_age_s: float
    when_full: str = "drop_oldest"      # "drop_oldest" | "block"
    synchronous: str = "full"           # "full": a commit survives power loss; "normal": WAL-safe
    # Tuning; the defaults suit a Raspberry Pi with an SD card.
    checkpoint_wal_bytes: int = 4 * 1024 * 1024   # checkpoint after about this much WAL
    wal_max_bytes: int = 64 * 1024 * 1024         # force a truncating checkpoint beyond this
    vacuum_slack_bytes: int = 8 * 1024 * 1024     # free pages kept for reuse before vacuuming
    check_on_open: str = "quick"                  # "quick" (PRAGMA quick_check) | "none"
    reserve_bytes: int = 4 * 1024 * 1024          # file kept allocated, released on ENOSPC
    # synchronous="normal" only: the WAL is fsynced at most this long after a commit, and
    # as soon as this many records were committed since the last sync (the loss window).
    normal_sync_interval_s: float = 1.0
    normal_sync_records: int = 1000

    def __post_init__(self) -> None:
        if not isinstance(self.max_size_bytes, int) or self.max_size_bytes <= 0:
            raise ValueError(f"max_size_bytes must be a positive integer, got {self.max_size_bytes!r}")
        if not self.max_age_s > 0:
            raise ValueError(f"max_age_s must be positive seconds, got {self.max_age_s!r}")
        if self.when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {self.when_full!r}")
        if self.synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, got {self.synchronous!r}")
        if self.check_on_open not in ("quick", "none"):
            raise ValueError(f"check_on_open must be 'quick' or 'none', got {self.check_on_open!r}")
        if self.reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {self.reserve_bytes!r}")
        if not (isinstance(self.normal_sync_interval_s, int | float)
                and 0 < self.normal_sync_interval_s <= 60):
            raise ValueError("normal_sync_interval_s must be in (0, 60] seconds, got "
                             f"{self.normal_sync_interval_s!r}")
        for name in ("checkpoint_wal_bytes", "wal_max_bytes", "vacuum_slack_bytes",
                     "normal_sync_records"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class NewRecord:
    stream: str
    payload: bytes
    ts_ms: int
    headers: dict[str, str] = field(default_factory=dict)


# Not frozen: a frozen dataclass's __init__ costs about 1 us more per record, a quarter
# of the drain path. Treat it as read-only; `headers` is a read-only view shared by every
# record with the same header set (copying a dict per record cost ~0.5 us on the drain).
@dataclass(slots=True)
class Record:
    seq: int
    stream: str
    ts_ms: int
    headers: Mapping[str, str]
    payload: bytes


# A record as `Buffer.read_with` hands it over: (seq, stream_id, ts_ms, headers_id, payload).
Row = tuple[int, int, int, int, bytes]
_PAYLOAD = operator.itemgetter(4)
T = TypeVar("T")


@dataclass(slots=True)
class QuarantinedRecord:
    """A record one uplink could not deliver, kept aside with why (see Buffer.quarantine)."""

    cursor: str
    seq: int
    reason: str
    at_ms: int
    stream: str
    ts_ms: int
    headers: Mapping[str, str]
    payload: bytes


@dataclass(slots=True)
class _Cursor:
    acked_seq: int
    pending_bytes: int


@dataclass(slots=True)
class _State:
    """What the buffer knows about its file; changed on a copy inside a transaction and
    swapped in only after COMMIT, so a rolled-back transaction leaves it untouched."""

    last_seq: int
    min_seq: int            # first live seq (not passed by every cursor); last_seq + 1 when empty
    live_bytes: int         # payload bytes of the live records
    cursors: dict[str, _Cursor]
    dropped: dict[str, int]
    counters: dict[str, int]    # other meta counters: quarantined.<reason>, salvaged
    quarantined: int            # quarantine rows present
    # First seq whose row may still be in the file: rows [reclaim_from, min_seq) were
    # retired (every cursor passed them) and wait for `Buffer.reclaim` to delete them.
    reclaim_from: int = 0

    def copy(self) -> _State:
        return _State(
            self.last_seq,
            self.min_seq,
            self.live_bytes,
            {k: _Cursor(c.acked_seq, c.pending_bytes) for k, c in self.cursors.items()},
            dict(self.dropped),
            dict(self.counters),
            self.quarantined,
            self.reclaim_from,
        )

    @property
    def count(self) -> int:
        return self.last_seq - self.min_seq + 1

    def floor(self) -> int | None:
        """Highest seq that every cursor has passed (None without cursors)."""
        if not self.cursors:
            return None
        return min(c.acked_seq for c in self.cursors.values())


class _CorruptFile(Exception):
    """Raised while opening: the file is not a usable buffer and must be moved aside."""


def _errcode(e: BaseException) -> int:
    code = getattr(e, "sqlite_errorcode", None)
    return (code or 0) & 0xFF


def _is_corruption(e: BaseException) -> bool:
    return isinstance(e, _CorruptFile) or _errcode(e) in (sqlite3.SQLITE_CORRUPT,
                                                          sqlite3.SQLITE_NOTADB)


class Buffer:
    """A durable record buffer in one SQLite file. Use `Buffer.open(path, settings)`."""

    def __init__(self, path: str, settings: BufferSettings, conn: sqlite3.Connection,
                 lock_fd: int, moved_aside: str | None) -> None:
        self.path = path
        self.settings = settings
        self._lock_fd = lock_fd
        # Clocks used to measure record age (tests replace them to simulate a clock step).
        self._wall_ns: Callable[[], int] = time.time_ns
        self._mono_ns: Callable[[], int] = time.monotonic_ns
        self._boot_id = _read_boot_id()
        self._reserve_path = path + ".reserve"
        # recover() -> _salvage: what this process knew of a file it moved aside.
        self._salvage_hints: dict[str, tuple[int, int, dict[str, int], int]] = {}
        self._attach(conn, moved_aside)
        self._ensure_reserve()

    def _attach(self, conn: sqlite3.Connection, moved_aside: str | None) -> None:
        """(Re)load everything known about the file behind `conn`."""
        self._conn: sqlite3.Connection | None = conn
        self.moved_aside = moved_aside
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        self._streams: dict[str, int] = {}
        self._stream_names: dict[int, str] = {}
        self._header_ids: dict[tuple[tuple[str, str], ...], int] = {}
        self._header_sets: dict[int, Mapping[str, str]] = {}
        # Header sets of records meant for some cursors only, and of readings stamped on
        # an untrusted clock (aged by their clock headers, see _clock_deltas).
        self._targets: dict[int, frozenset[str]] = {}
        self._unsynced_hids: set[int] = set()
        self._targeted_max_seq = 0
        self._st = self._load_state()
        self._newest_trusted_ts = self._load_newest_trusted_ts()
        self._wal_bytes_est = 0
        self._last_checkpoint: dict[str, Any] | None = None
        self._checkpoint_failing = False
        self._wal_pinned_since_ms: int | None = None
        self._next_wal_look = 0.0
        self._pin_warned = False
        self._next_pin_check = 0.0
        self._unsynced_records = 0
        self._unsynced_since: float | None = None
        self._sync_failing = False
        self._next_age_check = 0.0
        self._next_vacuum = time.monotonic() + _VACUUM_INTERVAL_S
        self._next_disk_check = 0.0
        self._disk_cap: int | None = None
        # Reasons currently dropping / blocking, so each start and end is logged once.
        self._dropping: dict[str, int] = {}
        self._drops_now: set[str] = set()
        self._blocked: str | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], settings: BufferSettings, *,
             repair: bool = True) -> Buffer:
        """Open or create the buffer at `path`; a corrupt file is moved aside first and its
        readable records are salvaged into the new one.

        `repair=False` (operator commands): a corrupt or foreign file raises BufferCorrupt
        and is left as it is; nothing is salvaged.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise BufferIOError(f"{path}: cannot create the buffer directory: {e}",
                                retriable=False) from e
        lock_fd = _acquire_lock(path)
        try:
            conn, moved = _open_checked(path, settings, repair=repair)
            try:
                buf = cls(path, settings, conn, lock_fd, moved)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise
        if repair:
            try:
                buf._salvage_pending()
            except BaseException:
                buf.close()
                raise
        return buf

    def _load_state(self) -> _State:
        conn = self._db()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        lo = conn.execute("SELECT min(seq) FROM records").fetchone()[0]
        hi = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
        last_seq = max(meta.get("last_seq", 0), hi or 0)
        cursors = {name: _Cursor(acked, pending) for name, acked, pending in
                   conn.execute("SELECT name, acked_seq, pending_bytes FROM cursors")}
        dropped = {r: meta.get(f"dropped.{r}", 0) for r in DROP_REASONS}
        counters = {k: v for k, v in meta.items()
                    if k.startswith("quarantined.") or k in ("salvaged", "quarantine_delivered")}
        for sid, name in conn.execute("SELECT id, name FROM streams"):
            self._streams[name] = sid
            self._stream_names[sid] = name
        for hid, encoded in conn.execute("SELECT id, encoded FROM header_sets"):
            self._add_header_set(hid, tuple(tuple(p) for p in json.loads(encoded)))
        if self._targets:
            marks = ",".join(str(h) for h in self._targets)
            self._targeted_max_seq = conn.execute(
                f"SELECT coalesce(max(seq), 0) FROM records WHERE headers_id IN ({marks})"
            ).fetchone()[0]
        quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        physical = lo if lo is not None else last_seq + 1
        return _State(last_seq, first_live(physical, [c.acked_seq for c in cursors.values()]),
                      meta.get("live_bytes", 0), cursors, dropped, counters, quarantined,
                      physical)

    def _add_header_set(self, hid: int, pairs: tuple[tuple[str, str], ...]) -> None:
        self._header_ids[pairs] = hid
        visible = dict(pairs)
        target = visible.pop(TARGET_KEY, None)
        if target is not None:
            self._targets[hid] = frozenset(json.loads(target))
        if visible.get(CLOCK_HEADER) == CLOCK_UNSYNCED:
            self._unsynced_hids.add(hid)
        self._header_sets[hid] = MappingProxyType(visible)

    def _load_newest_trusted_ts(self) -> int | None:
        """ts_ms of the newest record stamped on a trusted clock (a bounded look back)."""
        conn = self._db()
        for ts_ms, hid in conn.execute(
                "SELECT ts_ms, headers_id FROM records ORDER BY seq DESC LIMIT 10000"):
            if hid not in self._unsynced_hids:
                return ts_ms
        return None

    # ------------------------------------------------------------------ cursors

    def register_cursor(self, name: str) -> None:
        """Create cursor `name` if it does not exist (idempotent).

        A new cursor starts at the oldest record present, so an uplink added later still
        receives the backlog.
        """
        if not name or not isinstance(name, str):
            raise BufferError(f"{self.path}: cursor name must be a non-empty string, got {name!r}")
        if name in self._st.cursors:
            return

        def body(conn: sqlite3.Connection, st: _State) -> None:
            st.cursors[name] = _Cursor(st.min_seq - 1, st.live_bytes)
            conn.execute("INSERT INTO cursors(name, acked_seq, pending_bytes) VALUES (?, ?, ?)",
                         (name, st.min_seq - 1, st.live_bytes))

        st = self._write("register_cursor", body)
        log.info("buffer cursor registered cursor=%s start_seq=%d path=%s",
                 name, st.min_seq, self.path)

    def unregister_cursor(self, name: str, reason: str = "uplink_removed") -> int:
        """Remove cursor `name` (its uplink is no longer configured); return how many
        records were dropped with it.

        Records only it was still holding (not yet passed by it, passed by every other
        cursor) and its quarantined records are deleted, counted as dropped under
        `reason` and logged. With no other cursor left nothing is deleted: the records
        wait for the next cursor registered.
        """
        self._cursor(name)
        dropped = [0]

        def body(conn: sqlite3.Connection, st: _State) -> None:
            st.cursors.pop(name)
            conn.execute("DELETE FROM cursors WHERE name = ?", (name,))
            floor = st.floor()
            n = 0
            if floor is not None and floor >= st.min_seq:
                # Every record up to the old floor (<= the removed cursor's ack) is gone
                # already, so what the new floor frees was still owed to the removed
                # cursor: a drop, counted.
                n = self._delete_prefix(conn, st, floor, reason=reason)
            if floor is None:
                # Without cursors every row in the file is live (see first_live): the
                # retired ones go now, in this transaction.
                self._reclaim(conn, st, None)
            n += self._drop_quarantine(conn, st, "cursor = ?", (name,), reason)
            dropped[0] = n

        self._write("unregister_cursor", body)
        if dropped[0]:
            log.warning("buffer cursor unregistered, its backlog dropped cursor=%s reason=%s "
                        "records=%d path=%s", name, reason, dropped[0], self.path)
        else:
            log.info("buffer cursor unregistered cursor=%s path=%s", name, self.path)
        return dropped[0]

    def cursors(self) -> list[str]:
        return sorted(self._st.cursors)

    def _cursor(self, name: str) -> _Cursor:
        try:
            return self._st.cursors[name]
        except KeyError:
            raise UnknownCursor(
                f"{self.path}: unknown cursor {name!r} (registered: {sorted(self._st.cursors)})"
            ) from None

    # ------------------------------------------------------------------ append

    def append(self, records: Sequence[NewRecord]) -> list[int]:
        """Store `records` in one transaction and return their seqs once committed.

        Raises BufferFull under the `block` policy when the batch does not fit.
        """
        return self._append(records)

    def _append(self, records: Sequence[NewRecord],
                extra: Callable[[sqlite3.Connection, _State], None] | None = None,
                internal: bool = False) -> list[int]:
        """append(), plus `extra` run inside the same transaction; `internal` allows the
        reserved target header (quarantine retry, salvage)."""
        self._db()
        if not records:
            return []
        batch_bytes = 0
        for r in records:
            p = r.payload
            if type(p) is not bytes and not isinstance(p, bytearray | memoryview):
                raise BufferError(f"{self.path}: record payload must be bytes, got "
                                  f"{type(p).__name__} (stream {r.stream!r})")
            batch_bytes += len(p)
        self._housekeeping_checks()
        self._drops_now.clear()
        attempt = 0
        while True:
            try:
                seqs = self._append_once(records, batch_bytes, extra, internal)
                break
            except sqlite3.Error as e:
                if _errcode(e) != sqlite3.SQLITE_FULL:
                    raise self._wrap(e, "append") from e
                attempt += 1
                self._on_disk_full(e, attempt)
        self._end_drop_episodes()
        if self._blocked is not None:
            log.warning("buffer accepting appends again reason=%s path=%s",
                        self._blocked, self.path)
            self._blocked = None
        self._committed(len(records))
        self._maintain()
        return seqs

    def _append_once(self, records: Sequence[NewRecord], batch_bytes: int,
                     extra: Callable[[sqlite3.Connection, _State], None] | None = None,
                     internal: bool = False) -> list[int]:
        conn = self._db()
        st = self._st.copy()
        n = len(records)
        new_streams: dict[str, int] = {}
        new_headers: dict[tuple[tuple[str, str], ...], int] = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._enforce_retention(conn, st, n, batch_bytes)
            first = st.last_seq + 1
            rows = []
            append_row = rows.append
            streams = self._streams
            header_ids = self._header_ids
            # Records of one batch often share one headers dict; ids are stable while
            # `records` holds them, i.e. for this call only.
            by_obj: dict[int, int] = {}
            seq = first
            for r in records:
                sid = streams.get(r.stream)
                if sid is None:
                    sid = new_streams.get(r.stream)
                    if sid is None:
                        if not isinstance(r.stream, str):
                            raise BufferError(f"{self.path}: record stream must be a string, "
                                              f"got {r.stream!r}")
                        sid = conn.execute("INSERT INTO streams(name) VALUES (?)",
                                           (r.stream,)).lastrowid
                        new_streams[r.stream] = sid
                h = r.headers
                hid = by_obj.get(id(h))
                if hid is None:
                    # Insertion order, not sorted: cheaper, and a differently ordered copy
                    # of the same headers only costs one more dictionary row.
                    key = tuple(h.items())
                    hid = header_ids.get(key)
                    if hid is None:
                        hid = new_headers.get(key)
                        if hid is None:
                            if not internal and TARGET_KEY in h:
                                raise BufferError(f"{self.path}: header key {TARGET_KEY!r} "
                                                  f"is reserved (stream {r.stream!r})")
                            hid = conn.execute("INSERT INTO header_sets(encoded) VALUES (?)",
                                               (json.dumps(key),)).lastrowid
                            new_headers[key] = hid
                    by_obj[id(h)] = hid
                append_row((seq, sid, r.ts_ms, hid, r.payload))
                seq += 1
            conn.executemany(
                "INSERT INTO records(seq, stream_id, ts_ms, headers_id, payload) "
                "VALUES (?, ?, ?, ?, ?)", rows)
            self._trim_after_insert(conn, st, first, n, batch_bytes)
            st.last_seq = seq - 1
            st.live_bytes += batch_bytes
            conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (st.last_seq,))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'live_bytes'", (st.live_bytes,))
            if st.cursors:
                conn.execute("UPDATE cursors SET pending_bytes = pending_bytes + ?",
                             (batch_bytes,))
                for c in st.cursors.values():
                    c.pending_bytes += batch_bytes
            if st.min_seq > first:      # the buffer was empty
                st.min_seq = first
            if extra is not None:
                extra(conn, st)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._st = st
        for name, sid in new_streams.items():
            self._streams[name] = sid
            self._stream_names[sid] = name
        for key, hid in new_headers.items():
            self._add_header_set(hid, key)
        last_hid = rows[-1][3]
        if self._targets and any(row[3] in self._targets for row in rows):
            self._targeted_max_seq = st.last_seq
        if last_hid not in self._unsynced_hids:
            self._newest_trusted_ts = rows[-1][2]
        self._wal_bytes_est += batch_bytes + n * _RECORD_OVERHEAD_ESTIMATE + 3 * self._page_size
        return list(range(first, st.last_seq + 1))

    # ------------------------------------------------------------------ retention

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return (pages - free) * self._page_size

    def _cap(self) -> tuple[int, str]:
        if self._disk_cap is not None and self._disk_cap < self.settings.max_size_bytes:
            return self._disk_cap, "disk_full"
        return self.settings.max_size_bytes, "size"

    def _enforce_retention(self, conn: sqlite3.Connection, st: _State, n: int,
                           batch_bytes: int) -> None:
        """Inside the append transaction: apply max age and the size cap to `st`."""
        s = self.settings
        now = time.monotonic()
        if (now >= self._next_age_check and (st.count > 0 or st.quarantined > 0)
                and math.isfinite(s.max_age_s)):
            cutoff = self._wall_ns() // 1_000_000 - int(s.max_age_s * 1000)
            deltas = self._clock_deltas()
            upto = self._expired_upto(conn, st, cutoff, deltas)
            if upto >= st.min_seq and s.when_full == "block":
                # Checked again on every append until an ack removes the old record.
                self._refuse("age", f"oldest record (seq {st.min_seq}) is older than "
                                    f"max_age {s.max_age_s:g}s")
            self._next_age_check = now + min(_AGE_CHECK_INTERVAL_S, s.max_age_s / 10)
            if upto >= st.min_seq:
                self._delete_prefix(conn, st, upto, reason="age")
            if st.quarantined:
                self._expire_quarantine(conn, st, cutoff, deltas)
        cap, reason = self._cap()
        need_est = batch_bytes + n * _RECORD_OVERHEAD_ESTIMATE
        used = self._used_bytes(conn)
        if used + need_est <= cap:
            return
        if self._reclaim(conn, st, None):
            # Retired rows make room first: space is never taken from a live record (nor
            # an append refused) while an acknowledged one still holds it.
            used = self._used_bytes(conn)
            if used + need_est <= cap:
                return
        if s.when_full == "block":
            self._refuse(reason, f"{used} bytes used + {need_est} for this batch exceeds the "
                                 f"{'disk' if reason == 'disk_full' else 'max_size_bytes'} "
                                 f"limit of {cap} bytes")
        used = self._drop_until(conn, st, cap, need_est, reason)
        if used + need_est > cap:
            if st.count == 0:
                raise BufferError(
                    f"{self.path}: a batch of {n} records ({batch_bytes} payload bytes) does "
                    f"not fit under the limit of {cap} bytes even with the buffer empty",
                    retriable=reason == "disk_full")

    def _clock_deltas(self) -> dict[int, int | None]:
        """For header sets of readings stamped on an untrusted clock: the ms to add to
        their ts_ms to get the time on today's clock (None: unknown, from another boot).

        The stamped header carries the wall-minus-monotonic offset of the moment; in the
        same boot, now's offset minus that one is how far the wall clock was stepped
        since, so ts + delta is the reading's time measured on the monotonic clock.
        """
        if not self._unsynced_hids:
            return {}
        now_offset = self._wall_ns() - self._mono_ns()
        out: dict[int, int | None] = {}
        for hid in self._unsynced_hids:
            h = self._header_sets[hid]
            if self._boot_id is None or h.get(CLOCK_BOOT_HEADER) != self._boot_id:
                out[hid] = None
                continue
            try:
                out[hid] = (now_offset - int(h[CLOCK_OFFSET_HEADER])) // 1_000_000
            except (KeyError, ValueError):
                out[hid] = None
        return out

    def _expired_upto(self, conn: sqlite3.Connection, st: _State, cutoff: int,
                      deltas: Mapping[int, int | None]) -> int:
        """Last seq of the oldest run of records older than `cutoff` (min_seq - 1: none).

        Records leave from the oldest end only, so expiry stops at the first record young
        enough (a late out-of-order timestamp waits for its turn), and at the first
        record whose age is unknown (untrusted clock of an earlier boot)."""
        none = st.min_seq - 1
        if st.count == 0:
            return none
        if not deltas:
            oldest_ts = conn.execute("SELECT ts_ms FROM records WHERE seq = ?",
                                     (st.min_seq,)).fetchone()[0]
            if oldest_ts >= cutoff:
                return none
            row = conn.execute("SELECT seq FROM records WHERE seq >= ? AND ts_ms >= ? "
                               "ORDER BY seq LIMIT 1", (st.min_seq, cutoff)).fetchone()
            return (row[0] - 1) if row else st.last_seq
        after = none
        while True:
            rows = conn.execute("SELECT seq, ts_ms, headers_id FROM records WHERE seq > ? "
                                "ORDER BY seq LIMIT 1000", (after,)).fetchall()
            if not rows:
                return after
            for seq, ts_ms, hid in rows:
                d = deltas.get(hid, 0)
                if d is None or ts_ms + d >= cutoff:
                    return seq - 1
                after = seq

    def _expire_quarantine(self, conn: sqlite3.Connection, st: _State, cutoff: int,
                           deltas: Mapping[int, int | None]) -> None:
        old = [qid for qid, ts_ms, hid in conn.execute(
                   "SELECT id, ts_ms, headers_id FROM quarantine WHERE ts_ms < ?", (cutoff,))
               if deltas.get(hid, 0) is not None and ts_ms + (deltas.get(hid) or 0) < cutoff]
        if old:
            self._drop_quarantine(conn, st, f"id IN ({','.join(map(str, old))})", (), "age")

    def _drop_quarantine(self, conn: sqlite3.Connection, st: _State, where: str,
                         args: tuple[Any, ...], reason: str) -> int:
        """Delete quarantine rows matching `where`, counted as dropped under `reason`."""
        if st.quarantined == 0:
            return 0
        n = conn.execute(f"DELETE FROM quarantine WHERE {where}", args).rowcount
        if n:
            st.quarantined -= n
            self._count(conn, st.dropped, f"dropped.{reason}", reason, n)
            self._wal_bytes_est += 4 * self._page_size
        return n

    @staticmethod
    def _count(conn: sqlite3.Connection, counters: dict[str, int], meta_key: str, key: str,
               n: int) -> None:
        counters[key] = counters.get(key, 0) + n
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO "
                     "UPDATE SET value = excluded.value", (meta_key, counters[key]))

    def _drop_until(self, conn: sqlite3.Connection, st: _State, cap: int, need: int,
                    reason: str) -> int:
        """Drop the oldest records until `need` more bytes fit under `cap`; return the
        bytes used afterwards."""
        self._reclaim(conn, st, None)
        used = self._used_bytes(conn)
        for _ in range(64):
            if used + need <= cap:
                break
            if st.count == 0:
                if st.quarantined == 0:
                    break
                # Only quarantined records left: the oldest of them go, as records would.
                self._drop_quarantine(conn, st, "id IN (SELECT id FROM quarantine ORDER BY "
                                      "seq LIMIT ?)", (max(1, st.quarantined // 4),), reason)
                used = self._used_bytes(conn)
                continue
            per_record = max(1, used // st.count)
            k = math.ceil((used + need - cap) / per_record) + max(1, self._page_size // per_record)
            self._delete_prefix(conn, st, st.min_seq + k - 1, reason=reason)
            used = self._used_bytes(conn)
        return used

    def _trim_after_insert(self, conn: sqlite3.Connection, st: _State, first: int, n: int,
                           batch_bytes: int) -> None:
        """The look-ahead above estimates; this makes the cap exact. Pages only partly
        emptied by earlier drops, or a batch of awkwardly sized records, can leave the file
        over the cap after the insert: drop more of the oldest (never the new batch)."""
        cap, reason = self._cap()
        used = self._used_bytes(conn)
        if used > cap and self._reclaim(conn, st, None):
            used = self._used_bytes(conn)
        while used > cap and st.min_seq < first:
            if self.settings.when_full == "block":
                self._refuse(reason, f"{used} bytes used with this batch exceeds the limit of "
                                     f"{cap} bytes")
            old = first - st.min_seq
            per_record = max(1, used // (old + n))
            k = math.ceil((used - cap) / per_record) + max(1, self._page_size // per_record)
            self._delete_prefix(conn, st, min(st.min_seq + k - 1, first - 1), reason=reason)
            used = self._used_bytes(conn)
        if used > cap:
            raise BufferError(
                f"{self.path}: a batch of {n} records ({batch_bytes} payload bytes) does "
                f"not fit under the limit of {cap} bytes even with the buffer empty",
                retriable=reason == "disk_full")

    def _refuse(self, reason: str, detail: str) -> None:
        if self._blocked != reason:
            log.warning("buffer full, refusing appends policy=block reason=%s path=%s detail=%s",
                        reason, self.path, detail)
            self._blocked = reason
        raise BufferFull(f"{self.path}: buffer full ({reason}): {detail}", reason=reason)

    def _delete_prefix(self, conn: sqlite3.Connection, st: _State, upto: int,
                       reason: str | None) -> int:
        """Delete records [st.min_seq, upto] inside the caller's transaction.

        reason None: every cursor passed them (acks); they are retired, and their rows
        deleted by `reclaim`. Otherwise they are dropped by a retention rule and counted
        under `reason`, and their rows deleted now with any retired ones before them.
        """
        upto = min(upto, st.last_seq)
        lo = st.min_seq
        if upto < lo:
            return 0
        total = conn.execute("SELECT coalesce(sum(length(payload)), 0) FROM records "
                             "WHERE seq >= ? AND seq <= ?", (lo, upto)).fetchone()[0]
        if reason is not None:
            for name, c in st.cursors.items():
                if c.acked_seq >= upto:
                    continue
                start = max(c.acked_seq + 1, lo)
                if start == lo:
                    b = total
                else:
                    b = conn.execute("SELECT coalesce(sum(length(payload)), 0) FROM records "
                                     "WHERE seq >= ? AND seq <= ?", (start, upto)).fetchone()[0]
                c.pending_bytes -= b
                conn.execute("UPDATE cursors SET pending_bytes = ? WHERE name = ?",
                             (c.pending_bytes, name))
        if reason is not None:
            conn.execute("DELETE FROM records WHERE seq >= ? AND seq <= ?",
                         (min(lo, st.reclaim_from), upto))
            st.reclaim_from = upto + 1
        if reason is not None and reason not in ("age", "uplink_removed") and st.quarantined:
            # Size, disk and purge drops take quarantined copies of records as old as
            # the ones dropped (age has its own check on their timestamps).
            self._drop_quarantine(conn, st, "seq <= ?", (upto,), reason)
        n = upto - lo + 1
        st.min_seq = upto + 1
        st.live_bytes -= total
        conn.execute("UPDATE meta SET value = ? WHERE key = 'live_bytes'", (st.live_bytes,))
        if reason is not None:
            st.dropped[reason] = st.dropped.get(reason, 0) + n
            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO "
                         "UPDATE SET value = excluded.value",
                         (f"dropped.{reason}", st.dropped[reason]))
            if reason not in _NOT_EPISODES:
                if reason not in self._dropping:
                    log.warning("buffer dropping oldest records policy=drop_oldest reason=%s "
                                "path=%s first_seq=%d", reason, self.path, lo)
                    self._dropping[reason] = 0
                self._dropping[reason] += n
                self._drops_now.add(reason)
        if reason is not None:
            self._wal_bytes_est += 4 * self._page_size
        return n

    def _reclaim(self, conn: sqlite3.Connection, st: _State, max_rows: int | None) -> int:
        """Inside the caller's transaction: delete the rows of up to `max_rows` (None: all)
        retired records, oldest first; how many."""
        hi = st.min_seq - 1
        if st.reclaim_from > hi:
            return 0
        if max_rows is not None:
            hi = min(hi, st.reclaim_from + max_rows - 1)
        n = conn.execute("DELETE FROM records WHERE seq >= ? AND seq <= ?",
                         (st.reclaim_from, hi)).rowcount
        st.reclaim_from = hi + 1
        self._wal_bytes_est += max(4, n // 16) * self._page_size  # ~16 rows a page
        return n

    def reclaimable(self) -> int:
        """Retired records whose rows are still in the file (a plain attribute read)."""
        return max(0, self._st.min_seq - self._st.reclaim_from)

    def reclaim(self, max_rows: int | None = None) -> int:
        """Delete the rows of retired records (every cursor passed them), at most
        `max_rows` of them, in one transaction; returns how many. The AsyncBuffer calls it
        when nothing else waits for the buffer; retention calls it before it would drop a
        live record for space. Nothing live is touched."""
        if self.reclaimable() == 0:
            return 0
        done = [0]

        def body(conn: sqlite3.Connection, st: _State) -> None:
            done[0] = self._reclaim(conn, st, max_rows)

        self._write("reclaim", body)
        self._maintain()
        return done[0]

    def _end_drop_episodes(self) -> None:
        """After a successful append, log once the end of each drop episode that did not
        drop anything this time."""
        for reason in list(self._dropping):
            if reason not in self._drops_now:
                log.warning("buffer stopped dropping records reason=%s path=%s dropped=%d",
                            reason, self.path, self._dropping.pop(reason))
        self._drops_now.clear()

    def _on_disk_full(self, e: BaseException, attempt: int) -> None:
        """SQLITE_FULL during an append (already rolled back).

        Lower the disk limit below what is used now, free room for SQLite's own work
        (reserve file, WAL), then either refuse (`block`) or commit a drop of the oldest
        records on its own and give the freed pages back to the filesystem, so that the
        retried append finds room. Nothing committed is touched by a failed attempt.
        """
        conn = self._db()
        used = self._used_bytes(conn)
        lowered = max(self._page_size * 8, used - max(used // 10, 16 * self._page_size) * attempt)
        if self._disk_cap is None or lowered < self._disk_cap:
            self._disk_cap = lowered
        self._next_disk_check = time.monotonic() + _DISK_CHECK_INTERVAL_S
        if "disk_full" not in self._dropping and self._blocked != "disk_full":
            log.error("buffer disk full path=%s used_bytes=%d limit_now=%d error=%s",
                      self.path, used, self._disk_cap, e)
        self._make_room(e)
        if self.settings.when_full == "block":
            self._refuse("disk_full", f"the disk is full ({e})")
        if attempt > _DISK_FULL_RETRIES or self._st.count == 0:
            raise BufferIOError(f"{self.path}: disk full and nothing left to drop ({e})") from e
        cap = self._disk_cap

        def drop(conn: sqlite3.Connection, st: _State) -> None:
            self._drop_until(conn, st, cap, 0, "disk_full")

        with contextlib.suppress(BufferError):
            self._write("drop for disk space", drop)
        # Free pages inside the file do not help a WAL that cannot grow: hand them back.
        with contextlib.suppress(sqlite3.Error):
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free:
                conn.executescript(f"PRAGMA incremental_vacuum({int(free)});")
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _make_room(self, e: BaseException) -> None:
        """Give SQLite room to finish a checkpoint: delete the reserve file, truncate the
        WAL. Without this a WAL that cannot be checkpointed (the main file cannot grow)
        could never be reset, and even a delete would not fit."""
        if os.path.exists(self._reserve_path):
            with contextlib.suppress(OSError):
                os.unlink(self._reserve_path)
                log.warning("buffer released its disk reserve path=%s error=%s",
                            self._reserve_path, e)
        with contextlib.suppress(sqlite3.Error):
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _ensure_reserve(self) -> None:
        """Keep `reserve_bytes` allocated next to the buffer for the day the disk fills."""
        size = self.settings.reserve_bytes
        if size <= 0 or os.path.exists(self._reserve_path):
            return
        try:
            fd = os.open(self._reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self._reserve_path)
            return
        os.close(fd)

    def _housekeeping_checks(self) -> None:
        """Every few seconds, turn free disk space into a limit so drop_oldest starts
        before SQLite meets ENOSPC (the reactive path above remains the backstop)."""
        now = time.monotonic()
        if now < self._next_disk_check:
            return
        self._next_disk_check = now + _DISK_CHECK_INTERVAL_S
        try:
            vfs = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        free = vfs.f_bavail * vfs.f_frsize
        used = self._used_bytes(self._db())
        wal_room = 2 * self.settings.checkpoint_wal_bytes + 16 * self._page_size
        if (not os.path.exists(self._reserve_path)
                and free > 2 * self.settings.reserve_bytes + wal_room):
            self._ensure_reserve()
            free -= self.settings.reserve_bytes
        room = used + free - wal_room
        if room >= self.settings.max_size_bytes:
            if self._disk_cap is not None:
                log.warning("buffer disk space available again path=%s free_bytes=%d",
                            self.path, free)
            self._disk_cap = None
        else:
            self._disk_cap = max(room, self._page_size * 8)

    # ------------------------------------------------------------------ read / ack

    def read(self, cursor: str, limit: int = 1000, max_bytes: int | None = None, *,
             after_seq: int | None = None, stream: str | None = None) -> list[Record]:
        """Records after the cursor (or after `after_seq` if further), oldest first.

        At most `limit` records and, beyond the first, at most `max_bytes` payload bytes.
        `stream` filters one stream (a scan, meant for small backlogs). No read
        transaction is held after the call returns.
        """
        names = self._stream_names
        hsets = self._header_sets
        return [Record(seq, names[sid], ts_ms, hsets[hid], payload) for seq, sid, ts_ms, hid, payload
                in self._rows(cursor, limit, max_bytes, after_seq, stream)]

    def read_with(self, cursor: str, consume: Callable[[list[Row], Mapping[int, str],
                                                        Mapping[int, Mapping[str, str]]], T],
                  limit: int = 1000, max_bytes: int | None = None, *,
                  after_seq: int | None = None) -> T:
        """The rows `read` would return as Records, handed to `consume(rows, streams,
        header_sets)` on this (the buffer's) thread; returns what `consume` returns.

        A row is (seq, stream_id, ts_ms, headers_id, payload); `streams` maps a stream_id
        to its name and `header_sets` a headers_id to the read-only headers that every
        Record of that set shares. Both are replaced (new objects) when the buffer recovers
        from corruption, so ids cached with them must be dropped when they change. For a
        consumer that turns rows into something else at once, without a Record per row
        (the Kafka uplink formats its batches here, and the rows never cross threads).
        """
        return consume(self._rows(cursor, limit, max_bytes, after_seq, None),
                       self._stream_names, self._header_sets)

    def _rows(self, cursor: str, limit: int, max_bytes: int | None, after_seq: int | None,
              stream: str | None) -> list[Row]:
        """The rows of `read`, as SQLite returns them."""
        conn = self._db()
        c = self._cursor(cursor)
        start = c.acked_seq if after_seq is None else max(after_seq, c.acked_seq)
        if limit <= 0:
            return []
        sid = None
        if stream is not None:
            sid = self._streams.get(stream)
            if sid is None:
                return []
        skip = self._skipped_hids(cursor, start)
        while True:
            try:
                if sid is None:
                    cur = conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload "
                                       "FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                       (start, limit))
                else:
                    cur = conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload "
                                       "FROM records WHERE seq > ? AND stream_id = ? "
                                       "ORDER BY seq LIMIT ?", (start, sid, limit))
                rows = cur.fetchall()
            except sqlite3.Error as e:
                raise self._wrap(e, "read") from e
            out = [row for row in rows if row[3] not in skip] if skip else rows
            if max_bytes is not None and sum(map(len, map(_PAYLOAD, out))) > max_bytes:
                total = 0
                for k, row in enumerate(out):
                    total += len(row[4])
                    if total > max_bytes and k:
                        return out[:k]
            # Only when every row fetched was for other cursors: look further.
            if out or len(rows) < limit:
                return out
            start = rows[-1][0]

    def _skipped_hids(self, cursor: str, start: int) -> frozenset[int]:
        """Header sets this cursor must not read (records meant for other cursors)."""
        if not self._targets or start >= self._targeted_max_seq:
            return frozenset()
        return frozenset(h for h, names in self._targets.items() if cursor not in names)

    def has_records(self, cursor: str, after_seq: int | None = None) -> bool:
        """True when records exist after the cursor (and after `after_seq`)."""
        c = self._cursor(cursor)
        start = c.acked_seq if after_seq is None else max(after_seq, c.acked_seq)
        if not (self._st.last_seq > start and self._st.count > 0):
            return False
        skip = self._skipped_hids(cursor, start)
        if not skip:
            return True
        marks = ",".join(str(h) for h in skip)
        try:
            row = self._db().execute(f"SELECT 1 FROM records WHERE seq > ? AND headers_id "
                                     f"NOT IN ({marks}) LIMIT 1", (start,)).fetchone()
        except sqlite3.Error as e:
            raise self._wrap(e, "has_records") from e
        return row is not None

    def ack(self, cursor: str, upto_seq: int) -> None:
        """Cursor `cursor` passes every record <= upto_seq; records every cursor passed go."""
        c = self._cursor(cursor)
        if upto_seq <= c.acked_seq:
            return
        if upto_seq > self._st.last_seq:
            raise BufferError(f"{self.path}: cursor {cursor!r} acked seq {upto_seq}, beyond the "
                              f"last stored seq {self._st.last_seq}")
        old = c.acked_seq

        def body(conn: sqlite3.Connection, st: _State) -> None:
            sc = st.cursors[cursor]
            sc.acked_seq = upto_seq
            floor = min(x.acked_seq for x in st.cursors.values())
            acked_bytes, gone_bytes = conn.execute(
                "SELECT coalesce(sum(length(payload)), 0), "
                "coalesce(sum(CASE WHEN seq <= ? THEN length(payload) END), 0) "
                "FROM records WHERE seq > ? AND seq <= ?", (floor, old, upto_seq)).fetchone()
            sc.pending_bytes -= acked_bytes
            conn.execute("UPDATE cursors SET acked_seq = ?, pending_bytes = ? WHERE name = ?",
                         (upto_seq, sc.pending_bytes, cursor))
            if floor >= st.min_seq:
                # Retired: the retired range lies inside the acked range (only the slowest
                # cursor moves the floor), so its bytes were summed above. The rows are
                # deleted by reclaim(), off the path of a drain (a row delete costs about
                # as much as reading and formatting the record).
                st.min_seq = floor + 1
                st.live_bytes -= gone_bytes
                conn.execute("UPDATE meta SET value = ? WHERE key = 'live_bytes'",
                             (st.live_bytes,))

        self._write("ack", body)
        self._wal_bytes_est += self._page_size
        self._maintain()

    def purge(self, cursor: str | None = None) -> int:
        """Drop everything (or everything cursor `cursor` has not passed); return the count.

        Purged records are counted as dropped with reason "purged".
        """
        count = self._st.count
        if cursor is None:
            count += self._st.quarantined

            def body(conn: sqlite3.Connection, st: _State) -> None:
                self._delete_prefix(conn, st, st.last_seq, reason="purged")
                self._drop_quarantine(conn, st, "1", (), "purged")
        else:
            c = self._cursor(cursor)
            count = self._st.last_seq - max(c.acked_seq, self._st.min_seq - 1)

            def body(conn: sqlite3.Connection, st: _State) -> None:
                sc = st.cursors[cursor]
                sc.acked_seq = st.last_seq
                sc.pending_bytes = 0
                conn.execute("UPDATE cursors SET acked_seq = ?, pending_bytes = 0 "
                             "WHERE name = ?", (st.last_seq, cursor))
                st.dropped["purged"] = st.dropped.get("purged", 0) + count
                conn.execute("INSERT INTO meta(key, value) VALUES ('dropped.purged', ?) "
                             "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                             (st.dropped["purged"],))
                floor = st.floor()
                if floor is not None and floor >= st.min_seq:
                    self._delete_prefix(conn, st, floor, reason=None)
                purged_q[0] = self._drop_quarantine(conn, st, "cursor = ?", (cursor,),
                                                    "purged")

        purged_q = [0]
        self._write("purge", body)
        count += purged_q[0]
        log.warning("buffer purged path=%s cursor=%s records=%d", self.path, cursor or "*", count)
        return count

    # ------------------------------------------------------------------ quarantine

    def quarantine(self, cursor: str, seq: int, reason: str) -> bool:
        """Keep a copy of record `seq` aside for cursor `cursor`, which cannot deliver it
        (refused for the record itself: too large, not encodable). Returns False when it
        was already quarantined for that cursor (idempotent: a crash between this call and
        the ack that follows it quarantines the same record again, counted once).

        The record itself is left where it is: the uplink then acks past it as usual, so
        the records behind it flow. The copy is counted under `reason`, listed by
        `quarantine_list`, and leaves only by `quarantine_retry`, `quarantine_drop`,
        retention (age, size, disk) or `purge`.
        """
        self._cursor(cursor)
        if not isinstance(reason, str) or not reason or len(reason) > 200:
            raise BufferError(f"{self.path}: quarantine reason must be a non-empty string of "
                              f"at most 200 characters, got {reason!r}")
        if not (self._st.min_seq <= seq <= self._st.last_seq):
            raise BufferError(f"{self.path}: cannot quarantine seq {seq} for {cursor!r}: not "
                              f"in the buffer (present: {self._st.min_seq}..{self._st.last_seq})")
        added = [False]

        def body(conn: sqlite3.Connection, st: _State) -> None:
            cur = conn.execute(
                "INSERT OR IGNORE INTO quarantine(cursor, seq, reason, at_ms, stream_id, ts_ms, "
                "headers_id, payload) SELECT ?, seq, ?, ?, stream_id, ts_ms, headers_id, payload "
                "FROM records WHERE seq = ?",
                (cursor, reason, self._wall_ns() // 1_000_000, seq))
            if cur.rowcount == 1:
                added[0] = True
                st.quarantined += 1
                self._count(conn, st.counters, f"quarantined.{reason}", f"quarantined.{reason}", 1)

        self._write("quarantine", body)
        if added[0]:
            # Per record at debug: the uplink logs the refusal once, the counters tell the rest.
            log.debug("buffer record quarantined cursor=%s seq=%d reason=%s path=%s",
                      cursor, seq, reason, self.path)
        self._maintain()
        return added[0]

    @staticmethod
    def _q_where(cursor: str | None, reason: str | None,
                 seqs: Sequence[int] | None) -> tuple[str, tuple[Any, ...]]:
        parts: list[str] = []
        args: list[Any] = []
        if cursor is not None:
            parts.append("cursor = ?")
            args.append(cursor)
        if reason is not None:
            parts.append("reason = ?")
            args.append(reason)
        if seqs is not None:
            parts.append(f"seq IN ({','.join(str(int(x)) for x in seqs) or 'NULL'})")
        return (" AND ".join(parts) or "1"), tuple(args)

    def quarantine_list(self, cursor: str | None = None, reason: str | None = None, *,
                        seqs: Sequence[int] | None = None,
                        limit: int | None = None) -> list[QuarantinedRecord]:
        """Quarantined records (optionally of one cursor / reason / seqs), by cursor, seq."""
        where, args = self._q_where(cursor, reason, seqs)
        sql = ("SELECT cursor, seq, reason, at_ms, stream_id, ts_ms, headers_id, payload FROM "
               f"quarantine WHERE {where} ORDER BY cursor, seq")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        try:
            rows = self._db().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise self._wrap(e, "quarantine_list") from e
        return [QuarantinedRecord(c, seq, why, at, self._stream_names.get(sid, f"#{sid}"), ts,
                                  self._header_sets.get(hid, MappingProxyType({})), payload)
                for c, seq, why, at, sid, ts, hid, payload in rows]

    def quarantine_retry(self, cursor: str | None = None, reason: str | None = None, *,
                         seqs: Sequence[int] | None = None) -> int:
        """Move quarantined records back so their uplink delivers them again; return how many.

        Each is appended anew at the end of the buffer (a new seq, its original stream,
        timestamp, headers and payload), for its own cursor only: the other uplinks skip
        it. Order: by cursor, then by original seq. Retention applies as to any append.
        """
        moved = 0
        while True:
            batch = self.quarantine_list(cursor, reason, seqs=seqs, limit=_SALVAGE_BATCH)
            batch = [q for q in batch if q.cursor in self._st.cursors]
            if not batch:
                return moved
            records = [NewRecord(q.stream, q.payload, q.ts_ms,
                                 {**q.headers, TARGET_KEY: json.dumps([q.cursor])})
                       for q in batch]
            keys = [(q.cursor, q.seq) for q in batch]

            def extra(conn: sqlite3.Connection, st: _State, keys=keys) -> None:
                conn.executemany("DELETE FROM quarantine WHERE cursor = ? AND seq = ?", keys)
                st.quarantined -= len(keys)

            self._append(records, extra=extra, internal=True)
            moved += len(batch)
            log.warning("buffer quarantined records re-sent records=%d cursor=%s reason=%s "
                        "path=%s", len(batch), cursor or "*", reason or "*", self.path)

    def quarantine_drop(self, cursor: str | None = None, reason: str | None = None, *,
                        seqs: Sequence[int] | None = None) -> int:
        """Delete quarantined records (an operator's decision); counted as dropped under
        `quarantine_dropped`. Returns how many."""
        where, args = self._q_where(cursor, reason, seqs)
        n = [0]

        def body(conn: sqlite3.Connection, st: _State) -> None:
            n[0] = self._drop_quarantine(conn, st, where, args, "quarantine_dropped")

        self._write("quarantine_drop", body)
        if n[0]:
            log.warning("buffer quarantined records dropped records=%d cursor=%s reason=%s "
                        "path=%s", n[0], cursor or "*", reason or "*", self.path)
        return n[0]

    def quarantine_delivered(self, cursor: str, seqs: Sequence[int]) -> int:
        """Remove quarantined records that their uplink has now delivered (a held destination
        that accepts again, drained oldest first). Not a drop: counted under
        `quarantine_delivered`. Returns how many rows went."""
        if not seqs:
            return 0
        where, args = self._q_where(cursor, None, seqs)
        n = [0]

        def body(conn: sqlite3.Connection, st: _State) -> None:
            n[0] = conn.execute(f"DELETE FROM quarantine WHERE {where}", args).rowcount
            if n[0]:
                st.quarantined -= n[0]
                self._count(conn, st.counters, "quarantine_delivered", "quarantine_delivered", n[0])

        self._write("quarantine_delivered", body)
        return n[0]

    def quarantine_stats(self) -> dict[str, Any]:
        conn = self._db()
        try:
            rows = conn.execute("SELECT cursor, reason, count(*), coalesce(sum(length(payload)), 0)"
                                " FROM quarantine GROUP BY cursor, reason").fetchall()
        except sqlite3.Error as e:
            raise self._wrap(e, "quarantine_stats") from e
        return _quarantine_summary(rows, self._st.counters)

    # ------------------------------------------------------------------ durability (normal)

    def _committed(self, n_records: int) -> None:
        """After a commit: with synchronous="normal", fsync the WAL once enough records
        or enough time have gone by since the last sync (the documented loss window)."""
        s = self.settings
        if s.synchronous != "normal":
            return
        now = time.monotonic()
        if self._unsynced_since is None:
            self._unsynced_since = now
        self._unsynced_records += n_records
        if (self._unsynced_records >= s.normal_sync_records
                or now - self._unsynced_since >= s.normal_sync_interval_s):
            self._try_sync()

    def sync_due_in(self) -> float | None:
        """Seconds until unsynced commits must be fsynced (None: nothing unsynced)."""
        if self._unsynced_since is None:
            return None
        return max(0.0, self._unsynced_since + self.settings.normal_sync_interval_s
                   - time.monotonic())

    def sync_if_due(self) -> None:
        """The timer's call (AsyncBuffer): fsync the WAL if the oldest unsynced commit is
        `normal_sync_interval_s` old. A no-op under synchronous="full"."""
        due = self.sync_due_in()
        if due is not None and due <= 0 and self._conn is not None:
            self._try_sync()

    def sync(self) -> None:
        """Make every commit so far durable now (fsync of the WAL)."""
        self._db()
        fd = None
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
            os.fsync(fd)
        except FileNotFoundError:
            pass            # no WAL: everything is in the main file, synced by checkpoints
        except OSError as e:
            raise BufferIOError(f"{self.path}: fsync of the WAL failed: {e}") from e
        finally:
            if fd is not None:
                os.close(fd)
        self._unsynced_records = 0
        self._unsynced_since = None

    def _try_sync(self) -> None:
        try:
            self.sync()
        except BufferError as e:
            # What was committed stays committed; the next commit or tick tries again.
            if not self._sync_failing:
                log.warning("buffer WAL sync failing path=%s error=%s", self.path, e)
                self._sync_failing = True
            return
        if self._sync_failing:
            log.warning("buffer WAL sync works again path=%s", self.path)
            self._sync_failing = False

    # ------------------------------------------------------------------ maintenance

    def _maintain(self) -> None:
        """Bounded WAL and reclaimed space, run after writes on the same thread."""
        s = self.settings
        now = time.monotonic()
        wal_big = self._wal_bytes_est >= s.checkpoint_wal_bytes
        if not wal_big and now >= self._next_wal_look:
            # The estimate counts record bytes; small commits write whole pages, so the file
            # itself is looked at now and then (once a second): a pin shows up either way.
            self._next_wal_look = now + 1.0
            wal_big = _size(self.path + "-wal") >= s.checkpoint_wal_bytes
        if (wal_big
                or (self._wal_pinned_since_ms is not None and now >= self._next_pin_check)):
            # The write before us is committed and must be reported as such: a failing
            # checkpoint (disk full) is logged and retried after the next write.
            self._next_pin_check = now + _PIN_RECHECK_S
            with contextlib.suppress(BufferError):
                self.checkpoint()
        if now >= self._next_vacuum:
            self._next_vacuum = now + _VACUUM_INTERVAL_S
            self._vacuum_step()

    def checkpoint(self, mode: str = "PASSIVE") -> dict[str, Any]:
        """Copy the WAL into the database file.

        PASSIVE (the buffer's own, after writes) never waits: when a reader holds a
        snapshot (an open `sqlite3` shell, a long export), the frames after it stay in the
        WAL, the WAL is reported pinned in stats() (logged once beyond `wal_max_bytes`) and
        the writer goes on. Once the pin goes, the next check copies everything and cuts
        the WAL file back to zero. Other modes wait for readers (SQLite's busy timeout).
        """
        conn = self._db()
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise BufferError(f"{self.path}: unknown checkpoint mode {mode!r}")
        try:
            busy, frames, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            pinned = frames > 0 and done < frames
            if mode == "PASSIVE" and not pinned and self._wal_pinned_since_ms is not None:
                # The pin is gone: cut the WAL file back now, without waiting (a reader
                # that came in meanwhile only means the file is cut at a later check).
                busy, frames, done = self._truncate_nowait(conn)
        except sqlite3.OperationalError as e:
            if not self._checkpoint_failing:
                log.warning("buffer checkpoint failing path=%s mode=%s error=%s",
                            self.path, mode, e)
                self._checkpoint_failing = True
            raise self._wrap(e, "checkpoint") from e
        if self._checkpoint_failing:
            log.warning("buffer checkpoint works again path=%s", self.path)
            self._checkpoint_failing = False
        self._wal_bytes_est = 0
        now_ms = time.time_ns() // 1_000_000
        if pinned:
            if self._wal_pinned_since_ms is None:
                self._wal_pinned_since_ms = now_ms
            wal = _size(self.path + "-wal")
            if wal > self.settings.wal_max_bytes and not self._pin_warned:
                log.warning("buffer WAL pinned by a reader, it grows until the reader ends "
                            "path=%s wal_bytes=%d pinned_s=%.0f", self.path, wal,
                            (now_ms - self._wal_pinned_since_ms) / 1000)
                self._pin_warned = True
        elif self._wal_pinned_since_ms is not None:
            if self._pin_warned:
                log.warning("buffer WAL no longer pinned path=%s wal_bytes=%d", self.path,
                            _size(self.path + "-wal"))
            self._wal_pinned_since_ms = None
            self._pin_warned = False
        self._last_checkpoint = {"at_ms": now_ms, "mode": mode, "busy": bool(busy),
                                 "wal_frames": frames, "checkpointed_frames": done,
                                 "pinned": pinned}
        return dict(self._last_checkpoint)

    @staticmethod
    def _truncate_nowait(conn: sqlite3.Connection) -> tuple[int, int, int]:
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            return conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")

    def _vacuum_step(self) -> None:
        """Give free pages back to the filesystem beyond a slack kept for reuse."""
        conn = self._db()
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        keep = max(self.settings.vacuum_slack_bytes // self._page_size, (pages - free) // 4)
        if free <= keep:
            return
        step = min(free - keep, _VACUUM_STEP_PAGES)
        try:
            # executescript steps the pragma to completion; execute() frees one page only.
            conn.executescript(f"PRAGMA incremental_vacuum({int(step)});")
        except sqlite3.OperationalError as e:
            log.warning("buffer incremental vacuum failed path=%s error=%s", self.path, e)
            return
        self._wal_bytes_est += step * 16

    # ------------------------------------------------------------------ stats / close

    def stats(self) -> dict[str, Any]:
        conn = self._db()
        st = self._st
        oldest_ts = None
        try:
            if st.count > 0:
                oldest_ts = conn.execute("SELECT ts_ms FROM records WHERE seq = ?",
                                         (st.min_seq,)).fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        except sqlite3.ProgrammingError:
            raise           # misuse (wrong thread), not a file problem
        except sqlite3.Error as e:
            raise self._wrap(e, "stats") from e
        quarantine = self.quarantine_stats()
        now_ms = time.time_ns() // 1_000_000
        cap, cap_reason = self._cap()
        return {
            "path": self.path,
            "records": st.count,
            "bytes": st.live_bytes,
            "reclaimable_records": self.reclaimable(),
            "first_seq": st.min_seq if st.count else None,
            "last_seq": st.last_seq,
            "oldest_ts_ms": oldest_ts,
            "oldest_age_s": (now_ms - oldest_ts) / 1000 if oldest_ts is not None else None,
            # Newest record stamped on a trusted clock: the gateway's clock floor.
            "newest_ts_ms": self._newest_trusted_ts if st.count else None,
            "cursors": {
                name: {"acked_seq": c.acked_seq,
                       "records": st.last_seq - max(c.acked_seq, st.min_seq - 1),
                       "bytes": c.pending_bytes}
                for name, c in sorted(st.cursors.items())
            },
            "dropped": dict(st.dropped),
            "quarantine": quarantine,
            "salvaged": st.counters.get("salvaged", 0),
            "corrupt_files_moved": len(corrupt_copies(self.path)),
            "moved_aside_this_run": self.moved_aside,
            "file_size_bytes": _size(self.path),
            "wal_size_bytes": _size(self.path + "-wal"),
            "used_bytes": (pages - free) * self._page_size,
            "free_pages": free,
            "page_size": self._page_size,
            "limit_bytes": cap,
            "limit_reason": cap_reason,
            "blocked": self._blocked,
            "dropping": sorted(self._dropping),
            "last_checkpoint": dict(self._last_checkpoint) if self._last_checkpoint else None,
            "wal_pinned": self._wal_pinned_since_ms is not None,
            "wal_pinned_since_ms": self._wal_pinned_since_ms,
            "synchronous": self.settings.synchronous,
            "unsynced_records": self._unsynced_records,
        }

    def close(self) -> None:
        """Checkpoint, close the file and release the lock. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        try:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            conn.close()
        finally:
            os.close(self._lock_fd)

    # ------------------------------------------------------------------ corruption

    def recover(self) -> str:
        """Corruption met while running (a read, an ack, an append): move the file aside,
        start a fresh buffer in its place and salvage the readable records of the old one.
        Returns where the old file went. The lock is kept throughout."""
        conn = self._conn
        self._conn = None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        # What this process knew of the file: the damage may have taken the pages that say
        # which seqs it held and what each uplink had (then the salvage scans that range).
        old = self._st
        hint = (old.min_seq, old.last_seq, {n: c.acked_seq for n, c in old.cursors.items()},
                old.quarantined)
        moved = _move_aside(self.path)
        self._salvage_hints[os.path.basename(moved)] = hint
        log.error("buffer file corrupt while running, moved aside path=%s moved_to=%s",
                  self.path, moved)
        conn, _ = _open_checked(self.path, self.settings)
        self._attach(conn, moved)
        self._salvage_pending()
        return moved

    def _salvage_pending(self) -> None:
        """Salvage every file moved aside next to this one that was not salvaged yet (or
        whose salvage a crash interrupted: it resumes where its last commit got)."""
        conn = self._db()
        pending = [src for src in corrupt_copies(self.path)
                   if not os.path.exists(src + _SALVAGED_MARK)]
        if not pending:
            return
        # A file moved aside may itself hold records salvaged from older files: what its
        # `salvaged` table says was copied into it comes back with it, so those older
        # files resume after that point instead of being copied twice.
        carried: dict[str, tuple[int, int]] = {}
        holds: dict[str, set[str]] = {}         # copy -> older copies salvaged into it
        for src in pending:
            found = _SalvageSource.open(src)
            if found is not None:
                holds[src] = {os.path.join(os.path.dirname(src), n) for n in found.salvaged}
                for name, (upto, done) in found.salvaged.items():
                    old = carried.get(name, (0, 0))
                    carried[name] = (max(old[0], upto), max(old[1], done))
                found.close()
        # Oldest records first: a copy holding the first part of an older copy goes
        # before the rest of that older copy.
        ordered: list[str] = []
        while len(ordered) < len(pending):
            left = [p for p in pending if p not in ordered]
            free = [p for p in left
                    if not any(p in holds.get(q, ()) for q in left if q != p)]
            ordered.append((free or left)[0])
        pending = ordered
        if carried:
            def carry(conn: sqlite3.Connection, st: _State) -> None:
                conn.executemany(
                    "INSERT INTO salvaged(name, upto_seq, done, records, lost) "
                    "VALUES (?, ?, ?, 0, 0) ON CONFLICT(name) DO UPDATE SET "
                    "upto_seq = max(upto_seq, excluded.upto_seq), "
                    "done = max(done, excluded.done)",
                    [(name, upto, done) for name, (upto, done) in carried.items()])

            self._write("salvage", carry)
        known = {name: (upto, done) for name, upto, done in
                 conn.execute("SELECT name, upto_seq, done FROM salvaged")}
        for src in pending:
            name = os.path.basename(src)
            upto, done = known.get(name, (None, 0))
            if not done:
                self._salvage(src, name, upto)
            # Durable before the mark (synchronous="normal" does not sync each commit):
            # a power cut after the mark must not take the salvaged records with it.
            self.sync()
            _mark_salvaged(src)

    def _salvage(self, src: str, name: str, resume_after: int | None) -> None:
        """Copy the readable records of `src` (a corrupt buffer moved aside) into this
        buffer as new records, each for the cursors that had not acknowledged it yet.
        Unreadable records in its seq range are counted as dropped under `corrupt`."""
        found = _SalvageSource.open(src)
        hint = self._salvage_hints.pop(name, None)
        known_quarantined = None
        if found is not None and hint is not None:
            lo, hi, cursors, known_quarantined = hint
            if not found.cursors:
                found.cursors = dict(cursors)
            if found.hi is None or found.hi < hi:
                found.hi = hi
            if found.lo is None:
                found.lo = max(1, min([lo, *(a + 1 for a in found.cursors.values())]))
        salvaged = lost = 0
        try:
            if found is not None and found.lo is not None and found.hi is not None:
                if self._st.count == 0 and self._st.last_seq < found.hi:
                    # Continue the old seq numbering: a consumer never sees a seq reused.
                    hi = found.hi

                    def bump(conn: sqlite3.Connection, st: _State) -> None:
                        self._reclaim(conn, st, None)
                        st.last_seq = hi
                        st.min_seq = st.reclaim_from = hi + 1
                        conn.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", (hi,))

                    self._write("salvage", bump)
                for cname in found.cursors:
                    self.register_cursor(cname)
                after = max(found.lo - 1, resume_after if resume_after is not None else -1)
                while after < found.hi:
                    records, after_new, n_lost = found.chunk(after)
                    salvaged += len(records)
                    lost += n_lost
                    self._salvage_commit(name, records, after_new, n_lost, done=False)
                    after = after_new
                # What the old file had in quarantine goes back to its uplink, which quarantines
                # or holds it again if it is still refused: never lost without a count.
                q_records, q_lost = found.quarantined()
                if known_quarantined is not None:
                    # Rows the damage made unreadable, even uncountable: what this process
                    # knew it had in quarantine, less what came back, is counted as lost.
                    q_lost = max(q_lost, known_quarantined - len(q_records))
                q_records = [r for r in q_records if json.loads(r.headers[TARGET_KEY])[0] in self._st.cursors]
                if q_records or q_lost:
                    self._salvage_commit(name, q_records, after, q_lost, done=False)
                    salvaged += len(q_records)
                    lost += q_lost
            self._salvage_commit(name, [], found.hi if found and found.hi else 0, 0, done=True)
        finally:
            if found is not None:
                found.close()
        log.error("buffer salvage of a corrupt file done path=%s source=%s salvaged=%d lost=%d",
                  self.path, src, salvaged, lost)

    def _salvage_commit(self, name: str, records: list[NewRecord], upto: int, n_lost: int,
                        done: bool) -> None:
        n = len(records)

        def extra(conn: sqlite3.Connection, st: _State) -> None:
            conn.execute("INSERT INTO salvaged(name, upto_seq, done, records, lost) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET "
                         "upto_seq = excluded.upto_seq, done = excluded.done, "
                         "records = records + excluded.records, lost = lost + excluded.lost",
                         (name, upto, int(done), n, n_lost))
            if n:
                self._count(conn, st.counters, "salvaged", "salvaged", n)
            if n_lost:
                self._count(conn, st.dropped, "dropped.corrupt", "corrupt", n_lost)

        if records:
            self._append(records, extra=extra, internal=True)
        else:
            self._write("salvage", extra)

    def __enter__(self) -> Buffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise BufferClosed(f"{self.path}: buffer is closed")
        return self._conn

    def _write(self, what: str, body: Callable[[sqlite3.Connection, _State], None]) -> _State:
        """Run `body` on a copy of the state in one write transaction; swap the copy in
        after COMMIT. On a full disk, free room once (reserve file, WAL) and try again."""
        conn = self._db()
        for attempt in (1, 2):
            st = self._st.copy()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    body(conn, st)
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
            except sqlite3.Error as e:
                if attempt == 1 and _errcode(e) == sqlite3.SQLITE_FULL:
                    self._make_room(e)
                    continue
                raise self._wrap(e, what) from e
            self._st = st
            self._committed(0)
            return st
        raise AssertionError("unreachable")

    def _wrap(self, e: sqlite3.Error, what: str) -> BufferError:
        code = _errcode(e)
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            log.error("buffer file corrupt while running path=%s op=%s error=%s",
                      self.path, what, e)
            return BufferCorrupt(f"{self.path}: {what}: database file is corrupt ({e}); "
                                 f"reopen the buffer to move it aside")
        if code == sqlite3.SQLITE_FULL:
            return BufferIOError(f"{self.path}: {what}: disk full ({e})")
        return BufferIOError(f"{self.path}: {what} failed: {e}",
                             retriable=code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY,
                                                sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL))



# ---------------------------------------------------------------------- module helpers


def first_live(first_row: int, acked: Sequence[int]) -> int:
    """The first live seq of a file whose first row is `first_row`, given its cursors'
    acked seqs: rows every cursor passed are retired (waiting for `reclaim`). Without
    cursors every row is live (the last cursor to go takes the retired rows with it)."""
    return max(first_row, min(acked) + 1) if acked else first_row


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def corrupt_copies(path: str) -> list[str]:
    """Files moved aside from `path` as corrupt (main files only, oldest first)."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + ".corrupt-"
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names
                  if n.startswith(prefix) and not n.endswith(("-wal", "-shm", _SALVAGED_MARK)))


_SALVAGED_MARK = ".salvaged"


def _mark_salvaged(src: str) -> None:
    """An empty `<copy>.salvaged` next to a copy whose salvage is committed: the mark
    survives this buffer being moved aside in turn (its `salvaged` table goes with it)."""
    with contextlib.suppress(OSError):
        fd = os.open(src + _SALVAGED_MARK, os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
        _fsync_dir(src)


def _acquire_lock(path: str) -> int:
    """An exclusive lock next to the file: two writers would each trust their own
    in-memory cursor positions and counters."""
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BufferIOError(f"{path}: cannot create the lock file {lock_path}: {e}",
                            retriable=False) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = os.pread(fd, 32, 0).decode().strip()
        os.close(fd)
        raise BufferLocked(f"{path}: buffer is in use by another process"
                           f"{f' (pid {holder})' if holder else ''}; stop the gateway first") from e
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _connect(path: str) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN IMMEDIATE / COMMIT ourselves, and a SELECT's
    # read transaction ends as soon as its rows are fetched.
    return sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000,
                           cached_statements=64)


def _prepare(conn: sqlite3.Connection, settings: BufferSettings) -> None:
    """Check, create or migrate the schema, then switch on WAL and the durability level."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if settings.check_on_open == "quick":
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            raise _CorruptFile("quick_check: " + "; ".join(str(r[0]) for r in rows[:5]))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    if version == 0:
        if tables:
            raise _CorruptFile(f"not an Outpost buffer (tables {sorted(tables)[:5]})")
        # auto_vacuum only takes effect before the first table and before WAL.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            schema.create(conn)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    elif version > schema.SCHEMA_VERSION:
        raise BufferSchemaError(
            f"schema version {version} is newer than this Outpost knows "
            f"({schema.SCHEMA_VERSION}); upgrade Outpost or move the file away")
    else:
        if not schema.OUR_TABLES <= tables:
            raise _CorruptFile(f"tables missing: {sorted(schema.OUR_TABLES - tables)}")
        schema.migrate(conn, version)
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise BufferIOError(f"could not switch to WAL mode (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {settings.synchronous.upper()}")
    # We checkpoint ourselves after writes (see Buffer._maintain); after a checkpoint the
    # WAL file is cut back to this size so it cannot keep a high-water mark forever.
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(f"PRAGMA journal_size_limit = {2 * settings.checkpoint_wal_bytes}")
    conn.execute("PRAGMA cache_size = -8192")
    conn.execute("PRAGMA temp_store = MEMORY")


def _move_aside(path: str) -> str:
    """Rename the file and its WAL aside. The WAL goes first and the directory is synced
    before a new file is created: a WAL left behind (a power cut between the renames)
    would otherwise be replayed into the new, empty buffer."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while any(os.path.exists(target + sfx) for sfx in ("", "-wal")):
        n += 1
        target = f"{path}.corrupt-{stamp}-{n}"
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, target + suffix)
    if os.path.exists(path):
        os.replace(path, target)
    _fsync_dir(path)
    return target


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _SalvageSource:
    """A corrupt buffer moved aside, read defensively: every query may fail."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        meta = _try(lambda: dict(conn.execute("SELECT key, value FROM meta")), {})
        self.cursors: dict[str, int] = _try(
            lambda: dict(conn.execute("SELECT name, acked_seq FROM cursors")), {})
        self.streams: dict[int, str] = _try(
            lambda: dict(conn.execute("SELECT id, name FROM streams")), {})
        self.header_sets: dict[int, dict[str, str]] = _try(
            lambda: {hid: dict(tuple(p) for p in json.loads(enc))
                     for hid, enc in conn.execute("SELECT id, encoded FROM header_sets")}, {})
        self.salvaged: dict[str, tuple[int, int]] = _try(
            lambda: {name: (upto, done) for name, upto, done in
                     conn.execute("SELECT name, upto_seq, done FROM salvaged")}, {})
        lo = _try(lambda: conn.execute("SELECT min(seq) FROM records").fetchone()[0], None)
        hi = _try(lambda: conn.execute("SELECT max(seq) FROM records").fetchone()[0], None)
        if hi is None and meta.get("last_seq"):
            hi = meta["last_seq"]
        if lo is None and hi is not None and self.cursors:
            lo = min(self.cursors.values()) + 1
        self.lo: int | None = lo
        self.hi: int | None = hi

    @classmethod
    def open(cls, src: str) -> _SalvageSource | None:
        try:
            conn = sqlite3.connect(f"file:{src}?mode=ro", uri=True, isolation_level=None,
                                   timeout=1.0)
        except sqlite3.Error:
            return None
        return cls(conn)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def chunk(self, after: int) -> tuple[list[NewRecord], int, int]:
        """Records after `after` (up to _SALVAGE_BATCH seqs): (records, last seq covered,
        seqs in that range that could not be read or routed)."""
        assert self.hi is not None
        end = min(after + _SALVAGE_BATCH, self.hi)
        try:
            rows = self.conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload FROM "
                                     "records WHERE seq > ? AND seq <= ? ORDER BY seq",
                                     (after, end)).fetchall()
        except sqlite3.Error:
            rows = []
            for seq in range(after + 1, end + 1):      # around the damage, one by one
                with contextlib.suppress(sqlite3.Error):
                    row = self.conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload "
                                            "FROM records WHERE seq = ?", (seq,)).fetchone()
                    if row is not None:
                        rows.append(row)
        out: list[NewRecord] = []
        names = set(self.cursors)
        not_owed = 0
        for seq, sid, ts_ms, hid, payload in rows:
            stream = self.streams.get(sid)
            headers = self.header_sets.get(hid)
            if not isinstance(stream, str) or headers is None or not isinstance(payload, bytes):
                continue            # cannot be routed correctly: counted lost below
            headers = dict(headers)
            owed = {c for c, acked in self.cursors.items() if acked < seq}
            old_target = headers.pop(TARGET_KEY, None)
            if old_target is not None and names:
                owed &= set(_try(lambda t=old_target: json.loads(t), []))
            if names and not owed:
                not_owed += 1       # every uplink it was meant for had it (not lost)
                continue
            if names and owed != names:
                headers[TARGET_KEY] = json.dumps(sorted(owed))
            out.append(NewRecord(stream, payload, ts_ms, headers))
        lost = (end - after) - len(out) - not_owed
        return out, end, max(0, lost)

    def quarantined(self) -> tuple[list[NewRecord], int]:
        """The source's quarantined records, as records for their own uplink again (as a
        quarantine retry makes them), and how many rows could not be read."""
        try:
            total = self.conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
            rows = self.conn.execute("SELECT cursor, seq, stream_id, ts_ms, headers_id, payload "
                                     "FROM quarantine ORDER BY cursor, seq").fetchall()
        except sqlite3.Error:
            return [], 0  # no quarantine table (an older file) or none readable: nothing known
        out: list[NewRecord] = []
        for cursor, _seq, sid, ts_ms, hid, payload in rows:
            stream = self.streams.get(sid)
            headers = self.header_sets.get(hid)
            if not isinstance(stream, str) or headers is None or not isinstance(payload, bytes):
                continue
            h = {k: v for k, v in headers.items() if k != TARGET_KEY}
            h[TARGET_KEY] = json.dumps([cursor])
            out.append(NewRecord(stream, payload, ts_ms, h))
        return out, max(0, int(total) - len(out))


def _try(fn: Callable[[], Any], default: Any) -> Any:
    try:
        return fn()
    except (sqlite3.Error, ValueError, TypeError):
        return default


def dropped_by_cursor_change(stats: Mapping[str, Any], keep: Sequence[str] | set[str]) -> int:
    """How many records unregistering every cursor not in `keep` would drop (as
    `uplink_removed`), given `stats` from Buffer.stats() or diagnostics.stats_for_path().

    Pure: for `outpost check` / a reload to say what a new uplink set costs before it is
    applied. Cursors in `keep` that do not exist yet start at the oldest record (they are
    registered before the others go), and with no cursor left records are kept.
    """
    cursors = {name: c["acked_seq"] for name, c in (stats.get("cursors") or {}).items()}
    keep = set(keep)
    removed = set(cursors) - keep
    if not removed or not keep:
        return 0
    last_seq = stats.get("last_seq") or 0
    first = stats.get("first_seq") or last_seq + 1
    if keep - set(cursors):
        return 0            # a new cursor starts before every record present
    floor_before = min(cursors.values())
    floor_after = min(cursors[name] for name in keep)
    return max(0, min(floor_after, last_seq) - max(floor_before, first - 1))


def _read_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _quarantine_summary(rows: Sequence[tuple[str, str, int, int]],
                        counters: Mapping[str, int]) -> dict[str, Any]:
    """stats()["quarantine"]: what is quarantined now (records, bytes, per reason and per
    cursor) and how many were ever quarantined per reason."""
    by_reason: dict[str, int] = {}
    by_cursor: dict[str, int] = {}
    by_cursor_reason: dict[str, dict[str, int]] = {}
    records = size = 0
    for cursor, reason, n, b in rows:
        by_reason[reason] = by_reason.get(reason, 0) + n
        by_cursor[cursor] = by_cursor.get(cursor, 0) + n
        by_cursor_reason.setdefault(cursor, {})[reason] = n
        records += n
        size += b
    total = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("quarantined.")}
    return {"records": records, "bytes": size, "by_reason": by_reason, "by_cursor": by_cursor,
            "by_cursor_reason": by_cursor_reason, "total_by_reason": total,
            "delivered": counters.get("quarantine_delivered", 0)}


def _open_checked(path: str, settings: BufferSettings, *,
                  repair: bool = True) -> tuple[sqlite3.Connection, str | None]:
    """Open `path`; if it is corrupt or not a buffer, move it aside and start fresh
    (`repair=False`: raise BufferCorrupt and leave it)."""
    conn = None
    try:
        conn = _connect(path)
        _prepare(conn, settings)
        return conn, None
    except (sqlite3.DatabaseError, _CorruptFile) as e:
        if conn is not None:
            conn.close()
        if _is_corruption(e) and not repair:
            raise BufferCorrupt(f"{path}: not a usable Outpost buffer ({e}); left as it is") from e
        if not _is_corruption(e):
            code = _errcode(e)
            raise BufferIOError(f"{path}: cannot open buffer: {e}",
                                retriable=code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                                                   sqlite3.SQLITE_IOERR)) from e
        moved = _move_aside(path)
        log.error("buffer file corrupt, moved aside and starting empty path=%s moved_to=%s "
                  "error=%s", path, moved, e)
    except BaseException:
        if conn is not None:
            conn.close()
        raise
    conn = _connect(path)
    try:
        _prepare(conn, settings)
    except BaseException:
        conn.close()
        raise
    return conn, moved


__all__ = ["Buffer", "BufferSettings", "NewRecord", "QuarantinedRecord", "Record",
           "corrupt_copies", "dropped_by_cursor_change"]
