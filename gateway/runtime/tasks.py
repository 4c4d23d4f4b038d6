"""Owned asyncio tasks: every long-running task has a name, an owner and a restart policy.

A crash in one bus's or uplink's task is logged once, counted, and the task is restarted
with capped exponential backoff and jitter; the other tasks never notice. Stopping the owner
cancels every task and awaits it, so nothing outlives the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.backoff import Backoff
from common.logs import fields

log = logging.getLogger("outpost.tasks")


@dataclass
class TaskInfo:
    name: str
    factory: Callable[[], Awaitable[None]]
    restart: bool
    task: asyncio.Task[None] | None = None
    crashes: int = 0
    restarts: int = 0
    last_error: str = ""
    last_crash_ts: float = 0.0
    state: str = "starting"  # running | backoff | stopped | failed | done
    next_delay_s: float = 0.0  # the backoff before the last restart (it grows while crashing)
    started_at: float = field(default_factory=time.time)


class TaskOwner:
    def __init__(self, *, backoff_min_s: float = 1.0, backoff_max_s: float = 60.0,
                 rand: Callable[[], float] | None = None) -> None:
        self._tasks: dict[str, TaskInfo] = {}
        self._backoff_min = backoff_min_s
        self._backoff_max = backoff_max_s
        self._rand = rand  # the backoff's jitter source (tests pass a fixed one)
        self._stopping = False

    def start(self, name: str, factory: Callable[[], Awaitable[None]], *, restart: bool = True) -> None:
        """Run `factory()` as a task named `name`; restart it when it crashes (not when cancelled)."""
        if name in self._tasks and self._tasks[name].task and not self._tasks[name].task.done():
            raise RuntimeError(f"task {name!r} is already running")
        info = TaskInfo(name=name, factory=factory, restart=restart)
        self._tasks[name] = info
        info.task = asyncio.create_task(self._guard(info), name=f"outpost:{name}")

    async def _guard(self, info: TaskInfo) -> None:
        backoff = (Backoff(self._backoff_min, self._backoff_max) if self._rand is None
                   else Backoff(self._backoff_min, self._backoff_max, rand=self._rand))
        while True:
            info.state = "running"
            started = time.monotonic()
            try:
                await info.factory()
                info.state = "done"
                return
            except asyncio.CancelledError:
                info.state = "stopped"
                raise
            except Exception as e:
                info.crashes += 1
                info.last_error = f"{type(e).__name__}: {e}"
                info.last_crash_ts = time.time()
                # A task that ran for a while before crashing starts its backoff over.
                if time.monotonic() - started > self._backoff_max:
                    backoff.reset()
                if not info.restart or self._stopping:
                    info.state = "failed"
                    log.error("task failed", extra=fields(task=info.name, reason=info.last_error), exc_info=e)
                    return
                first = backoff.attempt == 0
                delay = backoff.next()
                info.next_delay_s = delay
                log.error("task crashed, restarting", extra=fields(
                    task=info.name, crashes=info.crashes, restart_in_s=round(delay, 3),
                    reason=info.last_error), exc_info=first and e)
                info.state = "backoff"
                await asyncio.sleep(delay)
                info.restarts += 1

    async def stop(self, name: str, timeout_s: float = 10.0) -> None:
        info = self._tasks.pop(name, None)
        if info is None or info.task is None:
            return
        info.task.cancel()
        await asyncio.wait([info.task], timeout=timeout_s)

    async def stop_all(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        tasks = [i.task for i in self._tasks.values() if i.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for t in pending:
                log.error("task did not stop in time", extra=fields(task=t.get_name(), seconds=timeout_s))
        self._tasks.clear()

    def names(self) -> list[str]:
        return list(self._tasks)

    def status(self) -> dict[str, dict[str, object]]:
        return {
            name: {
                "state": i.state,
                "crashes": i.crashes,
                "restarts": i.restarts,
                "last_error": i.last_error,
            }
            for name, i in self._tasks.items()
        }
