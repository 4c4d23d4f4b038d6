"""The Modbus bus driver against an in-process pymodbus TCP server."""

import asyncio
import contextlib
import logging

import pytest

from drivers.base import DeviceState, DriverError, Quality, WriteRejected
from drivers.modbus import codec
from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver
from drivers.modbus.simserver import SimServer, SimUnit

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def bus_for(port, **kw):
    return TcpBusConfig(name="b", transport="tcp", host="127.0.0.1", port=port,
                        **{"timeout": "300ms", "reconnect_min": "100ms", "reconnect_max": "400ms", **kw})


def dev(name, unit_id, points, **kw):
    return ModbusDeviceConfig.model_validate(
        {"name": name, "bus": "b", "unit_id": unit_id, "interval": "100ms", "points": points, **kw}
    )


class Running:
    def __init__(self, bus, devices):
        self.samples, self.events = [], []
        self.driver = ModbusBusDriver(bus, devices, self.samples.append, self.events.append)

    async def __aenter__(self):
        self.task = asyncio.create_task(self.driver.run(), name=self.driver.name)
        return self

    async def __aexit__(self, *exc):
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def good(self, device, point):
        return [s for s in self.samples
                if s.device == device and s.point == point and s.quality is Quality.GOOD]

    async def until(self, predicate, limit_s=5.0):
        deadline = asyncio.get_running_loop().time() + limit_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("condition not reached in time")
            await asyncio.sleep(0.02)


@pytest.fixture
async def server():
    units = {1: SimUnit(), 2: SimUnit()}
    srv = await SimServer.tcp(units)
    yield srv
    await srv.stop()


async def test_coalesced_reads_decode_every_type(server):
    u = server.units[1]
    u.set_range("holding", 0, [0] * 30)
    u.set_range("holding", 0, codec.encode("float32", 12.5, "CDAB"))
    u.set_range("holding", 2, codec.encode("int32", -7, "CDAB"))
    u.set_range("holding", 4, codec.encode("float64", 1e10, "ABCD"))   # per-point override
    u.set_range("holding", 8, [0b100])
    u.set_range("holding", 9, codec.encode("string", "AB-7", "CDAB", length=2))
    u.set_range("coil", 0, [True, False, True])
    points = [
        {"name": "f", "address": 0, "type": "float32"},
        {"name": "i", "address": 2, "type": "int32", "scale": 0.5},
        {"name": "d", "address": 4, "type": "float64", "byte_order": "ABCD"},
        {"name": "b2", "address": 8, "type": "bool", "bit": 2},
        {"name": "s", "address": 9, "type": "string", "length": 2},
        {"name": "c0", "table": "coil", "address": 0},
        {"name": "c2", "table": "coil", "address": 2},
    ]
    async with Running(bus_for(server.port), [dev("m", 1, points, byte_order="CDAB")]) as run:
        await run.until(lambda: run.good("m", "c2") and run.good("m", "s"))
        values = {p["name"]: run.good("m", p["name"])[-1].value for p in points}
        plan = run.driver.plan("m")
    assert values == {"f": 12.5, "i": -3.5, "d": 1e10, "b2": True, "s": "AB-7", "c0": True, "c2": True}
    assert len(plan) == 2        # one holding request, one coil request
    assert run.events[0].state is DeviceState.ONLINE


async def test_exception_2_splits_the_block_and_remembers_the_hole(server):
    u = server.units[1]
    u.set_range("input", 0, [1, 2])
    u.set_range("input", 6, [3])       # registers 2..5 do not exist: exception 2 if spanned
    points = [{"name": "a", "table": "input", "address": 0},
              {"name": "b", "table": "input", "address": 1},
              {"name": "c", "table": "input", "address": 6}]
    async with Running(bus_for(server.port), [dev("m", 1, points)]) as run:
        await run.until(lambda: len(run.good("m", "c")) >= 3)
    assert [s.value for s in run.good("m", "a")][-1] == 1
    assert run.good("m", "c")[-1].value == 3
    st = run.driver.device_stats("m")
    assert st["holes"] and st["holes"][0].start == 2 and st["holes"][0].end == 6
    assert [(b.address, b.count) for b in run.driver.plan("m")] == [(0, 2), (6, 1)]
    assert not st["bad_points"]


