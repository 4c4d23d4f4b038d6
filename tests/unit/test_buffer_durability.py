"""Checkpoints never stall the writer on a pinned WAL (issue 11 item 9), the WAL is cut
back once the pin goes, and synchronous="normal" fsyncs the WAL within its documented
window (issue 19; the power-loss proof is tests/e2e/powerloss.py on LazyFS)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time

import pytest

from buffer import AsyncBuffer, Buffer, BufferSettings, NewRecord

NOW = time.time_ns() // 1_000_000


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=256 * 1024 * 1024, max_age_s=86400.0)
    base.update(kw)
    return BufferSettings(**base)


def recs(n: int, size: int = 1000) -> list[NewRecord]:
    return [NewRecord("s", b"x" * size, NOW, {}) for _ in range(n)]


def test_a_reader_pinning_the_wal_does_not_stall_the_writer(path):
    s = settings(checkpoint_wal_bytes=64 * 1024, wal_max_bytes=256 * 1024)
    buf = Buffer.open(path, s)
    buf.register_cursor("c")
    buf.append(recs(10))
    # A field engineer's `sqlite3` shell: a real second connection in a read transaction.
    holding = threading.Event()
    release = threading.Event()
    writer_done_while_held = threading.Event()

    def reader() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN")
        conn.execute("SELECT count(*) FROM records").fetchone()
        holding.set()
        release.wait(60)
        conn.execute("COMMIT")
        conn.close()

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert holding.wait(10)
        # Well past wal_max_bytes: the old code waited 5 s in a TRUNCATE checkpoint on
        # every checkpoint from here, i.e. dozens of times before the reader lets go.
        for _ in range(40):
            buf.append(recs(50))
        if not release.is_set():
            writer_done_while_held.set()
        st = buf.stats()
        assert st["wal_pinned"] is True
        assert st["last_checkpoint"]["mode"] == "PASSIVE"
        assert st["wal_size_bytes"] > s.wal_max_bytes        # it grew while pinned
    finally:
        release.set()
        t.join()
    assert writer_done_while_held.is_set()
    # The pin is gone: the next maintenance after a write copies everything and cuts the
    # WAL file back, without a restart.
    buf._next_pin_check = 0
    buf.append(recs(1))
    st = buf.stats()
    assert st["wal_pinned"] is False
    assert st["wal_size_bytes"] <= 2 * s.checkpoint_wal_bytes
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 10 + 40 * 50 + 1
    conn.close()
    buf.close()


def test_normal_mode_syncs_after_enough_records(path):
    s = settings(synchronous="normal", normal_sync_records=100, normal_sync_interval_s=60)
    with Buffer.open(path, s) as buf:
        buf.append(recs(60, size=10))
        assert buf.stats()["unsynced_records"] == 60
        assert buf.sync_due_in() is not None
        buf.append(recs(60, size=10))          # 120 >= 100: synced before returning
        assert buf.stats()["unsynced_records"] == 0
        assert buf.sync_due_in() is None


def test_normal_mode_fsyncs_the_wal(path, monkeypatch):
    synced: list[int] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real(fd)

    s = settings(synchronous="normal", normal_sync_records=10, normal_sync_interval_s=60)
    with Buffer.open(path, s) as buf:
        monkeypatch.setattr(os, "fsync", spy)
        buf.append(recs(10, size=10))
        assert os.stat(path + "-wal").st_ino in synced


async def test_normal_mode_timer_syncs_an_idle_buffer(path):
    s = settings(synchronous="normal", normal_sync_records=10_000, normal_sync_interval_s=0.2)
    async with await AsyncBuffer.open(path, s) as abuf:
        await abuf.append(recs(5, size=10))
        assert (await abuf.stats())["unsynced_records"] == 5
        # No further commit comes: the timer alone must sync (the window is ~0.2 s).
        for _ in range(200):
            await asyncio.sleep(0.05)
            if (await abuf.stats())["unsynced_records"] == 0:
                break
        assert (await abuf.stats())["unsynced_records"] == 0


def test_full_mode_has_nothing_unsynced(path):
    with Buffer.open(path, settings()) as buf:
        buf.append(recs(5, size=10))
        assert buf.stats()["unsynced_records"] == 0 and buf.sync_due_in() is None


def test_sync_settings_are_checked():
    with pytest.raises(ValueError, match="normal_sync_interval_s"):
        settings(normal_sync_interval_s=0)
    with pytest.raises(ValueError, match="normal_sync_records"):
        settings(normal_sync_records=0)
