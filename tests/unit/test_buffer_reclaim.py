"""Acked records are retired at once and their rows reclaimed later: what may not change.

An ack makes a record gone for every observer (counts, reads, exports, a new cursor) in
its own transaction; only the row's deletion waits for `reclaim` (idle time, or space
needed). These tests look at the file itself, so they fail if a retired row is ever seen
as live, or if a live record is dropped or refused while a retired row holds its space.
"""

from __future__ import annotations

import asyncio
import io
import sqlite3

import pytest

from buffer import AsyncBuffer, Buffer, asyncbuf, diagnostics
from tests.unit.test_buffer_core import recs, settings


def rows_in_file(path: str) -> list[int]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT seq FROM records ORDER BY seq")]


def test_an_ack_retires_at_once_and_reclaim_deletes_the_rows_in_steps(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append(recs(10))
        buf.ack("a", 6)
        assert buf.reclaimable() == 0           # b still needs them all
        buf.ack("b", 4)
        st = buf.stats()
        assert (st["records"], st["first_seq"], st["reclaimable_records"]) == (6, 5, 4)
        assert st["bytes"] == 6 * 200
        assert rows_in_file(path) == list(range(1, 11))   # only retired, not deleted yet
        assert [r.seq for r in buf.read("b", 100)] == [5, 6, 7, 8, 9, 10]
        assert buf.reclaim(3) == 3 and rows_in_file(path)[0] == 4
        assert buf.reclaim() == 1 and rows_in_file(path) == list(range(5, 11))
        assert buf.reclaim() == 0
        assert buf.stats()["records"] == 6


def test_retired_rows_stay_retired_across_a_reopen_and_for_a_new_cursor(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.append(recs(10))
        buf.ack("a", 7)
    with Buffer.open(path, settings()) as buf:
        st = buf.stats()
        assert (st["records"], st["first_seq"], st["bytes"]) == (3, 8, 3 * 200)
        assert buf.reclaimable() == 7
        buf.register_cursor("late")             # starts at the oldest live record
        assert [r.seq for r in buf.read("late", 100)] == [8, 9, 10]
        buf.ack("a", 10)
        buf.ack("late", 10)
    with Buffer.open(path, settings()) as buf:
        assert (buf.stats()["records"], buf.reclaimable()) == (0, 10)
        assert buf.append(recs(1)) == [11]
        assert [r.seq for r in buf.read("a", 100)] == [11]


def test_the_last_cursor_unregistered_takes_the_retired_rows_with_it(path):
    # Without cursors every row in the file is live again (nothing says it was passed).
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.append(recs(5))
        buf.ack("a", 3)
        buf.unregister_cursor("a")
        assert rows_in_file(path) == [4, 5]
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["records"] == 2
        buf.register_cursor("b")
        assert [r.seq for r in buf.read("b", 100)] == [4, 5]


@pytest.mark.parametrize("when_full", ["drop_oldest", "block"])
def test_space_held_by_retired_rows_is_taken_before_any_live_record(path, when_full):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append(recs(200, size=1000))
        buf.ack("c", 190)
        used = buf.stats()["used_bytes"]
        # The cap now leaves no room for 50 more records unless the retired rows go.
        buf.settings = settings(max_size_bytes=used + 10_000, when_full=when_full)
        buf.append(recs(50, start=200, size=1000))
        st = buf.stats()
        assert st["dropped"]["size"] == 0 and st["blocked"] is None
        assert [r.seq for r in buf.read("c", 1000)] == list(range(191, 251))
        assert buf.reclaimable() == 0


def test_offline_stats_and_export_do_not_show_retired_records(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.append(recs(6))
        buf.ack("a", 4)
        live = {k: buf.stats()[k] for k in ("records", "first_seq", "bytes", "oldest_ts_ms")}
        assert buf.reclaimable() == 4
        st = diagnostics.stats_for_path(path)
        assert {k: st[k] for k in live} == live
        assert st["reclaimable_records"] == 4 and st["cursors"]["a"]["records"] == 2
        assert [r.seq for r in diagnostics.iter_records(path)] == [5, 6]
        out = io.StringIO()
        assert diagnostics.export_jsonl(path, out) == 2
        assert diagnostics.export_span(path) == (4, 6)
        buf.ack("a", 6)
        st = diagnostics.stats_for_path(path)
        assert (st["records"], st["first_seq"], st["oldest_ts_ms"]) == (0, None, None)
        assert list(diagnostics.iter_records(path)) == []


async def test_the_async_buffer_reclaims_once_nothing_calls_it(path, monkeypatch):
    monkeypatch.setattr(asyncbuf, "RECLAIM_ROWS", 7)   # several transactions
    abuf = await AsyncBuffer.open(path, settings())
    try:
        await abuf.register_cursor("c")
        await abuf.append(recs(30))
        await abuf.ack("c", 25)
        assert len(rows_in_file(path)) == 30 and (await abuf.stats())["records"] == 5
        for _ in range(200):
            if (await abuf.stats())["reclaimable_records"] == 0:
                break
            await asyncio.sleep(asyncbuf.RECLAIM_IDLE_S * 2)
        assert rows_in_file(path) == list(range(26, 31))
    finally:
        await abuf.close()


async def test_close_does_not_wait_for_a_large_reclaim_and_loses_nothing(path):
    abuf = await AsyncBuffer.open(path, settings())
    await abuf.register_cursor("c")
    await abuf.append(recs(50_000, size=20))
    await abuf.ack("c", 49_990)
    await abuf.close()          # right away: at most one step of reclaim ran
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["records"] == 10
        assert [r.seq for r in buf.read("c", 100)] == list(range(49_991, 50_001))
        assert buf.reclaimable() + 10 == len(rows_in_file(path))


async def test_a_buffer_never_idle_still_reclaims_a_step_at_a_time(path, monkeypatch):
    monkeypatch.setattr(asyncbuf, "RECLAIM_ROWS", 10)
    monkeypatch.setattr(asyncbuf, "RECLAIM_FORCE_S", 0.1)
    abuf = await AsyncBuffer.open(path, settings())
    try:
        await abuf.register_cursor("c")
        await abuf.append(recs(30))
        await abuf.ack("c", 30)
        for _ in range(1000):   # a call every 5 ms: never RECLAIM_IDLE_S without one
            if (await abuf.stats())["reclaimable_records"] == 0:
                break
            await asyncio.sleep(0.005)
        assert rows_in_file(path) == []
    finally:
        await abuf.close()
