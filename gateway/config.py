"""The Outpost configuration: one TOML file, validated in full before any I/O.

`load_config(path)` reads the file and its `conf.d/*.toml` drop-ins with tomllib, validates
them with the pydantic models below and raises `ConfigError` listing *every* problem, each
naming the file, the key path (`devices[2].points[5].type`), the line where it can be found
(inside inline tables too), the bad value and what was expected. The models are strict
("1" is not 1, "yes" is not true, nan and inf are no number) and carry every limit the
runtime enforces, so that what validates also starts (gateway/config_build.py builds it to
make sure). Unknown keys are errors with the nearest known key as a hint.

Validation is pure: no sockets, no serial ports, no secrets. Secrets (`${ENV_VAR}`
references in the two password keys, and `*_file` keys) are resolved by `resolve_secrets()`,
a separate step; a `${...}` anywhere else is a validation error, never a literal.

Driver-specific models (buses, devices, points) live with their drivers in `drivers/`; this
module composes them and checks what crosses sections (a device naming an unknown bus,
duplicate names, Sparkplug-illegal identifiers).
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    AfterValidator,
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
    # strict: "1" is not 1 and "yes" is not true; allow_inf_nan: nan/inf are never a limit or a value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _sparkplug_id(value: str) -> str:
    if not _SPARKPLUG_ID_RE.match(value):
        raise ValueError(
            f"{value!r} cannot be a Sparkplug id: it must be non-empty and contain no '/', '+', '#' or white space"
        )
    return value


def _server_url(value: str) -> str:
    parse_server_url(value, default_scheme="mqtt")
    return value


def _host_port(value: str) -> str:
    parse_host_port(value)
    return value


class GatewaySection(_Section):
    group_id: str = Field(description="Sparkplug group id")
    edge_node_id: str = Field(description="Sparkplug edge node id")
    data_dir: str = Field("/var/lib/outpost", min_length=1, description="buffer, bdSeq and state files")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = Field("kv", description="key=value lines for journald, or JSON lines")

    _ids = field_validator("group_id", "edge_node_id")(_sparkplug_id)

    @property
    def gateway_id(self) -> str:
        return f"{self.group_id}/{self.edge_node_id}"


class BufferSection(_Section):
    max_size_bytes: SizeBytes = Field(512_000_000, description="hard cap on the buffer file; at least 1_000_000")
    max_age: Duration = Field(
        7 * 86400.0, gt=0, description="records older than this are dropped (counted, logged)"
    )
    when_full: Literal["drop_oldest", "block"] = Field(
        "drop_oldest", description="at the size/age limit or a full disk: drop the oldest records, or block new ones"
    )
    synchronous: Literal["full", "normal"] = Field(
        "full", description="full: a committed batch survives power loss; normal: fewer fsyncs (SD card wear), a "
        "power cut loses at most the last 1 s and at most 1000 records of commits (see below)"
    )
    flush_interval: Duration = Field(
        0.2, gt=0, le=60.0, description="how long samples wait to be committed as one batch"
    )
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
    servers: list[Annotated[str, AfterValidator(_server_url)]] = Field(
        min_length=1, description='e.g. ["mqtts://broker:8883"], tried in order'
    )
    client_id: str | None = Field(None, description="default: outpost-<group_id>-<edge_node_id>")
    username: str | None = None
    password: str | None = Field(None, description='a "${ENV_VAR}" reference, or use password_file')
    password_file: str | None = Field(None, description="file holding the password (first line)")
    ca_file: str | None = Field(None, description="CA bundle for mqtts:// servers (default: system CAs)")
    cert_file: str | None = Field(None, description="client certificate (with key_file) for mutual TLS")
    key_file: str | None = None
    keepalive: Duration = Field(30.0, ge=1.0, le=65535.0, description="MQTT keep alive, 1s..65535s")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version")
    primary_host_id: str | None = Field(None, description="wait for this Sparkplug Primary Host's STATE before births")
    use_aliases: bool = Field(True, description="Sparkplug metric aliases in DDATA (fewer bytes on the wire)")
    data_qos: Literal[0, 1] = Field(
        1, description="QoS of DDATA. 1: a record leaves the buffer after its PUBACK (a deviation from the "
        "specification); 0: as the specification says, a record leaves the buffer once written to the connection")
    historical_max_per_s: float = Field(500.0, gt=0, description="pace of the backlog flush, records/s")
    reconnect_min: Duration = Field(1.0, gt=0, description="first reconnect delay; doubles with jitter")
    reconnect_max: Duration = Field(60.0, gt=0, description="reconnect delay cap")

    _client_id = field_validator("client_id", "password_file", "ca_file", "cert_file", "key_file")(
        lambda v: _non_empty(v)
    )
    _host_id = field_validator("primary_host_id")(lambda v: v if v is None else _sparkplug_id(v))


    @model_validator(mode="after")
    def _tls_pairs(self) -> MqttSection:
        _check_secret_pair(self.password, self.password_file, "password")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: set both or neither")
        _check_reconnect(self.reconnect_min, self.reconnect_max)
        return self


class KafkaMapping(_Section):
    name: str | None = Field(None, description="default: the Kafka topic; unique among the mappings")
    mqtt_topic_filters: list[Annotated[str, AfterValidator(validate_topic_filter)]] = Field(min_length=1)
    kafka_topic: str
    format: Literal["sparkplug", "json", "raw"] = Field(
        "sparkplug", description="sparkplug: protobuf bytes as on MQTT; json: decoded metrics; raw: bridged payload"
    )
    key: Literal["device", "topic"] = Field("device", description="Kafka record key: the device path or the MQTT topic")
    subscribe: bool = Field(
        False, description="also subscribe to these filters on the MQTT broker (bridge other clients)"
    )


    _name = field_validator("name")(lambda v: _non_empty(v))
    _kafka_topic = field_validator("kafka_topic")(lambda t: validate_kafka_topic(t))


class KafkaInbound(_Section):
    name: str | None = Field(None, description="default: inbound-<index>; unique among the inbound entries")
    kafka_topics: list[Annotated[str, AfterValidator(validate_kafka_topic)]] = Field(
        min_length=1, description="legal Kafka topic names"
    )
    group_id: str = Field(
        min_length=1, description="Kafka consumer group; offsets are committed after the publish or write"
    )
    action: Literal["mqtt_publish", "device_command"] = Field(
        description='device_command: JSON {"device", "point", "value"} becomes a checked write'
    )
    mqtt_topic_template: str | None = Field(
        None, description="for mqtt_publish: e.g. 'site/{key}' ({topic}, {key}, {partition})"
    )
    qos: Literal[0, 1] = 1

    _name = field_validator("name")(lambda v: _non_empty(v))


    @field_validator("qos", mode="before")
    @classmethod
    def _int_choice(cls, value: object) -> object:
        # Literal[1, 2] matches true and 1.0 by equality, even in strict mode.
        if isinstance(value, bool | float):
            raise ValueError(f"expected an integer, got {value!r}")
        return value

    @field_validator("mqtt_topic_template")
    @classmethod
    def _template_syntax(cls, t: str | None) -> str | None:
        return t if t is None else validate_mqtt_topic_template(t)

    @model_validator(mode="after")
    def _template(self) -> KafkaInbound:
        if self.action == "mqtt_publish" and not self.mqtt_topic_template:
            raise ValueError("action 'mqtt_publish' needs mqtt_topic_template")
        if self.action == "device_command" and self.mqtt_topic_template:
            raise ValueError("mqtt_topic_template is only for action 'mqtt_publish'")
        return self


class KafkaSection(_Section):
    bootstrap_servers: list[Annotated[str, AfterValidator(_host_port)]] = Field(
        min_length=1, description='["host:port", ...]'
    )
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
    linger: Duration = Field(0.1, le=60.0, description="how long the producer waits to fill a batch")
    batch_max_bytes: SizeBytes = Field(
        1_000_000, ge=1024, le=1_000_000_000, description="bytes per Kafka record batch (per partition)"
    )
    batch_max_records: int = Field(
        2000,
        ge=1,
        le=100_000,
        description="records per Kafka batch (per partition); a failure resends at most one batch per partition",
    )
    request_timeout: Duration = Field(
        30.0, ge=1.0, description="a request not answered in this time counts as a failed link"
    )
    reconnect_min: Duration = Field(1.0, gt=0)
    reconnect_max: Duration = Field(60.0, gt=0)

    _client_id = field_validator("client_id", "sasl_password_file", "ca_file", "cert_file", "key_file")(
        lambda v: _non_empty(v)
    )
    mappings: list[KafkaMapping] = Field(default_factory=list)
    inbound: list[KafkaInbound] = Field(default_factory=list)


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
        _check_reconnect(self.reconnect_min, self.reconnect_max)
        return self


class DiagnosticsSection(_Section):
    socket_path: str = Field("/run/outpost/outpost.sock", min_length=1, description="Unix socket for status and tail")
    socket_group: str = Field("outpost", min_length=1, description="group allowed to use the socket")
    metrics_listen: str | None = Field(
        None, description='HTTP listener for the status page, /status.json and /metrics, e.g. "127.0.0.1:9108"; '
                          "off when unset")
    page: bool = Field(True, description="serve the status page (/ and /status.json) beside /metrics")
    allow_remote: bool = Field(False, description="let metrics_listen be an address beyond loopback (needs token_file)")
    token_file: str | None = Field(
        None, description="file holding the token every HTTP request must carry (Bearer or ?token=); "
                          "required with allow_remote")

    _token_file = field_validator("token_file")(lambda v: _non_empty(v))

    @field_validator("metrics_listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            parse_host_port(v)
        return v

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> DiagnosticsSection:
        if self.metrics_listen is not None and not self.allow_remote:
            host, _ = parse_host_port(self.metrics_listen)
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError(
                    f"metrics_listen only on loopback (127.0.0.1, ::1), got {host!r}; reach it with ssh -L, "
                    "or set allow_remote = true with a token_file")
        if self.allow_remote and self.token_file is None:
            raise ValueError("allow_remote = true needs token_file (the token every request must carry)")
        return self


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


def validate_kafka_topic(t: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", t) or t in (".", ".."):
        raise ValueError(f"{t!r} is not a legal Kafka topic name (letters, digits, '.', '_', '-'; 1 to 249)")
    return t


TEMPLATE_FIELDS = ("topic", "key", "partition")


def validate_mqtt_topic_template(template: str) -> str:
    """An inbound `mqtt_topic_template`: the placeholders it may use, and a publishable topic."""
    import string

    hint = "use plain {topic}, {key} or {partition}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a template: {exc}; {hint}") from None
    for literal, field, spec, conversion in parts:
        if any(c in literal for c in "+#\x00"):
            raise ValueError(
                f"{template!r}: MQTT wildcards ('+', '#') and NUL cannot be in a topic to publish to"
            )
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS:
            raise ValueError(f"{template!r}: unknown placeholder {{{field}}}; {hint}")
        if spec or conversion:
            raise ValueError(f"{template!r}: {{{field}}} takes no format spec or conversion; {hint}")
    if not template or template.startswith("$"):
        raise ValueError(f"{template!r}: a topic to publish to is not empty and does not start with '$'")
    if len(template.encode("utf-8")) > 60_000:
        raise ValueError("the template is longer than an MQTT topic can be")
    return template


def _non_empty(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise ValueError("must not be empty (leave the key out for the default)")
    return value


def _check_reconnect(lo: float, hi: float) -> None:
    if hi < lo:
        raise ValueError(f"reconnect_max ({hi:g}s) must be >= reconnect_min ({lo:g}s)")


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
    """The line of every key path in TOML text: tables, arrays of tables, dotted keys, inline
    tables and arrays (`points = [{name = "a", scale = 2.0}]` gives `points[0].scale` its line).

    tomllib keeps no positions, so this is a small scanner over text that tomllib has already
    accepted. It never raises: on anything it does not follow it keeps what it found so far, and
    `find` falls back to the nearest enclosing key.
    """

    _BARE = re.compile(r"[A-Za-z0-9_\-]+")

    def __init__(self, text: str) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        self._t = text
        self._i = 0
        self._arrays: dict[tuple[str | int, ...], int] = {}  # array of tables -> current index
        self._at = (0, 1)  # (position, its line)
        try:
            self._document()
        except (IndexError, ValueError, RecursionError):
            pass

    def find(self, parts: list[str | int]) -> int | None:
        return self.find_depth(parts)[1]

    def find_depth(self, parts: list[str | int]) -> tuple[int, int | None]:
        """(how many leading steps of `parts` were found, the line of the deepest one)."""
        for n in range(len(parts), 0, -1):
            line = self.lines.get(tuple(parts[:n]))
            if line is not None:
                return n, line
        return 0, None

    # -- scanner ----------------------------------------------------------------------------

    def _line(self) -> int:
        # Counted from the last position asked about: the scanner only moves forward.
        pos, line = self._at
        line += self._t.count("\n", pos, self._i)
        self._at = (self._i, line)
        return line

    def _peek(self, n: int = 1) -> str:
        return self._t[self._i : self._i + n]

    def _skip(self, newlines: bool) -> None:
        t = self._t
        while self._i < len(t):
            c = t[self._i]
            if c in " \t\r" or (newlines and c == "\n"):
                self._i += 1
            elif c == "#":
                while self._i < len(t) and t[self._i] != "\n":
                    self._i += 1
            else:
                return

    def _mark(self, path: tuple[str | int, ...], line: int) -> None:
        self.lines.setdefault(path, line)

    def _document(self) -> None:
        table: tuple[str | int, ...] = ()
        while True:
            self._skip(newlines=True)
            if self._i >= len(self._t):
                return
            line = self._line()
            if self._peek(2) == "[[":
                self._i += 2
                names = self._key()
                self._expect("]]")
                path: list[str | int] = []
                for name in names[:-1]:
                    path.append(name)
                    if tuple(path) in self._arrays:
                        path.append(self._arrays[tuple(path)])
                path.append(names[-1])
                idx = self._arrays.get(tuple(path), -1) + 1
                self._arrays[tuple(path)] = idx
                self._mark(tuple(path), line)
                path.append(idx)
                table = tuple(path)
                self._mark(table, line)
            elif self._peek() == "[":
                self._i += 1
                names = self._key()
                self._expect("]")
                path = []
                for name in names:
                    path.append(name)
                    if tuple(path) in self._arrays and name is not names[-1]:
                        path.append(self._arrays[tuple(path)])
                table = tuple(path)
                self._mark(table, line)
            else:
                self._pair(table)

    def _expect(self, token: str) -> None:
        self._skip(newlines=False)
        if self._peek(len(token)) != token:
            raise ValueError(token)
        self._i += len(token)

    def _key(self) -> list[str]:
        names = []
        while True:
            self._skip(newlines=False)
            c = self._peek()
            if c in ("\"", "'"):
                names.append(self._string())
            else:
                m = self._BARE.match(self._t, self._i)
                if not m:
                    raise ValueError("key")
                names.append(m.group(0))
                self._i = m.end()
            self._skip(newlines=False)
            if self._peek() != ".":
                return names
            self._i += 1

    def _pair(self, table: tuple[str | int, ...]) -> None:
        line = self._line()
        names = self._key()
        path = table
        for name in names:
            path = (*path, name)
            self._mark(path, line)
        self._expect("=")
        self._value(path)

    def _string(self) -> str:
        t = self._t
        for quote in ('"""', "'''"):
            if t.startswith(quote, self._i):
                end = t.index(quote, self._i + 3)
                while t.startswith(quote[0], end + 3):  # up to two quotes may end the content
                    end += 1
                out = t[self._i + 3 : end]
                self._i = end + 3
                return out
        quote = t[self._i]
        j = self._i + 1
        while t[j] != quote:
            j += 2 if quote == '"' and t[j] == "\\" else 1
        out = t[self._i + 1 : j]
        self._i = j + 1
        return out

    def _value(self, path: tuple[str | int, ...]) -> None:
        self._skip(newlines=False)
        c = self._peek()
        if c in ("\"", "'"):
            self._string()
        elif c == "[":
            self._i += 1
            n = 0
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._i += 1
                    return
                self._mark((*path, n), self._line())
                self._value((*path, n))
                n += 1
                self._skip(newlines=True)
                if self._peek() == ",":
                    self._i += 1
        elif c == "{":
            self._i += 1
            while True:
                self._skip(newlines=False)
                if self._peek() == "}":
                    self._i += 1
                    return
                self._pair(path)
                self._skip(newlines=False)
                if self._peek() == ",":
                    self._i += 1
        else:
            t = self._t
            while self._i < len(t) and t[self._i] not in ",]}\n#":
                self._i += 1


