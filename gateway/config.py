"""The Outpost configuration: one TOML file, validated in full before any I/O.

`load_config(path)` reads the file with tomllib, validates it with the pydantic models below
(unknown keys are errors) and raises `ConfigError` listing *every* problem, each naming the
file, the key path (`devices[2].points[5].type`), the line where it can be found, the bad
value and what was expected. Validation is pure: no sockets, no serial ports, no secrets.
Secrets (`${ENV_VAR}` references and `*_file` keys) are resolved by `resolve_secrets()`, a
separate step that the runtime and `outpost check` run after validation.

Driver-specific models (buses, devices, points) live with their drivers in `drivers/`; this
module composes them and checks what crosses sections (a device naming an unknown bus,
duplicate names, Sparkplug-illegal identifiers).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from drivers.registry import DRIVERS, DeviceConfig, ModbusBusConfig
from drivers.units import Duration, SizeBytes
from gateway.errors import ConfigError
from gateway.mqtt_topics import MappingError
from gateway.mqtt_topics import validate_topic_filter as _validate_mapping_filter

DEFAULT_CONFIG_PATH = "/etc/outpost/outpost.toml"

# Sparkplug forbids these characters in group, edge node and device ids (they are topic levels).
_SPARKPLUG_ID_RE = re.compile(r"^[^/+#\s]+$")
_ENV_REF_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _sparkplug_id(value: str) -> str:
    if not _SPARKPLUG_ID_RE.match(value):
        raise ValueError(
            f"{value!r} cannot be a Sparkplug id: it must be non-empty and contain no '/', '+', '#' or white space"
        )
    return value


class GatewaySection(_Section):
    group_id: str = Field(description="Sparkplug group id")
    edge_node_id: str = Field(description="Sparkplug edge node id")
    data_dir: str = Field("/var/lib/outpost", description="buffer, bdSeq and state files")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = Field("kv", description="key=value lines for journald, or JSON lines")

    _ids = field_validator("group_id", "edge_node_id")(_sparkplug_id)

    @property
    def gateway_id(self) -> str:
        return f"{self.group_id}/{self.edge_node_id}"


class BufferSection(_Section):
    max_size_bytes: SizeBytes = Field(512_000_000, description="hard cap on the buffer file; at least 1_000_000")
    max_age: Duration = Field(7 * 86400.0, description="records older than this are dropped (counted, logged)")
    when_full: Literal["drop_oldest", "block"] = Field(
        "drop_oldest", description="at the size/age limit or a full disk: drop the oldest records, or block new ones"
    )
    synchronous: Literal["full", "normal"] = Field(
        "full", description="full: a committed batch survives power loss; normal: faster, may lose the last batch"
    )
    flush_interval: Duration = Field(0.2, description="how long samples wait to be committed as one batch")
    check_on_open: Literal["quick", "none"] = Field(
        "quick", description="PRAGMA quick_check when opening (reads the whole file: slow on a big file on an SD card)"
    )
    batch_max_records: int = Field(1000, ge=1, le=100_000, description="records per buffer transaction at most")

    @field_validator("max_size_bytes")
    @classmethod
    def _min_size(cls, v: int) -> int:
        if v < 1_000_000:
            raise ValueError(f"must be at least 1_000_000 bytes, got {v}")
        return v


class MqttSection(_Section):
    servers: list[str] = Field(min_length=1, description='e.g. ["mqtts://broker:8883"], tried in order')
    client_id: str | None = Field(None, description="default: outpost-<group_id>-<edge_node_id>")
    username: str | None = None
    password: str | None = Field(None, description='a "${ENV_VAR}" reference, or use password_file')
    password_file: str | None = Field(None, description="file holding the password (first line)")
    ca_file: str | None = Field(None, description="CA bundle for mqtts:// servers (default: system CAs)")
    cert_file: str | None = Field(None, description="client certificate (with key_file) for mutual TLS")
    key_file: str | None = None
    keepalive: Duration = 30.0
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    primary_host_id: str | None = Field(None, description="wait for this Sparkplug Primary Host's STATE before births")
    use_aliases: bool = Field(True, description="Sparkplug metric aliases in DDATA (fewer bytes on the wire)")
    data_qos: Literal[0, 1] = Field(
        1, description="QoS of DDATA. 1: a record leaves the buffer after its PUBACK (a deviation from the "
        "specification); 0: as the specification says, a record leaves the buffer once written to the connection")
    historical_max_per_s: float = Field(500.0, gt=0, description="pace of the backlog flush, records/s")
    reconnect_min: Duration = Field(1.0, description="first reconnect delay; doubles with jitter")
    reconnect_max: Duration = Field(60.0, description="reconnect delay cap")

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        for s in servers:
            parse_server_url(s, default_scheme="mqtt")
        return servers

    @model_validator(mode="after")
    def _tls_pairs(self) -> MqttSection:
        _check_secret_pair(self.password, self.password_file, "password")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        return self


class KafkaMapping(_Section):
    name: str | None = None
    mqtt_topic_filters: list[str] = Field(min_length=1)
    kafka_topic: str
    format: Literal["sparkplug", "json", "raw"] = Field(
        "sparkplug", description="sparkplug: protobuf bytes as on MQTT; json: decoded metrics; raw: bridged payload"
    )
    key: Literal["device", "topic"] = Field("device", description="Kafka record key: the device path or the MQTT topic")
    subscribe: bool = Field(
        False, description="also subscribe to these filters on the MQTT broker (bridge other clients)"
    )

    @field_validator("mqtt_topic_filters")
    @classmethod
    def _filters(cls, filters: list[str]) -> list[str]:
        for f in filters:
            validate_topic_filter(f)
        return filters

    @field_validator("kafka_topic")
    @classmethod
    def _kafka_topic(cls, t: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", t) or t in (".", ".."):
            raise ValueError(f"{t!r} is not a legal Kafka topic name (letters, digits, '.', '_', '-'; at most 249)")
        return t


class KafkaInbound(_Section):
    name: str | None = None
    kafka_topics: list[str] = Field(min_length=1)
    group_id: str = Field(description="Kafka consumer group; offsets are committed after the publish or write")
    action: Literal["mqtt_publish", "device_command"] = Field(
        description='device_command: JSON {"device", "point", "value"} becomes a checked write'
    )
    mqtt_topic_template: str | None = Field(
        None, description="for mqtt_publish: e.g. 'site/{key}' ({topic}, {key}, {partition})"
    )
    qos: Literal[0, 1] = 1

    @model_validator(mode="after")
    def _template(self) -> KafkaInbound:
        if self.action == "mqtt_publish" and not self.mqtt_topic_template:
            raise ValueError("action 'mqtt_publish' needs mqtt_topic_template")
        if self.action == "device_command" and self.mqtt_topic_template:
            raise ValueError("mqtt_topic_template is only for action 'mqtt_publish'")
        return self


class KafkaSection(_Section):
    bootstrap_servers: list[str] = Field(min_length=1, description='["host:port", ...]')
    client_id: str | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    sasl_password_file: str | None = Field(None, description="file holding the SASL password")
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    compression: Literal["zstd", "lz4", "gzip", "none"] = "zstd"
    linger: Duration = Field(0.1, description="how long the producer waits to fill a batch")
    batch_max_bytes: SizeBytes = Field(1_000_000, description="bytes per Kafka record batch (per partition)")
    batch_max_records: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="records per Kafka batch (per partition); a failure resends at most one batch per partition",
    )
    request_timeout: Duration = Field(30.0, description="a request not answered in this time counts as a failed link")
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 60.0
    mappings: list[KafkaMapping] = Field(default_factory=list)
    inbound: list[KafkaInbound] = Field(default_factory=list)

    @field_validator("bootstrap_servers")
    @classmethod
    def _hostports(cls, servers: list[str]) -> list[str]:
        for s in servers:
            parse_host_port(s)
        return servers

    @model_validator(mode="after")
    def _security(self) -> KafkaSection:
        _check_secret_pair(self.sasl_password, self.sasl_password_file, "sasl_password")
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None or self.sasl_username is None:
                raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism and sasl_username")
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs sasl_password or sasl_password_file"
                )
        elif self.sasl_mechanism is not None:
            raise ValueError(f"sasl_mechanism is set but security_protocol is {self.security_protocol}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        if self.security_protocol not in ("SSL", "SASL_SSL") and (self.cert_file or self.ca_file):
            raise ValueError(f"ca_file/cert_file need security_protocol SSL or SASL_SSL, not {self.security_protocol}")
        return self


class DiagnosticsSection(_Section):
    socket_path: str = Field("/run/outpost/outpost.sock", description="Unix socket for status and tail")
    socket_group: str = Field("outpost", description="group allowed to use the socket")
    metrics_listen: str | None = Field(None, description='e.g. "127.0.0.1:9108"; off when unset')

    @field_validator("metrics_listen")
    @classmethod
    def _loopback(cls, v: str | None) -> str | None:
        if v is not None:
            host, _ = parse_host_port(v)
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(f"metrics listen only on loopback (127.0.0.1, ::1), got {host!r}")
        return v


class OutpostConfig(_Section):
    gateway: GatewaySection
    buffer: BufferSection = Field(default_factory=BufferSection)
    buses: list[ModbusBusConfig] = Field(default_factory=list)
    devices: list[DeviceConfig] = Field(default_factory=list)
    mqtt: MqttSection | None = None
    kafka: KafkaSection | None = None
    diagnostics: DiagnosticsSection = Field(default_factory=DiagnosticsSection)

    def summary(self) -> dict[str, Any]:
        points = sum(len(d.points) for d in self.devices)
        uplinks = [name for name, sec in (("mqtt", self.mqtt), ("kafka", self.kafka)) if sec is not None]
        return {
            "gateway": self.gateway.gateway_id,
            "buses": len(self.buses),
            "devices": len(self.devices),
            "points": points,
            "uplinks": uplinks,
            "mappings": len(self.kafka.mappings) if self.kafka else 0,
            "inbound": len(self.kafka.inbound) if self.kafka else 0,
        }


# ---------------------------------------------------------------------------------------
# Small pure parsers shared with the uplinks


@dataclass(frozen=True)
class ServerURL:
    scheme: str  # "mqtt" or "mqtts"
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "ssl")


def parse_server_url(url: str, *, default_scheme: str = "mqtt") -> ServerURL:
    """The one MQTT server URL syntax (config, uplinks, bridge and doctor all use it)."""
    m = re.fullmatch(r"(?:(mqtt|mqtts|tcp|ssl|tls)://)?(\[[0-9a-fA-F:]+\]|[^:/\s]+)(?::(\d{1,5}))?/?", url)
    if not m:
        raise ValueError(
            f"{url!r} is not a server URL: expected scheme mqtt:// or mqtts:// and host[:port], "
            "such as 'mqtts://broker.example:8883'"
        )
    given = m.group(1) or default_scheme
    scheme = {"tcp": "mqtt", "ssl": "mqtts", "tls": "mqtts"}.get(given, given)
    port = int(m.group(3)) if m.group(3) else (8883 if scheme == "mqtts" else 1883)
    if not 0 < port < 65536:
        raise ValueError(f"{url!r}: port {port} is out of range")
    return ServerURL(scheme, m.group(2).strip("[]"), port)


def parse_host_port(value: str, *, default_port: int | None = None, allow_port_zero: bool = False) -> tuple[str, int]:
    """"host:port" or "[v6addr]:port"; the port may be left out only when `default_port` is given.

    Port 0 (any free port) only makes sense for a listener, so only `allow_port_zero` takes it.
    """
    m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s/\[\]]+)(?::([^:]*))?", value.strip())
    if not m or (m.group(2) is None and default_port is None):
        raise ValueError(f"{value!r} is not host:port such as 'kafka.example:9093'")
    if m.group(2) is not None and not re.fullmatch(r"\d{1,5}", m.group(2)):
        raise ValueError(f"{value!r}: port {m.group(2)!r} is not a number")
    port = int(m.group(2)) if m.group(2) is not None else default_port
    assert port is not None
    if not (0 if allow_port_zero else 1) <= port < 65536:
        raise ValueError(f"{value!r}: port {port} is out of range")
    return m.group(1).strip("[]"), port


def validate_topic_filter(f: str) -> str:
    """The mappings' filter check, as a ValueError for the config models."""
    try:
        _validate_mapping_filter(f)
    except MappingError as e:
        raise ValueError(str(e)) from None
    return f


