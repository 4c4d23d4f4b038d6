"""Configurations generated from the models, valid and mutated, through `outpost check`.

A case is TOML text: either a configuration grown from the pydantic models (each field drawn
from its type and bounds, known-good strings for URLs, topics and filters) or one of the
shipped examples, then zero or more mutations (a value replaced by a hostile one: nan, inf,
"0s", "1", "yes", 2**70, "${X}", wildcards, deep nesting; a key dropped, misspelt or added;
an array element duplicated).

The property, per case, with `outpost check` run in-process on a file:
- it exits 0 or 2 and prints no traceback;
- a rejection names a key path on every problem, and comes from validation: never from the
  build step's safety net ("cannot be built") nor from an unexpected exception;
- an acceptance builds every runtime object: `build_runtime`, and the uplinks, inbound
  consumers and bridge constructed as the supervisor constructs them (no I/O is started).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import re
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from hypothesis import strategies as st
from pydantic import BaseModel

from drivers.modbus.config import ModbusDeviceConfig, RtuBusConfig, RtuOverTcpBusConfig, TcpBusConfig
from drivers.serial_line.config import SerialLineDeviceConfig
from drivers.simulator.config import SimulatorDeviceConfig
from gateway.config import OutpostConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [tomllib.loads(p.read_text()) for p in sorted((ROOT / "deploy" / "examples").glob("*.toml"))]

# -- generating values from the models -------------------------------------------------------

_GOOD_STRINGS: dict[str, st.SearchStrategy[Any]] = {
    "servers": st.lists(st.sampled_from(["mqtt://127.0.0.1:1883", "mqtts://broker.example:8883", "broker"]),
                        min_size=1, max_size=2),
    "bootstrap_servers": st.lists(st.sampled_from(["k1:9092", "[::1]:9093"]), min_size=1, max_size=2),
    "kafka_topic": st.sampled_from(["plant.telemetry", "t-1", "a_b"]),
    "kafka_topics": st.lists(st.sampled_from(["cmds", "site.in"]), min_size=1, max_size=2),
    "mqtt_topic_filters": st.lists(st.sampled_from(["spBv1.0/+/DDATA/#", "site/#", "a/b"]), min_size=1, max_size=2),
    "mqtt_topic_template": st.sampled_from(["site/{key}", "in/{topic}/{partition}", "x"]),
    "encoding": st.sampled_from(["ascii", "utf-8", "latin-1"]),
    "metrics_listen": st.sampled_from(["127.0.0.1:9108", "[::1]:0"]),
    "pattern": st.sampled_from(["(?P<t>[0-9.]+)", "(?P<a>\\d+),(?P<b>\\d+)"]),
    "terminator": st.sampled_from(["\\n", "\\r\\n"]),
}
_DURATIONS = st.builds(lambda n, u: f"{n}{u}", st.sampled_from([0, 1, 5, 30, 250, 1.5]),
                       st.sampled_from(["ms", "s", "m", "h", "d"]))
_NAMES = st.sampled_from(["a", "b", "m1", "pump", "v_l1", "x-2"])


def _bounds(metadata: list[Any]) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in metadata:
        if isinstance(m, at.Ge | at.Gt):
            lo = m.ge if isinstance(m, at.Ge) else m.gt
        if isinstance(m, at.Le | at.Lt):
            hi = m.le if isinstance(m, at.Le) else m.lt
    return lo, hi


def _is_duration(metadata: list[Any]) -> bool:
    return any(getattr(getattr(m, "func", None), "__name__", "") == "parse_duration" for m in metadata)


def _value(name: str, annotation: Any, metadata: list[Any], depth: int) -> st.SearchStrategy[Any]:
    if name in _GOOD_STRINGS:
        return _GOOD_STRINGS[name]
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *meta = get_args(annotation)
        return _value(name, inner, [*metadata, *meta], depth)
    if origin in (Union, UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        return st.one_of(*[_value(name, a, metadata, depth) for a in options])
    if origin is Literal:
        return st.sampled_from(get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return st.lists(_value(name, item, [], depth + 1), min_size=1, max_size=2 if depth < 2 else 1)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_dicts(annotation, depth + 1)
    if _is_duration(metadata):
        return _DURATIONS
    lo, hi = _bounds(metadata)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        lo_i = int(lo) if lo is not None else -5
        return st.integers(lo_i, int(hi) if hi is not None else max(lo_i, 0) + 70_000)
    if annotation is float:
        return st.floats(lo if lo is not None else -1e6, hi if hi is not None else 1e6,
                         allow_nan=False, allow_infinity=False)
    if annotation is str:
        return _NAMES
    return st.just("x")


@functools.cache
def model_dicts(model: type[BaseModel], depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    """Raw TOML data for `model`: required fields always, optional ones sometimes."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, f in model.model_fields.items():
        strat = _value(name, f.annotation, list(f.metadata), depth)
        (parts if f.is_required() else optional)[name] = strat
    return st.fixed_dictionaries(parts, optional=optional)


