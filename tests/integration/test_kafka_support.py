"""Shared helpers for the Kafka integration tests (no tests here).

An independent consumer (kcat) reads what reached the broker; `check_delivery` applies
what a consumer of Outpost's topics does with the de-duplication headers and checks the
delivery promise: every appended record present, in order per key, and duplicates only
from one resent window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from buffer import AsyncBuffer, BufferSettings, NewRecord
from gateway.uplinks.kafka.format import H_GATEWAY, H_SEQ, H_STREAM
from gateway.uplinks.kafka.uplink import KafkaUplink
from tests.helpers import flat

GATEWAY_ID = "plant-7/pump-3"


def unique_topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ddata(device: str, i: int, rng: random.Random | None = None) -> NewRecord:
    """A ~200-byte record shaped like a buffered Sparkplug DDATA (opaque bytes here)."""
    rng = rng or random.Random(i)
    body = f"{device}:{i}:" + ",".join(f"{rng.uniform(0, 500):.3f}" for _ in range(20))
    return NewRecord(
        stream=f"{GATEWAY_ID}/{device}",
        payload=body.encode()[:200].ljust(200, b" "),
        ts_ms=time.time_ns() // 1_000_000,  # now: older ones fall to the buffer's max age
        headers={
            "topic": f"spBv1.0/plant-7/DDATA/pump-3/{device}",
            "type": "DDATA",
            "gateway": GATEWAY_ID,
        },
    )


async def open_buffer(path: str) -> AsyncBuffer:
    return await AsyncBuffer.open(path, BufferSettings(500_000_000, 7 * 86400.0))


@dataclass
class Feeder:
    """Appends readings for a few devices at a steady pace, like live drivers would."""

    buf: AsyncBuffer
    devices: tuple[str, ...] = ("meter1", "meter2", "meter3", "pump")
    appended: list[tuple[str, int]] = field(default_factory=list)  # (stream, seq)
    _i: int = 0

    async def tick(self, per_device: int = 1) -> None:
        recs = []
        for _ in range(per_device):
            for d in self.devices:
                recs.append(ddata(d, self._i))
                self._i += 1
        seqs = await self.buf.append(recs)
        self.appended.extend((r.stream, s) for r, s in zip(recs, seqs, strict=True))

    async def run_for(self, seconds: float, interval_s: float = 0.1, per_device: int = 1) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await self.tick(per_device)
            await asyncio.sleep(interval_s)

    @property
    def last_seq(self) -> int:
        return self.appended[-1][1]


@contextlib.asynccontextmanager
async def running(uplink: KafkaUplink) -> AsyncIterator[asyncio.Task[None]]:
    """Run the uplink as a task owned by the test; stop, cancel and await it after."""
    task = asyncio.create_task(uplink.run(), name="kafka-uplink")
    try:
        yield task
    finally:
        await uplink.stop()
        if not task.done():
            task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        if results and isinstance(results[0], Exception):
            raise results[0]


async def wait_acked(uplink: KafkaUplink, task: asyncio.Task[None], seq: int,
                     limit_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while True:
        acked = flat(uplink.state)["acked_seq"] or 0
        if acked >= seq:
            return
        if task.done():
            task.result()
            raise AssertionError("uplink stopped early")
        if loop.time() > end:
            raise AssertionError(f"uplink acked up to {acked}, not {seq}, within {limit_s}s; "
                                 f"state {flat(uplink.state)}")
        await asyncio.sleep(0.1)


def kcat_consume(kcat: str, bootstrap: str, topic: str, *extra: str) -> list[dict[str, Any]]:
    """Every message of `topic` read by kcat (an independent librdkafka consumer)."""
    done = subprocess.run(
        [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-J", "-q",
         "-X", "topic.metadata.refresh.interval.ms=1000", *extra],
        capture_output=True, timeout=120, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kcat failed ({done.returncode}): {done.stderr.decode()[-2000:]}")
    out = []
    for line in done.stdout.decode().splitlines():
        if line.strip():
            msg = json.loads(line)
            h = msg.get("headers") or []
            msg["headers"] = dict(zip(h[0::2], h[1::2], strict=True))
            out.append(msg)
    return out


async def kcat_consume_async(kcat: str, bootstrap: str, topic: str) -> list[dict[str, Any]]:
    return await asyncio.to_thread(kcat_consume, kcat, bootstrap, topic)


def check_delivery(messages: list[dict[str, Any]], appended: list[tuple[str, int]],
                   max_duplicates: int) -> dict[str, int]:
    """Assert the delivery promise; returns counts for the test's own checks.

    `max_duplicates` bounds the duplicates within each partition (one batch's worth).
    """
    expected: dict[str, list[int]] = {}
    for stream, seq in appended:
        expected.setdefault(stream, []).append(seq)
    got: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    duplicates = 0
    per_partition: dict[int, int] = {}
    for m in sorted(messages, key=lambda m: (m["partition"], m["offset"])):
        h = m["headers"]
        assert h[H_GATEWAY] == GATEWAY_ID
        stream, seq = h[H_STREAM], int(h[H_SEQ])
        assert m["key"] == stream, f"key {m['key']!r} is not the device path {stream!r}"
        if (stream, seq) in seen:
            duplicates += 1  # a consumer drops it thanks to the headers
            per_partition[m["partition"]] = per_partition.get(m["partition"], 0) + 1
            continue
        seen.add((stream, seq))
        got.setdefault(stream, []).append(seq)
    for stream, seqs in expected.items():
        have = got.get(stream, [])
        missing = sorted(set(seqs) - set(have))
        assert not missing, f"{stream}: {len(missing)} records lost, first {missing[:10]}"
        assert have == sorted(have), f"{stream}: out of order after de-duplication"
    # Kafka batches are per partition: a resend repeats at most the one batch per partition
    # that the broker had appended when the link failed.
    worst = max(per_partition.values(), default=0)
    assert worst <= max_duplicates, f"{per_partition} duplicates per partition > {max_duplicates}"
    return {"messages": len(messages), "duplicates": duplicates}
