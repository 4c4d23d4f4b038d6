"""What `outpost buffer stats|export|purge` runs against a buffer file.

`stats_for_path` and `export_jsonl` open the file read-only and take no lock, so they work
while the gateway runs (WAL lets a reader see the last committed state; the reads are
short, so they do not pin the WAL for long). `purge` writes, so it takes the buffer's lock
and fails with BufferLocked while a gateway holds the file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from typing import Any, TextIO

from buffer.core import DROP_REASONS, Buffer, BufferSettings, corrupt_copies
from buffer.errors import BufferCorrupt, BufferError, UnknownCursor
from buffer.schema import OUR_TABLES


@contextlib.contextmanager
def _readonly(path: str) -> Iterator[sqlite3.Connection]:
    if not os.path.exists(path):
        raise BufferError(f"{path}: no buffer file there")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               timeout=5.0)
    except sqlite3.Error as e:
        raise BufferError(f"{path}: cannot open buffer read-only: {e}") from e
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='table'")}
        if not OUR_TABLES <= tables:
            raise BufferError(f"{path}: not an Outpost buffer (tables {sorted(tables)})")
        yield conn
    except sqlite3.DatabaseError as e:
        raise BufferCorrupt(f"{path}: cannot read buffer: {e}") from e
    finally:
        conn.close()


def stats_for_path(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Figures about a buffer file without opening it for writing."""
    path = os.fspath(path)
    with _readonly(path) as conn:
        # One read transaction so the figures agree with each other.
        conn.execute("BEGIN")
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            lo = conn.execute("SELECT min(seq) FROM records").fetchone()[0]
            hi = conn.execute("SELECT max(seq) FROM records").fetchone()[0]
            oldest = (conn.execute("SELECT ts_ms FROM records WHERE seq = ?", (lo,)).fetchone()[0]
                      if lo is not None else None)
            last_seq = max(meta.get("last_seq", 0), hi or 0)
            first = lo if lo is not None else last_seq + 1
            cursors = {
                name: {"acked_seq": acked, "records": last_seq - max(acked, first - 1),
                       "bytes": pending}
                for name, acked, pending in conn.execute(
                    "SELECT name, acked_seq, pending_bytes FROM cursors ORDER BY name")
            }
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
        "records": (hi - lo + 1) if lo is not None else 0,
        "bytes": meta.get("live_bytes", 0),
        "first_seq": lo,
        "last_seq": last_seq,
        "oldest_ts_ms": oldest,
        "oldest_age_s": (now_ms - oldest) / 1000 if oldest is not None else None,
        "cursors": cursors,
        "dropped": {r: meta.get(f"dropped.{r}", 0) for r in DROP_REASONS},
        "corrupt_files_moved": len(corrupt_copies(path)),
        "file_size_bytes": os.path.getsize(path),
        "wal_size_bytes": (os.path.getsize(path + "-wal")
                           if os.path.exists(path + "-wal") else 0),
        "used_bytes": (pages - free) * page_size,
        "free_pages": free,
        "page_size": page_size,
    }


def export_jsonl(path: str | os.PathLike[str], out: TextIO, since_ts_ms: int | None = None,
                 cursor: str | None = None, *, batch: int = 1000) -> int:
    """Write records as JSON lines to `out`; return how many.

    Each line: {"seq", "stream", "ts_ms", "headers", "payload_b64"}. `since_ts_ms` keeps
    records with ts_ms >= it; `cursor` keeps records that cursor has not passed yet.
    Reads in short transactions of `batch` records so the gateway's WAL is not pinned.
    """
    path = os.fspath(path)
    count = 0
    with _readonly(path) as conn:
        streams = dict(conn.execute("SELECT id, name FROM streams"))
        header_sets = {hid: dict(tuple(p) for p in json.loads(enc))
                       for hid, enc in conn.execute("SELECT id, encoded FROM header_sets")}
        after = 0
        if cursor is not None:
            row = conn.execute("SELECT acked_seq FROM cursors WHERE name = ?",
                               (cursor,)).fetchone()
            if row is None:
                names = [r[0] for r in conn.execute("SELECT name FROM cursors")]
                raise UnknownCursor(f"{path}: unknown cursor {cursor!r} (registered: {names})")
            after = row[0]
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
                    streams = dict(conn.execute("SELECT id, name FROM streams"))
                    header_sets = {h: dict(tuple(p) for p in json.loads(e)) for h, e in
                                   conn.execute("SELECT id, encoded FROM header_sets")}
                out.write(json.dumps({
                    "seq": seq,
                    "stream": streams.get(sid, f"#{sid}"),
                    "ts_ms": ts_ms,
                    "headers": header_sets.get(hid, {}),
                    "payload_b64": base64.b64encode(payload).decode("ascii"),
                }, separators=(",", ":")) + "\n")
                count += 1
    return count


def purge(path: str | os.PathLike[str], cursor: str | None = None) -> int:
    """Drop every record (or every record `cursor` has not passed); return how many.

    Counted as dropped with reason "purged". Fails with BufferLocked while a gateway runs.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BufferError(f"{path}: no buffer file there")
    # Retention limits do not matter here: purge never appends.
    settings = BufferSettings(max_size_bytes=2**62, max_age_s=float("inf"),
                              when_full="drop_oldest")
    with Buffer.open(path, settings) as buf:
        return buf.purge(cursor)
