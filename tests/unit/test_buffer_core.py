"""Buffer behaviour on a real file: cursors, acks, retention, recovery, diagnostics."""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
import time

import pytest

from buffer import (
    Buffer,
    BufferError,
    BufferFull,
    BufferLocked,
    BufferSchemaError,
    BufferSettings,
    NewRecord,
    UnknownCursor,
    diagnostics,
    schema,
)

NOW = time.time_ns() // 1_000_000


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=64 * 1024 * 1024, max_age_s=86400.0, when_full="drop_oldest")
    base.update(kw)
    return BufferSettings(**base)


def recs(n: int, start: int = 0, size: int = 200, stream: str = "g/e/d1",
         ts: int | None = None) -> list[NewRecord]:
    return [NewRecord(stream, (b"%08d" % (start + i)).ljust(size, b"."),
                      NOW if ts is None else ts, {"topic": f"t/{stream}", "type": "DDATA"})
            for i in range(n)]


def test_append_read_ack_roundtrip(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        seqs = buf.append(recs(5))
        assert seqs == [1, 2, 3, 4, 5]
        got = buf.read("mqtt", 10)
        assert [r.seq for r in got] == seqs
        assert got[0].stream == "g/e/d1"
        assert got[0].headers == {"topic": "t/g/e/d1", "type": "DDATA"}
        assert got[0].payload.startswith(b"00000000")
        assert got[0].ts_ms == NOW
        # Unacked records are read again.
        assert [r.seq for r in buf.read("mqtt", 2)] == [1, 2]
        buf.ack("mqtt", 2)
        assert [r.seq for r in buf.read("mqtt", 10)] == [3, 4, 5]
        assert buf.stats()["records"] == 3


def test_seqs_stay_monotonic_after_everything_is_deleted_and_reopened(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(3))
        buf.ack("c", 3)
        assert buf.stats()["records"] == 0
    with Buffer.open(path, settings()) as buf:
        assert buf.append(recs(1)) == [4]


def test_each_cursor_is_independent_and_deletion_waits_for_the_slowest(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(10))
        buf.ack("mqtt", 10)
        assert buf.read("mqtt", 100) == []
        assert [r.seq for r in buf.read("kafka", 3)] == [1, 2, 3]
        st = buf.stats()
        assert st["records"] == 10
        assert st["cursors"]["mqtt"] == {"acked_seq": 10, "records": 0, "bytes": 0}
        assert st["cursors"]["kafka"]["records"] == 10
        assert st["cursors"]["kafka"]["bytes"] == 2000
        buf.ack("kafka", 4)
        st = buf.stats()
        assert st["records"] == 6 and st["first_seq"] == 5 and st["bytes"] == 1200
        assert st["cursors"]["kafka"]["bytes"] == 1200


def test_read_limits_after_seq_and_stream_filter(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(4, stream="a") + recs(4, stream="b"))
        assert len(buf.read("c", 3)) == 3
        # max_bytes stops before exceeding, but always returns at least one record.
        assert len(buf.read("c", 100, max_bytes=450)) == 2
        assert len(buf.read("c", 100, max_bytes=1)) == 1
        assert [r.seq for r in buf.read("c", 100, after_seq=6)] == [7, 8]
        assert [r.seq for r in buf.read("c", 100, stream="b")] == [5, 6, 7, 8]
        assert buf.read("c", 100, stream="nope") == []
        assert buf.has_records("c") and not buf.has_records("c", after_seq=8)


def test_new_cursor_starts_at_the_oldest_record_present(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.append(recs(5))
        buf.ack("a", 2)
        buf.register_cursor("late")
        buf.register_cursor("late")     # idempotent
        assert [r.seq for r in buf.read("late", 10)] == [3, 4, 5]
        assert buf.stats()["cursors"]["late"]["bytes"] == 600


def test_cursor_errors_name_what_and_where(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.append(recs(2))
        with pytest.raises(UnknownCursor, match="'b'"):
            buf.read("b")
        with pytest.raises(BufferError, match="beyond the last stored seq 2"):
            buf.ack("a", 3)
        with pytest.raises(BufferError, match="payload must be bytes"):
            buf.append([NewRecord("s", "text", NOW)])  # type: ignore[arg-type]


def test_unregister_cursor_releases_what_only_it_held(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(5))
        buf.ack("a", 5)
        buf.unregister_cursor("b")
        assert buf.stats()["records"] == 0


def test_size_cap_drops_oldest_counts_and_logs_once(path, caplog):
    caplog.set_level(logging.INFO, logger="outpost.buffer")
    cap = 256 * 1024
    with Buffer.open(path, settings(max_size_bytes=cap)) as buf:
        buf.register_cursor("c")
        for i in range(40):
            buf.append(recs(100, start=i * 100))
        st = buf.stats()
        assert st["used_bytes"] <= cap
        assert st["dropped"]["size"] > 0
        assert st["records"] + st["dropped"]["size"] == 4000
        got = buf.read("c", 10000)
        assert got[-1].seq == 4000 and got[0].seq == st["dropped"]["size"] + 1
        assert st["cursors"]["c"]["bytes"] == st["bytes"] == 200 * st["records"]
        starts = [r for r in caplog.records if "dropping oldest" in r.getMessage()]
        assert len(starts) == 1 and "reason=size" in starts[0].getMessage()
        # Acking frees space; the next append needs no drop and the episode ends, once.
        buf.ack("c", 4000)
        buf.append(recs(1))
        buf.append(recs(1))
        ends = [r for r in caplog.records if "stopped dropping" in r.getMessage()]
        assert len(ends) == 1


def test_block_policy_refuses_with_retriable_buffer_full(path):
    cap = 128 * 1024
    with Buffer.open(path, settings(max_size_bytes=cap, when_full="block")) as buf:
        buf.register_cursor("c")
        stored = 0
        with pytest.raises(BufferFull) as exc:
            for i in range(100):
                stored += len(buf.append(recs(50, start=i * 50)))
        assert exc.value.retriable and exc.value.reason == "size"
        assert path in str(exc.value)
        assert buf.stats()["records"] == stored
        assert buf.stats()["dropped"]["size"] == 0
        buf.ack("c", stored)
        assert len(buf.append(recs(50))) == 50


def test_max_age_drops_expired_prefix(path):
    old = NOW - 3_600_000
    with Buffer.open(path, settings(max_age_s=60.0)) as buf:
        buf.register_cursor("c")
        buf._next_age_check = float("inf")      # store old records without expiring them
        buf.append(recs(5, ts=old))
        buf._next_age_check = 0.0
        buf.append(recs(2))
        st = buf.stats()
        assert st["dropped"]["age"] == 5
        assert [r.seq for r in buf.read("c")] == [6, 7]


def test_max_age_under_block_refuses(path):
    with Buffer.open(path, settings(max_age_s=60.0, when_full="block")) as buf:
        buf.register_cursor("c")
        buf._next_age_check = float("inf")
        buf.append(recs(1, ts=NOW - 3_600_000))
        buf._next_age_check = 0.0
        with pytest.raises(BufferFull) as exc:
            buf.append(recs(1))
        assert exc.value.reason == "age"
        # Still refused right after (not only once per age-check interval) ...
        with pytest.raises(BufferFull):
            buf.append(recs(1))
        # ... until the uplink acknowledged the old record.
        buf.ack("c", 1)
        assert buf.append(recs(1)) == [2]


def test_batch_larger_than_the_whole_cap_is_an_error(path):
    with Buffer.open(path, settings(max_size_bytes=64 * 1024)) as buf:
        with pytest.raises(BufferError, match="does not fit"):
            buf.append(recs(1000))


def test_state_survives_reopen(path):
    with Buffer.open(path, settings(max_size_bytes=128 * 1024)) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        for i in range(20):
            buf.append(recs(50, start=i * 50, stream=f"s{i % 3}"))
        buf.ack("a", 900)
        before = buf.stats()
    with Buffer.open(path, settings(max_size_bytes=128 * 1024)) as buf:
        after = buf.stats()
        for key in ("records", "bytes", "first_seq", "last_seq", "cursors", "dropped"):
            assert after[key] == before[key], key
        r = buf.read("b", 1)[0]
        assert r.stream in {"s0", "s1", "s2"} and r.headers["type"] == "DDATA"


def test_second_writer_is_locked_out(path):
    with Buffer.open(path, settings()):
        with pytest.raises(BufferLocked, match=str(os.getpid())):
            Buffer.open(path, settings())
        with pytest.raises(BufferLocked):
            diagnostics.purge(path)


def test_file_layout_pragmas(path):
    with Buffer.open(path, settings()) as buf:
        buf.append(recs(1))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2     # incremental
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    conn.close()


def test_newer_schema_is_refused_not_moved(path):
    with Buffer.open(path, settings()):
        pass
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(BufferSchemaError, match="99"):
        Buffer.open(path, settings())
    assert os.path.exists(path)


def test_garbage_file_is_moved_aside_and_counted(path, caplog):
    with Buffer.open(path, settings()) as buf:
        buf.append(recs(10))
    with open(path, "r+b") as f:
        f.write(os.urandom(8192))
    with Buffer.open(path, settings()) as buf:
        st = buf.stats()
        assert st["records"] == 0 and st["corrupt_files_moved"] == 1
        assert buf.moved_aside and os.path.exists(buf.moved_aside)
        assert ".corrupt-" in buf.moved_aside
        assert buf.append(recs(1)) == [1]
    assert any("corrupt" in r.getMessage() and r.levelno >= logging.ERROR
               for r in caplog.records)


def test_damaged_page_in_the_middle_is_detected(path):
    with Buffer.open(path, settings()) as buf:
        buf.append(recs(2000))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff" * 4096)
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None
        # The readable records are salvaged, the unreadable ones counted (issue 11).
        st = buf.stats()
        assert 0 < st["records"] < 2000
        assert st["salvaged"] == st["records"]
        assert st["dropped"]["corrupt"] == 2000 - st["records"]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_foreign_sqlite_file_is_moved_aside(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE other (x)")
    conn.commit()
    conn.close()
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None


def test_garbage_wal_loses_at_most_the_wal_and_opens_cleanly(path):
    # Committed data is checkpointed into the main file; later commits sit in the WAL.
    buf = Buffer.open(path, settings())
    buf.register_cursor("c")
    buf.append(recs(100))
    buf.checkpoint("TRUNCATE")
    buf.append(recs(100, start=100))
    # Simulate a crash: copy the files while open (as power loss would leave them).
    snapshot = {s: open(path + s, "rb").read() for s in ("", "-wal")}
    buf.close()
    for suffix, data in snapshot.items():
        with open(path + suffix, "wb") as f:
            f.write(data)
    wal = path + "-wal"
    assert os.path.getsize(wal) > 0
    with open(wal, "r+b") as f:
        f.write(os.urandom(os.path.getsize(wal)))
    with Buffer.open(path, settings()) as buf:
        st = buf.stats()
        assert buf.moved_aside is None
        assert st["records"] == 100 and st["last_seq"] == 100
        assert [r.seq for r in buf.read("c", 1000)] == list(range(1, 101))
        assert buf.append(recs(1)) == [101]
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()


def test_purge_all_and_per_cursor(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(10))
        buf.ack("a", 4)
        assert buf.purge("a") == 6
        assert buf.stats()["records"] == 10        # b still holds them
        assert buf.stats()["dropped"]["purged"] == 6
    assert diagnostics.purge(path) == 10
    st = diagnostics.stats_for_path(path)
    assert st["records"] == 0 and st["dropped"]["purged"] == 16


def test_stats_for_path_and_export_while_open(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("kafka")
        buf.append(recs(3, ts=NOW - 10_000) + recs(2, start=3))
        buf.ack("kafka", 1)
        st = diagnostics.stats_for_path(path)
        assert st["records"] == 4 and st["last_seq"] == 5
        assert st["cursors"]["kafka"] == {"acked_seq": 1, "records": 4, "bytes": 800}
        assert st["oldest_age_s"] >= 10
        out = io.StringIO()
        assert diagnostics.export_jsonl(path, out) == 4
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [x["seq"] for x in lines] == [2, 3, 4, 5]
        assert lines[0]["headers"]["type"] == "DDATA"
        out = io.StringIO()
        assert diagnostics.export_jsonl(path, out, since_ts_ms=NOW) == 2
        out = io.StringIO()
        assert diagnostics.export_jsonl(path, out, cursor="kafka") == 4
        with pytest.raises(UnknownCursor):
            diagnostics.export_jsonl(path, io.StringIO(), cursor="nope")
    with pytest.raises(BufferError, match="no buffer file"):
        diagnostics.stats_for_path(path + ".missing")


def test_space_is_reclaimed_by_incremental_vacuum(path):
    s = settings(vacuum_slack_bytes=64 * 1024)
    with Buffer.open(path, s) as buf:
        buf.register_cursor("c")
        for i in range(20):
            buf.append(recs(500, start=i * 500))
        buf.checkpoint("TRUNCATE")
        big = os.path.getsize(path)
        buf.ack("c", 10_000)
        assert buf.reclaim() == 10_000
        for _ in range(10):
            buf._next_vacuum = 0.0
            buf._vacuum_step()
        buf.checkpoint("TRUNCATE")
        assert os.path.getsize(path) < big // 4


def test_wal_stays_bounded_by_managed_checkpoints(path):
    s = settings(checkpoint_wal_bytes=256 * 1024)
    with Buffer.open(path, s) as buf:
        buf.register_cursor("c")
        for i in range(200):
            seqs = buf.append(recs(100, start=i * 100))
            buf.ack("c", seqs[-1])
        st = buf.stats()
        assert st["last_checkpoint"] is not None
        # journal_size_limit is twice the checkpoint threshold, plus one batch in flight.
        assert st["wal_size_bytes"] <= 2 * 256 * 1024 + 200 * 1024


def test_migrations_run_in_order_on_open(path, monkeypatch):
    from buffer import schema

    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(3))

    def v1_to_v2(conn):
        conn.execute("INSERT INTO meta(key, value) VALUES ('migrated', 1)")

    current = schema.SCHEMA_VERSION
    monkeypatch.setattr(schema, "SCHEMA_VERSION", current + 1)
    monkeypatch.setitem(schema.MIGRATIONS, current, v1_to_v2)
    with Buffer.open(path, settings()) as buf:
        assert [r.seq for r in buf.read("c")] == [1, 2, 3]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert conn.execute("SELECT value FROM meta WHERE key = 'migrated'").fetchone()[0] == 1
    conn.close()


def test_garbage_shm_is_rebuilt(path):
    buf = Buffer.open(path, settings())
    buf.register_cursor("c")
    buf.append(recs(50))
    snapshot = {s: open(path + s, "rb").read() for s in ("", "-wal", "-shm")}
    buf.close()
    for suffix, data in snapshot.items():
        with open(path + suffix, "wb") as f:
            f.write(data)
    with open(path + "-shm", "r+b") as f:
        f.write(os.urandom(len(snapshot["-shm"])))
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is None
        assert [r.seq for r in buf.read("c", 100)] == list(range(1, 51))


@pytest.mark.parametrize(("sync", "level"), [("full", 2), ("normal", 1)])
def test_durability_setting_is_applied(path, sync, level):
    with Buffer.open(path, settings(synchronous=sync)) as buf:
        assert buf._conn.execute("PRAGMA synchronous").fetchone()[0] == level


def test_no_read_transaction_is_held_between_calls(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(500))
        assert len(buf.read("c", 10)) == 10       # a partial read leaves rows unfetched
        assert not buf._conn.in_transaction
        # Another connection can checkpoint the whole WAL: nothing pins a snapshot.
        other = sqlite3.connect(path, timeout=0)
        try:
            busy, frames, done = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            other.close()
        assert busy == 0 and frames == done


# -- the exact cap, read(limit=0), the disk-full path -------------------------------------------------
def test_the_size_cap_is_exact(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(50))
        used = buf.stats()["used_bytes"]
        # The look-ahead reserves payload + 40 bytes a record: a batch that needs exactly
        # the room left is stored without a drop ...
        buf.settings = settings(max_size_bytes=used + 10 + 40)
        buf.append(recs(1, size=10))
        st = buf.stats()
        assert st["dropped"]["size"] == 0 and st["records"] == 51
        assert st["used_bytes"] <= used + 50
        # ... and one byte less makes room first, from the oldest end.
        used = st["used_bytes"]
        buf.settings = settings(max_size_bytes=used + 10 + 40 - 1)
        buf.append(recs(1, size=10))
        st = buf.stats()
        assert st["dropped"]["size"] >= 1 and st["used_bytes"] <= used + 49
        assert buf.read("c", 1)[0].seq == st["dropped"]["size"] + 1
        assert st["limit_bytes"] == used + 49 and st["limit_reason"] == "size"


def test_read_limits_at_zero_and_the_first_record_beyond_max_bytes(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(3, size=100))
        assert buf.read("c", 0) == [] and buf.read("c", -1) == []
        assert [r.seq for r in buf.read("c", 10, max_bytes=50)] == [1]     # the first always comes
        assert [r.seq for r in buf.read("c", 10, max_bytes=200)] == [1, 2]
        assert [r.seq for r in buf.read("c", 10, max_bytes=199)] == [1]
        assert [r.seq for r in buf.read("c", 10, max_bytes=0)] == [1]
        assert buf.read("c", 10, stream="no/such/stream") == []
        assert [r.seq for r in buf.read("c", 10, after_seq=2)] == [3]
        buf.ack("c", 2)
        assert [r.seq for r in buf.read("c", 10, after_seq=1)] == [3]      # the cursor is further
        assert buf.has_records("c") and not buf.has_records("c", after_seq=3)


def _limit_file(buf: Buffer, extra_pages: int) -> None:
    """Let SQLite grow the file by only `extra_pages` more pages: a real SQLITE_FULL."""
    pages = buf._conn.execute("PRAGMA page_count").fetchone()[0]
    buf._conn.execute(f"PRAGMA max_page_count = {pages + extra_pages}")


def test_disk_full_drops_the_oldest_and_the_append_succeeds(path, caplog):
    caplog.set_level(logging.INFO, logger="outpost.buffer")
    with Buffer.open(path, settings(reserve_bytes=64 * 1024)) as buf:
        assert os.path.getsize(path + ".reserve") == 64 * 1024
        buf.register_cursor("c")
        for i in range(10):
            buf.append(recs(20, start=i * 20, size=400))
        _limit_file(buf, 2)
        seqs = buf.append(recs(40, start=200, size=400))      # does not fit in 2 more pages
        assert seqs == list(range(201, 241))
        st = buf.stats()
        dropped = st["dropped"]["disk_full"]
        assert dropped > 0 and st["dropped"]["size"] == 0
        assert st["records"] == 240 - dropped
        assert [r.seq for r in buf.read("c", 1)] == [dropped + 1]   # the oldest went, in order
        assert st["limit_reason"] == "disk_full" and st["limit_bytes"] < buf.settings.max_size_bytes
        assert st["cursors"]["c"]["records"] == st["records"]
        assert not os.path.exists(path + ".reserve")           # released for SQLite's own work
        messages = [r.getMessage() for r in caplog.records]
        assert sum("buffer disk full" in m for m in messages) == 1
        assert any("released its disk reserve" in m for m in messages)
        assert any("dropping oldest records" in m and "reason=disk_full" in m for m in messages)
    # What was committed is intact after a reopen.
    with Buffer.open(path, settings(reserve_bytes=0)) as buf:
        got = buf.read("c", 1000)
        assert [r.seq for r in got] == list(range(dropped + 1, 241))
        assert got[-1].payload.startswith(b"00000239")


def test_disk_full_under_block_refuses_and_keeps_everything(path):
    with Buffer.open(path, settings(when_full="block", reserve_bytes=0)) as buf:
        buf.register_cursor("c")
        for i in range(10):
            buf.append(recs(20, start=i * 20, size=400))
        _limit_file(buf, 2)
        with pytest.raises(BufferFull) as exc:
            buf.append(recs(40, size=400))
        assert exc.value.reason == "disk_full" and exc.value.retriable
        st = buf.stats()
        assert st["records"] == 200 and st["dropped"]["disk_full"] == 0 and st["blocked"] == "disk_full"
        assert [r.seq for r in buf.read("c", 1000)] == list(range(1, 201))


def test_disk_full_with_nothing_to_drop_is_a_retriable_io_error(path):
    from buffer import BufferIOError

    with Buffer.open(path, settings(reserve_bytes=0)) as buf:
        buf.register_cursor("c")
        _limit_file(buf, 1)
        with pytest.raises(BufferIOError, match="disk full and nothing left to drop") as exc:
            buf.append(recs(60, size=400))
        assert exc.value.retriable
        assert buf.stats()["records"] == 0 and buf.stats()["last_seq"] == 0


# -- settings, cursors, acks, purge and stats at their edges -------------------------------------------
@pytest.mark.parametrize(("kw", "fragment"), [
    ({"max_size_bytes": 0}, "max_size_bytes must be a positive integer, got 0"),
    ({"max_size_bytes": 1.5}, "max_size_bytes must be a positive integer"),
    ({"max_age_s": 0.0}, "max_age_s must be positive seconds, got 0.0"),
    ({"when_full": "wait"}, "when_full must be one of"),
    ({"synchronous": "off"}, "synchronous must be one of"),
    ({"check_on_open": "full"}, "check_on_open must be 'quick' or 'none'"),
    ({"reserve_bytes": -1}, "reserve_bytes must be >= 0, got -1"),
])
def test_settings_are_checked(kw, fragment):
    with pytest.raises(ValueError) as err:
        settings(**kw)
    assert fragment in str(err.value)
    s = settings(max_size_bytes=1, max_age_s=0.001, reserve_bytes=0)
    assert (s.when_full, s.synchronous, s.check_on_open) == ("drop_oldest", "full", "quick")


def test_cursor_registration_edges(path):
    with Buffer.open(path, settings()) as buf:
        for bad in ("", None, 5):
            with pytest.raises(BufferError, match="cursor name must be a non-empty string"):
                buf.register_cursor(bad)  # type: ignore[arg-type]
        buf.register_cursor("b")
        buf.register_cursor("a")
        buf.append(recs(3))
        buf.ack("a", 2)
        buf.register_cursor("a")                     # idempotent: keeps its position
        assert buf.cursors() == ["a", "b"]
        assert [r.seq for r in buf.read("a")] == [3]
        with pytest.raises(UnknownCursor, match=r"unknown cursor 'c' \(registered: \['a', 'b'\]\)"):
            buf.unregister_cursor("c")
        buf.ack("a", 1)                              # behind the cursor: nothing happens
        assert buf.stats()["cursors"]["a"] == {"acked_seq": 2, "records": 1, "bytes": 200}
        buf.unregister_cursor("b")                   # a now alone: what it passed goes
        st = buf.stats()
        assert st["records"] == 1 and st["first_seq"] == 3 and st["bytes"] == 200
        # b's backlog went with it: counted (issue 11), never silently
        assert {k: v for k, v in st["dropped"].items() if v} == {"uplink_removed": 2}
        buf.unregister_cursor("a")
        assert buf.cursors() == [] and buf.stats()["records"] == 1   # no cursor: nothing is deleted


def test_acks_move_bytes_and_delete_only_below_the_slowest(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("fast")
        buf.register_cursor("slow")
        buf.append(recs(4, size=100) + recs(2, size=300))
        buf.ack("fast", 5)
        st = buf.stats()
        assert st["cursors"]["fast"] == {"acked_seq": 5, "records": 1, "bytes": 300}
        assert st["records"] == 6 and st["bytes"] == 1000
        buf.ack("slow", 3)
        st = buf.stats()
        assert st["records"] == 3 and st["first_seq"] == 4 and st["bytes"] == 700
        assert st["cursors"]["slow"] == {"acked_seq": 3, "records": 3, "bytes": 700}
        buf.ack("slow", 6)
        st = buf.stats()
        assert st["records"] == 1 and st["bytes"] == 300 and st["cursors"]["slow"]["bytes"] == 0
        with pytest.raises(BufferError, match="cursor 'fast' acked seq 7, beyond the last stored seq 6"):
            buf.ack("fast", 7)


def test_purge_of_one_cursor_counts_what_it_had_not_passed(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(5))
        buf.ack("a", 2)
        assert buf.purge("a") == 3
        st = buf.stats()
        assert st["cursors"]["a"] == {"acked_seq": 5, "records": 0, "bytes": 0}
        assert st["records"] == 5 and st["dropped"]["purged"] == 3     # b still holds them
        assert buf.purge("b") == 5
        st = buf.stats()
        assert st["records"] == 0 and st["dropped"]["purged"] == 8 and st["bytes"] == 0
        assert buf.purge() == 0
        buf.append(recs(2))
        assert buf.purge() == 2 and buf.stats()["dropped"]["purged"] == 10
        with pytest.raises(UnknownCursor):
            buf.purge("zz")


def test_append_accepts_byte_views_and_refuses_other_payloads_and_streams(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        assert buf.append([]) == []
        assert buf.append([NewRecord("s", bytearray(b"ab"), NOW, {}),
                           NewRecord("s", memoryview(b"cd"), NOW, {})]) == [1, 2]
        with pytest.raises(BufferError, match=r"payload must be bytes, got str \(stream 'x/y'\)"):
            buf.append([NewRecord("x/y", "text", NOW, {})])  # type: ignore[arg-type]
        with pytest.raises(BufferError, match="record stream must be a string, got 7"):
            buf.append([NewRecord(7, b"x", NOW, {})])  # type: ignore[arg-type]
        assert buf.stats()["last_seq"] == 2                  # refused batches take no seq
        shared = {"type": "DDATA", "topic": "t"}
        buf.append([NewRecord("s", b"1", NOW, shared), NewRecord("s2", b"2", NOW + 1, shared),
                    NewRecord("s", b"3", NOW, {"topic": "t", "type": "DDATA"})])
        got = buf.read("c")
        assert [(r.seq, r.stream, bytes(r.payload)) for r in got] == [
            (1, "s", b"ab"), (2, "s", b"cd"), (3, "s", b"1"), (4, "s2", b"2"), (5, "s", b"3")]
        assert got[2].headers == got[4].headers == shared and got[3].ts_ms == NOW + 1
    with Buffer.open(path, settings()) as buf:          # names and headers come back from the file
        got = buf.read("c", after_seq=2)
        assert [(r.stream, dict(r.headers)) for r in got] == [("s", shared), ("s2", shared), ("s", shared)]
        assert buf.append([NewRecord("s3", b"4", NOW, shared)]) == [6]
        assert buf.read("c", stream="s3")[0].seq == 6


def test_checkpoint_modes_and_closed_buffer(path):
    buf = Buffer.open(path, settings())
    buf.register_cursor("c")
    buf.append(recs(10))
    with pytest.raises(BufferError, match="unknown checkpoint mode 'NOW'"):
        buf.checkpoint("NOW")
    info = buf.checkpoint("TRUNCATE")
    assert info["mode"] == "TRUNCATE" and info["busy"] is False
    assert buf.stats()["last_checkpoint"]["mode"] == "TRUNCATE"
    assert buf.stats()["wal_size_bytes"] == 0
    buf.close()
    buf.close()                                            # idempotent
    from buffer import BufferClosed
    for call in (lambda: buf.append(recs(1)), lambda: buf.read("c"), buf.stats, buf.checkpoint):
        with pytest.raises(BufferClosed, match="buffer is closed"):
            call()
    assert not os.path.exists(path + "-wal") or os.path.getsize(path + "-wal") == 0


def test_stats_while_dropping_and_blocked(path):
    cap = 128 * 1024
    with Buffer.open(path, settings(max_size_bytes=cap, reserve_bytes=0)) as buf:
        buf.register_cursor("c")
        for i in range(30):
            buf.append(recs(20, start=i * 20))
        st = buf.stats()
        assert st["dropping"] == ["size"] and st["blocked"] is None
        assert st["limit_bytes"] == cap and st["limit_reason"] == "size"
        assert st["file_size_bytes"] > 0 and st["used_bytes"] > 0 and st["free_pages"] >= 0
    with Buffer.open(path, settings(max_size_bytes=cap, when_full="block", reserve_bytes=0)) as buf:
        with pytest.raises(BufferFull):
            for i in range(30):
                buf.append(recs(20, start=i * 20))
        assert buf.stats()["blocked"] == "size" and buf.stats()["dropping"] == []


def test_corrupt_copies_lists_main_files_oldest_first(tmp_path):
    from buffer.core import corrupt_copies

    base = tmp_path / "b.db"
    for name in ("b.db.corrupt-2", "b.db.corrupt-1", "b.db.corrupt-1-wal", "b.db.corrupt-1-shm",
                 "other.db.corrupt-1", "b.db"):
        (tmp_path / name).write_text("x")
    assert corrupt_copies(str(base)) == [str(tmp_path / "b.db.corrupt-1"), str(tmp_path / "b.db.corrupt-2")]
    assert corrupt_copies(str(tmp_path / "missing" / "b.db")) == []


def test_default_tuning_is_the_documented_one():
    s = settings()
    assert (s.checkpoint_wal_bytes, s.wal_max_bytes, s.vacuum_slack_bytes, s.reserve_bytes) == (
        4 * 1024 * 1024, 64 * 1024 * 1024, 8 * 1024 * 1024, 4 * 1024 * 1024)


def test_expiry_stops_at_the_first_young_record_even_if_older_ones_follow(path):
    old = NOW - 3_600_000
    with Buffer.open(path, settings(max_age_s=60.0)) as buf:
        buf.register_cursor("c")
        buf._next_age_check = float("inf")
        buf.append(recs(3, ts=old) + recs(1, start=3) + recs(1, start=4, ts=old))
        buf._next_age_check = 0.0
        buf.append(recs(1, start=5))
        assert buf.stats()["dropped"]["age"] == 3
        assert [r.seq for r in buf.read("c")] == [4, 5, 6]   # the late old record waits its turn


def test_a_batch_over_the_size_cap_is_not_retriable(path):
    with Buffer.open(path, settings(max_size_bytes=64 * 1024)) as buf:
        with pytest.raises(BufferError, match="does not fit under the limit of 65536 bytes") as exc:
            buf.append(recs(1000))
        assert exc.value.retriable is False


def test_every_checkpoint_mode_is_accepted(path):
    with Buffer.open(path, settings()) as buf:
        buf.append(recs(5))
        for mode in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            assert buf.checkpoint(mode)["mode"] == mode


def test_state_is_recovered_from_the_records_when_meta_lags(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(5))
    with sqlite3.connect(path) as conn:                  # e.g. a file restored from a backup
        conn.execute("UPDATE meta SET value = 2 WHERE key = 'last_seq'")
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["last_seq"] == 5
        assert buf.append(recs(1)) == [6]                # never a seq twice


def test_the_lock_file_names_the_holder(path):
    with Buffer.open(path, settings()):
        with open(path + ".lock") as f:
            assert f.read() == f"{os.getpid()}\n"


def test_a_write_that_meets_a_full_disk_frees_room_once_then_reports_it(path):
    from buffer import BufferIOError

    with Buffer.open(path, settings(reserve_bytes=64 * 1024)) as buf:
        buf.append(recs(10))
        _limit_file(buf, 0)
        with pytest.raises(BufferIOError, match="register_cursor: disk full") as exc:
            for i in range(200):                         # cursor rows until no page is left
                buf.register_cursor(f"c{i:03d}" + "x" * 1000)
        assert exc.value.retriable
        assert not os.path.exists(path + ".reserve")     # the retry released the reserve first
        st = buf.stats()                                 # what was committed stays
        assert st["records"] == 10 and st["last_seq"] == 10


def test_a_second_corrupt_copy_in_the_same_second_gets_a_number(path):
    import time as _time

    with open(path, "wb") as f:
        f.write(b"garbage" * 1000)
    now = _time.time()
    # The copy's name is stamped to the second: take this one and the next few (a loaded
    # machine, or the mutation runner's tracer, may need more than a second to get there).
    for t in range(int(now), int(now) + 10):
        stamp = _time.strftime("%Y%m%dT%H%M%SZ", _time.gmtime(t))
        open(f"{path}.corrupt-{stamp}", "w").close()
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside.endswith("-2") and os.path.getsize(buf.moved_aside) == 7000


def test_a_path_that_cannot_be_opened_is_an_io_error_not_a_corruption(tmp_path):
    from buffer import BufferIOError

    target = tmp_path / "adir"
    target.mkdir()
    with pytest.raises(BufferIOError, match="cannot open buffer") as exc:
        Buffer.open(target, settings())
    assert exc.value.retriable is False
    assert target.is_dir() and not list(tmp_path.glob("adir.corrupt-*"))   # nothing moved aside


def test_age_is_checked_at_most_every_tenth_of_max_age(path):
    with Buffer.open(path, settings(max_age_s=5.0)) as buf:
        buf.append(recs(1))
        before = time.monotonic()
        buf.append(recs(1))                       # records present: this append checks the age
        nxt = buf._next_age_check
        assert before < nxt <= time.monotonic() + 0.5     # min(1 s, max_age / 10) ahead


def _as_records(rows, streams, hsets) -> list[tuple]:
    return [(seq, streams[sid], ts, dict(hsets[hid]), payload) for seq, sid, ts, hid, payload in rows]


def test_read_with_hands_over_the_rows_read_would_return(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.register_cursor("other")
        buf.append(recs(4, size=100) + recs(3, start=4, size=100, stream="g/e/d2"))
        for seq in (2, 3):
            buf.quarantine("other", seq, "too_large")
        buf.ack("other", 7)
        buf.quarantine_retry()  # 2 and 3 again, for "other" only: "c" must step over them
        buf.append(recs(2, start=9, size=100, stream="g/e/d3"))
        seen = []

        def consume(rows, streams, hsets):
            seen.append(rows)
            return _as_records(rows, streams, hsets)

        for kw in ({}, {"limit": 3}, {"max_bytes": 250}, {"max_bytes": 0}, {"after_seq": 5},
                   {"limit": 0}, {"limit": 20, "max_bytes": 10_000}):
            expected = [(r.seq, r.stream, r.ts_ms, dict(r.headers), r.payload)
                        for r in buf.read("c", **kw)]
            assert buf.read_with("c", consume, **kw) == expected, kw
        assert [row[0] for row in seen[0]] == [1, 2, 3, 4, 5, 6, 7, 10, 11]
        assert [row[0] for row in seen[2]] == [1, 2]                  # 100 + 100 <= 250 < 300
        assert all(type(row) is tuple and len(row) == 5 for rows in seen for row in rows)
        assert [row[0] for row in buf.read_with("other", lambda rows, s, h: rows)] == [8, 9, 10, 11]
        assert buf.read_with("c", lambda rows, s, h: 42, limit=0) == 42  # called with no rows too
