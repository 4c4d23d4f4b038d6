"""An in-process Modbus server (pymodbus) with a store the caller controls.

Used by the component tests, the benchmark and demos: each unit id has sparse tables
(addresses not set answer exception 2), and a unit can be made silent, busy, slow or
answer with the wrong number of registers, to exercise the driver's failure handling.
`SimUnit.set_value` stores a typed value (or one bit) at an address as a real device keeps
it, so a test can serve a meter's register map from its datasheet.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from drivers.modbus import codec
from drivers.modbus.config import BIT_TABLES

# function code -> table
_READ_FC = {1: "coil", 2: "discrete", 3: "holding", 4: "input"}
_WRITE_FC = {5: "coil", 15: "coil", 6: "holding", 16: "holding"}


@dataclass
class SimUnit:
    tables: dict[str, dict[int, int | bool]] = field(
        default_factory=lambda: {"coil": {}, "discrete": {}, "holding": {}, "input": {}}
    )
    silent: bool = False          # no reply at all (a dead slave)
    busy_replies: int = 0         # answer the next N requests with exception 6
    exception: int | None = None  # answer every request with this exception code
    delay_s: float = 0.0          # reply late
    short_reply: bool = False     # one register fewer than asked (a corrupt reply)
    requests: int = 0
    reads: int = 0
    writes: list[tuple[str, int, list]] = field(default_factory=list)

    def set_range(self, table: str, address: int, values: list) -> None:
        for i, v in enumerate(values):
            self.tables[table][address + i] = v

    def set_value(self, table: str, address: int, value_type: str, value: Any,
                  byte_order: str = "ABCD", *, scale: float = 1.0, offset: float = 0.0,
                  bit: int | None = None, length: int | None = None) -> None:
        """Store one engineering value as a device keeps it: unscaled, encoded, in place.
        A bool with `bit` sets or clears that bit of the register, leaving the others."""
        if table in BIT_TABLES:
            self.tables[table][address] = bool(value)
            return
        if value_type == "bool":
            if bit is None:
                raise ValueError("a bool in a register needs its bit")
            reg = int(self.tables[table].get(address, 0))
            self.tables[table][address] = reg | (1 << bit) if value else reg & ~(1 << bit)
            return
        raw = value
        if value_type != "string" and (scale != 1.0 or offset != 0.0):
            raw = (value - offset) / scale
            if value_type not in ("float32", "float64"):
                raw = round(raw)
        self.set_range(table, address, codec.encode(value_type, raw, byte_order, length=length))


class _Store:
    """Duck-typed pymodbus server context backed by SimUnit tables."""

    def __init__(self, units: dict[int, SimUnit]) -> None:
        self.units = units

    def device_ids(self) -> list[int]:
        return list(self.units)

    def _unit(self, device_id: int) -> SimUnit:
        unit = self.units.get(device_id)
        if unit is None or unit.silent:
            raise NoSuchIdException(f"unit {device_id} is silent")
        unit.requests += 1
        return unit

    async def _common(self, unit: SimUnit) -> ExcCodes | None:
        if unit.delay_s:
            await asyncio.sleep(unit.delay_s)
        if unit.busy_replies > 0:
            unit.busy_replies -= 1
            return ExcCodes.DEVICE_BUSY
        if unit.exception is not None:
            return ExcCodes(unit.exception)
        return None

    async def async_getValues(self, device_id, func_code, address, count=1):
        if func_code in _WRITE_FC:
            # pymodbus reads the written values back to build the write reply.
            unit = self.units[device_id]
            table = unit.tables[_WRITE_FC[func_code]]
            return [table[a] for a in range(address, address + count)]
        unit = self._unit(device_id)
        exc = await self._common(unit)
        if exc is not None:
            return exc
        unit.reads += 1
        table = unit.tables[_READ_FC[func_code]]
        try:
            values = [table[a] for a in range(address, address + count)]
        except KeyError:
            return ExcCodes.ILLEGAL_ADDRESS
        if unit.short_reply and func_code in (3, 4):
            values = values[:-1]
        return values

    async def async_setValues(self, device_id, func_code, address, values):
        unit = self._unit(device_id)
        exc = await self._common(unit)
        if exc is not None:
            return exc
        table = unit.tables[_WRITE_FC[func_code]]
        if any(a not in table for a in range(address, address + len(values))):
            return ExcCodes.ILLEGAL_ADDRESS
        for i, v in enumerate(values):
            table[address + i] = v
        unit.writes.append((_WRITE_FC[func_code], address, list(values)))
        return None


def _placeholder() -> SimDevice:
    return SimDevice(id=1, simdata=[SimData(0, count=1, values=0, datatype=DataType.REGISTERS)])


class SimServer:
    """Start with `await SimServer.tcp(units)` or `.rtu(port, units)`; stop with `await stop()`."""

    def __init__(self, server, units: dict[int, SimUnit]) -> None:
        self.server = server
        self.units = units
        server.context = _Store(units)

    @classmethod
    async def tcp(cls, units: dict[int, SimUnit], host: str = "127.0.0.1", port: int = 0,
                  framer: FramerType = FramerType.SOCKET) -> SimServer:
        server = ModbusTcpServer(
            _placeholder(), address=(host, port), framer=framer, ignore_missing_devices=True
        )
        self = cls(server, units)
        await server.serve_forever(background=True)
        return self

    @classmethod
    async def rtu(cls, port: str, units: dict[int, SimUnit], baudrate: int = 19200) -> SimServer:
        server = ModbusSerialServer(
            _placeholder(), port=port, framer=FramerType.RTU, baudrate=baudrate,
            ignore_missing_devices=True, reconnect_delay=0.2,
        )
        self = cls(server, units)
        await server.serve_forever(background=True)
        return self

    @property
    def port(self) -> int:
        sockets = self.server.transport.sockets if self.server.transport else []
        return sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self.server.shutdown()
