"""Kafka inbound: command parsing, topic templates, and commit-after-done handling.

The consumer stand-in hands out scripted messages and records commits, so the order
"handle, then commit" and the skip-but-commit rules are checked without a broker; the
real consumer group is exercised in tests/integration/test_kafka_inbound.py.
"""

from __future__ import annotations

import asyncio
from collections import namedtuple
from typing import Any

import pytest

from drivers.base import DriverError, WriteRejected
from gateway.inbound.kafka_commands import (
    Command,
    CommandError,
    InboundError,
    InboundMapping,
    KafkaInbound,
    parse_command,
    render_topic,
    validate_template,
)
from gateway.uplinks.kafka.uplink import KafkaSettings
from tests.helpers import flat

Msg = namedtuple("Msg", "topic partition offset key value")
TP = namedtuple("TP", "topic partition")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"device":"meter1","point":"setpoint","value":21.5}', Command("meter1", "setpoint", 21.5)),
        (b'{"device":"m","point":"run","value":true,"id":"x"}', Command("m", "run", True)),
        (b'{"device":"m","point":"mode","value":"auto"}', Command("m", "mode", "auto")),
    ],
)
def test_parse_command_accepts_the_documented_shape(raw: bytes, expected: Command) -> None:
    assert parse_command(raw) == expected


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (None, "empty"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"device":"m","value":1}', "missing point"),
        (b'{"device":"","point":"p","value":1}', "device must be"),
        (b'{"device":"m","point":7,"value":1}', "point must be"),
        (b'{"device":"m","point":"p","value":[1]}', "value must be"),
        (b'{"device":"m","point":"p","value":null}', "value must be"),
    ],
)
def test_parse_command_rejects_malformed_input_saying_why(raw, why: str) -> None:
    with pytest.raises(CommandError, match=why):
        parse_command(raw)


def test_topic_templates() -> None:
    validate_template("site/{topic}/{key}/{partition}")
    with pytest.raises(InboundError, match="unknown placeholder"):
        validate_template("site/{device}")
    with pytest.raises(InboundError):
        validate_template("site/{key")
    assert render_topic("plant/{topic}/{key}", topic="cmds", key=b"m1", partition=2) == "plant/cmds/m1"
    assert render_topic("p/{partition}", topic="t", key=None, partition=3) == "p/3"
    with pytest.raises(CommandError, match="not a publishable topic"):
        render_topic("p/{key}", topic="t", key=b"a/#", partition=0)


class ScriptedConsumer:
    def __init__(self, messages: list[Msg]) -> None:
        self.messages = messages
        self.commits: list[tuple[str, int]] = []
        self.events: list[str] = []
        self.kwargs: dict[str, Any] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def getmany(self, timeout_ms: int, max_records: int):
        if not self.messages:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        out: dict[TP, list[Msg]] = {}
        for m in self.messages[:max_records]:
            out.setdefault(TP(m.topic, m.partition), []).append(m)
        del self.messages[:max_records]
        return out

    async def commit(self, offsets: dict[TP, int]) -> None:
        for tp, off in offsets.items():
            self.commits.append((tp.topic, off))
            self.events.append(f"commit {off}")


def _settings() -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=("k:9092",), request_timeout_s=1.0,
                         reconnect_min_s=0.01, reconnect_max_s=0.02)


async def _run(inbound: KafkaInbound, consumer: ScriptedConsumer, until) -> None:
    task = asyncio.create_task(inbound.run(), name="inbound-test")
    try:
        async with asyncio.timeout(10):
            while True:
                if until():
                    break
                await asyncio.sleep(0.01)
    finally:
        await inbound.stop()
        await asyncio.wait_for(task, 5)