@functools.cache
def _devices() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        model_dicts(ModbusDeviceConfig).map(lambda d: {**d, "bus": "bus0", "driver": "modbus"}),
        model_dicts(SerialLineDeviceConfig).map(lambda d: {**d, "driver": "serial_line"}),
        model_dicts(SimulatorDeviceConfig).map(lambda d: {**d, "driver": "simulator"}),
    )


@st.composite
def from_models(draw: st.DrawFn) -> dict[str, Any]:
    data = draw(model_dicts(OutpostConfig).filter(lambda d: True))
    bus_model = draw(st.sampled_from([RtuBusConfig, TcpBusConfig, RtuOverTcpBusConfig]))
    bus = draw(model_dicts(bus_model))
    bus.update(name="bus0", transport=get_args(bus_model.model_fields["transport"].annotation)[0])
    data["buses"] = [bus]
    data["devices"] = draw(st.lists(_devices(), min_size=1, max_size=3))
    for i, d in enumerate(data["devices"]):
        d["name"] = f"dev{i}"
    data["gateway"] = {**data["gateway"], "data_dir": "/nonexistent/outpost-fuzz"}
    return data


# -- mutations -------------------------------------------------------------------------------

_HOSTILE = [math.nan, math.inf, -math.inf, "0s", "-1s", "99999999999d", "", " ", "1", "yes", "true", -1, 0,
            1.5, 2**63, 2**70, -(2**70), 1e308, "${X}", "mqtts://${BROKER}:8883", "site/+/{key}/#", "also bad!",
            "{device}", "{key:d}", "{0}", "a b", "/", "+", "#", "\x00", "x" * 300, [], {}, [[1]], {"x": 1},
            [1, "a"], True, False, "rot13", "zlib", "\\x4", "€", "(", "999999ms", "1e999", "${1BAD}"]


@dataclass(frozen=True)
class _Deep:
    """Arrays nested `depth` deep, written as text (too deep for a recursive writer)."""

    depth: int


_DURATION_EDGES = ["0s", "0ms", "1ms", "0.5s", "65536s", "99999999999d", "3651d", "1d"]
_INT_EDGES = [0, -1, 1, 7, 255, 256, 1023, 1024, 65535, 65536, 100_000, 100_001, 999_999, 2**31, 2**63, 2**70]
_FLOAT_EDGES = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e308, -1e308, 0.5]
_STR_EDGES = ["", " ", "a b", "x", "/", "+", "#", "${X}", "{key}", "{device}", "site/+/#", "\x00", "€", "x" * 300,
              "mqtt://h:0", "h:99999", "..", "rot13"]
_ANY_EDGE = _DURATION_EDGES + _INT_EDGES + _FLOAT_EDGES + _STR_EDGES + [True, False, [], {}]


def _edges(current: Any) -> list[Any]:
    """Hostile values of the kind the key already holds (so that they pass the type check)."""
    if isinstance(current, bool):
        return [not current, "yes", 1, 0]
    if isinstance(current, int):
        return _INT_EDGES
    if isinstance(current, float):
        return _FLOAT_EDGES
    if isinstance(current, str) and re.fullmatch(r"\d+(\.\d+)?(ms|s|m|min|h|d)", current):
        return _DURATION_EDGES
    if isinstance(current, str):
        return _STR_EDGES
    if isinstance(current, list):
        return [[], [current[0], current[0]] if current else [1], [{}]]
    return _HOSTILE


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append((*prefix, k))
            out.extend(_paths(v, (*prefix, k)))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append((*prefix, i))
            out.extend(_paths(v, (*prefix, i)))
    return out


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        data = data[step]
    return data


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 2))):
        paths = _paths(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        key = path[-1]
        op = draw(st.sampled_from(["edge", "edge", "edge", "replace", "drop", "typo", "add", "known", "dup", "deep"]))
        if op == "edge":
            parent[key] = draw(st.sampled_from(_edges(parent[key])))
        elif op == "known" and isinstance(parent[key], dict):
            # A key the model knows but the base leaves out, with an edge value of any type.
            from gateway.config import known_keys

            names = [n for n in known_keys(tuple(path)) if n not in parent[key]]
            if names:
                parent[key][draw(st.sampled_from(names))] = draw(st.sampled_from(_ANY_EDGE))
        elif op == "replace":
            parent[key] = draw(st.sampled_from(_HOSTILE))
        elif op == "drop":
            del parent[key]
        elif op == "typo" and isinstance(key, str):
            value = parent.pop(key)
            parent[draw(st.sampled_from([key[:-1] or "k", key + "s", key.replace("_", "")]))] = value
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["unknown", "timout", "adress", "max_agee"]))] = draw(st.sampled_from(_HOSTILE))
        elif op == "dup" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[key]))
        elif op == "deep":
            parent[key] = _Deep(draw(st.sampled_from([50, 1200, 5000])))
    return data


