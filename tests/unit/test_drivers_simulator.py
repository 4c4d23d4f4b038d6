"""Simulator: waveforms are deterministic and shaped as configured; the driver ticks and writes."""

import asyncio
import contextlib
import math

import pytest

from drivers.base import DeviceState, WriteRejected
from drivers.simulator.config import SimulatorDeviceConfig, SimulatorPointConfig
from drivers.simulator.driver import SimulatorDriver
from drivers.simulator.waveforms import Waveform


def wf(seed=0, **kw):
    return Waveform(SimulatorPointConfig(name="p", **kw), "p", "d", seed, 1.0)


def test_shapes():
    sine = wf(waveform="sine", period="4s", amplitude=2, offset=1)
    assert [round(sine.value(k), 9) for k in range(5)] == [1, 3, 1, -1, 1]
    ramp = wf(waveform="ramp", period="4s", amplitude=4)
    assert [ramp.value(k) for k in range(5)] == [0, 1, 2, 3, 0]
    step = wf(waveform="step", period="2s", type="bool")
    assert [step.value(k) for k in range(4)] == [False, True, False, True]
    counter = wf(waveform="counter", type="int64", step=1, min=0, max=2)
    assert [counter.value(k) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    floats = wf(waveform="counter", type="float32", step=0.5, offset=1, max=2)
    assert [floats.value(k) for k in range(4)] == [1.0, 1.5, 1.0, 1.5]  # a fractional step wraps before max
    assert all(type(floats.value(k)) is float for k in range(3))
    assert [type(wf(waveform="counter", type=t).value(3)) for t in ("uint32", "float64")] == [int, float]
    sine_int = wf(waveform="sine", type="int32", period="4s", amplitude=2.4, min=-1)
    assert [sine_int.value(k) for k in range(4)] == [0, 2, 0, -1]  # clamped, then rounded


def test_only_random_walks_hold_a_generator():
    assert wf(waveform="counter")._rng is None and wf(waveform="sine")._rng is None
    assert wf(waveform="random_walk")._rng is not None


def test_random_walk_is_repeatable_and_bounded():
    a = [wf(seed=3, waveform="random_walk", step=5, min=-2, max=2).value(k) for k in range(200)]
    b = wf(seed=3, waveform="random_walk", step=5, min=-2, max=2)
    assert a == [b.value(k) for k in range(200)]
    assert all(-2 <= v <= 2 for v in a) and len(set(a)) > 10
    c = [wf(seed=4, waveform="random_walk", step=5).value(k) for k in range(50)]
    assert c != a[:50]


def test_count_expands_names():
    dev = SimulatorDeviceConfig(driver="simulator", name="s",
                                points=[SimulatorPointConfig(name="t", count=3, unit="C")])
    assert [i.name for i in dev.point_infos()] == ["t_0", "t_1", "t_2"]


async def wait_for_count(samples, n):
    for _ in range(500):
        if len(samples) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"only {len(samples)} samples, expected {n}")


async def test_driver_ticks_and_accepts_checked_writes():
    dev = SimulatorDeviceConfig.model_validate({
        "driver": "simulator", "name": "s", "interval": "20ms",
        "points": [{"name": "x", "waveform": "sine", "period": "1s"},
                   {"name": "sp", "waveform": "constant", "writable": True, "min": 0, "max": 10}],
    })
    samples, events = [], []
    drv = SimulatorDriver([dev], samples.append, events.append)
    task = asyncio.create_task(drv.run())
    try:
        await wait_for_count(samples, 20)
        await drv.write("s", "sp", 7)
        with pytest.raises(WriteRejected, match="above max"):
            await drv.write("s", "sp", 11)
        with pytest.raises(WriteRejected, match="not writable"):
            await drv.write("s", "x", 1)
        n = len(samples)
        await wait_for_count(samples, n + 4)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert events[0].state is DeviceState.ONLINE
    xs = [s.value for s in samples if s.point == "x"]
    assert xs[0] == 0.0 and all(-1 <= v <= 1 for v in xs)
    assert math.isclose(xs[1], math.sin(2 * math.pi * 0.02))
    assert [s.value for s in samples if s.point == "sp"][-1] == 7
