"""Pure serial-line codec: framing a byte stream, verifying checksums, parsing into points.

The driver feeds received bytes to a `Framer` and hands each frame to `parse_frame`.
Everything that can be wrong with a line raises `BadLine` with the reason, so the driver
counts it and goes on. No I/O here.
"""

from __future__ import annotations

import re
from typing import Any

from drivers.base import DriverError
from drivers.serial_line.config import SerialLineDeviceConfig, SerialPointConfig

_INT_RANGES = {
    "int8": (-(2**7), 2**7 - 1), "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1), "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1), "uint64": (0, 2**64 - 1),
}
_TRUE = {"1", "true", "on", "yes", "t", "y"}
_FALSE = {"0", "false", "off", "no", "f", "n"}


class BadLine(DriverError):
    """A frame that cannot be used: too long, wrong checksum, missing field, not a number."""


class Framer:
    """Cuts a byte stream into frames and resynchronises after an overlong frame."""

    def __init__(self, cfg: SerialLineDeviceConfig) -> None:
        self.mode = cfg.framing
        self.terminator = cfg.terminator_bytes
        self.start = cfg.start_bytes
        self.length = cfg.frame_length or 0
        self.max_len = cfg.max_line_length
        self._buf = bytearray()
        self._discarding = False      # inside an overlong frame: drop until the next boundary
        self.overflows = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if self.mode == "terminator":
            return self._by_terminator()
        if self.mode == "start":
            return self._by_start()
        if self.mode == "fixed":
            out = []
            while len(self._buf) >= self.length:
                out.append(bytes(self._buf[: self.length]))
                del self._buf[: self.length]
            return out
        # idle: frames end on silence (flush); only guard the length here
        if len(self._buf) > self.max_len:
            self.overflows += 1
            self._buf.clear()
            self._discarding = True
        return []

    def flush(self) -> list[bytes]:
        """The line went quiet: whatever is buffered is one frame (idle and start framing)."""
        if self.mode == "idle":
            frame, self._discarding = bytes(self._buf), False
            self._buf.clear()
            return [frame] if frame else []
        if self.mode == "start" and self._buf.startswith(self.start) and not self._discarding:
            frame = bytes(self._buf)
            self._buf.clear()
            return [frame]
        return []

    def _by_terminator(self) -> list[bytes]:
        out = []
        while True:
            idx = self._buf.find(self.terminator)
            if idx < 0:
                if len(self._buf) > self.max_len:
                    # Keep a possible partial terminator at the end, drop the rest.
                    keep = len(self.terminator) - 1
                    if not self._discarding:
                        self.overflows += 1
                    self._discarding = True
                    del self._buf[: len(self._buf) - keep]
                return out
            frame = bytes(self._buf[:idx])
            del self._buf[: idx + len(self.terminator)]
            if self._discarding:
                self._discarding = False      # the tail of the overlong line: drop it
                continue
            if len(frame) > self.max_len:
                self.overflows += 1
                continue
            out.append(frame)

    def _by_start(self) -> list[bytes]:
        out = []
        while True:
            first = self._buf.find(self.start)
            if first < 0:
                self._buf.clear()
                return out
            if first > 0:
                del self._buf[:first]          # noise before a start character
            nxt = self._buf.find(self.start, len(self.start))
            if nxt < 0:
                if len(self._buf) > self.max_len:
                    self.overflows += 1
                    self._buf.clear()
                return out
            frame = bytes(self._buf[:nxt])
            del self._buf[:nxt]
            if len(frame) > self.max_len:
                self.overflows += 1
                continue
            out.append(frame.rstrip(b"\r\n"))


