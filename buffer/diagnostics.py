"""What `outpost buffer stats|export|purge|quarantine ...` runs against a buffer file.

Every command first checks that the file is an Outpost buffer (SQLite header, schema
version, tables), read-only, and refuses anything else without touching it: a command
pointed at the wrong file must never rename, create or change it.

`stats_for_path`, `iter_records`, `export_jsonl`, `quarantine_list` and `quarantine_export`
open the file read-only and take no lock, so they work while the gateway runs (WAL lets a
reader see the last committed state; the reads are short, so they do not pin the WAL for
long). The queries are written here with the standard library's sqlite3 rather than
sqlite-utils: its `rows_where` walks a table with one open statement, which is one read
transaction for the whole export and would pin a live gateway's WAL, and the dependency
would add 9 wheels to a Pi's install for a handful of short queries (README, "Installing"). `purge`,
`quarantine_retry` and `quarantine_drop` write, so they take the buffer's lock and fail
with BufferLocked while a gateway holds the file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from buffer.core import (
    DROP_REASONS,
    TARGET_KEY,
    Buffer,
    BufferSettings,
    _quarantine_summary,
    corrupt_copies,
    dropped_by_cursor_change,
    first_live,
)
from buffer.errors import BufferCorrupt, BufferError, BufferSchemaError, UnknownCursor
from buffer.schema import OUR_TABLES, SCHEMA_VERSION

_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_buffer_file(path: str | os.PathLike[str]) -> int:
    """Refuse (BufferError) a path that is not an Outpost buffer; return its schema version.

    Read-only: nothing is created, renamed or written, whatever the file holds.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BufferError(f"{path}: no buffer file there")
    if not os.path.isfile(path):
        raise BufferError(f"{path}: not an Outpost buffer (not a regular file)")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
    except OSError as e:
        raise BufferError(f"{path}: cannot read: {e}") from e
    if head != _SQLITE_MAGIC:
        raise BufferError(f"{path}: not an Outpost buffer (not an SQLite database file); "
                          "nothing was changed")
    with _connect_ro(path) as conn:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in
                      conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            raise BufferCorrupt(f"{path}: cannot read the buffer's schema ({e}); nothing was "
                                "changed (the gateway moves a corrupt buffer aside itself)") from e
    if version > SCHEMA_VERSION:
        raise BufferSchemaError(f"{path}: schema version {version} is newer than this Outpost "
                                f"knows ({SCHEMA_VERSION}); use a newer `outpost`")
    if version < 1 or not OUR_TABLES <= tables:
        raise BufferError(f"{path}: not an Outpost buffer (schema version {version}, tables "
                          f"{sorted(tables)[:8]}); nothing was changed")
    return version


@contextlib.contextmanager
def _connect_ro(path: str) -> Iterator[sqlite3.Connection]:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               timeout=5.0)
    except sqlite3.Error as e:
        raise BufferError(f"{path}: cannot open buffer read-only: {e}") from e
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def _readonly(path: str) -> Iterator[sqlite3.Connection]:
    check_buffer_file(path)
    with _connect_ro(path) as conn:
        try:
            yield conn
        except sqlite3.DatabaseError as e:
            raise BufferCorrupt(f"{path}: cannot read buffer: {e}") from e


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def stats_for_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Figures about a buffer file without opening it for writing."""
    path = os.fspath(path)
    with _readonly(path) as conn:
        # One read transaction so the figures agree with each other.
        conn.execute("BEGIN")
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            row_lo = conn.execute("SELECT min(seq) FROM records").fetchone()[0]
            hi = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
            last_seq = max(meta.get("last_seq", 0), hi or 0)
            acked = conn.execute("SELECT name, acked_seq, pending_bytes FROM cursors "
                                 "ORDER BY name").fetchall()
            # Rows every cursor passed are retired, waiting for the gateway to reclaim them.
            row_first = row_lo if row_lo is not None else last_seq + 1
            first = first_live(row_first, [a for _, a, _ in acked])
            lo = first if first <= (hi or 0) else None
            oldest = (conn.execute("SELECT ts_ms FROM records WHERE seq = ?", (lo,)).fetchone()[0]
                      if lo is not None else None)
            newest = _newest_trusted_ts(conn) if lo is not None else None
            cursors = {
                name: {"acked_seq": a, "records": last_seq - max(a, first - 1), "bytes": pending}
                for name, a, pending in acked
            }
            qrows = (conn.execute("SELECT cursor, reason, count(*), "
                                  "coalesce(sum(length(payload)), 0) FROM quarantine "
                                  "GROUP BY cursor, reason").fetchall()
                     if _has_table(conn, "quarantine") else [])
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
        finally:
            conn.execute("COMMIT")
    now_ms = time.time_ns() // 1_000_000
    return {
        "path": path,
        "schema_version": version,
        "records": (hi - lo + 1) if lo is not None and hi is not None else 0,
        "bytes": meta.get("live_bytes", 0),
        "reclaimable_records": first - row_first,
        "first_seq": lo,
        "last_seq": last_seq,
        "oldest_ts_ms": oldest,
        "oldest_age_s": (now_ms - oldest) / 1000 if oldest is not None else None,
        "newest_ts_ms": newest,
        "cursors": cursors,
        "dropped": {r: meta.get(f"dropped.{r}", 0) for r in DROP_REASONS},
        "quarantine": _quarantine_summary(qrows, meta),
        "salvaged": meta.get("salvaged", 0),
        "corrupt_files_moved": len(corrupt_copies(path)),
        "file_size_bytes": os.path.getsize(path),
        "wal_size_bytes": (os.path.getsize(path + "-wal")
                           if os.path.exists(path + "-wal") else 0),
        "used_bytes": (pages - free) * page_size,
        "free_pages": free,
        "page_size": page_size,
    }


def _newest_trusted_ts(conn: sqlite3.Connection) -> int | None:
    unsynced = {hid for hid, enc in conn.execute("SELECT id, encoded FROM header_sets")
                if ["clock", "unsynced"] in json.loads(enc)}
    for ts_ms, hid in conn.execute(
            "SELECT ts_ms, headers_id FROM records ORDER BY seq DESC LIMIT 10000"):
        if hid not in unsynced:
            return ts_ms
    return None


def _dictionaries(conn: sqlite3.Connection) -> tuple[dict[int, str], dict[int, dict[str, str]]]:
    streams = dict(conn.execute("SELECT id, name FROM streams"))
    header_sets = {hid: dict(tuple(p) for p in json.loads(enc))
                   for hid, enc in conn.execute("SELECT id, encoded FROM header_sets")}
    return streams, header_sets


def _visible(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != TARGET_KEY}


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One record as `iter_records` reads it: headers without the internal target key."""

    seq: int
    stream: str
    ts_ms: int
    headers: dict[str, str]
    payload: bytes


