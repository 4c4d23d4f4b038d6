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

Before the rates, a bytes phase (`--bytes-window`, 0 to skip) runs the gateway twice at
`--bytes-rate` with its clock forced trusted, then untrusted (the child patches the kernel
clock probe: the figures do not depend on this machine's NTP state), subscribes to the
node's DDATA on Mosquitto and prints `mqtt_bytes_per_sample` and
`mqtt_bytes_per_sample_unsynced`: MQTT payload bytes of every DDATA over the samples they
carry (the clock marker metric is not a sample). The point names are realistic, 14-16
characters (`pressure_kpa_17`); with aliases they never travel in DDATA.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from gmqtt import Client

from gateway.diagnostics.client import fetch_status
from gateway.sparkplug import sparkplug_b_pb2 as pb
from tests.harness.common import REPO_ROOT, ManagedProcess, RunDir
from tests.harness.gateway import GatewayProcess, ProcessFigures
from tests.harness.stack import Stack

DEVICES = 10
POINT_NAME = "pressure_kpa"  # expanded to pressure_kpa_0 .. pressure_kpa_<n-1>: 14-16 characters
CLOCK_MARKER = "Outpost/Clock/Unsynced"
CHILD_FLAG = "--gateway-child-clock"


def config(rate: int, work: Path, mqtt: tuple[str, int], kafka_bootstrap: str | None, topic: str, fmt: str) -> str:
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
            "  [[devices.points]]", f'  name = "{POINT_NAME}"', '  waveform = "counter"', '  type = "int64"',
            f"  count = {per_device}", "",
        ]
    lines += [
        "[mqtt]",
        f'servers = ["mqtt://{mqtt[0]}:{mqtt[1]}"]',
        'client_id = "outpost-bench"',
        "",
    ]
    if kafka_bootstrap is not None:
        lines += [
            "[kafka]",
            f'bootstrap_servers = ["{kafka_bootstrap}"]',
            'compression = "zstd"',
            "[[kafka.mappings]]",
            'mqtt_topic_filters = ["spBv1.0/+/DDATA/#"]',
            f'kafka_topic = "{topic}"',
            f'format = "{fmt}"',
            "",
        ]
    lines += [
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


# -- bytes per sample on MQTT ---------------------------------------------------------------


def _child_main(clock: str, argv: list[str]) -> int:
    """`outpost <argv>` with the kernel clock probe answering `clock`: `synced`, `unsynced`,
    or `file:PATH` (synced while PATH exists: a test synchronises the clock by creating it)."""
    from gateway import clock as clock_mod
    from gateway.cli import main as outpost_main

    def probe() -> Any:
        synced = Path(clock[5:]).exists() if clock.startswith("file:") else clock == "synced"
        return clock_mod.ClockStatus(synced=synced, source=f"benchmark: forced {clock}")

    kwdefaults = clock_mod.ClockGuard.__init__.__kwdefaults__
    assert kwdefaults is not None and "probe" in kwdefaults, "ClockGuard(probe=...) changed"
    kwdefaults["probe"] = probe
    return outpost_main(argv)


class ClockedGateway(GatewayProcess):
    """The gateway child with its clock forced trusted or untrusted (see _child_main)."""

    def __init__(self, config_path: Path, log_path: Path, clock: str) -> None:
        super().__init__(config_path, log_path)
        self.clock = clock

    def start(self) -> None:
        argv = [sys.executable, "-m", "tests.benchmarks.gateway", CHILD_FLAG, self.clock,
                "run", "--config", str(self.config_path)]
        self.proc = ManagedProcess("outpost-gateway", argv, self.log_path, cwd=REPO_ROOT).start()
        figures = ProcessFigures()
        self.runs.append(figures)
        self._sampler = asyncio.create_task(self._sample(self.proc.pid, figures), name="gateway-sampler")


def _value(m: Any) -> Any:
    kind = m.WhichOneof("value")
    return None if kind is None else getattr(m, kind)


class DdataCounter:
    """Subscribes to the node's births and DDATA; counts DDATA payload bytes and samples.

    A sample is a DDATA metric other than the clock marker (found by its name in the
    DBIRTH, its alias in DDATA). A payload counts as flagged when it carries the marker
    with value true, or (the encoding before issue 16) every metric has the
    `clock_unsynced` property.
    """

    def __init__(self, host: str, port: int, group: str) -> None:
        self.host, self.port, self.group = host, port, group
        self.counting = False
        self.markers: set[tuple[str, int]] = set()  # (device, alias) of each device's marker
        self.bytes = self.payloads = self.samples = self.flagged = 0
        self._client: Client | None = None

    def _on_message(self, _c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        parts = topic.split("/")
        if len(parts) != 5:
            return 0
        kind, device = parts[2], parts[4]
        p = pb.Payload.FromString(payload)
        if kind == "DBIRTH":
            for m in p.metrics:
                if m.name == CLOCK_MARKER and m.HasField("alias"):
                    self.markers.add((device, m.alias))
        elif kind == "DDATA" and self.counting:
            self.bytes += len(payload)
            self.payloads += 1
            marker = None
            samples = []
            for m in p.metrics:
                if m.name == CLOCK_MARKER or (m.HasField("alias") and (device, m.alias) in self.markers):
                    marker = _value(m)
                else:
                    samples.append(m)
            self.samples += len(samples)
            old_style = bool(samples) and all("clock_unsynced" in m.properties.keys for m in samples)
            self.flagged += marker is True or old_style
        return 0

    async def start(self) -> None:
        client = Client(f"bench-bytes-{uuid.uuid4().hex[:8]}")
        client.set_config({"reconnect_retries": -2, "reconnect_delay": 3600})
        subscribed = asyncio.Event()
        client.on_message = self._on_message
        client.on_subscribe = lambda *_a, **_k: subscribed.set()
        await client.connect(self.host, self.port, keepalive=30)
        self._client = client
        client.subscribe(f"spBv1.0/{self.group}/#", qos=0)
        await asyncio.wait_for(subscribed.wait(), 10)

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)


async def measure_bytes(stack: Stack, base: Path, clock: str, rate: int, warmup_s: float,
                        window_s: float) -> dict[str, Any]:
    """MQTT DDATA payload bytes per sample, the gateway's clock forced to `clock`."""
    work = base / f"bytes-{clock}"
    work.mkdir(parents=True)
    cfg = work / "outpost.toml"
    cfg.write_text(config(rate, work, (stack.mosquitto.host, stack.mosquitto.port), None, "", "json"))
    counter = DdataCounter(stack.mosquitto.host, stack.mosquitto.port, "bench")
    await counter.start()
    gw = ClockedGateway(cfg, work / "gateway.log", clock)
    sock = work / "outpost.sock"
    gw.start()
    try:
        deadline = time.monotonic() + 60
        while not ((await _status(sock)) or {}).get("links", {}).get("mqtt", {}).get("up"):
            if time.monotonic() > deadline or not gw.alive():
                raise RuntimeError(f"gateway ({clock} clock) did not get MQTT up; see {gw.log_path}")
            await asyncio.sleep(0.5)
        await asyncio.sleep(warmup_s)
        counter.counting = True
        await asyncio.sleep(window_s)
        counter.counting = False
    finally:
        await gw.stop()
        await counter.stop()
    if not counter.samples:
        raise RuntimeError(f"no DDATA seen with the {clock} clock; see {gw.log_path}")
    return {
        "clock": clock,
        "ddata_payloads": counter.payloads,
        "samples": counter.samples,
        "samples_per_payload": round(counter.samples / counter.payloads, 1),
        "payload_bytes": counter.bytes,
        "bytes_per_sample": round(counter.bytes / counter.samples, 2),
        "payloads_flagged": counter.flagged,
    }


async def run(rates: list[int], stack: Stack, base: Path, fmt: str, warmup_s: float, window_s: float,
              slack: int, bytes_rate: int = 1000, bytes_window_s: float = 10.0) -> dict[str, Any]:
    byte_runs = {}
    if bytes_window_s > 0:
        for clock in ("synced", "unsynced"):
            print(f"[bench] bytes per sample, {clock} clock, {bytes_rate} samples/s ...", file=sys.stderr, flush=True)
            byte_runs[clock] = await measure_bytes(stack, base, clock, bytes_rate, 5.0, bytes_window_s)
            print(f"[bench] {json.dumps(byte_runs[clock])}", file=sys.stderr, flush=True)
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
    report: dict[str, Any] = {
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
    if byte_runs:
        report["mqtt_bytes_per_sample"] = byte_runs["synced"]["bytes_per_sample"]
        report["mqtt_bytes_per_sample_unsynced"] = byte_runs["unsynced"]["bytes_per_sample"]
        report["mqtt_bytes"] = {"point_names": f"{POINT_NAME}_<n>", "rate": bytes_rate, **byte_runs}
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [CHILD_FLAG]:
        return _child_main(argv[1], argv[2:])
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.gateway", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    ap.add_argument("--rates", default="1000,2000,5000,10000,20000")
    ap.add_argument("--format", default="json", choices=("json", "sparkplug"), help="the Kafka mapping format")
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--slack", type=int, default=40, help="cursor growth (records) still counted as steady")
    ap.add_argument("--bytes-rate", type=int, default=1000, help="samples/s of the bytes phase")
    ap.add_argument("--bytes-window", type=float, default=10.0,
                    help="seconds of DDATA counted per clock state (0: no bytes phase)")
    args = ap.parse_args(argv)
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    base = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
    stack = Stack(RunDir(base / "services"))
    try:
        _ = stack.mosquitto
        if rates:
            _ = stack.kafka
        report = asyncio.run(run(rates, stack, base, args.format, args.warmup, args.window, args.slack,
                                 args.bytes_rate, args.bytes_window))
        print(json.dumps(report, indent=2))
        return 0
    finally:
        stack.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
