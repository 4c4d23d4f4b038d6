"""Kafka uplink figures: `python -m tests.benchmarks.kafka --json`.

Starts its own Kafka and Toxiproxy through tests/harness and prints one JSON object:

- drain: a backlog of `--records` (default 1,000,000) buffered ~200-byte records sent by
  KafkaUplink (default settings: zstd, batches of 2000 records, acks=all, idempotent) to
  the local broker: records/s and MB/s of payload; then kcat producing the same keys and
  values from a file with the same producer guarantees (acks=all, idempotence, zstd) as the
  ceiling, and the ratio uplink/kcat (target >= 0.6). The two alternate `--rounds` times
  (default 2; the ratio is over all rounds, per round beside it), after both sent
  `--warmup-records` unmeasured to warm the fresh broker's JVM, so that neither the cold
  broker nor load from other work drifting over the run favours one of them; CPU microseconds per record of
  each (this process's threads during the drains, kcat's own) are printed too, and the
  seconds the buffer then takes to delete the acknowledged rows (it does so when idle,
  so a CPU-bound drain is not slowed by it: `buffer_reclaim_after_drain_s`). kcat sends
  five headers of the same
  names and sizes as the uplink's de-duplication headers (static, as kcat has no per-line
  headers), so both put the same bytes in each record; kcat without headers is reported too.
  kcat runs with librdkafka's default batching (up to 10000 records / 1 MB per batch, 5 ms
  linger, 5 requests in flight); the uplink's default batches are 2000 records, so the
  drain is run a second time with kcat's batch limits (`uplink_kcat_batching_*`).
- wire: bytes on the wire per sample counted at the Toxiproxy proxy for typical float
  telemetry (10 devices x 8 float points, one poll per tick, values drifting), sent live
  tick by tick: Sparkplug B DDATA with aliases + zstd via KafkaUplink, the same with metric
  names (what the buffer holds: aliases are stamped by the MQTT uplink only), and one JSON
  message per sample without compression (a plain producer, no headers); the ratio of
  JSON to Sparkplug-with-aliases bytes. Upstream (gateway -> broker) and both directions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from buffer import AsyncBuffer, BufferSettings, NewRecord
from gateway.runtime.supervisor import tune_gc
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.uplinks.kafka.mappings import Mapping
from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
from tests.harness.common import RunDir
from tests.harness.stack import Stack
from tests.harness.tools import kcat_path
from tests.helpers import flat

GATEWAY = "plant-7/pump-3"
DEVICES = 10
POINTS = 8


def _drain_records(n: int, now_ms: int) -> list[tuple[str, bytes]]:
    """(device, ~200-byte telemetry text) pairs; text so kcat can read them line by line."""
    rng = random.Random(1)
    out = []
    for i in range(n):
        dev = f"meter{i % DEVICES}"
        vals = ",".join(f"{rng.uniform(0, 500):.3f}" for _ in range(POINTS))
        body = f'{{"ts":{now_ms + i},"seq":{i},"v":[{vals}],"q":"good","u":"V"}}'
        out.append((dev, body.encode()[:200].ljust(200, b" ")))
    return out


def _record(dev: str, payload: bytes, ts_ms: int) -> NewRecord:
    return NewRecord(
        stream=f"{GATEWAY}/{dev}",
        payload=payload,
        ts_ms=ts_ms,
        headers={"topic": f"spBv1.0/plant-7/DDATA/pump-3/{dev}", "type": "DDATA",
                 "gateway": GATEWAY},
    )


async def _fill(buf: AsyncBuffer, records: list[NewRecord]) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(records), 5000):
        await buf.append(records[i : i + 5000])
    return time.perf_counter() - t0


async def _run_uplink_until(uplink: KafkaUplink, last_seq: int, limit_s: float) -> float:
    task = asyncio.create_task(uplink.run(), name="bench-kafka-uplink")
    t0 = time.perf_counter()
    try:
        while (flat(uplink.state)["acked_seq"] or 0) < last_seq:
            if task.done():
                task.result()
                raise RuntimeError("uplink stopped")
            if time.perf_counter() - t0 > limit_s:
                raise RuntimeError(f"drain not finished in {limit_s}s: {flat(uplink.state)}")
            await asyncio.sleep(0.02)
        return time.perf_counter() - t0
    finally:
        await uplink.stop()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _kcat_produce(bootstrap: str, topic: str, pairs: list[tuple[str, bytes]],
                  workdir: Path, with_headers: bool = True) -> float:
    """kcat producing the same keys and values from a file, same guarantees and compression."""
    kfile = workdir / "kcat-input.txt"
    with open(kfile, "wb") as f:
        for dev, p in pairs:
            f.write(f"{GATEWAY}/{dev}\t".encode() + p + b"\n")
    # kcat's headers are the same for every message (it has no per-line headers); they have
    # the names and sizes of the uplink's, so both send the same bytes per record.
    headers = {"outpost-gateway": GATEWAY, "outpost-stream": f"{GATEWAY}/meter0",
               "outpost-seq": "1000000", "outpost-topic": "spBv1.0/plant-7/DDATA/pump-3/meter0",
               "outpost-type": "DDATA"}
    header_args = [a for k, v in headers.items() for a in ("-H", f"{k}={v}")]
    if not with_headers:
        header_args = []
    t0 = time.perf_counter()
    done = subprocess.run(
        [kcat_path(), "-P", "-b", bootstrap, "-t", topic, "-K", "\t", "-l", *header_args,
         "-z", "zstd", "-X", "acks=all", "-X", "enable.idempotence=true", str(kfile)],
        capture_output=True, timeout=1800, check=False,
    )
    elapsed = time.perf_counter() - t0
    kfile.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"kcat failed: {done.stderr.decode()[-1000:]}")
    return elapsed


async def _wait_acked(uplink: KafkaUplink, last_seq: int) -> None:
    while True:
        if (flat(uplink.state)["acked_seq"] or 0) >= last_seq:
            return
        await asyncio.sleep(0.05)


# librdkafka's producer defaults, which kcat uses here: batch.num.messages=10000,
# batch.size=1000000 (bytes), linger.ms=5, compression.level=-1 (zstd's default, 3),
# max.in.flight=5 per connection even with idempotence.
KCAT_BATCH_MAX_RECORDS = 10_000
KCAT_BATCH_MAX_BYTES = 1_000_000


async def _drain_once(kafka: Any, pairs: list[tuple[str, bytes]], now_ms: int, workdir: Path,
                      batch_max_records: int, batch_max_bytes: int,
                      name: str) -> tuple[float, float, dict[str, Any]]:
    """Fill a fresh buffer with `pairs`, drain it with KafkaUplink: (fill_s, drain_s, state
    with the process CPU seconds of the drain as `cpu_s`)."""
    topic = f"bench-drain-{name}-{int(time.time())}"
    kafka.create_topic(topic, partitions=3)
    buf = await AsyncBuffer.open(str(workdir / f"drain-{name}.db"),
                                 BufferSettings(4_000_000_000, 7 * 86400.0, synchronous="normal"))
    try:
        fill_s = await _fill(buf, [_record(d, p, now_ms + i) for i, (d, p) in enumerate(pairs)])
        last = (await buf.stats())["last_seq"]
        settings = KafkaSettings(bootstrap_servers=(kafka.bootstrap,),
                                 batch_max_records=batch_max_records,
                                 batch_max_bytes=batch_max_bytes, linger_s=0.0)
        uplink = KafkaUplink(settings, buf, [Mapping("t", ("spBv1.0/#",), topic)], GATEWAY)
        cpu0 = time.process_time()
        drain_s = await _run_uplink_until(uplink, last, limit_s=1800)
        cpu_s = time.process_time() - cpu0
        # Acks retire records; their rows are deleted when the buffer is idle, after a
        # CPU-bound drain. That work is reported beside the drain, not hidden: timed here.
        t0 = time.perf_counter()
        reclaimed = await buf.reclaim()
        reclaim_s = time.perf_counter() - t0
        return fill_s, drain_s, {**flat(uplink.state), "cpu_s": cpu_s, "reclaim_s": reclaim_s,
                                 "reclaimed": reclaimed}
    finally:
        await buf.close()
        (workdir / f"drain-{name}.db").unlink(missing_ok=True)


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


async def bench_drain(kafka: Any, n: int, workdir: Path, batch_max_records: int,
                      kcat_batching: bool = True, rounds: int = 2,
                      warmup_records: int = 200_000) -> dict[str, Any]:
    """Drain and kcat alternately, `rounds` times: on a machine shared with other work the
    load drifts, and alternating keeps that drift from favouring one side of the ratio."""
    now_ms = time.time_ns() // 1_000_000
    pairs = _drain_records(n, now_ms)
    payload_bytes = sum(len(p) for _, p in pairs)
    drains, kcats, per_round = [], [], []
    if warmup_records:
        # A fresh broker's JVM is cold: whichever producer went first paid for its warm-up
        # (round 1's ratio was the lowest in every run). Both warm it, unmeasured.
        warm = pairs[:warmup_records]
        await _drain_once(kafka, warm, now_ms, workdir, batch_max_records, 1_000_000, "warmup")
        warm_topic = f"bench-drain-warmup-{int(time.time())}"
        kafka.create_topic(warm_topic, partitions=3)
        await asyncio.to_thread(_kcat_produce, kafka.bootstrap, warm_topic, warm, workdir)
    for r in range(rounds):
        fill_s, drain_s, state = await _drain_once(kafka, pairs, now_ms, workdir, batch_max_records,
                                                   1_000_000, f"default{r}")
        drains.append((fill_s, drain_s, state, state["cpu_s"]))
        topic = f"bench-drain-kcat-{r}-{int(time.time())}"
        kafka.create_topic(topic, partitions=3)
        c0 = _children_cpu_s()
        kcat_s = await asyncio.to_thread(_kcat_produce, kafka.bootstrap, topic, pairs, workdir)
        kcats.append((kcat_s, _children_cpu_s() - c0))
        per_round.append(round(kcat_s / drain_s, 3))
    if kcat_batching:
        # The same batch limits as kcat (librdkafka's defaults, above): a like-for-like
        # comparison of the two producers rather than of their default batch sizes.
        _, kb_drain_s, kb_state = await _drain_once(kafka, pairs, now_ms, workdir,
                                                    KCAT_BATCH_MAX_RECORDS,
                                                    KCAT_BATCH_MAX_BYTES, "kcat-batching")
    bare_topic = f"bench-drain-kcat-bare-{int(time.time())}"
    kafka.create_topic(bare_topic, partitions=3)
    bare_s = await asyncio.to_thread(_kcat_produce, kafka.bootstrap, bare_topic, pairs, workdir,
                                     False)
    drain_s = sum(d[1] for d in drains)
    kcat_s = sum(k[0] for k in kcats)
    fill_s = drains[0][0]
    uplink_rps = n * rounds / drain_s
    kcat_rps = n * rounds / kcat_s
    state = drains[0][2]
    out = {
        "records": n,
        "rounds": rounds,
        "warmup_records": warmup_records,
        "payload_bytes_per_record": payload_bytes // n,
        "batch_max_records": batch_max_records,
        "buffer_fill_s": round(fill_s, 2),
        "uplink_s": round(drain_s / rounds, 2),
        "uplink_records_per_s": round(uplink_rps),
        "uplink_payload_mb_per_s": round(payload_bytes * rounds / drain_s / 1e6, 2),
        "uplink_wire_bytes_per_record": round(state["bytes"] / n, 1),
        "kcat_s": round(kcat_s / rounds, 2),
        "kcat_records_per_s": round(kcat_rps),
        "kcat_payload_mb_per_s": round(payload_bytes * rounds / kcat_s / 1e6, 2),
        "ratio_uplink_to_kcat": round(uplink_rps / kcat_rps, 3),
        "ratio_uplink_to_kcat_per_round": per_round,
        # CPU per record (all threads of this process during the drains; kcat's own): less
        # sensitive than the rates to other load on the machine. The broker's is in neither.
        "uplink_cpu_us_per_record": round(sum(d[3] for d in drains) / (n * rounds) * 1e6, 2),
        # After each drain: deleting the acknowledged rows, which the buffer does when idle
        # (what of it ran during the drain, in its idle moments, is in uplink_s already).
        "buffer_reclaim_after_drain_s": round(sum(d[2]["reclaim_s"] for d in drains) / rounds, 2),
        "buffer_reclaimed_after_drain": drains[0][2]["reclaimed"],
        "kcat_cpu_us_per_record": round(sum(k[1] for k in kcats) / (n * rounds) * 1e6, 2),
        # kcat without any headers: fewer bytes per record than the uplink sends.
        "kcat_no_headers_records_per_s": round(n / bare_s),
        "ratio_uplink_to_kcat_no_headers": round(uplink_rps / (n / bare_s), 3),
    }
    if kcat_batching:
        out.update({
            "uplink_kcat_batching": {"batch_max_records": KCAT_BATCH_MAX_RECORDS,
                                     "batch_max_bytes": KCAT_BATCH_MAX_BYTES},
            "uplink_kcat_batching_s": round(kb_drain_s, 2),
            "uplink_kcat_batching_records_per_s": round(n / kb_drain_s),
            "uplink_kcat_batching_wire_bytes_per_record": round(kb_state["bytes"] / n, 1),
            "ratio_uplink_kcat_batching_to_kcat": round(n / kb_drain_s / kcat_rps, 3),
        })
    return out


def _telemetry_ticks(ticks: int, now_ms: int) -> list[list[tuple[str, int, list[float]]]]:
    rng = random.Random(2)
    values = [[rng.uniform(100, 400) for _ in range(POINTS)] for _ in range(DEVICES)]
    out = []
    for t in range(ticks):
        tick = []
        for d in range(DEVICES):
            for p in range(POINTS):
                values[d][p] += rng.gauss(0, 0.5)
            tick.append((f"meter{d}", now_ms + t * 1000, list(values[d])))
        out.append(tick)
    return out


def _ddata(ts_ms: int, vals: list[float], aliases: bool) -> bytes:
    msg = pb.Payload(timestamp=ts_ms)
    for p, v in enumerate(vals):
        m = msg.metrics.add(timestamp=ts_ms, datatype=9)
        if aliases:
            m.alias = p + 1
        else:
            m.name = f"point_{p}"
        m.float_value = v
    return msg.SerializeToString()


async def _wire_sparkplug(kafka: Any, ticks: list, aliases: bool, workdir: Path,
                          tick_s: float) -> dict[str, int]:
    topic = f"bench-wire-sp-{'alias' if aliases else 'names'}-{int(time.time())}"
    kafka.create_topic(topic, partitions=1)
    kafka.proxy.restore()
    buf = await AsyncBuffer.open(str(workdir / f"wire-{aliases}.db"),
                                 BufferSettings(100_000_000, 7 * 86400.0))
    settings = KafkaSettings(bootstrap_servers=(kafka.proxied_bootstrap,), linger_s=0.05)
    uplink = KafkaUplink(settings, buf, [Mapping("t", ("spBv1.0/#",), topic)], GATEWAY)
    before = kafka.proxy.bytes()
    task = asyncio.create_task(uplink.run(), name="bench-wire-uplink")
    try:
        last = 0
        for tick in ticks:
            seqs = await buf.append([_record(d, _ddata(ts, vals, aliases), ts)
                                     for d, ts, vals in tick])
            last = seqs[-1]
            await asyncio.sleep(tick_s)
        await asyncio.wait_for(_wait_acked(uplink, last), 300)
    finally:
        await uplink.stop()
        await asyncio.gather(task, return_exceptions=True)
        await buf.close()
    after = kafka.proxy.bytes()
    return {"upstream": after["upstream"] - before["upstream"],
            "downstream": after["downstream"] - before["downstream"]}


async def _wire_json(kafka: Any, ticks: list, tick_s: float) -> dict[str, int]:
    from aiokafka import AIOKafkaProducer

    topic = f"bench-wire-json-{int(time.time())}"
    kafka.create_topic(topic, partitions=1)
    kafka.proxy.restore()
    before = kafka.proxy.bytes()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.proxied_bootstrap, acks="all",
                                linger_ms=50)
    await producer.start()
    try:
        futures = []
        for tick in ticks:
            for dev, ts, vals in tick:
                for p, v in enumerate(vals):
                    doc = {"gateway": GATEWAY, "device": dev, "point": f"point_{p}",
                           "timestamp": ts, "value": round(v, 4), "quality": "good"}
                    futures.append(await producer.send(
                        topic, json.dumps(doc, separators=(",", ":")).encode(),
                        key=f"{GATEWAY}/{dev}".encode()))
            await asyncio.sleep(tick_s)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    after = kafka.proxy.bytes()
    return {"upstream": after["upstream"] - before["upstream"],
            "downstream": after["downstream"] - before["downstream"]}


async def bench_wire(kafka: Any, ticks_n: int, workdir: Path, tick_s: float) -> dict[str, Any]:
    ticks = _telemetry_ticks(ticks_n, time.time_ns() // 1_000_000)
    samples = ticks_n * DEVICES * POINTS
    alias = await _wire_sparkplug(kafka, ticks, True, workdir, tick_s)
    names = await _wire_sparkplug(kafka, ticks, False, workdir, tick_s)
    js = await _wire_json(kafka, ticks, tick_s)

    def per(d: dict[str, int]) -> dict[str, float]:
        return {"upstream_bytes_per_sample": round(d["upstream"] / samples, 2),
                "total_bytes_per_sample": round((d["upstream"] + d["downstream"]) / samples, 2)}

    return {
        "samples": samples,
        "ticks": ticks_n,
        "devices": DEVICES,
        "points_per_device": POINTS,
        "sparkplug_aliases_zstd": per(alias),
        "sparkplug_names_zstd": per(names),
        "json_per_sample_uncompressed": per(js),
        "ratio_json_to_sparkplug_aliases_upstream": round(js["upstream"] / alias["upstream"], 2),
        "ratio_json_to_sparkplug_aliases_total": round(
            (js["upstream"] + js["downstream"]) / (alias["upstream"] + alias["downstream"]), 2),
        "ratio_json_to_sparkplug_names_upstream": round(js["upstream"] / names["upstream"], 2),
    }


async def main_async(args: argparse.Namespace, kafka: Any, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "kafka", "gc_tuned_as_outpost_run": not args.no_gc_tuning}
    if not args.no_gc_tuning:
        tune_gc()  # the uplink runs in this process: tune it the way `outpost run` does
    if not args.skip_drain:
        out["drain"] = await bench_drain(kafka, args.records, workdir, args.batch_max_records,
                                         not args.skip_kcat_batching, args.rounds, args.warmup_records)
    if not args.skip_wire:
        out["wire"] = await bench_wire(kafka, args.ticks, workdir, args.tick_s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (default)")
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--batch-max-records", type=int,
                    default=KafkaSettings.__dataclass_fields__["batch_max_records"].default,
                    help="records per Kafka batch (default: the uplink's)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="uplink drain and kcat alternately this many times (load drifts)")
    ap.add_argument("--warmup-records", type=int, default=200_000,
                    help="records each producer sends, unmeasured, to warm the fresh broker first")
    ap.add_argument("--ticks", type=int, default=60, help="telemetry ticks for the wire figure")
    ap.add_argument("--tick-s", type=float, default=0.2, help="seconds between ticks")
    ap.add_argument("--skip-drain", action="store_true")
    ap.add_argument("--skip-wire", action="store_true")
    ap.add_argument("--skip-kcat-batching", action="store_true",
                    help="skip the second drain with kcat's batch limits")
    ap.add_argument("--no-gc-tuning", action="store_true", help="leave the collector as Python sets it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="outpost-bench-kafka-"))
    stack = Stack(RunDir(workdir / "services"))
    try:
        kafka = stack.kafka
        result = asyncio.run(main_async(args, kafka, workdir))
    finally:
        stack.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
