"""A fleet on a real Kafka cluster: many gateways, three brokers, link cuts and kill -9s.

`python -m tests.e2e.fleet --json [--gateways N] [--seconds S]` starts Toxiproxy and a
three-broker KRaft cluster (tests/harness KafkaCluster: RF 3, min.insync.replicas 2) with
one client listener per gateway, so that each gateway reaches every broker only through
proxies of its own (its cellular link). It then runs N `outpost run` processes, each its own
`edge_node_id` with simulator devices (`counter` points, so every poll is a new reading),
all writing one topic. During the run, at random: one gateway's link fails for a few
seconds, either cut (all its proxies disabled: connections closed) or with its answers lost
(a Toxiproxy `timeout` toxic downstream: produce requests reach the brokers and are
appended, no acknowledgement comes back, so the resend makes duplicates), or one gateway is
killed with SIGKILL and started again on the same buffer. Then every link is restored,
each gateway is stopped once Kafka caught up with it, and the reference consumer
(tools/outpost_consumer.py) reads the whole topic from the brokers' direct listeners and
de-duplicates it.

Figures per gateway: `produced` (records its buffer acknowledged as delivered to Kafka:
the buffer's kafka cursor, read from the file after the stop), `stored` (the buffer's last
seq; records above `produced` are still in the buffer, sent at the next start, not lost),
`delivered_once`, `duplicates`, `lost` (acknowledged seqs missing in Kafka, and gaps),
`out_of_order`, the gateway's CPU seconds (all its runs) and cores. Fleet: the duplicate
rate, samples/s and records/s delivered into the cluster over the run, the cluster's CPU.
tests/e2e/test_fleet.py runs a shortened form on the pytest fixtures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from buffer.diagnostics import stats_for_path
from gateway.diagnostics.client import fetch_status
from tests.harness.gateway import GatewayProcess
from tools.outpost_consumer import Deduplicator, consume

GROUP = "fleet"


@dataclass
class FleetParams:
    gateways: int = 20
    seconds: float = 120.0
    devices: int = 2           # per gateway
    points: int = 20           # per device (counters, 1 s): devices x points samples/s each
    interval: str = "1s"
    partitions: int = 12
    request_timeout: str = "3s"
    batch_max_records: int = 200
    cut_every_s: float = 6.0   # mean time between link cuts (exponential)
    cut_s: tuple[float, float] = (2.0, 10.0)
    acks_lost_min_s: float = 8.0
    kill_every_s: float = 20.0  # mean time between gateway kill -9s
    restart_after_s: tuple[float, float] = (0.5, 3.0)
    drain_timeout_s: float = 240.0
    seed: int = 1

    def check(self) -> None:
        if self.gateways < 1 or self.seconds <= 0:
            raise ValueError("--gateways must be at least 1 and --seconds above 0")


def gateway_config(work: Path, edge: str, bootstrap: str, topic: str, p: FleetParams) -> str:
    lines = [
        "[gateway]", f'group_id = "{GROUP}"', f'edge_node_id = "{edge}"',
        f'data_dir = "{work / "data"}"', 'log_level = "warning"', "",
        "[buffer]", "max_size_bytes = 200_000_000", 'max_age = "1d"', "",
    ]
    for d in range(p.devices):
        lines += [
            "[[devices]]", 'driver = "simulator"', f'name = "d{d}"', f'interval = "{p.interval}"',
            f"seed = {d}",
            "  [[devices.points]]", '  name = "c"', '  waveform = "counter"', '  type = "int64"',
            f"  count = {p.points}", "",
        ]
    lines += [
        "[kafka]",
        f"bootstrap_servers = {json.dumps(bootstrap.split(','))}",
        f'client_id = "outpost-{edge}"',
        f'request_timeout = "{p.request_timeout}"',
        'reconnect_min = "500ms"', 'reconnect_max = "5s"', 'linger = "100ms"',
        f"batch_max_records = {p.batch_max_records}",
        "[[kafka.mappings]]", 'name = "telemetry"', 'mqtt_topic_filters = ["spBv1.0/+/DDATA/#"]',
        f'kafka_topic = "{topic}"', 'format = "json"', "",
        "[diagnostics]", f'socket_path = "{work / "outpost.sock"}"', "",
    ]
    return "\n".join(lines)


class FleetGateway:
    def __init__(self, index: int, base: Path, cluster: Any, client: int, topic: str,
                 p: FleetParams) -> None:
        self.edge = f"gw{index:03d}"
        self.gateway_id = f"{GROUP}/{self.edge}"
        self.work = base / self.edge
        self.work.mkdir(parents=True)
        self.proxies = cluster.client_proxies(client)
        config = self.work / "outpost.toml"
        config.write_text(gateway_config(self.work, self.edge, cluster.client_bootstrap(client),
                                         topic, p))
        self.process = GatewayProcess(config, self.work / "gateway.log")
        self.socket = str(self.work / "outpost.sock")
        self.kills = 0
        self.cuts = 0
        self.cut_s = 0.0
        self.busy = False  # a fault is being applied to it

    async def status(self) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(fetch_status, self.socket, 5.0)
        except Exception:
            return None

    def set_link(self, up: bool, kind: str = "cut") -> None:
        for proxy in self.proxies:
            if up:
                proxy.restore()
            elif kind == "cut":
                proxy.cut()  # connections closed, new ones refused
            else:
                # "acks_lost": requests still reach the brokers (and are appended), their
                # answers never come back: the resend that follows makes duplicates.
                proxy.add_toxic("timeout", {"timeout": 0}, stream="downstream",
                                name="acks_lost")

    async def cut(self, seconds: float, kind: str = "cut") -> None:
        self.busy = True
        try:
            await asyncio.to_thread(self.set_link, False, kind)
            self.cuts += 1
            self.cut_s += seconds
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(self.set_link, True)
            self.busy = False

    async def kill_and_restart(self, after_s: float) -> None:
        self.busy = True
        try:
            await self.process.kill9()
            self.kills += 1
            await asyncio.sleep(after_s)
            self.process.start()
        finally:
            self.busy = False

    async def pending(self) -> int | None:
        st = await self.status()
        cursor = (((st or {}).get("buffer") or {}).get("cursors") or {}).get("kafka")
        return None if cursor is None else int(cursor.get("records", 0))

    def buffer_figures(self) -> tuple[int, int]:
        stats = stats_for_path(self.work / "data" / "buffer.db")
        return int(stats["cursors"]["kafka"]["acked_seq"]), int(stats["last_seq"])


async def _chaos(fleet: list[FleetGateway], p: FleetParams, rng: random.Random,
                 until: float, events: list[dict[str, Any]], force: bool) -> None:
    """Random link cuts and kill -9s until `until` (loop time); `force`: at least one of each."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[None]] = set()
    next_cut = loop.time() + (1.0 if force else rng.expovariate(1 / p.cut_every_s))
    next_kill = loop.time() + (2.0 if force else rng.expovariate(1 / p.kill_every_s))
    try:
        while loop.time() < until:
            now = loop.time()
            idle = [g for g in fleet if not g.busy]
            if now >= next_cut and idle:
                g = rng.choice(idle)
                secs = round(rng.uniform(*p.cut_s), 1)
                n_link = sum(1 for e in events if "kill9" not in e)
                if force and n_link < 2:
                    kind = ("cut", "acks_lost")[n_link]  # the shortened run sees both
                else:
                    kind = "cut" if rng.random() < 0.5 else "acks_lost"
                if kind == "acks_lost":
                    # Longer than the delivery deadline (2 x request_timeout), or the held
                    # answers arrive when the toxic goes and nothing is resent.
                    secs = max(secs, p.acks_lost_min_s)
                events.append({"t": round(now, 1), kind: g.edge, "s": secs})
                t = asyncio.create_task(g.cut(secs, kind), name=f"{kind}-{g.edge}")
                running.add(t)
                t.add_done_callback(running.discard)
                g.busy = True
                next_cut = now + rng.expovariate(1 / p.cut_every_s)
            idle = [g for g in fleet if not g.busy]
            if now >= next_kill and idle:
                g = rng.choice(idle)
                after = round(rng.uniform(*p.restart_after_s), 1)
                events.append({"t": round(now, 1), "kill9": g.edge, "restart_after_s": after})
                t = asyncio.create_task(g.kill_and_restart(after), name=f"kill-{g.edge}")
                running.add(t)
                t.add_done_callback(running.discard)
                g.busy = True
                next_kill = now + rng.expovariate(1 / p.kill_every_s)
            await asyncio.sleep(0.2)
        if running:
            await asyncio.gather(*running)
    finally:
        for t in running:
            t.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


