"""Prometheus metrics: a small registry and a loopback HTTP endpoint serving GET /metrics.

Off unless `diagnostics.metrics_listen` is set. No client library: counters and gauges
with labels are a few dicts, and the text exposition format (version 0.0.4) is simple.
Updating a metric is a dict operation on the event loop; rendering happens only when
Prometheus scrapes.

    registry = MetricsRegistry()
    m = GatewayMetrics(registry)
    m.samples_read.inc(device="meter1")
    server = MetricsServer(registry, "127.0.0.1:9108"); await server.start(); ...; await server.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import re
from collections.abc import Callable
from typing import Any, TypeVar

from common.logs import fields
from gateway.diagnostics.errors import DiagnosticsError

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labelnames:
            if not _LABEL_RE.match(label) or label.startswith("__"):
                raise ValueError(f"metric {name}: invalid label name {label!r}")
        self.name = name
        self.help = help_text
        self.labelnames = labelnames
        self._values: dict[tuple[str, ...], float] = {}

    def _key(self, labels: dict[str, Any]) -> tuple[str, ...]:
        try:
            key = tuple([v if type(v) is str else str(v) for v in map(labels.__getitem__, self.labelnames)])
        except KeyError:
            key = None
        if key is None or len(labels) != len(self.labelnames):
            raise ValueError(
                f"metric {self.name} takes labels {list(self.labelnames)}, got {sorted(labels)}"
            )
        return key

    def labels(self, **labels: Any) -> _Child:
        """A handle for one label set, for hot paths: `child.inc()` is one dict update."""
        return _Child(self, self._key(labels))

    def value(self, **labels: Any) -> float:
        return self._values.get(self._key(labels), 0.0)

    def remove(self, **labels: Any) -> None:
        """Forget one label set (a device removed by a reload)."""
        self._values.pop(self._key(labels), None)

    def render(self, out: list[str]) -> None:
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {self.name} {help_text}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for key, value in sorted(self._values.items()):
            if key:
                labels = ",".join(
                    f'{n}="{_escape_label(v)}"' for n, v in zip(self.labelnames, key, strict=True)
                )
                out.append(f"{self.name}{{{labels}}} {_format_value(value)}")
            else:
                out.append(f"{self.name} {_format_value(value)}")


class _Child:
    __slots__ = ("_key", "_metric")

    def __init__(self, metric: _Metric, key: tuple[str, ...]) -> None:
        self._metric = metric
        self._key = key

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0 and isinstance(self._metric, Counter):
            raise ValueError(f"counter {self._metric.name} cannot decrease (inc by {amount})")
        values = self._metric._values
        values[self._key] = values.get(self._key, 0.0) + amount

    def set(self, value: float) -> None:
        if not isinstance(self._metric, Gauge):
            raise TypeError(f"{self._metric.name} is a counter; counters only go up")
        self._metric._values[self._key] = float(value)


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot decrease (inc by {amount})")
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0.0) + amount


_M = TypeVar("_M", bound=_Metric)


class MetricsRegistry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Counter:
        return self._add(Counter(name, help_text, tuple(labelnames)))

    def gauge(self, name: str, help_text: str, labelnames: tuple[str, ...] = ()) -> Gauge:
        return self._add(Gauge(name, help_text, tuple(labelnames)))

    def _add(self, metric: _M) -> _M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def add_collector(self, collect: Callable[[], None]) -> None:
        """Run before each scrape to refresh gauges (cheap, in-memory reads only)."""
        self._collectors.append(collect)

    def render(self) -> str:
        for collect in self._collectors:
            try:
                collect()
            except Exception:
                log.exception("metrics collector failed")
        out: list[str] = []
        for name in sorted(self._metrics):
            self._metrics[name].render(out)
        return "\n".join(out) + "\n"


class GatewayMetrics:
    """The gateway's metric set (names documented in gateway/diagnostics/README.md)."""

    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.samples_read = r.counter(
            "outpost_samples_read_total", "Samples read from devices.", ("device",))
        self.samples_published = r.counter(
            "outpost_samples_published_total", "Records acknowledged by an uplink.", ("uplink",))
        self.uplink_events = r.counter(
            "outpost_uplink_events_total",
            "Outcomes counted by each uplink (the counters of `outpost status`).", ("uplink", "event"))
        self.link_since = r.gauge(
            "outpost_link_since_seconds", "Unix time of the link's last up/down change.", ("link",))
        self.buffer_records = r.gauge(
            "outpost_buffer_records", "Records waiting in the buffer per cursor.", ("cursor",))
        self.buffer_dropped = r.counter(
            "outpost_buffer_dropped_total", "Records dropped by the retention policy.", ("reason",))
        self.errors = r.counter(
            "outpost_errors_total", "Read and write errors per device.", ("device",))
        self.link_up = r.gauge(
            "outpost_link_up", "1 when the link is connected, else 0.", ("link",))
        self.buffer_bytes = r.gauge(
            "outpost_buffer_bytes", "Size of the buffer file including its WAL.")
        self.clock_synced = r.gauge(
            "outpost_clock_synced", "1 when the system clock is synchronised.")

    # The uplink contract's sink (gateway.uplinks.core.MetricsSink): an uplink's events
    # update these as they happen, so metrics and `outpost status` cannot disagree.

    def uplink_event(self, uplink: str, event: str, n: int) -> None:
        self.uplink_events.inc(n, uplink=uplink, event=event)
        if event in DELIVERED_EVENTS:
            self.samples_published.inc(n, uplink=uplink)

    def uplink_link(self, uplink: str, up: bool, since_s: float) -> None:
        self.link_up.set(1 if up else 0, link=uplink)
        self.link_since.set(since_s, link=uplink)