def _check_secret_pair(value: str | None, file: str | None, key: str) -> None:
    if value is not None and file is not None:
        raise ValueError(f"set {key} or {key}_file, not both")
    # A literal secret is allowed; `outpost check` warns about it (see warnings()).


# ---------------------------------------------------------------------------------------
# Loading, error reporting with key paths and lines


# pydantic puts the chosen member's tag of a discriminated union into error locations.
_UNION_TAGS = frozenset(DRIVERS) | {
    get_args(m.model_fields["transport"].annotation)[0] for m in get_args(get_args(ModbusBusConfig)[0])
}


def _format_path(loc: tuple[Any, ...], data: Any) -> tuple[str, list[str | int]]:
    """Turn a pydantic loc into `devices[2].points[5].type`, dropping union tags.

    pydantic puts the chosen union member's tag into `loc`; it is not a key of the input,
    so we walk the input data and keep only the steps that exist in it.
    """
    parts: list[str | int] = []
    cur = data
    for step in loc:
        if isinstance(step, int) and isinstance(cur, list):
            parts.append(step)
            cur = cur[step] if 0 <= step < len(cur) else None
        elif isinstance(step, str) and isinstance(cur, dict) and step in cur:
            parts.append(step)
            cur = cur[step]
        elif isinstance(step, str) and isinstance(cur, dict):
            # Either a union tag (skip) or a missing/extra key (keep: it names the key).
            if step in _UNION_TAGS or step.startswith("function-"):
                continue
            parts.append(step)
            cur = None
        else:
            if isinstance(step, str) and not step.startswith("function-"):
                parts.append(step)
            cur = None
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else p)
    return text or "(top level)", parts