async def test_illegal_point_is_bad_once_and_others_go_on(server, caplog):
    u = server.units[1]
    u.set_range("holding", 0, [42])
    points = [{"name": "ok", "address": 0}, {"name": "missing", "address": 100}]
    with caplog.at_level(logging.ERROR, logger="drivers.modbus.driver"):
        async with Running(bus_for(server.port), [dev("m", 1, points)]) as run:
            await run.until(lambda: len(run.good("m", "ok")) >= 5)
    bad = [s for s in run.samples if s.point == "missing"]
    assert len(bad) == 1 and bad[0].quality is Quality.BAD and bad[0].value is None
    assert "exception 2" in bad[0].reason
    assert sum(getattr(r, "outpost_fields", {}).get("point") == "missing" for r in caplog.records) == 1
    assert run.driver.device_stats("m")["online"] is True


async def test_silent_unit_goes_offline_without_starving_the_other(server):
    server.units[1].set_range("holding", 0, [1])
    server.units[2].silent = True
    devices = [dev("alive", 1, [{"name": "x", "address": 0}]),
               dev("dead", 2, [{"name": "x", "address": 0}, {"name": "y", "address": 50}],
                   offline_after_failures=2, probe_backoff_max="1s")]
    async with Running(bus_for(server.port), devices) as run:
        await run.until(lambda: len(run.good("alive", "x")) >= 15, limit_s=10)
        dead_stats = run.driver.device_stats("dead")
        offline = [e for e in run.events if e.device == "dead"]
        server.units[2].silent = False
        server.units[2].set_range("holding", 0, [9])
        server.units[2].set_range("holding", 50, [10])
        await run.until(lambda: run.good("dead", "y"), limit_s=10)
    assert offline and offline[0].state is DeviceState.OFFLINE and "timeout" in offline[0].reason
    # Only one request per failed cycle reaches the silent unit: its second block is skipped.
    assert dead_stats["cycles_failed"] >= 2
    assert run.driver.stats["timeouts"] <= dead_stats["cycles_failed"]
    assert any(s.quality is Quality.STALE or s.quality is Quality.BAD
               for s in run.samples if s.device == "dead")
    assert [e.state for e in run.events if e.device == "dead"][-1] is DeviceState.ONLINE


async def test_busy_reply_is_retried_and_short_reply_is_rejected(server):
    u = server.units[1]
    u.set_range("holding", 0, [5, 6])
    u.busy_replies = 1
    points = [{"name": "a", "address": 0}, {"name": "b", "address": 1}]
    async with Running(bus_for(server.port, retries=1), [dev("m", 1, points)]) as run:
        await run.until(lambda: run.good("m", "b"))
        assert run.driver.stats["retries"] >= 1
        u.short_reply = True
        await run.until(lambda: any(s.quality is Quality.BAD for s in run.samples))
        u.short_reply = False
        n = len(run.good("m", "b"))
        await run.until(lambda: len(run.good("m", "b")) > n)
    bad = [s for s in run.samples if s.quality is Quality.BAD]
    assert "reply has 1 registers" in bad[0].reason
    assert run.driver.stats["garbage"] >= 1


async def test_writes_scale_check_and_read_back(server):
    u = server.units[1]
    u.set_range("holding", 0, [0, 0, 0, 0])
    u.set_range("coil", 0, [False, False])
    points = [
        {"name": "sp", "address": 0, "type": "int16", "scale": 0.1, "writable": True,
         "min": 0, "max": 100, "read_back": True},
        {"name": "f", "address": 1, "type": "float32", "writable": True},
        {"name": "ro", "address": 0, "type": "int16"},
        {"name": "relay", "table": "coil", "address": 0, "writable": True},
        {"name": "relay15", "table": "coil", "address": 1, "writable": True, "write_function": 15},
        # f takes registers 1..2; two writable points may not share a register.
        {"name": "reg16", "address": 3, "writable": True, "write_function": 16},
    ]
    async with Running(bus_for(server.port), [dev("m", 1, points)]) as run:
        await run.until(lambda: run.good("m", "relay"))
        await run.driver.write("m", "sp", 21.5)
        await run.driver.write("m", "f", 3.25)
        await run.driver.write("m", "relay", True)
        await run.driver.write("m", "relay15", 1)
        await run.driver.write("m", "reg16", 65535)
        with pytest.raises(WriteRejected, match="out of range"):
            await run.driver.write("m", "reg16", 65536)
        with pytest.raises(WriteRejected, match="above max"):
            await run.driver.write("m", "sp", 101)
        with pytest.raises(WriteRejected, match="not writable"):
            await run.driver.write("m", "ro", 1)
        with pytest.raises(WriteRejected, match="no point"):
            await run.driver.write("m", "nope", 1)
        u.exception = 4
        with pytest.raises(DriverError, match="exception 4") as err:
            await run.driver.write("m", "f", 1.0)
        assert not err.value.retriable      # a write is never blindly retried
        u.exception = None
    assert u.writes[0] == ("holding", 0, [215])
    assert ("holding", 1, codec.encode("float32", 3.25)) in u.writes
    assert ("coil", 0, [True]) in u.writes
    assert ("coil", 1, [True]) in u.writes          # FC15 for one coil, as configured
    assert ("holding", 3, [65535]) in u.writes       # FC16 for one register, as configured
    assert len(u.writes) == 5
    assert run.good("m", "sp")[-1].value == pytest.approx(21.5)


