"""The flush: report-by-exception's records into the buffer, one transaction per interval.

Every `buffer.flush_interval` (or at once when asked) the writer drains report by exception,
stamps the records with the clock headers when the system clock is not synchronised (the
clock rule, gateway.records), and appends them to the buffer in batches of at most
`batch_max_records`. When the buffer refuses (the `block` policy, a failing disk) records
wait in memory, bounded by `max_pending`; beyond that they are dropped, counted and logged.
A corrupt buffer keeps the records in memory and asks the owner to reopen it.

It also beats a heartbeat after every flush, which the systemd watchdog checks: a writer
that stopped flushing (a stuck buffer thread) is a hung gateway even if the event loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from buffer import BufferCorrupt, BufferError, BufferFull, NewRecord
from common.logs import StateLog, fields
from gateway.pipeline.report import ReportByException

log = logging.getLogger("outpost.pipeline")


class RecordWriter:
    def __init__(self, rbe: ReportByException, buffer: Any, clock: Any, *, batch_max_records: int,
                 max_pending: int, on_corrupt: Callable[[], None], states: StateLog | None = None) -> None:
        self.rbe = rbe
        self.buffer = buffer
        self.clock = clock
        self.batch_max_records = batch_max_records
        self.max_pending = max_pending
        self.on_corrupt = on_corrupt
        self.pending: list[NewRecord] = []
        self.stored = 0
        self.dropped_in_memory = 0
        self.last_flush_mono = time.monotonic()
        self._states = states or StateLog(log)
        self._wake = asyncio.Event()

    def flush_soon(self) -> None:
        self._wake.set()

    async def run(self, interval_s: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval_s)
            self._wake.clear()
            await self.flush()

    def heartbeat_age_s(self) -> float:
        """Seconds since the writer last finished a flush (the watchdog's liveness check)."""
        return time.monotonic() - self.last_flush_mono

    async def flush(self) -> None:
        records = self.rbe.drain(self.clock.record_headers() or None)
        if records:
            self.pending.extend(records)
        try:
            await self._append_pending()
        finally:
            self.last_flush_mono = time.monotonic()

    async def _append_pending(self) -> None:
        limit = self.batch_max_records
        while self.pending:
            batch = self.pending[:limit]
            try:
                await self.buffer.append(batch)
            except BufferCorrupt as e:
                if getattr(e, "recovered", False):
                    # The buffer moved the bad file aside and salvaged it already: try again.
                    log.error("buffer was corrupt and is recovered", extra=fields(reason=str(e)))
                    continue
                # Found while running: the records stay in memory; the owner reopens the
                # buffer (which moves the bad file aside) and restarts the pipeline.
                log.error("buffer corrupt: reopening it", extra=fields(reason=str(e)))
                self.on_corrupt()
                return
            except (BufferFull, BufferError) as e:
                # `block` policy or a failing disk: keep the records in memory (bounded) and retry.
                self._states.problem("buffer:append", "buffer refuses records", reason=str(e))
                overflow = len(self.pending) - self.max_pending
                if overflow > 0:
                    del self.pending[:overflow]
                    self.dropped_in_memory += overflow
                    log.error("records dropped", extra=fields(
                        reason="buffer_refused", count=overflow, total=self.dropped_in_memory))
                return
            del self.pending[: len(batch)]
            self.stored += len(batch)
            self._states.recovered("buffer:append", "buffer accepts records again")
