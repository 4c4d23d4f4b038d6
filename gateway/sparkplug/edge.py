"""Report by exception, the alias table and the BIRTH/DEATH builders of the edge node.

Pure: no I/O and no clock of its own (every time comes in as an argument or a sample).

- `ReportByException` turns drivers' `Sample`s into buffered records in the shared record
  format (DESIGN contract 3): per point deadband, maximum report interval, quality changes
  always reported, one record per device per drain with all its changed metrics.
- `AliasTable` numbers every device point across the whole node, in config order, so that
  aliases are unique on the node and stable for a given config.
- `build_*` make NBIRTH/NDEATH/DBIRTH/DDEATH payloads; `stamp_data` turns a stored record
  into the bytes published on MQTT (seq, aliases and is_historical are only known then).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from buffer import NewRecord  # the buffer package owns the record type (DESIGN contract 2)
from drivers.base import Quality, Sample
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.payload import (
    QUALITY_CODES,
    QUALITY_PROPERTY,
    DataType,
    driver_datatype,
    set_metric_value,
)
from gateway.sparkplug.topics import MessageType, device_topic, node_topic

log = logging.getLogger(__name__)

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
NEXT_SERVER = "Node Control/Next Server"
SOFTWARE = "Properties/Software"


class PointLike(Protocol):
    """drivers.base.PointInfo, by the attributes this module reads."""

    name: str
    datatype: str
    unit: str
    writable: bool
    min: float | None
    max: float | None
    deadband: float | None
    max_report_interval: float | None


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    group_id: str
    edge_node_id: str

    @property
    def gateway_id(self) -> str:
        return f"{self.group_id}/{self.edge_node_id}"

    def stream(self, device: str | None) -> str:
        return self.gateway_id if device is None else f"{self.gateway_id}/{device}"

    def topic(self, message_type: MessageType, device: str | None = None) -> str:
        if device is None:
            return node_topic(self.group_id, message_type, self.edge_node_id)
        return device_topic(self.group_id, message_type, self.edge_node_id, device)

    def device_of_stream(self, stream: str) -> str | None:
        """The device id of a record's stream, None for node-level data."""
        if stream == self.gateway_id:
            return None
        prefix = self.gateway_id + "/"
        if not stream.startswith(prefix):
            raise PayloadError(f"stream {stream!r} does not belong to edge node {self.gateway_id}")
        return stream[len(prefix):]


class AliasTable:
    """Aliases for every device point, unique across the node, in config order from 1.

    Node control metrics (bdSeq, Node Control/*) are never aliased: hosts look them up by
    name, and an NDEATH set as the Will before any birth must be readable without aliases.
    """

    def __init__(self, devices: Mapping[str, Sequence[PointLike]]) -> None:
        self._by_key: dict[tuple[str, str], int] = {}
        self._by_alias: dict[int, tuple[str, str]] = {}
        alias = 1
        for device, points in devices.items():
            for p in points:
                self._by_key[(device, p.name)] = alias
                self._by_alias[alias] = (device, p.name)
                alias += 1

    def alias(self, device: str, point: str) -> int | None:
        return self._by_key.get((device, point))

    def point(self, alias: int) -> tuple[str, str] | None:
        return self._by_alias.get(alias)

    def __len__(self) -> int:
        return len(self._by_key)


# ----------------------------------------------------------------------------------------
# Report by exception


