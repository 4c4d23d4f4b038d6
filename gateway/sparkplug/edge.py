"""The edge node's identity, the alias table and the BIRTH/DEATH/DATA builders.

Pure: no I/O and no clock of its own (every time comes in as an argument or a sample).

- `AliasTable` numbers every device point across the whole node, in config order, so that
  aliases are unique on the node and stable for a given config.
- `build_*` make NBIRTH/NDEATH/DBIRTH/DDEATH payloads; `stamp_data` turns a stored record
  into the bytes published on MQTT (seq, aliases and is_historical are only known then).
- The clock marker `Outpost/Clock/Unsynced` (Boolean): declared in the NBIRTH and in every
  DBIRTH, carried as one extra metric by a DATA payload whose timestamps were taken on an
  unsynchronised clock (true), and once more (false) in the first live payload of that
  device after the clock is trusted again. It covers every metric of its payload; flagged
  and trusted readings are never in one payload (a record is stamped whole). One metric
  per payload costs about 14 bytes where a property on every metric cost 24 per sample.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common.logs import fields
from drivers.base import Quality, Sample
from gateway import records
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.node_metrics import CLOCK_MARKER, NodeMetric, add_node_metrics
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
        return records.gateway_id(self.group_id, self.edge_node_id)

    def stream(self, device: str | None) -> str:
        return records.stream_name(self.gateway_id, device)

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


def check_point_names(devices: Mapping[str, Sequence[PointLike]]) -> None:
    """A point may not take the clock marker's name (hosts could not tell them apart)."""
    for device, points in devices.items():
        if any(p.name == CLOCK_MARKER for p in points):
            raise PayloadError(f"device {device!r}: point name {CLOCK_MARKER!r} is reserved for "
                               "the clock marker metric (see the README's clock rule)")


class AliasTable:
    """Aliases for every device point, unique across the node, in config order from 1,
    then one per device for its clock marker metric (CLOCK_MARKER), in the same order.

    Node control metrics (bdSeq, Node Control/*) are never aliased: hosts look them up by
    name, and an NDEATH set as the Will before any birth must be readable without aliases.
    """

    def __init__(self, devices: Mapping[str, Sequence[PointLike]]) -> None:
        check_point_names(devices)
        self._by_key: dict[tuple[str, str], int] = {}
        self._by_alias: dict[int, tuple[str, str]] = {}
        self._markers: dict[str, int] = {}
        self._by_device: dict[str, dict[str, int]] = {}
        alias = 1
        for device, points in devices.items():
            names = self._by_device.setdefault(device, {})
            for p in points:
                self._by_key[(device, p.name)] = alias
                self._by_alias[alias] = (device, p.name)
                names[p.name] = alias
                alias += 1
        for device in devices:
            self._markers[device] = alias
            alias += 1

    def alias(self, device: str, point: str) -> int | None:
        return self._by_key.get((device, point))

    def of_device(self, device: str) -> dict[str, int]:
        """Point name -> alias of one device (empty for a device the table does not know)."""
        return self._by_device.get(device, {})

    def marker(self, device: str) -> int | None:
        """The alias of the device's clock marker metric (never a point: DCMD cannot write it)."""
        return self._markers.get(device)

    def point(self, alias: int) -> tuple[str, str] | None:
        return self._by_alias.get(alias)

    def __len__(self) -> int:
        return len(self._by_key)


def fill_metric(m: Any, name: str, datatype: DataType, value: Any, ts_ms: int,
                quality: Quality = Quality.GOOD) -> None:
    """Fill a protobuf metric; a value that does not fit its type becomes a BAD null."""
    m.name = name
    m.datatype = int(datatype)
    m.timestamp = ts_ms
    try:
        set_metric_value(m, datatype, value, f"point {name!r}")
    except PayloadError as exc:
        log.warning("value not encodable: reported as bad quality", extra=fields(point=name, reason=str(exc)))
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


