"""The simulator driver: deterministic waveforms on a drift-free schedule.

For demos and load tests: it behaves like a real driver (samples, ONLINE events, checked
writes) without hardware. One driver runs every simulator device; each (device,
interval) group ticks at start + k * interval on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from drivers.base import (
    DeviceEvent,
    DeviceEventSink,
    DeviceState,
    Quality,
    Sample,
    SampleSink,
    WriteRejected,
    now_ms,
)
from drivers.simulator.config import SimulatorDeviceConfig
from drivers.simulator.waveforms import Waveform


class SimulatorDriver:
    def __init__(
        self,
        devices: list[SimulatorDeviceConfig],
        on_sample: SampleSink,
        on_event: DeviceEventSink,
    ) -> None:
        self.name = "simulator"
        self._devices = {d.name: d for d in devices}
        self._on_sample = on_sample
        self._on_event = on_event
        # (device, interval) -> waveforms ticking together
        self._groups: dict[tuple[str, float], list[Waveform]] = {}
        self._by_point: dict[tuple[str, str], Waveform] = {}
        self._overrides: dict[tuple[str, str], Any] = {}
        for d in devices:
            for p in d.points:
                interval = p.interval or d.interval
                for n in p.names():
                    wf = Waveform(p, n, d.name, d.seed, interval)
                    self._groups.setdefault((d.name, interval), []).append(wf)
                    self._by_point[(d.name, n)] = wf
        self.stats = {"samples": 0, "overruns": 0}

    def devices(self) -> list[str]:
        return list(self._devices)

    async def run(self) -> None:
        for name in self._devices:
            self._on_event(DeviceEvent(name, DeviceState.ONLINE))
        start = time.monotonic()
        next_tick = {key: 0 for key in self._groups}
        while True:
            now = time.monotonic()
            for key, tick in next_tick.items():
                due = start + tick * key[1]
                if due > now:
                    continue
                self._emit(key, tick)
                nxt = tick + 1
                behind = math.floor((now - start) / key[1]) + 1
                if behind > nxt:
                    self.stats["overruns"] += behind - nxt
                    nxt = behind
                next_tick[key] = nxt
            wake = min(start + t * k[1] for k, t in next_tick.items()) if next_tick else now + 3600
            await asyncio.sleep(max(0.0, wake - time.monotonic()))

    def _emit(self, key: tuple[str, float], tick: int) -> None:
        device = key[0]
        ts = now_ms()
        group = self._groups[key]
        overrides = self._overrides
        on_sample = self._on_sample
        good = Quality.GOOD
        for wf in group:
            value = overrides.get((device, wf.name)) if overrides else None
            if value is None:
                value = wf.value(tick)
            on_sample(Sample(device, wf.name, value, ts, good, "", wf.cfg.type))
        self.stats["samples"] += len(group)

    async def write(self, device: str, point: str, value: Any) -> None:
        wf = self._by_point.get((device, point))
        if wf is None:
            raise WriteRejected(f"simulator device {device!r}: no point {point!r}")
        if not wf.cfg.writable:
            raise WriteRejected(f"simulator device {device!r} point {point!r} is not writable")
        if wf.cfg.type == "bool":
            if not isinstance(value, bool):
                raise WriteRejected(f"point {point!r} takes true/false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise WriteRejected(f"point {point!r} takes a number, got {value!r}")
        else:
            if wf.cfg.min is not None and value < wf.cfg.min:
                raise WriteRejected(f"point {point!r}: {value} is below min {wf.cfg.min}")
            if wf.cfg.max is not None and value > wf.cfg.max:
                raise WriteRejected(f"point {point!r}: {value} is above max {wf.cfg.max}")
        # A written point holds the written value, as a real setpoint would.
        self._overrides[(device, point)] = value
        self._on_sample(Sample(device, point, value, now_ms(), Quality.GOOD, "", wf.cfg.type))