@dataclass(slots=True)
class _PointState:
    info: PointLike
    datatype: DataType
    last_value: Any = None
    last_quality: Quality | None = None
    last_report_ms: int | None = None
    latest: Sample | None = None  # the newest sample, reported or not (for DBIRTH)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class ReportByException:
    """Decides which samples are reported and batches them per device into records."""

    def __init__(self, node: NodeIdentity, devices: Mapping[str, Sequence[PointLike]]) -> None:
        self.node = node
        self._points: dict[str, dict[str, _PointState]] = {
            device: {p.name: _PointState(p, driver_datatype(p.datatype)) for p in points}
            for device, points in devices.items()
        }
        self._pending: dict[str, list[Sample]] = {}
        self._unknown_logged: set[tuple[str, str]] = set()
        self.suppressed = 0   # samples within deadband and interval: counted, not sent

    def offer(self, sample: Sample) -> bool:
        """Take one sample; True when it will be reported in the next drain()."""
        state = self._points.get(sample.device, {}).get(sample.point)
        if state is None:
            key = (sample.device, sample.point)
            if key not in self._unknown_logged:  # log a state, not every poll
                self._unknown_logged.add(key)
                log.warning("sample for unknown point %s/%s ignored", *key)
            return False
        state.latest = sample
        if not self._should_report(state, sample):
            self.suppressed += 1
            return False
        state.last_value = sample.value
        state.last_quality = sample.quality
        state.last_report_ms = sample.ts_ms
        self._pending.setdefault(sample.device, []).append(sample)
        return True

    def _should_report(self, state: _PointState, s: Sample) -> bool:
        if state.last_report_ms is None or s.quality != state.last_quality:
            return True
        interval = state.info.max_report_interval
        if interval is not None and s.ts_ms - state.last_report_ms >= interval * 1000:
            return True
        old, new = state.last_value, s.value
        if old is None or new is None:
            return (old is None) != (new is None)
        if _is_number(old) and _is_number(new):
            if isinstance(new, float) and math.isnan(new):
                return not (isinstance(old, float) and math.isnan(old))
            if isinstance(old, float) and math.isnan(old):
                return True  # leaving NaN: abs(new - nan) compares False with any deadband
            deadband = state.info.deadband or 0.0
            return abs(new - old) > deadband if deadband > 0 else new != old
        return new != old

    def drain(self) -> list[NewRecord]:
        """One record per device with reported samples, devices in first-reported order."""
        records = []
        for device, samples in self._pending.items():
            records.append(self._record(device, samples))
        self._pending = {}
        return records

    def _record(self, device: str, samples: list[Sample]) -> NewRecord:
        p = pb.Payload()
        ts = max(s.ts_ms for s in samples)
        p.timestamp = ts
        points = self._points[device]
        for s in samples:
            state = points[s.point]
            fill_metric(p.metrics.add(), s.point, state.datatype, s.value, s.ts_ms, s.quality)
        return NewRecord(
            stream=self.node.stream(device),
            payload=p.SerializeToString(),
            ts_ms=ts,
            headers={
                "topic": self.node.topic(MessageType.DDATA, device),
                "type": str(MessageType.DDATA),
                "gateway": self.node.gateway_id,
            },
        )

    def snapshot(self, device: str) -> dict[str, Sample]:
        """The newest sample of every point of a device that has one (DBIRTH values)."""
        return {
            name: st.latest for name, st in self._points.get(device, {}).items()
            if st.latest is not None
        }

    def forget(self, device: str) -> None:
        """After a DDEATH: the next sample of every point is reported again."""
        for st in self._points.get(device, {}).values():
            st.last_report_ms = None
            st.last_quality = None


def fill_metric(m: Any, name: str, datatype: DataType, value: Any, ts_ms: int,
                quality: Quality = Quality.GOOD) -> None:
    """Fill a protobuf metric; a value that does not fit its type becomes a BAD null."""
    m.name = name
    m.datatype = int(datatype)
    m.timestamp = ts_ms
    try:
        set_metric_value(m, datatype, value, f"point {name!r}")
    except PayloadError as exc:
        log.warning("%s: reported as bad quality", exc)
        m.ClearField("value")
        m.is_null = True
        quality = Quality.BAD
    if quality is not Quality.GOOD:
        m.properties.keys.append(QUALITY_PROPERTY)
        pv = m.properties.values.add()
        pv.type = int(DataType.Int32)
        pv.int_value = QUALITY_CODES[quality]


# ----------------------------------------------------------------------------------------
# Births and deaths


def _node_control(p: Any, name: str, datatype: DataType, value: Any, ts_ms: int | None) -> None:
    m = p.metrics.add()
    m.name = name
    m.datatype = int(datatype)
    if ts_ms is not None:
        m.timestamp = ts_ms
    set_metric_value(m, datatype, value, name)


