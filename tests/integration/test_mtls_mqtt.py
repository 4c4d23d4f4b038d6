"""The Sparkplug MQTT uplink over mutual TLS, against the harness Mosquitto's mTLS listener.

That listener (`require_certificate true`, `use_identity_as_username true`) accepts only a
client certificate signed by the run CA. With it, the uplink connects over mqtts:// and its
NBIRTH reaches a subscriber on the plain listener, and the broker names the client by the
certificate's CN; without a certificate, or with one from an unrelated CA, it never connects,
the broker logs why, and `last_error` names the server (and should name the reason: see
`test_last_error_says_why`, a known gap of the uplink).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gmqtt import Client

from buffer import AsyncBuffer, BufferSettings
from drivers.base import PointInfo
from gateway.sparkplug.payload import decode_payload
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink
from tests.helpers import flat

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

GROUP = "mtls-plant"
POINTS = {"meter1": [PointInfo("voltage", "float32", unit="V")]}


class Watcher:
    """A subscriber on the plain listener recording every Sparkplug message of GROUP."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.seen: list[tuple[str, bytes]] = []
        self.client = Client(f"mtls-watcher-{uuid.uuid4().hex[:8]}")
        self._changed = asyncio.Event()

    async def start(self) -> Watcher:
        subscribed = asyncio.get_running_loop().create_future()
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: subscribed.done() or subscribed.set_result(None)
        await self.client.connect(self.host, self.port)
        self.client.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
        await asyncio.wait_for(subscribed, 10)  # SUBACK before anything is published
        return self

    async def stop(self) -> None:
        await self.client.disconnect()

    def _on_message(self, _c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        self.seen.append((topic, payload))
        self._changed.set()
        return 0

    def topics(self, edge: str) -> list[str]:
        return [t for t, _ in self.seen if t.split("/")[3:4] == [edge]]

    async def wait_for_topic(self, topic: str, limit_s: float) -> bytes:
        loop = asyncio.get_running_loop()
        end = loop.time() + limit_s
        while True:
            for t, payload in self.seen:
                if t == topic:
                    return payload
            if loop.time() > end:
                raise AssertionError(f"no message on {topic} within {limit_s}s; "
                                     f"seen: {[t for t, _ in self.seen]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 0.5)


@pytest.fixture
async def watcher(mosquitto) -> AsyncIterator[Watcher]:
    w = await Watcher(mosquitto.host, mosquitto.port).start()
    try:
        yield w
    finally:
        await w.stop()


@contextlib.asynccontextmanager
async def running_uplink(mosquitto, data_dir: Path, edge: str,
                         **tls: Any) -> AsyncIterator[SparkplugUplink]:
    """A SparkplugUplink on the mTLS listener, run as a task this context owns."""
    settings = MqttUplinkSettings(
        group_id=GROUP, edge_node_id=edge, data_dir=str(data_dir),
        servers=[mosquitto.mtls_url], client_id=f"edge-{uuid.uuid4().hex[:6]}",
        keepalive=5, primary_host_id=None, reconnect_min=0.2, reconnect_max=0.5,
        connect_timeout=3.0, **tls)
    buf = await AsyncBuffer.open(data_dir / "buffer.db", BufferSettings(10_000_000, 86400.0))

    async def write(device: str, point: str, value: Any) -> None:
        raise AssertionError(f"no command expected, got {device}/{point}={value!r}")

    uplink = SparkplugUplink(settings, buf, POINTS, write)
    task = asyncio.create_task(uplink.run(), name=f"sparkplug-uplink-{edge}")
    try:
        yield uplink
    finally:
        await uplink.stop()
        if not task.done():
            task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        await buf.close()
        if isinstance(results[0], Exception):
            raise results[0]


class LogWatch:
    """What the harness Mosquitto logs from now on (its log is shared by the whole run)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size

    def text(self) -> str:
        with self.path.open("rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace")

    async def wait_for(self, pattern: str, limit_s: float = 5.0) -> str:
        loop = asyncio.get_running_loop()
        end = loop.time() + limit_s
        while True:
            text = self.text()
            match = re.search(pattern, text)
            if match:
                return match.group(0)
            if loop.time() > end:
                raise AssertionError(f"mosquitto logged no {pattern!r} within {limit_s}s:\n"
                                     f"{text[-2000:]}")
            await asyncio.sleep(0.1)


async def wait_for_error(uplink: SparkplugUplink, log: LogWatch, refusal: str,
                         limit_s: float) -> str:
    """The uplink's last_error once the broker refused it twice (so it retried, in vain)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    while loop.time() < end:
        if uplink.last_error and len(re.findall(refusal, log.text())) >= 2:
            return uplink.last_error
        await asyncio.sleep(0.1)
    raise AssertionError(f"no repeated refusal ({refusal!r}) within {limit_s}s: "
                         f"{flat(uplink.state)}\n{log.text()[-2000:]}")


async def test_client_certificate_from_the_run_ca_connects_and_births(
        mosquitto, watcher: Watcher, tmp_path: Path) -> None:
    edge = f"edge-{uuid.uuid4().hex[:6]}"
    log = LogWatch(mosquitto.live_log_path)
    async with running_uplink(mosquitto, tmp_path, edge, ca_file=str(mosquitto.ca_file),
                              cert_file=str(mosquitto.client_cert_file),
                              key_file=str(mosquitto.client_key_file)) as uplink:
        nbirth = await watcher.wait_for_topic(f"spBv1.0/{GROUP}/NBIRTH/{edge}", 20)
        await watcher.wait_for_topic(f"spBv1.0/{GROUP}/DBIRTH/{edge}/meter1", 10)
        state = flat(uplink.state)
        client_id = uplink.settings.client_id or ""
    assert state["connected"] is True, state
    assert state["server"] == mosquitto.mtls_url
    assert state["connects"] == 1 and state["last_error"] == "", state
    payload = decode_payload(nbirth)
    assert payload.seq == 0
    assert any(m.name == "bdSeq" for m in payload.metrics)
    # use_identity_as_username: the broker knows the client by its certificate's CN.
    await log.wait_for(rf"New client connected from 127\.0\.0\.1:\d+ as {re.escape(client_id)} "
                       rf"\(.*u'{re.escape(mosquitto.client_cert_identity)}'\)")


# What the broker logs when it refuses each kind of client (OpenSSL's reasons).
REFUSAL = {"no_certificate": r"peer did not return a certificate",
           "other_ca": r"certificate verify failed"}


def _refused_tls(mosquitto, which: str) -> dict[str, Any]:
    tls: dict[str, Any] = {"ca_file": str(mosquitto.ca_file)}
    if which == "other_ca":
        tls.update(cert_file=str(mosquitto.other_client_cert_file),
                   key_file=str(mosquitto.other_client_key_file))
    return tls


@pytest.mark.parametrize("which", ["no_certificate", "other_ca"])
async def test_without_an_accepted_certificate_it_never_connects(
        mosquitto, watcher: Watcher, tmp_path: Path, which: str) -> None:
    edge = f"edge-{uuid.uuid4().hex[:6]}"
    log = LogWatch(mosquitto.live_log_path)
    async with running_uplink(mosquitto, tmp_path, edge, **_refused_tls(mosquitto, which)) as uplink:
        # The broker refuses it in the TLS handshake, for the expected reason, every time.
        error = await wait_for_error(uplink, log, REFUSAL[which], 20)
        state = flat(uplink.state)
    assert state["connected"] is False and state["connects"] == 0, state
    assert error.startswith(f"{mosquitto.mtls_url}: "), state
    assert watcher.topics(edge) == [], watcher.topics(edge)
    assert "New client connected" not in log.text()


async def test_last_error_says_why(mosquitto, tmp_path: Path) -> None:
    edge = f"edge-{uuid.uuid4().hex[:6]}"
    log = LogWatch(mosquitto.live_log_path)
    async with running_uplink(mosquitto, tmp_path, edge,
                              **_refused_tls(mosquitto, "no_certificate")) as uplink:
        error = await wait_for_error(uplink, log, REFUSAL["no_certificate"], 20)
    reason = error.removeprefix(f"{mosquitto.mtls_url}:").strip()
    assert re.search(r"(?i)certificate|ssl|tls|handshake|reset|closed", reason), error
