"""The local MQTT bridge: other clients' topics into the buffer, Kafka messages out to MQTT.

Kafka mappings with `subscribe = true` ask Outpost to carry messages that *other* clients
publish on the site broker to Kafka, with the same store-and-forward promise as Outpost's
own data. The bridge subscribes to those filters at QoS 1 on a persistent session (the
broker queues for us while we restart) and acknowledges a message only after it is
committed to the buffer: gmqtt sends the PUBACK when our async handler returns.

It also gives inbound Kafka mappings with `action = "mqtt_publish"` a publish that returns
only after the broker's PUBACK *with a success reason code*, so their offsets are committed
after delivery and never for a publish the broker refused.

This is a separate MQTT connection from the Sparkplug edge node on purpose (the edge node's
session must be clean, the bridge's persistent), on the same client layer
(gateway.uplinks.mqtt.client), backoff and uplink contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from buffer import NewRecord
from common.backoff import Backoff
from common.logs import fields
from gateway.config import OutpostConfig
from gateway.errors import UplinkError
from gateway.records import H_GATEWAY, H_TOPIC, H_TYPE, TYPE_BRIDGED
from gateway.uplinks.core import Outcome, UplinkState
from gateway.uplinks.kafka.mappings import MappingTable
from gateway.uplinks.mqtt.client import (
    MqttClientSettings,
    MqttConnection,
    ServerList,
    puback_outcome,
    reason_text,
)

log = logging.getLogger("outpost.bridge")

BRIDGE_FLUSH_S = 0.05
COUNTERS = ("bridged", "published", "refused", "connects")


class BridgeError(UplinkError):
    retriable = True


class PublishRefused(UplinkError):
    """The broker answered the publish with a failure reason code: not delivered."""

    def __init__(self, topic: str, code: int) -> None:
        self.code = code
        self.outcome = puback_outcome(code)
        # Refused for this destination (ACL, quota): hold and retry; for this message: skip.
        self.retriable = self.outcome is not Outcome.REFUSED_RECORD
        super().__init__(f"publish to {topic!r} refused: PUBACK {reason_text(code)}")


def is_own_topic(topic: str, group_id: str, edge_node_id: str) -> bool:
    """True for this edge node's own Sparkplug topics (they reach Kafka from the buffer).

    Matched by whole topic levels: `spBv1.0/<group>/<type>/<edge_node>[/<device>]`, so node
    `gw1` never swallows the topics of node `gw12` or of a device named `gw1-meter`.
    """
    levels = topic.split("/")
    return (len(levels) in (4, 5) and levels[0] == "spBv1.0" and levels[1] == group_id
            and levels[3] == edge_node_id)


class LocalBridge:
    def __init__(self, cfg: OutpostConfig, password: str | None, buffer: Any, table: MappingTable) -> None:
        assert cfg.mqtt is not None
        self.cfg = cfg
        self.mqtt = cfg.mqtt
        self.settings = MqttClientSettings.from_config(cfg.mqtt, password)
        self.buffer = buffer
        self.filters = sorted({f for m in table.mappings if m.subscribe for f in m.mqtt_topic_filters})
        self.gateway_id = cfg.gateway.gateway_id
        base = self.mqtt.client_id or f"outpost-{cfg.gateway.group_id}-{cfg.gateway.edge_node_id}"
        self.client_id = f"{base}-bridge"
        self._servers = ServerList(self.settings.servers)
        self._conn: MqttConnection | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._pending: list[tuple[NewRecord, asyncio.Future[None]]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._backoff = Backoff(self.mqtt.reconnect_min, self.mqtt.reconnect_max)
        self.state = UplinkState("bridge", counters=COUNTERS, logger=log)
        self.state.extra["filters"] = self.filters

    async def stop(self) -> None:
        self._stop.set()
        if self._conn is not None:
            self._conn.lost.set()

    async def run(self) -> None:
        self._flush_task = asyncio.create_task(self._flush_loop(), name="outpost:bridge-flush")
        try:
            while not self._stop.is_set():
                url = self._servers.current
                established = False
                try:
                    established = await self._session(url)
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.state.link_down(f"{type(e).__name__}: {e}", server=url)
                finally:
                    self._connected.clear()
                    await self._drop()
                if self._stop.is_set():
                    break
                if established:
                    self._backoff.reset()
                else:
                    self._servers.advance()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self._backoff.next())
        finally:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task
            self.state.stopped()

    async def _session(self, url: str) -> bool:
        conn = MqttConnection(self.settings, self.client_id, clean_session=False,
                              session_expiry_s=7 * 86400, on_message=self._on_message)
        self._conn = conn
        await conn.open(url)
        if self.filters:
            await conn.subscribe(self.filters, qos=1)
        self.state.count("connects")
        self._connected.set()
        self.state.link_up(url)
        await conn.lost.wait()
        if not self._stop.is_set():
            code = conn.disconnect_code
            raise BridgeError("connection lost" + (f" (DISCONNECT {reason_text(code)})" if code else ""))
        return True

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)

    async def _on_message(self, topic: str, payload: bytes, qos: int, _props: Any) -> int:
        # Outpost's own Sparkplug traffic reaches Kafka from the buffer already; do not store it twice.
        if is_own_topic(topic, self.cfg.gateway.group_id, self.cfg.gateway.edge_node_id):
            return 0
        rec = NewRecord(
            stream=topic,
            payload=bytes(payload),
            ts_ms=time.time_ns() // 1_000_000,
            headers={H_TOPIC: topic, H_TYPE: TYPE_BRIDGED, H_GATEWAY: self.gateway_id},
        )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((rec, fut))
        await fut  # PUBACK goes out when this returns: after the commit
        return 0

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(BRIDGE_FLUSH_S)
            if not self._pending:
                continue
            batch, self._pending = self._pending, []
            try:
                await self.buffer.append([r for r, _ in batch])
            except Exception as e:
                # Not acknowledged: the broker redelivers on the persistent session.
                self.state.error("store", "bridged messages not stored", count=len(batch), reason=str(e))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(BridgeError(str(e)))
                if self._conn is not None:
                    self._conn.lost.set()
                continue
            self.state.count("bridged", len(batch))
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish; returns once the broker acknowledged it (QoS 1) or it was sent (QoS 0).

        Raises PublishRefused when the broker's PUBACK carries a failure reason code.
        """
        try:
            await asyncio.wait_for(self._connected.wait(), 30.0)
        except TimeoutError:
            raise BridgeError(f"MQTT bridge not connected: {self.state.last_error or 'connecting'}") from None
        conn = self._conn
        if conn is None:
            raise BridgeError("MQTT bridge not connected")
        code = await conn.publish_and_wait(topic, payload, qos, 30.0)
        if puback_outcome(code) is not Outcome.DELIVERED:
            self.state.count("refused")
            self.state.refuse(topic, f"PUBACK {reason_text(code)}")
            log.warning("bridge publish refused", extra=fields(topic=topic, reason=reason_text(code)))
            raise PublishRefused(topic, code)
        if self.state.refused:
            self.state.accept(topic)
        self.state.count("published")