def export_span(path: str | os.PathLike[str], cursor: str | None = None) -> tuple[int, int]:
    """(after, last): an export reads records with seq in (after, last] as the file is now
    (more may arrive while it runs). Cheap: two rowid lookups, whatever the buffer's size."""
    path = os.fspath(path)
    with _readonly(path) as conn:
        lo, hi = conn.execute("SELECT min(seq), max(seq) FROM records").fetchone()
        after = _cursor_after(conn, path, cursor) if cursor is not None else _retired_upto(conn)
    if lo is None:
        return after, after
    return max(after, lo - 1), max(hi, after)


def _retired_upto(conn: sqlite3.Connection) -> int:
    """The last seq every cursor passed (0 without cursors): rows up to it are retired."""
    return conn.execute("SELECT coalesce(min(acked_seq), 0) FROM cursors").fetchone()[0]


def _cursor_after(conn: sqlite3.Connection, path: str, cursor: str) -> int:
    row = conn.execute("SELECT acked_seq FROM cursors WHERE name = ?", (cursor,)).fetchone()
    if row is None:
        names = [r[0] for r in conn.execute("SELECT name FROM cursors")]
        raise UnknownCursor(f"{path}: unknown cursor {cursor!r} (registered: {names})")
    return row[0]


def iter_records(path: str | os.PathLike[str], since_ts_ms: int | None = None,
                 cursor: str | None = None, *, batch: int = 1000) -> Iterator[StoredRecord]:
    """The buffer's records in seq order, read-only, `batch` at a time.

    `since_ts_ms` keeps records with ts_ms >= it; `cursor` keeps records that cursor has
    not passed yet (and that are meant for it). Each batch is one short read (its own
    transaction), so however slowly the caller consumes them, the gateway's WAL is never
    pinned for longer than one batch takes to read, and memory stays bounded by `batch`.
    """
    path = os.fspath(path)
    with _readonly(path) as conn:
        streams, header_sets = _dictionaries(conn)
        after = _cursor_after(conn, path, cursor) if cursor is not None else _retired_upto(conn)
        while True:
            rows = conn.execute("SELECT seq, stream_id, ts_ms, headers_id, payload FROM records "
                                "WHERE seq > ? ORDER BY seq LIMIT ?", (after, batch)).fetchall()
            if not rows:
                break
            for seq, sid, ts_ms, hid, payload in rows:
                after = seq
                if since_ts_ms is not None and ts_ms < since_ts_ms:
                    continue
                if sid not in streams or hid not in header_sets:
                    # Written after our dictionary snapshot: refresh it once.
                    streams, header_sets = _dictionaries(conn)
                headers = header_sets.get(hid, {})
                target = headers.get(TARGET_KEY)
                if cursor is not None and target is not None and cursor not in json.loads(target):
                    continue        # meant for other cursors only
                yield StoredRecord(seq, streams.get(sid, f"#{sid}"), ts_ms, _visible(headers),
                                   bytes(payload))


