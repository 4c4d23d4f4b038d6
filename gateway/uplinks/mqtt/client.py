"""The one MQTT client layer under every MQTT user in the process (edge node and bridge).

gmqtt does the wire protocol; this module adds what a field gateway needs of it, once:

- the server list (`ServerList`): one URL syntax, walked in order;
- connection set-up (`MqttConnection.open`): client id, credentials, TLS with a client
  certificate, CONNACK or a clear error (refused with its reason code, closed before CONNACK,
  no answer in time), gmqtt's own reconnect switched off (callers own reconnects);
- SUBACK reason codes: a refused subscription raises instead of being taken as granted;
- in-flight tracking and PUBACK futures: each QoS 1 publish returns a future that resolves
  with the PUBACK's MQTT 5 reason code. gmqtt 0.8 does not read that code (a broker's
  "not authorised" looks like success there), so the PUBACK handler is wrapped here;
- the broker's CONNACK limits: Receive Maximum (publishes in flight) and Maximum Packet Size
  (a publish that would exceed it raises `PacketTooLarge` before it is sent, since the broker
  would drop the connection for it);
- ending a connection: `close()` with a DISCONNECT reason code, or `abort()` with none, so
  that the broker publishes the Will.

gmqtt internals are touched only in this module (`_package_handler`, `_connection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gmqtt import Client, Message
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import PersistentStorage

from gateway.config import parse_server_url
from gateway.errors import UplinkError
from gateway.uplinks.core import Outcome

log = logging.getLogger("outpost.mqtt")
_gmqtt_log = logging.getLogger("outpost.mqtt.gmqtt")

# MQTT 5 reason codes (section 2.4) that the layer and its users name.
RC_SUCCESS = 0x00
RC_NO_MATCHING_SUBSCRIBERS = 0x10
RC_DISCONNECT_WITH_WILL = 0x04
RC_UNSPECIFIED = 0x80
RC_IMPLEMENTATION_SPECIFIC = 0x83
RC_NOT_AUTHORIZED = 0x87
RC_TOPIC_NAME_INVALID = 0x90
RC_PACKET_ID_IN_USE = 0x91
RC_PACKET_TOO_LARGE = 0x95
RC_QUOTA_EXCEEDED = 0x97
RC_PAYLOAD_FORMAT_INVALID = 0x99

REASON_NAMES = {
    0x00: "success", 0x04: "disconnect with will", 0x10: "no matching subscribers",
    0x80: "unspecified error", 0x81: "malformed packet", 0x82: "protocol error",
    0x83: "implementation specific error", 0x84: "unsupported protocol version",
    0x85: "client identifier not valid", 0x86: "bad user name or password",
    0x87: "not authorized", 0x88: "server unavailable", 0x89: "server busy", 0x8A: "banned",
    0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x91: "packet identifier in use",
    0x93: "receive maximum exceeded", 0x95: "packet too large", 0x96: "message rate too high",
    0x97: "quota exceeded", 0x99: "payload format invalid", 0x9C: "use another server",
    0x9D: "server moved",
}


def reason_text(code: int) -> str:
    return f"0x{code:02x} {REASON_NAMES.get(code, 'reason')}"


def puback_outcome(code: int) -> Outcome:
    """What a PUBACK reason code means for the record that was published.

    Success and "no matching subscribers" deliver. A code that is about the message itself
    (too large, payload format) refuses that record; one about where it goes (not authorised,
    bad topic, quota, and the broker's generic refusals, which ACL plugins use) refuses the
    destination, whose records are held and probed. A packet id clash is retriable.
    """
    if code < 0x80:
        return Outcome.DELIVERED
    if code in (RC_PACKET_TOO_LARGE, RC_PAYLOAD_FORMAT_INVALID):
        return Outcome.REFUSED_RECORD
    if code == RC_PACKET_ID_IN_USE:
        return Outcome.RETRIABLE
    return Outcome.REFUSED_DESTINATION


class MqttError(UplinkError):
    """The MQTT link failed; retried with backoff."""

    retriable = True


class ConnectRefused(MqttError):
    """CONNACK with a failure reason code (bad credentials, not authorised, server busy...)."""

    def __init__(self, code: int, url: str) -> None:
        self.code = code
        super().__init__(f"{url} refused the connection: CONNACK {reason_text(code)}")


class SubscribeRefused(MqttError):
    def __init__(self, refused: Sequence[tuple[str, int]]) -> None:
        self.refused = list(refused)
        text = ", ".join(f"{t!r} ({reason_text(c)})" for t, c in refused)
        super().__init__(f"subscription refused: {text}")


class ConnectionLost(MqttError):
    """The connection dropped (or was dropped by us) while something waited on it."""


class PacketTooLarge(UplinkError):
    """A publish larger than the broker's Maximum Packet Size: refused for this record."""

    retriable = False

    def __init__(self, topic: str, size: int, limit: int) -> None:
        self.topic = topic
        self.size = size
        self.limit = limit
        super().__init__(f"publish to {topic!r} is {size} bytes, more than the broker's "
                         f"maximum packet size {limit}")


@dataclass(frozen=True, slots=True)
class MqttClientSettings:
    """How to reach the broker; the same for the edge node and the bridge (`[mqtt]`)."""

    servers: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: float = 30.0
    protocol: str = "5"
    connect_timeout: float = 10.0

    @classmethod
    def from_config(cls, m: Any, password: str | None) -> MqttClientSettings:
        return cls(servers=tuple(m.servers), username=m.username, password=password,
                   ca_file=m.ca_file, cert_file=m.cert_file, key_file=m.key_file,
                   keepalive=m.keepalive, protocol=m.protocol)


class ServerList:
    """The configured servers, walked in order; every URL is checked when built."""

    def __init__(self, urls: Sequence[str]) -> None:
        if not urls:
            raise MqttError("mqtt.servers: at least one server is needed")
        self.urls = list(urls)
        for url in self.urls:
            try:
                parse_server_url(url)
            except ValueError as exc:
                raise MqttError(f"mqtt.servers: {exc}") from None
        self.index = 0

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def advance(self) -> str:
        self.index = (self.index + 1) % len(self.urls)
        return self.current


class _Inflight(PersistentStorage):
    """gmqtt's in-flight store, extended with a future per QoS 1 publish for its PUBACK."""

    def __init__(self) -> None:
        super().__init__()
        self.last_mid: int | None = None
        self.waiters: dict[int, asyncio.Future[int]] = {}
        self.codes: dict[int, int] = {}

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        code = self.codes.pop(mid, RC_SUCCESS)
        fut = self.waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(code)

    def future_for_last(self) -> asyncio.Future[int]:
        if self.last_mid is None:
            raise MqttError("the QoS 1 publish was not queued")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiters[self.last_mid] = fut
        return fut

    def fail_all(self, exc: BaseException) -> None:
        for fut in self.waiters.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here: nobody may be waiting any more
        self.waiters.clear()


def _ssl_context(s: MqttClientSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=s.ca_file)
    if s.cert_file:
        ctx.load_cert_chain(s.cert_file, s.key_file)
    return ctx


MessageHandler = Callable[[str, bytes, int, dict[str, Any]], Any]


class MqttConnection:
    """One connection to one server. Make a new one for every connection attempt."""

    def __init__(self, settings: MqttClientSettings, client_id: str, *, clean_session: bool = True,
                 will: Message | None = None, session_expiry_s: int | None = None,
                 on_message: MessageHandler | None = None) -> None:
        self.settings = settings
        self.client_id = client_id
        self.lost = asyncio.Event()
        self.disconnect_code: int | None = None
        self.url: str | None = None
        self._inflight = _Inflight()
        kwargs: dict[str, Any] = {"clean_session": clean_session, "will_message": will,
                                  "persistent_storage": self._inflight, "logger": _gmqtt_log}
        if session_expiry_s is not None:
            kwargs["session_expiry_interval"] = session_expiry_s
        if not clean_session:
            kwargs["optimistic_acknowledgement"] = False  # PUBACK only after our handler returns
        self._client = Client(client_id, **kwargs)
        self._client.set_config({"reconnect_retries": -2, "reconnect_delay": 3600})
        if settings.username:
            self._client.set_auth_credentials(settings.username, settings.password)
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        if on_message is not None:
            # gmqtt awaits the handler (and sends the PUBACK after it) only when it is a
            # coroutine function; the bridge relies on that to ack after the buffer commit.
            if inspect.iscoroutinefunction(on_message):
                async def handle(_c: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
                    return await on_message(topic, payload, qos, props)
            else:
                def handle(_c: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:  # type: ignore[misc]
                    return on_message(topic, payload, qos, props)
            self._client.on_message = handle
        self._subacks: dict[int, asyncio.Future[tuple[int, ...]]] = {}
        self._hook_puback()

    # -- connection ---------------------------------------------------------------------

    async def open(self, url: str) -> None:
        """CONNECT and wait for CONNACK, for the server to drop us, or for the timeout.

        gmqtt's connect() does not return when the server drops the connection before
        CONNACK (a TLS 1.3 server refusing a client certificate resets after the handshake),
        so it is raced against the disconnect and the error says which of the three it was.
        """
        s = self.settings
        addr = parse_server_url(url)
        self.url = url
        ctx: Any = _ssl_context(s) if addr.tls else False
        version = MQTTv50 if s.protocol == "5" else MQTTv311
        connect = asyncio.ensure_future(self._client.connect(
            addr.host, addr.port, ssl=ctx, keepalive=max(1, int(s.keepalive)), version=version))
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({connect, lost}, timeout=s.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (connect, lost):
                t.cancel()
            await asyncio.gather(connect, lost, return_exceptions=True)
        if connect in done:
            exc = connect.exception()
            if exc is None:
                return
            code = getattr(exc, "_code", None)
            if type(exc).__name__ == "MQTTConnectError" and isinstance(code, int):
                raise ConnectRefused(code, url) from None
            raise exc
        if lost in done:
            hint = (" (a TLS server that requires a client certificate refuses a missing or "
                    "untrusted one this way: check cert_file/key_file)" if addr.tls else "")
            raise ConnectionLost(f"{url} closed the connection before CONNACK{hint}")
        raise TimeoutError(f"{url}: no CONNACK within {s.connect_timeout:g}s")

    def _connack(self) -> dict[str, Any]:
        handler = getattr(self._client, "_package_handler", None)
        props = getattr(handler, "_connack_properties", None)
        return props if isinstance(props, dict) else {}

    def _connack_value(self, name: str) -> int | None:
        value = self._connack().get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        return value if isinstance(value, int) else None

    @property
    def max_packet_size(self) -> int | None:
        """The broker's Maximum Packet Size from CONNACK (None: no limit announced)."""
        return self._connack_value("maximum_packet_size")

    @property
    def receive_maximum(self) -> int:
        return self._connack_value("receive_maximum") or 65535

    def inflight_limit(self) -> int:
        """QoS 1 publishes we may have in flight: the broker's Receive Maximum.

        gmqtt lowers its packet-id pool to that value and raises OverflowError beyond it
        (Mosquitto grants 20), so a backlog must never be pushed out all at once.
        """
        handler = getattr(self._client, "_package_handler", None)
        ids = getattr(handler, "id_generator", None)
        pool = getattr(ids, "_max", None) or self.receive_maximum
        return max(1, min(pool - 2, 100))

    def _on_disconnect(self, _client: Any, packet: Any = None, *_a: Any, **_k: Any) -> None:
        if isinstance(packet, bytes | bytearray) and packet:
            self.disconnect_code = packet[0]
        self.lost.set()
        self._inflight.fail_all(ConnectionLost("connection lost"))

    # -- subscribe ----------------------------------------------------------------------

    def _on_subscribe(self, _client: Any, mid: int, granted: Any, _props: Any) -> None:
        fut = self._subacks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(tuple(int(g) for g in granted))

    async def subscribe(self, filters: Sequence[str], qos: int = 1) -> None:
        """Subscribe and wait for every SUBACK; raises SubscribeRefused on a failure code."""
        loop = asyncio.get_running_loop()
        waits = []
        for f in filters:
            mid = self._client.subscribe(f, qos=qos)
            fut: asyncio.Future[tuple[int, ...]] = loop.create_future()
            self._subacks[mid] = fut
            waits.append((f, fut))
        await self.until(asyncio.gather(*(w for _, w in waits)), self.settings.connect_timeout)
        refused = [(f, code) for f, fut in waits for code in fut.result() if code >= 0x80]
        if refused:
            raise SubscribeRefused(refused)

    # -- publish ------------------------------------------------------------------------

    def _hook_puback(self) -> None:
        # gmqtt 0.8 frees the packet id on PUBACK without reading the MQTT 5 reason code.
        # The handler is looked up by name on the handler object, so an instance attribute
        # wraps it: the code is noted, then gmqtt's own handling resolves our future.
        handler = getattr(self._client, "_package_handler", None)
        original = getattr(handler, "_handle_puback_packet", None)
        if handler is None or original is None:
            raise MqttError("gmqtt changed: cannot read PUBACK reason codes")
        inflight = self._inflight

        def on_puback(cmd: int, packet: bytes) -> None:
            if len(packet) >= 3:
                mid = int.from_bytes(packet[:2], "big")
                inflight.codes[mid] = packet[2]
            original(cmd, packet)

        handler._handle_puback_packet = on_puback
        cache = getattr(handler, "_handler_cache", None)
        if isinstance(cache, dict):
            cache.clear()

    def check_size(self, topic: str, payload: bytes) -> None:
        """Raise PacketTooLarge if this publish would exceed the broker's limit."""
        limit = self.max_packet_size
        if limit is None:
            return
        # Fixed header (<= 5), topic (2 + len), packet id (2), properties length (1).
        size = 10 + len(topic.encode()) + len(payload)
        if size > limit:
            raise PacketTooLarge(topic, size, limit)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> asyncio.Future[int] | None:
        """Send one PUBLISH. QoS 1: a future resolved with the PUBACK reason code."""
        if self.lost.is_set():
            raise ConnectionLost("connection lost")
        self.check_size(topic, payload)
        self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return None
        return self._inflight.future_for_last()

    async def publish_and_wait(self, topic: str, payload: bytes, qos: int, limit_s: float = 30.0) -> int:
        """Publish and return the PUBACK reason code (RC_SUCCESS at QoS 0 once sent)."""
        fut = self.publish(topic, payload, qos)
        if fut is None:
            return RC_SUCCESS
        return await self.until(fut, limit_s)

    async def wait_acks(self, limit_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._inflight.wait_empty(), limit_s)

    # -- waiting and ending ---------------------------------------------------------------

    async def until(self, aw: Awaitable[Any], limit_s: float | None = None) -> Any:
        """Await `aw` unless the connection is lost first (ConnectionLost) or time runs out."""
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait({task, lost}, timeout=limit_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if not done:
            raise TimeoutError("no answer from the MQTT server in time")
        raise ConnectionLost("connection lost")

    async def close(self, reason_code: int = RC_SUCCESS) -> None:
        """A clean DISCONNECT (MQTT 5 reason code where the protocol has one)."""
        try:
            if self.settings.protocol == "5":
                await self._client.disconnect(reason_code=reason_code)
            else:
                await self._client.disconnect()
        except Exception as exc:  # the socket may already be gone
            log.debug("disconnect failed", exc_info=exc)
        self.lost.set()
        self._inflight.fail_all(ConnectionLost("disconnected"))

    def abort(self) -> None:
        """Drop the connection with no DISCONNECT: the broker publishes the Will."""
        self.lost.set()
        self._inflight.fail_all(ConnectionLost("connection dropped"))
        conn = getattr(self._client, "_connection", None)  # gmqtt has no public abort
        with contextlib.suppress(Exception):
            if conn is not None and not conn.is_closing():
                conn._transport.abort()