class _LineIndex:
    """Find the line of a key path in TOML text without a full TOML parser with positions.

    It follows `[table]` and `[[array.of.tables]]` headers and `key =` lines, which covers the
    way Outpost configs are written; inline tables and dotted keys fall back to the table line.
    """

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]+\")\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        counters: dict[tuple[str | int, ...], int] = {}
        table: tuple[str | int, ...] = ()
        for lineno, line in enumerate(text.splitlines(), start=1):
            h = self._HEADER.match(line)
            if h:
                names = [n.strip().strip("\"'") for n in h.group(2).split(".")]
                path: list[str | int] = []
                # Resolve each prefix against the arrays seen so far (devices.points -> devices[i].points).
                for depth, name in enumerate(names):
                    path.append(name)
                    is_last = depth == len(names) - 1
                    key = tuple(path)
                    if is_last and h.group(1) == "[[":
                        idx = counters.get(key, -1) + 1
                        counters[key] = idx
                        # A new element resets the counters of arrays nested below it.
                        for k in [k for k in counters if len(k) > len(key) and k[: len(key)] == key]:
                            del counters[k]
                        path.append(idx)
                    elif not is_last and key in counters:
                        path.append(counters[key])
                table = tuple(path)
                self.lines.setdefault(table, lineno)
                continue
            k = self._KEY.match(line)
            if k:
                self.lines.setdefault((*table, k.group(1).strip('"')), lineno)

    def find(self, parts: list[str | int]) -> int | None:
        for n in range(len(parts), 0, -1):
            line = self.lines.get(tuple(parts[:n]))
            if line is not None:
                return line
        return None