async def run_fleet(cluster: Any, kcat: str | None, base: Path, p: FleetParams,
                    *, force_faults: bool = False, first_client: int = 0) -> dict[str, Any]:
    """The scenario on a running cluster (with at least `gateways` client listeners)."""
    p.check()
    rng = random.Random(p.seed)
    topic = f"fleet.telemetry.{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(cluster.create_topic, topic, p.partitions)
    fleet = [FleetGateway(i, base, cluster, first_client + i, topic, p) for i in range(p.gateways)]
    broker_pids = [n.process.pid for n in cluster.nodes if n.alive()]
    cluster_cpu0 = _cpu_s(broker_pids)
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        for g in fleet:
            g.process.start()
            await asyncio.sleep(0.05)  # do not fork 20 interpreters in the same instant
        loop = asyncio.get_running_loop()
        await _chaos(fleet, p, rng, loop.time() + p.seconds, events, force_faults)
        chaos_end = time.monotonic()
        for g in fleet:
            await asyncio.to_thread(g.set_link, True)
        # Drain: each gateway stops once Kafka caught up with it (a few live flushes behind).
        deadline = time.monotonic() + p.drain_timeout_s
        remaining = list(fleet)
        while remaining:
            pend = await asyncio.gather(*(g.pending() for g in remaining))
            done = [g for g, n in zip(remaining, pend, strict=True)
                    if n is not None and n <= 2 * p.devices]
            await asyncio.gather(*(g.process.stop() for g in done))
            remaining = [g for g in remaining if g not in done]
            if remaining and time.monotonic() > deadline:
                raise RuntimeError(f"gateways never caught up with Kafka: "
                                   f"{[g.edge for g in remaining]} (pending {pend})")
            await asyncio.sleep(0.5)
        stopped = time.monotonic()
        cluster_cpu = _cpu_s(broker_pids) - cluster_cpu0
    finally:
        await asyncio.gather(*(g.process.stop() for g in fleet), return_exceptions=True)
        for g in fleet:
            with contextlib.suppress(Exception):
                g.set_link(True)
    produced = {}
    stored = {}
    for g in fleet:
        produced[g.gateway_id], stored[g.gateway_id] = g.buffer_figures()
    dedup = Deduplicator()
    read_started = time.monotonic()
    await consume(cluster.bootstrap, [topic], dedup, count_values=True)
    read_s = time.monotonic() - read_started
    report = dedup.report(produced)
    run_s = stopped - t0
    per_gateway = {}
    for g in fleet:
        fig = report["gateways"][g.gateway_id]
        cpu = g.process.figures()
        per_gateway[g.edge] = {
            "produced": fig["produced"],
            "stored": stored[g.gateway_id],
            "delivered_once": fig["delivered_once"],
            "duplicates": fig["duplicates"],
            "lost": fig["lost"],
            "out_of_order": fig["out_of_order"],
            "samples": fig["samples"],
            "kills": g.kills,
            "cuts": g.cuts,
            "cut_s": round(g.cut_s, 1),
            "cpu_s": cpu["gateway_cpu_s_total"],
            "cpu_cores": round(cpu["gateway_cpu_s_total"] / run_s, 4),
            "peak_rss_mb": cpu["gateway_peak_rss_mb"],
        }
    cores = [g["cpu_cores"] for g in per_gateway.values()]
    samples = sum(g["samples"] for g in per_gateway.values())
    return {
        "scenario": "fleet",
        "params": asdict(p),
        "topic": topic,
        "gateways": per_gateway,
        "events": events,
        "totals": {
            "gateways": p.gateways,
            "produced": sum(g["produced"] or 0 for g in per_gateway.values()),
            "delivered_once": report["delivered_once"],
            "duplicates": report["duplicates"],
            "lost": report["lost"],
            "out_of_order": report["out_of_order"],
            "malformed": report["malformed"],
            "duplicate_rate": report["duplicate_rate"],
            "gateways_with_loss": sorted(e for e, g in per_gateway.items() if g["lost"]),
            "kills": sum(g["kills"] for g in per_gateway.values()),
            "cuts": sum(g["cuts"] for g in per_gateway.values()),
            "link_faults": {k: sum(1 for e in events if k in e) for k in ("cut", "acks_lost")},
            "run_s": round(run_s, 1),
            "chaos_s": round(chaos_end - t0, 1),
            "samples_delivered": samples,
            "samples_per_s": round(samples / run_s, 1),
            "records_per_s": round(report["delivered_once"] / run_s, 1),
            "cpu_cores_per_gateway_mean": round(sum(cores) / len(cores), 4),
            "cpu_cores_per_gateway_max": max(cores),
            "cluster_cpu_cores": round(cluster_cpu / run_s, 3),
            "consumer_read_s": round(read_s, 1),
            "consumer_messages_per_s": round(report["messages"] / max(read_s, 1e-3), 0),
        },
    }


