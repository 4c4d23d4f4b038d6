"""Modbus RTU over a socat pty pair: two unit ids on one line, a silent unit, an unplugged adapter."""

import asyncio
import contextlib
import logging

import pytest

from drivers.base import DeviceState, Quality
from drivers.modbus.config import ModbusDeviceConfig, RtuBusConfig
from drivers.modbus.driver import ModbusBusDriver
from drivers.modbus.simserver import SimServer, SimUnit
from tests.harness.common import until

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


@pytest.fixture
def pty(pty_pair):
    return pty_pair()


def devices():
    return [
        ModbusDeviceConfig.model_validate({"name": f"m{u}", "bus": "line", "unit_id": u,
                                           "interval": "100ms", "offline_after_failures": 2,
                                           "probe_backoff_max": "500ms",
                                           "points": [{"name": "x", "address": 0, "type": "int32"}]})
        for u in (1, 2)
    ]


def bus(port):
    return RtuBusConfig(name="line", transport="rtu", port=port, baudrate=19200, timeout="250ms",
                        inter_frame_delay="5ms", reconnect_min="100ms", reconnect_max="300ms")


@contextlib.asynccontextmanager
async def running(port):
    samples, events = [], []
    drv = ModbusBusDriver(bus(port), devices(), samples.append, events.append)
    task = asyncio.create_task(drv.run(), name=drv.name)
    try:
        yield drv, samples, events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def good(samples, device):
    return [s for s in samples if s.device == device and s.quality is Quality.GOOD]


async def test_two_units_one_line_and_a_silent_unit(pty):
    a, b = pty
    units = {1: SimUnit(), 2: SimUnit()}
    units[1].set_range("holding", 0, [0, 11])
    units[2].set_range("holding", 0, [0xFFFF, 0xFFFE])
    server = await SimServer.rtu(b, units)
    try:
        async with running(a) as (drv, samples, events):
            await until(lambda: good(samples, "m1") and good(samples, "m2"))
            assert good(samples, "m1")[-1].value == 11 and good(samples, "m2")[-1].value == -2
            units[2].silent = True
            await until(lambda: any(e.device == "m2" and e.state is DeviceState.OFFLINE for e in events))
            n = len(good(samples, "m1"))
            await until(lambda: len(good(samples, "m1")) >= n + 10)
            stats = drv.device_stats("m2")
    finally:
        await server.stop()
    # The silent unit costs the line one timeout per failed cycle, never more.
    assert drv.stats["timeouts"] <= stats["cycles_failed"]
    assert drv.device_stats("m1")["online"] is True


async def test_unplugged_adapter_reconnects(pty):
    a, b = pty
    units = {1: SimUnit(), 2: SimUnit()}
    units[1].set_range("holding", 0, [0, 5])
    units[2].set_range("holding", 0, [0, 6])
    server = await SimServer.rtu(b, units)
    try:
        async with running(a) as (_drv, samples, events):
            await until(lambda: good(samples, "m1") and good(samples, "m2"))
            await server.stop()
            pty.close()
            await until(lambda: sum(e.state is DeviceState.OFFLINE for e in events) == 2)
            pty.open()
            units[1].set_range("holding", 0, [0, 55])
            server = await SimServer.rtu(b, units)
            await until(lambda: good(samples, "m1")[-1].value == 55, limit_s=15)
    finally:
        await server.stop()
    assert [e.state for e in events if e.device == "m1"] == [
        DeviceState.ONLINE, DeviceState.OFFLINE, DeviceState.ONLINE]