def configs() -> st.SearchStrategy[str]:
    examples = st.sampled_from(EXAMPLES)
    return st.one_of(
        examples.flatmap(mutated),
        examples.flatmap(mutated),
        from_models(),
        from_models().flatmap(mutated),
    ).map(to_toml)


# -- TOML writer (tomllib only reads) -----------------------------------------------------------

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE.match(k) else _str(k)


def _str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _inline(v: Any) -> str:
    if isinstance(v, _Deep):
        return "[" * v.depth + "]" * v.depth
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_inline(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_inline(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any]) -> str:
    """Tables as [section] and arrays of tables as [[section]], the rest inline."""
    head, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"[{_key(k)}]")
            tables.extend(f"{_key(kk)} = {_inline(vv)}" for kk, vv in v.items())
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for item in v:
                tables.append(f"[[{_key(k)}]]")
                tables.extend(f"{_key(kk)} = {_inline(vv)}" for kk, vv in item.items())
        else:
            head.append(f"{_key(k)} = {_inline(v)}")
    return "\n".join(head + tables) + "\n"


# -- the property ------------------------------------------------------------------------------


@dataclass
class ConfigStats:
    cases: int = 0
    accepted: int = 0
    rejected: int = 0
    failures: list[str] = field(default_factory=list)


_PROBLEM = re.compile(r"^(?P<file>.+?)(:\d+)?: (?P<path>[^\s:]+): \S")


def check_one(text: str, stats: ConfigStats) -> None:
    from gateway.cli import main as outpost

    stats.cases += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.toml"
        path.write_text(text, encoding="utf-8")
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = outpost(["check", str(path)])
        except BaseException as exc:  # a traceback the user would see
            stats.failures.append(f"check raised {type(exc).__name__}: {exc} for:\n{text[:600]}")
            return
        output = out.getvalue() + err.getvalue()
        if rc not in (0, 2) or "Traceback" in output:
            stats.failures.append(f"exit {rc}:\n{output[:400]}\nfor:\n{text[:600]}")
            return
        if rc == 2:
            stats.rejected += 1
            problems = [ln[4:] for ln in err.getvalue().splitlines() if ln.startswith("  - ")]
            if not problems:
                stats.failures.append(f"rejected without a listed problem: {output[:300]}")
            for p in problems:
                if "cannot be built" in p or "unexpected" in p:
                    stats.failures.append(f"a gap in validation: {p[:300]}")
                elif not _PROBLEM.match(p) and "nested too deeply" not in p:
                    stats.failures.append(f"no key path: {p[:300]}")
            return
        stats.accepted += 1
        problem = _build_everything(path)
        if problem:
            stats.failures.append(f"accepted but {problem} for:\n{text[:600]}")


def _build_everything(path: Path) -> str | None:
    """What the supervisor constructs from an accepted file, without starting any I/O."""
    from gateway.config_build import build_runtime, load_checked

    res = load_checked(path, secrets=False)
    if not res.ok or res.config is None:
        return f"load_checked disagrees: {res.problems}"
    cfg = res.config
    try:
        rt = build_runtime(cfg)
        from gateway.inbound.bridge import LocalBridge
        from gateway.inbound.kafka_commands import KafkaInbound
        from gateway.uplinks.kafka.uplink import KafkaUplink
        from gateway.uplinks.mqtt.sparkplug import SparkplugUplink

        infos = {d.name: d.point_infos() for d in cfg.devices}

        async def write(device: str, point: str, value: Any) -> None:
            return None

        async def publish(topic: str, payload: bytes, qos: int) -> None:
            return None

        if rt.mqtt is not None:
            SparkplugUplink(rt.mqtt, None, infos, write)
        if rt.kafka is not None and rt.mappings is not None:
            KafkaUplink(rt.kafka, None, rt.mappings, cfg.gateway.gateway_id)
            if cfg.mqtt is not None:
                LocalBridge(cfg, None, None, rt.mappings)
            for m in rt.inbound:
                KafkaInbound(rt.kafka, m, publish=publish, write=write, specs=rt.write_specs)
    except Exception as exc:
        return f"building raised {type(exc).__name__}: {exc}"
    return None


# -- the systematic sweep: every leaf of every example, each set to each edge of its kind ------


class Sweep:
    """One mutation per case on a valid base, in a shuffled but fixed order (texts made lazily)."""

    def __init__(self, seed: int = 13) -> None:
        import random

        self.combos: list[tuple[int, tuple[Any, ...], Any]] = []
        for n, base in enumerate(EXAMPLES):
            for path in _paths(base):
                current = _parent(base, path)[path[-1]]
                if isinstance(current, dict) and current:
                    continue
                self.combos.extend((n, path, edge) for edge in _edges(current))
        random.Random(seed).shuffle(self.combos)

    def __len__(self) -> int:
        return len(self.combos)

    def __iter__(self) -> Any:
        for n, path, edge in self.combos:
            data = copy.deepcopy(EXAMPLES[n])
            _parent(data, path)[path[-1]] = edge
            yield to_toml(data)
