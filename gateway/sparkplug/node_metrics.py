"""Node metrics: what a SCADA operator sees on the edge node itself, in NBIRTH and as NDATA.

The same figures as `outpost status` (buffer depth and oldest record per uplink, drops and
quarantine by reason, link states, clock state, uptime, version) plus, where the machine has
them, the CPU temperature and the free disk of `data_dir`. Every metric is declared in NBIRTH
(`tck-id-topics-nbirth-metric-reqs`: the node births every metric it will ever report) and then
reported by exception: an NDATA carries only the metrics that changed beyond their deadband since
they were last sent (`tck-id-topics-ndata-payload`). A figure the machine does not have (no
thermal sensor) is null.

Pure apart from `read_system()`, which reads /sys and statvfs.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from buffer.core import DROP_REASONS
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.payload import DataType, set_metric_value

PREFIX = "Outpost"
# Declared in the NBIRTH and every DBIRTH; flags the timestamps of a DATA payload (edge.py).
CLOCK_MARKER = f"{PREFIX}/Clock/Unsynced"
# The buffer's drop reasons and classes of quarantine reasons: fixed, so that the NBIRTH can
# declare them before any drop happened. A quarantine reason is "held:<topic>" (the broker
# refuses the topic), "too_large", "refused_0x.." (the broker refuses the record), or another
# uplink's own.
QUARANTINE_CLASSES = ("held", "too_large", "refused", "other")
CLOCK_STATES = ("synced", "holdover", "unsynced")
THERMAL_ZONE = "/sys/class/thermal/thermal_zone0/temp"


@dataclass(frozen=True, slots=True)
class NodeMetric:
    name: str
    datatype: DataType
    deadband: float = 0.0   # numbers: report when |new - last| > deadband (0: any change)
    unit: str = ""


def node_metric_defs(uplinks: Sequence[str]) -> list[NodeMetric]:
    """Every node metric, in NBIRTH order, for the given uplink cursors ("mqtt", "kafka")."""
    defs = [
        NodeMetric("Properties/Version", DataType.String),
        NodeMetric(f"{PREFIX}/Uptime", DataType.UInt64, deadband=30, unit="s"),
        NodeMetric(f"{PREFIX}/Clock/State", DataType.String),
        NodeMetric(f"{PREFIX}/Clock/Jumps", DataType.UInt64),
    ]
    for u in uplinks:
        defs += [
            NodeMetric(f"{PREFIX}/Link/{u}", DataType.Boolean),
            # Depth moves by a few records all the time under load: report real backlogs only.
            NodeMetric(f"{PREFIX}/Buffer/{u}/Depth", DataType.UInt64, deadband=100, unit="records"),
            NodeMetric(f"{PREFIX}/Buffer/{u}/Oldest Age", DataType.Double, deadband=60, unit="s"),
            NodeMetric(f"{PREFIX}/Buffer/{u}/Quarantined", DataType.UInt64, unit="records"),
        ]
    defs += [NodeMetric(f"{PREFIX}/Buffer/Dropped/{r}", DataType.UInt64, unit="records") for r in DROP_REASONS]
    defs += [NodeMetric(f"{PREFIX}/Buffer/Quarantined/{c}", DataType.UInt64, unit="records")
             for c in QUARANTINE_CLASSES]
    defs += [
        NodeMetric(f"{PREFIX}/System/CPU Temperature", DataType.Float, deadband=1.0, unit="°C"),
        NodeMetric(f"{PREFIX}/System/Disk Free", DataType.UInt64, deadband=10_000_000, unit="bytes"),
    ]
    return defs


def read_system(data_dir: str) -> dict[str, Any]:
    """CPU temperature (°C) and free bytes of the filesystem of `data_dir`; None where unknown."""
    temp: float | None = None
    try:
        with open(THERMAL_ZONE) as f:
            temp = int(f.read().strip()) / 1000.0
    except (OSError, ValueError):
        temp = None
    free: int | None = None
    try:
        free = shutil.disk_usage(data_dir if os.path.exists(data_dir) else "/").free
    except OSError:
        free = None
    return {"cpu_temp_c": temp, "disk_free_bytes": free}


def _clock_state(clock: Mapping[str, Any]) -> str | None:
    if not clock:
        return None
    if clock.get("synced"):
        return "synced"
    return "holdover" if clock.get("holdover") else "unsynced"


def values_from_status(status: Mapping[str, Any], uplinks: Sequence[str]) -> dict[str, Any]:
    """The node metrics' values from a `Gateway.status()` document (plus `system`: read_system()).

    `status["buffer"]["cursors"][u]` may carry `oldest_age_s` (the age of that uplink's oldest
    undelivered record); without it the buffer's overall oldest age stands in when the cursor
    has records, and 0 when it has none.
    """
    buffer = status.get("buffer") or {}
    cursors = buffer.get("cursors") or {}
    links = status.get("links") or {}
    clock = status.get("clock") or {}
    system = status.get("system") or {}
    uptime = status.get("uptime_s")
    out: dict[str, Any] = {
        "Properties/Version": status.get("version"),
        f"{PREFIX}/Uptime": int(uptime) if isinstance(uptime, int | float) else None,
        f"{PREFIX}/Clock/State": _clock_state(clock),
        f"{PREFIX}/Clock/Jumps": clock.get("jumps"),
    }
    for u in uplinks:
        link = links.get(u)
        out[f"{PREFIX}/Link/{u}"] = bool(link.get("up")) if isinstance(link, Mapping) else None
        c = cursors.get(u)
        if isinstance(c, Mapping):
            depth = c.get("records")
            out[f"{PREFIX}/Buffer/{u}/Depth"] = int(depth) if isinstance(depth, int) else None
            age = c.get("oldest_age_s")
            if age is None and isinstance(depth, int):
                age = buffer.get("oldest_age_s") if depth > 0 else 0.0
            out[f"{PREFIX}/Buffer/{u}/Oldest Age"] = float(age) if isinstance(age, int | float) else None
        else:
            out[f"{PREFIX}/Buffer/{u}/Depth"] = None
            out[f"{PREFIX}/Buffer/{u}/Oldest Age"] = None
    dropped = buffer.get("dropped") or {}
    for r in DROP_REASONS:
        out[f"{PREFIX}/Buffer/Dropped/{r}"] = int(dropped.get(r, 0)) if "dropped" in buffer else None
    q = buffer.get("quarantine")
    by_cursor = q.get("by_cursor") if isinstance(q, Mapping) else None
    by_reason = q.get("by_reason") if isinstance(q, Mapping) else None
    for u in uplinks:
        out[f"{PREFIX}/Buffer/{u}/Quarantined"] = (int(by_cursor.get(u, 0)) if isinstance(by_cursor, Mapping)
                                                   else None)
    classes: dict[str, int] | None = None
    if isinstance(by_reason, Mapping):
        classes = dict.fromkeys(QUARANTINE_CLASSES, 0)
        for reason, n in by_reason.items():
            c = ("held" if reason.startswith("held:") else "too_large" if reason == "too_large"
                 else "refused" if reason.startswith("refused") else "other")
            classes[c] += int(n)
    for c in QUARANTINE_CLASSES:
        out[f"{PREFIX}/Buffer/Quarantined/{c}"] = classes[c] if classes is not None else None
    out[f"{PREFIX}/System/CPU Temperature"] = system.get("cpu_temp_c")
    out[f"{PREFIX}/System/Disk Free"] = system.get("disk_free_bytes")
    return out


def _fits(defn: NodeMetric, value: Any) -> Any:
    """The value as its datatype takes it, or None (null) when it does not fit."""
    if value is None:
        return None
    dt = defn.datatype
    if dt is DataType.Boolean:
        return value if isinstance(value, bool) else None
    if dt is DataType.String:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if dt in (DataType.Float, DataType.Double):
        return float(value) if math.isfinite(value) else None
    v = int(value)
    return v if 0 <= v < 1 << 64 else None


class NodeMetricsReporter:
    """Decides what goes in NBIRTH and which metrics an NDATA carries (report by exception)."""

    def __init__(self, defs: Iterable[NodeMetric]) -> None:
        self.defs = list(defs)
        self._last: dict[str, Any] = {}

    def birth(self, values: Mapping[str, Any]) -> list[tuple[NodeMetric, Any]]:
        """Every metric with its current value (null when unknown); the new reference for changes."""
        out = []
        for d in self.defs:
            v = _fits(d, values.get(d.name))
            self._last[d.name] = v
            out.append((d, v))
        return out

    def changes(self, values: Mapping[str, Any]) -> list[tuple[NodeMetric, Any]]:
        """The metrics that changed beyond their deadband since last sent; marks them sent."""
        out = []
        for d in self.defs:
            if d.name not in values:
                continue
            new, old = _fits(d, values[d.name]), self._last.get(d.name)
            if new == old:
                continue
            if (new is not None and old is not None and isinstance(new, int | float)
                    and not isinstance(new, bool) and abs(new - old) <= d.deadband):
                continue
            self._last[d.name] = new
            out.append((d, new))
        return out


def add_node_metrics(p: Any, metrics: Iterable[tuple[NodeMetric, Any]], ts_ms: int, *, birth: bool) -> None:
    """Append node metrics to a protobuf Payload: datatype (and engUnit) in births only."""
    for d, value in metrics:
        m = p.metrics.add()
        m.name = d.name
        m.timestamp = ts_ms
        if birth:
            m.datatype = int(d.datatype)
            if d.unit:
                m.properties.keys.append("engUnit")
                pv = m.properties.values.add()
                pv.type = int(DataType.String)
                pv.string_value = d.unit
        set_metric_value(m, d.datatype, value, f"node metric {d.name!r}")


def build_ndata(metrics: Sequence[tuple[NodeMetric, Any]], ts_ms: int, seq: int,
                clock_marker: bool | None = None) -> bytes:
    """NDATA with the changed node metrics (names, no aliases: node metrics are never aliased),
    and the clock marker last with `clock_marker` as its value unless None (the README's rule:
    true when `ts_ms` was read from an untrusted clock)."""
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    add_node_metrics(p, metrics, ts_ms, birth=False)
    if clock_marker is not None:
        m = p.metrics.add()
        m.name = CLOCK_MARKER
        m.timestamp = ts_ms
        m.boolean_value = clock_marker
    return p.SerializeToString()
