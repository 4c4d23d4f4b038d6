"""The local MQTT bridge: other clients' topics into the buffer, Kafka messages out to MQTT.

Kafka mappings with `subscribe = true` ask Outpost to carry messages that *other* clients
publish on the site broker to Kafka, with the same store-and-forward promise as Outpost's
own data. The bridge subscribes to those filters at QoS 1 on a persistent session (the
broker queues for us while we restart) and acknowledges a message only after it is
committed to the buffer: gmqtt sends the PUBACK when our async handler returns.

It also gives inbound Kafka mappings with `action = "mqtt_publish"` a publish that returns
only after the broker's PUBACK, so their offsets are committed after delivery.

This is a separate MQTT client from the Sparkplug edge node on purpose: the edge node's
session must be clean (Sparkplug), the bridge's must be persistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from typing import Any

from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50, MQTTv311

from buffer import NewRecord
from gateway.config import OutpostConfig, parse_server_url
from gateway.errors import UplinkError
from gateway.mappings import MappingTable
from gateway.uplinks.mqtt import AckTracker

log = logging.getLogger("outpost.bridge")

BRIDGE_FLUSH_S = 0.05


class BridgeError(UplinkError):
    retriable = True


class LocalBridge:
    def __init__(self, cfg: OutpostConfig, password: str | None, buffer: Any, table: MappingTable) -> None:
        assert cfg.mqtt is not None
        self.cfg = cfg
        self.mqtt = cfg.mqtt
        self.password = password
        self.buffer = buffer
        self.filters = sorted({f for m in table.mappings if m.subscribe for f in m.mqtt_topic_filters})
        self.gateway_id = cfg.gateway.gateway_id
        base = self.mqtt.client_id or f"outpost-{cfg.gateway.group_id}-{cfg.gateway.edge_node_id}"
        self.client_id = f"{base}-bridge"
        self._client: Client | None = None
        self._acks: AckTracker | None = None
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._pending: list[tuple[NewRecord, asyncio.Future[None]]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self.counters = {"bridged": 0, "published": 0, "connects": 0}
        self.last_error = ""

    def state(self) -> dict[str, Any]:
        return {"connected": self._connected.is_set(), "filters": self.filters, "last_error": self.last_error,
                **self.counters}

    async def stop(self) -> None:
        self._stopping = True
        self._lost.set()

    async def run(self) -> None:
        attempt = 0
        servers = list(self.mqtt.servers)
        index = 0
        self._flush_task = asyncio.create_task(self._flush_loop(), name="outpost:bridge-flush")
        try:
            while not self._stopping:
                url = servers[index % len(servers)]
                try:
                    await self._session(url)
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.last_error = f"{type(e).__name__}: {e}"
                    if attempt == 0:
                        log.warning("event=bridge_down server=%s error=%r", url, self.last_error)
                    attempt += 1
                    index += 1
                finally:
                    self._connected.clear()
                    await self._drop()
                if self._stopping:
                    break
                delay = min(self.mqtt.reconnect_max, self.mqtt.reconnect_min * 2 ** min(attempt, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        finally:
            self._flush_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flush_task

    async def _session(self, url: str) -> None:
        s = parse_server_url(url)
        self._acks = AckTracker()
        client = Client(
            self.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            persistent_storage=self._acks,
            session_expiry_interval=7 * 86400,
        )
        client.set_config({"reconnect_retries": -2, "reconnect_delay": 3600})
        if self.mqtt.username:
            client.set_auth_credentials(self.mqtt.username, self.password)
        self._lost = asyncio.Event()
        client.on_message = self._on_message
        client.on_disconnect = lambda *_a, **_k: self._lost.set()
        ctx: Any = False
        if s.tls:
            ctx = ssl.create_default_context(cafile=self.mqtt.ca_file)
            if self.mqtt.cert_file:
                ctx.load_cert_chain(self.mqtt.cert_file, self.mqtt.key_file)
        version = MQTTv50 if self.mqtt.protocol == "5" else MQTTv311
        self._client = client
        await asyncio.wait_for(
            client.connect(s.host, s.port, ssl=ctx, keepalive=max(1, int(self.mqtt.keepalive)), version=version),
            10.0,
        )
        for f in self.filters:
            client.subscribe(f, qos=1)
        self.counters["connects"] += 1
        self._connected.set()
        log.info("event=bridge_up server=%s filters=%s", url, ",".join(self.filters) or "-")
        await self._lost.wait()

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 2.0)

    async def _on_message(self, _client: Any, topic: str, payload: bytes, qos: int, _props: Any) -> int:
        # Outpost's own Sparkplug traffic reaches Kafka from the buffer already; do not store it twice.
        if topic.startswith(f"spBv1.0/{self.cfg.gateway.group_id}/") and f"/{self.cfg.gateway.edge_node_id}" in topic:
            return 0
        rec = NewRecord(
            stream=topic,
            payload=bytes(payload),
            ts_ms=time.time_ns() // 1_000_000,
            headers={"topic": topic, "type": "bridged", "gateway": self.gateway_id},
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
                log.error("event=bridge_store_failed count=%d error=%r", len(batch), str(e))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(BridgeError(str(e)))
                self._lost.set()
                continue
            self.counters["bridged"] += len(batch)
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    async def publish(self, topic: str, payload: bytes, qos: int) -> None:
        """Publish and return after the broker acknowledged (QoS 1) or the write went out (QoS 0)."""
        try:
            await asyncio.wait_for(self._connected.wait(), 30.0)
        except TimeoutError:
            raise BridgeError(f"MQTT bridge not connected: {self.last_error or 'connecting'}") from None
        client, acks = self._client, self._acks
        if client is None or acks is None:
            raise BridgeError("MQTT bridge not connected")
        client.publish(topic, payload, qos=qos)
        if qos == 0:
            self.counters["published"] += 1
            return
        fut = acks.ack_future()
        await asyncio.wait_for(fut, 30.0)
        self.counters["published"] += 1