def _unwrap_models(annotation: Any) -> list[type[BaseModel]]:
    """The config models a field's value is validated against (through list, Optional, unions)."""
    origin = get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is Annotated or origin in (list, Union, UnionType):
        return [m for a in get_args(annotation) for m in _unwrap_models(a)]
    return []


def _tag_of(model: type[BaseModel]) -> str | None:
    for key in ("driver", "transport"):
        f = model.model_fields.get(key)
        if f is not None and get_origin(f.annotation) is Literal:
            return str(get_args(f.annotation)[0])
    return None


def known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the table at `loc` (a pydantic location, union tags included)."""
    models: list[type[BaseModel]] = [OutpostConfig]
    for step in loc:
        if isinstance(step, int):
            continue
        tagged = [m for m in models if _tag_of(m) == step]
        if tagged and not any(step in m.model_fields for m in models):
            models = tagged
            continue
        models = [n for m in models if step in m.model_fields for n in _unwrap_models(m.model_fields[step].annotation)]
        if not models:
            return []
    return sorted({k for m in models for k in m.model_fields})


def _expected(err: dict[str, Any]) -> str:
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        loc = tuple(err["loc"])
        known = known_keys(loc[:-1])
        near = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        if near:
            return f"unknown key; did you mean {near[0]!r}?"
        return "unknown key (see the configuration reference in the README)" + (
            f"; known here: {', '.join(known)}" if known else ""
        )
    if err["type"] == "missing":
        return "required key is missing"
    if err["type"] in ("int_type", "float_type", "bool_type", "string_type") and isinstance(err.get("input"), str):
        return f"{msg} (write it without quotes)"
    if err["type"] == "finite_number":
        return "nan and inf are not allowed here; give a finite number"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg


Locate = Callable[[list[str | int]], str]  # key path -> "file:line" (or "file")


def _locator(path: str, index: _LineIndex) -> Locate:
    def locate(parts: list[str | int]) -> str:
        line = index.find(parts)
        return f"{path}:{line}" if line else path

    return locate


def validation_problems(path: str, text: str, data: dict[str, Any], exc: ValidationError) -> list[str]:
    return _validation_problems(_locator(path, _LineIndex(text)), data, exc)


def _validation_problems(locate: Locate, data: dict[str, Any], exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False):
        key_path, parts = _format_path(tuple(err["loc"]), data)
        got = ""
        value = err.get("input")
        if err["type"] != "missing" and not isinstance(value, dict | list) and repr(value) not in err["msg"]:
            got = f" (got {value!r})"
        problems.append(f"{locate(parts)}: {key_path}: {_expected(err)}{got}")
    return problems


# Only these keys take `${VAR}`: they are the secrets, resolved at start from the service's
# environment (/etc/outpost/outpost.env). Everywhere else the file is used as written, so a
# `${...}` there is refused rather than taken literally (see the README, "Secrets").
MIN_TOKEN_CHARS = 16  # diagnostics.token_file: a token shorter than this is refused

ENV_REFERENCE_KEYS = ("mqtt.password", "kafka.sasl_password")


def _strings(data: Any) -> list[tuple[list[str | int], str]]:
    out: list[tuple[list[str | int], str]] = []
    stack: list[tuple[list[str | int], Any]] = [([], data)]
    while stack:
        parts, value = stack.pop()
        if isinstance(value, str):
            out.append((parts, value))
        elif isinstance(value, dict):
            stack.extend(([*parts, k], v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(([*parts, i], v) for i, v in enumerate(value))
    return sorted(out, key=lambda pv: _path_text(pv[0]))


def env_reference_problems(data: dict[str, Any]) -> list[tuple[list[str | int], str]]:
    out: list[tuple[list[str | int], str]] = []
    for parts, value in _strings(data):
        if "${" not in value:
            continue
        key = _path_text(parts)
        if key in ENV_REFERENCE_KEYS:
            if "${" in _ENV_REF_RE.sub("", value):
                out.append((parts, "malformed ${VAR} reference: a name is letters, digits and '_', "
                                   "not starting with a digit, closed by '}'"))
        else:
            out.append((parts, f"{value!r} holds a ${{VAR}} reference, but only "
                               f"{' and '.join(ENV_REFERENCE_KEYS)} take them (elsewhere it would be used "
                               "literally); write the value itself"))
    return out


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
        if dev.get("driver", "modbus") == "modbus" and isinstance(dev.get("bus"), str) and dev["bus"] not in bus_names:
            known = ", ".join(repr(b) for b in bus_names) or "none are configured"
            out.append((["devices", i, "bus"], f"{dev['bus']!r} names no bus in [[buses]] (known: {known})"))
    kafka = data.get("kafka") if isinstance(data.get("kafka"), dict) else {}
    mappings = kafka.get("mappings") if isinstance(kafka.get("mappings"), list) else []
    inbound = kafka.get("inbound") if isinstance(kafka.get("inbound"), list) else []
    for section, entries, default in (("mappings", mappings, "mapping-{}"), ("inbound", inbound, "inbound-{}")):
        # Names key the task owner and the status; the runtime refuses two with one name.
        names: dict[str, int] = {}
        for i, m in enumerate(entries):
            name = m.get("name") if isinstance(m, dict) else None
            name = name if isinstance(name, str) and name else default.format(i)
            if name in names:
                used = f"{name!r} is already used by kafka.{section}[{names[name]}]"
                out.append((["kafka", section, i, "name"], used))
            names.setdefault(name, i)
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


def _too_deep(path: str) -> ConfigError:
    return ConfigError(path, [f"{path}: arrays or tables are nested too deeply to be an Outpost configuration"])


def parse_data(data: dict[str, Any], locate: Locate, path: str = "<config>") -> OutpostConfig:
    """Validate parsed TOML data; raises ConfigError with every problem found."""
    problems: list[str] = []
    cfg: OutpostConfig | None = None
    try:
        cfg = OutpostConfig.model_validate(data)
    except ValidationError as e:
        problems.extend(_validation_problems(locate, data, e))
    except RecursionError:
        raise _too_deep(path) from None
    for parts, msg in cross_reference_problems(data) + env_reference_problems(data):
        problems.append(f"{locate(parts)}: {_path_text(parts)}: {msg}")
    if problems or cfg is None:
        raise ConfigError(path, sorted(problems, key=_line_of))
    return cfg


def _line_of(problem: str) -> tuple[str, int]:
    m = re.match(r"(.*?):(\d+): ", problem)
    return (m.group(1), int(m.group(2))) if m else (problem.split(": ", 1)[0], 0)


def parse_config(text: str, path: str = "<config>") -> OutpostConfig:
    """Validate TOML text; raises ConfigError with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"{path}: not valid TOML: {e}"]) from None
    except RecursionError:
        raise _too_deep(path) from None
    return parse_data(data, _locator(path, _LineIndex(text)), path)


