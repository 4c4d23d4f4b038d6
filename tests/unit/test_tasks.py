"""Task owner: a crashing task is restarted with backoff and never takes the others down."""

import asyncio

from gateway.runtime.tasks import TaskOwner


async def test_crashing_task_restarts_and_others_keep_running() -> None:
    owner = TaskOwner(backoff_min_s=0.01, backoff_max_s=0.05)
    ticks = {"healthy": 0, "flaky": 0}

    async def healthy() -> None:
        while True:
            ticks["healthy"] += 1
            await asyncio.sleep(0.005)

    async def flaky() -> None:
        ticks["flaky"] += 1
        raise RuntimeError("device task blew up")

    owner.start("healthy", healthy)
    owner.start("flaky", flaky)
    await asyncio.sleep(0.3)
    st = owner.status()
    assert st["flaky"]["crashes"] >= 3
    assert st["flaky"]["restarts"] >= 2
    assert "device task blew up" in st["flaky"]["last_error"]
    assert st["healthy"]["state"] == "running" and st["healthy"]["crashes"] == 0
    before = ticks["healthy"]
    await asyncio.sleep(0.05)
    assert ticks["healthy"] > before
    await owner.stop_all()
    assert owner.names() == []


async def test_no_restart_task_fails_once() -> None:
    owner = TaskOwner(backoff_min_s=0.01)
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad")

    owner.start("once", once, restart=False)
    await asyncio.sleep(0.05)
    assert calls == 1 and owner.status()["once"]["state"] == "failed"
    await owner.stop_all()


async def test_stop_all_cancels_and_awaits() -> None:
    owner = TaskOwner()
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()

    owner.start("forever", forever)
    await asyncio.sleep(0)
    await owner.stop_all(timeout_s=1)
    assert cancelled.is_set()