def export_jsonl(path: str | os.PathLike[str], out: TextIO, since_ts_ms: int | None = None,
                 cursor: str | None = None, *, batch: int = 1000) -> int:
    """Write records as JSON lines to `out`; return how many.

    Each line: {"seq", "stream", "ts_ms", "headers", "payload_b64"} (the payload as stored,
    base64). Selection as in `iter_records`.
    """
    count = 0
    for r in iter_records(path, since_ts_ms, cursor, batch=batch):
        out.write(json.dumps({
            "seq": r.seq,
            "stream": r.stream,
            "ts_ms": r.ts_ms,
            "headers": r.headers,
            "payload_b64": base64.b64encode(r.payload).decode("ascii"),
        }, separators=(",", ":")) + "\n")
        count += 1
    return count


def _writable(path: str) -> Buffer:
    """Open for writing an existing, valid buffer (never repaired or created here)."""
    check_buffer_file(path)
    # Retention limits do not matter here: these commands never append new data (a
    # quarantine retry re-appends what is stored, which cannot exceed these limits).
    settings = BufferSettings(max_size_bytes=2**62, max_age_s=float("inf"),
                              when_full="drop_oldest", reserve_bytes=0)
    return Buffer.open(path, settings, repair=False)


def purge(path: str | os.PathLike[str], cursor: str | None = None) -> int:
    """Drop every record (or every record `cursor` has not passed); return how many.

    Counted as dropped with reason "purged". Fails with BufferLocked while a gateway runs,
    and refuses (BufferError) a file that is not an Outpost buffer, leaving it untouched.
    """
    path = os.fspath(path)
    with _writable(path) as buf:
        return buf.purge(cursor)


# ---------------------------------------------------------------------- quarantine


def quarantine_list(path: str | os.PathLike[str], cursor: str | None = None,
                    reason: str | None = None) -> list[dict[str, Any]]:
    """Quarantined records without payloads: cursor, seq, reason, at_ms, stream, ts_ms,
    headers, payload_bytes; ordered by cursor, seq. Read-only."""
    return list(_quarantine_rows(os.fspath(path), cursor, reason, with_payload=False))


def quarantine_export(path: str | os.PathLike[str], out: TextIO, cursor: str | None = None,
                      reason: str | None = None) -> int:
    """Quarantined records as JSON lines (as quarantine_list, plus payload_b64)."""
    n = 0
    for row in _quarantine_rows(os.fspath(path), cursor, reason, with_payload=True):
        out.write(json.dumps(row, separators=(",", ":")) + "\n")
        n += 1
    return n


def _quarantine_rows(path: str, cursor: str | None, reason: str | None,
                     with_payload: bool) -> Iterator[dict[str, Any]]:
    where, args = Buffer._q_where(cursor, reason, None)
    with _readonly(path) as conn:
        if not _has_table(conn, "quarantine"):
            return
        streams, header_sets = _dictionaries(conn)
        last = ("", -1)
        while True:
            rows = conn.execute(
                "SELECT cursor, seq, reason, at_ms, stream_id, ts_ms, headers_id, payload "
                f"FROM quarantine WHERE {where} AND (cursor, seq) > (?, ?) "
                "ORDER BY cursor, seq LIMIT 500", (*args, *last)).fetchall()
            if not rows:
                return
            for c, seq, why, at_ms, sid, ts_ms, hid, payload in rows:
                last = (c, seq)
                row: dict[str, Any] = {
                    "cursor": c, "seq": seq, "reason": why, "at_ms": at_ms,
                    "stream": streams.get(sid, f"#{sid}"), "ts_ms": ts_ms,
                    "headers": _visible(header_sets.get(hid, {})),
                    "payload_bytes": len(payload)}
                if with_payload:
                    row["payload_b64"] = base64.b64encode(payload).decode("ascii")
                yield row


def quarantine_retry(path: str | os.PathLike[str], cursor: str | None = None,
                     reason: str | None = None, seqs: Sequence[int] | None = None) -> int:
    """Move quarantined records back for delivery (see Buffer.quarantine_retry); needs the
    gateway stopped (BufferLocked otherwise). Returns how many."""
    with _writable(os.fspath(path)) as buf:
        return buf.quarantine_retry(cursor, reason, seqs=seqs)


def quarantine_drop(path: str | os.PathLike[str], cursor: str | None = None,
                    reason: str | None = None, seqs: Sequence[int] | None = None) -> int:
    """Delete quarantined records, counted as dropped (`quarantine_dropped`); needs the
    gateway stopped. Returns how many."""
    with _writable(os.fspath(path)) as buf:
        return buf.quarantine_drop(cursor, reason, seqs=seqs)


def uplink_removal_cost(path: str | os.PathLike[str], keep: Sequence[str]) -> int:
    """How many records a configuration with only the uplinks (cursors) `keep` would drop
    from this buffer file (see core.dropped_by_cursor_change). Read-only."""
    return dropped_by_cursor_change(stats_for_path(path), set(keep))
