"""Kafka -> MQTT and Kafka -> device commands end to end, against real Kafka and Mosquitto.

Messages are produced to Kafka; the inbound consumer group republishes them on Mosquitto
(checked by an MQTT subscriber) or turns them into device writes (checked by the write
callback), including a malformed command and a command for an unknown point, which are
committed past: a second consumer in the same group starts after them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from gmqtt import Client as MqttClient

from drivers.base import WriteRejected
from gateway.inbound.kafka_commands import InboundMapping, KafkaInbound
from gateway.uplinks.kafka.uplink import KafkaSettings
from tests.harness.common import until
from tests.helpers import flat
from tests.integration.test_kafka_support import unique_topic

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _settings(kafka) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=(kafka.proxied_bootstrap,), request_timeout_s=20.0,
                         reconnect_min_s=0.2, reconnect_max_s=1.0)


async def _produce(bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in items:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


async def _run(inbound: KafkaInbound):
    return asyncio.create_task(inbound.run(), name=f"kafka-inbound-{inbound.mapping.name}")


async def _stop(inbound: KafkaInbound, task: asyncio.Task) -> None:
    await inbound.stop()
    await asyncio.wait_for(task, 30)


async def test_kafka_to_mqtt_publish(kafka, mosquitto) -> None:
    topic = unique_topic("to-mqtt")
    kafka.create_topic(topic)
    received: list[tuple[str, bytes]] = []

    sub = MqttClient(f"sub-{uuid.uuid4().hex[:8]}")

    def on_message(client, mqtt_topic, payload, qos, properties) -> int:
        received.append((mqtt_topic, payload))
        return 0

    sub.on_message = on_message
    pub = MqttClient(f"pub-{uuid.uuid4().hex[:8]}")
    await sub.connect(mosquitto.host, mosquitto.port)
    await pub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe(f"site/{topic}/#", qos=1)
    await asyncio.sleep(0.3)

    async def publish(mqtt_topic: str, payload: bytes, qos: int) -> None:
        pub.publish(mqtt_topic, payload, qos=qos)

    inbound = KafkaInbound(
        _settings(kafka),
        InboundMapping("to-mqtt", (topic,), f"g-{topic}", "mqtt_publish", "site/{topic}/{key}"),
        publish=publish, auto_offset_reset="earliest",
    )
    task = await _run(inbound)
    try:
        await _produce(kafka.bootstrap, topic, [(b"m1", b"one"), (b"m2", b"two"), (b"m1", b"3")])
        await until(lambda: len(received) >= 3, 45)
        await until(lambda: flat(inbound.state)["published"] == 3, 45)
    finally:
        await _stop(inbound, task)
        await sub.disconnect()
        await pub.disconnect()
    assert received == [(f"site/{topic}/m1", b"one"), (f"site/{topic}/m2", b"two"),
                        (f"site/{topic}/m1", b"3")]
    assert await _committed(kafka.bootstrap, f"g-{topic}", topic) == 3


async def test_kafka_commands_to_device_writes(kafka) -> None:
    topic = unique_topic("commands")
    kafka.create_topic(topic)
    group = f"g-{topic}"
    points = {("meter1", "setpoint"): 0.0, ("meter1", "run"): False}
    writes: list[tuple[str, str, Any]] = []

    async def write(device: str, point: str, value: Any) -> None:
        if (device, point) not in points:
            raise WriteRejected(f"device {device!r} has no writable point {point!r}")
        points[(device, point)] = value
        writes.append((device, point, value))

    def cmd(**kw: Any) -> bytes:
        return json.dumps(kw).encode()

    await _produce(kafka.bootstrap, topic, [
        (None, cmd(device="meter1", point="setpoint", value=21.5)),
        (None, b"{this is not json"),
        (None, cmd(device="meter1", point="no_such_point", value=1)),
        (None, cmd(device="meter1", point="run", value=True)),
    ])
    inbound = KafkaInbound(
        _settings(kafka), InboundMapping("cmds", (topic,), group, "device_command"),
        write=write, auto_offset_reset="earliest",
    )
    task = await _run(inbound)
    try:
        await until(lambda: flat(inbound.state)["received"] == 4, 45)
    finally:
        await _stop(inbound, task)
    assert writes == [("meter1", "setpoint", 21.5), ("meter1", "run", True)]
    st = flat(inbound.state)
    assert (st["written"], st["malformed"], st["rejected"]) == (2, 1, 1)
    # Everything, including the bad commands, was committed past: nothing is redone.
    assert await _committed(kafka.bootstrap, group, topic) == 4

    await _produce(kafka.bootstrap, topic, [(None, cmd(device="meter1", point="setpoint",
                                                       value=19))])
    again = KafkaInbound(
        _settings(kafka), InboundMapping("cmds", (topic,), group, "device_command"),
        write=write, auto_offset_reset="earliest",
    )
    task = await _run(again)
    try:
        await until(lambda: flat(again.state)["received"] >= 1, 45)
    finally:
        await _stop(again, task)
    assert writes[2:] == [("meter1", "setpoint", 19)]
    assert flat(again.state)["received"] == 1
