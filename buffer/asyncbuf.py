"""The buffer for asyncio code: every SQLite call runs on one dedicated thread.

SQLite work blocks (fsync on every commit), so it never runs on the event loop. One
thread, not a pool, because the connection is thread-confined and commits are serial
anyway. The AsyncBuffer owns that thread: `close()` finishes the queued work, closes the
file and joins it.

A caller cancelled while its call runs on the thread does not undo the call: an append
that commits after its caller was cancelled is stored (and read again later), never lost.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from buffer.core import Buffer, BufferSettings, NewRecord, Record
from buffer.errors import BufferClosed, BufferFull

T = TypeVar("T")


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
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

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

    async def unregister_cursor(self, name: str) -> None:
        await self._run(self._buf.unregister_cursor, name)
        self._acked = self._wake(self._acked)

    async def purge(self, cursor: str | None = None) -> int:
        count = await self._run(self._buf.purge, cursor)
        self._acked = self._wake(self._acked)
        return count

    async def checkpoint(self, mode: str = "PASSIVE") -> dict[str, Any]:
        return await self._run(self._buf.checkpoint, mode)

    async def stats(self) -> dict[str, Any]:
        return await self._run(self._buf.stats)

    async def close(self) -> None:
        """Close the file on its thread and join the thread. Idempotent."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
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
