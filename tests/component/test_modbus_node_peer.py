"""The Modbus driver against an independent implementation: npm `modbus-serial`'s ServerTCP."""

import asyncio
import contextlib
import json
import logging
import shutil
import socket
from pathlib import Path

import pytest

from drivers.base import Quality
from drivers.modbus import codec
from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodePeer:
    def __init__(self, proc, port):
        self.proc, self.port = proc, port
        self.writes: list[dict] = []

    async def line(self) -> dict:
        async with asyncio.timeout(10):
            raw = await self.proc.stdout.readline()
        if not raw:
            raise AssertionError("modbus-serial peer exited")
        return json.loads(raw)

    async def set(self, table, addr, values):
        self.proc.stdin.write(json.dumps({"set": table, "addr": addr, "values": values}).encode() + b"\n")
        await self.proc.stdin.drain()
        while (msg := await self.line()).get("ok") != table:
            self.writes.append(msg)

    async def next_write(self) -> dict:
        return await self.line()


@pytest.fixture
async def peer(node_peers: Path):
    node = shutil.which("node")
    assert node, "node is required (installed by .ci/run)"
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        node, str(node_peers / "modbus_serial_server.js"), str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=node_peers,
    )
    async with asyncio.timeout(20):
        ready = await proc.stdout.readline()
    assert ready.startswith(b"READY"), ready
    yield NodePeer(proc, port)
    proc.stdin.close()
    try:
        async with asyncio.timeout(5):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def test_read_and_write_against_modbus_serial(peer):
    await peer.set("holding", 0, codec.encode("float32", -12.75, "CDAB"))
    await peer.set("holding", 2, codec.encode("uint32", 4_000_000_000, "CDAB"))
    await peer.set("holding", 10, codec.encode("string", "NODE", "CDAB", length=2))
    await peer.set("input", 5, [1234])
    await peer.set("coil", 3, [True])
    bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1", port=peer.port, timeout="1s")
    dev = ModbusDeviceConfig.model_validate({
        "name": "m", "bus": "b", "unit_id": 1, "byte_order": "CDAB", "interval": "100ms",
        "points": [
            {"name": "f", "address": 0, "type": "float32"},
            {"name": "u", "address": 2, "type": "uint32"},
            {"name": "s", "address": 10, "type": "string", "length": 2},
            {"name": "i", "table": "input", "address": 5, "scale": 0.1},
            {"name": "c", "table": "coil", "address": 3},
            {"name": "sp", "address": 20, "type": "int16", "writable": True, "scale": 0.5},
            {"name": "relay", "table": "coil", "address": 4, "writable": True},
        ],
    })
    samples = []
    drv = ModbusBusDriver(bus, [dev], samples.append, lambda e: None)
    task = asyncio.create_task(drv.run(), name=drv.name)

    def latest():
        return {s.point: s.value for s in samples if s.quality is Quality.GOOD}

    try:
        for _ in range(200):
            if len(latest()) == 7:
                break
            await asyncio.sleep(0.05)
        first = latest()
        await drv.write("m", "sp", -21.0)
        w1 = await peer.next_write()
        await drv.write("m", "relay", True)
        w2 = await peer.next_write()
        for _ in range(200):
            if latest().get("sp") == -21.0:
                break
            await asyncio.sleep(0.05)
        after = latest()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert first["f"] == -12.75 and first["u"] == 4_000_000_000 and first["s"] == "NODE"
    assert first["i"] == pytest.approx(123.4) and first["c"] is True and first["relay"] is False
    assert w1 == {"write": "holding", "addr": 20, "value": (-42) & 0xFFFF}
    assert w2 == {"write": "coil", "addr": 4, "value": True}
    assert after["sp"] == -21.0 and after["relay"] is True