def load_config(path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH) -> OutpostConfig:
    """The main file merged with its drop-ins (conf.d/*.toml beside it), validated."""
    src = read_sources(path)
    return parse_data(src.data, src.locate, src.path)


# ---------------------------------------------------------------------------------------
# Drop-ins: conf.d/*.toml next to the main file, merged in name order


def dropin_paths(path: str | os.PathLike[str]) -> list[Path]:
    return sorted((Path(path).parent / "conf.d").glob("*.toml"))


@dataclass
class ConfigSource:
    """The main file and its drop-ins merged: the data to validate and where each key came from."""

    path: str
    files: list[str]
    texts: list[str]
    data: dict[str, Any]
    locate: Locate


def _parse_text(text: str, path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"{path}: not valid TOML: {e}"]) from None
    except RecursionError:
        raise _too_deep(path) from None


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


def read_sources(path: str | os.PathLike[str]) -> ConfigSource:
    """Read the main file and its drop-ins. Tables merge, arrays of tables ([[devices]]) are
    appended in file order; any other key set in two files is a problem naming both places."""
    main = str(path)
    files = [main, *(str(p) for p in dropin_paths(path))]
    texts = [read_config_text(f) for f in files]
    docs = [_parse_text(t, f) for f, t in zip(files, texts, strict=True)]
    indexes = [_LineIndex(t) for t in texts]
    # merged list path -> [(first merged index, file number)]
    segments: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    owner: dict[tuple[Any, ...], int] = {}
    conflicts: list[tuple[tuple[Any, ...], int]] = []

    def merge(dst: dict[str, Any], src: dict[str, Any], at: tuple[Any, ...], fno: int) -> None:
        for k, v in src.items():
            p = (*at, k)
            if k not in dst:
                dst[k] = v
                owner[p] = fno
                if _is_table_array(v):
                    segments[p] = [(0, fno)]
            elif isinstance(dst[k], dict) and isinstance(v, dict):
                merge(dst[k], v, p, fno)
            elif _is_table_array(dst[k]) and _is_table_array(v):
                segments.setdefault(p, [(0, owner.get(p, 0))]).append((len(dst[k]), fno))
                dst[k] = [*dst[k], *v]
            else:
                conflicts.append((p, fno))

    data: dict[str, Any] = {}
    for fno, doc in enumerate(docs):
        merge(data, doc, (), fno)

    def local(parts: list[str | int], fno: int) -> list[str | int] | None:
        out: list[str | int] = []
        prefix: tuple[Any, ...] = ()
        for step in parts:
            if isinstance(step, int) and prefix in segments:
                start, seg_file = next((s, f) for s, f in reversed(segments[prefix]) if s <= step)
                if seg_file != fno:
                    return None
                out.append(step - start)
            else:
                out.append(step)
            prefix = (*prefix, step)
        return out

    def locate(parts: list[str | int]) -> str:
        best: tuple[int, int, int | None] = (0, 0, None)
        for fno, index in enumerate(indexes):
            mine = local(parts, fno)
            if mine is None:
                continue
            depth, line = index.find_depth(mine)
            if line is not None and depth > best[0]:
                best = (depth, fno, line)
        return f"{files[best[1]]}:{best[2]}" if best[2] is not None else main

    problems = []
    for p, fno in conflicts:
        first = owner.get(p, 0)
        line_a, line_b = indexes[first].find(list(p)), indexes[fno].find(list(p))
        problems.append(
            f"{files[fno]}:{line_b}: {_path_text(list(p))}: also set in {files[first]}:{line_a}; drop-ins may add "
            "tables and [[arrays]] of tables, but a key is set in one file only"
        )
    if problems:
        raise ConfigError(main, problems)
    return ConfigSource(main, files, texts, data, locate if len(files) > 1 else _locator(main, indexes[0]))


