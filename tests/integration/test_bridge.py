"""The local MQTT bridge, end to end through `outpost run`.

Messages that other clients publish on the site broker reach Kafka through the buffer
(mappings with subscribe = true), and an inbound mapping publishes Kafka messages to MQTT.
Checked with kcat, an independent consumer, and a plain MQTT subscriber.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from gmqtt import Client

from tests.harness.common import until
from tests.harness.gateway import GatewayProcess
from tests.integration.test_kafka_support import kcat_consume_async

pytestmark = pytest.mark.integration


def _config(tmp: Path, mosquitto, kafka, bridged_topic: str, inbound_topic: str) -> str:
    return f"""
[gateway]
group_id = "bridge-test"
edge_node_id = "gw"
data_dir = "{tmp / "data"}"

[mqtt]
servers = ["mqtt://{mosquitto.host}:{mosquitto.port}"]
client_id = "outpost-bridge-test-{uuid.uuid4().hex[:6]}"

[kafka]
bootstrap_servers = ["{kafka.bootstrap}"]
request_timeout = "10s"
[[kafka.mappings]]
name = "site-flow"
mqtt_topic_filters = ["site/+/flow"]
kafka_topic = "{bridged_topic}"
format = "raw"
key = "topic"
subscribe = true
[[kafka.inbound]]
name = "to-mqtt"
kafka_topics = ["{inbound_topic}"]
group_id = "outpost-bridge-test-{uuid.uuid4().hex[:6]}"
action = "mqtt_publish"
mqtt_topic_template = "site/cmd/{{key}}"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"
"""


async def _client(mosquitto, name: str) -> Client:
    c = Client(f"{name}-{uuid.uuid4().hex[:6]}")
    await c.connect(mosquitto.host, mosquitto.port)
    return c


async def test_bridged_topics_reach_kafka_and_kafka_reaches_mqtt(tmp_path, mosquitto, kafka, kcat) -> None:
    bridged, inbound = f"bridged-{uuid.uuid4().hex[:8]}", f"inbound-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(bridged)
    kafka.create_topic(inbound)
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, mosquitto, kafka, bridged, inbound))
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log")
    gateway.start()
    received: list[tuple[str, bytes]] = []
    sub = await _client(mosquitto, "cmd-sub")
    sub.on_message = lambda _c, topic, payload, _qos, _p: received.append((topic, payload)) or 0
    sub.subscribe("site/cmd/#", qos=1)
    pub = await _client(mosquitto, "sensor")
    try:
        # Wait until the bridge subscribed: the log says so.
        await until(
            lambda: b'msg="link up" uplink=bridge' in (tmp_path / "gateway.log").read_bytes(),
            30, "bridge up", interval_s=0.5,
        )
        for i in range(20):
            pub.publish(f"site/pump{i % 2}/flow", f"flow={i}".encode(), qos=1)
            await asyncio.sleep(0.02)  # stay under the broker's receive maximum
        pub.publish("site/pump0/other", b"not mapped", qos=1)

        async def bridged_arrived() -> bool:
            return len(await kcat_consume_async(kcat, kafka.bootstrap, bridged)) >= 20

        await until(bridged_arrived, 60, "bridged messages in Kafka", interval_s=0.5)
        msgs = await kcat_consume_async(kcat, kafka.bootstrap, bridged)
        assert len(msgs) == 20, [m["payload"] for m in msgs]
        by_topic: dict[str, list[str]] = {}
        for m in msgs:
            assert m["headers"]["outpost-type"] == "bridged"
            assert m["key"] == m["headers"]["outpost-topic"]
            by_topic.setdefault(m["key"], []).append(m["payload"])
        # Order kept per source topic; nothing unmapped went through.
        assert by_topic["site/pump0/flow"] == [f"flow={i}" for i in range(0, 20, 2)]
        assert by_topic["site/pump1/flow"] == [f"flow={i}" for i in range(1, 20, 2)]

        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(inbound, b"open valve", key=b"valve7")
        finally:
            await producer.stop()

        async def command_arrived() -> bool:
            return ("site/cmd/valve7", b"open valve") in received

        await until(command_arrived, 60, "command on MQTT", interval_s=0.5)
    finally:
        await pub.disconnect()
        await sub.disconnect()
        returncode = await gateway.stop()
    assert returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]
