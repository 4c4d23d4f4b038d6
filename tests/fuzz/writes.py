"""Write commands on every path, checked where they land: a real pymodbus server.

Paths: a Kafka `device_command` message through `KafkaInbound` (strict JSON parsing and its
write check, with `specs`), and a Sparkplug DCMD through `parse_dcmd` then the one write
check (`CheckedWriter`, as the supervisor wraps its write callback). Both end in a real
`ModbusBusDriver` talking Modbus TCP to `drivers.modbus.simserver`.

The oracle is independent of gateway/writes.py: whatever the server received is decoded with
the point's type, byte order and scale, and must be finite, inside the point's min/max, of
the commanded type (true/false for a coil, never a rounded 42.7) and equal to the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import struct
from collections import namedtuple
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from drivers.base import DriverError
from drivers.modbus import codec
from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver
from drivers.modbus.simserver import SimServer, SimUnit
from gateway.inbound.kafka_commands import InboundMapping, KafkaInbound
from gateway.sparkplug.edge import AliasTable
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.node import parse_dcmd
from gateway.sparkplug.payload import DataType, Metric, Payload, decode_payload, encode_payload
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.writes import CheckedWriter, specs_from_config

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
logging.getLogger("gateway.inbound.kafka_commands").setLevel(logging.CRITICAL)

DEVICE = "plc"
POINTS: list[dict[str, Any]] = [
    {"name": "i16", "address": 0, "type": "int16", "writable": True, "min": -1000, "max": 1000},
    {"name": "u16", "address": 1, "type": "uint16", "writable": True},
    {"name": "s32", "address": 2, "type": "int32", "scale": 0.1, "writable": True, "min": -500.0, "max": 500.0},
    {"name": "u32", "address": 4, "type": "uint32", "writable": True, "max": 4e9, "byte_order": "CDAB"},
    {"name": "f32", "address": 6, "type": "float32", "writable": True, "min": -1e6, "max": 1e6},
    {"name": "f64", "address": 8, "type": "float64", "writable": True},
    {"name": "i64", "address": 12, "type": "int64", "writable": True, "byte_order": "DCBA"},
    {"name": "u64", "address": 16, "type": "uint64", "writable": True},
    {"name": "u16off", "address": 20, "type": "uint16", "scale": 0.5, "offset": -10.0, "writable": True},
    {"name": "str", "address": 21, "type": "string", "length": 2, "writable": True},
    {"name": "ro", "address": 23, "type": "int16"},
    {"name": "coil", "table": "coil", "address": 0, "writable": True},
]
NAMES = [p["name"] for p in POINTS]

Msg = namedtuple("Msg", "topic partition offset key value")

# -- strategies -------------------------------------------------------------------------------

_BOUNDARIES = [0, 1, -1, 2**15 - 1, 2**15, -(2**15), -(2**15) - 1, 2**16 - 1, 2**16, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**63 - 1, 2**63, -(2**63) - 1, 2**64 - 1, 2**64, 1000, 1001, -1001,
               500.0, 500.05, 4e9, 4e9 + 1, 1e6, 1e6 + 0.5, 3.4028234663852886e38, 3.5e38, 1e308,
               42.7, 4.2, 4.27, 0.1, 0.5, -10.0, -10.25, 5e-324]

values = st.one_of(
    st.sampled_from(_BOUNDARIES),
    st.sampled_from(_BOUNDARIES).map(lambda v: -v),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1100, max_value=1100).map(lambda v: round(v, 2)),
    st.booleans(),
    st.text(max_size=6),
    st.none(),
    st.just([1]),
    st.just({"a": 1}),
)

# JSON number spellings that Python's json takes but a device must never see.
_NASTY_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" + "0" * 5000, "-" + "9" * 4400,
                 "42.7", "4.2e1", "1E2", "-0", "0.0", "[" * 3000 + "]" * 3000]


@st.composite
def kafka_messages(draw: st.DrawFn) -> tuple[bytes, tuple[str, str, str]]:
    """(raw message, (device, point, value JSON text))."""
    device = draw(st.sampled_from([DEVICE, DEVICE, DEVICE, "other"]))
    point = draw(st.sampled_from([*NAMES, "nope"]))
    if draw(st.integers(0, 3)) == 0:
        token = draw(st.sampled_from(_NASTY_TOKENS))
    else:
        token = json.dumps(draw(values))  # NaN and Infinity come out as those tokens
    raw = f'{{"device": {json.dumps(device)}, "point": {json.dumps(point)}, "value": {token}}}'
    return raw.encode(), (device, point, token)


_DATATYPES = [DataType.Int16, DataType.UInt16, DataType.Int32, DataType.UInt32, DataType.Int64,
              DataType.UInt64, DataType.Float, DataType.Double, DataType.Boolean, DataType.String]


@st.composite
def dcmd_payloads(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, Any]]] | None:
    metrics = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from([*NAMES, "nope"]))
        dt = draw(st.sampled_from(_DATATYPES))
        metrics.append(Metric(name, dt, draw(values)))
    try:
        raw = encode_payload(Payload(timestamp=1, metrics=metrics))
    except (PayloadError, TypeError, ValueError, OverflowError):
        return None  # not encodable as a Sparkplug payload: nothing to send
    # The command is what the wire carries (a Float metric holds a float32 of the value).
    return raw, [(m.name, m.value) for m in decode_payload(raw).metrics]


# -- the rig ----------------------------------------------------------------------------------


@dataclass
class Stats:
    cases: int = 0
    reached: int = 0  # writes that reached the device (the check is not vacuous)
    refused: int = 0
    failures: list[str] = field(default_factory=list)


class WriteRig:
    """A pymodbus server, the Modbus driver polling it, and both write paths, on one loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.stats = Stats()

    def start(self) -> WriteRig:
        self.loop.run_until_complete(self._start())
        return self

    async def _start(self) -> None:
        self.unit = SimUnit()
        self.unit.set_range("holding", 0, [0] * 32)
        self.unit.set_range("coil", 0, [False] * 4)
        self.server = await SimServer.tcp({1: self.unit})
        bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1", port=self.server.port,
                           timeout="500ms", reconnect_min="50ms", reconnect_max="200ms")
        self.device = ModbusDeviceConfig.model_validate(
            {"name": DEVICE, "bus": "b", "unit_id": 1, "interval": "1s", "points": POINTS})
        self.points = {p.name: p for p in self.device.points}
        self.driver = ModbusBusDriver(bus, [self.device], lambda s: None, lambda e: None)
        self.task = asyncio.get_running_loop().create_task(self.driver.run(), name="fuzz-modbus")
        cfg = type("Cfg", (), {"devices": [self.device]})()
        self.specs = specs_from_config(cfg)
        self.infos = {DEVICE: self.device.point_infos()}
        self.aliases = AliasTable(self.infos)
        self.inbound = KafkaInbound(
            KafkaSettings(bootstrap_servers=("127.0.0.1:9",)),
            InboundMapping("cmds", ("cmds",), "fuzz", "device_command"),
            write=self.driver.write, write_attempts=1, specs=self.specs,
        )
        self.checked = CheckedWriter(self.specs, self.driver.write)
        for _ in range(200):  # the driver has connected and polled once
            if self.unit.reads:
                return
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        async def _stop() -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            await self.server.stop()

        self.loop.run_until_complete(_stop())
        self.loop.close()

    # -- paths ---------------------------------------------------------------------------

    def kafka(self, raw: bytes, command: tuple[str, str, str]) -> None:
        before = len(self.unit.writes)
        counts = self.inbound.state.counters
        rejected = counts["rejected"] + counts["malformed"]
        try:
            self.loop.run_until_complete(self.inbound._handle(Msg("cmds", 0, self.stats.cases, None, raw)))
        except Exception as exc:  # the inbound task would have died here
            self.stats.failures.append(f"kafka: {raw[:200]!r}: crashed: {type(exc).__name__}: {exc}")
        self.stats.cases += 1
        self.stats.refused += counts["rejected"] + counts["malformed"] - rejected
        device, point, token = command
        try:
            value = json.loads(token)
        except (ValueError, RecursionError):
            value = token  # not a value Python can hold: it must not have been written
        self._oracle(before, [(point, value)] if device == DEVICE else [], "kafka", raw[:200])

    def dcmd(self, payload: bytes, commands: list[tuple[str, Any]]) -> None:
        before = len(self.unit.writes)
        writes, rejected = parse_dcmd(DEVICE, payload, self.infos[DEVICE], self.aliases)
        self.stats.cases += 1
        self.stats.refused += len(rejected)

        async def run() -> None:
            for w in writes:
                try:
                    await self.checked(w.device, w.point, w.value)
                except DriverError:  # WriteRejected included: what SparkplugUplink._write logs
                    self.stats.refused += 1
                except Exception as exc:
                    self.stats.failures.append(f"dcmd: {commands!r}: crashed: {type(exc).__name__}: {exc}")

        self.loop.run_until_complete(run())
        self._oracle(before, commands, "dcmd", commands)

    # -- oracle --------------------------------------------------------------------------

    def _oracle(self, before: int, commands: list[tuple[str, Any]], path: str, what: Any) -> None:
        for table, address, regs in self.unit.writes[before:]:
            self.stats.reached += 1
            pt = next(p for p in self.points.values()
                      if p.table == table and self.device.protocol_address(p) == address)
            wanted = [v for name, v in commands if name == pt.name]
            problem = _landed_wrong(pt, self.device.byte_order, regs, wanted)
            if problem:
                self.stats.failures.append(f"{path}: {what!r}: {pt.name}: {problem}")


