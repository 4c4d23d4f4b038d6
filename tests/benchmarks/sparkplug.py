"""Sparkplug B codec benchmark: a DDATA of 50 float metrics, encode/decode metrics/s and bytes.

Run: python -m tests.benchmarks.sparkplug --json

- encode_payload: our generic encoder, Python Metric objects (alias, timestamp, Float) -> bytes.
- gateway_path: what the gateway does per record: report-by-exception builds the stored
  record (names, datatypes), then stamp_data turns it into the published DDATA (aliases, seq).
- decode_payload: bytes -> Metric objects, datatypes looked up by alias as a host does.
- bytes per metric on the wire for the same DDATA with aliases and with names, and with
  aliases from a clock that is not synchronised (`_unsynced`: the clock flag's cost), and
  the gateway path's rate for such records.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from drivers.base import PointInfo, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import AliasTable, NodeIdentity, stamp_data
from gateway.sparkplug.payload import DataType, Metric, Payload, decode_payload, encode_payload

N_METRICS = 50
TS = 1_700_000_000_000


def _points() -> list[PointInfo]:
    return [PointInfo(f"Inputs/voltage_l{i:02d}", "float32", unit="V") for i in range(N_METRICS)]


def _rate(fn, min_s: float) -> tuple[float, int]:
    """Calls per second of fn(), measured for at least min_s."""
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(50):
            fn()
        n += 50
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return n / elapsed, n


def run(min_s: float) -> dict[str, object]:
    points = _points()
    node = NodeIdentity("plant-7", "pump-station-3")
    devices = {"meter1": points}
    aliases = AliasTable(devices)
    metrics = [Metric(alias=aliases.alias("meter1", p.name), timestamp=TS + i,
                      value=230.0 + i / 10, datatype=DataType.Float) for i, p in enumerate(points)]
    payload = Payload(metrics=metrics, timestamp=TS, seq=17)

    enc_rate, _ = _rate(lambda: encode_payload(payload), min_s)

    rbe = ReportByException(node, devices)
    counter = [0]

    def gateway_path(unsynced: bool = False) -> bytes:
        counter[0] += 1
        base = counter[0] * 1000.0   # every value changes, so every sample is reported
        for i, p in enumerate(points):
            rbe.offer(Sample("meter1", p.name, base + i, TS + i))
        stored = rbe.drain()[0].payload
        return stamp_data(stored, seq=counter[0] % 256, ts_ms=TS, device="meter1",
                          aliases=aliases, historical=False, clock_unsynced=unsynced)

    path_rate, _ = _rate(gateway_path, min_s)
    path_unsynced_rate, _ = _rate(lambda: gateway_path(True), min_s)

    def stored_ddata() -> bytes:
        fresh = ReportByException(node, devices)
        for i, p in enumerate(points):
            fresh.offer(Sample("meter1", p.name, 230.0 + i, TS + i))
        return fresh.drain()[0].payload

    wire_aliased = stamp_data(stored_ddata(), seq=17, ts_ms=TS, device="meter1",
                              aliases=aliases, historical=False)
    wire_named = stamp_data(stored_ddata(), seq=17, ts_ms=TS, device="meter1", aliases=None,
                            historical=False)
    wire_unsynced = stamp_data(stored_ddata(), seq=17, ts_ms=TS, device="meter1",
                               aliases=aliases, historical=False, clock_unsynced=True)
    types = {aliases.alias("meter1", p.name): DataType.Float for p in points}

    def decode() -> Payload:
        return decode_payload(wire_aliased, lambda name, alias: types.get(alias))

    assert len(decode().metrics) == N_METRICS
    dec_rate, _ = _rate(decode, min_s)
    return {
        "benchmark": "sparkplug",
        "ddata_metrics": N_METRICS,
        "python": platform.python_version(),
        "encode_payload_metrics_per_s": round(enc_rate * N_METRICS),
        "gateway_path_metrics_per_s": round(path_rate * N_METRICS),
        "gateway_path_unsynced_metrics_per_s": round(path_unsynced_rate * N_METRICS),
        "decode_payload_metrics_per_s": round(dec_rate * N_METRICS),
        "wire_bytes_with_aliases": len(wire_aliased),
        "wire_bytes_without_aliases": len(wire_named),
        "bytes_per_metric_with_aliases": round(len(wire_aliased) / N_METRICS, 2),
        "bytes_per_metric_without_aliases": round(len(wire_named) / N_METRICS, 2),
        "wire_bytes_with_aliases_unsynced": len(wire_unsynced),
        "bytes_per_metric_with_aliases_unsynced": round(len(wire_unsynced) / N_METRICS, 2),
        "metric_name_example": points[0].name,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum time per measurement")
    args = parser.parse_args(argv)
    result = run(args.seconds)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