def build_nbirth(bdseq: int, ts_ms: int, *, seq: int = 0, software: str = "outpost") -> bytes:
    """NBIRTH: seq set explicitly (0), bdSeq Int64, Node Control/Rebirth false (no alias)."""
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    _node_control(p, BDSEQ, DataType.Int64, bdseq, ts_ms)
    _node_control(p, REBIRTH, DataType.Boolean, False, ts_ms)
    _node_control(p, NEXT_SERVER, DataType.Boolean, False, ts_ms)
    _node_control(p, SOFTWARE, DataType.String, software, ts_ms)
    return p.SerializeToString()


def build_ndeath(bdseq: int) -> bytes:
    """NDEATH (the MQTT Will): only bdSeq, matching the NBIRTH of the same connection."""
    p = pb.Payload()
    _node_control(p, BDSEQ, DataType.Int64, bdseq, None)
    return p.SerializeToString()


def _add_property(m: Any, key: str, datatype: DataType, value: Any) -> None:
    m.properties.keys.append(key)
    pv = m.properties.values.add()
    pv.type = int(datatype)
    set_metric_value(pv, datatype, value, f"property {key!r}")


def build_dbirth(device: str, points: Sequence[PointLike], snapshot: Mapping[str, Sample],
                 aliases: AliasTable | None, ts_ms: int, seq: int) -> bytes:
    """DBIRTH with every point: name, alias, datatype, current value and its properties.

    Properties follow what Ignition and other hosts read: engUnit, engLow/engHigh from
    min/max, readOnly from writable, and Quality when the current value is not good. A
    point never read yet is sent as null with Quality stale.
    """
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    for info in points:
        dt = driver_datatype(info.datatype)
        m = p.metrics.add()
        s = snapshot.get(info.name)
        if s is None:
            fill_metric(m, info.name, dt, None, ts_ms, Quality.STALE)
        else:
            fill_metric(m, info.name, dt, s.value, s.ts_ms, s.quality)
        if aliases is not None:
            alias = aliases.alias(device, info.name)
            if alias is not None:
                m.alias = alias
        if info.unit:
            _add_property(m, "engUnit", DataType.String, info.unit)
        if info.min is not None:
            _add_property(m, "engLow", DataType.Double, float(info.min))
        if info.max is not None:
            _add_property(m, "engHigh", DataType.Double, float(info.max))
        _add_property(m, "readOnly", DataType.Boolean, not info.writable)
    return p.SerializeToString()


def build_ddeath(ts_ms: int, seq: int) -> bytes:
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    return p.SerializeToString()


def stamp_data(stored: bytes, *, seq: int, ts_ms: int, device: str | None,
               aliases: AliasTable | None, historical: bool,
               correction_ms: int = 0, clock_unsynced: bool = False) -> bytes:
    """Turn a stored DDATA/NDATA record into the published bytes.

    Sets seq and the publish timestamp; with aliases, replaces each metric's name by its
    alias; drops datatypes (the spec says DATA messages should not repeat them); marks
    every metric is_historical for backlog. Metric timestamps stay the source timestamps,
    shifted by `correction_ms` when they were taken on a clock that has since synchronised;
    `clock_unsynced` adds the Boolean property `clock_unsynced` to every metric when they
    cannot be corrected (see the clock policy in the README).
    """
    p = pb.Payload()
    try:
        p.ParseFromString(stored)
    except Exception as exc:
        raise PayloadError(f"stored record for {device!r} is not a Sparkplug payload: {exc}") from None
    p.seq = seq
    p.timestamp = ts_ms
    for m in p.metrics:
        if aliases is not None and device is not None:
            alias = aliases.alias(device, m.name)
            if alias is not None:
                m.alias = alias
                m.ClearField("name")
        m.ClearField("datatype")
        if historical:
            m.is_historical = True
        if correction_ms and m.HasField("timestamp"):
            m.timestamp = m.timestamp + correction_ms
        if clock_unsynced:
            _add_property(m, "clock_unsynced", DataType.Boolean, True)
    return p.SerializeToString()


def datatypes_of(points: Iterable[PointLike]) -> dict[str, DataType]:
    return {p.name: driver_datatype(p.datatype) for p in points}
