"""Kafka -> MQTT and Kafka -> device commands (the `[[kafka.inbound]]` config section).

Each inbound mapping is one consumer group reading its Kafka topics. Action
`mqtt_publish` republishes every message on the local MQTT broker at a topic rendered from
`mqtt_topic_template` ({topic}, {key}, {partition}); action `device_command` takes JSON
`{"device": ..., "point": ..., "value": ...}` and performs the same checked write a
Sparkplug DCMD would.

Offsets are committed only after the publish or the write is done, so a crash or a lost
link means the message is handled again (at least once), never skipped. A publish that
fails (local broker down) is retried until it succeeds: later messages wait behind it to
keep order. Bad input never blocks the partition: a malformed command, a command for an
unknown device or point, or a value the point refuses (`drivers.base.WriteRejected`) is
logged, counted and committed past; a device that stays unreachable for `write_attempts`
tries is counted as failed and committed past, since a command is not data to keep.

A new consumer group starts at the latest offset (`auto_offset_reset = "latest"`): a
gateway put into service must not replay a topic's history of commands to its devices.
"""

from __future__ import annotations

import asyncio
import logging
import string
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from common.backoff import Backoff
from common.logs import fields
from drivers.base import DriverError, WriteRejected
from gateway.errors import OutpostError, UplinkError
from gateway.uplinks.core import UplinkState
from gateway.uplinks.kafka.adapter import client_kwargs, new_consumer
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.writes import CommandJsonError, Specs, check_write, loads_command_json

log = logging.getLogger(__name__)

PublishFn = Callable[[str, bytes, int], Awaitable[None]]  # (mqtt topic, payload, qos)
WriteFn = Callable[[str, str, Any], Awaitable[None]]  # (device, point, value)

_TEMPLATE_FIELDS = {"topic", "key", "partition"}


class InboundError(OutpostError):
    """Root of the Kafka inbound errors."""


class CommandError(InboundError):
    """A Kafka command message is malformed; it is skipped, never retried."""


@dataclass(frozen=True, slots=True)
class Command:
    device: str
    point: str
    value: bool | int | float | str


def parse_command(raw: bytes | None, where: str = "") -> Command:
    """Parse `{"device": ..., "point": ..., "value": ...}`; raises CommandError naming why."""
    prefix = f"{where}: " if where else ""
    if raw is None:
        raise CommandError(f"{prefix}empty message (no value)")
    try:
        doc = loads_command_json(raw)  # NaN, Infinity and 5000-digit numbers are refused
    except CommandJsonError as exc:
        raise CommandError(f"{prefix}{exc}") from None
    if not isinstance(doc, dict):
        raise CommandError(f"{prefix}expected a JSON object, got {type(doc).__name__}")
    missing = [k for k in ("device", "point", "value") if k not in doc]
    if missing:
        raise CommandError(f"{prefix}missing {', '.join(missing)}")
    device, point, value = doc["device"], doc["point"], doc["value"]
    for name, v in (("device", device), ("point", point)):
        if not isinstance(v, str) or not v:
            raise CommandError(f"{prefix}{name} must be a non-empty string, got {v!r}")
    if not isinstance(value, bool | int | float | str):
        raise CommandError(
            f"{prefix}value must be a number, boolean or string, got {type(value).__name__}"
        )
    return Command(device, point, value)


