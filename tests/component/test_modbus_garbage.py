"""Garbage, truncated and malformed replies from hand-written peers: bad samples, never a crash."""

import asyncio
import contextlib
import logging
import os
import struct

import pytest

from drivers.base import Quality
from drivers.modbus.config import ModbusDeviceConfig, RtuBusConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver
from drivers.serial_line.codec import crc16_modbus

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def device(**kw):
    return ModbusDeviceConfig.model_validate({
        "name": "m", "bus": "b", "unit_id": 1, "interval": "100ms", "offline_after_failures": 50,
        "points": [{"name": "x", "address": 0}, {"name": "y", "address": 1}], **kw})


@contextlib.asynccontextmanager
async def running(bus):
    samples = []
    drv = ModbusBusDriver(bus, [device()], samples.append, lambda e: None)
    task = asyncio.create_task(drv.run(), name=drv.name)
    try:
        yield drv, samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_good(samples, n, limit=200):
    for _ in range(limit):
        if sum(s.quality is Quality.GOOD for s in samples) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} good samples: {samples[-5:]}")


async def test_tcp_garbage_truncated_and_wrong_count_replies():
    # One behaviour per request, then valid replies for ever.
    script = ["garbage", "truncated", "wrong_count", "wrong_fc"]

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _pid, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                fc, _addr, count = struct.unpack(">BHH", pdu)
                mode = script.pop(0) if script else "ok"
                regs = [100 + i for i in range(count)]
                if mode == "wrong_count":
                    regs = regs[:-1]
                body = struct.pack(">BB", fc if mode != "wrong_fc" else 0x2B, 2 * len(regs))
                body += b"".join(struct.pack(">H", r) for r in regs)
                frame = struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body
                if mode == "garbage":
                    writer.write(os.urandom(3) + b"\xff" * 9)
                elif mode == "truncated":
                    writer.write(frame[:-2])
                else:
                    writer.write(frame)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1", port=port, timeout="300ms",
                       retries=0, reconnect_min="100ms")
    try:
        async with running(bus) as (drv, samples):
            await wait_good(samples, 4)
    finally:
        server.close()
        await server.wait_closed()
    good = [(s.point, s.value) for s in samples if s.quality is Quality.GOOD]
    assert good[:2] == [("x", 100), ("y", 101)]
    bad = [s for s in samples if s.quality is Quality.BAD]
    assert bad, "the malformed replies must show as bad samples"
    assert all(s.value is None and s.reason for s in bad)
    assert drv.stats["timeouts"] + drv.stats["garbage"] >= 3


@pytest.fixture
def pty(pty_pair):
    return pty_pair()


def rtu_reply(unit: int, regs: list[int]) -> bytes:
    body = bytes([unit, 3, 2 * len(regs)]) + b"".join(struct.pack(">H", r) for r in regs)
    return body + struct.pack("<H", crc16_modbus(body))


async def test_rtu_noise_and_bad_crc_on_the_line(pty):
    a, b = pty
    fd = os.open(b, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    answers = ["bad_crc", "noise", "ok"]
    stop = asyncio.Event()

    async def slave():
        buf = b""
        while not stop.is_set():
            try:
                buf += os.read(fd, 256)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            if len(buf) < 8:
                continue
            req, buf = buf[:8], buf[8:]
            count = struct.unpack(">H", req[4:6])[0]
            mode = answers.pop(0) if len(answers) > 1 else answers[0]
            frame = rtu_reply(1, [7 + i for i in range(count)])
            if mode == "bad_crc":
                frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
            elif mode == "noise":
                frame = b"\x00\xfe\x13" + os.urandom(5)
            await asyncio.sleep(0.01)
            os.write(fd, frame)

    bus = RtuBusConfig(name="b", transport="rtu", port=a, timeout="300ms", retries=0,
                       reconnect_min="100ms")
    peer = asyncio.create_task(slave())
    try:
        async with running(bus) as (_drv, samples):
            await wait_good(samples, 4)
    finally:
        stop.set()
        await peer
        os.close(fd)
    assert [s.value for s in samples if s.quality is Quality.GOOD][:2] == [7, 8]
    assert any(s.quality is Quality.BAD for s in samples)
