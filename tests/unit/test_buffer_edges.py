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
        assert buf.reclaim() == 3       # (their rows too: only the copies hold space)
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


def test_the_tuning_defaults_are_the_ones_the_buffer_readme_documents():
    import dataclasses
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "buffer" / "README.md").read_text()
    table = readme.split("## Tuning", 1)[1].split("\n\n", 2)[1]
    units = {"MiB": 1024 * 1024}
    defaults = {f.name: f.default for f in dataclasses.fields(BufferSettings)}
    rows = re.findall(r"^\| `(\w+)` \| ([^|]+) \|", table, re.M)
    assert len(rows) >= 7
    for name, text in rows:
        text = text.strip().strip("`").strip('"')
        m = re.fullmatch(r"([\d.]+) (MiB)", text)
        documented = int(m.group(1)) * units[m.group(2)] if m else type(defaults[name])(text)
        assert defaults[name] == documented, name


def test_a_buffer_directory_that_cannot_be_made_is_not_retried(tmp_path):
    from buffer import BufferIOError

    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(BufferIOError, match="cannot create the buffer directory") as exc:
        Buffer.open(str(blocker / "sub" / "buffer.db"), settings())
    assert exc.value.retriable is False


def test_with_only_quarantined_copies_left_the_cap_keeps_taking_them_until_the_batch_fits(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        seqs = buf.append(recs(3, size=20_000))
        for seq in seqs:
            buf.quarantine("c", seq, "too_large:m")
        buf.ack("c", seqs[-1])
        buf.reclaim()
        used = buf.stats()["used_bytes"]
        # Room for the record needs more than one copy's 20 kB: two go, the newest stays.
        buf.settings = settings(max_size_bytes=used + 100 + 40 - 25_000)
        buf.append(recs(1, start=9, size=100))
        st = buf.stats()
        assert st["dropped"]["size"] == 2 and [q.seq for q in buf.quarantine_list("c")] == seqs[2:]
        assert ids(buf.read("c", 10)) == [9]


def test_a_drop_takes_from_each_cursor_only_what_it_had_not_passed(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("fast")
        buf.register_cursor("slow")
        buf.append(recs(10, size=1000))
        buf.ack("fast", 3)
        st = buf.stats()
        assert (st["cursors"]["fast"]["bytes"], st["cursors"]["slow"]["bytes"]) == (7000, 10_000)
        # The cap takes the oldest records, beyond `fast`'s position: each cursor's pending
        # bytes lose exactly the dropped records it had not passed yet.
        buf.settings = settings(max_size_bytes=st["used_bytes"] - 1)
        buf.append(recs(1, start=10, size=1000))
        st = buf.stats()
        dropped = st["dropped"]["size"]
        assert dropped > 3
        left = 11 - dropped
        assert st["records"] == left
        assert st["cursors"]["slow"]["bytes"] == left * 1000
        assert st["cursors"]["fast"]["bytes"] == left * 1000
        assert st["cursors"]["fast"]["records"] == st["cursors"]["slow"]["records"] == left


def test_purging_everything_counts_the_quarantined_copies_as_purged(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        seqs = buf.append(recs(5))
        buf.quarantine("c", seqs[0], "too_large:m")
        buf.quarantine("c", seqs[1], "too_large:m")
        assert buf.purge() == 7
        st = buf.stats()
        assert st["dropped"]["purged"] == 7 and st["quarantine"]["records"] == 0
        assert set(st["dropped"]) == {"age", "size", "disk_full", "purged", "uplink_removed", "corrupt",
                                      "quarantine_dropped"}


def test_the_oldest_records_age_is_told_in_seconds(path):
    now = time.time_ns() // 1_000_000
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["oldest_age_s"] is None and buf.stats()["oldest_ts_ms"] is None
        buf.append([NewRecord("s", b"a", now - 10_000, {}), NewRecord("s", b"b", now, {})])
        st = buf.stats()
        assert st["oldest_ts_ms"] == now - 10_000
        assert 10.0 <= st["oldest_age_s"] < 70.0


def test_a_read_of_one_record_steps_over_records_meant_for_another_cursor(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        seqs = buf.append(recs(2))
        buf.quarantine("a", seqs[0], "too_large:m")
        buf.quarantine("a", seqs[1], "too_large:m")
        buf.ack("a", seqs[-1])
        buf.ack("b", seqs[-1])
        assert buf.quarantine_retry("a") == 2             # seqs 3, 4: for `a` only
        buf.append(recs(1, start=7))                      # seq 5: for both
        assert [r.seq for r in buf.read("b", 1)] == [5]
        assert [r.seq for r in buf.read("a", 1)] == [3]
        assert buf.has_records("b") and not buf.has_records("b", after_seq=5)


def test_salvaged_records_every_uplink_was_owed_reach_an_uplink_added_later(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(5))
    damage_page_of(path, "sqlite_autoindex_streams_1")
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None and buf.stats()["salvaged"] == 5
        buf.register_cursor("new")                        # starts at the oldest record present
        assert ids(buf.read("new", 10)) == [0, 1, 2, 3, 4]
        assert ids(buf.read("a", 10)) == ids(buf.read("b", 10)) == [0, 1, 2, 3, 4]


def _clock_headers(offset_ns: int, boot: str) -> dict[str, str]:
    from buffer.core import CLOCK_BOOT_HEADER, CLOCK_HEADER, CLOCK_OFFSET_HEADER, CLOCK_UNSYNCED

    return {CLOCK_HEADER: CLOCK_UNSYNCED, CLOCK_OFFSET_HEADER: str(offset_ns), CLOCK_BOOT_HEADER: boot}


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


DAY_NS = 86400 * 10**9


def test_the_offset_of_an_earlier_boot_is_never_used_to_age_a_reading(path):
    # Read on this boot's monotonic clock, that offset would say "20 days old": but the
    # monotonic clock restarted since, so the age is unknown and the reading is kept.
    now_ns = time.time_ns()
    offset = now_ns - (time.monotonic_ns() - 20 * DAY_NS)
    with Buffer.open(path, settings(max_age_s=7 * 86400.0)) as buf:
        buf.register_cursor("c")
        buf.append([NewRecord("s", b"x", now_ns // 1_000_000, _clock_headers(offset, "another-boot"))])
        buf.append(recs(1))
        assert buf.stats()["dropped"]["age"] == 0 and buf.stats()["records"] == 2
        # The same stamp from this boot is measured, and it is old.
        buf.append([NewRecord("s", b"y", now_ns // 1_000_000, _clock_headers(offset, _boot_id()))])
        buf._next_age_check = 0
        buf.append(recs(1))
        assert buf.stats()["dropped"]["age"] == 0       # behind a reading of unknown age: waits


def test_quarantined_readings_of_an_unsynced_clock_age_by_the_corrected_time(path):
    # Stamped by a clock 10 days slow (same boot): 10 days old by ts_ms, seconds in truth.
    wall_ns = time.time_ns() - 10 * DAY_NS
    slow = _clock_headers(wall_ns - time.monotonic_ns(), _boot_id())
    old_ms = (time.time_ns() - 10 * DAY_NS) // 1_000_000
    with Buffer.open(path, settings(max_age_s=7 * 86400.0)) as buf:
        buf.register_cursor("c")
        seqs = buf.append([NewRecord("s", b"slow", wall_ns // 1_000_000, slow),
                           NewRecord("s", b"old", old_ms, {})])
        buf.quarantine("c", seqs[0], "too_large:m")
        buf.quarantine("c", seqs[1], "too_large:m")
        buf.ack("c", seqs[-1])
        buf._next_age_check = 0
        buf.append(recs(1))
        st = buf.stats()
        # The trusted 10-day-old copy goes; the slow-clock one is seconds old and stays.
        assert st["dropped"]["age"] == 1
        assert [q.payload for q in buf.quarantine_list("c")] == [b"slow"]
        # Once really older than max_age on the monotonic clock, it goes too (with the
        # record appended above, now 8 days old as well).
        buf._mono_ns = lambda: time.monotonic_ns() + 8 * DAY_NS
        buf._wall_ns = lambda: time.time_ns() + 8 * DAY_NS
        buf._next_age_check = 0
        buf.append(recs(1))
        assert buf.stats()["dropped"]["age"] == 3 and buf.quarantine_list("c") == []


def test_a_quarantined_reading_of_unknown_age_is_kept(path):
    # An unsynced stamp of an earlier boot: its ts_ms says 30 days, its real age is unknown.
    old_ms = (time.time_ns() - 30 * DAY_NS) // 1_000_000
    other_boot = _clock_headers(old_ms * 1_000_000 - time.monotonic_ns(), "another-boot")
    with Buffer.open(path, settings(max_age_s=7 * 86400.0)) as buf:
        buf.register_cursor("c")
        seqs = buf.append([NewRecord("s", b"unknown", old_ms, other_boot), NewRecord("s", b"old", old_ms, {})])
        for seq in seqs:
            buf.quarantine("c", seq, "too_large:m")
        buf.ack("c", seqs[-1])
        buf._next_age_check = 0
        buf.append(recs(1))
        assert buf.stats()["dropped"]["age"] == 1
        assert [q.payload for q in buf.quarantine_list("c")] == [b"unknown"]


def test_the_wal_file_is_cut_back_to_twice_the_checkpoint_size(path):
    s = settings(checkpoint_wal_bytes=64 * 1024)
    with Buffer.open(path, s) as buf:
        buf.register_cursor("c")
        buf.append(recs(1, size=1024 * 1024))          # one commit: a WAL of about 1 MiB
        assert buf.stats()["wal_size_bytes"] > 2 * s.checkpoint_wal_bytes
        buf.checkpoint("PASSIVE")                       # everything copied: the WAL restarts
        buf.append(recs(1, start=1))
        assert buf.stats()["wal_size_bytes"] == 2 * s.checkpoint_wal_bytes


def test_a_full_disk_lowers_the_limit_below_what_was_used(path):
    # SQLite met ENOSPC (here: the file may grow by 2 pages only): the limit becomes what
    # was used less a tenth, and at least 16 pages less, so the oldest records make room.
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        for i in range(10):
            buf.append(recs(40, start=i * 40, size=400))
        st = buf.stats()
        used, page = st["used_bytes"], st["page_size"]
        assert used // 10 < 16 * page
        pages = buf._conn.execute("PRAGMA page_count").fetchone()[0]
        buf._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        buf.append(recs(40, start=400, size=400))
        st = buf.stats()
        assert (st["limit_reason"], st["limit_bytes"]) == ("disk_full", used - 16 * page)
        assert st["dropped"]["disk_full"] > 0 and st["last_seq"] == 440
        # The pages the drop freed went back to the filesystem (a WAL that cannot grow is
        # not helped by free pages inside the file): the file is smaller than before.
        assert st["free_pages"] <= 2 and st["file_size_bytes"] < used


def test_normal_sync_interval_is_at_most_a_minute():
    assert settings(synchronous="normal", normal_sync_interval_s=60).normal_sync_interval_s == 60
    with pytest.raises(ValueError, match="normal_sync_interval_s must be in"):
        settings(synchronous="normal", normal_sync_interval_s=60.5)


def test_quarantine_figures_per_reason_keep_dotted_reasons_whole(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        seqs = buf.append(recs(3, size=100))
        buf.quarantine("c", seqs[0], "held:plant.telemetry.v2")
        buf.quarantine("c", seqs[1], "held:plant.telemetry.v2")
        buf.quarantine("c", seqs[2], "too_large:m")
        q = buf.stats()["quarantine"]
        assert q["total_by_reason"] == {"held:plant.telemetry.v2": 2, "too_large:m": 1}
        assert (q["records"], q["bytes"]) == (3, 300)
        assert q["by_cursor_reason"] == {"c": {"held:plant.telemetry.v2": 2, "too_large:m": 1}}
        # An empty list of seqs selects nothing (not everything, not an error).
        assert buf.quarantine_list("c", seqs=[]) == []
        assert buf.quarantine_drop("c", seqs=[]) == 0
        assert buf.stats()["quarantine"]["records"] == 3


def test_purging_one_cursor_takes_its_quarantined_copies_and_counts_what_was_present(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(10, size=1000))
        buf.quarantine("a", 10, "too_large:m")            # the newest: not dropped below
        # The cap drops the oldest records under both cursors' positions (acked 0).
        buf.settings = settings(max_size_bytes=buf.stats()["used_bytes"] - 1)
        buf.append(recs(1, start=10, size=1000))
        st = buf.stats()
        present = st["records"]
        assert st["dropped"]["size"] > 0 and st["cursors"]["a"]["records"] == present
        assert st["quarantine"]["records"] == 1
        assert buf.purge("a") == present + 1
        st = buf.stats()
        assert st["cursors"]["a"]["records"] == 0 and st["quarantine"]["records"] == 0
        assert st["cursors"]["b"]["records"] == present


def test_size_drops_take_the_quarantined_copies_of_the_records_they_drop(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        seqs = buf.append(recs(10, size=1000))
        buf.quarantine("c", seqs[1], "too_large:m")       # among the oldest
        buf.quarantine("c", seqs[9], "too_large:m")       # the newest: stays
        buf.settings = settings(max_size_bytes=buf.stats()["used_bytes"] - 1)
        buf.append(recs(1, start=10, size=1000))
        st = buf.stats()
        assert st["dropped"]["size"] >= 3                 # records 1.. and the copy of seq 2
        assert [q.seq for q in buf.quarantine_list("c")] == [seqs[9]]


def test_max_age_is_exact_to_the_second(path):
    now = time.time_ns() // 1_000_000
    with Buffer.open(path, settings(max_age_s=1000.0)) as buf:
        buf.register_cursor("c")
        buf.append([NewRecord("s", b"old", now - 1_000_500, {}), NewRecord("s", b"young", now - 990_000, {})])
        buf._next_age_check = 0
        buf.append(recs(1))
        assert buf.stats()["dropped"]["age"] == 1
        assert [r.payload for r in buf.read("c", 1)] == [b"young"]


def test_only_appended_records_count_as_unsynced(path):
    with Buffer.open(path, settings(synchronous="normal", normal_sync_interval_s=60)) as buf:
        buf.register_cursor("c")
        buf.append(recs(5))
        assert buf.stats()["unsynced_records"] == 5
        buf.ack("c", 3)
        buf.quarantine("c", 4, "too_large:m")
        assert buf.stats()["unsynced_records"] == 5
        buf.sync()
        assert buf.stats()["unsynced_records"] == 0


def test_the_cost_of_removing_uplinks_from_an_empty_buffer():
    from buffer.core import dropped_by_cursor_change

    empty = {"cursors": {"a": {"acked_seq": 5}, "b": {"acked_seq": 3}}, "last_seq": 5, "first_seq": None}
    assert dropped_by_cursor_change(empty, ["a"]) == 0
    held = {"cursors": {"a": {"acked_seq": 5}, "b": {"acked_seq": 3}}, "last_seq": 5, "first_seq": 4}
    assert dropped_by_cursor_change(held, ["a"]) == 2


def test_a_recovery_while_running_says_where_the_file_went_and_counts_what_it_lost(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(300))
        buf.ack("mqtt", 100)
    with Buffer.open(path, settings(check_on_open="none")) as buf:
        damage_page_of(path, "records")
        moved = buf.recover()
        assert buf.moved_aside == moved and corrupt_copies(path) == [moved]
        st = buf.stats()
        assert st["moved_aside_this_run"] == moved and st["corrupt_files_moved"] == 1
        # No record of the old file could be read: the 200 the uplink still owed are lost,
        # counted; the numbering goes on after them.
        assert (st["salvaged"], st["dropped"]["corrupt"], st["records"]) == (0, 200, 0)
        assert st["last_seq"] >= 300 and list(st["cursors"]) == ["mqtt"]
        assert buf.append(recs(1, start=7))[0] > 300