def read_config_text(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [f"{p}: file not found (use --config PATH)"]) from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError, OSError) as e:
        raise ConfigError(str(p), [f"{p}: cannot read: {e}"]) from None


# ---------------------------------------------------------------------------------------
# Secrets: resolved after validation, never part of validation


@dataclass(frozen=True)
class Secrets:
    mqtt_password: str | None = None
    kafka_sasl_password: str | None = None
    diagnostics_token: str | None = None


def unset_variables(value: str | None, env: dict[str, str]) -> list[str]:
    if value is None:
        return []
    return [m.group(1) for m in _ENV_REF_RE.finditer(value) if m.group(1) not in env]


def _resolve_one(value: str | None, file: str | None, key: str, env: dict[str, str]) -> tuple[str | None, str | None]:
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8").rstrip("\r\n"), None
        except (OSError, UnicodeDecodeError) as e:
            return None, f"{key}_file: cannot read {file!r}: {getattr(e, 'strerror', None) or e}"
    if value is None:
        return None, None
    missing = unset_variables(value, env)
    if missing:
        return None, f"{key}: environment variable {', '.join(missing)} is not set"
    return _ENV_REF_RE.sub(lambda m: env[m.group(1)], value), None


def resolve_secrets(
    cfg: OutpostConfig,
    env: dict[str, str] | None = None,
    path: str = "<config>",
    *,
    text: str | None = None,
    locate: Locate | None = None,
) -> Secrets:
    """`${VAR}` and `*_file` secrets; raises ConfigError naming the key (and its line, given the
    text or a locator)."""
    env = dict(os.environ) if env is None else env
    if locate is None:
        locate = _locator(path, _LineIndex(text)) if text is not None else (lambda parts: path)
    problems: list[str] = []
    mqtt_pw = kafka_pw = None
    if cfg.mqtt is not None:
        mqtt_pw, err = _resolve_one(cfg.mqtt.password, cfg.mqtt.password_file, "mqtt.password", env)
        if err:
            key = "password_file" if cfg.mqtt.password_file is not None else "password"
            problems.append(f"{locate(['mqtt', key])}: {err}")
    if cfg.kafka is not None:
        kafka_pw, err = _resolve_one(cfg.kafka.sasl_password, cfg.kafka.sasl_password_file, "kafka.sasl_password", env)
        if err:
            key = "sasl_password_file" if cfg.kafka.sasl_password_file is not None else "sasl_password"
            problems.append(f"{locate(['kafka', key])}: {err}")
    token, err = _resolve_one(None, cfg.diagnostics.token_file, "diagnostics.token", env)
    if err:
        problems.append(f"{locate(['diagnostics', 'token_file'])}: {err}")
    elif token is not None and len(token.strip()) < MIN_TOKEN_CHARS:
        problems.append(f"{locate(['diagnostics', 'token_file'])}: diagnostics.token_file: the token in "
                        f"{cfg.diagnostics.token_file!r} has fewer than {MIN_TOKEN_CHARS} characters "
                        "(e.g. `openssl rand -hex 24`)")
    if problems:
        raise ConfigError(path, problems)
    return Secrets(mqtt_password=mqtt_pw, kafka_sasl_password=kafka_pw,
                   diagnostics_token=token.strip() if token else None)


