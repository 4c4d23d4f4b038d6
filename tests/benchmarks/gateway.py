"""Whole-pipeline figures: `python -m tests.benchmarks.gateway --json`.

Starts Mosquitto and Kafka through tests/harness, then for each rate (default 1k, 2k, 5k,
10k, 20k samples/s) runs `python -m gateway run` as a subprocess with simulator devices
(10 devices, `counter` points at 1 s, so every sample changes and report-by-exception
passes all of them), both uplinks up (Sparkplug B on Mosquitto, Kafka with one mapping of
spBv1.0/+/DDATA/# in `--format`, zstd), and measures over a window after a warm-up:

- samples/s actually read (the gateway's `samples` counter on its status socket);
- sustained: the drivers kept the rate (>= 95 % of the target) and neither buffer cursor
  grew over the window (median depth of the last three status polls at most
  `--slack` records above that of the first three);
- gateway CPU (user + system, psutil) per 1000 samples and in cores; peak RSS.

It stops at the first rate that is not sustained. Target on the development machine:
10,000 samples/s sustained in under half a core with RSS under 100 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from gateway.diagnostics.client import fetch_status
from tests.harness.common import RunDir
from tests.harness.gateway import GatewayProcess
from tests.harness.stack import Stack

DEVICES = 10


def config(rate: int, work: Path, mqtt: tuple[str, int], kafka_bootstrap: str, topic: str, fmt: str) -> str:
    per_device = max(1, rate // DEVICES)
    lines = [
        "[gateway]",
        'group_id = "bench"',
        'edge_node_id = "gw1"',
        f'data_dir = "{work / "data"}"',
        "",
        "[buffer]",
        "max_size_bytes = 2_000_000_000",
        'max_age = "1d"',
        "",
    ]
    for d in range(DEVICES):
        lines += [
            "[[devices]]", 'driver = "simulator"', f'name = "sim{d}"', 'interval = "1s"', f"seed = {d}",
            "  [[devices.points]]", '  name = "p"', '  waveform = "counter"', '  type = "int64"',
            f"  count = {per_device}", "",
        ]
    lines += [
        "[mqtt]",
        f'servers = ["mqtt://{mqtt[0]}:{mqtt[1]}"]',
        'client_id = "outpost-bench"',
        "",
        "[kafka]",
        f'bootstrap_servers = ["{kafka_bootstrap}"]',
        'compression = "zstd"',
        "[[kafka.mappings]]",
        'mqtt_topic_filters = ["spBv1.0/+/DDATA/#"]',
        f'kafka_topic = "{topic}"',
        f'format = "{fmt}"',
        "",
        "[diagnostics]",
        f'socket_path = "{work / "outpost.sock"}"',
        "",
    ]
    return "\n".join(lines)


async def _status(sock: Path) -> dict[str, Any] | None:
    try:
        return await asyncio.to_thread(fetch_status, str(sock), 5.0)
    except Exception:
        return None


def _depth(st: dict[str, Any], name: str) -> int:
    return int(((st.get("buffer") or {}).get("cursors") or {}).get(name, {}).get("records", 0))


async def measure(rate: int, stack: Stack, base: Path, fmt: str, warmup_s: float, window_s: float,
                  slack: int) -> dict[str, Any]:
    work = base / f"rate-{rate}"
    work.mkdir(parents=True)
    topic = f"outpost.bench.{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(stack.kafka.create_topic, topic, 1)
    cfg = work / "outpost.toml"
    cfg.write_text(config(rate, work, (stack.mosquitto.host, stack.mosquitto.port), stack.kafka.bootstrap,
                          topic, fmt))
    gw = GatewayProcess(cfg, work / "gateway.log")
    sock = work / "outpost.sock"
    gw.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            st = await _status(sock)
            links = (st or {}).get("links", {})
            if links.get("mqtt", {}).get("up") and links.get("kafka", {}).get("up"):
                break
            if time.monotonic() > deadline or not gw.alive():
                raise RuntimeError(f"gateway at {rate}/s did not get both links up; see {gw.log_path}")
            await asyncio.sleep(0.5)
        await asyncio.sleep(warmup_s)
        polls: list[tuple[float, float, dict[str, Any]]] = []  # (monotonic, cpu_s, status)
        end = time.monotonic() + window_s
        while True:
            st = await _status(sock)
            if st is not None:
                polls.append((time.monotonic(), gw.runs[-1].cpu_s, st))
            if time.monotonic() >= end:
                break
            await asyncio.sleep(1.0)
        (t0, cpu0, s0), (t1, cpu1, s1) = polls[0], polls[-1]
        elapsed = t1 - t0
        samples = s1["counters"]["samples"] - s0["counters"]["samples"]
        cpu = cpu1 - cpu0
        growth = {}
        for name in ("mqtt", "kafka"):
            first = statistics.median(_depth(p[2], name) for p in polls[:3])
            last = statistics.median(_depth(p[2], name) for p in polls[-3:])
            growth[name] = {"depth_start": first, "depth_end": last}
        rate_ok = samples / elapsed >= 0.95 * rate
        cursors_ok = all(g["depth_end"] <= g["depth_start"] + slack for g in growth.values())
        return {
            "target_samples_per_s": rate,
            "samples_per_s": round(samples / elapsed, 1),
            "sustained": rate_ok and cursors_ok,
            "drivers_kept_rate": rate_ok,
            "cursors_not_growing": cursors_ok,
            "cursors": growth,
            "window_s": round(elapsed, 1),
            "gateway_cpu_cores": round(cpu / elapsed, 3),
            "gateway_cpu_s_per_1000_samples": round(cpu / max(samples, 1) * 1000, 4),
            "peak_rss_mb": round(gw.runs[-1].peak_rss_bytes / 2**20, 1),
            "records_stored": s1["buffer"].get("stored"),
        }
    finally:
        await gw.stop()


async def run(rates: list[int], stack: Stack, base: Path, fmt: str, warmup_s: float, window_s: float,
              slack: int) -> dict[str, Any]:
    results = []
    for rate in rates:
        print(f"[bench] {rate} samples/s ...", file=sys.stderr, flush=True)
        r = await measure(rate, stack, base, fmt, warmup_s, window_s, slack)
        print(f"[bench] {json.dumps(r)}", file=sys.stderr, flush=True)
        results.append(r)
        if not r["sustained"]:
            break
    sustained = [r for r in results if r["sustained"]]
    best = max(sustained, key=lambda r: r["samples_per_s"], default=None)
    at_10k = next((r for r in results if r["target_samples_per_s"] == 10_000), None)
    return {
        "benchmark": "gateway",
        "kafka_format": fmt,
        "devices": DEVICES,
        "rates": results,
        "highest_sustained_samples_per_s": best["samples_per_s"] if best else 0,
        "highest_sustained_target": best["target_samples_per_s"] if best else 0,
        "target_10k_half_core_100mb_met": bool(
            at_10k and at_10k["sustained"] and at_10k["gateway_cpu_cores"] < 0.5 and at_10k["peak_rss_mb"] < 100
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    ap.add_argument("--rates", default="1000,2000,5000,10000,20000")
    ap.add_argument("--format", default="json", choices=("json", "sparkplug"), help="the Kafka mapping format")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--slack", type=int, default=40, help="cursor growth (records) still counted as steady")
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    base = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
    stack = Stack(RunDir(base / "services"))
    try:
        _ = stack.mosquitto, stack.kafka
        report = asyncio.run(run(rates, stack, base, args.format, args.warmup, args.window, args.slack))
        print(json.dumps(report, indent=2))
        return 0
    finally:
        stack.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
