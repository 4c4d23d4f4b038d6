"""The buffer heals from any caller and never abandons records silently (issue 11):
corruption met by a read or an ack recovers like an append does, the readable records of
a moved-aside file are salvaged (counted), and removing an uplink drops its backlog only
with a counted reason."""

from __future__ import annotations

import logging
import os
import sqlite3
import time

import pytest

from buffer import AsyncBuffer, Buffer, BufferCorrupt, BufferSettings, NewRecord
from buffer.core import dropped_by_cursor_change
from buffer.diagnostics import stats_for_path, uplink_removal_cost

NOW = time.time_ns() // 1_000_000


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=64 * 1024 * 1024, max_age_s=86400.0)
    base.update(kw)
    return BufferSettings(**base)


def recs(n: int, start: int = 0, size: int = 200) -> list[NewRecord]:
    return [NewRecord("g/n/d1", (b"%08d" % (start + i)).ljust(size, b"."), NOW, {"k": "v"})
            for i in range(n)]


def damage_middle_page(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek((size // 2) // 4096 * 4096)
        f.write(b"\xff" * 4096)


def damage_index_page(path: str) -> None:
    """Garbage over the page of an index: quick_check fails, every record stays readable."""
    conn = sqlite3.connect(path)
    root = conn.execute("SELECT rootpage FROM sqlite_schema "
                        "WHERE name = 'sqlite_autoindex_streams_1'").fetchone()[0]
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(path, "r+b") as f:
        f.seek((root - 1) * page)
        f.write(b"\xa5" * page)


def ids(records) -> list[int]:
    return [int(r.payload[:8]) for r in records]


async def drain(abuf: AsyncBuffer, cursor: str) -> list[int]:
    got: list[int] = []
    while batch := await abuf.read(cursor, 500):
        got += ids(batch)
        await abuf.ack(cursor, batch[-1].seq)
    return got


@pytest.mark.parametrize("first_call", ["read", "ack"])
async def test_corruption_met_by_a_read_or_an_ack_recovers_and_salvages(path, first_call):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(2000))
        buf.ack("mqtt", 1)      # a cursor that had delivered record 1 already
    # Opened without the quick check, the damage is only met by the first read or ack.
    s = settings(check_on_open="none")
    async with await AsyncBuffer.open(path, s) as abuf:
        damage_middle_page(path)
        await abuf.append(recs(5, start=5000))           # appends still work
        with pytest.raises(BufferCorrupt) as info:
            if first_call == "read":
                while batch := await abuf.read("mqtt", 1000):
                    await abuf.ack("mqtt", batch[-1].seq)
            else:
                await abuf.ack("mqtt", 1500)
        assert info.value.recovered and info.value.retriable
        # The same uplink goes on with the salvaged records of the moved file.
        got = await drain(abuf, "mqtt")
        st = await abuf.stats()
    assert st["corrupt_files_moved"] == 1
    salvaged, lost = st["salvaged"], st["dropped"]["corrupt"]
    assert salvaged > 1500 and lost > 0
    # Every record the cursor still owed is accounted for: delivered or counted lost.
    if first_call == "ack":
        assert len(got) == salvaged and salvaged + lost == 2004
    assert set(got) <= set(range(1, 2000)) | set(range(5000, 5005))
    assert got == sorted(got)                # order kept


def test_salvage_sends_each_record_only_to_the_uplinks_that_still_owed_it(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(3000))
        buf.ack("mqtt", 2500)
        buf.ack("kafka", 1000)
        last_seq = buf.stats()["last_seq"]
    damage_index_page(path)
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None
        st = buf.stats()
        assert st["salvaged"] == 2000 and st["dropped"]["corrupt"] == 0
        assert st["first_seq"] > last_seq       # seqs continue, never reused
        mqtt = ids(buf.read("mqtt", 5000))
        kafka = ids(buf.read("kafka", 5000))
        assert mqtt == list(range(2500, 3000))
        assert kafka == list(range(1000, 3000))


def test_salvage_brings_back_what_the_old_file_had_in_quarantine(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        seqs = buf.append(recs(100))
        for seq in seqs[:30]:
            buf.quarantine("mqtt", seq, "held:spBv1.0/g/DDATA/n/d1")  # a refused topic's records
        buf.ack("mqtt", seqs[-1])
        buf.ack("kafka", seqs[-1])
        assert buf.stats()["records"] == 0 and buf.stats()["quarantine"]["records"] == 30
    damage_index_page(path)
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside is not None
        st = buf.stats()
        # Not lost without a count: back to their uplink (which holds them again if still
        # refused), and counted as salvaged.
        assert st["salvaged"] == 30 and st["dropped"]["corrupt"] == 0
        assert ids(buf.read("mqtt", 100)) == list(range(30))
        assert buf.read("kafka", 100) == []


def test_salvage_from_a_damaged_page_counts_what_it_could_not_read(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(3000))
    damage_middle_page(path)
    with Buffer.open(path, settings()) as buf:
        st = buf.stats()
        got = ids(buf.read("mqtt", 5000))
    assert len(got) == st["salvaged"] == st["records"]
    assert st["salvaged"] + st["dropped"]["corrupt"] == 3000
    assert 0 < st["dropped"]["corrupt"] < 100
    assert got == sorted(got) and len(set(got)) == len(got)


def test_an_interrupted_salvage_resumes_without_duplicates(path, monkeypatch):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(3500))
    damage_middle_page(path)
    real = Buffer._salvage_commit
    calls = []

    def crash_on_second(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real(self, *a, **kw)

    monkeypatch.setattr(Buffer, "_salvage_commit", crash_on_second)
    with pytest.raises(RuntimeError):
        Buffer.open(path, settings())
    monkeypatch.setattr(Buffer, "_salvage_commit", real)
    with Buffer.open(path, settings()) as buf:
        st = buf.stats()
        got = ids(buf.read("mqtt", 5000))
    assert len(set(got)) == len(got) == st["salvaged"]
    assert st["salvaged"] + st["dropped"]["corrupt"] == 3500
    # Salvaged once only: opening again changes nothing.
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["salvaged"] == st["salvaged"]


def test_garbage_moved_aside_salvages_nothing_and_is_not_retried(path):
    with open(path, "wb") as f:
        f.write(os.urandom(64 * 1024))
    with Buffer.open(path, settings()) as buf:
        assert buf.moved_aside and buf.stats()["salvaged"] == 0
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["salvaged"] == 0


def test_removing_an_uplink_drops_its_backlog_counted_and_logged(path, caplog):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(5000))
        buf.ack("mqtt", 5000)
        buf.quarantine("kafka", 7, "unknown_topic")
        st = buf.stats()
        # What `outpost check` / a reload would say before applying a new uplink set:
        assert dropped_by_cursor_change(st, {"mqtt"}) == 5000
        assert dropped_by_cursor_change(st, {"mqtt", "kafka"}) == 0
        assert dropped_by_cursor_change(st, {"mqtt", "kafka-new"}) == 0   # starts at oldest
        assert dropped_by_cursor_change(st, set()) == 0                   # records kept
        assert uplink_removal_cost(path, ["mqtt"]) == 5000
        with caplog.at_level(logging.WARNING, logger="outpost.buffer"):
            assert buf.unregister_cursor("kafka") == 5000 + 1
        st = buf.stats()
        assert st["records"] == 0 and st["quarantine"]["records"] == 0
        assert st["dropped"]["uplink_removed"] == 5001
    assert any("uplink_removed" in r.getMessage() and "records=5001" in r.getMessage()
               for r in caplog.records)
    assert stats_for_path(path)["dropped"]["uplink_removed"] == 5001


def test_removing_a_caught_up_uplink_drops_nothing(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(10))
        buf.ack("kafka", 10)
        assert dropped_by_cursor_change(buf.stats(), {"mqtt"}) == 0
        assert buf.unregister_cursor("kafka") == 0
        assert [r.seq for r in buf.read("mqtt")] == list(range(1, 11))
        assert buf.stats()["dropped"]["uplink_removed"] == 0


def test_a_buffer_holding_a_partial_salvage_is_itself_salvaged_without_duplicates(
        path, monkeypatch):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(3500))
    damage_index_page(path)                     # file X: every record readable
    real = Buffer._salvage_commit
    calls = []

    def crash_on_second(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return real(self, *a, **kw)

    monkeypatch.setattr(Buffer, "_salvage_commit", crash_on_second)
    with pytest.raises(RuntimeError):
        Buffer.open(path, settings())           # file Y got the first 1000 of X
    monkeypatch.setattr(Buffer, "_salvage_commit", real)
    damage_index_page(path)                     # now Y is corrupt too
    with Buffer.open(path, settings()) as buf:  # file Z: Y's records, then the rest of X
        got = ids(buf.read("mqtt", 10_000))
        assert buf.stats()["corrupt_files_moved"] == 2
    assert sorted(got) == list(range(3500)) and got == sorted(got)


async def test_read_with_meets_corruption_like_read_and_hands_over_new_maps_after(path):
    """The Kafka uplink caches routes by the stream and header-set ids of read_with's
    rows, valid while its maps are the same objects: after a recovery they are new."""
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("kafka")
        buf.append(recs(2000))
    async with await AsyncBuffer.open(path, settings(check_on_open="none")) as abuf:
        maps = await abuf.read_with("kafka", lambda rows, streams, hsets: (streams, hsets), 1)
        damage_middle_page(path)
        with pytest.raises(BufferCorrupt) as info:
            after = None
            while True:
                last = await abuf.read_with("kafka", lambda rows, s, h: rows[-1][0] if rows else None,
                                            1000, after_seq=after)
                if last is None:
                    break
                after = last
        assert info.value.recovered
        rows, streams, hsets = await abuf.read_with("kafka", lambda *a: a, 10)
        assert rows and streams is not maps[0] and hsets is not maps[1]
        assert all(streams[sid] == "g/n/d1" and hsets[hid] == {"k": "v"} for _, sid, _, hid, _ in rows)
