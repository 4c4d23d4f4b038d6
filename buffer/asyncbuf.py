"""The buffer for asyncio code: every SQLite call runs on one dedicated thread.

SQLite work blocks (fsync on every commit), so it never runs on the event loop. One
thread, not a pool, because the connection is thread-confined and commits are serial
anyway. The AsyncBuffer owns that thread: `close()` finishes the queued work, closes the
file and joins it.

A caller cancelled while its call runs on the thread does not undo the call: an append
that commits after its caller was cancelled is stored (and read again later), never lost.

Corruption met by any call (append, read, ack, ...) heals the buffer on the spot: the file
is moved aside, a fresh one takes its place and the readable records are salvaged into it
(`Buffer.recover`); the call then raises `BufferCorrupt` with `retriable=True` and
`recovered=True`, and the same call made again works on the new file.

With `synchronous="normal"`, a timer fsyncs the WAL `normal_sync_interval_s` after the
oldest unsynced commit, so an idle gateway does not leave its last commits unsynced.

Acks retire records; their rows are deleted (`Buffer.reclaim`) once no call has come for
`RECLAIM_IDLE_S`, `RECLAIM_ROWS` rows per transaction, so a call that arrives meanwhile
waits for one such transaction at most. A backlog drain bound by the CPU goes out first
and is cleaned up after; one bound by the link is cleaned up between its windows. A buffer
that is never idle that long still reclaims one transaction every `RECLAIM_FORCE_S`.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from buffer.core import Buffer, BufferSettings, NewRecord, QuarantinedRecord, Record, Row
from buffer.errors import BufferClosed, BufferCorrupt, BufferFull

T = TypeVar("T")

RECLAIM_IDLE_S = 0.05
RECLAIM_ROWS = 20_000  # about 10 ms of deletes on a desktop core, some 50 ms on a Pi 3
RECLAIM_FORCE_S = 1.0


class AsyncBuffer:
    """`Buffer`'s methods as coroutines, plus `wait_for_records` and blocking appends."""

    def __init__(self, executor: ThreadPoolExecutor, buf: Buffer) -> None:
        self._executor = executor
        self._buf = buf
        self.path = buf.path
        self.settings = buf.settings
        # Each generation's Event is set when records were appended (resp. acked, which
        # may free space) and then replaced, so waiters never miss a wake-up.
        self._appended = asyncio.Event()
        self._acked = asyncio.Event()
        self._closed = False
        self._generation = 0            # bumped by each recovery from corruption
        self.recoveries = 0
        self._sync_timer: asyncio.TimerHandle | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._calls = 0                 # calls queued or running on the thread
        self._last_call_end = 0.0       # loop time
        self._reclaim_timer: asyncio.TimerHandle | None = None
        self._reclaim_task: asyncio.Task[None] | None = None
        self._reclaim_since = 0.0       # loop time rows began waiting without a reclaim
        self._closing = False

    @classmethod
    async def open(cls, path: str | os.PathLike[str], settings: BufferSettings) -> AsyncBuffer:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outpost-buffer")
        loop = asyncio.get_running_loop()
        try:
            buf = await loop.run_in_executor(executor, Buffer.open, path, settings)
        except BaseException:
            executor.shutdown(wait=True)
            raise
        return cls(executor, buf)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise BufferClosed(f"{self.path}: buffer is closed")
        loop = asyncio.get_running_loop()
        generation = self._generation
        self._calls += 1
        try:
            result = await loop.run_in_executor(self._executor,
                                                functools.partial(fn, *args, **kwargs))
        except BufferCorrupt as e:
            if self._closed:
                raise
            moved = await loop.run_in_executor(self._executor, self._recover, generation)
            err = BufferCorrupt(f"{e}; the buffer recovered: "
                                f"{f'file moved to {moved}, ' if moved else ''}readable records "
                                f"salvaged; retry the call", retriable=True)
            err.recovered = True
            raise err from e
        finally:
            self._calls -= 1
            self._last_call_end = loop.time()
            self._arm_reclaim()
        self._arm_sync_timer()
        return result

    def _arm_reclaim(self) -> None:
        if (self._reclaim_timer is not None or self._reclaim_task is not None or self._closing
                or self._buf.reclaimable() == 0):   # a plain attribute read, safe here
            return
        loop = asyncio.get_running_loop()
        if not self._reclaim_since:
            self._reclaim_since = loop.time()
        self._reclaim_timer = loop.call_later(RECLAIM_IDLE_S, self._reclaim_tick)

    def _idle_for(self) -> float:
        """Seconds the buffer's thread has had no call (0 while one is queued or runs)."""
        if self._calls:
            return 0.0
        return asyncio.get_running_loop().time() - self._last_call_end

    def _reclaim_tick(self) -> None:
        self._reclaim_timer = None
        if self._closing:
            return
        loop = asyncio.get_running_loop()
        wait = RECLAIM_IDLE_S - self._idle_for()
        forced = loop.time() - self._reclaim_since >= RECLAIM_FORCE_S
        if wait > 0 and not forced:
            self._reclaim_timer = loop.call_later(wait, self._reclaim_tick)
            return
        self._reclaim_task = loop.create_task(self._reclaim_idle(forced))

    async def _reclaim_idle(self, forced: bool) -> None:
        """Delete retired rows a transaction at a time while no call comes in (the first
        one regardless when `forced`)."""
        loop = asyncio.get_running_loop()
        try:
            while (not self._closing and self._buf.reclaimable()
                   and (forced or self._idle_for() >= RECLAIM_IDLE_S)):
                forced = False
                await loop.run_in_executor(self._executor, self._buf.reclaim, RECLAIM_ROWS)
                self._reclaim_since = loop.time()
        except Exception:   # corruption, I/O: the next call meets it and handles it
            pass
        finally:
            self._reclaim_task = None
            if not self._buf.reclaimable():
                self._reclaim_since = 0.0
        self._arm_sync_timer()
        self._arm_reclaim()

    def _recover(self, generation: int) -> str | None:
        """On the buffer thread: recover once per corruption, however many calls met it."""
        if generation != self._generation:
            return None         # an earlier call already moved the file aside
        moved = self._buf.recover()
        self._generation += 1
        self.recoveries += 1
        return moved

    def _arm_sync_timer(self) -> None:
        if (self.settings.synchronous != "normal" or self._sync_timer is not None
                or self._sync_task is not None or self._closed):
            return
        due = self._buf.sync_due_in()     # a plain attribute read, safe from the loop
        if due is None:
            return
        loop = asyncio.get_running_loop()
        self._sync_timer = loop.call_later(due, self._sync_tick)

    def _sync_tick(self) -> None:
        self._sync_timer = None
        if self._closed:
            return
        self._sync_task = asyncio.get_running_loop().create_task(self._sync_now())

    async def _sync_now(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._buf.sync_if_due)
        except Exception:       # logged by the buffer; tried again after the next commit
            pass
        finally:
            self._sync_task = None
        self._arm_sync_timer()

    @staticmethod
    def _wake(event: asyncio.Event) -> asyncio.Event:
        event.set()
        return asyncio.Event()

    async def append(self, records: Sequence[NewRecord], *,
                     block_timeout_s: float = 0.0) -> list[int]:
        """Store a batch; returns its seqs after commit.

        Under the `block` policy a full buffer raises BufferFull at once, or after
        waiting up to `block_timeout_s` for acks to free space.
        """
        deadline = time.monotonic() + block_timeout_s
        while True:
            acked = self._acked
            try:
                seqs = await self._run(self._buf.append, list(records))
            except BufferFull:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                try:
                    await asyncio.wait_for(acked.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            if seqs:
                self._appended = self._wake(self._appended)
            return seqs

    async def read(self, cursor: str, limit: int = 1000, max_bytes: int | None = None, *,
                   after_seq: int | None = None, stream: str | None = None) -> list[Record]:
        return await self._run(self._buf.read, cursor, limit, max_bytes,
                               after_seq=after_seq, stream=stream)

    async def read_with(self, cursor: str,
                        consume: Callable[[list[Row], Mapping[int, str],
                                           Mapping[int, Mapping[str, str]]], T],
                        limit: int = 1000, max_bytes: int | None = None, *,
                        after_seq: int | None = None) -> T:
        """`Buffer.read_with`: `consume` runs on the buffer's thread, right after the read."""
        return await self._run(self._buf.read_with, cursor, consume, limit, max_bytes,
                               after_seq=after_seq)

    async def ack(self, cursor: str, upto_seq: int) -> None:
        await self._run(self._buf.ack, cursor, upto_seq)
        self._acked = self._wake(self._acked)

    async def wait_for_records(self, cursor: str, timeout_s: float, *,
                               after_seq: int | None = None) -> bool:
        """Wait until records exist after the cursor (and `after_seq`); False on timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            appended = self._appended
            if await self._run(self._buf.has_records, cursor, after_seq):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(appended.wait(), remaining)
            except TimeoutError:
                return False

    async def register_cursor(self, name: str) -> None:
        await self._run(self._buf.register_cursor, name)

    async def cursors(self) -> list[str]:
        return await self._run(self._buf.cursors)

    async def unregister_cursor(self, name: str, reason: str = "uplink_removed") -> int:
        """Remove a cursor; returns how many records were dropped with it (counted)."""
        n = await self._run(self._buf.unregister_cursor, name, reason)
        self._acked = self._wake(self._acked)
        return n

    async def purge(self, cursor: str | None = None) -> int:
        count = await self._run(self._buf.purge, cursor)
        self._acked = self._wake(self._acked)
        return count

    async def checkpoint(self, mode: str = "PASSIVE") -> dict[str, Any]:
        return await self._run(self._buf.checkpoint, mode)

    async def quarantine(self, cursor: str, seq: int, reason: str) -> bool:
        return await self._run(self._buf.quarantine, cursor, seq, reason)

    async def quarantine_list(self, cursor: str | None = None, reason: str | None = None, *,
                              seqs: Sequence[int] | None = None,
                              limit: int | None = None) -> list[QuarantinedRecord]:
        return await self._run(self._buf.quarantine_list, cursor, reason, seqs=seqs,
                               limit=limit)

    async def quarantine_retry(self, cursor: str | None = None, reason: str | None = None, *,
                               seqs: Sequence[int] | None = None) -> int:
        n = await self._run(self._buf.quarantine_retry, cursor, reason, seqs=seqs)
        if n:
            self._appended = self._wake(self._appended)
        return n

    async def quarantine_drop(self, cursor: str | None = None, reason: str | None = None, *,
                              seqs: Sequence[int] | None = None) -> int:
        return await self._run(self._buf.quarantine_drop, cursor, reason, seqs=seqs)

    async def quarantine_delivered(self, cursor: str, seqs: Sequence[int]) -> int:
        return await self._run(self._buf.quarantine_delivered, cursor, seqs)

    async def sync(self) -> None:
        await self._run(self._buf.sync)

    async def reclaim(self, max_rows: int | None = None) -> int:
        """Delete the rows of retired records now (see `Buffer.reclaim`)."""
        return await self._run(self._buf.reclaim, max_rows)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self._buf.stats)

    async def close(self) -> None:
        """Close the file on its thread and join the thread. Idempotent."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._closing = True
        if self._reclaim_timer is not None:
            self._reclaim_timer.cancel()
            self._reclaim_timer = None
        if self._reclaim_task is not None:   # one transaction at most: left as it is
            await asyncio.gather(self._reclaim_task, return_exceptions=True)
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        if self._sync_task is not None:
            await asyncio.gather(self._sync_task, return_exceptions=True)
        if self._sync_timer is not None:    # re-armed by that task: close() syncs anyway
            self._sync_timer.cancel()
            self._sync_timer = None
        try:
            await loop.run_in_executor(self._executor, self._buf.close)
        finally:
            self._closed = True
            # Joining is quick (the queue is drained) but still blocking: do it off-loop.
            await asyncio.to_thread(self._executor.shutdown, True)

    async def __aenter__(self) -> AsyncBuffer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