async def test_reconnects_after_the_server_restarts():
    units = {1: SimUnit()}
    units[1].set_range("holding", 0, [7])
    srv = await SimServer.tcp(units)
    port = srv.port
    try:
        device = dev("m", 1, [{"name": "x", "address": 0}], offline_after_failures=2,
                     probe_backoff_max="500ms")
        async with Running(bus_for(port), [device]) as run:
            await run.until(lambda: run.good("m", "x"))
            await srv.stop()
            await run.until(lambda: any(e.state is DeviceState.OFFLINE for e in run.events))
            units[1].set_range("holding", 0, [8])
            srv = await SimServer.tcp(units, port=port)
            await run.until(lambda: run.good("m", "x")[-1].value == 8, limit_s=10)
        assert [e.state for e in run.events] == [DeviceState.ONLINE, DeviceState.OFFLINE,
                                                 DeviceState.ONLINE]
    finally:
        await srv.stop()


async def test_a_write_overtakes_the_queued_reads_of_a_cycle(server):
    u = server.units[1]
    u.set_range("holding", 0, [0] * 60)
    u.delay_s = 0.03
    # Ten requests per cycle (cap of 5 registers), all in one group.
    points = [{"name": f"p{i}", "address": i * 5, "type": "uint16"} for i in range(10)]
    points[0]["writable"] = True
    device = dev("m", 1, points, max_registers_per_request=5, max_gap=0, interval="2s")
    async with Running(bus_for(server.port, timeout="1s"), [device]) as run:
        await run.until(lambda: u.reads >= 2)     # a cycle is under way
        reads_before = u.reads
        await run.driver.write("m", "p0", 5)
        reads_after = u.reads
        await run.until(lambda: u.reads >= 10)
    # At most the request in flight went before the write, not the rest of the cycle.
    assert reads_after - reads_before <= 1
    assert u.writes == [("holding", 0, [5])]


async def test_a_burst_of_writes_is_coalesced_bounded_and_polling_goes_on(server):
    u = server.units[1]
    u.set_range("holding", 0, [0] * 400)
    u.delay_s = 0.005
    points = [{"name": "fast", "address": 0, "type": "uint16", "interval": "100ms"}]
    points += [{"name": f"w{i}", "address": 100 + i, "type": "uint16", "writable": True,
                "interval": "60s"} for i in range(200)]
    async with Running(bus_for(server.port), [dev("m", 1, points)]) as run:
        await run.until(lambda: len(run.good("m", "fast")) >= 2)
        # 500 commands for 20 points (a flood of setpoints): the last value per point wins.
        tasks = [asyncio.ensure_future(run.driver.write("m", f"w{i % 20}", i)) for i in range(500)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        written = [r for r in results if r is None]
        superseded = [r for r in results if isinstance(r, WriteRejected) and "superseded" in str(r)]
        assert len(written) + len(superseded) == 500, "every command gets an answer"
        assert len(u.writes) == len(written) < 100
        for i in range(20):
            assert u.tables["holding"][100 + i] == 480 + i  # each point ends at its newest value
        # 200 commands for 200 points (one DCMD with 200 metrics): every one is written, and
        # the 100 ms point keeps being polled between them (observed, not timed).
        u.writes.clear()
        polls_before = len(run.good("m", "fast"))
        await asyncio.gather(*(run.driver.write("m", f"w{i}", 1000 + i) for i in range(200)))
        polls_during = len(run.good("m", "fast")) - polls_before
    assert len(u.writes) == 200
    assert polls_during >= 5, polls_during  # 200 writes of 5 ms: a second of bus time
