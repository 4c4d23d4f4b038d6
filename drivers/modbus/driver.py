"""The Modbus bus owner: one task per physical bus polls every device on it.

A bus (an RS-485 line, a TCP endpoint) carries one request at a time, so one task owns
it: it keeps the inter-frame delay, serves queued writes before queued reads, polls each
device's point groups on a drift-free monotonic schedule, and decides what a failure
means (exception codes by meaning, retries only where they are safe, a per-device circuit
breaker so that one dead slave costs the others at most its timeout per cycle).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType

from common.backoff import Backoff
from common.logs import StateLog, fields
from drivers.base import (
    DeviceEvent,
    DeviceEventSink,
    DeviceState,
    DriverError,
    Quality,
    Sample,
    SampleSink,
    WriteRejected,
    now_ms,
)
from drivers.modbus import codec
from drivers.modbus.config import (
    BIT_TABLES,
    ModbusDeviceConfig,
    ModbusPointConfig,
    RtuBusConfig,
    RtuOverTcpBusConfig,
    TcpBusConfig,
)
from drivers.modbus.planner import Hole, PlanPoint, ReadBlock, hole_between, plan_reads, split_block

log = logging.getLogger(__name__)

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge (busy)",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
CONFIG_EXCEPTIONS = (1, 2, 3)
BUSY_EXCEPTIONS = (5, 6)
GATEWAY_EXCEPTIONS = (10, 11)


class ModbusError(DriverError):
    """A request on a bus failed; the message names bus, unit and request."""


class _Timeout(ModbusError):
    retriable = True


class _BusDown(ModbusError):
    retriable = True


class _Garbage(ModbusError):
    retriable = True


class ModbusExceptionReply(ModbusError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message, retriable=code in BUSY_EXCEPTIONS)
        self.code = code


@dataclass
class _Group:
    """Points of one device sharing one poll interval, read as one plan."""

    interval: float
    points: list[ModbusPointConfig]
    next_due: float = 0.0
    blocks: list[ReadBlock] = field(default_factory=list)


@dataclass
class _DeviceState:
    cfg: ModbusDeviceConfig
    groups: list[_Group]
    points: dict[str, ModbusPointConfig]
    holes: list[Hole] = field(default_factory=list)
    bad_points: dict[str, str] = field(default_factory=dict)   # name -> reason (config errors)
    online: bool | None = None       # None until the first cycle decides
    failed_cycles: int = 0
    probe_backoff: Backoff | None = None  # while offline: when to probe again
    next_probe: float = 0.0
    last: dict[str, tuple[Any, int]] = field(default_factory=dict)   # name -> (value, ts_ms)
    reported: dict[str, tuple[Quality, str]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class _WriteJob:
    device: _DeviceState
    point: ModbusPointConfig
    registers: list[int] | None
    bits: list[bool] | None
    value: Any
    future: asyncio.Future


# Writes waiting on one bus at most (distinct points: a point's newer value replaces its
# queued one). Beyond that a command is refused at once rather than queued for minutes.
MAX_QUEUED_WRITES = 1000


def make_client(bus: Any) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
    """A pymodbus client with its own retries and reconnects off: this driver owns both."""
    common = {"timeout": bus.timeout, "retries": 0, "reconnect_delay": 0, "name": bus.name}
    client: AsyncModbusTcpClient | AsyncModbusSerialClient
    if isinstance(bus, TcpBusConfig):
        client = AsyncModbusTcpClient(bus.host, port=bus.port, **common)
    elif isinstance(bus, RtuOverTcpBusConfig):
        client = AsyncModbusTcpClient(bus.host, port=bus.port, framer=FramerType.RTU, **common)
    elif isinstance(bus, RtuBusConfig):
        client = AsyncModbusSerialClient(
            bus.port,
            framer=FramerType.RTU,
            baudrate=bus.baudrate,
            bytesize=bus.bytesize,
            parity=bus.parity,
            stopbits=bus.stopbits,
            **common,
        )
    else:
        raise DriverError(f"bus {getattr(bus, 'name', bus)!r}: unknown transport")
    # pymodbus drops a TCP connection after a few unanswered requests; on a gateway with one
    # dead unit that would cut off the live ones too. The driver decides when to reconnect.
    client.set_max_no_responses(1_000_000)
    return client


class ModbusBusDriver:
    """All devices of one Modbus bus. `run()` is the owner task body."""

    def __init__(
        self,
        bus: Any,
        devices: list[ModbusDeviceConfig],
        on_sample: SampleSink,
        on_event: DeviceEventSink,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.bus = bus
        self.name = f"modbus:{bus.name}"
        self._on_sample = on_sample
        self._on_event = on_event
        self._clock = clock
        self._rng = rng or random.Random()
        self._devices: dict[str, _DeviceState] = {}
        for dev in devices:
            if dev.bus != bus.name:
                raise DriverError(f"device {dev.name!r} is on bus {dev.bus!r}, not {bus.name!r}")
            self._devices[dev.name] = self._device_state(dev)
        self._client: Any = None
        self._next_connect = 0.0
        self._connect_backoff = Backoff(bus.reconnect_min, bus.reconnect_max, rand=self._rng.random)
        self._link_log = StateLog(log)
        self._last_frame_end = 0.0
        self._bus_timeouts = 0
        self._candidates: dict[tuple[str, ReadBlock, ReadBlock], list[bool]] = {}
        self._writes: asyncio.Queue[_WriteJob] | None = None
        self._queued: dict[tuple[str, str], _WriteJob] = {}  # not yet sent, by (device, point)
        self._polled_since_write = True
        self._wake: asyncio.Event | None = None
        self.stats: dict[str, int] = {
            "requests": 0, "timeouts": 0, "exceptions": 0, "garbage": 0, "retries": 0,
            "overruns": 0, "cycles": 0, "reconnects": 0, "writes": 0, "samples": 0,
        }

    # ----- public API -------------------------------------------------------------

    def devices(self) -> list[str]:
        return list(self._devices)

    def device_stats(self, device: str) -> dict[str, Any]:
        st = self._devices[device]
        return {
            "online": st.online, "failed_cycles": st.failed_cycles,
            "bad_points": dict(st.bad_points), "holes": list(st.holes), **st.counters,
        }

    def plan(self, device: str) -> list[ReadBlock]:
        """The current read plan of a device over all its groups (for diagnostics, tests)."""
        return [b for g in self._devices[device].groups for b in g.blocks]

    async def run(self) -> None:
        self._writes = asyncio.Queue()
        self._wake = asyncio.Event()
        start = self._clock()
        for st in self._devices.values():
            for g in st.groups:
                g.next_due = start
        try:
            me = asyncio.current_task()
            while True:
                # Python 3.11's wait_for (used inside pymodbus) can swallow a cancellation
                # that races a reply; the pending request is still visible here.
                if me is not None and me.cancelling():
                    raise asyncio.CancelledError
                await self._step()
                # A step can finish without suspending (bus down, nothing to send): yield so
                # the rest of the gateway keeps running even when this bus is saturated.
                await asyncio.sleep(0)
        finally:
            self._close_client()
            self._queued.clear()
            while self._writes and not self._writes.empty():
                job = self._writes.get_nowait()
                if not job.future.done():
                    job.future.set_exception(DriverError(f"{self.name}: driver stopped", retriable=True))

    async def write(self, device: str, point: str, value: Any) -> None:
        st = self._devices.get(device)
        if st is None:
            raise WriteRejected(f"{self.name}: no device {device!r} on this bus")
        pt = st.points.get(point)
        if pt is None:
            raise WriteRejected(f"device {device!r}: no point {point!r}")
        if not pt.writable:
            raise WriteRejected(f"device {device!r} point {point!r} is not writable")
        registers, bits = self._encode_write(st, pt, value)
        if self._writes is None or self._wake is None:
            raise DriverError(f"{self.name}: driver is not running", retriable=True)
        if st.online is False:
            raise DriverError(f"device {device!r} is offline; write not sent", retriable=True)
        fut = asyncio.get_running_loop().create_future()
        key = (device, point)
        queued = self._queued.get(key)
        if queued is not None and not queued.future.done():
            # The last value per point wins: the older one is never sent (a flood of commands
            # for one point costs one write, not one per command).
            queued.registers, queued.bits, queued.value = registers, bits, value
            old, queued.future = queued.future, fut
            old.set_exception(WriteRejected(f"device {device!r} point {point!r}: superseded by a "
                                            f"newer value before it was sent"))
        else:
            if self._writes.qsize() >= MAX_QUEUED_WRITES:
                raise WriteRejected(f"{self.name}: {MAX_QUEUED_WRITES} writes already queued on this bus; "
                                    f"write to {device}/{point} refused")
            job = _WriteJob(st, pt, registers, bits, value, fut)
            self._queued[key] = job
            self._writes.put_nowait(job)
        self._wake.set()
        await fut

    # ----- scheduling -------------------------------------------------------------

    def _device_state(self, dev: ModbusDeviceConfig) -> _DeviceState:
        by_interval: dict[float, list[ModbusPointConfig]] = {}
        for p in dev.points:
            by_interval.setdefault(p.interval or dev.interval, []).append(p)
        groups = [_Group(interval=i, points=pts) for i, pts in sorted(by_interval.items())]
        st = _DeviceState(cfg=dev, groups=groups, points={p.name: p for p in dev.points})
        for key in ("cycles_ok", "cycles_failed", "overruns"):
            st.counters[key] = 0
        self._replan(st)
        return st

    def _replan(self, st: _DeviceState) -> None:
        cfg = st.cfg
        for g in st.groups:
            pts = [
                PlanPoint(p.name, p.table, cfg.protocol_address(p), p.register_count)
                for p in g.points
                if p.name not in st.bad_points
            ]
            g.blocks = plan_reads(
                pts,
                max_registers=cfg.max_registers_per_request,
                max_bits=cfg.max_bits_per_request,
                max_gap=cfg.max_gap,
                holes=st.holes,
            )

    def _next_write(self) -> _WriteJob:
        assert self._writes is not None
        job = self._writes.get_nowait()
        key = (job.device.cfg.name, job.point.name)
        if self._queued.get(key) is job:
            del self._queued[key]  # a newer command for this point now queues anew
        return job

    async def _step(self) -> None:
        assert self._writes is not None and self._wake is not None
        now = self._clock()
        # Writes and polls take turns when both are due: a burst of commands cannot stop
        # polling, and polling cannot delay a command by more than one poll.
        if not self._writes.empty() and (self._polled_since_write or not self._poll_due(now)):
            self._polled_since_write = False
            await self._do_write(self._next_write())
            return
        best: tuple[float, _DeviceState, _Group | None] | None = None
        for st in self._devices.values():
            if st.online is False:
                cand = (st.next_probe, st, None)
                if best is None or cand[0] < best[0]:
                    best = cand
                continue
            for g in st.groups:
                if best is None or g.next_due < best[0]:
                    best = (g.next_due, st, g)
        if best is None:
            await self._wait(3600.0)
            return
        due, st, group = best
        if due > now:
            await self._wait(due - now)
            return
        self._polled_since_write = True
        if group is None:
            await self._probe(st)
        else:
            self._advance(st, group, now)
            await self._poll_group(st, group)

    def _poll_due(self, now: float) -> bool:
        for st in self._devices.values():
            if st.online is False:
                if st.next_probe <= now:
                    return True
                continue
            if any(g.next_due <= now for g in st.groups):
                return True
        return False

    async def _wait(self, delay: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _advance(self, st: _DeviceState, g: _Group, now: float) -> None:
        # Drift-free: the next tick is a multiple of the interval after the last planned one;
        # ticks that already passed are skipped and counted as overruns.
        nxt = g.next_due + g.interval
        if nxt <= now:
            missed = math.floor((now - nxt) / g.interval) + 1
            st.counters["overruns"] += missed
            self.stats["overruns"] += missed
            nxt += missed * g.interval
        g.next_due = nxt

    # ----- polling ----------------------------------------------------------------

    async def _poll_group(self, st: _DeviceState, g: _Group) -> bool:
        """Read every block of a group. Returns True when the device answered."""
        self.stats["cycles"] += 1
        failure: ModbusError | None = None
        answered = False
        pending = list(g.blocks)
        replan = False
        while pending:
            # A write waits for at most the one request in flight, not for the whole cycle;
            # one per block, so a burst of writes cannot stall the cycle either.
            if self._writes is not None and not self._writes.empty():
                await self._do_write(self._next_write())
            block = pending.pop(0)
            if failure is not None:
                # The device already failed this cycle: do not spend the bus on it again.
                self._mark(st, block.points, Quality.STALE, f"not read: {failure}")
                continue
            try:
                values = await self._read_block(st, block)
            except ModbusExceptionReply as exc:
                answered = True
                if exc.code in CONFIG_EXCEPTIONS:
                    if len(block.points) > 1 and exc.code in (2, 3):
                        left, right = split_block(block)
                        pending[:0] = [left, right]
                        st.counters["splits"] = st.counters.get("splits", 0) + 1
                        self._pending_hole(st, left, right)
                        replan = True
                        continue
                    for p in block.points:
                        self._mark_bad_point(st, p.key, f"exception {exc.code} {EXCEPTION_NAMES[exc.code]}")
                    replan = True
                    continue
                if exc.code in GATEWAY_EXCEPTIONS:
                    answered = False
                failure = exc
                self._mark(st, block.points, Quality.BAD, str(exc))
                continue
            except (_Timeout, _BusDown, _Garbage) as exc:
                failure = exc
                self._mark(st, block.points, Quality.BAD, str(exc))
                continue
            answered = True
            self._emit_block(st, block, values)
            self._confirm_hole(st, block)
        if replan:
            self._replan(st)
        self._cycle_result(st, answered and failure is None, failure)
        return answered and failure is None

    def _pending_hole(self, st: _DeviceState, left: ReadBlock, right: ReadBlock) -> None:
        # Remember the candidate; it becomes a hole when both halves read fine.
        self._candidates[(st.cfg.name, left, right)] = [False, False]

    def _confirm_hole(self, st: _DeviceState, block: ReadBlock) -> None:
        cands = self._candidates
        if not cands:
            return
        for key, ok in list(cands.items()):
            name, left, right = key
            if name != st.cfg.name:
                continue
            if block == left:
                ok[0] = True
            elif block == right:
                ok[1] = True
            if all(ok):
                hole = hole_between(left, right)
                if hole not in st.holes:
                    st.holes.append(hole)
                    log.warning("registers refused (exception 2): requests will not span them",
                                extra=fields(bus=self.name, device=st.cfg.name, unit=st.cfg.unit_id,
                                             table=hole.table, start=hole.start, end=hole.end))
                del cands[key]

    def _cycle_result(self, st: _DeviceState, ok: bool, failure: ModbusError | None) -> None:
        if ok:
            st.counters["cycles_ok"] += 1
            st.failed_cycles = 0
            if st.online is not True:
                if st.online is False:
                    log.warning("device back online", extra=fields(bus=self.name, device=st.cfg.name))
                st.online = True
                st.probe_backoff = None
                self._on_event(DeviceEvent(st.cfg.name, DeviceState.ONLINE))
            return
        st.counters["cycles_failed"] += 1
        st.failed_cycles += 1
        if st.online is not False and st.failed_cycles >= st.cfg.offline_after_failures:
            st.online = False
            st.probe_backoff = None
            reason = str(failure) if failure else "no answer"
            log.warning("device offline", extra=fields(bus=self.name, device=st.cfg.name, reason=reason))
            self._schedule_probe(st)
            self._on_event(DeviceEvent(st.cfg.name, DeviceState.OFFLINE, reason=reason))

    def _schedule_probe(self, st: _DeviceState) -> None:
        if st.probe_backoff is None:
            # From the fastest poll interval up to probe_backoff_max; the jitter keeps devices
            # that died together from probing together.
            base = min(g.interval for g in st.groups)
            st.probe_backoff = Backoff(base, max(base, st.cfg.probe_backoff_max), rand=self._rng.random)
        st.next_probe = self._clock() + st.probe_backoff.next()

    async def _probe(self, st: _DeviceState) -> None:
        # A probe is a normal cycle of the first group; success puts the device back on schedule.
        ok = await self._poll_group(st, st.groups[0])
        if ok:
            now = self._clock()
            for g in st.groups:
                g.next_due = now if g is not st.groups[0] else now + g.interval
        else:
            self._schedule_probe(st)

    def _emit_block(self, st: _DeviceState, block: ReadBlock, values: list) -> None:
        ts = now_ms()
        cfg = st.cfg
        for pp in block.points:
            pt = st.points[pp.key]
            off = pp.address - block.address
            try:
                if pt.table in BIT_TABLES:
                    raw = bool(values[off])
                else:
                    raw = codec.decode(
                        pt.type or "uint16",
                        values[off : off + pp.count],
                        pt.byte_order or cfg.byte_order,
                        bit=pt.bit,
                        encoding=pt.encoding,
                        strip=pt.strip,
                    )
                value = codec.scale_value(raw, pt.scale, pt.offset)
            except codec.CodecError as exc:
                self._mark(st, (pp,), Quality.BAD, f"decode: {exc}")
                continue
            st.last[pt.name] = (value, ts)
            st.reported[pt.name] = (Quality.GOOD, "")
            self.stats["samples"] += 1
            self._on_sample(Sample(cfg.name, pt.name, value, ts, Quality.GOOD, "", pt.datatype()))

    def _mark(self, st: _DeviceState, points, quality: Quality, reason: str) -> None:
        """Report a not-good quality once per change, never an old value as fresh."""
        ts = now_ms()
        for pp in points:
            pt = st.points[pp.key]
            if st.reported.get(pt.name) == (quality, reason):
                continue
            st.reported[pt.name] = (quality, reason)
            value, value_ts = None, ts
            if quality is Quality.STALE and pt.name in st.last:
                value, value_ts = st.last[pt.name]
            self._on_sample(Sample(st.cfg.name, pt.name, value, value_ts, quality, reason, pt.datatype()))

    def _mark_bad_point(self, st: _DeviceState, name: str, reason: str) -> None:
        if name in st.bad_points:
            return
        st.bad_points[name] = reason
        pt = st.points[name]
        log.error("point refused: check the address and table in the config", extra=fields(
            bus=self.name, device=st.cfg.name, unit=st.cfg.unit_id, point=name, table=pt.table,
            address=pt.address, reason=reason))
        self._mark(st, (PlanPoint(name, pt.table, 0, 1),), Quality.BAD, reason)

    # ----- requests ---------------------------------------------------------------

    async def _read_block(self, st: _DeviceState, block: ReadBlock) -> list:
        unit = st.cfg.unit_id
        attempts = self.bus.retries + 1
        for attempt in range(attempts):
            try:
                return await self._read_once(unit, block)
            except ModbusExceptionReply as exc:
                if exc.code in BUSY_EXCEPTIONS and attempt + 1 < attempts:
                    self.stats["retries"] += 1
                    await asyncio.sleep(self.bus.retry_delay)
                    continue
                raise
            except _Garbage:
                if attempt + 1 < attempts:
                    self.stats["retries"] += 1
                    await asyncio.sleep(self.bus.retry_delay)
                    continue
                raise
            # Timeouts are not retried at once: the next cycle is the retry, so a silent
            # unit costs the others at most one timeout per cycle.
        raise AssertionError("unreachable")

    async def _read_once(self, unit: int, block: ReadBlock) -> list:
        def call(client):
            fn = {
                "coil": client.read_coils,
                "discrete": client.read_discrete_inputs,
                "holding": client.read_holding_registers,
                "input": client.read_input_registers,
            }[block.table]
            return fn(block.address, count=block.count, device_id=unit)

        what = f"unit {unit} read {block.table} {block.address}+{block.count}"
        resp = await self._transact(unit, call, what)
        if block.table in BIT_TABLES:
            bits = list(getattr(resp, "bits", []) or [])
            # Bits come padded to whole bytes; fewer than asked, or a whole extra byte, is corrupt.
            if not block.count <= len(bits) < block.count + 8:
                self.stats["garbage"] += 1
                raise _Garbage(f"{self.name} {what}: reply has {len(bits)} bits")
            return bits[: block.count]
        regs = list(getattr(resp, "registers", []) or [])
        if len(regs) != block.count:
            self.stats["garbage"] += 1
            raise _Garbage(f"{self.name} {what}: reply has {len(regs)} registers")
        return regs

    async def _transact(self, unit: int, call, what: str):
        client = await self._ensure_client(what)
        gap = self._last_frame_end + self.bus.inter_frame_delay - self._clock()
        if gap > 0:
            await asyncio.sleep(gap)
        self.stats["requests"] += 1
        try:
            # pymodbus times out on its own; the outer guard only protects against a hang.
            async with asyncio.timeout(self.bus.timeout * 2 + 1):
                resp = await call(client)
        except ConnectionException as exc:
            self._close_client()
            raise _BusDown(f"{self.name} ({self.bus.endpoint}) {what}: connection lost: {exc}") from exc
        except (ModbusIOException, TimeoutError) as exc:
            self.stats["timeouts"] += 1
            self._bus_timeouts += 1
            if not client.connected:
                self._close_client()
                raise _BusDown(f"{self.name} ({self.bus.endpoint}) {what}: connection lost") from exc
            if self._bus_timeouts >= 3 * max(1, len(self._devices)):
                # Nobody on the bus answers: the link itself may be dead (half-open TCP).
                log.warning("no answers from any unit: reconnecting", extra=fields(bus=self.name))
                self._close_client()
            raise _Timeout(f"timeout after {self.bus.timeout:g}s ({what})") from exc
        except ModbusException as exc:
            self.stats["garbage"] += 1
            raise _Garbage(f"{self.name} {what}: {exc}") from exc
        finally:
            self._last_frame_end = self._clock()
        if resp is None:
            raise _Garbage(f"{self.name} {what}: empty reply")
        if resp.isError():
            code = getattr(resp, "exception_code", 0)
            self.stats["exceptions"] += 1
            self._bus_timeouts = 0
            raise ModbusExceptionReply(
                f"exception {code} {EXCEPTION_NAMES.get(code, 'unknown')} ({what})", code
            )
        self._bus_timeouts = 0
        return resp

    async def _ensure_client(self, what: str):
        if self._client is not None and self._client.connected:
            return self._client
        now = self._clock()
        if now < self._next_connect:
            raise _BusDown(f"{self.name} ({self.bus.endpoint}): not connected ({what} skipped)")
        self._close_client()
        client = make_client(self.bus)
        try:
            async with asyncio.timeout(self.bus.timeout + 5):
                ok = await client.connect()
        except (OSError, TimeoutError, ModbusException) as exc:
            ok = False
            err = str(exc)
        else:
            err = "connect failed"
        if not ok or not client.connected:
            client.close()
            self._next_connect = self._clock() + self._connect_backoff.next()
            self._link_log.problem("connect", "cannot connect to the bus", bus=self.name,
                                   endpoint=self.bus.endpoint, reason=err)
            raise _BusDown(f"{self.name} ({self.bus.endpoint}): cannot connect ({what} skipped)")
        if self._link_log.recovered("connect", "connected to the bus again", level=logging.WARNING,
                                    bus=self.name, endpoint=self.bus.endpoint):
            self.stats["reconnects"] += 1
        self._connect_backoff.reset()
        self._bus_timeouts = 0
        self._client = client
        return client

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    # ----- writes -----------------------------------------------------------------

    def _encode_write(self, st: _DeviceState, pt: ModbusPointConfig, value: Any):
        where = f"device {st.cfg.name!r} point {pt.name!r}"
        if pt.table == "coil":
            if not isinstance(value, bool | int) or (isinstance(value, int) and value not in (0, 1)):
                raise WriteRejected(f"{where}: a coil takes true/false, got {value!r}")
            return None, [bool(value)]
        if pt.type != "string" and isinstance(value, int | float) and not isinstance(value, bool):
            if pt.min is not None and value < pt.min:
                raise WriteRejected(f"{where}: {value} is below min {pt.min}")
            if pt.max is not None and value > pt.max:
                raise WriteRejected(f"{where}: {value} is above max {pt.max}")
        try:
            raw = codec.unscale_value(value, pt.type or "uint16", pt.scale, pt.offset)
            regs = codec.encode(
                pt.type or "uint16", raw, pt.byte_order or st.cfg.byte_order,
                length=pt.length, encoding=pt.encoding,
            )
        except codec.CodecError as exc:
            raise WriteRejected(f"{where}: {exc}") from exc
        return regs, None

    async def _do_write(self, job: _WriteJob) -> None:
        if job.future.cancelled():
            return
        st, pt = job.device, job.point
        unit = st.cfg.unit_id
        addr = st.cfg.protocol_address(pt)
        fc = pt.write_function
        if fc is None:
            fc = 5 if pt.table == "coil" else (6 if len(job.registers or ()) == 1 else 16)

        def call(client):
            if fc == 5:
                return client.write_coil(addr, job.bits[0], device_id=unit)
            if fc == 15:
                return client.write_coils(addr, job.bits, device_id=unit)
            if fc == 6:
                return client.write_register(addr, job.registers[0], device_id=unit)
            return client.write_registers(addr, job.registers, device_id=unit)

        what = f"unit {unit} write FC{fc} {pt.table} {addr} ({pt.name})"
        self.stats["writes"] += 1
        try:
            # Never retried here: a timed-out write may have been applied; the caller decides.
            await self._transact(unit, call, what)
            if pt.read_back:
                block = ReadBlock(pt.table, addr, pt.register_count,
                                  (PlanPoint(pt.name, pt.table, addr, pt.register_count),))
                values = await self._read_once(unit, block)
                expect = job.bits if pt.table == "coil" else job.registers
                if list(values) != list(expect):
                    raise ModbusError(
                        f"device {st.cfg.name!r} point {pt.name!r}: read-back after write gave "
                        f"{values}, expected {expect}"
                    )
                self._emit_block(st, block, values)
        except ModbusExceptionReply as exc:
            err: DriverError = (
                WriteRejected(f"device {st.cfg.name!r} point {pt.name!r}: {exc}")
                if exc.code in CONFIG_EXCEPTIONS else
                ModbusError(f"device {st.cfg.name!r} point {pt.name!r}: {exc}", retriable=False)
            )
            if not job.future.done():
                job.future.set_exception(err)
            return
        except ModbusError as exc:
            if not job.future.done():
                job.future.set_exception(
                    ModbusError(f"device {st.cfg.name!r} point {pt.name!r}: {exc}", retriable=False)
                )
            return
        if not job.future.done():
            job.future.set_result(None)