def _expected(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return "unknown key (check the spelling; see the configuration reference in the README)"
    if err["type"] == "missing":
        return "required key is missing"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg


def validation_problems(path: str, text: str, data: dict[str, Any], exc: ValidationError) -> list[str]:
    index = _LineIndex(text)
    problems = []
    for err in exc.errors(include_url=False):
        key_path, parts = _format_path(tuple(err["loc"]), data)
        line = index.find(parts)
        where = f"{path}:{line}" if line else path
        got = ""
        value = err.get("input")
        if err["type"] != "missing" and not isinstance(value, dict | list) and repr(value) not in err["msg"]:
            got = f" (got {value!r})"
        problems.append(f"{where}: {key_path}: {_expected(err)}{got}")
    return problems


def cross_reference_problems(data: dict[str, Any]) -> list[tuple[list[str | int], str]]:
    """Checks across sections, on the raw data so they run even when fields are invalid."""
    out: list[tuple[list[str | int], str]] = []
    buses = data.get("buses") if isinstance(data.get("buses"), list) else []
    devices = data.get("devices") if isinstance(data.get("devices"), list) else []
    bus_names: dict[str, int] = {}
    for i, bus in enumerate(buses):
        name = bus.get("name") if isinstance(bus, dict) else None
        if not isinstance(name, str):
            continue
        if name in bus_names:
            out.append((["buses", i, "name"], f"{name!r} is already used by buses[{bus_names[name]}]"))
        bus_names.setdefault(name, i)
    device_names: dict[str, int] = {}
    for i, dev in enumerate(devices):
        if not isinstance(dev, dict):
            continue
        name = dev.get("name")
        if isinstance(name, str):
            if not _SPARKPLUG_ID_RE.match(name):
                out.append(
                    (["devices", i, "name"], f"{name!r} cannot be a Sparkplug device id (no '/', '+', '#', spaces)")
                )
            if name in device_names:
                out.append((["devices", i, "name"], f"{name!r} is already used by devices[{device_names[name]}]"))
            device_names.setdefault(name, i)
        if dev.get("driver", "modbus") == "modbus" and "bus" in dev and dev["bus"] not in bus_names:
            known = ", ".join(repr(b) for b in bus_names) or "none are configured"
            out.append((["devices", i, "bus"], f"{dev['bus']!r} names no bus in [[buses]] (known: {known})"))
    kafka = data.get("kafka") if isinstance(data.get("kafka"), dict) else {}
    mappings = kafka.get("mappings") if isinstance(kafka.get("mappings"), list) else []
    inbound = kafka.get("inbound") if isinstance(kafka.get("inbound"), list) else []
    if "mqtt" not in data:
        for i, m in enumerate(mappings):
            if isinstance(m, dict) and m.get("subscribe"):
                out.append(
                    (
                        ["kafka", "mappings", i, "subscribe"],
                        "subscribe = true needs an [mqtt] section to subscribe through",
                    )
                )
        for i, m in enumerate(inbound):
            if isinstance(m, dict) and m.get("action") == "mqtt_publish":
                out.append(
                    (["kafka", "inbound", i, "action"], "'mqtt_publish' needs an [mqtt] section to publish through")
                )
    return out


def _path_text(parts: list[str | int]) -> str:
    text = ""
    for p in parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else p)
    return text


