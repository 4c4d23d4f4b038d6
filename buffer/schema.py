"""On-disk layout of the buffer file and its migrations (`PRAGMA user_version`).

Layout (version 1), chosen to keep the per-record cost small:
- `records`: a rowid table whose INTEGER PRIMARY KEY *is* the gateway-wide seq, so there
  is no second index. Stream names and header sets are small integers pointing into two
  dictionary tables, because a gateway has a handful of streams and header sets that
  repeat on every record. The payload is the last column.
- `cursors`: one row per uplink: the highest acknowledged seq and the payload bytes it
  still has to send.
- `meta`: integer counters kept in the same transactions as the records they describe
  (last assigned seq, live payload bytes, dropped counts per reason).

Version 2 adds:
- `quarantine`: copies of records one uplink cannot deliver (refused for the record
  itself), with the cursor, the reason and when; unique per (cursor, seq).
- `salvaged`: one row per corrupt file moved aside whose readable records were copied
  into this buffer (with how far the copy got, so an interrupted salvage resumes).

Records present always form one contiguous seq range: they are only ever removed from
the oldest end (acks by every cursor, retention drops, purge).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

SCHEMA_VERSION = 2

_V1 = (
    """CREATE TABLE records (
        seq INTEGER PRIMARY KEY,
        stream_id INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        headers_id INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    "CREATE TABLE streams (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE header_sets (id INTEGER PRIMARY KEY, encoded TEXT NOT NULL UNIQUE)",
    """CREATE TABLE cursors (
        name TEXT PRIMARY KEY,
        acked_seq INTEGER NOT NULL,
        pending_bytes INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "INSERT INTO meta(key, value) VALUES ('last_seq', 0), ('live_bytes', 0)",
)

_V2 = (
    """CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY,
        cursor TEXT NOT NULL,
        seq INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        stream_id INTEGER NOT NULL,
        ts_ms INTEGER NOT NULL,
        headers_id INTEGER NOT NULL,
        payload BLOB NOT NULL,
        UNIQUE (cursor, seq)
    )""",
    """CREATE TABLE salvaged (
        name TEXT PRIMARY KEY,
        upto_seq INTEGER NOT NULL,
        done INTEGER NOT NULL,
        records INTEGER NOT NULL,
        lost INTEGER NOT NULL
    ) WITHOUT ROWID""",
)

# Tables every Outpost buffer has (version 1 and later); used to recognise a buffer file.
OUR_TABLES = frozenset({"records", "streams", "header_sets", "cursors", "meta"})


def create(conn: sqlite3.Connection) -> None:
    """Create the current schema in an empty file (caller holds a write transaction)."""
    for stmt in _V1 + _V2:
        conn.execute(stmt)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    for stmt in _V2:
        conn.execute(stmt)


# MIGRATIONS[v] upgrades a file from version v to v + 1, inside one write transaction.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2}


def migrate(conn: sqlite3.Connection, from_version: int) -> int:
    """Run every migration from `from_version` to SCHEMA_VERSION; return the new version."""
    version = from_version
    while version < SCHEMA_VERSION:
        step = MIGRATIONS[version]
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version += 1
    return version
