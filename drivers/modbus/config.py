"""Configuration models for Modbus buses, devices and points.

The models are the schema and its documentation: every combination that cannot work on a
real device (a float32 on a coil, bit 16 of a register, address 0 with 1-based numbering)
is rejected here, before any I/O, with a message that names the point and the fix.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.base import PointInfo
from drivers.units import Duration

ByteOrder = Literal["ABCD", "DCBA", "BADC", "CDAB"]
Table = Literal["coil", "discrete", "holding", "input"]
PointType = Literal[
    "bool",
    "int16", "uint16",
    "int32", "uint32",
    "int64", "uint64",
    "float32", "float64",
    "string",
]

# Registers one value occupies; string length comes from the point's `length`.
REGISTER_COUNT: dict[str, int] = {
    "bool": 1,
    "int16": 1, "uint16": 1,
    "int32": 2, "uint32": 2, "float32": 2,
    "int64": 4, "uint64": 4, "float64": 4,
}
BIT_TABLES = ("coil", "discrete")
REGISTER_TABLES = ("holding", "input")


class _BusBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    timeout: Duration = Field(default=1.0, gt=0, description="reply timeout per request")
    inter_frame_delay: Duration = Field(
        default=0.0, ge=0, description="quiet time between the end of a reply and the next request"
    )
    retries: int = Field(default=1, ge=0, le=5, description="immediate retries of a failed request")
    retry_delay: Duration = Field(default=0.05, ge=0, description="wait before a retry (busy, timeout)")
    reconnect_min: Duration = Field(default=0.5, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _check_reconnect(self) -> _BusBase:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        return self


class RtuBusConfig(_BusBase):
    transport: Literal["rtu"]
    port: str = Field(min_length=1, description="serial device, e.g. /dev/serial/by-id/...")
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8

    @field_validator("stopbits", "bytesize", mode="before")
    @classmethod
    def _int_choice(cls, value: object) -> object:
        # Literal[1, 2] matches true and 1.0 by equality, even in strict mode.
        if isinstance(value, bool | float):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @property
    def endpoint(self) -> str:
        return self.port


class TcpBusConfig(_BusBase):
    transport: Literal["tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


class RtuOverTcpBusConfig(_BusBase):
    """RTU frames (with CRC) carried over a TCP socket, as serial-device servers do."""

    transport: Literal["rtu_over_tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


ModbusBusConfig = Annotated[
    RtuBusConfig | TcpBusConfig | RtuOverTcpBusConfig, Field(discriminator="transport")
]


class ModbusPointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    table: Table = "holding"
    address: int = Field(ge=0, le=65536, description="as in the datasheet; see address_base")
    type: PointType | None = Field(default=None, description="default: bool on coil/discrete, else uint16")
    bit: int | None = Field(default=None, description="bit 0..15 of a register, for type bool")
    length: int | None = Field(default=None, ge=1, le=125, description="registers, for type string")
    encoding: str = "ascii"
    strip: bool = True
    byte_order: ByteOrder | None = None
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    deadband: float | None = Field(default=None, ge=0)
    interval: Duration | None = Field(default=None, gt=0)
    max_report_interval: Duration | None = Field(default=None, gt=0)
    writable: bool = False
    write_function: Literal[5, 6, 15, 16] | None = None
    min: float | None = None
    max: float | None = None
    read_back: bool = False

    @field_validator("write_function", mode="before")
    @classmethod
    def _int_choice(cls, value: object) -> object:
        # Literal[1, 2] matches true and 1.0 by equality, even in strict mode.
        if isinstance(value, bool | float):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            info = codecs.lookup(value)
        except LookupError as exc:
            raise ValueError(f"unknown text encoding {value!r}") from exc
        if not info._is_text_encoding:  # rot13, base64, zlib: not bytes <-> text
            raise ValueError(f"{value!r} is not a text encoding (use e.g. ascii, utf-8, latin-1)")
        return value

    @model_validator(mode="after")
    def _check_combination(self) -> ModbusPointConfig:
        if self.type is None:
            self.type = "bool" if self.table in BIT_TABLES else "uint16"
        t = self.type
        where = f"point {self.name!r}"
        if self.table in BIT_TABLES:
            if t != "bool":
                raise ValueError(
                    f"{where}: a {self.table} holds one bit, so type must be bool, not {t}"
                )
            if self.bit is not None:
                raise ValueError(f"{where}: bit applies to holding/input registers, not a {self.table}")
        if self.bit is not None:
            if t != "bool":
                raise ValueError(f"{where}: bit needs type = \"bool\", not {t}")
            if not 0 <= self.bit <= 15:
                raise ValueError(f"{where}: bit must be 0..15 (a register has 16 bits), got {self.bit}")
        if self.table in REGISTER_TABLES and t == "bool" and self.bit is None:
            raise ValueError(f"{where}: a bool in a {self.table} register needs bit = 0..15")
        if t == "string":
            if self.length is None:
                raise ValueError(f"{where}: type string needs length (number of registers)")
        elif self.length is not None:
            raise ValueError(f"{where}: length applies only to type string")
        if t in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"{where}: scale/offset do not apply to type {t}")
        if self.scale == 0:
            raise ValueError(f"{where}: scale must not be 0")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"{where}: min {self.min} is greater than max {self.max}")
        if self.writable and self.table not in ("coil", "holding"):
            raise ValueError(f"{where}: only coil and holding points can be writable, not {self.table}")
        if self.read_back and not self.writable:
            raise ValueError(f"{where}: read_back needs writable = true")
        if self.write_function is not None:
            if not self.writable:
                raise ValueError(f"{where}: write_function needs writable = true")
            allowed = (5, 15) if self.table == "coil" else (6, 16)
            if self.write_function not in allowed:
                raise ValueError(
                    f"{where}: write_function {self.write_function} does not write a {self.table}; "
                    f"use one of {allowed}"
                )
            if self.write_function == 6 and self.register_count > 1:
                raise ValueError(
                    f"{where}: write_function 6 writes one register but {t} takes "
                    f"{self.register_count}; use 16"
                )
            if self.write_function == 6 and self.bit is not None:
                raise ValueError(f"{where}: writing one bit of a register is not supported")
        if self.writable and self.bit is not None:
            raise ValueError(
                f"{where}: writing one bit of a register would overwrite the other 15; not supported"
            )
        return self

    @property
    def register_count(self) -> int:
        """Registers (or bits, for coil/discrete) this value occupies."""
        if self.table in BIT_TABLES:
            return 1
        if self.type == "string":
            return self.length or 1
        return REGISTER_COUNT[self.type or "uint16"]

    def datatype(self) -> str:
        """The Sparkplug datatype of the published value (scaled ints become float64)."""
        t = self.type or "uint16"
        if t in ("bool", "string"):
            return t
        if self.scale != 1.0 or self.offset != 0.0:
            # A scaled register is a physical quantity: publish it as a float.
            return "float64"
        return t

    def point_info(self) -> PointInfo:
        return PointInfo(
            name=self.name,
            datatype=self.datatype(),
            unit=self.unit,
            writable=self.writable,
            min=self.min,
            max=self.max,
            deadband=self.deadband,
            max_report_interval=self.max_report_interval,
        )


class ModbusDeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    driver: Literal["modbus"] = "modbus"
    name: str = Field(min_length=1, description="Sparkplug device id")
    bus: str = Field(min_length=1)
    unit_id: int = Field(default=1, ge=0, le=255)
    byte_order: ByteOrder = "ABCD"
    address_base: Literal[0, 1] = 0
    max_registers_per_request: int = Field(default=125, ge=1, le=125)
    max_bits_per_request: int = Field(default=2000, ge=1, le=2000)
    max_gap: int = Field(default=10, ge=0, description="unused registers a request may span")
    offline_after_failures: int = Field(default=3, ge=1, description="failed cycles before OFFLINE")
    probe_backoff_max: Duration = Field(default=60.0, gt=0, description="cap of the offline probe backoff")
    interval: Duration = Field(default=1.0, gt=0, description="poll interval of points without one")
    points: list[ModbusPointConfig] = Field(min_length=1)

    @field_validator("address_base", mode="before")
    @classmethod
    def _int_choice(cls, value: object) -> object:
        # Literal[1, 2] matches true and 1.0 by equality, even in strict mode.
        if isinstance(value, bool | float):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_points(self) -> ModbusDeviceConfig:
        seen: set[str] = set()
        written: dict[str, list[tuple[int, int, int]]] = {}  # table -> (start, end, index)
        for i, p in enumerate(self.points):
            where = f"points[{i}] ({p.name!r})"
            if p.name in seen:
                raise ValueError(f"{where}: duplicate point name in device {self.name!r}")
            seen.add(p.name)
            if self.address_base == 1 and p.address == 0:
                raise ValueError(
                    f"{where}: address 0 does not exist with address_base = 1 (first address is 1)"
                )
            start = p.address - self.address_base
            if start + p.register_count > 65536:
                raise ValueError(
                    f"{where}: address {p.address} + {p.register_count} register(s) runs past 65535"
                )
            cap = self.max_bits_per_request if p.table in BIT_TABLES else self.max_registers_per_request
            if p.register_count > cap:
                raise ValueError(
                    f"{where}: the value takes {p.register_count} registers, more than "
                    f"max_registers_per_request = {cap}"
                )
            if p.writable:
                # Two writable points on one register: a write to one silently changes the other.
                end = start + p.register_count
                for s0, e0, j in written.get(p.table, []):
                    if start < e0 and s0 < end:
                        raise ValueError(
                            f"{where}: writable {p.table} {p.address}..{p.address + p.register_count - 1} "
                            f"overlaps writable points[{j}] ({self.points[j].name!r}); a write to one "
                            "would change the other"
                        )
                written.setdefault(p.table, []).append((start, end, i))
        return self

    def protocol_address(self, point: ModbusPointConfig) -> int:
        """The 0-based address sent on the wire."""
        return point.address - self.address_base

    def point_infos(self) -> list[PointInfo]:
        return [p.point_info() for p in self.points]
