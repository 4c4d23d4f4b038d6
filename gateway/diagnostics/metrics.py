"""Prometheus metrics, rendered from the status document at scrape time.

Nothing is counted for metrics on the data path: the gateway already keeps its figures
(device sample and error counts, every uplink's `UplinkState` counters, the buffer's own
counts), and `outpost status --json` shows them. A scrape asks for that same status
document and a custom `prometheus_client` collector turns it into series, so `/metrics`
and `outpost status` cannot disagree and a sample costs nothing extra. The exposition
(text format, escaping, `process_*` series) is prometheus_client's.

    metrics = GatewayMetrics()
    body = metrics.render(status_document)    # bytes, content type `CONTENT_TYPE`
"""

from __future__ import annotations

import logging
import platform
import threading
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# The text format every Prometheus reads (what generate_latest writes for these names).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The event that means "acknowledged by the remote side" for each uplink's counters.
DELIVERED_EVENTS = frozenset({"published", "delivered"})

# The libraries whose versions `outpost_build_info` carries (what a bug report needs).
_BUILD_LIBRARIES = ("aiokafka", "gmqtt", "pymodbus", "protobuf", "pydantic", "prometheus-client")


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    return None


def build_labels(version: str) -> dict[str, str]:
    labels = {"version": version, "python": platform.python_version(), "machine": platform.machine()}
    for lib in _BUILD_LIBRARIES:
        try:
            labels[lib.replace("-", "_")] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            labels[lib.replace("-", "_")] = ""
    return labels


class StatusCollector(Collector):
    """Turns one status document into the gateway's series (names in README, "Metrics").

    `collect()` reads `self.document`, set by `GatewayMetrics.render` right before the
    registry is rendered.
    """

    def __init__(self) -> None:
        self.document: dict[str, Any] = {}
        self._build: dict[str, str] | None = None

    def collect(self) -> Iterator[Metric]:
        doc = self.document
        yield from self._devices(doc.get("devices") or {})
        yield from self._links(doc.get("links") or {})
        yield from self._buffer(doc.get("buffer") or {})
        clock = doc.get("clock") or {}
        synced = GaugeMetricFamily("outpost_clock_synced", "1 when the system clock is synchronised.")
        if clock:
            synced.add_metric([], 1.0 if clock.get("synced") else 0.0)
        yield synced
        version = str(doc.get("version") or "")
        if self._build is None or self._build.get("version") != version:
            self._build = build_labels(version)
        info = GaugeMetricFamily("outpost_build_info", "Outpost build: version, Python and key library versions.",
                                 labels=list(self._build))
        info.add_metric(list(self._build.values()), 1.0)
        yield info

    @staticmethod
    def _devices(devices: dict[str, Any]) -> Iterator[Metric]:
        read = CounterMetricFamily("outpost_samples_read", "Samples read from devices.", labels=["device"])
        errors = CounterMetricFamily("outpost_errors", "Read and write errors per device.", labels=["device"])
        online = GaugeMetricFamily("outpost_device_online", "1 when the device answers, else 0.", labels=["device"])
        last_good = GaugeMetricFamily(
            "outpost_device_last_good_read_seconds", "Unix time of the device's last good read.", labels=["device"])
        for name, d in sorted(devices.items()):
            if not isinstance(d, dict):
                continue
            read.add_metric([name], _num(d.get("samples")) or 0.0)
            errors.add_metric([name], _num(d.get("errors")) or 0.0)
            online.add_metric([name], 1.0 if d.get("online") else 0.0)
            ts = _num(d.get("last_good_ts_ms"))
            if ts:
                last_good.add_metric([name], ts / 1000)
        yield from (read, errors, online, last_good)

    @staticmethod
    def _links(links: dict[str, Any]) -> Iterator[Metric]:
        up = GaugeMetricFamily("outpost_link_up", "1 when the link is connected, else 0.", labels=["link"])
        since = GaugeMetricFamily(
            "outpost_link_since_seconds", "Unix time of the link's last up/down change.", labels=["link"])
        events = CounterMetricFamily(
            "outpost_uplink_events",
            "Outcomes counted by each uplink (the counters of `outpost status`).", labels=["uplink", "event"])
        published = CounterMetricFamily(
            "outpost_samples_published", "Records acknowledged by an uplink.", labels=["uplink"])
        for name, link in sorted(links.items()):
            if not isinstance(link, dict):
                continue
            up.add_metric([name], 1.0 if link.get("up") else 0.0)
            ts = _num(link.get("since_ms"))
            if ts is not None:
                since.add_metric([name], ts / 1000)
            counters = link.get("counters")
            if not isinstance(counters, dict):
                continue
            delivered = 0.0
            for event, n in sorted(counters.items()):
                value = _num(n)
                if value is None:
                    continue
                events.add_metric([name, event], value)
                if event in DELIVERED_EVENTS:
                    delivered += value
            published.add_metric([name], delivered)
        yield from (up, since, events, published)

    @staticmethod
    def _buffer(buf: dict[str, Any]) -> Iterator[Metric]:
        records = GaugeMetricFamily("outpost_buffer_records", "Records waiting in the buffer per cursor.",
                                    labels=["cursor"])
        for cursor, c in sorted((buf.get("cursors") or {}).items()):
            if isinstance(c, dict) and _num(c.get("records")) is not None:
                records.add_metric([cursor], float(c["records"]))
        # The buffer counts drops since the file was created; the counter is that total.
        dropped = CounterMetricFamily("outpost_buffer_dropped", "Records dropped by the retention policy.",
                                      labels=["reason"])
        for reason, n in sorted((buf.get("dropped") or {}).items()):
            if _num(n) is not None:
                dropped.add_metric([reason], float(n))
        quarantine = GaugeMetricFamily(
            "outpost_buffer_quarantine_records", "Records held in the buffer's quarantine per reason.",
            labels=["reason"])
        for reason, n in sorted(((buf.get("quarantine") or {}).get("by_reason") or {}).items()):
            if _num(n) is not None:
                quarantine.add_metric([reason], float(n))
        size = GaugeMetricFamily("outpost_buffer_bytes", "Size of the buffer file including its WAL.")
        if "file_bytes" in buf or "wal_bytes" in buf:
            size.add_metric([], float((_num(buf.get("file_bytes")) or 0) + (_num(buf.get("wal_bytes")) or 0)))
        yield from (records, dropped, quarantine, size)


class GatewayMetrics:
    """A registry with the status collector and prometheus_client's process collector."""

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = StatusCollector()
        self.registry.register(self.collector)
        if process:
            # process_cpu_seconds_total, process_resident_memory_bytes, open fds, start time.
            ProcessCollector(registry=self.registry)
        self._lock = threading.Lock()

    def render(self, document: dict[str, Any]) -> bytes:
        """The exposition of one status document (and of this process)."""
        with self._lock:  # the document is handed to the collector for this one rendering
            self.collector.document = document
            try:
                return generate_latest(self.registry)
            finally:
                self.collector.document = {}
