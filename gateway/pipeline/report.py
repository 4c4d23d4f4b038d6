"""Report by exception: the pipeline's one transformation of samples into records.

`ReportByException` turns drivers' `Sample`s into buffered records in the shared record
format (gateway.records): per point deadband, maximum report interval, quality changes
always reported, one record per device per drain with all its changed metrics, encoded as
a Sparkplug B DDATA payload without seq or aliases (those are only known at publish time).
Pure: no I/O and no clock of its own.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from buffer import NewRecord  # the buffer package owns the record type (DESIGN contract 2)
from common.logs import StateLog
from drivers.base import Quality, Sample
from gateway.records import H_GATEWAY, H_TOPIC, H_TYPE, TYPE_DDATA
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import NodeIdentity, PointLike, fill_metric
from gateway.sparkplug.payload import DataType, driver_datatype
from gateway.sparkplug.topics import MessageType

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _PointState:
    info: PointLike
    datatype: DataType
    last_value: Any = None
    last_quality: Quality | None = None
    last_report_ms: int | None = None
    latest: Sample | None = None  # the newest sample, reported or not (for DBIRTH)
    # From `info`, read once: offer() runs for every sample.
    deadband: float = 0.0
    interval_ms: float | None = None
    # (oneof field, lowest, highest) when a GOOD sample's value goes straight into the
    # metric (ints and floats of the types below); None: always through fill_metric.
    direct: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self.deadband = self.info.deadband or 0.0
        interval = self.info.max_report_interval
        self.interval_ms = None if interval is None else interval * 1000
        self.direct = _DIRECT.get(self.datatype)


# The value placement of gateway.sparkplug.payload for the integer and float types, so that
# _record sets a GOOD in-range value in one call; anything else (a value out of range, a
# float for an integer type, bad quality) goes through fill_metric, which logs and marks it.
_INT, _LONG, _FLOAT, _DOUBLE = range(4)  # int_value, long_value, float_value, double_value
_DIRECT: dict[DataType, tuple[int, int, int]] = {
    DataType.Int8: (_INT, -(1 << 7), (1 << 7) - 1),
    DataType.Int16: (_INT, -(1 << 15), (1 << 15) - 1),
    DataType.Int32: (_INT, -(1 << 31), (1 << 31) - 1),
    DataType.UInt8: (_INT, 0, (1 << 8) - 1),
    DataType.UInt16: (_INT, 0, (1 << 16) - 1),
    DataType.Int64: (_LONG, -(1 << 63), (1 << 63) - 1),
    DataType.UInt32: (_LONG, 0, (1 << 32) - 1),
    DataType.UInt64: (_LONG, 0, (1 << 64) - 1),
    DataType.Float: (_FLOAT, 0, 0),
    DataType.Double: (_DOUBLE, 0, 0),
}
_GOOD = Quality.GOOD
_TS_MS = operator.attrgetter("ts_ms")


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
        self._unknown = StateLog(log)
        self._base_headers: dict[str, dict[str, str]] = {}
        self.suppressed = 0   # samples within deadband and interval: counted, not sent

    def offer(self, sample: Sample) -> bool:
        """Take one sample; True when it will be reported in the next drain()."""
        points = self._points.get(sample.device)
        state = points.get(sample.point) if points is not None else None
        if state is None:
            self._unknown.once(f"{sample.device}/{sample.point}", "sample for unknown point ignored",
                               device=sample.device, point=sample.point)
            return False
        state.latest = sample
        if not self._should_report(state, sample):
            self.suppressed += 1
            return False
        state.last_value = sample.value
        state.last_quality = sample.quality
        state.last_report_ms = sample.ts_ms
        pending = self._pending.get(sample.device)
        if pending is None:
            self._pending[sample.device] = [sample]
        else:
            pending.append(sample)
        return True

    @staticmethod
    def _should_report(state: _PointState, s: Sample) -> bool:
        if state.last_report_ms is None or s.quality != state.last_quality:
            return True
        if state.interval_ms is not None and s.ts_ms - state.last_report_ms >= state.interval_ms:
            return True
        old, new = state.last_value, s.value
        if type(new) is int and type(old) is int:  # most registers: no NaN, no bool
            deadband = state.deadband
            return abs(new - old) > deadband if deadband > 0 else new != old
        if old is None or new is None:
            return (old is None) != (new is None)
        if _is_number(old) and _is_number(new):
            if isinstance(new, float) and math.isnan(new):
                return not (isinstance(old, float) and math.isnan(old))
            if isinstance(old, float) and math.isnan(old):
                return True  # leaving NaN: abs(new - nan) compares False with any deadband
            deadband = state.deadband
            return abs(new - old) > deadband if deadband > 0 else new != old
        return new != old

    def drain(self, extra_headers: Mapping[str, str] | None = None) -> list[NewRecord]:
        """One record per device with reported samples, devices in first-reported order.

        `extra_headers` (the clock headers of an unsynchronised clock) go on every record,
        so records are built once, with everything the uplinks need at publish time.
        """
        out = [self._record(device, samples, extra_headers) for device, samples in self._pending.items()]
        self._pending = {}
        return out

    def _headers(self, device: str) -> dict[str, str]:
        h = self._base_headers.get(device)
        if h is None:
            h = self._base_headers[device] = {
                H_TOPIC: self.node.topic(MessageType.DDATA, device),
                H_TYPE: TYPE_DDATA,
                H_GATEWAY: self.node.gateway_id,
            }
        return h

    def _record(self, device: str, samples: list[Sample],
                extra_headers: Mapping[str, str] | None = None) -> NewRecord:
        p = pb.Payload()
        ts = max(map(_TS_MS, samples))
        p.timestamp = ts
        points = self._points[device]
        add = p.metrics.add
        for s in samples:
            state = points[s.point]
            direct, value = state.direct, s.value
            if direct is not None and s.quality is _GOOD:
                kind, lo, hi = direct
                t = type(value)
                if kind == _INT:
                    if t is int and lo <= value <= hi:
                        add(name=s.point, datatype=state.datatype, timestamp=s.ts_ms, int_value=value & 0xFFFFFFFF)
                        continue
                elif kind == _LONG:
                    if t is int and lo <= value <= hi:
                        add(name=s.point, datatype=state.datatype, timestamp=s.ts_ms,
                            long_value=value & 0xFFFFFFFFFFFFFFFF)
                        continue
                elif t is float or t is int:
                    if kind == _FLOAT:
                        add(name=s.point, datatype=state.datatype, timestamp=s.ts_ms, float_value=float(value))
                    else:
                        add(name=s.point, datatype=state.datatype, timestamp=s.ts_ms, double_value=float(value))
                    continue
            fill_metric(add(), s.point, state.datatype, value, s.ts_ms, s.quality)
        return NewRecord(
            stream=self.node.stream(device),
            payload=p.SerializeToString(),
            ts_ms=ts,
            # One shared dict per device while the clock is trusted: the buffer only reads it.
            headers=self._headers(device) if not extra_headers else {**self._headers(device), **extra_headers},
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
