"""Pure Modbus value codec: registers <-> typed values, for every type and byte order.

Byte orders name where the bytes of a big-endian value A B C D land on the wire:
ABCD (big endian), DCBA (little endian), BADC (bytes swapped in each register), CDAB
(registers swapped). The same rule extends to 64-bit values and strings. Reordering is
its own inverse, so one function serves decoding and encoding. No I/O here.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from drivers.base import DriverError

_STRUCT = {
    "int16": ">h", "uint16": ">H",
    "int32": ">i", "uint32": ">I",
    "int64": ">q", "uint64": ">Q",
    "float32": ">f", "float64": ">d",
}
_INT_RANGE = {
    "int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1), "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1),
}
BYTE_ORDERS = ("ABCD", "DCBA", "BADC", "CDAB")


class CodecError(DriverError):
    """A value cannot be decoded from, or encoded to, registers (a config or device mismatch)."""


def registers_to_bytes(registers: list[int], byte_order: str) -> bytes:
    """Wire registers -> canonical big-endian bytes (A B C D ...)."""
    for r in registers:
        if not 0 <= r <= 0xFFFF:
            raise CodecError(f"register value {r} is not 16-bit")
    regs = list(registers)
    if byte_order in ("CDAB", "DCBA"):
        regs.reverse()
    raw = b"".join(r.to_bytes(2, "big") for r in regs)
    if byte_order in ("BADC", "DCBA"):
        raw = _swap_pairs(raw)
    elif byte_order != "ABCD" and byte_order != "CDAB":
        raise CodecError(f"unknown byte order {byte_order!r}")
    return raw


def bytes_to_registers(data: bytes, byte_order: str) -> list[int]:
    """Canonical big-endian bytes -> wire registers (inverse of registers_to_bytes)."""
    if len(data) % 2:
        raise CodecError(f"{len(data)} bytes do not fill whole registers")
    if byte_order in ("BADC", "DCBA"):
        data = _swap_pairs(data)
    elif byte_order not in ("ABCD", "CDAB"):
        raise CodecError(f"unknown byte order {byte_order!r}")
    regs = [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if byte_order in ("CDAB", "DCBA"):
        regs.reverse()
    return regs


def _swap_pairs(data: bytes) -> bytes:
    out = bytearray(data)
    out[0::2], out[1::2] = data[1::2], data[0::2]
    return bytes(out)


def register_count(value_type: str, length: int | None = None) -> int:
    if value_type == "string":
        if not length:
            raise CodecError("type string needs a length in registers")
        return length
    if value_type == "bool":
        return 1
    try:
        return struct.calcsize(_STRUCT[value_type]) // 2
    except KeyError:
        raise CodecError(f"unknown value type {value_type!r}") from None


def decode(
    value_type: str,
    registers: list[int],
    byte_order: str = "ABCD",
    *,
    bit: int | None = None,
    encoding: str = "ascii",
    strip: bool = True,
) -> Any:
    """Decode the raw (unscaled) value of one point from exactly its registers."""
    if value_type == "bool":
        if bit is None:
            raise CodecError("a bool from a register needs a bit index")
        if len(registers) != 1:
            raise CodecError(f"bool expects 1 register, got {len(registers)}")
        return bool((registers[0] >> bit) & 1)
    if value_type == "string":
        raw = registers_to_bytes(registers, byte_order)
        text = raw.decode(encoding, errors="replace")
        # Devices pad strings with NULs or spaces; both are noise to a reader.
        return text.rstrip("\x00 ").lstrip("\x00 ") if strip else text
    fmt = _STRUCT.get(value_type)
    if fmt is None:
        raise CodecError(f"unknown value type {value_type!r}")
    need = struct.calcsize(fmt) // 2
    if len(registers) != need:
        raise CodecError(f"{value_type} expects {need} registers, got {len(registers)}")
    return struct.unpack(fmt, registers_to_bytes(registers, byte_order))[0]


def encode(
    value_type: str,
    value: Any,
    byte_order: str = "ABCD",
    *,
    length: int | None = None,
    encoding: str = "ascii",
) -> list[int]:
    """Encode a raw (unscaled) value into the registers to write."""
    if value_type == "string":
        if not isinstance(value, str):
            raise CodecError(f"string point needs a str, got {type(value).__name__}")
        n = register_count("string", length)
        data = value.encode(encoding)
        if len(data) > 2 * n:
            raise CodecError(f"string of {len(data)} bytes does not fit {n} registers")
        return bytes_to_registers(data.ljust(2 * n, b"\x00"), byte_order)
    fmt = _STRUCT.get(value_type)
    if fmt is None:
        raise CodecError(f"cannot encode type {value_type!r} into registers")
    if value_type in _INT_RANGE:
        if isinstance(value, float):
            if not value.is_integer():
                raise CodecError(f"{value_type} needs an integer, got {value!r}")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecError(f"{value_type} needs an integer, got {value!r}")
        lo, hi = _INT_RANGE[value_type]
        if not lo <= value <= hi:
            raise CodecError(f"{value} is out of range for {value_type} ({lo}..{hi})")
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CodecError(f"{value_type} needs a number, got {value!r}")
        value = float(value)
        if value_type == "float32" and math.isfinite(value) and abs(value) > 3.4028234663852886e38:
            raise CodecError(f"{value} is out of range for float32")
    return bytes_to_registers(struct.pack(fmt, value), byte_order)


def scale_value(raw: Any, scale: float, offset: float) -> Any:
    """Raw device value -> engineering value."""
    if scale == 1.0 and offset == 0.0:
        return raw
    return raw * scale + offset


def unscale_value(value: Any, value_type: str, scale: float, offset: float) -> Any:
    """Engineering value -> raw device value (the reverse of scale_value), rounded for ints."""
    if value_type in ("bool", "string"):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{value_type} point needs a number, got {value!r}")
    raw = value if (scale == 1.0 and offset == 0.0) else (value - offset) / scale
    if value_type in _INT_RANGE:
        if isinstance(raw, float):
            if not math.isfinite(raw):
                raise CodecError(f"{value!r} is not a finite number")
            raw = round(raw)
    return raw


def decode_all(registers: list[int]) -> list[dict[str, Any]]:
    """Every plausible reading of a register window, for the commissioning probe.

    Returns one row per start register: the 16-bit views and, where enough registers
    follow, 32- and 64-bit views in every byte order.
    """
    rows = []
    for i, reg in enumerate(registers):
        row: dict[str, Any] = {
            "offset": i,
            "hex": f"0x{reg:04X}",
            "uint16": reg,
            "int16": reg - 0x10000 if reg & 0x8000 else reg,
            "ascii": "".join(chr(b) if 32 <= b < 127 else "." for b in reg.to_bytes(2, "big")),
        }
        for value_type, width in (("int32", 2), ("uint32", 2), ("float32", 2),
                                  ("int64", 4), ("uint64", 4), ("float64", 4)):
            if i + width <= len(registers):
                window = registers[i : i + width]
                for order in BYTE_ORDERS:
                    row[f"{value_type}_{order}"] = decode(value_type, window, order)
        rows.append(row)
    return rows
