"""The buffer at its edges, each case one that an earlier test suite let slip (found by
mutation testing, `python -m tests.mutation --module buffer/core.py`): the floor exactly at
the oldest record, the size cap with only quarantined copies left, the salvage of a file
whose records table is gone, records every uplink had, a WAL beside a damaged file,
a lock file that is not text, and the status fields nobody read back."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time

import pytest

from buffer import Buffer, BufferLocked, BufferSettings, NewRecord
from buffer.core import corrupt_copies

NOW = time.time_ns() // 1_000_000


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=64 * 1024 * 1024, max_age_s=86400.0, reserve_bytes=0)
    base.update(kw)
    return BufferSettings(**base)


def recs(n: int, start: int = 0, size: int = 200, stream: str = "g/n/d1") -> list[NewRecord]:
    return [NewRecord(stream, (b"%08d" % (start + i)).ljust(size, b"."), NOW, {"k": "v"})
            for i in range(n)]


def ids(records) -> list[int]:
    return [int(r.payload[:8]) for r in records]


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "buffer.db")


def damage_page_of(path: str, name: str) -> None:
    """Garbage over the root page of table or index `name` (the buffer is closed)."""
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (name,)).fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)


def test_removing_a_cursor_frees_the_oldest_record_when_the_floor_lands_on_it(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(5))
        buf.ack("a", 1)                 # b still holds seq 1: nothing deleted yet
        assert buf.stats()["records"] == 5
        assert buf.unregister_cursor("b") == 1
        st = buf.stats()
        assert (st["records"], st["first_seq"], st["dropped"]["uplink_removed"]) == (4, 2, 1)
        assert [r.seq for r in buf.read("a", 10)] == [2, 3, 4, 5]


def test_with_only_quarantined_copies_left_the_size_cap_takes_the_oldest_one_at_a_time(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        seqs = buf.append(recs(3, size=20_000))
        for seq in seqs:
            buf.quarantine("c", seq, "too_large:m")
        buf.ack("c", seqs[-1])          # the records go, their quarantined copies stay
        st = buf.stats()
        assert (st["records"], st["quarantine"]["records"]) == (0, 3)
        # Room for the next record needs a few kB: one copy (20 kB) is enough, and it is
        # the oldest that goes.
        buf.settings = settings(max_size_bytes=st["used_bytes"] + 100 + 40 - 5_000)
        buf.append(recs(1, start=9, size=100))
        st = buf.stats()
        assert st["dropped"]["size"] == 1 and st["quarantine"]["records"] == 2
        assert [q.seq for q in buf.quarantine_list("c")] == seqs[1:]
        assert ids(buf.read("c", 10)) == [9]


def test_a_salvage_without_a_records_table_counts_everything_owed_as_lost(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(300))
        buf.ack("mqtt", 120)
        buf.ack("kafka", 40)
    damage_page_of(path, "records")
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None
        st = buf.stats()
        # Neither the range nor a single record can be read: the range comes from what
        # the file still says (last seq, the cursors), every record owed is counted lost.
        assert st["salvaged"] == 0 and st["records"] == 0
        assert st["dropped"]["corrupt"] == 300 - 40
        assert st["last_seq"] >= 300                   # seqs are never reused
        assert set(st["cursors"]) == {"mqtt", "kafka"}


def test_a_salvage_skips_records_every_uplink_had_and_counts_the_unroutable_ones(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(5))                             # seqs 1-5
        buf.append(recs(1, start=5, stream="g/n/gone"))  # seq 6: its stream row will be lost
        buf.quarantine("a", 2, "too_large:m")
        buf.ack("a", 6)
        assert buf.quarantine_retry("a") == 1           # seq 7, for `a` only
        buf.ack("a", 7)                                 # `a` had it; `b` never was to
        assert buf.stats()["records"] == 7              # `b` holds them all
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM streams WHERE name = 'g/n/gone'")
    conn.commit()
    conn.close()
    damage_page_of(path, "sqlite_autoindex_streams_1")  # quick_check fails, records readable
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None
        st = buf.stats()
        assert st["salvaged"] == 5 and st["dropped"]["corrupt"] == 1
        assert ids(buf.read("b", 10)) == [0, 1, 2, 3, 4]
        assert buf.read("a", 10) == []


def test_what_a_wal_beside_a_damaged_file_held_is_salvaged(path):
    with Buffer.open(path, settings(checkpoint_wal_bytes=64 * 1024 * 1024)) as buf:
        buf.register_cursor("c")
        buf.append(recs(50))
        with open(path + "-wal", "rb") as f:
            wal = f.read()
    assert len(wal) > 4096
    with open(path, "wb") as f:
        f.write(b"not a database, but a WAL of one lies beside it" * 100)
    with open(path + "-wal", "wb") as f:
        f.write(wal)
    with Buffer.open(path, settings()) as buf:
        moved = buf.moved_aside
        assert moved is not None
        st = buf.stats()
        # What the WAL held comes back through the copy (read with its WAL), once.
        assert st["salvaged"] == 50 and st["dropped"]["corrupt"] == 0
        assert ids(buf.read("c", 100)) == list(range(50))
        assert st["moved_aside_this_run"] == moved and st["corrupt_files_moved"] == 1
    assert corrupt_copies(path) == [moved]


def test_a_lock_file_that_is_not_text_still_says_the_buffer_is_in_use(path):
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"\xff\xfe\x00 not a pid")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BufferLocked, match="in use by another process; stop the gateway first"):
            Buffer.open(path, settings())
    finally:
        os.close(fd)
    with Buffer.open(path, settings()) as buf:            # released: it opens
        assert buf.stats()["records"] == 0


def test_the_status_tells_the_last_checkpoint_and_the_quarantine_deliveries(path):
    with Buffer.open(path, settings()) as buf:
        st = buf.stats()
        assert st["moved_aside_this_run"] is None
        assert st["quarantine"]["delivered"] == 0 and st["quarantine"]["total_by_reason"] == {}
        buf.register_cursor("c")
        seqs = buf.append(recs(3))
        buf.quarantine("c", seqs[0], "held:t")
        buf.quarantine("c", seqs[1], "held:t")
        assert buf.quarantine_delivered("c", seqs[:2]) == 2
        assert buf.quarantine_delivered("c", []) == 0
        q = buf.stats()["quarantine"]
        assert (q["delivered"], q["records"], q["total_by_reason"]) == (2, 0, {"held:t": 2})
        t0 = time.time_ns() // 1_000_000
        buf.checkpoint("TRUNCATE")
        t1 = time.time_ns() // 1_000_000
        last = buf.stats()["last_checkpoint"]
        assert t0 <= last.pop("at_ms") <= t1
        assert last == {"mode": "TRUNCATE", "busy": False, "wal_frames": 0, "checkpointed_frames": 0,
                        "pinned": False}
