"""Configuration model for serial-line sensors that print ASCII lines (NMEA, CSV, key=value).

One device is one serial port. The model fixes how the byte stream is cut into frames
(terminator, start character, fixed length, idle gap), how a frame is checked (NMEA,
CRC16, sum, LRC) and how it is parsed into points (regex, CSV columns, key=value, NMEA).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from drivers.base import PointInfo
from drivers.units import Duration

FieldType = Literal[
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float32", "float64",
    "string",
]


def unescape(text: str) -> str:
    r"""Config strings may spell control characters as \r, \n, \t or \xNN."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


class SerialPointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    source: str | int | None = Field(
        default=None,
        description="regex group name, CSV column (0-based), key, or NMEA field index; default: name",
    )
    type: FieldType = "float64"
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""
    deadband: float | None = Field(default=None, ge=0)
    max_report_interval: Duration | None = Field(default=None, gt=0)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check(self) -> SerialPointConfig:
        if self.type in ("bool", "string") and (self.scale != 1.0 or self.offset != 0.0):
            raise ValueError(f"point {self.name!r}: scale/offset do not apply to type {self.type}")
        if self.scale == 0:
            raise ValueError(f"point {self.name!r}: scale must not be 0")
        return self

    def point_info(self) -> PointInfo:
        datatype = self.type
        if self.type.startswith(("int", "uint")) and (self.scale != 1.0 or self.offset != 0.0):
            datatype = "float64"
        return PointInfo(
            name=self.name,
            datatype=datatype,
            unit=self.unit,
            writable=False,
            min=self.min,
            max=self.max,
            deadband=self.deadband,
            max_report_interval=self.max_report_interval,
        )


class SerialLineDeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    driver: Literal["serial_line"]
    name: str = Field(min_length=1, description="Sparkplug device id")
    port: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    encoding: str = "ascii"

    framing: Literal["terminator", "start", "fixed", "idle"] = "terminator"
    terminator: str = Field(default="\\n", description=r'end of a frame, e.g. "\r\n"')
    start: str | None = Field(default=None, description="first character of a frame (framing = start)")
    frame_length: int | None = Field(default=None, ge=1, description="bytes per frame (framing = fixed)")
    idle_gap: Duration = Field(default=0.05, gt=0, description="silence that ends a frame (framing = idle)")
    max_line_length: int = Field(default=512, ge=1, description="longer frames are dropped; reader resyncs")

    poll_command: str | None = Field(default=None, description="sent every poll_interval (polled mode)")
    poll_interval: Duration | None = Field(default=None, gt=0)
    response_timeout: Duration = Field(default=1.0, gt=0)

    checksum: Literal["none", "nmea", "crc16", "sum8", "lrc"] = "none"
    checksum_separator: str = Field(default="*", min_length=1)

    parser: Literal["regex", "csv", "kv", "nmea"] = "csv"
    pattern: str | None = Field(default=None, description="regex with named groups (parser = regex)")
    delimiter: str = Field(default=",", min_length=1, description="CSV column separator")
    pair_separator: str | None = Field(default=None, description="key=value pairs separator; default whitespace or ,")
    kv_separator: str = Field(default="=", min_length=1)
    sentence: str | None = Field(default=None, description="NMEA sentence to accept, e.g. GPGGA")

    offline_after: Duration = Field(
        default=10.0, gt=0, description="no valid frame for this long: device OFFLINE"
    )
    reconnect_min: Duration = Field(default=0.5, gt=0)
    reconnect_max: Duration = Field(default=30.0, gt=0)
    points: list[SerialPointConfig] = Field(min_length=1)

    @field_validator("stopbits", "bytesize", mode="before")
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

    @field_validator("terminator", "start", "poll_command")
    @classmethod
    def _escapes(cls, value: str | None) -> str | None:
        # Checked here so that a bad escape or a non-latin-1 character fails validation,
        # not the driver when it starts.
        if value is not None:
            try:
                unescape(value).encode("latin-1")
            except (UnicodeError, ValueError) as exc:
                raise ValueError(
                    f"{value!r}: not a byte string (use \\r, \\n, \\t, \\xNN and latin-1 characters): {exc}"
                ) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> SerialLineDeviceConfig:
        if self.framing == "terminator" and not self.terminator_bytes:
            raise ValueError("framing = \"terminator\" needs a non-empty terminator")
        if self.framing == "start" and not self.start:
            raise ValueError("framing = \"start\" needs start (the first character of a frame)")
        if self.framing == "fixed" and self.frame_length is None:
            raise ValueError("framing = \"fixed\" needs frame_length")
        if self.framing == "fixed" and self.frame_length and self.frame_length > self.max_line_length:
            raise ValueError("frame_length is larger than max_line_length")
        if (self.poll_command is None) != (self.poll_interval is None):
            raise ValueError("polled mode needs both poll_command and poll_interval")
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("reconnect_max must be >= reconnect_min")
        if self.parser == "regex":
            if not self.pattern:
                raise ValueError("parser = \"regex\" needs pattern (a regex with named groups)")
            try:
                compiled = re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a valid regex: {exc}") from exc
            for i, p in enumerate(self.points):
                src = p.source if p.source is not None else p.name
                if isinstance(src, int):
                    if src > compiled.groups:
                        raise ValueError(f"points[{i}] ({p.name!r}): pattern has no group {src}")
                elif src not in compiled.groupindex:
                    raise ValueError(f"points[{i}] ({p.name!r}): pattern has no group named {src!r}")
        if self.parser in ("csv", "nmea"):
            for i, p in enumerate(self.points):
                if not isinstance(p.source, int) or p.source < 0:
                    raise ValueError(
                        f"points[{i}] ({p.name!r}): parser {self.parser} needs source = a 0-based "
                        "field index"
                    )
        if self.parser == "nmea" and self.checksum not in ("none", "nmea"):
            raise ValueError("parser = \"nmea\" uses the NMEA checksum; set checksum = \"nmea\"")
        names = [p.name for p in self.points]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate point names: {sorted(dup)}")
        return self

    @property
    def terminator_bytes(self) -> bytes:
        return unescape(self.terminator).encode("latin-1")

    @property
    def start_bytes(self) -> bytes:
        return unescape(self.start or "").encode("latin-1")

    @property
    def poll_bytes(self) -> bytes:
        return unescape(self.poll_command or "").encode("latin-1")

    def point_infos(self) -> list[PointInfo]:
        return [p.point_info() for p in self.points]
