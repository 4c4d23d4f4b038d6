"""Shared helpers for the three-broker cluster tests (no tests here).

`ClusterGateway` runs `outpost run` (a real gateway process, simulator devices, Kafka only)
against the cluster's proxied bootstrap list, so every connection it makes goes through one
broker's Toxiproxy. `audit()` reads the topic back with kcat from the brokers' direct
listeners (an independent consumer) and checks the delivery promise against the gateway's
own buffer: every seq it stored is in Kafka, each device's records sit in one partition in
the order they were read, and what repeats is a resend of records already delivered.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer.diagnostics import stats_for_path
from gateway.diagnostics.client import fetch_status
from tests.harness.gateway import GatewayProcess

GROUP = "fleet"


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def gateway_config(work: Path, edge: str, bootstrap: str, topic: str, *, devices: int = 4,
                   points: int = 3, interval: str = "100ms", request_timeout: str = "3s",
                   batch_max_records: int = 200, fmt: str = "json") -> str:
    """A Kafka-only gateway: `devices` simulator devices of `points` counters each."""
    lines = [
        "[gateway]",
        f'group_id = "{GROUP}"',
        f'edge_node_id = "{edge}"',
        f'data_dir = "{work / "data"}"',
        "",
        "[buffer]",
        "max_size_bytes = 200_000_000",
        'max_age = "1d"',
        'flush_interval = "200ms"',
        "",
    ]
    for d in range(devices):
        lines += [
            "[[devices]]", 'driver = "simulator"', f'name = "d{d}"', f'interval = "{interval}"',
            f"seed = {d}",
            "  [[devices.points]]", '  name = "c"', '  waveform = "counter"', '  type = "int64"',
            f"  count = {points}", "",
        ]
    lines += [
        "[kafka]",
        f"bootstrap_servers = {json.dumps(bootstrap.split(','))}",
        f'client_id = "outpost-{edge}"',
        f'request_timeout = "{request_timeout}"',
        'reconnect_min = "200ms"',
        'reconnect_max = "2s"',
        'linger = "50ms"',
        f"batch_max_records = {batch_max_records}",
        "[[kafka.mappings]]",
        'name = "telemetry"',
        'mqtt_topic_filters = ["spBv1.0/+/DDATA/#"]',
        f'kafka_topic = "{topic}"',
        f'format = "{fmt}"',
        "",
        "[diagnostics]",
        f'socket_path = "{work / "outpost.sock"}"',
        "",
    ]
    return "\n".join(lines)


class ClusterGateway:
    """One `outpost run` writing to the cluster; status over its socket."""

    def __init__(self, work: Path, edge: str, bootstrap: str, topic: str, **config: Any) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.edge = edge
        self.gateway_id = f"{GROUP}/{edge}"
        self.config_path = work / "outpost.toml"
        self.config_path.write_text(gateway_config(work, edge, bootstrap, topic, **config))
        self.socket = str(work / "outpost.sock")
        self.process = GatewayProcess(self.config_path, work / "gateway.log")
        self.devices = config.get("devices", 4)

    def start(self) -> None:
        self.process.start()

    async def status(self) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(fetch_status, self.socket, 5.0)
        except Exception:
            return None

    async def acked_seq(self) -> int:
        st = await self.status()
        cursor = (((st or {}).get("buffer") or {}).get("cursors") or {}).get("kafka") or {}
        return int(cursor.get("acked_seq") or 0)

    async def wait_acked(self, above: int, limit_s: float, what: str) -> int:
        """Until Kafka acknowledged a record past `above`; returns the acked seq."""
        deadline = time.monotonic() + limit_s
        while True:
            acked = await self.acked_seq()
            if acked > above:
                return acked
            if not self.process.alive():
                raise AssertionError(f"{self.edge}: gateway exited; see {self.process.log_path}")
            if time.monotonic() > deadline:
                st = await self.status()
                kafka = ((st or {}).get("links") or {}).get("kafka")
                raise AssertionError(f"{self.edge}: {what}: acked seq stayed at {acked} for "
                                     f"{limit_s:g}s (kafka link: {kafka}); see {self.process.log_path}")
            await asyncio.sleep(0.5)

    async def drain_and_stop(self, limit_s: float = 120) -> tuple[int, int]:
        """Wait until Kafka caught up with the buffer, stop (SIGTERM); (acked seq, last seq).

        Read from the buffer file after the stop: every seq up to the acked one must be in
        Kafka; the few stored after it (the last flushes before the stop) are still in the
        buffer, not lost, and may or may not have reached Kafka.
        """
        deadline = time.monotonic() + limit_s
        while True:
            st = await self.status()
            cursor = (((st or {}).get("buffer") or {}).get("cursors") or {}).get("kafka") or {}
            if st is not None and cursor.get("records", 10**9) <= 4 * self.devices:
                break  # caught up with the live flow (a few flushes behind at most)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.edge}: Kafka cursor never caught up: {cursor}; "
                                     f"see {self.process.log_path}")
            await asyncio.sleep(0.5)
        code = await self.process.stop()
        assert code == 0, f"{self.edge}: gateway exited {code}; see {self.process.log_path}"
        stats = stats_for_path(self.work / "data" / "buffer.db")
        return int(stats["cursors"]["kafka"]["acked_seq"]), int(stats["last_seq"])

    async def kill9(self) -> None:
        await self.process.kill9()

    async def stop(self) -> None:
        await self.process.stop()


def kcat_read(kcat: str, bootstrap: str, topic: str, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Every message of `topic` (kcat -J envelopes) from the brokers' direct listeners."""
    done = subprocess.run(
        [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-J", "-q",
         "-X", "fetch.wait.max.ms=100"],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kcat -C {topic} at {bootstrap} exited {done.returncode}: "
                             f"{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _headers(env: dict[str, Any]) -> dict[str, str]:
    raw = env.get("headers") or []
    return {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}


@dataclass
class Audit:
    messages: int = 0
    distinct: int = 0
    duplicates: int = 0
    lost: dict[str, list[int]] = field(default_factory=dict)  # gateway -> missing seqs
    unexpected: dict[str, list[int]] = field(default_factory=dict)  # seqs never produced
    order_errors: list[str] = field(default_factory=list)
    partitions_per_key: dict[str, set[int]] = field(default_factory=dict)
    per_gateway: dict[str, dict[str, int]] = field(default_factory=dict)

    def check(self, max_duplicates: int) -> None:
        assert not self.lost, {g: (len(s), s[:20]) for g, s in self.lost.items()}
        assert not self.unexpected, self.unexpected
        assert not self.order_errors, self.order_errors[:10]
        split = {k: p for k, p in self.partitions_per_key.items() if len(p) != 1}
        assert not split, f"records of one device in several partitions: {split}"
        assert self.duplicates <= max_duplicates, (
            f"{self.duplicates} duplicates, more than the {max_duplicates} a resend of the "
            "batches in flight can make")


def audit(messages: list[dict[str, Any]], produced: dict[str, tuple[int, int]]) -> Audit:
    """Check kcat's messages against each gateway's buffer (`produced`: gateway -> (acked
    seq, last seq)): every seq up to the acked one must be there, none above the last.

    Per key, in partition order: a seq above every earlier one is new; one seen before is a
    duplicate; one below the highest and never seen is an order error. Every point's counter
    value must rise with each new record of its device (the json value carries them).
    """
    a = Audit(messages=len(messages))
    seen: dict[str, set[int]] = {}
    hwm: dict[str, int] = {}
    last_value: dict[tuple[str, str], int] = {}
    for m in sorted(messages, key=lambda m: (m["partition"], m["offset"])):
        h = _headers(m)
        gw, stream, seq = h["outpost-gateway"], h["outpost-stream"], int(h["outpost-seq"])
        key = m["key"]
        a.partitions_per_key.setdefault(key, set()).add(m["partition"])
        gw_seen = seen.setdefault(gw, set())
        if seq in gw_seen:
            a.duplicates += 1
            continue
        gw_seen.add(seq)
        if seq < hwm.get(key, 0):
            a.order_errors.append(f"{key}: seq {seq} after {hwm[key]} (never seen before)")
        hwm[key] = max(hwm.get(key, 0), seq)
        doc = json.loads(m["payload"])
        for metric in doc["metrics"]:
            pk = (stream, metric["name"])
            v = int(metric["value"])
            if pk in last_value and v <= last_value[pk]:
                a.order_errors.append(f"{pk}: value {v} after {last_value[pk]} (seq {seq})")
            last_value[pk] = v
    for gw, (acked, last) in produced.items():
        got = seen.get(gw, set())
        missing = sorted(set(range(1, acked + 1)) - got)
        if missing:
            a.lost[gw] = missing
        extra = sorted(s for s in got if s > last or s < 1)
        if extra:
            a.unexpected[gw] = extra
        a.per_gateway[gw] = {"acked": acked, "stored": last, "delivered_once": len(got)}
    a.distinct = sum(len(s) for s in seen.values())
    for gw in seen:
        if gw not in produced:
            a.unexpected[gw] = sorted(seen[gw])[:10]
    return a


def partition_of(key: str, partitions: int) -> int:
    """The partition Outpost (and the Java client) puts `key` in."""
    from aiokafka.partitioner import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def device_key(gateway: ClusterGateway, device: int) -> str:
    return f"{gateway.gateway_id}/d{device}"


async def log_has(path: Path, text: str) -> bool:
    try:
        return text in await asyncio.to_thread(path.read_text, errors="replace")
    except OSError:
        return False
