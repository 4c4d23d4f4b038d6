"""What the status page's pieces cost: the history ring's memory, one /status.json, one scrape.

    python -m tests.benchmarks.status_page --json [--cursors 2] [--devices 50] [--repeat 200]

The ring is filled to its capacity (6 h at 5 s per cursor) with changing depths; memory is
measured with tracemalloc around the filling. Times are the median of `--repeat` runs of
`StatusHistory.as_dict()` (the `history` section every renderer gets), `json.dumps` of a
whole status document with it (what /status.json sends), and `GatewayMetrics.render()`
(one /metrics scrape, process series included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tracemalloc
from typing import Any

from gateway.diagnostics.history import StatusHistory
from gateway.diagnostics.metrics import GatewayMetrics


def document(cursors: int, devices: int, depth: int, up: bool, since: int) -> dict[str, Any]:
    names = ["mqtt", "kafka", "c2", "c3", "c4", "c5"][:cursors]
    return {
        "version": "bench", "gateway": "g/e", "clock": {"synced": True},
        "links": {n: {"up": up, "link": "up" if up else "down", "since_ms": since, "last_error": "",
                      "counters": {"delivered": depth, "refused": 0, "reconnects": 1}} for n in names},
        "buffer": {"cursors": {n: {"records": depth, "bytes": depth * 40} for n in names},
                   "dropped": {"age": 0, "size": 0}, "quarantine": {"by_reason": {}, "total_by_reason": {}},
                   "file_bytes": 10_000_000, "wal_bytes": 4_000_000},
        "devices": {f"dev{i}": {"online": True, "samples": 1000 + i, "errors": 0, "last_good_ts_ms": since,
                                "quality": {"good": 1000}, "last_error": ""} for i in range(devices)},
    }


def median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cursors", type=int, default=2)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)

    t0 = 1_795_000_000_000
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    history = StatusHistory(lambda: {})
    capacity = history.depth.maxlen or 0
    for i in range(capacity):
        up = (i // 500) % 2 == 0
        history.record(document(args.cursors, 0, (i * 37) % 250_000, up, t0 + (i // 500) * 2_500_000),
                       now_ms=t0 + i * 5000)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    ring_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))

    doc = document(args.cursors, args.devices, 1234, True, t0)
    section = history.as_dict()
    full = {**doc, "history": section}
    metrics = GatewayMetrics()
    out = {
        "benchmark": "status_page",
        "cursors": args.cursors,
        "devices": args.devices,
        "ring_samples": capacity,
        "ring_bytes": ring_bytes,
        "link_changes_kept": sum(len(r) for r in history.links.values()),
        "events_kept": len(history.events),
        "history_points_sent": len(section["depth"]["t_ms"]),
        "status_json_bytes": len(json.dumps(full, separators=(",", ":"))),
        "history_as_dict_ms": median_ms(history.as_dict, args.repeat),
        "status_json_dumps_ms": median_ms(lambda: json.dumps(full, separators=(",", ":")), args.repeat),
        "metrics_render_ms": median_ms(lambda: metrics.render(doc), args.repeat),
        "metrics_bytes": len(metrics.render(doc)),
        "record_one_sample_ms": median_ms(lambda: history.record(doc), args.repeat),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
