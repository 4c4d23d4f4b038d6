"""Report by exception's record encoding: the direct placement equals fill_metric's, byte for byte."""

from __future__ import annotations

import math

import pytest

from drivers.base import PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import NodeIdentity, fill_metric
from gateway.sparkplug.payload import driver_datatype

EDGES = {
    "int8": [-128, 127, -129, 128, 0, 3.0, True],
    "int16": [-32768, 32767, -32769, 32768, -1],
    "int32": [-(2**31), 2**31 - 1, 2**31, -1],
    "uint8": [0, 255, 256, -1],
    "uint16": [0, 65535, 65536, -1],
    "int64": [-(2**63), 2**63 - 1, 2**63, -5],
    "uint32": [0, 2**32 - 1, 2**32, -1],
    "uint64": [0, 2**64 - 1, 2**64, -1, 7.0],
    "float32": [0.1, 3, float("nan"), float("inf"), -2.5e38, True, "x"],
    "float64": [0.1, -7, float("-inf"), 1e308, False],
    "bool": [True, False, 1],
    "string": ["é", "", 5],
}


def _reference(samples: list[Sample], types: dict[str, str]) -> bytes:
    p = pb.Payload()
    p.timestamp = max(s.ts_ms for s in samples)
    for s in samples:
        fill_metric(p.metrics.add(), s.point, driver_datatype(types[s.point]), s.value, s.ts_ms, s.quality)
    return p.SerializeToString()


@pytest.mark.parametrize("dtype", sorted(EDGES))
def test_record_bytes_equal_fill_metric_for_every_type_and_edge(dtype: str, caplog) -> None:
    values = EDGES[dtype]
    names = [f"p{i}" for i in range(len(values))]
    rbe = ReportByException(NodeIdentity("g", "e"), {"d": [PointInfo(n, dtype) for n in names]})
    samples = [Sample("d", n, v, 1_700_000_000_000 + i, Quality.GOOD, "", dtype)
               for i, (n, v) in enumerate(zip(names, values, strict=True))]
    samples.append(Sample("d", names[0], None, 1_700_000_000_100, Quality.BAD, "timeout", dtype))
    for s in samples:
        assert rbe.offer(s)
    (record,) = rbe.drain()
    assert record.payload == _reference(samples, dict.fromkeys(names, dtype))
    decoded = pb.Payload()
    decoded.ParseFromString(record.payload)
    assert len(decoded.metrics) == len(samples)
    assert decoded.metrics[-1].is_null and list(decoded.metrics[-1].properties.keys) == ["Quality"]


def test_int_registers_keep_deadband_and_bool_is_not_a_number() -> None:
    rbe = ReportByException(NodeIdentity("g", "e"), {"d": [PointInfo("n", "int32", deadband=2),
                                                           PointInfo("m", "int32")]})
    assert rbe.offer(Sample("d", "n", 10, 1))
    assert not rbe.offer(Sample("d", "n", 12, 2))   # within the deadband: |12 - 10| = 2
    assert rbe.offer(Sample("d", "n", 13, 3))
    assert not rbe.offer(Sample("d", "n", 11, 4))
    assert rbe.offer(Sample("d", "m", 1, 5))
    assert not rbe.offer(Sample("d", "m", 1, 6))
    assert not rbe.offer(Sample("d", "m", True, 7))  # compared, not deadbanded: True == 1
    assert rbe.offer(Sample("d", "m", 2, 8))
    assert rbe.offer(Sample("d", "m", math.nan, 9)) and rbe.offer(Sample("d", "m", 2, 10))


def test_max_report_interval_reports_an_unchanged_value() -> None:
    rbe = ReportByException(NodeIdentity("g", "e"), {"d": [PointInfo("n", "int32", max_report_interval=1.5)]})
    assert rbe.offer(Sample("d", "n", 1, 1000))
    assert not rbe.offer(Sample("d", "n", 1, 2499))
    assert rbe.offer(Sample("d", "n", 1, 2500))
