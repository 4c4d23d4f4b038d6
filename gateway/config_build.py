"""Build, without I/O, everything `outpost run` builds from the configuration file.

`build_runtime(cfg)` constructs the runtime objects the supervisor constructs from the
settings: buffer settings, the drivers with their read plans (not started: no port, no
socket), the Sparkplug identity and alias table, the MQTT and Kafka uplink settings, the
Kafka mappings, the inbound mappings and the write checks. Whatever raises here would have
raised in `outpost run`; `outpost check` and a reload call it, so that a file they accept
starts. Each failure is reported with the key path of the section it came from.

`load_checked(path)` is the one entry for `outpost check` and for a reload: it never
raises, and returns either the configuration (with its secrets and warnings) or the list of
problems, each with file, line and key path.

The runtime classes it needs are imported here and nowhere else in this module; when they
move, only these lines change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# -- the runtime classes that `outpost run` builds from the file --------------------------
from buffer import BufferSettings
from drivers.registry import build_drivers
from gateway.config import OutpostConfig, Secrets, parse_data, read_sources
from gateway.config import resolve_secrets as _resolve_secrets
from gateway.config import warnings as _warnings
from gateway.errors import ConfigError
from gateway.inbound.kafka_commands import InboundMapping
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import AliasTable, NodeIdentity
from gateway.uplinks.kafka.mappings import Mapping, MappingTable
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.uplinks.mqtt.client import ServerList
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings
from gateway.writes import WriteSpec, specs_from_config

# ------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """The objects built from the file (drivers are constructed, never started)."""

    buffer: BufferSettings | None = None
    drivers: list[Any] = field(default_factory=list)
    node: NodeIdentity | None = None
    mqtt: MqttUplinkSettings | None = None
    kafka: KafkaSettings | None = None
    mappings: MappingTable | None = None
    inbound: list[InboundMapping] = field(default_factory=list)
    write_specs: dict[str, dict[str, WriteSpec]] = field(default_factory=dict)


class RuntimeBuildError(Exception):
    def __init__(self, problems: list[tuple[list[str | int], str]]) -> None:
        super().__init__("; ".join(f"{_text(p)}: {m}" for p, m in problems))
        self.problems = problems


def _text(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "(top level)"


def _ignore(_: Any) -> None:
    return None


def build_runtime(cfg: OutpostConfig, secrets: Secrets | None = None) -> Runtime:
    """Construct every runtime object; raises RuntimeBuildError listing (key path, reason)."""
    rt = Runtime()
    problems: list[tuple[list[str | int], str]] = []

    def step(parts: list[str | int], build: Callable[[], Any]) -> Any:
        try:
            return build()
        except Exception as exc:  # whatever would have stopped `outpost run`
            problems.append((parts, f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)))
            return None

    b, g = cfg.buffer, cfg.gateway
    rt.buffer = step(["buffer"], lambda: BufferSettings(
        max_size_bytes=b.max_size_bytes, max_age_s=b.max_age, when_full=b.when_full,
        synchronous=b.synchronous, check_on_open=b.check_on_open,
    ))
    drivers = step(["devices"], lambda: build_drivers(cfg.buses, cfg.devices, _ignore, _ignore))
    rt.drivers = drivers or []
    infos: dict[str, Any] = {}
    for i, dev in enumerate(cfg.devices):
        infos[dev.name] = step(["devices", i], dev.point_infos) or []
    rt.node = step(["gateway"], lambda: NodeIdentity(g.group_id, g.edge_node_id))
    if rt.node is not None:
        step(["devices"], lambda: ReportByException(rt.node, infos))
    rt.write_specs = step(["devices"], lambda: specs_from_config(cfg)) or {}
    if cfg.mqtt is not None:
        password = secrets.mqtt_password if secrets else None
        rt.mqtt = step(["mqtt"], lambda: MqttUplinkSettings.from_config(cfg, password))
        for i, url in enumerate(cfg.mqtt.servers):
            step(["mqtt", "servers", i], lambda url=url: ServerList([url]))
        if cfg.mqtt.use_aliases:
            step(["mqtt", "use_aliases"], lambda: AliasTable(infos))
    if cfg.kafka is not None:
        k = cfg.kafka
        rt.kafka = step(["kafka"], lambda: KafkaSettings.from_config(
            k, sasl_password=secrets.kafka_sasl_password if secrets else None))
        mappings = [step(["kafka", "mappings", i], lambda m=m, i=i: Mapping.from_config(m, f"mapping-{i}"))
                    for i, m in enumerate(k.mappings)]
        if all(m is not None for m in mappings):
            rt.mappings = step(["kafka", "mappings"], lambda: MappingTable(mappings))
        for i, sec in enumerate(k.inbound):
            im = step(["kafka", "inbound", i], lambda sec=sec, i=i: InboundMapping.from_config(sec, f"inbound-{i}"))
            if im is not None:
                rt.inbound.append(im)
    if problems:
        raise RuntimeBuildError(problems)
    return rt


@dataclass
class LoadResult:
    """A configuration with its secrets and warnings, or why there is none."""

    path: str
    config: OutpostConfig | None = None
    secrets: Secrets | None = None
    runtime: Runtime | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # the main file, then its drop-ins in merge order

    @property
    def ok(self) -> bool:
        return self.config is not None and not self.problems


def load_checked(
    path: str | os.PathLike[str], *, env: dict[str, str] | None = None, secrets: bool = True
) -> LoadResult:
    """Read, validate, build and (with `secrets`) resolve secrets; never raises.

    For a reload: `res = load_checked(path)`; if not `res.ok`, keep running and report
    `res.problems`; else apply `res.config` and `res.secrets`.
    """
    p = str(path)
    res = LoadResult(p)
    env = dict(os.environ) if env is None else env
    try:
        src = read_sources(p)  # the file and its conf.d/*.toml drop-ins
        cfg = parse_data(src.data, src.locate, p)
        locate = src.locate
        res.files = src.files
        try:
            res.runtime = build_runtime(cfg)
        except RuntimeBuildError as exc:
            res.problems = [f"{locate(parts)}: {_text(parts)}: cannot be built: {msg}" for parts, msg in exc.problems]
            return res
        res.secrets = _resolve_secrets(cfg, env, p, locate=locate) if secrets else Secrets()
        res.warnings = _warnings(cfg, env)
        res.config = cfg
    except ConfigError as exc:
        res.problems = list(exc.problems) or [str(exc)]
    except RecursionError:
        res.problems = [f"{p}: arrays or tables are nested too deeply to be an Outpost configuration"]
    except Exception as exc:  # a bug here must not take a running gateway down on reload
        res.problems = [f"{p}: unexpected {type(exc).__name__} while checking: {exc}"]
    return res


def reload_report(res: LoadResult, at: float) -> dict[str, Any]:
    """What `outpost status` shows about the last reload (`at`: wall-clock seconds)."""
    return {
        "ok": res.ok,
        "at": at,
        "path": res.path,
        "files": list(res.files),
        "problems": list(res.problems),
        "kept_running_configuration": not res.ok,
    }