def main(argv: list[str] | None = None) -> int:
    from tests.harness.common import RunDir
    from tests.harness.kafka import KafkaCluster
    from tests.harness.toxiproxy import ToxiproxyServer

    ap = argparse.ArgumentParser(prog="python -m tests.e2e.fleet", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    ap.add_argument("--gateways", type=int, default=FleetParams.gateways)
    ap.add_argument("--seconds", type=float, default=FleetParams.seconds)
    ap.add_argument("--devices", type=int, default=FleetParams.devices, help="per gateway")
    ap.add_argument("--points", type=int, default=FleetParams.points, help="per device")
    ap.add_argument("--partitions", type=int, default=FleetParams.partitions)
    ap.add_argument("--cut-every", type=float, default=FleetParams.cut_every_s)
    ap.add_argument("--kill-every", type=float, default=FleetParams.kill_every_s)
    ap.add_argument("--seed", type=int, default=FleetParams.seed)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args(argv)
    params = FleetParams(gateways=args.gateways, seconds=args.seconds, devices=args.devices,
                         points=args.points, partitions=args.partitions,
                         cut_every_s=args.cut_every, kill_every_s=args.kill_every, seed=args.seed)
    params.check()
    import logging

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    base = Path(tempfile.mkdtemp(prefix="outpost-fleet-"))
    run = RunDir(base / "services")
    toxiproxy = ToxiproxyServer(run).start()
    cluster = None
    try:
        cluster = KafkaCluster(run, toxiproxy, client_listeners=params.gateways).start()
        print(f"[fleet] cluster of {len(cluster.brokers)} brokers ready in {cluster.start_s}s; "
              f"{params.gateways} gateways for {params.seconds:g}s", file=sys.stderr, flush=True)
        report = asyncio.run(run_fleet(cluster, None, base / "gateways", params))
        report["cluster_start_s"] = cluster.start_s
        print(json.dumps(report, indent=2))
        return 0 if report["totals"]["lost"] == 0 else 1
    finally:
        if cluster is not None:
            cluster.stop()
        toxiproxy.stop()
        if args.keep:
            print(f"[fleet] work folder kept: {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