def nmea_checksum(body: str) -> int:
    value = 0
    for ch in body.encode("latin-1"):
        value ^= ch
    return value


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def lrc(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def checksum_text(kind: str, payload: str) -> str:
    """The checksum a sender appends after the separator (hex, upper case)."""
    data = payload.encode("latin-1")
    if kind == "nmea":
        return f"{nmea_checksum(payload.lstrip('$!')):02X}"
    if kind == "crc16":
        return f"{crc16_modbus(data):04X}"
    if kind == "sum8":
        return f"{sum8(data):02X}"
    if kind == "lrc":
        return f"{lrc(data):02X}"
    raise BadLine(f"unknown checksum {kind!r}")


def verify_checksum(line: str, kind: str, separator: str = "*") -> str:
    """Return the payload of a line whose trailing checksum matches; raise BadLine if not."""
    if kind == "none":
        return line
    if kind == "nmea":
        separator = "*"
    idx = line.rfind(separator)
    if idx < 0:
        raise BadLine(f"no {kind} checksum (missing {separator!r})")
    payload, given = line[:idx], line[idx + len(separator) :].strip()
    want = checksum_text(kind, payload)
    if given.upper() != want:
        raise BadLine(f"{kind} checksum mismatch: line says {given!r}, computed {want}")
    return payload


def convert(point: SerialPointConfig, text: str) -> Any:
    """Text field -> typed, scaled value of a point."""
    t = point.type
    text = text.strip()
    if t == "string":
        return text
    if t == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise BadLine(f"point {point.name!r}: {text!r} is not a boolean")
    try:
        if t in _INT_RANGES:
            num: float | int = int(text, 0) if text.lower().startswith(("0x", "-0x")) else int(text)
            lo, hi = _INT_RANGES[t]
            if not lo <= num <= hi:
                raise BadLine(f"point {point.name!r}: {num} out of range for {t}")
        else:
            num = float(text)
    except ValueError:
        if t in _INT_RANGES:
            try:
                as_float = float(text)
            except ValueError:
                raise BadLine(f"point {point.name!r}: {text!r} is not a number") from None
            if not as_float.is_integer():
                raise BadLine(f"point {point.name!r}: {text!r} is not an integer") from None
            num = int(as_float)
        else:
            raise BadLine(f"point {point.name!r}: {text!r} is not a number") from None
    if point.scale != 1.0 or point.offset != 0.0:
        return num * point.scale + point.offset
    return num


class LineParser:
    """Parses one frame of a device into {point name: value}."""

    def __init__(self, cfg: SerialLineDeviceConfig) -> None:
        self.cfg = cfg
        self._regex = re.compile(cfg.pattern) if cfg.parser == "regex" and cfg.pattern else None
        if cfg.pair_separator:
            self._pair_split = re.compile(re.escape(cfg.pair_separator))
        else:
            self._pair_split = re.compile(r"[\s,;]+")

    def parse(self, frame: bytes) -> dict[str, Any]:
        cfg = self.cfg
        try:
            line = frame.decode(cfg.encoding)
        except UnicodeDecodeError as exc:
            raise BadLine(f"not {cfg.encoding} text: {exc}") from None
        line = line.strip("\r\n\x00 ")
        if not line:
            raise BadLine("empty line")
        payload = verify_checksum(line, cfg.checksum, cfg.checksum_separator)
        fields = self._fields(payload)
        out: dict[str, Any] = {}
        for p in cfg.points:
            src = p.source if p.source is not None else p.name
            try:
                text = fields[src]
            except (KeyError, IndexError):
                raise BadLine(f"point {p.name!r}: field {src!r} missing in line {line[:80]!r}") from None
            if text is None:
                raise BadLine(f"point {p.name!r}: field {src!r} is empty")
            out[p.name] = convert(p, text)
        return out

    def _fields(self, payload: str):
        cfg = self.cfg
        if cfg.parser == "regex":
            assert self._regex is not None
            m = self._regex.search(payload)
            if m is None:
                raise BadLine(f"line does not match the pattern: {payload[:80]!r}")
            named = m.groupdict()
            return _Lookup(named, [m.group(0), *m.groups()])
        if cfg.parser == "csv":
            return [f for f in payload.split(cfg.delimiter)]
        if cfg.parser == "nmea":
            if not payload.startswith(("$", "!")):
                raise BadLine(f"not an NMEA sentence: {payload[:80]!r}")
            parts = payload[1:].split(",")
            if cfg.sentence and parts[0] != cfg.sentence:
                raise SkipLine(parts[0])
            return [p if p != "" else None for p in parts]
        pairs: dict[str, str] = {}
        for item in self._pair_split.split(payload):
            if not item:
                continue
            key, sep, value = item.partition(cfg.kv_separator)
            if sep:
                pairs[key.strip()] = value
        return pairs


class _Lookup:
    """Regex fields by group name or group number."""

    def __init__(self, named: dict[str, str | None], numbered: list[str | None]) -> None:
        self.named = named
        self.numbered = numbered

    def __getitem__(self, key):
        return self.numbered[key] if isinstance(key, int) else self.named[key]


class SkipLine(BadLine):
    """A valid line of another kind (an NMEA sentence not asked for): ignored, not counted."""
