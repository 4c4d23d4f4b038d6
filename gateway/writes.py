"""The one check every value passes before it is written to a device.

Every path that writes (Sparkplug DCMD, Kafka `device_command` messages, anything later)
calls `check_write()` with the point's `WriteSpec`, and gets either the value to send or a
`WriteRefused` whose text is the same whatever the path: writable, type, finiteness,
integer-ness (42.7 to an int16 is refused, never rounded), the type's range, the point's
min/max, and, for a scaled register, that the value is a whole step of the raw register
(what the device stores is `(value - offset) / scale`). JSON commands are parsed by
`loads_command_json()`, which refuses NaN, infinities and integers too long to be a value.

Pure: no I/O, no asyncio except the small `CheckedWriter` wrapper.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from drivers.base import WriteRejected

FLOAT32_MAX = 3.4028234663852886e38
# A JSON integer longer than this is no device value; refusing it early also keeps
# Python's int() from raising on more than 4300 digits.
MAX_INT_DIGITS = 40


class WriteRefused(WriteRejected):
    """The value fails the point's checks; nothing was sent to the device."""


class CommandJsonError(ValueError):
    """A JSON command cannot be taken as it is (not JSON, NaN, infinity, an oversized number)."""


@dataclass(frozen=True, slots=True)
class WriteSpec:
    """What a write to one point must satisfy.

    `datatype` is the type a command sees (the published Sparkplug type); `raw_type` is what
    the device stores: a Modbus int16 with scale 0.1 publishes float64 but stores int16.
    """

    datatype: str
    writable: bool = False
    min: float | None = None
    max: float | None = None
    raw_type: str = ""
    scale: float = 1.0
    offset: float = 0.0
    max_bytes: int | None = None  # strings: bytes the device holds
    encoding: str = "utf-8"

    @property
    def raw(self) -> str:
        return self.raw_type or self.datatype


