"""Kafka uplink over a bad cellular link: seconds of latency and a few KB/s.

Kafka is reached only through the Toxiproxy proxy with latency and bandwidth toxics;
every record must arrive, in order per key, and the bytes counted at the proxy must stay
near the compressed size of what was sent.
"""

from __future__ import annotations

import pytest

from gateway.uplinks.kafka.mappings import Mapping
from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
from tests.helpers import flat
from tests.integration.test_kafka_support import (
    GATEWAY_ID,
    Feeder,
    check_delivery,
    kcat_consume_async,
    open_buffer,
    running,
    unique_topic,
    wait_acked,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WINDOW = 100


async def test_seconds_of_latency_and_a_few_kb_per_s(kafka, kcat, tmp_path) -> None:
    topic = unique_topic("slow-link")
    kafka.create_topic(topic, partitions=2)
    proxy = kafka.proxy
    proxy.restore()
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    settings = KafkaSettings(
        bootstrap_servers=(kafka.proxied_bootstrap,),
        linger_s=0.5,
        batch_max_records=WINDOW,
        # A request needs the latency twice plus the transfer at the throttled rate.
        request_timeout_s=15.0,
        reconnect_min_s=0.5,
        reconnect_max_s=2.0,
    )
    uplink = KafkaUplink(settings, buf, [Mapping("telemetry", ("spBv1.0/#",), topic)],
                         GATEWAY_ID)
    proxy.latency(1500, jitter_ms=300)
    proxy.bandwidth(4)  # KB/s each way
    before = proxy.bytes()
    try:
        async with running(uplink) as task:
            await feeder.run_for(6.0, interval_s=0.1)  # 240 readings, ~48 KB of payload
            await wait_acked(uplink, task, feeder.last_seq, limit_s=150)
            state = flat(uplink.state)
    finally:
        proxy.restore()
        await buf.close()
    sent_upstream = proxy.bytes()["upstream"] - before["upstream"]
    messages = await kcat_consume_async(kcat, kafka.bootstrap, topic)
    counts = check_delivery(messages, feeder.appended, max_duplicates=WINDOW)
    # zstd: what crossed the proxy is well below the raw payload bytes.
    raw_payload = 200 * len(feeder.appended)
    assert state["bytes"] < raw_payload
    assert sent_upstream < raw_payload, (sent_upstream, raw_payload, counts)