def warnings(cfg: OutpostConfig, env: dict[str, str] | None = None) -> list[str]:
    """Things that are valid but that a field engineer should hear about (exit code stays 0)."""
    out = []
    for key, value in (
        ("mqtt.password", cfg.mqtt.password if cfg.mqtt else None),
        ("kafka.sasl_password", cfg.kafka.sasl_password if cfg.kafka else None),
    ):
        if value is not None and not _ENV_REF_RE.search(value):
            out.append(f'{key} is written in the file itself; prefer "${{ENV_VAR}}" or {key}_file')
        if env is not None and unset_variables(value, env):
            out.append(
                f"{key}: environment variable {', '.join(unset_variables(value, env))} is not set in this "
                "shell (the service reads /etc/outpost/outpost.env; `outpost check --secrets` makes this an error)"
            )
    out.extend(cleartext_warnings(cfg))
    if cfg.kafka is not None:
        for i, m in enumerate(cfg.kafka.mappings):
            if m.subscribe and m.format == "json" and any(not f.startswith("spBv1.0/") for f in m.mqtt_topic_filters):
                out.append(
                    f'kafka.mappings[{i}]: format "json" decodes Sparkplug payloads; bridged messages on '
                    'non-Sparkplug topics will fail to format (use "raw")'
                )
    if cfg.buffer.synchronous == "normal":
        out.append('buffer.synchronous = "normal": a power cut may lose up to the last 1 s (1000 records) of commits')
    return out