def _landed_wrong(pt: Any, byte_order: str, regs: list[Any], wanted: list[Any]) -> str | None:
    """Why what the device received is not an allowed, exact rendering of a command."""
    if not pt.writable:
        return "a read-only point was written"
    if not wanted:
        return f"{regs} was written but no command named this point"
    if pt.table == "coil":
        ok = [w for w in wanted if isinstance(w, bool) and w == bool(regs[0])]
        return None if ok else f"coil got {regs} for commands {wanted!r} (only true/false may reach a coil)"
    raw = codec.decode(pt.type, [int(r) for r in regs], pt.byte_order or byte_order)
    if pt.type == "string":
        ok = [w for w in wanted if isinstance(w, str) and raw == w.strip("\x00 ")]
        return None if ok else f"string {raw!r} for {wanted!r}"
    value = raw * pt.scale + pt.offset if (pt.scale, pt.offset) != (1.0, 0.0) else raw
    if isinstance(value, float) and not math.isfinite(value):
        return f"non-finite {value!r} reached the device"
    if (pt.min is not None and value < pt.min) or (pt.max is not None and value > pt.max):
        return f"{value!r} is outside min {pt.min} / max {pt.max}"
    for w in wanted:
        if isinstance(w, bool) or not isinstance(w, int | float):
            continue
        if isinstance(w, int) and (pt.scale, pt.offset) == (1.0, 0.0):
            if value == w:  # an integer reaches a float register exactly or not at all
                return None
        elif pt.type == "float32":
            try:
                expect = struct.unpack(">f", struct.pack(">f", w))[0]
            except OverflowError:
                continue
            if value == expect:
                return None
        elif (pt.scale, pt.offset) != (1.0, 0.0):
            if math.isclose(value, w, rel_tol=1e-9, abs_tol=1e-9):
                return None
        elif value == w:
            return None
    return f"{value!r} written for commands {wanted!r} (not the commanded value: rounded or coerced)"
