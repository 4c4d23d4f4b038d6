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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from drivers.base import DriverError, WriteRejected
from gateway.errors import OutpostError
from gateway.uplinks.kafka import KafkaSettings, backoff_delay, client_kwargs
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


def _default_consumer_factory(*topics: str, **kwargs: Any) -> Any:
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **kwargs)


class _Stopping(Exception):
    pass


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
        self._consumer_factory = consumer_factory or _default_consumer_factory
        self._stopping = asyncio.Event()
        self._consumer: Any = None
        self._counts = dict.fromkeys(
            ("received", "published", "written", "malformed", "rejected", "failed"), 0
        )
        self._link = "down"
        self._since = time.time()
        self._last_error: str | None = None

    def state(self) -> dict[str, Any]:
        return {
            "name": self.mapping.name,
            "group_id": self.mapping.group_id,
            "link": self._link,
            "since": self._since,
            **self._counts,
            "last_error": self._last_error,
        }

    async def stop(self) -> None:
        """Ask `run()` to return after the message in hand (its owner awaits the task)."""
        self._stopping.set()

    async def run(self) -> None:
        from aiokafka.errors import KafkaError

        attempt = 0
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
                self._set_link("up")
                attempt = 0
                await self._consume(consumer)
            except _Stopping:
                break
            except (KafkaError, OSError, TimeoutError) as exc:
                self._set_link("down", exc)
                delay = backoff_delay(attempt, self._s.reconnect_min_s, self._s.reconnect_max_s)
                attempt += 1
                await self._sleep(delay)
            finally:
                try:
                    await asyncio.wait_for(consumer.stop(), timeout=self._s.request_timeout_s + 5)
                except Exception as exc:
                    log.warning("kafka inbound %r: consumer did not close: %s",
                                self.mapping.name, exc)
        self._set_link("stopped")

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
                        log.warning("kafka inbound %r: commit failed (%s)", self.mapping.name, exc)
                        return

    async def _handle(self, msg: Any) -> None:
        self._counts["received"] += 1
        where = f"kafka inbound {self.mapping.name!r} {msg.topic}[{msg.partition}]@{msg.offset}"
        try:
            if self.mapping.action == "mqtt_publish":
                await self._do_publish(msg, where)
            else:
                await self._do_command(msg, where)
        except CommandError as exc:
            self._counts["malformed"] += 1
            log.warning("%s: skipped: %s", where, exc)

    async def _do_publish(self, msg: Any, where: str) -> None:
        assert self._publish is not None and self.mapping.mqtt_topic_template is not None
        topic = render_topic(
            self.mapping.mqtt_topic_template, topic=msg.topic, key=msg.key, partition=msg.partition
        )
        attempt = 0
        while True:
            try:
                await self._publish(topic, msg.value or b"", self.mapping.qos)
                self._counts["published"] += 1
                return
            except Exception as exc:
                # The local broker is down or restarting: hold this partition until it is back.
                if attempt == 0:
                    log.warning("%s: publish to MQTT %r failed, retrying: %s", where, topic, exc)
                self._last_error = f"publish {topic!r}: {exc}"
                await self._sleep(backoff_delay(attempt, 0.2, 10.0))
                attempt += 1
                if self._stopping.is_set():
                    raise _Stopping from None

    async def _do_command(self, msg: Any, where: str) -> None:
        assert self._write is not None
        cmd = parse_command(msg.value, where="")
        for attempt in range(self._write_attempts):
            try:
                value = cmd.value if self._specs is None else check_write(self._specs, cmd.device, cmd.point, cmd.value)
                await self._write(cmd.device, cmd.point, value)
                self._counts["written"] += 1
                log.info("%s: wrote %r to %s.%s", where, cmd.value, cmd.device, cmd.point)
                return
            except WriteRejected as exc:
                self._counts["rejected"] += 1
                self._last_error = f"{cmd.device}.{cmd.point}: {exc}"
                log.warning("%s: write %s.%s = %r rejected: %s",
                            where, cmd.device, cmd.point, cmd.value, exc)
                return
            except DriverError as exc:
                self._last_error = f"{cmd.device}.{cmd.point}: {exc}"
                if not exc.retriable or attempt + 1 == self._write_attempts:
                    self._counts["failed"] += 1
                    log.error("%s: write %s.%s = %r failed: %s",
                              where, cmd.device, cmd.point, cmd.value, exc)
                    return
                await self._sleep(backoff_delay(attempt, 0.5, 5.0))

    def _set_link(self, link: str, exc: BaseException | None = None) -> None:
        if exc is not None:
            text = str(exc) or type(exc).__name__
            if self._link == "up" or text != self._last_error:
                log.warning("kafka inbound %r to %s is down: %s",
                            self.mapping.name, self._s.where, text)
            self._last_error = text
        elif link == "up" and self._link != "up":
            log.info("kafka inbound %r consuming %s", self.mapping.name,
                     ",".join(self.mapping.kafka_topics))
        if link != self._link:
            self._link = link
            self._since = time.time()

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