def int_range(datatype: str) -> tuple[int, int] | None:
    """(lo, hi) of an integer type such as "int16" or "uint64"; None for other types."""
    if not datatype.startswith(("int", "uint")):
        return None
    bits = int(datatype.removeprefix("u").removeprefix("int"))
    if datatype.startswith("u"):
        return 0, (1 << bits) - 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def check_value(spec: WriteSpec, value: Any) -> Any:
    """The value to send, or WriteRefused with the reason (no device or point in the text)."""
    if not spec.writable:
        raise WriteRefused("point is read-only")
    if value is None:
        raise WriteRefused("null is not a value to write")
    dt = spec.datatype
    if dt == "bool":
        if not isinstance(value, bool):
            raise WriteRefused(f"expects true or false, got {value!r}")
        return value
    if dt == "string":
        if not isinstance(value, str):
            raise WriteRefused(f"expects a string, got {value!r}")
        try:
            size = len(value.encode(spec.encoding))
        except UnicodeError:
            raise WriteRefused(f"{value!r} cannot be written in {spec.encoding}") from None
        if spec.max_bytes is not None and size > spec.max_bytes:
            raise WriteRefused(f"a string of {size} bytes does not fit the point's {spec.max_bytes} bytes")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WriteRefused(f"expects a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WriteRefused(f"{value!r} is not a finite number")
    rng = int_range(dt)
    if rng is not None:
        if isinstance(value, float):
            if not value.is_integer():
                raise WriteRefused(f"{dt} expects an integer, got {value!r}")
            value = int(value)
        if not rng[0] <= value <= rng[1]:
            raise WriteRefused(f"{value} is out of range for {dt} ({rng[0]}..{rng[1]})")
    elif dt == "float32" and abs(value) > FLOAT32_MAX:
        raise WriteRefused(f"{value!r} is out of range for float32")
    elif isinstance(value, int) and not _exact_in(dt, value):
        # 2**64 - 1 would land as 18446744073709551616.0: a different number, so refused.
        raise WriteRefused(f"{value} cannot be written exactly as {dt}")
    if spec.min is not None and value < spec.min:
        raise WriteRefused(f"{value!r} is below the point's min {spec.min:g}")
    if spec.max is not None and value > spec.max:
        raise WriteRefused(f"{value!r} is above the point's max {spec.max:g}")
    _check_raw(spec, value)
    return value if rng is not None else float(value)


def _exact_in(datatype: str, value: int) -> bool:
    try:
        f = float(value)
    except OverflowError:
        return False
    if datatype == "float32":
        f = struct.unpack(">f", struct.pack(">f", f))[0]
    return f == value


def _check_raw(spec: WriteSpec, value: int | float) -> None:
    """For a scaled point: what the device stores must be representable, exactly for integers."""
    if spec.scale == 1.0 and spec.offset == 0.0:
        return
    try:
        raw = (value - spec.offset) / spec.scale
    except OverflowError:
        raw = math.inf
    if not math.isfinite(raw):
        raise WriteRefused(f"{value!r} gives no finite raw value (scale {spec.scale:g}, offset {spec.offset:g})")
    rng = int_range(spec.raw)
    if rng is not None:
        whole = round(raw)
        # A tolerance for binary fractions: 4.2 / 0.1 is 41.99999999999999, which is 42.
        if not math.isclose(raw, whole, rel_tol=1e-9, abs_tol=1e-9):
            raise WriteRefused(
                f"{value!r} is not a whole step of this point (scale {spec.scale:g}, offset {spec.offset:g}: "
                f"the device's {spec.raw} would be {raw:g})"
            )
        if not rng[0] <= whole <= rng[1]:
            raise WriteRefused(
                f"{value!r} is out of range for the device's {spec.raw} ({rng[0]}..{rng[1]} after "
                f"scale {spec.scale:g}, offset {spec.offset:g})"
            )
    elif spec.raw == "float32" and abs(raw) > FLOAT32_MAX:
        raise WriteRefused(f"{value!r} is out of range for the device's float32 after scale {spec.scale:g}")


Specs = Mapping[str, Mapping[str, WriteSpec]]  # device -> point -> spec


def check_write(specs: Specs, device: str, point: str, value: Any) -> Any:
    """check_value() for `device`/`point`, naming them; unknown devices and points are refused too."""
    points = specs.get(device)
    if points is None:
        raise WriteRefused(f"write {device}/{point} refused: no such device")
    spec = points.get(point)
    if spec is None:
        raise WriteRefused(f"write {device}/{point} refused: no such point on this device")
    try:
        return check_value(spec, value)
    except WriteRefused as exc:
        raise WriteRefused(f"write {device}/{point} refused: {exc}") from None


def spec_from_point(info: Any) -> WriteSpec:
    """From a drivers.base.PointInfo (or anything with datatype, writable, min, max)."""
    return WriteSpec(datatype=info.datatype, writable=info.writable, min=info.min, max=info.max)


def specs_from_config(cfg: Any) -> dict[str, dict[str, WriteSpec]]:
    """Every device's points, from gateway.config.OutpostConfig; scaled Modbus registers keep
    their raw type so that `check_value` can refuse what the device cannot store exactly."""
    out: dict[str, dict[str, WriteSpec]] = {}
    shared: dict[WriteSpec, WriteSpec] = {}  # one object per distinct spec (10,000 points, few specs)
    for dev in cfg.devices:
        specs = {info.name: spec_from_point(info) for info in dev.point_infos()}
        if getattr(dev, "driver", "") == "modbus":
            for p in dev.points:
                base = specs[p.name]
                specs[p.name] = WriteSpec(
                    datatype=base.datatype,
                    writable=base.writable,
                    min=base.min,
                    max=base.max,
                    raw_type="bool" if p.table in ("coil", "discrete") else (p.type or "uint16"),
                    scale=p.scale,
                    offset=p.offset,
                    max_bytes=2 * p.length if p.type == "string" and p.length else None,
                    encoding=p.encoding,
                )
        out[dev.name] = {name: shared.setdefault(spec, spec) for name, spec in specs.items()}
    return out


WriteFn = Callable[[str, str, Any], Awaitable[None]]


class CheckedWriter:
    """`write(device, point, value)` that runs check_write first: wrap the one write callback
    that DCMD and Kafka commands share, and nothing unchecked reaches a driver."""

    def __init__(self, specs: Specs, write: WriteFn) -> None:
        self.specs = specs
        self._write = write

    async def __call__(self, device: str, point: str, value: Any) -> None:
        await self._write(device, point, check_write(self.specs, device, point, value))


def _refuse_constant(name: str) -> Any:
    raise CommandJsonError(f"{name} is not a number a device can take")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise CommandJsonError(f"an integer of {len(text.lstrip('-'))} digits is too large to be a value")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CommandJsonError(f"{text[:40]} is out of the range of a number")
    return value


def loads_command_json(raw: bytes | str) -> Any:
    """json.loads for commands: NaN, Infinity, 1e999 and 5000-digit integers are refused
    with CommandJsonError, as is text that is not UTF-8 JSON or nested too deeply."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        return json.loads(
            text, parse_constant=_refuse_constant, parse_int=_bounded_int, parse_float=_finite_float
        )
    except CommandJsonError:
        raise
    except UnicodeDecodeError as exc:
        raise CommandJsonError(f"not JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CommandJsonError(f"not JSON ({exc})") from None
    except RecursionError:
        raise CommandJsonError("nested too deeply") from None
    except ValueError as exc:  # anything else json's number parsing raises
        raise CommandJsonError(f"not a value ({exc})") from None