def validate_template(template: str) -> None:
    """Raise InboundError unless `template` only uses {topic}, {key} and {partition}."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise InboundError(f"mqtt_topic_template {template!r}: {exc}") from None
    unknown = fields - _TEMPLATE_FIELDS
    if unknown:
        raise InboundError(
            f"mqtt_topic_template {template!r}: unknown placeholder(s) {sorted(unknown)}; "
            f"use {{topic}}, {{key}} or {{partition}}"
        )


def render_topic(template: str, *, topic: str, key: bytes | None, partition: int) -> str:
    """The MQTT topic for one Kafka message; raises CommandError if it is not publishable."""
    key_text = "" if key is None else key.decode("utf-8", "replace")
    out = template.format(topic=topic, key=key_text, partition=partition)
    if not out or "+" in out or "#" in out or "\x00" in out:
        raise CommandError(
            f"template {template!r} gives {out!r} for key {key_text!r}: not a publishable topic"
        )
    return out


@dataclass(frozen=True, slots=True)
class InboundMapping:
    name: str
    kafka_topics: tuple[str, ...]
    group_id: str
    action: Literal["mqtt_publish", "device_command"]
    mqtt_topic_template: str | None = None
    qos: int = 1

    def __post_init__(self) -> None:
        if self.action == "mqtt_publish":
            if not self.mqtt_topic_template:
                raise InboundError(f"kafka inbound {self.name!r}: mqtt_publish needs a template")
            validate_template(self.mqtt_topic_template)

    @classmethod
    def from_config(cls, section: Any, default_name: str = "") -> InboundMapping:
        return cls(
            name=section.name or default_name or section.group_id,
            kafka_topics=tuple(section.kafka_topics),
            group_id=section.group_id,
            action=section.action,
            mqtt_topic_template=section.mqtt_topic_template,
            qos=section.qos,
        )


class _Stopping(Exception):
    pass


COUNTERS = ("received", "published", "written", "malformed", "rejected", "failed", "refused")


class KafkaInbound:
    """One inbound mapping: a consumer group feeding MQTT publishes or device writes."""

    def __init__(
        self,
        settings: KafkaSettings,
        mapping: InboundMapping,
        *,
        publish: PublishFn | None = None,
        write: WriteFn | None = None,
        auto_offset_reset: str = "latest",
        write_attempts: int = 3,
        consumer_factory: Callable[..., Any] | None = None,
        specs: Specs | None = None,
    ) -> None:
        if mapping.action == "mqtt_publish" and publish is None:
            raise InboundError(f"kafka inbound {mapping.name!r}: mqtt_publish needs an MQTT link")
        if mapping.action == "device_command" and write is None:
            raise InboundError(f"kafka inbound {mapping.name!r}: device_command needs devices")
        self._s = settings
        self.mapping = mapping
        self._publish = publish
        self._write = write
        self._specs = specs  # gateway.writes: the check DCMD applies, before any attempt
        self._auto_offset_reset = auto_offset_reset
        self._write_attempts = max(1, write_attempts)
        self._consumer_factory = consumer_factory or new_consumer
        self._stopping = asyncio.Event()
        self._consumer: Any = None
        self.state = UplinkState(f"inbound:{mapping.name}", counters=COUNTERS, logger=log)
        self.state.server = settings.where
        self.state.extra.update({"name": mapping.name, "group_id": mapping.group_id})
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)

    async def stop(self) -> None:
        """Ask `run()` to return after the message in hand (its owner awaits the task)."""
        self._stopping.set()

    async def run(self) -> None:
        from aiokafka.errors import KafkaError

        while not self._stopping.is_set():
            consumer = self._consumer_factory(
                *self.mapping.kafka_topics,
                group_id=self.mapping.group_id,
                enable_auto_commit=False,
                auto_offset_reset=self._auto_offset_reset,
                **client_kwargs(self._s),
            )
            try:
                await asyncio.wait_for(consumer.start(), timeout=self._s.request_timeout_s + 5)
                self.state.link_up(self._s.where)
                self._backoff.reset()
                await self._consume(consumer)
            except _Stopping:
                break
            except (KafkaError, OSError, TimeoutError) as exc:
                self.state.link_down(str(exc) or type(exc).__name__)
                await self._sleep(self._backoff.next())
            finally:
                try:
                    await asyncio.wait_for(consumer.stop(), timeout=self._s.request_timeout_s + 5)
                except Exception as exc:
                    log.warning("kafka inbound consumer did not close",
                                extra=fields(inbound=self.mapping.name, reason=str(exc)))
        self.state.stopped()

    async def _consume(self, consumer: Any) -> None:
        from aiokafka.errors import CommitFailedError

        while not self._stopping.is_set():
            batch = await consumer.getmany(timeout_ms=500, max_records=100)
            for tp, messages in batch.items():
                for msg in messages:
                    await self._handle(msg)
                    try:
                        # One commit per message: a command is a side effect, so after a
                        # crash at most the one in hand runs again.
                        await consumer.commit({tp: msg.offset + 1})
                    except CommitFailedError as exc:
                        # The group rebalanced; the new owner resumes from the last commit.
                        log.warning("kafka inbound commit failed",
                                    extra=fields(inbound=self.mapping.name, reason=str(exc)))
                        return

    async def _handle(self, msg: Any) -> None:
        """Handle one message; nothing it can contain stops the partition (DESIGN rule 7)."""
        self.state.count("received")
        where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
        try:
            if self.mapping.action == "mqtt_publish":
                await self._do_publish(msg, where)
            else:
                await self._do_command(msg, where)
        except (_Stopping, asyncio.CancelledError):
            raise
        except CommandError as exc:
            self.state.count("malformed")
            self.state.error(f"malformed:{type(exc).__name__}", "kafka command skipped",
                             inbound=self.mapping.name, where=where, reason=str(exc))
        except Exception as exc:  # whatever else one message causes, it is counted and passed
            self.state.count("malformed")
            self.state.error(f"crash:{type(exc).__name__}", "kafka message could not be handled, skipped",
                             inbound=self.mapping.name, where=where,
                             reason=f"{type(exc).__name__}: {exc}")

    async def _do_publish(self, msg: Any, where: str) -> None:
        assert self._publish is not None and self.mapping.mqtt_topic_template is not None
        topic = render_topic(
            self.mapping.mqtt_topic_template, topic=msg.topic, key=msg.key, partition=msg.partition
        )
        backoff = Backoff(0.2, 10.0)
        while True:
            try:
                await self._publish(topic, msg.value or b"", self.mapping.qos)
                self.state.count("published")
                return
            except UplinkError as exc:
                if not exc.retriable:  # refused for this message (too large): never deliverable
                    self.state.count("refused")
                    self.state.error(f"refused:{topic}", "kafka message refused by MQTT, skipped",
                                     inbound=self.mapping.name, where=where, topic=topic, reason=str(exc))
                    return
                failure: Exception = exc
            except Exception as exc:
                failure = exc
            # The local broker is down, restarting or refusing this topic: hold this
            # partition (order) until it takes the message.
            self.state.error(f"publish:{topic}", "publish to MQTT failed, retrying",
                             inbound=self.mapping.name, where=where, topic=topic, reason=str(failure))
            await self._sleep(backoff.next())
            if self._stopping.is_set():
                raise _Stopping from None

    async def _do_command(self, msg: Any, where: str) -> None:
        assert self._write is not None
        cmd = parse_command(msg.value, where="")
        backoff = Backoff(0.5, 5.0)
        for attempt in range(self._write_attempts):
            try:
                value = cmd.value if self._specs is None else check_write(self._specs, cmd.device, cmd.point, cmd.value)
                await self._write(cmd.device, cmd.point, value)
                self.state.count("written")
                log.info("kafka command written", extra=fields(
                    inbound=self.mapping.name, where=where, device=cmd.device, point=cmd.point,
                    value=value))
                return
            except WriteRejected as exc:
                self.state.count("rejected")
                self.state.error(f"rejected:{cmd.device}.{cmd.point}", "kafka command rejected",
                                 inbound=self.mapping.name, where=where, device=cmd.device,
                                 point=cmd.point, value=cmd.value, reason=str(exc))
                return
            except DriverError as exc:
                if not exc.retriable or attempt + 1 == self._write_attempts:
                    self.state.count("failed")
                    self.state.error(f"failed:{cmd.device}.{cmd.point}", "kafka command write failed",
                                     inbound=self.mapping.name, where=where, device=cmd.device,
                                     point=cmd.point, value=cmd.value, reason=str(exc))
                    return
                await self._sleep(backoff.next())

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass


def inbound_from_config(
    section: Any,
    settings: KafkaSettings,
    *,
    publish: PublishFn | None,
    write: WriteFn | None,
    specs: Specs | None = None,
) -> list[KafkaInbound]:
    """One KafkaInbound per `[[kafka.inbound]]` entry of the lead's KafkaSection."""
    return [
        KafkaInbound(
            settings,
            InboundMapping.from_config(s, default_name=f"inbound[{i}]"),
            publish=publish,
            write=write,
            specs=specs,
        )
        for i, s in enumerate(section.inbound)
    ]
