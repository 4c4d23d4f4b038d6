"""The reference consumer's command line against the real cluster.

Messages with Outpost's headers are written with a plain aiokafka producer, including a
resent run (duplicates), a gap (a lost record) and a message without headers; the CLI's
JSON report must name each, per gateway, and exit 1 because something was lost.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from aiokafka import AIOKafkaProducer

from tests.harness.common import REPO_ROOT
from tests.integration.test_kafka_cluster_support import unique_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _headers(gw: str, stream: str, seq: int) -> list[tuple[str, bytes]]:
    return [("outpost-gateway", gw.encode()), ("outpost-stream", stream.encode()),
            ("outpost-seq", str(seq).encode()), ("outpost-type", b"DDATA")]


async def test_cli_reports_duplicates_gaps_and_malformed(kafka_cluster) -> None:
    topic = unique_topic("consumer-cli")
    await asyncio.to_thread(kafka_cluster.create_topic, topic, 3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_cluster.proxied_bootstrap, acks="all")
    await producer.start()
    try:
        sent = []
        for gw in ("site/a", "site/b"):
            seqs = list(range(1, 301))
            if gw == "site/b":
                seqs.remove(150)  # lost on the way
            for seq in seqs:
                stream = f"{gw}/d{seq % 4}"
                sent.append((gw, stream, seq))
        # A resend: the last 40 of site/a's records again, in their order.
        sent += [m for m in sent if m[0] == "site/a" and m[2] > 260]
        for gw, stream, seq in sent:
            await producer.send(topic, key=stream.encode(), value=b"{}",
                                headers=_headers(gw, stream, seq))
        await producer.send_and_wait(topic, key=b"x", value=b"not from outpost")
    finally:
        await producer.stop()

    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tools.outpost_consumer", "--bootstrap", kafka_cluster.bootstrap,
         "--topic", topic, "--json", "--produced", "site/a=300", "--produced", "site/b=305"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    a, b = report["gateways"]["site/a"], report["gateways"]["site/b"]
    assert (a["delivered_once"], a["duplicates"], a["lost"], a["produced"]) == (300, 40, 0, 300)
    # 150 never arrived, and 301-305 were produced (per --produced) but never sent.
    assert (b["delivered_once"], b["duplicates"], b["lost"], b["produced"]) == (299, 0, 6, 305)
    assert a["streams"] == b["streams"] == 4
    assert report["malformed"] == 1 and report["out_of_order"] == 0