def cleartext_warnings(cfg: OutpostConfig) -> list[str]:
    """Credentials or keys that the configuration would send, or configure, without TLS."""
    out: list[str] = []
    m = cfg.mqtt
    if m is not None:
        clear = [s for s in m.servers if not parse_server_url(s).tls]
        if clear:
            where = ", ".join(clear)
            if m.password is not None or m.password_file is not None:
                key = "mqtt.password" if m.password is not None else "mqtt.password_file"
                out.append(f"{key}: the password is sent in clear text to {where} (no TLS); use mqtts://")
            for key in ("ca_file", "cert_file"):
                if getattr(m, key) is not None:
                    out.append(f"mqtt.{key} is set but {where} does not use TLS, so it is not used; use mqtts://")
    k = cfg.kafka
    if k is not None and k.security_protocol == "SASL_PLAINTEXT":
        key = "kafka.sasl_password" if k.sasl_password is not None else "kafka.sasl_password_file"
        if k.sasl_mechanism == "PLAIN":
            out.append(
                f'{key}: security_protocol "SASL_PLAINTEXT" with sasl_mechanism "PLAIN" sends the password '
                'in clear text; use "SASL_SSL"'
            )
        else:
            out.append(
                'kafka.security_protocol: "SASL_PLAINTEXT" sends every record unencrypted '
                f'(the {k.sasl_mechanism} password itself is not sent); use "SASL_SSL"'
            )
    return out


