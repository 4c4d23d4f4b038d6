"""The Modbus bus driver's decisions, with its socket replaced by a scripted register map.

Everything above the client is the real driver: error mapping, retries, splitting a refused
request and learning the hole, bad points, STALE after a failure, the circuit breaker, the
drift-free schedule and write checks. The wire itself is tested against real servers in
tests/component/test_modbus_*.py.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from pymodbus.exceptions import ModbusIOException

from drivers.base import DeviceState, DriverError, Quality, WriteRejected
from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver
from drivers.modbus.planner import Hole


class Reply:
    def __init__(self, registers=None, code: int = 0) -> None:
        self.registers = registers or []
        self.exception_code = code

    def isError(self) -> bool:
        return self.exception_code != 0


class ScriptedDevice:
    """A unit's holding registers: `refused` addresses answer exception 2 to any request that
    includes them; `busy` answers exception 6 that many times; `silent` never answers."""

    connected = True

    def __init__(self) -> None:
        self.regs = {a: 100 + a for a in range(200)}
        self.refused: set[int] = set()
        self.busy = 0
        self.short_replies = 0
        self.gateway_code = 0
        self.silent = False
        self.requests: list[tuple[int, int]] = []

    async def read_holding_registers(self, address: int, *, count: int, device_id: int) -> Reply:
        self.requests.append((address, count))
        if self.silent:
            raise ModbusIOException("no reply")
        if self.gateway_code:
            return Reply(code=self.gateway_code)
        if self.busy:
            self.busy -= 1
            return Reply(code=6)
        if any(address <= a < address + count for a in self.refused):
            return Reply(code=2)
        regs = [self.regs[a] for a in range(address, address + count)]
        if self.short_replies:
            self.short_replies -= 1
            regs = regs[:-1]
        return Reply(regs)

    async def _no_table(self, *args, **kwargs) -> Reply:
        raise AssertionError("only holding registers are scripted")

    read_coils = read_discrete_inputs = read_input_registers = _no_table

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(points, *, retries: int = 1, offline_after: int = 3, **dev_kw):
    bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1", retries=retries, retry_delay="0s",
                       inter_frame_delay="0s")
    dev = ModbusDeviceConfig.model_validate({
        "name": "m", "bus": "b", "interval": "1s", "offline_after_failures": offline_after,
        "points": points, **dev_kw})
    samples, events, clock, device = [], [], Clock(), ScriptedDevice()
    drv = ModbusBusDriver(bus, [dev], samples.append, events.append, clock=clock, rng=random.Random(1))

    async def ensure_client(what: str):
        return device

    drv._ensure_client = ensure_client
    return drv, drv._devices["m"], device, samples, events, clock


def regs(*addresses: int) -> list[dict]:
    return [{"name": f"r{a}", "address": a} for a in addresses]


async def test_a_refused_span_is_split_learned_as_a_hole_and_never_requested_again() -> None:
    drv, st, device, samples, events, _ = make(regs(0, 1, 5, 6))
    device.refused = {3}
    assert [(b.address, b.count) for b in drv.plan("m")] == [(0, 7)]
    assert await drv._poll_group(st, st.groups[0])
    assert device.requests == [(0, 7), (0, 2), (5, 2)]
    assert drv.device_stats("m")["holes"] == [Hole("holding", 2, 5)]
    assert [(b.address, b.count) for b in drv.plan("m")] == [(0, 2), (5, 2)]
    assert {s.point: s.value for s in samples} == {"r0": 100, "r1": 101, "r5": 105, "r6": 106}
    assert all(s.quality is Quality.GOOD for s in samples)
    assert [e.state for e in events] == [DeviceState.ONLINE]
    device.requests.clear()
    assert await drv._poll_group(st, st.groups[0])
    assert device.requests == [(0, 2), (5, 2)]


async def test_a_point_refused_alone_is_marked_bad_once_and_left_out() -> None:
    drv, st, device, samples, events, _ = make(regs(0, 40))
    device.refused = {40}
    assert await drv._poll_group(st, st.groups[0])          # the device answered: it is online
    bad = [s for s in samples if s.point == "r40"]
    assert len(bad) == 1 and bad[0].quality is Quality.BAD and bad[0].value is None
    assert bad[0].reason == "exception 2 illegal data address"
    assert drv.device_stats("m")["bad_points"] == {"r40": "exception 2 illegal data address"}
    assert [(b.address, b.count) for b in drv.plan("m")] == [(0, 1)]
    device.requests.clear()
    samples.clear()
    assert await drv._poll_group(st, st.groups[0])
    assert device.requests == [(0, 1)] and [s.point for s in samples] == ["r0"]
    assert [e.state for e in events] == [DeviceState.ONLINE]


async def test_after_a_timeout_the_rest_of_the_cycle_is_stale_and_not_requested() -> None:
    drv, st, device, samples, events, clock = make(regs(0, 50), offline_after=2, max_gap=5)
    assert await drv._poll_group(st, st.groups[0])
    good_ts = {s.point: s.ts_ms for s in samples}
    samples.clear()
    device.silent = True
    device.requests.clear()
    assert not await drv._poll_group(st, st.groups[0])
    assert device.requests == [(0, 1)]                      # a timeout is not retried at once
    first, second = samples
    assert (first.point, first.quality, first.value) == ("r0", Quality.BAD, None)
    assert "timeout" in first.reason
    # never read this cycle: its last value, with its own timestamp, marked stale
    assert (second.point, second.quality, second.value, second.ts_ms) == (
        "r50", Quality.STALE, 150, good_ts["r50"])
    assert second.reason.startswith("not read: timeout")
    assert drv.stats["timeouts"] == 1 and drv.device_stats("m")["failed_cycles"] == 1
    samples.clear()
    assert not await drv._poll_group(st, st.groups[0])
    assert samples == []                                     # the same qualities are not repeated
    assert [e.state for e in events] == [DeviceState.ONLINE, DeviceState.OFFLINE]
    assert "timeout" in events[-1].reason
    assert st.next_probe > clock.now
    # the offline device is probed (not polled) when its probe is due, and comes back
    device.silent = False
    clock.now = st.next_probe
    drv._writes, drv._wake = asyncio.Queue(), asyncio.Event()
    device.requests.clear()
    await drv._step()
    assert device.requests == [(0, 1), (50, 1)] and events[-1].state is DeviceState.ONLINE
    assert st.groups[0].next_due == clock.now + 1.0


async def test_busy_and_garbage_are_retried_timeouts_and_gateway_failures_are_not() -> None:
    drv, st, device, samples, events, _ = make(regs(0), retries=2)
    device.busy = 2
    assert await drv._poll_group(st, st.groups[0])
    assert len(device.requests) == 3 and drv.stats["retries"] == 2 and samples[-1].value == 100
    device.requests.clear()
    device.busy = 3                                          # more than the retries: a failure
    assert not await drv._poll_group(st, st.groups[0])
    assert len(device.requests) == 3 and samples[-1].quality is Quality.BAD
    device.requests.clear()
    device.short_replies = 1                                 # a reply with a register missing
    assert await drv._poll_group(st, st.groups[0])
    assert len(device.requests) == 2 and drv.stats["garbage"] == 1
    device.requests.clear()
    device.gateway_code = 11                                 # the gateway's target did not answer
    for _ in range(3):
        assert not await drv._poll_group(st, st.groups[0])
    assert len(device.requests) == 3
    assert events[-1].state is DeviceState.OFFLINE and "exception 11" in events[-1].reason


def test_the_schedule_is_drift_free_and_counts_overruns() -> None:
    drv, st, *_ = make([{"name": "a", "address": 0}, {"name": "fast", "address": 1, "interval": "250ms"}])
    assert [g.interval for g in st.groups] == [0.25, 1.0]
    g = st.groups[1]
    g.next_due = 10.0
    drv._advance(st, g, 10.3)                # on time: the next tick is one interval later
    assert g.next_due == 11.0 and st.counters["overruns"] == 0
    drv._advance(st, g, 13.5)                # late: ticks 12 and 13 passed, counted, skipped
    assert g.next_due == 14.0 and st.counters["overruns"] == 2 and drv.stats["overruns"] == 2
    drv._advance(st, g, 15.0)                # exactly on the next tick: that one is missed too
    assert g.next_due == 16.0 and st.counters["overruns"] == 3


async def test_writes_are_checked_before_anything_is_sent() -> None:
    drv, st, device, *_ = make([{"name": "ro", "address": 0},
                                {"name": "sp", "address": 1, "type": "int16", "writable": True}])
    with pytest.raises(WriteRejected, match="no device 'x'"):
        await drv.write("x", "sp", 1)
    with pytest.raises(WriteRejected, match="no point 'nope'"):
        await drv.write("m", "nope", 1)
    with pytest.raises(WriteRejected, match="'ro' is not writable"):
        await drv.write("m", "ro", 1)
    with pytest.raises(DriverError, match="not running"):
        await drv.write("m", "sp", 1)
    drv._writes, drv._wake = asyncio.Queue(), asyncio.Event()
    st.online = False
    with pytest.raises(DriverError, match="offline; write not sent") as exc:
        await drv.write("m", "sp", 1)
    assert exc.value.retriable and device.requests == [] and drv._writes.empty()


def test_a_device_on_another_bus_is_refused() -> None:
    bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1")
    dev = ModbusDeviceConfig.model_validate({"name": "m", "bus": "other", "points": regs(0)})
    with pytest.raises(DriverError, match="device 'm' is on bus 'other', not 'b'"):
        ModbusBusDriver(bus, [dev], lambda s: None, lambda e: None)


async def test_garbage_beyond_the_retries_fails_the_read_after_exactly_that_many() -> None:
    drv, st, device, samples, _events, _ = make(regs(0), retries=2)
    device.short_replies = 3                                  # one more than the retries allow
    assert not await drv._poll_group(st, st.groups[0])
    assert len(device.requests) == 3 and drv.stats["garbage"] == 3 and drv.stats["retries"] == 2
    assert samples[-1].quality is Quality.BAD


async def test_a_write_to_a_driver_that_is_not_running_may_be_retried() -> None:
    drv, *_ = make([{"name": "sp", "address": 1, "type": "int16", "writable": True}])
    with pytest.raises(DriverError, match="not running") as exc:
        await drv.write("m", "sp", 1)
    assert exc.value.retriable is True
