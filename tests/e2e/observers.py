"""Independent consumers of the scenario: a Sparkplug Primary Host on MQTT and kcat on Kafka.

Neither uses the gateway's uplink code. The Primary Host is a plain gmqtt client that
publishes `spBv1.0/STATE/<host>` online (retained, with an offline Will) and records every
Sparkplug message it receives; payloads are decoded later with the generated protobuf
module. Kafka is read back with kcat (`-J`: envelope with headers) from the broker's
direct listener, so what the gateway sent through the fault proxy is what is checked.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from gmqtt import Client, Message


@dataclass
class MqttMessage:
    recv_time: float
    topic: str
    payload: bytes


@dataclass
class PrimaryHost:
    host: str
    port: int
    host_id: str
    messages: list[MqttMessage] = field(default_factory=list)
    _client: Client | None = None
    _subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    def _state(self, online: bool) -> bytes:
        return json.dumps({"online": online, "timestamp": int(time.time() * 1000)}).encode()

    async def start(self) -> None:
        topic = f"spBv1.0/STATE/{self.host_id}"
        will = Message(topic, self._state(False), qos=1, retain=True)
        client = Client(f"e2e-host-{uuid.uuid4().hex[:8]}", clean_session=True, will_message=will)

        def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
            if not topic.startswith("spBv1.0/STATE/"):
                self.messages.append(MqttMessage(time.time(), topic, bytes(payload)))
            return 0

        client.on_message = on_message
        client.on_subscribe = lambda *_a, **_k: self._subscribed.set()
        await client.connect(self.host, self.port, keepalive=30)
        self._client = client
        client.subscribe("spBv1.0/#", qos=1)
        await asyncio.wait_for(self._subscribed.wait(), 10)
        client.publish(topic, self._state(True), qos=1, retain=True)

    async def set_online(self, online: bool) -> None:
        """Publish STATE (retained): an edge node must not birth while its Primary Host is offline."""
        assert self._client is not None
        self._client.publish(f"spBv1.0/STATE/{self.host_id}", self._state(online), qos=1, retain=True)
        await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            # A clean goodbye: STATE offline, then DISCONNECT (the Will is not sent).
            client.publish(f"spBv1.0/STATE/{self.host_id}", self._state(False), qos=1, retain=True)
            await asyncio.sleep(0.2)
            await client.disconnect()


def kcat_consume(kcat: str, bootstrap: str, topic: str, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Every message of `topic` (all partitions, from the beginning), as kcat's JSON envelopes."""
    done = subprocess.run(
        [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-J", "-q"],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kcat -C -t {topic} at {bootstrap} exited {done.returncode}: {done.stderr[-2000:]}")
    out = []
    for line in done.stdout.splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def kcat_headers(envelope: dict[str, Any]) -> dict[str, str]:
    """kcat -J gives headers as a flat [k1, v1, k2, v2, ...] list."""
    raw = envelope.get("headers") or []
    return {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
