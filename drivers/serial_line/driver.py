"""The serial-line driver: one task owns one serial port and turns lines into samples.

It reopens the port when it vanishes (a USB adapter that re-enumerates at the same path),
counts bad lines instead of failing on them, and in polled mode sends the command and
waits for one answer with a timeout. The device is ONLINE while valid frames arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import serial
import serial_asyncio_fast

from common.backoff import Backoff
from common.logs import StateLog
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
from drivers.serial_line.codec import BadLine, Framer, LineParser, SkipLine
from drivers.serial_line.config import SerialLineDeviceConfig

log = logging.getLogger(__name__)

_PARITY = {"N": serial.PARITY_NONE, "E": serial.PARITY_EVEN, "O": serial.PARITY_ODD}


class SerialLineDriver:
    def __init__(
        self, cfg: SerialLineDeviceConfig, on_sample: SampleSink, on_event: DeviceEventSink
    ) -> None:
        self.cfg = cfg
        self.name = f"serial:{cfg.name}"
        self._on_sample = on_sample
        self._on_event = on_event
        self._parser = LineParser(cfg)
        self._infos = {i.name: i for i in cfg.point_infos()}
        self._online: bool | None = None
        self._last_good = 0.0
        self._bad_log = StateLog(log)
        self.stats = {"frames": 0, "bad_lines": 0, "overflows": 0, "samples": 0,
                      "reconnects": 0, "poll_timeouts": 0}
        self.last_bad_line = ""

    def devices(self) -> list[str]:
        return [self.cfg.name]

    async def write(self, device: str, point: str, value: Any) -> None:
        raise WriteRejected(f"serial-line device {device!r}: points are read-only")

    async def run(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min, self.cfg.reconnect_max)
        port_log = StateLog(log)
        while True:
            try:
                reader, writer = await serial_asyncio_fast.open_serial_connection(
                    url=self.cfg.port,
                    baudrate=self.cfg.baudrate,
                    bytesize=self.cfg.bytesize,
                    parity=_PARITY[self.cfg.parity],
                    stopbits=self.cfg.stopbits,
                )
            except (OSError, serial.SerialException) as exc:
                port_log.problem("port", "cannot open the serial port", device=self.name,
                                 port=self.cfg.port, reason=str(exc))
                self._set_online(False, f"port {self.cfg.port} unavailable: {exc}")
                await asyncio.sleep(backoff.next())
                continue
            if port_log.recovered("port", "serial port open again", level=logging.WARNING,
                                  device=self.name, port=self.cfg.port):
                self.stats["reconnects"] += 1
            backoff.reset()
            self._last_good = time.monotonic()
            try:
                await self._session(reader, writer)
            except (OSError, serial.SerialException, EOFError) as exc:
                port_log.problem("port", "serial port lost", device=self.name, port=self.cfg.port,
                                 reason=str(exc))
                self._set_online(False, f"port {self.cfg.port} lost: {exc}")
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            await asyncio.sleep(backoff.next())

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = Framer(self.cfg)
        polled = self.cfg.poll_command is not None
        next_poll = time.monotonic()
        while True:
            now = time.monotonic()
            if polled:
                assert self.cfg.poll_interval is not None
                if now < next_poll:
                    await asyncio.sleep(next_poll - now)
                next_poll += self.cfg.poll_interval
                if next_poll < time.monotonic():   # overrun: skip missed polls
                    next_poll = time.monotonic() + self.cfg.poll_interval
                writer.write(self.cfg.poll_bytes)
                await writer.drain()
                got = await self._read_frames(reader, framer, self.cfg.response_timeout, until_one=True)
                if not got:
                    self.stats["poll_timeouts"] += 1
                    self._check_silence(f"no answer to poll within {self.cfg.response_timeout:g}s")
            else:
                wait = self.cfg.idle_gap if self.cfg.framing in ("idle", "start") else 1.0
                await self._read_frames(reader, framer, wait, until_one=False)
                self._check_silence(f"no valid line for {self.cfg.offline_after:g}s")

    async def _read_frames(self, reader, framer: Framer, wait_s: float, *, until_one: bool) -> int:
        handled = 0
        deadline = time.monotonic() + wait_s
        while True:
            remaining = deadline - time.monotonic() if until_one else wait_s
            if remaining <= 0:
                return handled
            try:
                async with asyncio.timeout(remaining):
                    data = await reader.read(4096)
            except TimeoutError:
                frames = framer.flush()
                for f in frames:
                    handled += self._handle(f)
                return handled
            if not data:
                raise EOFError("end of stream")
            before = framer.overflows
            frames = framer.feed(data)
            if framer.overflows > before:
                n = framer.overflows - before
                self.stats["overflows"] += n
                self._bad(f"line longer than max_line_length = {self.cfg.max_line_length}", b"")
            for f in frames:
                handled += self._handle(f)
            if handled and until_one:
                return handled
            if not until_one:
                return handled

    def _handle(self, frame: bytes) -> int:
        self.stats["frames"] += 1
        try:
            values = self._parser.parse(frame)
        except SkipLine:
            return 0
        except BadLine as exc:
            self._bad(str(exc), frame)
            return 0
        ts = now_ms()
        self._last_good = time.monotonic()
        self._set_online(True, "")
        for name, value in values.items():
            self.stats["samples"] += 1
            self._on_sample(
                Sample(self.cfg.name, name, value, ts, Quality.GOOD, "", self._infos[name].datatype)
            )
        return 1

    def _bad(self, reason: str, frame: bytes) -> None:
        self.stats["bad_lines"] += 1
        self.last_bad_line = frame[:200].decode("latin-1")
        # Log each kind of problem once, not every line; the counter tells the rest.
        self._bad_log.once(reason, "bad line", device=self.name, port=self.cfg.port, reason=reason)

    def _check_silence(self, reason: str) -> None:
        if time.monotonic() - self._last_good > self.cfg.offline_after:
            self._set_online(False, reason)

    def _set_online(self, online: bool, reason: str) -> None:
        if self._online is online:
            return
        if online is False and self._online is None:
            self._online = False
            self._on_event(DeviceEvent(self.cfg.name, DeviceState.OFFLINE, reason=reason))
            return
        self._online = online
        if not online:
            ts = now_ms()
            for name, info in self._infos.items():
                self._on_sample(Sample(self.cfg.name, name, None, ts, Quality.BAD, reason, info.datatype))
        self._on_event(
            DeviceEvent(self.cfg.name, DeviceState.ONLINE if online else DeviceState.OFFLINE, reason)
        )
