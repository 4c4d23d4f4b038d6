"""Task owner: a crashing task is restarted with backoff and never takes the others down."""

import asyncio
import logging

from gateway.runtime.tasks import TaskOwner


async def test_crashing_task_restarts_and_others_keep_running(caplog) -> None:
    owner = TaskOwner(backoff_min_s=0.01, backoff_max_s=0.04, rand=lambda: 1.0)  # jitter at its top
    ticks = {"healthy": 0, "flaky": 0}
    six_crashes = asyncio.Event()
    healthy_moved = asyncio.Event()
    watch_from = None

    async def healthy() -> None:
        while True:
            ticks["healthy"] += 1
            if watch_from is not None and ticks["healthy"] > watch_from + 3:
                healthy_moved.set()
            await asyncio.sleep(0.005)

    async def flaky() -> None:
        ticks["flaky"] += 1
        if ticks["flaky"] == 6:
            six_crashes.set()
        raise RuntimeError("device task blew up")

    with caplog.at_level(logging.ERROR, logger="outpost.tasks"):
        owner.start("healthy", healthy)
        owner.start("flaky", flaky)
        await asyncio.wait_for(six_crashes.wait(), 30)
        st = owner.status()
        assert st["flaky"]["crashes"] >= 6 and st["flaky"]["restarts"] >= 5
        assert "device task blew up" in st["flaky"]["last_error"]
        assert st["healthy"]["state"] == "running" and st["healthy"]["crashes"] == 0
        # The healthy task goes on while the other one keeps crashing.
        watch_from = ticks["healthy"]
        await asyncio.wait_for(healthy_moved.wait(), 30)
        await owner.stop_all()
    assert owner.names() == []
    # The delays chosen (from the log lines, the observable state): the one backoff's range
    # doubles from the minimum and stops at the maximum (jitter pinned to its top here).
    delays = [r.outpost_fields["restart_in_s"] for r in caplog.records
              if r.getMessage() == "task crashed, restarting" and r.outpost_fields["task"] == "flaky"]
    assert len(delays) >= 5
    assert delays[:5] == [0.02, 0.04, 0.04, 0.04, 0.04], delays


async def test_no_restart_task_fails_once() -> None:
    owner = TaskOwner(backoff_min_s=0.01)
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad")

    owner.start("once", once, restart=False)
    # Waits for the state, not for a duration: a restarting task goes to "backoff" instead.
    for _ in range(1000):
        if owner.status()["once"]["state"] != "starting" and owner.status()["once"]["state"] != "running":
            break
        await asyncio.sleep(0.005)
    assert owner.status()["once"]["state"] == "failed"
    assert calls == 1 and owner.status()["once"]["crashes"] == 1
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
