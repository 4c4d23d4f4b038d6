"""`outpost run` as a child process for tests and benchmarks, with its CPU time and peak RSS.

A sampler task reads the child's CPU time and RSS every 0.25 s (psutil), so figures survive
a `kill -9`; `stop()` sends SIGTERM and returns the exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.harness.common import REPO_ROOT, ManagedProcess


@dataclass
class ProcessFigures:
    cpu_s: float = 0.0
    peak_rss_bytes: int = 0


class GatewayProcess:
    """`python -m gateway run` as a child; a sampler task keeps its CPU time and peak RSS."""

    def __init__(self, config_path: Path, log_path: Path) -> None:
        self.config_path = config_path
        self.log_path = log_path
        self.runs: list[ProcessFigures] = []
        self.proc: ManagedProcess | None = None
        self._sampler: asyncio.Task[None] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)]
        self.proc = ManagedProcess("outpost-gateway", argv, self.log_path, cwd=REPO_ROOT).start()
        figures = ProcessFigures()
        self.runs.append(figures)
        self._sampler = asyncio.create_task(self._sample(self.proc.pid, figures), name="gateway-sampler")

    async def _sample(self, pid: int, figures: ProcessFigures) -> None:
        try:
            p = psutil.Process(pid)
            while True:
                with p.oneshot():
                    t = p.cpu_times()
                    figures.cpu_s = t.user + t.system
                    figures.peak_rss_bytes = max(figures.peak_rss_bytes, p.memory_info().rss)
                await asyncio.sleep(0.25)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return

    async def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None

    async def kill9(self) -> None:
        assert self.proc is not None and self.proc.proc is not None
        await self._stop_sampler()  # its last figures are from <= 0.25 s before the kill
        os.kill(self.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(self.proc.proc.wait, 10)
        self.proc.kill()  # forget it in the harness' live set

    async def stop(self) -> int | None:
        if self.proc is None:
            return None
        proc = self.proc
        self.proc = None
        await asyncio.sleep(0)  # let the sampler take one more look
        await self._stop_sampler()
        await asyncio.to_thread(proc.stop, 30)
        return proc.proc.returncode if proc.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def figures(self) -> dict[str, Any]:
        return {
            "gateway_runs": len(self.runs),
            "gateway_cpu_s_per_run": [round(r.cpu_s, 2) for r in self.runs],
            "gateway_cpu_s_total": round(sum(r.cpu_s for r in self.runs), 2),
            "gateway_peak_rss_mb": round(max((r.peak_rss_bytes for r in self.runs), default=0) / 2**20, 1),
        }