def parse_config(text: str, path: str = "<config>") -> OutpostConfig:
    """Validate TOML text; raises ConfigError with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"{path}: not valid TOML: {e}"]) from None
    problems: list[str] = []
    cfg: OutpostConfig | None = None
    try:
        cfg = OutpostConfig.model_validate(data)
    except ValidationError as e:
        problems.extend(validation_problems(path, text, data, e))
    index = _LineIndex(text)
    for parts, msg in cross_reference_problems(data):
        line = index.find(parts)
        problems.append(f"{path}:{line}: {_path_text(parts)}: {msg}" if line else f"{path}: {_path_text(parts)}: {msg}")
    if problems or cfg is None:
        raise ConfigError(path, problems)
    return cfg


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> OutpostConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [f"{p}: file not found (use --config PATH)"]) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [f"{p}: cannot read: {e}"]) from None
    return parse_config(text, str(p))


# ---------------------------------------------------------------------------------------
# Secrets: resolved after validation, never part of validation


@dataclass(frozen=True)
class Secrets:
    mqtt_password: str | None = None
    kafka_sasl_password: str | None = None


def _resolve_one(value: str | None, file: str | None, key: str, env: dict[str, str]) -> tuple[str | None, str | None]:
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n"), None
        except OSError as e:
            return None, f"{key}_file: cannot read {file!r}: {e.strerror or e}"
    if value is None:
        return None, None
    missing: list[str] = []

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            missing.append(name)
            return ""
        return env[name]

    resolved = _ENV_REF_RE.sub(sub, value)
    if missing:
        return None, f"{key}: environment variable {', '.join(missing)} is not set"
    return resolved, None


def resolve_secrets(cfg: OutpostConfig, env: dict[str, str] | None = None, path: str = "<config>") -> Secrets:
    env = dict(os.environ) if env is None else env
    problems: list[str] = []
    mqtt_pw = kafka_pw = None
    if cfg.mqtt is not None:
        mqtt_pw, err = _resolve_one(cfg.mqtt.password, cfg.mqtt.password_file, "mqtt.password", env)
        if err:
            problems.append(f"{path}: {err}")
    if cfg.kafka is not None:
        kafka_pw, err = _resolve_one(cfg.kafka.sasl_password, cfg.kafka.sasl_password_file, "kafka.sasl_password", env)
        if err:
            problems.append(f"{path}: {err}")
    if problems:
        raise ConfigError(path, problems)
    return Secrets(mqtt_password=mqtt_pw, kafka_sasl_password=kafka_pw)


def warnings(cfg: OutpostConfig) -> list[str]:
    """Things that are valid but that a field engineer should hear about."""
    out = []
    for key, value in (
        ("mqtt.password", cfg.mqtt.password if cfg.mqtt else None),
        ("kafka.sasl_password", cfg.kafka.sasl_password if cfg.kafka else None),
    ):
        if value is not None and not _ENV_REF_RE.search(value):
            out.append(f'{key} is written in the file itself; prefer "${{ENV_VAR}}" or {key}_file')
    if cfg.kafka is not None:
        for i, m in enumerate(cfg.kafka.mappings):
            if m.subscribe and m.format == "json" and any(not f.startswith("spBv1.0/") for f in m.mqtt_topic_filters):
                out.append(
                    f'kafka.mappings[{i}]: format "json" decodes Sparkplug payloads; bridged messages on '
                    'non-Sparkplug topics will fail to format (use "raw")'
                )
    if cfg.buffer.synchronous == "normal":
        out.append('buffer.synchronous = "normal": the last committed batch may be lost on power loss')
    return out