async def test_commands_are_written_then_committed_bad_ones_committed_past() -> None:
    cmds = [
        b'{"device":"meter1","point":"setpoint","value":21.5}',
        b"garbage",
        b'{"device":"meter1","point":"nope","value":1}',
        b'{"device":"meter1","point":"flaky","value":2}',
        b'{"device":"meter1","point":"setpoint","value":22}',
    ]
    consumer = ScriptedConsumer([Msg("cmds", 0, i, None, v) for i, v in enumerate(cmds)])
    calls = 0

    async def write(device: str, point: str, value: Any) -> None:
        nonlocal calls
        calls += 1
        consumer.events.append(f"write {point}={value}")
        if point == "nope":
            raise WriteRejected(f"device {device!r}: unknown point {point!r}")
        if point == "flaky" and calls < 5:  # calls 3 and 4 fail
            raise DriverError("timeout on rs485-a", retriable=True)

    inbound = KafkaInbound(
        _settings(),
        InboundMapping("cmds", ("cmds",), "outpost-cmds", "device_command"),
        write=write, consumer_factory=lambda *t, **kw: consumer,
    )
    await _run(inbound, consumer, lambda: len(consumer.commits) == 5)
    assert consumer.events == [
        "write setpoint=21.5", "commit 1",
        "commit 2",  # malformed: nothing written, committed past
        "write nope=1", "commit 3",  # unknown point: rejected, committed past
        "write flaky=2", "write flaky=2", "write flaky=2", "commit 4",  # retried, then written
        "write setpoint=22", "commit 5",
    ]
    st = flat(inbound.state)
    assert (st["received"], st["written"], st["malformed"], st["rejected"], st["failed"]) == (
        5, 3, 1, 1, 0
    )


async def test_unreachable_device_is_failed_after_attempts_and_committed() -> None:
    consumer = ScriptedConsumer([Msg("cmds", 0, 0, None, b'{"device":"d","point":"p","value":1}')])

    async def write(device: str, point: str, value: Any) -> None:
        consumer.events.append("write")
        raise DriverError("no response from unit 3", retriable=True)

    inbound = KafkaInbound(
        _settings(), InboundMapping("c", ("cmds",), "g", "device_command"),
        write=write, write_attempts=2, consumer_factory=lambda *t, **kw: consumer,
    )
    await _run(inbound, consumer, lambda: consumer.commits)
    assert consumer.events == ["write", "write", "commit 1"]
    assert flat(inbound.state)["failed"] == 1


async def test_publish_is_retried_until_the_broker_takes_it_and_only_then_committed() -> None:
    consumer = ScriptedConsumer([Msg("site.in", 1, 7, b"m1", b"payload-1"),
                                 Msg("site.in", 1, 8, b"m2", b"payload-2")])
    published: list[tuple[str, bytes, int]] = []
    failures = 3

    async def publish(topic: str, payload: bytes, qos: int) -> None:
        nonlocal failures
        if failures:
            failures -= 1
            consumer.events.append("publish failed")
            raise ConnectionError("mqtt broker 127.0.0.1:1883 unreachable")
        published.append((topic, payload, qos))
        consumer.events.append(f"published {topic}")

    inbound = KafkaInbound(
        _settings(),
        InboundMapping("in", ("site.in",), "g", "mqtt_publish", "local/{topic}/{key}", qos=1),
        publish=publish, consumer_factory=lambda *t, **kw: consumer,
    )
    await _run(inbound, consumer, lambda: len(consumer.commits) == 2)
    assert consumer.events == ["publish failed"] * 3 + [
        "published local/site.in/m1", "commit 8", "published local/site.in/m2", "commit 9"
    ]
    assert published[0] == ("local/site.in/m1", b"payload-1", 1)


def test_missing_callbacks_are_configuration_errors() -> None:
    with pytest.raises(InboundError, match="needs an MQTT link"):
        KafkaInbound(_settings(), InboundMapping("x", ("t",), "g", "mqtt_publish", "a/{key}"))
    with pytest.raises(InboundError, match="needs devices"):
        KafkaInbound(_settings(), InboundMapping("x", ("t",), "g", "device_command"))