# The event that means "acknowledged by the remote side" for each uplink's counters.
DELIVERED_EVENTS = frozenset({"published", "delivered"})


def parse_listen(listen: str) -> tuple[str, int]:
    from gateway.config import parse_host_port  # one host:port syntax for every setting

    try:
        return parse_host_port(listen, allow_port_zero=True)
    except ValueError:
        raise DiagnosticsError(f"metrics_listen {listen!r}: expected host:port such as 127.0.0.1:9108") from None


class MetricsServer:
    """Owner of the HTTP listener. Loopback only unless `allow_remote` (metrics are local)."""

    def __init__(
        self,
        registry: MetricsRegistry,
        listen: str = "127.0.0.1:9108",
        *,
        allow_remote: bool = False,
        request_timeout_s: float = 5.0,
    ) -> None:
        self.host, self._port = parse_listen(listen)
        if not allow_remote and not _is_loopback(self.host):
            raise DiagnosticsError(
                f"metrics_listen {listen!r} is not a loopback address",
                hint="metrics are served on 127.0.0.1 only; reach them with an SSH tunnel",
            )
        self._registry = registry
        self._timeout_s = request_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self._port)
        except OSError as exc:
            raise DiagnosticsError(
                f"cannot serve metrics on {self.host}:{self._port}: {exc.strerror or exc}",
                hint="another process uses that port; pick another metrics_listen",
            ) from exc
        log.info("metrics listening", extra=fields(listen=f"{self.host}:{self.port}"))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        for task in handlers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout_s)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                await _respond(writer, 400, "Bad Request", b"bad request\n")
                return
            method, target = parts[0], parts[1].split("?", 1)[0]
            if target != "/metrics":
                await _respond(writer, 404, "Not Found", b"try /metrics\n")
            elif method not in ("GET", "HEAD"):
                await _respond(writer, 405, "Method Not Allowed", b"GET only\n", allow="GET, HEAD")
            else:
                body = self._registry.render().encode()
                await _respond(writer, 200, "OK", body, head_only=method == "HEAD")
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # close() cancels us. End normally: Python 3.11's stream machinery calls
            # task.exception() on this task and would log a cancelled one as an error.
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await writer.wait_closed()


async def _respond(
    writer: asyncio.StreamWriter,
    code: int,
    reason: str,
    body: bytes,
    *,
    head_only: bool = False,
    allow: str = "",
) -> None:
    headers = [
        f"HTTP/1.1 {code} {reason}",
        f"Content-Type: {CONTENT_TYPE if code == 200 else 'text/plain; charset=utf-8'}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow:
        headers.append(f"Allow: {allow}")
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body))
    await writer.drain()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