# ---------------------------------------------------------------------------------------
# JSON Schema of the file, for editors (`outpost check --schema`)


def _models_under(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    if model.__name__ not in seen:
        seen[model.__name__] = model
        for f in model.model_fields.values():
            for m in _unwrap_models(f.annotation):
                _models_under(m, seen)
    return seen


_DURATION_SCHEMA = {
    "type": "string",
    "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|min|m|h|d)\s*$",
    "examples": ["800ms", "30s", "5m", "7d"],
}


def _is_duration(f: Any) -> bool:
    meta = list(f.metadata)
    for arg in get_args(f.annotation):  # Duration | None keeps its metadata inside the union
        meta.extend(getattr(arg, "__metadata__", ()))
    return any(getattr(getattr(m, "func", None), "__name__", "") == "parse_duration" for m in meta)


def json_schema() -> dict[str, Any]:
    """The pydantic JSON Schema, with durations written as the file writes them ("800ms")."""
    from drivers.units import format_duration

    schema = OutpostConfig.model_json_schema()
    schema["title"] = "Outpost configuration (outpost.toml)"
    defs = schema.get("$defs", {})
    for name, model in _models_under(OutpostConfig, {}).items():
        props = (schema if model is OutpostConfig else defs.get(name, {})).get("properties", {})
        for fname, f in model.model_fields.items():
            prop = props.get(fname)
            if prop is None or not _is_duration(f):
                continue
            kept = {k: v for k, v in prop.items() if k in ("title", "description")}
            if isinstance(prop.get("default"), int | float):
                kept["default"] = format_duration(prop["default"])
            if "anyOf" in prop:  # Optional[Duration]
                kept["anyOf"] = [_DURATION_SCHEMA if s.get("type") == "number" else s for s in prop["anyOf"]]
            else:
                kept.update(_DURATION_SCHEMA)
            props[fname] = kept
    return schema
