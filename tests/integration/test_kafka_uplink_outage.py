"""Kafka uplink over a link that fails: cut, blackholed (no RST) and reset, then restored.

Kafka is reached only through the Toxiproxy proxy. Readings keep being appended during
an outage longer than every client timeout configured here; after the link returns, an
independent consumer (kcat) must find every record, in order per key, with duplicates
only from the one window that was in flight.
"""

from __future__ import annotations

import asyncio

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

REQUEST_TIMEOUT_S = 2.0  # delivery deadline is twice this
RECONNECT_MAX_S = 1.0
OUTAGE_S = 10.0  # longer than every timeout above
WINDOW = 200


def _settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=(bootstrap,),
        client_id="outpost-test",
        linger_s=0.05,
        batch_max_records=WINDOW,
        request_timeout_s=REQUEST_TIMEOUT_S,
        reconnect_min_s=0.2,
        reconnect_max_s=RECONNECT_MAX_S,
        metadata_max_age_s=5.0,
    )


@pytest.mark.parametrize("fault", ["cut", "blackhole", "reset_peer"])
async def test_outage_longer_than_every_timeout_loses_nothing(
    kafka, kcat, tmp_path, fault: str
) -> None:
    topic = unique_topic(f"outage-{fault}")
    kafka.create_topic(topic, partitions=3)
    proxy = kafka.proxy
    proxy.restore()
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    uplink = KafkaUplink(
        _settings(kafka.proxied_bootstrap), buf,
        [Mapping("telemetry", ("spBv1.0/+/DDATA/#",), topic)], GATEWAY_ID,
    )
    try:
        async with running(uplink) as task:
            await feeder.run_for(2.0)
            await wait_acked(uplink, task, feeder.last_seq)
            assert flat(uplink.state)["link"] == "up"

            getattr(proxy, fault)()
            await feeder.run_for(OUTAGE_S)
            during = flat(uplink.state)
            assert during["link"] == "down", during
            assert during["last_error"]
            acked_during = during["acked_seq"]
            assert acked_during < feeder.last_seq  # nothing acked that Kafka did not take

            proxy.restore()
            await feeder.run_for(1.0)
            await wait_acked(uplink, task, feeder.last_seq, limit_s=90)
            assert flat(uplink.state)["link"] == "up"
            assert flat(uplink.state)["reconnects"] >= 1
    finally:
        proxy.restore()
        await buf.close()

    messages = await kcat_consume_async(kcat, kafka.bootstrap, topic)
    counts = check_delivery(messages, feeder.appended, max_duplicates=WINDOW)
    assert counts["messages"] >= len(feeder.appended)


async def test_dns_failure_is_reported_and_retried_without_acking(tmp_path) -> None:
    from aiokafka import AIOKafkaProducer

    made: list[AIOKafkaProducer] = []
    third_try = asyncio.Event()

    def factory(**kwargs):
        made.append(AIOKafkaProducer(**kwargs))
        if len(made) >= 3:  # it keeps trying, with backoff
            third_try.set()
        return made[-1]

    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    await feeder.tick()
    uplink = KafkaUplink(
        _settings("kafka.invalid:9092"), buf,
        [Mapping("telemetry", ("spBv1.0/#",), "t")], GATEWAY_ID, producer_factory=factory,
    )
    try:
        async with running(uplink):
            await asyncio.wait_for(third_try.wait(), 30)
            state = flat(uplink.state)
        assert state["link"] == "down"
        assert "bootstrap" in state["last_error"]
        assert state["acked_seq"] is None
        assert (await buf.stats())["cursors"]["kafka"]["records"] == 4
    finally:
        await buf.close()
