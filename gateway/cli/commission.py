"""What `outpost probe modbus --emit-toml` prints: ready `[[buses]]`, `[[devices]]` and
`[[devices.points]]` blocks built from the registers a technician chose or from a template.

Pure apart from reading template files: the device is validated with the Modbus driver's own
config models before anything is printed, so the text either passes `outpost check` or the
command says which `--point` is wrong. Templates are TOML files shaped like a configuration
(one `[[devices]]` table with its points) in `deploy/templates/`; the command fills in the
unit id, the bus and the device name.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from drivers.modbus.config import ModbusDeviceConfig, ModbusPointConfig

TEMPLATE_DIR_ENV = "OUTPOST_TEMPLATE_DIR"
# Keys of a point whose value is text even when it looks like a number or a boolean.
_TEXT_KEYS = frozenset({"name", "unit", "encoding", "table", "type", "byte_order"})
# The order keys are printed in: the ones a reader looks for first.
_POINT_ORDER = ("name", "table", "address", "type", "bit", "length", "byte_order", "scale",
                "offset", "unit", "deadband", "interval", "max_report_interval")
_DEVICE_ORDER = ("driver", "name", "bus", "unit_id", "byte_order", "address_base",
                 "max_registers_per_request", "max_gap", "interval")


class EmitError(ValueError):
    """A --point, --template or device option that cannot make a valid configuration."""


def template_dirs() -> list[Path]:
    """Where `--template NAME` looks, first match wins."""
    dirs = []
    if os.environ.get(TEMPLATE_DIR_ENV):
        dirs.append(Path(os.environ[TEMPLATE_DIR_ENV]))
    # deploy/install.sh puts them beside the venv: /opt/outpost/templates.
    dirs.append(Path(sys.prefix).parent / "templates")
    dirs.append(Path(__file__).resolve().parents[2] / "deploy" / "templates")  # a checkout
    return dirs


def list_templates() -> dict[str, tuple[Path, str]]:
    """Template name -> (file, first comment line), over every template directory."""
    found: dict[str, tuple[Path, str]] = {}
    for d in template_dirs():
        for f in sorted(d.glob("*.toml")) if d.is_dir() else []:
            if f.stem not in found:
                found[f.stem] = (f, _first_comment(f))
    return found


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_template(name_or_path: str) -> tuple[dict[str, Any], Path]:
    """The template's `[[devices]]` table (a dict) and the file it came from."""
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.is_file()):
        known = list_templates()
        if name_or_path not in known:
            names = ", ".join(sorted(known)) or "none found"
            raise EmitError(f"--template {name_or_path!r}: no such template (known: {names}; "
                            f"searched {', '.join(str(d) for d in template_dirs())})")
        path = known[name_or_path][0]
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise EmitError(f"template {path}: {exc}") from None
    devices = data.get("devices")
    if not isinstance(devices, list) or len(devices) != 1 or set(data) != {"devices"}:
        raise EmitError(f"template {path}: expected exactly one [[devices]] table and nothing else")
    return devices[0], path


def parse_point_spec(spec: str) -> dict[str, Any]:
    """`NAME:TABLE:ADDRESS[:TYPE][:key=value...]` -> a point table, validated.

    e.g. `voltage:input:0:float32:unit=V` or `speed:holding:30:int16:scale=0.1:unit=Hz`.
    Values after `key=` are read as TOML values (0.1, true, 5) except for text keys.
    """
    parts = spec.split(":")
    where = f"--point {spec!r}"
    if len(parts) < 3:
        raise EmitError(f"{where}: expected NAME:TABLE:ADDRESS[:TYPE][:key=value...], "
                        "e.g. voltage:input:0:float32:unit=V")
    name, table, address, *rest = parts
    try:
        addr = int(address, 0)
    except ValueError:
        raise EmitError(f"{where}: address {address!r} is not a number") from None
    point: dict[str, Any] = {"name": name, "table": table, "address": addr}
    if rest and "=" not in rest[0]:
        point["type"] = rest.pop(0)
    for item in rest:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise EmitError(f"{where}: {item!r} is not key=value")
        point[key] = value if key in _TEXT_KEYS else _toml_value(value)
    try:
        ModbusPointConfig.model_validate(point)
    except ValueError as exc:
        raise EmitError(f"{where}: {_pydantic_text(exc)}") from None
    return point


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text        # a bare word: a string


def _pydantic_text(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if errors is None:
        return str(exc)
    return "; ".join(
        (".".join(str(x) for x in e["loc"]) + ": " if e["loc"] else "") + e["msg"]
        for e in errors())


def build_device(*, name: str, bus: str, unit_id: int, template: dict[str, Any] | None = None,
                 points: list[dict[str, Any]] | None = None,
                 overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The device table: the template's (if any), then `overrides`, then extra points;
    validated with the driver's model (EmitError naming the problem otherwise)."""
    device: dict[str, Any] = {k: v for k, v in (template or {}).items() if k != "points"}
    device.update({"driver": "modbus", "name": name, "bus": bus, "unit_id": unit_id})
    device.update({k: v for k, v in (overrides or {}).items() if v is not None})
    merged = [dict(p) for p in (template or {}).get("points", [])]
    names = {p.get("name") for p in merged}
    for p in points or []:
        if p["name"] in names:
            merged = [q for q in merged if q.get("name") != p["name"]]  # the command line wins
        merged.append(p)
    if not merged:
        raise EmitError("--emit-toml needs registers: --point NAME:TABLE:ADDRESS[:TYPE] "
                        "(repeatable) or --template NAME")
    device["points"] = merged
    try:
        ModbusDeviceConfig.model_validate(device)
    except ValueError as exc:
        raise EmitError(f"device {name!r}: {_pydantic_text(exc)}") from None
    return device


def render_toml(device: dict[str, Any], bus: dict[str, Any] | None = None,
                header: list[str] | None = None, readings: dict[str, str] | None = None) -> str:
    """TOML text: comment lines, the bus (when given), the device and its points.
    `readings` adds a comment after a point: what the device answered for it just now."""
    out = [f"# {line}" if line else "#" for line in header or []]
    if bus is not None:
        out += ["", "[[buses]]"] + [_kv(k, v) for k, v in bus.items()]
    out += ["", "[[devices]]"]
    out += [_kv(k, device[k]) for k in _ordered(device, _DEVICE_ORDER) if k != "points"]
    for p in device["points"]:
        out += ["", "[[devices.points]]"] + [_kv(k, p[k]) for k in _ordered(p, _POINT_ORDER)]
        if readings and p["name"] in readings:
            out.append(f"# read now: {readings[p['name']]}")
    return "\n".join(out).lstrip("\n") + "\n"


def _ordered(table: dict[str, Any], first: tuple[str, ...]) -> list[str]:
    return [k for k in first if k in table] + [k for k in table if k not in first]


def _kv(key: str, value: Any) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return f"{key if bare else toml_scalar(key)} = {toml_scalar(value)}"


def toml_scalar(value: Any) -> str:
    """One TOML value: strings as basic strings (JSON's escapes are TOML's), numbers, booleans."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # ensure_ascii would write astral characters as surrogate pairs, which TOML refuses;
        # DEL is the one control character JSON leaves raw and TOML wants escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_scalar(v) for v in value) + "]"
    raise EmitError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")