def build_nbirth(bdseq: int, ts_ms: int, *, seq: int = 0, software: str = "outpost",
                 node_metrics: Iterable[tuple[NodeMetric, Any]] = (),
                 clock_unsynced: bool | None = None) -> bytes:
    """NBIRTH: seq set explicitly (0), bdSeq Int64, Node Control/Rebirth false (no alias),
    then every node metric that later NDATA may carry (gateway.sparkplug.node_metrics), and
    the node's clock marker (by name, like every node metric) unless `clock_unsynced` is None;
    its value says whether the clock is untrusted at the birth."""
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    _node_control(p, BDSEQ, DataType.Int64, bdseq, ts_ms)
    _node_control(p, REBIRTH, DataType.Boolean, False, ts_ms)
    _node_control(p, NEXT_SERVER, DataType.Boolean, False, ts_ms)
    _node_control(p, SOFTWARE, DataType.String, software, ts_ms)
    add_node_metrics(p, node_metrics, ts_ms, birth=True)
    if clock_unsynced is not None:
        _node_control(p, CLOCK_MARKER, DataType.Boolean, clock_unsynced, ts_ms)
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
                 aliases: AliasTable | None, ts_ms: int, seq: int,
                 clock_unsynced: bool | None = None) -> bytes:
    """DBIRTH with every point: name, alias, datatype, current value and its properties.

    Properties follow what Ignition and other hosts read: engUnit, engLow/engHigh from
    min/max, readOnly from writable, and Quality when the current value is not good. A
    point never read yet is sent as null with Quality stale. Unless `clock_unsynced` is
    None, the device's clock marker follows the points (name, alias, Boolean, readOnly),
    its value saying whether the clock is untrusted at the birth.
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
    if clock_unsynced is not None:
        m = p.metrics.add()
        m.name = CLOCK_MARKER
        m.datatype = int(DataType.Boolean)
        m.timestamp = ts_ms
        m.boolean_value = clock_unsynced
        marker = aliases.marker(device) if aliases is not None else None
        if marker is not None:
            m.alias = marker
        _add_property(m, "readOnly", DataType.Boolean, True)
    return p.SerializeToString()


def build_ddeath(ts_ms: int, seq: int) -> bytes:
    p = pb.Payload()
    p.timestamp = ts_ms
    p.seq = seq
    return p.SerializeToString()


def stamp_data(stored: bytes, *, seq: int, ts_ms: int, device: str | None,
               aliases: AliasTable | None, historical: bool,
               correction_ms: int = 0, clock_unsynced: bool = False,
               clock_resynced: bool = False) -> bytes:
    """Turn a stored DDATA/NDATA record into the published bytes.

    Sets seq and the publish timestamp; with aliases, replaces each metric's name by its
    alias; drops datatypes (the spec says DATA messages should not repeat them); marks
    every metric is_historical for backlog. Metric timestamps stay the source timestamps,
    shifted by `correction_ms` when they were taken on a clock that has since synchronised.
    `clock_unsynced` (they cannot be corrected) appends the clock marker metric with value
    true, which flags every metric of the payload; `clock_resynced` appends it with value
    false (the device's last live payload was flagged, this one is not). The marker goes
    last, with the newest metric timestamp of the payload (chronological order is kept),
    by alias when the device has one, else by name (see the clock policy in the README).
    """
    if clock_unsynced and clock_resynced:
        raise ValueError("stamp_data: clock_unsynced and clock_resynced exclude each other")
    p = pb.Payload()
    try:
        p.ParseFromString(stored)
    except Exception as exc:
        raise PayloadError(f"stored record for {device!r} is not a Sparkplug payload: {exc}") from None
    p.seq = seq
    p.timestamp = ts_ms
    by_name = aliases.of_device(device) if aliases is not None and device is not None else None
    for m in p.metrics:
        if by_name is not None:
            alias = by_name.get(m.name)
            if alias is not None:
                m.alias = alias
                m.ClearField("name")
        m.ClearField("datatype")
        if historical:
            m.is_historical = True
        if correction_ms and m.HasField("timestamp"):
            m.timestamp = m.timestamp + correction_ms
    if clock_unsynced or clock_resynced:
        newest = max((m.timestamp for m in p.metrics if m.HasField("timestamp")), default=ts_ms)
        m = p.metrics.add()
        marker = aliases.marker(device) if aliases is not None and device is not None else None
        if marker is not None:
            m.alias = marker
        else:
            m.name = CLOCK_MARKER
        m.timestamp = newest
        if historical:
            m.is_historical = True
        m.boolean_value = clock_unsynced
    return p.SerializeToString()


def clock_flags(data: bytes, marker_alias: int | None = None) -> list[bool]:
    """The host's side of the clock rule: for each metric of a published DATA payload other
    than the marker, whether its timestamp was taken on an unsynchronised clock.

    A metric is flagged when its payload carries the clock marker (by `marker_alias`, the
    alias its birth declared, or by name) with value true. Raises PayloadError for bytes
    that are not a payload or a marker that is not a Boolean.
    """
    p = pb.Payload()
    try:
        p.ParseFromString(data)
    except Exception as exc:
        raise PayloadError(f"not a Sparkplug B payload ({len(data)} bytes): {exc}") from None
    flagged = False
    count = 0
    for m in p.metrics:
        is_marker = (m.name == CLOCK_MARKER if m.HasField("name")
                     else marker_alias is not None and m.HasField("alias") and m.alias == marker_alias)
        if not is_marker:
            count += 1
        elif m.WhichOneof("value") != "boolean_value":
            raise PayloadError(f"clock marker without a Boolean value: {m.WhichOneof('value')}")
        else:
            flagged = flagged or m.boolean_value
    return [flagged] * count


def correct_timestamps(stored: bytes, *, correction_ms: int, clock_unsynced: bool) -> bytes:
    """A stored DDATA/NDATA record with the clock rule applied, for consumers other than MQTT.

    Shifts the payload and metric timestamps by `correction_ms`, or marks every metric with
    the Boolean property `clock_unsynced` (no seq, no aliases). Not the MQTT clock marker:
    a Kafka consumer never sees a birth that would declare it, so each metric says it here,
    and the record's `outpost-clock` header says it for the whole record.
    """
    p = pb.Payload()
    try:
        p.ParseFromString(stored)
    except Exception as exc:
        raise PayloadError(f"stored record is not a Sparkplug payload: {exc}") from None
    if correction_ms and p.HasField("timestamp"):
        p.timestamp = p.timestamp + correction_ms
    for m in p.metrics:
        if correction_ms and m.HasField("timestamp"):
            m.timestamp = m.timestamp + correction_ms
        if clock_unsynced:
            _add_property(m, "clock_unsynced", DataType.Boolean, True)
    return p.SerializeToString()


def datatypes_of(points: Iterable[PointLike]) -> dict[str, DataType]:
    return {p.name: driver_datatype(p.datatype) for p in points}
