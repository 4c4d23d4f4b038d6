"""Pure, deterministic waveforms for the simulator: value = f(point, tick, seed).

Random walks draw from a generator seeded by (seed, device, point), so a run is
repeatable. No I/O and no clock here.
"""

from __future__ import annotations

import math
import random

from drivers.simulator.config import SimulatorPointConfig


class Waveform:
    """The value sequence of one simulated point."""

    __slots__ = ("_int", "_rng", "_walk", "_walk_tick", "cfg", "interval", "name")

    def __init__(self, cfg: SimulatorPointConfig, name: str, device: str, seed: int, interval: float):
        self.cfg = cfg
        self.name = name
        self.interval = interval
        # Only random walks draw numbers; a generator holds 2.5 kB of state, and a load test
        # simulates 10,000 points (25 MB of RSS for generators never used).
        self._rng = random.Random(f"{seed}:{device}:{name}") if cfg.waveform == "random_walk" else None
        self._int = cfg.type.startswith(("int", "uint"))
        self._walk = cfg.offset
        self._walk_tick = -1

    def value(self, tick: int):
        c = self.cfg
        if c.waveform == "counter":  # first: load tests run thousands of counters a second
            v = c.offset + c.step * tick
            if c.max is not None:
                low = c.min if c.min is not None else c.offset
                span = c.max - low + (1 if float(c.step).is_integer() else 0)
                if span > 0:
                    v = low + (v - low) % span
            return round(v) if self._int else float(v)
        t = tick * self.interval
        if c.waveform == "sine":
            v = c.offset + c.amplitude * math.sin(2 * math.pi * t / c.period)
        elif c.waveform == "ramp":
            v = c.offset + c.amplitude * ((t % c.period) / c.period)
        elif c.waveform == "step":
            high = (t % c.period) >= c.period / 2
            if c.type == "bool":
                return high
            v = c.offset + (c.amplitude if high else 0.0)
        elif c.waveform == "random_walk":
            # Advance one step per tick; ticks are consumed in order by the driver.
            while self._walk_tick < tick:
                self._walk_tick += 1
                if self._walk_tick > 0:
                    assert self._rng is not None
                    self._walk += self._rng.uniform(-c.step, c.step)
                    self._walk = _clamp(self._walk, c.min, c.max)
            v = self._walk
        else:
            if c.type == "bool":
                return bool(c.offset)
            v = c.offset
        v = _clamp(v, c.min, c.max)
        if self._int:
            return round(v)
        return float(v)


def _clamp(v: float, lo: float | None, hi: float | None) -> float:
    if lo is not None and v < lo:
        return lo
    if hi is not None and v > hi:
        return hi
    return v
