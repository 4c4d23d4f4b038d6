"""The SQLite store-and-forward buffer: durable records, named cursors and retention.

`Buffer` is synchronous and confined to the thread that opened it (the gateway uses it
through `AsyncBuffer`, which owns one dedicated thread). A batch is stored in one
transaction and nothing is reported as stored before its commit. Each uplink reads after
its own cursor and acknowledges what its remote side acknowledged; a record is deleted once
every cursor has passed it. Retention (size cap, maximum age, full disk) either drops the
oldest records, counted per reason and logged once per state change, or refuses the batch
with `BufferFull`, per the configured policy.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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
DROP_REASONS = ("age", "size", "disk_full", "purged")

# Bytes a record costs on disk beyond its payload, used only to look ahead before an
# append whether the batch will fit under the size cap (measured ~30-35 B, see README).
_RECORD_OVERHEAD_ESTIMATE = 40
_AGE_CHECK_INTERVAL_S = 1.0
_VACUUM_INTERVAL_S = 5.0
_DISK_CHECK_INTERVAL_S = 10.0
_VACUUM_STEP_PAGES = 2048
_DISK_FULL_RETRIES = 6


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
        for name in ("checkpoint_wal_bytes", "wal_max_bytes", "vacuum_slack_bytes"):
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


@dataclass(slots=True)
class _Cursor:
    acked_seq: int
    pending_bytes: int


@dataclass(slots=True)
class _State:
    """What the buffer knows about its file; changed on a copy inside a transaction and
    swapped in only after COMMIT, so a rolled-back transaction leaves it untouched."""

    last_seq: int
    min_seq: int            # first seq present; last_seq + 1 when empty
    live_bytes: int         # payload bytes present
    cursors: dict[str, _Cursor]
    dropped: dict[str, int]

    def copy(self) -> _State:
        return _State(
            self.last_seq,
            self.min_seq,
            self.live_bytes,
            {k: _Cursor(c.acked_seq, c.pending_bytes) for k, c in self.cursors.items()},
            dict(self.dropped),
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
        self._conn: sqlite3.Connection | None = conn
        self._lock_fd = lock_fd
        self.moved_aside = moved_aside
        self._page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        self._streams: dict[str, int] = {}
        self._stream_names: dict[int, str] = {}
        self._header_ids: dict[tuple[tuple[str, str], ...], int] = {}
        self._header_sets: dict[int, Mapping[str, str]] = {}
        self._st = self._load_state()
        self._wal_bytes_est = 0
        self._last_checkpoint: dict[str, Any] | None = None
        self._checkpoint_failing = False
        self._next_age_check = 0.0
        self._next_vacuum = time.monotonic() + _VACUUM_INTERVAL_S
        self._next_disk_check = 0.0
        self._disk_cap: int | None = None
        # Reasons currently dropping / blocking, so each start and end is logged once.
        self._dropping: dict[str, int] = {}
        self._drops_now: set[str] = set()
        self._reserve_path = path + ".reserve"
        self._ensure_reserve()
        self._blocked: str | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike[str], settings: BufferSettings) -> Buffer:
        """Open or create the buffer at `path`; a corrupt file is moved aside first."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise BufferIOError(f"{path}: cannot create the buffer directory: {e}",
                                retriable=False) from e
        lock_fd = _acquire_lock(path)
        try:
            conn, moved = _open_checked(path, settings)
            try:
                return cls(path, settings, conn, lock_fd, moved)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            os.close(lock_fd)
            raise

    def _load_state(self) -> _State:
        conn = self._db()
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        lo = conn.execute("SELECT min(seq) FROM records").fetchone()[0]
        hi = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
        last_seq = max(meta.get("last_seq", 0), hi or 0)
        cursors = {name: _Cursor(acked, pending) for name, acked, pending in
                   conn.execute("SELECT name, acked_seq, pending_bytes FROM cursors")}
        dropped = {r: meta.get(f"dropped.{r}", 0) for r in DROP_REASONS}
        for sid, name in conn.execute("SELECT id, name FROM streams"):
            self._streams[name] = sid
            self._stream_names[sid] = name
        for hid, encoded in conn.execute("SELECT id, encoded FROM header_sets"):
            pairs = tuple(tuple(p) for p in json.loads(encoded))
            self._header_ids[pairs] = hid
            self._header_sets[hid] = MappingProxyType(dict(pairs))
        return _State(last_seq, lo if lo is not None else last_seq + 1,
                      meta.get("live_bytes", 0), cursors, dropped)

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

    def unregister_cursor(self, name: str) -> None:
        """Remove cursor `name`; records only it was holding are deleted."""
        self._cursor(name)

        def body(conn: sqlite3.Connection, st: _State) -> None:
            del st.cursors[name]
            conn.execute("DELETE FROM cursors WHERE name = ?", (name,))
            floor = st.floor()
            if floor is not None and floor >= st.min_seq:
                self._delete_prefix(conn, st, floor, reason=None)

        self._write("unregister_cursor", body)
        log.info("buffer cursor unregistered cursor=%s path=%s", name, self.path)

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
                seqs = self._append_once(records, batch_bytes)
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
        self._maintain()
        return seqs

    def _append_once(self, records: Sequence[NewRecord], batch_bytes: int) -> list[int]:
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
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._st = st
        for name, sid in new_streams.items():
            self._streams[name] = sid
            self._stream_names[sid] = name
        for key, hid in new_headers.items():
            self._header_ids[key] = hid
            self._header_sets[hid] = MappingProxyType(dict(key))
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
        if now >= self._next_age_check and st.count > 0:
            cutoff = time.time_ns() // 1_000_000 - int(s.max_age_s * 1000)
            oldest_ts = conn.execute("SELECT ts_ms FROM records WHERE seq = ?",
                                     (st.min_seq,)).fetchone()[0]
            if oldest_ts < cutoff and s.when_full == "block":
                # Checked again on every append until an ack removes the old record.
                self._refuse("age", f"oldest record (seq {st.min_seq}) is older than "
                                    f"max_age {s.max_age_s:g}s")
            self._next_age_check = now + min(_AGE_CHECK_INTERVAL_S, s.max_age_s / 10)
            if oldest_ts < cutoff:
                # Records leave from the oldest end only, so expiry stops at the first
                # record young enough; a late out-of-order timestamp waits for its turn.
                row = conn.execute("SELECT seq FROM records WHERE seq >= ? AND ts_ms >= ? "
                                   "ORDER BY seq LIMIT 1", (st.min_seq, cutoff)).fetchone()
                upto = (row[0] - 1) if row else st.last_seq
                self._delete_prefix(conn, st, upto, reason="age")
        cap, reason = self._cap()
        need_est = batch_bytes + n * _RECORD_OVERHEAD_ESTIMATE
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

    def _drop_until(self, conn: sqlite3.Connection, st: _State, cap: int, need: int,
                    reason: str) -> int:
        """Drop the oldest records until `need` more bytes fit under `cap`; return the
        bytes used afterwards."""
        used = self._used_bytes(conn)
        for _ in range(64):
            if used + need <= cap or st.count == 0:
                break
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

        reason None: every cursor passed them (acks). Otherwise they are dropped by a
        retention rule and counted under `reason`.
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
        conn.execute("DELETE FROM records WHERE seq >= ? AND seq <= ?", (lo, upto))
        n = upto - lo + 1
        st.min_seq = upto + 1
        st.live_bytes -= total
        conn.execute("UPDATE meta SET value = ? WHERE key = 'live_bytes'", (st.live_bytes,))
        if reason is not None:
            st.dropped[reason] = st.dropped.get(reason, 0) + n
            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO "
                         "UPDATE SET value = excluded.value",
                         (f"dropped.{reason}", st.dropped[reason]))
            if reason != "purged":
                if reason not in self._dropping:
                    log.warning("buffer dropping oldest records policy=drop_oldest reason=%s "
                                "path=%s first_seq=%d", reason, self.path, lo)
                    self._dropping[reason] = 0
                self._dropping[reason] += n
                self._drops_now.add(reason)
        self._wal_bytes_est += 4 * self._page_size
        return n

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
        conn = self._db()
        c = self._cursor(cursor)
        start = c.acked_seq if after_seq is None else max(after_seq, c.acked_seq)
        if limit <= 0:
            return []
        try:
            if stream is None:
                cur = conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload "
                                   "FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                   (start, limit))
            else:
                sid = self._streams.get(stream)
                if sid is None:
                    return []
                cur = conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload "
                                   "FROM records WHERE seq > ? AND stream_id = ? "
                                   "ORDER BY seq LIMIT ?", (start, sid, limit))
            rows = cur.fetchall()
        except sqlite3.Error as e:
            raise self._wrap(e, "read") from e
        names = self._stream_names
        hsets = self._header_sets
        out = []
        total = 0
        for seq, sid, ts_ms, hid, payload in rows:
            if max_bytes is not None and out and total + len(payload) > max_bytes:
                break
            total += len(payload)
            out.append(Record(seq, names[sid], ts_ms, hsets[hid], payload))
        return out

    def has_records(self, cursor: str, after_seq: int | None = None) -> bool:
        """True when records exist after the cursor (and after `after_seq`)."""
        c = self._cursor(cursor)
        start = c.acked_seq if after_seq is None else max(after_seq, c.acked_seq)
        return self._st.last_seq > start and self._st.count > 0

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
                # The deleted range lies inside the acked range (only the slowest cursor
                # moves the floor), so its bytes were summed above.
                conn.execute("DELETE FROM records WHERE seq >= ? AND seq <= ?",
                             (st.min_seq, floor))
                st.min_seq = floor + 1
                st.live_bytes -= gone_bytes
                conn.execute("UPDATE meta SET value = ? WHERE key = 'live_bytes'",
                             (st.live_bytes,))

        self._write("ack", body)
        self._wal_bytes_est += 4 * self._page_size
        self._maintain()

    def purge(self, cursor: str | None = None) -> int:
        """Drop everything (or everything cursor `cursor` has not passed); return the count.

        Purged records are counted as dropped with reason "purged".
        """
        count = self._st.count
        if cursor is None:

            def body(conn: sqlite3.Connection, st: _State) -> None:
                self._delete_prefix(conn, st, st.last_seq, reason="purged")
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

        self._write("purge", body)
        log.warning("buffer purged path=%s cursor=%s records=%d", self.path, cursor or "*", count)
        return count

    # ------------------------------------------------------------------ maintenance

    def _maintain(self) -> None:
        """Bounded WAL and reclaimed space, run after writes on the same thread."""
        s = self.settings
        if self._wal_bytes_est >= s.checkpoint_wal_bytes:
            # The write before us is committed and must be reported as such: a failing
            # checkpoint (disk full) is logged and retried after the next write.
            with contextlib.suppress(BufferError):
                self.checkpoint()
        now = time.monotonic()
        if now >= self._next_vacuum:
            self._next_vacuum = now + _VACUUM_INTERVAL_S
            self._vacuum_step()

    def checkpoint(self, mode: str = "PASSIVE") -> dict[str, Any]:
        """Copy the WAL into the database file; TRUNCATE when the WAL grew too large."""
        conn = self._db()
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise BufferError(f"{self.path}: unknown checkpoint mode {mode!r}")
        try:
            busy, frames, done = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            if (mode == "PASSIVE" and done < frames
                    and frames * self._page_size > self.settings.wal_max_bytes):
                # A reader (an `outpost buffer` command) pins the WAL: wait for it.
                mode = "TRUNCATE"
                busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
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
        self._last_checkpoint = {"at_ms": time.time_ns() // 1_000_000, "mode": mode,
                                 "busy": bool(busy), "wal_frames": frames,
                                 "checkpointed_frames": done}
        return dict(self._last_checkpoint)

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
        if st.count > 0:
            oldest_ts = conn.execute("SELECT ts_ms FROM records WHERE seq = ?",
                                     (st.min_seq,)).fetchone()[0]
        now_ms = time.time_ns() // 1_000_000
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        cap, cap_reason = self._cap()
        return {
            "path": self.path,
            "records": st.count,
            "bytes": st.live_bytes,
            "first_seq": st.min_seq if st.count else None,
            "last_seq": st.last_seq,
            "oldest_ts_ms": oldest_ts,
            "oldest_age_s": (now_ms - oldest_ts) / 1000 if oldest_ts is not None else None,
            "cursors": {
                name: {"acked_seq": c.acked_seq,
                       "records": st.last_seq - max(c.acked_seq, st.min_seq - 1),
                       "bytes": c.pending_bytes}
                for name, c in sorted(st.cursors.items())
            },
            "dropped": dict(st.dropped),
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
                  if n.startswith(prefix) and not n.endswith(("-wal", "-shm")))


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
    return sqlite3.connect(path, isolation_level=None, timeout=5.0, cached_statements=64)


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
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{path}.corrupt-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.corrupt-{stamp}-{n}"
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, target + suffix)
    return target


def _open_checked(path: str, settings: BufferSettings) -> tuple[sqlite3.Connection, str | None]:
    """Open `path`; if it is corrupt or not a buffer, move it aside and start fresh."""
    conn = None
    try:
        conn = _connect(path)
        _prepare(conn, settings)
        return conn, None
    except (sqlite3.DatabaseError, _CorruptFile) as e:
        if conn is not None:
            conn.close()
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


__all__ = ["Buffer", "BufferSettings", "NewRecord", "Record", "corrupt_copies"]
