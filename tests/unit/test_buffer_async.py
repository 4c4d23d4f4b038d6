"""AsyncBuffer: SQLite on its own thread, wake-ups for waiting uplinks, blocking appends."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time

import pytest

from buffer import AsyncBuffer, BufferClosed, BufferFull, BufferSettings, NewRecord

NOW = time.time_ns() // 1_000_000


def recs(n: int, size: int = 200) -> list[NewRecord]:
    return [NewRecord("g/e/d", b"p" * size, NOW, {"type": "DDATA"}) for _ in range(n)]


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=64 * 1024 * 1024, max_age_s=86400.0, when_full="drop_oldest")
    base.update(kw)
    return BufferSettings(**base)


def buffer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("outpost-buffer")]


async def test_roundtrip_runs_on_one_dedicated_thread(tmp_path):
    abuf = await AsyncBuffer.open(tmp_path / "b.db", settings())
    try:
        await abuf.register_cursor("mqtt")
        await abuf.register_cursor("old-uplink")
        await abuf.unregister_cursor("old-uplink")
        assert await abuf.cursors() == ["mqtt"]
        assert await abuf.append(recs(3)) == [1, 2, 3]
        got = await abuf.read("mqtt", 10)
        assert [r.seq for r in got] == [1, 2, 3]
        await abuf.ack("mqtt", 3)
        assert (await abuf.stats())["records"] == 0
        assert len(buffer_threads()) == 1
        # The connection belongs to that thread, not to the event loop's.
        with pytest.raises(sqlite3.ProgrammingError):
            abuf._buf.stats()
    finally:
        await abuf.close()
    assert buffer_threads() == []
    with pytest.raises(BufferClosed):
        await abuf.append(recs(1))


async def parked(abuf: AsyncBuffer) -> None:
    """Return once a task started just before has made its buffer call and is waiting.

    The buffer runs calls one at a time, in order, on its one thread: when a call queued now
    returns, the earlier task's call has returned too and that task has run on to its wait.
    """
    await asyncio.sleep(0)          # let the task start and queue its call
    await abuf.stats()
    await asyncio.sleep(0)


async def test_wait_for_records_wakes_on_append_and_times_out(tmp_path):
    async with await AsyncBuffer.open(tmp_path / "b.db", settings()) as abuf:
        await abuf.register_cursor("kafka")
        assert await abuf.wait_for_records("kafka", 0.05) is False
        waiter = asyncio.create_task(abuf.wait_for_records("kafka", 30.0))
        await parked(abuf)
        assert not waiter.done()      # it looked, found nothing and waits for an append
        await abuf.append(recs(1))
        assert await asyncio.wait_for(waiter, 5.0) is True
        # Already pending: returns at once; read-ahead past the newest record waits.
        assert await abuf.wait_for_records("kafka", 0.0) is True
        assert await abuf.wait_for_records("kafka", 0.05, after_seq=1) is False


async def test_block_policy_waits_for_acks_to_free_space(tmp_path):
    s = settings(max_size_bytes=128 * 1024, when_full="block")
    async with await AsyncBuffer.open(tmp_path / "b.db", s) as abuf:
        await abuf.register_cursor("c")
        last = 0
        with pytest.raises(BufferFull):
            for _ in range(100):
                last = (await abuf.append(recs(50)))[-1]
        blocked = asyncio.create_task(abuf.append(recs(50), block_timeout_s=30.0))
        await parked(abuf)
        assert not blocked.done()     # refused once, now waiting for an ack
        assert (await abuf.stats())["blocked"] == "size"
        await abuf.ack("c", last)
        seqs = await asyncio.wait_for(blocked, 5.0)
        assert seqs[0] == last + 1
        with pytest.raises(BufferFull):
            for _ in range(100):
                await abuf.append(recs(50), block_timeout_s=0.05)


async def test_open_failure_leaves_no_thread(tmp_path):
    async with await AsyncBuffer.open(tmp_path / "b.db", settings()):
        with pytest.raises(Exception, match="in use"):
            await AsyncBuffer.open(tmp_path / "b.db", settings())
        assert len(buffer_threads()) == 1
    assert buffer_threads() == []
