"""The serial-line driver on socat pseudo-terminal pairs: lines, bad lines, polling, unplug."""

import asyncio
import contextlib
import os

import pytest

from drivers.base import DeviceState, Quality
from drivers.serial_line.config import SerialLineDeviceConfig
from drivers.serial_line.driver import SerialLineDriver
from tests.harness.common import until


@pytest.fixture
def pty(pty_pair):
    return pty_pair()


class Peer:
    """The sensor's side of the line."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)

    def send(self, data: bytes):
        os.write(self.fd, data)

    def read(self) -> bytes:
        try:
            return os.read(self.fd, 4096)
        except BlockingIOError:
            return b""

    def close(self):
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.asynccontextmanager
async def running(cfg):
    samples, events = [], []
    drv = SerialLineDriver(cfg, samples.append, events.append)
    task = asyncio.create_task(drv.run(), name=drv.name)
    try:
        yield drv, samples, events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def device(port, **kw):
    return SerialLineDeviceConfig.model_validate({
        "driver": "serial_line", "name": "th", "port": port, "parser": "kv",
        "max_line_length": 40, "reconnect_min": "100ms", "reconnect_max": "200ms",
        "points": [{"name": "t", "source": "T"}, {"name": "h", "source": "H", "type": "uint8"}],
        **kw,
    })


async def test_lines_bad_lines_and_oversized_lines(pty):
    a, b = pty
    peer = Peer(b)
    try:
        async with running(device(a)) as (drv, samples, events):
            await asyncio.sleep(0.3)   # let the driver open its end
            peer.send(b"T=21.5 H=40\n")
            await until(lambda: len(samples) >= 2)
            peer.send(b"T=abc H=40\n" + b"Z" * 100 + b"\nT=22.0 H=41\n")
            await until(lambda: any(s.value == 22.0 for s in samples))
    finally:
        peer.close()
    assert [(s.point, s.value) for s in samples if s.quality is Quality.GOOD] == [
        ("t", 21.5), ("h", 40), ("t", 22.0), ("h", 41)]
    assert drv.stats["bad_lines"] == 2 and drv.stats["overflows"] == 1
    assert events[0].state is DeviceState.ONLINE


async def test_polled_mode_with_crc(pty):
    a, b = pty
    from drivers.serial_line.codec import checksum_text

    cfg = device(a, parser="csv", checksum="crc16", poll_command="READ\\r\\n", poll_interval="100ms",
                 response_timeout="300ms", terminator="\\r\\n",
                 points=[{"name": "level", "source": 0, "scale": 0.01}])
    peer = Peer(b)
    polls = []
    try:
        async with running(cfg) as (drv, samples, _events):
            async def answer():
                while True:
                    got = peer.read()
                    if b"READ" in got:
                        polls.append(got)
                        body = str(1200 + len(polls))
                        peer.send(f"{body}*{checksum_text('crc16', body)}\r\n".encode())
                    await asyncio.sleep(0.01)

            responder = asyncio.create_task(answer())
            try:
                await until(lambda: len(samples) >= 3)
            finally:
                responder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await responder
    finally:
        peer.close()
    assert [round(s.value, 2) for s in samples[:3]] == [12.01, 12.02, 12.03]
    assert drv.stats["bad_lines"] == 0


async def test_vanished_port_reconnects_at_the_same_path(pty):
    a, b = pty
    async with running(device(a)) as (_drv, samples, events):
        await asyncio.sleep(0.3)
        peer = Peer(b)
        peer.send(b"T=1 H=1\n")
        await until(lambda: len(samples) >= 2)
        peer.close()
        pty.close()          # the USB adapter is unplugged
        await until(lambda: any(e.state is DeviceState.OFFLINE for e in events))
        pty.open()           # and re-enumerates at the same path
        peer = Peer(b)
        try:
            async def fed():
                peer.send(b"T=2 H=2\n")
                await asyncio.sleep(0.1)
                return any(s.value == 2 and s.quality is Quality.GOOD for s in samples)

            for _ in range(80):
                if await fed():
                    break
        finally:
            peer.close()
    assert any(s.value == 2 for s in samples)
    assert [e.state for e in events] == [DeviceState.ONLINE, DeviceState.OFFLINE, DeviceState.ONLINE]
    assert any(s.quality is Quality.BAD for s in samples)


async def test_probe_serial_shows_lines_and_parsed_values(pty, tmp_path, capsys):
    import argparse
    import json

    from gateway.cli import probe as probe_cli

    a, b = pty
    config = tmp_path / "outpost.toml"
    config.write_text(
        '[[devices]]\ndriver = "serial_line"\nname = "th"\n'
        f'port = "{a}"\nparser = "kv"\n'
        '[[devices.points]]\nname = "t"\nsource = "T"\n'
    )
    ap = argparse.ArgumentParser()
    probe_cli.add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["probe", "serial", "--config", str(config), "--device", "th",
                          "--lines", "2", "--seconds", "10", "--json"])
    peer = Peer(b)

    async def feed():
        await asyncio.sleep(0.5)
        peer.send(b"T=19.5\nT=oops\n")

    feeder = asyncio.create_task(feed())
    try:
        rc = await probe_cli.run(args)
    finally:
        await feeder
        peer.close()
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0
    assert rows[0] == {"line": "T=19.5", "values": {"t": 19.5}}
    assert rows[1]["line"] == "T=oops" and "not a number" in rows[1]["error"]
