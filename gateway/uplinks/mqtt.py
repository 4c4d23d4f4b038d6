"""The Sparkplug B uplink: one edge node session on MQTT (gmqtt), fed from the buffer.

`SparkplugUplink.run()` owns everything: it connects to the configured servers in order
with backoff, sets the NDEATH Will with a persisted bdSeq, subscribes to NCMD/DCMD (and
the Primary Host's STATE) before any birth, publishes NBIRTH (seq 0) then every DBIRTH,
then the records of the buffer's "mqtt" cursor: it stamps seq and aliases at publish time,
publishes data at QoS 1 and acks the buffer only after PUBACK. Records stored before the
births are the backlog: sent with `is_historical`, oldest first, paced, while live records
keep flowing beside them. Births and deaths go at QoS 0 as the specification says.

We own reconnects: gmqtt's own reconnect would reuse the session (clean_session=False) and
the old Will, which Sparkplug forbids, so each connection is a fresh gmqtt Client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gmqtt import Client, Message
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import PersistentStorage

from drivers.base import DeviceEvent, DeviceState, DriverError, Sample, now_ms
from gateway.config import parse_server_url
from gateway.errors import UplinkError
from gateway.sparkplug.edge import (
    AliasTable,
    NodeIdentity,
    PointLike,
    build_dbirth,
    build_ddeath,
    build_nbirth,
    build_ndeath,
    stamp_data,
)
from gateway.sparkplug.errors import PayloadError, SparkplugError
from gateway.sparkplug.node import (
    BdSeqStore,
    PrimaryHostState,
    SeqCounter,
    parse_dcmd,
    parse_ncmd,
)
from gateway.sparkplug.topics import MessageType, TopicError, parse_topic, state_topic

log = logging.getLogger(__name__)

CURSOR = "mqtt"
WriteCallback = Callable[[str, str, Any], Awaitable[None]]
Snapshot = Callable[[str], Mapping[str, Sample]]


@dataclass
class MqttUplinkSettings:
    group_id: str
    edge_node_id: str
    data_dir: str
    servers: list[str]
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: float = 30.0
    protocol: str = "5"
    primary_host_id: str | None = None
    use_aliases: bool = True
    rebirth_debounce: float = 5.0
    historical_max_per_s: float = 500.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    batch_max_records: int = 200
    connect_timeout: float = 10.0
    software: str = "outpost"

    @classmethod
    def from_config(cls, cfg: Any, mqtt_password: str | None = None) -> MqttUplinkSettings:
        """From gateway.config.OutpostConfig (its `gateway` and `mqtt` sections)."""
        m = cfg.mqtt
        return cls(
            group_id=cfg.gateway.group_id, edge_node_id=cfg.gateway.edge_node_id,
            data_dir=cfg.gateway.data_dir, servers=list(m.servers), client_id=m.client_id,
            username=m.username, password=mqtt_password, ca_file=m.ca_file,
            cert_file=m.cert_file, key_file=m.key_file, keepalive=m.keepalive,
            protocol=m.protocol, primary_host_id=m.primary_host_id, use_aliases=m.use_aliases,
            rebirth_debounce=m.rebirth_debounce, historical_max_per_s=m.historical_max_per_s,
            reconnect_min=m.reconnect_min, reconnect_max=m.reconnect_max,
        )


class AckTracker(PersistentStorage):
    """gmqtt's in-flight store, extended to tell us which mid a publish got and its PUBACK."""

    def __init__(self) -> None:
        super().__init__()
        self.last_mid: int | None = None
        self.waiters: dict[int, asyncio.Future[None]] = {}

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        self.last_mid = mid

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        fut = self.waiters.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def ack_future(self) -> asyncio.Future[None]:
        """Resolved by the PUBACK of the QoS 1 publish just made; call right after publish()."""
        if self.last_mid is None:
            raise UplinkError("the QoS 1 publish was not queued")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters[self.last_mid] = fut
        return fut


class _SessionEnded(Exception):
    """The connection is gone or must be dropped (lost, host offline, next server)."""


class _QuietReconnectFilter(logging.Filter):
    # We disable gmqtt's reconnect on purpose; its complaint about it is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return "max number of failed connection attempts" not in record.getMessage()


_gmqtt_log = logging.getLogger("gateway.uplinks.mqtt.gmqtt")
_gmqtt_log.addFilter(_QuietReconnectFilter())


def clock_fix(clock: Any, headers: Mapping[str, str]) -> tuple[int, bool]:
    """(correction in ms, flag) for a record stamped on an untrusted clock; (0, False) otherwise.

    Never holds a record back: a reading is published at once, corrected when the clock has
    synchronised since it was taken (same boot), else flagged.
    """
    if "clock" not in headers:
        return 0, False
    if clock is None:
        return 0, True
    from gateway.clock import Resolution

    res = clock.resolve_record(headers, held_for_s=0.0, max_hold_s=0.0)
    if res.action is Resolution.PUBLISH:
        return int(res.delta_ms or 0), False
    return 0, True


def _server(url: str) -> tuple[str, int, bool]:
    try:
        s = parse_server_url(url)  # the config's parser: one URL syntax everywhere
    except ValueError as exc:
        raise SparkplugError(f"mqtt.servers: {exc}") from None
    return s.host, s.port, s.tls


class SparkplugUplink:
    """The edge node on MQTT. Drive it with run(); stop() publishes NDEATH and disconnects."""

    def __init__(self, settings: MqttUplinkSettings, buffer: Any,
                 devices: Mapping[str, Sequence[PointLike]], write_cb: WriteCallback, *,
                 snapshot: Snapshot | None = None, clock: Any = None) -> None:
        if not settings.servers:
            raise SparkplugError("mqtt.servers: at least one server is needed")
        for url in settings.servers:
            _server(url)  # fail at construction, not in the middle of run()
        self.settings = settings
        self.buffer = buffer
        self.devices = {d: list(p) for d, p in devices.items()}
        self.write_cb = write_cb
        self.snapshot = snapshot or (lambda device: {})
        self.clock = clock  # gateway.clock.ClockGuard: corrects or flags unsynced timestamps
        self.node = NodeIdentity(settings.group_id, settings.edge_node_id)
        self.aliases = AliasTable(self.devices) if settings.use_aliases else None
        self._bdseq_store = BdSeqStore(settings.data_dir)
        self._seq = SeqCounter()
        self._host = PrimaryHostState(settings.primary_host_id) if settings.primary_host_id else None
        self._client: Client | None = None
        self._acks: AckTracker | None = None
        self._lost = asyncio.Event()
        self._host_changed = asyncio.Event()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._finished = asyncio.Event()
        self._running = False
        self._events: list[DeviceEvent] = []
        self._dead: set[str] = set()           # devices with DDEATH (or never born)
        self._born: set[str] = set()
        self._watermarks: dict[str, int] = {}  # stream -> last buffer seq before its birth
        self._node_watermark = 0
        self._delivered: list[tuple[int, int]] = []
        self._rebirth_requested = False
        self._last_rebirth = 0.0
        self._next_server = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._server_index = 0
        self._established = False
        self.bdseq: int | None = None
        self.counters = {"published": 0, "historical": 0, "births": 0, "rebirths": 0,
                         "connects": 0, "commands": 0, "commands_rejected": 0, "writes_failed": 0}
        self.connected_server: str | None = None
        self.last_error: str = ""
        self._logged_error = ""
        self._failed_attempts = 0

    # -- what the runtime calls ----------------------------------------------------------

    def on_device_event(self, ev: DeviceEvent) -> None:
        """Queue a device state change; the publish loop sends DDEATH/DBIRTH in order."""
        if ev.device not in self.devices:
            log.warning("device event for unknown device %r ignored", ev.device)
            return
        self._events.append(ev)

    def state(self) -> dict[str, Any]:
        return {
            "connected": self.connected_server is not None,
            "server": self.connected_server,
            "bdseq": self.bdseq,
            "seq_next": self._seq.peek,
            "primary_host": None if self._host is None else {
                "id": self._host.host_id, "online": self._host.online},
            "devices_dead": sorted(self._dead),
            "last_error": self.last_error,
            **self.counters,
        }

    async def stop(self) -> None:
        """Planned shutdown: run() publishes NDEATH, sends DISCONNECT and returns.

        The owner of the run() task calls this, then awaits that task.
        """
        self._stopping = True
        self._stop_event.set()
        self._host_changed.set()
        if self._running:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), 15.0)
        await self._cancel_tasks()

    def _link_down(self, error: str) -> None:
        """Log a link failure once: repeats of the same error while down go to debug only."""
        self.last_error = error
        self._failed_attempts += 1
        if error != self._logged_error:
            self._logged_error = error
            log.warning("MQTT link down: %s (retrying with backoff; repeats are not logged)", error)
        else:
            log.debug("MQTT link still down: %s (attempt %d)", error, self._failed_attempts)

    async def run(self) -> None:
        """Connect, birth, publish; reconnects with backoff until cancelled or stopped."""
        await self.buffer.register_cursor(CURSOR)
        delay = self.settings.reconnect_min
        self._running = True
        self._finished.clear()
        try:
            while not self._stopping:
                url = self.settings.servers[self._server_index]
                self._established = False
                try:
                    await self._session(url)
                except _SessionEnded as exc:
                    if not self._stopping:
                        self._link_down(f"{url}: session ended: {exc}")
                except (OSError, TimeoutError, SparkplugError, UplinkError) as exc:
                    self._link_down(f"{url}: {exc}")
                except Exception as exc:  # gmqtt raises its own MQTTConnectError
                    if type(exc).__name__ != "MQTTConnectError":
                        raise
                    self._link_down(f"{url}: refused the connection: {exc}")
                finally:
                    await self._drop_client()
                if self._stopping:
                    break
                if self._established and not self._next_server:
                    delay = self.settings.reconnect_min
                else:
                    self._server_index = (self._server_index + 1) % len(self.settings.servers)
                self._next_server = False
                with contextlib.suppress(TimeoutError):  # stop() ends the backoff early
                    await asyncio.wait_for(self._stop_event.wait(),
                                           delay * random.uniform(0.8, 1.2))
                delay = min(self.settings.reconnect_max, delay * 2)
        finally:
            await self._cancel_tasks()
            await self._drop_client()
            self._running = False
            self._finished.set()

    # -- one connection --------------------------------------------------------------------

    async def _session(self, url: str) -> None:
        host, port, tls = _server(url)
        st = self.settings
        # Failed attempts do not use up a bdSeq: NBIRTHs of successive sessions go +1.
        self.bdseq = await asyncio.to_thread(self._bdseq_store.candidate)
        will = Message(self.node.topic(MessageType.NDEATH), build_ndeath(self.bdseq),
                       qos=1, retain=False)
        self._acks = AckTracker()
        client = Client(st.client_id or f"outpost-{st.group_id}-{st.edge_node_id}",
                        clean_session=True, will_message=will, persistent_storage=self._acks,
                        logger=_gmqtt_log)
        client.set_config({"reconnect_retries": -2, "reconnect_delay": 3600})
        if st.username:
            client.set_auth_credentials(st.username, st.password)
        self._lost = asyncio.Event()
        client.on_message = self._on_message
        client.on_disconnect = lambda *_a, **_k: self._lost.set()
        subacks: dict[int, asyncio.Future[Any]] = {}

        def on_subscribe(_client: Any, mid: int, qos: Any, _props: Any) -> None:
            fut = subacks.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(qos)

        client.on_subscribe = on_subscribe
        self._client = client
        ctx = self._ssl_context() if tls else False
        version = MQTTv50 if st.protocol == "5" else MQTTv311
        await self._connect(client, host, port, ctx, version, tls)
        await asyncio.to_thread(self._bdseq_store.commit, self.bdseq)
        self.counters["connects"] += 1
        log.info("connected to MQTT server %s with bdSeq %d after %d failed attempt(s)", url, self.bdseq,
                 self._failed_attempts)
        self._failed_attempts = 0
        self._logged_error = ""

        # Commands (and STATE) are subscribed before any birth, at QoS 1.
        topics = [self.node.topic(MessageType.NCMD),
                  f"spBv1.0/{st.group_id}/DCMD/{st.edge_node_id}/+"]
        if self._host is not None:
            topics.append(state_topic(self._host.host_id))
        for t in topics:
            mid = client.subscribe(t, qos=1)
            subacks[mid] = asyncio.get_running_loop().create_future()
        await self._until(asyncio.gather(*subacks.values()), st.connect_timeout)
        self.connected_server = url
        self._established = True

        while not self._stopping:
            if self._host is not None:
                await self._wait_host_online()
                if self._stopping:
                    break
            self._host_changed.clear()
            await self._births(client)
            await self._publish_loop(client)
            if not self._rebirth_requested:
                break
        if self._stopping:
            await self._goodbye(client)

    async def _connect(self, client: Client, host: str, port: int, ctx: Any, version: Any, tls: bool) -> None:
        """CONNECT and wait for CONNACK, or for the connection to drop, or for the timeout.

        gmqtt's connect() does not return when the server drops the connection before
        CONNACK (a TLS 1.3 server refusing a client certificate resets after the handshake),
        so we race it against the disconnect and say which of the three it was.
        """
        st = self.settings
        connect = asyncio.ensure_future(
            client.connect(host, port, ssl=ctx, keepalive=max(1, int(st.keepalive)), version=version))
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait({connect, lost}, timeout=st.connect_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (connect, lost):
                t.cancel()
            await asyncio.gather(connect, lost, return_exceptions=True)
        if connect in done:
            connect.result()  # MQTTConnectError / OSError as they are
            return
        if lost in done:
            hint = (" (a TLS server that requires a client certificate refuses a missing or untrusted"
                    " one this way: check cert_file/key_file)" if tls else "")
            raise ConnectionError(f"the server closed the connection before CONNACK{hint}")
        raise TimeoutError(f"no CONNACK within {st.connect_timeout:g}s")

    async def _until(self, aw: Awaitable[Any], limit_s: float | None = None) -> Any:
        """Await `aw` unless the connection is lost first (then _SessionEnded)."""
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self._lost.wait())
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
        raise _SessionEnded("connection lost")

    async def _wait_host_online(self) -> None:
        assert self._host is not None
        while not self._host.online and not self._stopping:
            self._host_changed.clear()
            log.info("waiting for primary host %r to be online", self._host.host_id)
            await self._until(self._host_changed.wait())

    def _ssl_context(self) -> ssl.SSLContext:
        st = self.settings
        ctx = ssl.create_default_context(cafile=st.ca_file)
        if st.cert_file:
            ctx.load_cert_chain(st.cert_file, st.key_file)
        return ctx

    async def _births(self, client: Client) -> None:
        """NBIRTH (seq 0), then a DBIRTH per live device; takes the historical watermark."""
        stats = await self.buffer.stats()
        self._node_watermark = int(stats.get("last_seq") or 0)
        self._watermarks.clear()
        self._rebirth_requested = False
        ts = now_ms()
        seq = self._seq.reset()
        client.publish(self.node.topic(MessageType.NBIRTH),
                       build_nbirth(self.bdseq or 0, ts, seq=seq, software=self.settings.software),
                       qos=0, retain=False)
        self._apply_pending_events()
        self._born.clear()
        for device, points in self.devices.items():
            if device in self._dead:
                continue
            self._dbirth(client, device, points)
        self.counters["births"] += 1
        log.info("NBIRTH bdSeq %d and %d DBIRTH published", self.bdseq, len(self._born))

    def _dbirth(self, client: Client, device: str, points: Sequence[PointLike]) -> None:
        client.publish(self.node.topic(MessageType.DBIRTH, device),
                       build_dbirth(device, points, self.snapshot(device), self.aliases,
                                    now_ms(), self._seq.take()), qos=0, retain=False)
        self._born.add(device)

    def _apply_pending_events(self) -> None:
        """Before births: only the latest state of each device matters."""
        for ev in self._events:
            if ev.state is DeviceState.OFFLINE:
                self._dead.add(ev.device)
            else:
                self._dead.discard(ev.device)
        self._events.clear()

    async def _handle_events(self, client: Client) -> None:
        events, self._events = self._events, []
        for ev in events:
            if ev.state is DeviceState.OFFLINE and ev.device not in self._dead:
                self._dead.add(ev.device)
                if ev.device in self._born:
                    client.publish(self.node.topic(MessageType.DDEATH, ev.device),
                                   build_ddeath(now_ms(), self._seq.take()), qos=0, retain=False)
                    self._born.discard(ev.device)
                    log.info("DDEATH %s (%s)", ev.device, ev.reason or "offline")
            elif ev.state is DeviceState.ONLINE and ev.device in self._dead:
                self._dead.discard(ev.device)
                # Records stored before this DBIRTH are history for this device.
                stats = await self.buffer.stats()
                self._watermarks[self.node.stream(ev.device)] = int(stats.get("last_seq") or 0)
                self._dbirth(client, ev.device, self.devices[ev.device])
                log.info("DBIRTH %s", ev.device)

    async def _publish_loop(self, client: Client) -> None:
        """Publish the buffer in two lanes until the session ends or a rebirth is due.

        Live lane: records stored after the births' watermark, as they come, oldest first.
        Backlog lane: records up to the watermark, as history, oldest first, paced at
        `historical_max_per_s` so that live data keeps flowing during a long flush.
        The buffer cursor only moves over contiguous delivered records: up to the backlog
        position while a backlog remains, then up to the live position.
        """
        st = self.settings
        watermark = self._node_watermark
        live_after = max(watermark, self._delivered_upto(watermark))
        backlog = True
        acked = 0
        tokens, last = 1.0, time.monotonic()
        while not self._stopping:
            if self._lost.is_set():
                raise _SessionEnded("connection lost")
            if self._rebirth_requested:
                return
            if self._host is not None and not self._host.online:
                log.warning("primary host %r went offline: NDEATH and disconnect",
                            self._host.host_id)
                await self._goodbye(client)
                raise _SessionEnded("primary host offline")
            if self._next_server:
                await self._goodbye(client)
                raise _SessionEnded("NCMD Next Server")
            if self._events:
                await self._handle_events(client)
            progressed = False

            live = await self.buffer.read(CURSOR, limit=st.batch_max_records, after_seq=live_after)
            if live:
                await self._publish_batch(client, live)
                self._note_delivered(live[0].seq, live[-1].seq)
                live_after = live[-1].seq
                progressed = True

            if backlog:
                now = time.monotonic()
                tokens = min(tokens + (now - last) * st.historical_max_per_s,
                             float(st.batch_max_records))
                last = now
                if tokens >= 1:
                    batch = await self.buffer.read(CURSOR, limit=int(tokens))
                    batch = [r for r in batch if r.seq <= watermark]
                    if not batch:
                        backlog = False
                        log.info("backlog flushed up to seq %d", watermark)
                    else:
                        todo = [r for r in batch if not self._is_delivered(r.seq)]
                        await self._publish_batch(client, todo)
                        tokens -= len(todo)
                        await self.buffer.ack(CURSOR, batch[-1].seq)
                        self._forget_delivered(batch[-1].seq)
                        progressed = True
            if not backlog and live_after > max(acked, watermark):
                # Everything from the watermark to live_after is delivered: move the cursor.
                await self.buffer.ack(CURSOR, live_after)
                self._forget_delivered(live_after)
                acked = live_after
            if not progressed:
                if backlog:  # wait for the next backlog token, or for live records
                    await self._until(self.buffer.wait_for_records(
                        CURSOR, max(0.01, min(0.2, 1.0 / st.historical_max_per_s)),
                        after_seq=live_after))
                else:
                    await self._until(self.buffer.wait_for_records(CURSOR, 0.2,
                                                                   after_seq=live_after))

    @staticmethod
    def _inflight_limit(client: Client) -> int:
        """QoS 1 publishes we may have in flight: the broker's CONNACK Receive Maximum.

        gmqtt lowers its packet-id pool to that value and raises OverflowError beyond it
        (Mosquitto grants 20), so a backlog must never be pushed out all at once.
        """
        handler = getattr(client, "_package_handler", None)
        ids = getattr(handler, "id_generator", None)
        pool = getattr(ids, "_max", 20) or 20
        return max(1, min(pool - 2, 100))

    async def _publish_batch(self, client: Client, records: Sequence[Any]) -> None:
        """Publish at QoS 1 with a sliding window of PUBACKs and wait for all of them."""
        timeout = max(30.0, 3 * self.settings.keepalive)
        window = asyncio.Semaphore(self._inflight_limit(client))
        futures = []
        for rec in records:
            await self._until(window.acquire(), timeout)
            fut = self._publish_record(client, rec, self._is_historical(rec))
            if fut is None:
                window.release()
                continue
            fut.add_done_callback(lambda _f: window.release())
            futures.append(fut)
        if futures:
            await self._until(asyncio.gather(*futures), timeout)

    # Records PUBACKed but not yet passed by the cursor (live data sent during a backlog).
    # Kept across reconnects and rebirths of this process so they are not sent twice.

    def _note_delivered(self, lo: int, hi: int) -> None:
        if self._delivered and self._delivered[-1][1] >= lo - 1:
            self._delivered[-1] = (self._delivered[-1][0], max(hi, self._delivered[-1][1]))
        else:
            self._delivered.append((lo, hi))

    def _is_delivered(self, seq: int) -> bool:
        return any(lo <= seq <= hi for lo, hi in self._delivered)

    def _delivered_upto(self, after: int) -> int:
        """The end of the delivered range that continues right after `after`, else `after`."""
        for lo, hi in self._delivered:
            if lo <= after + 1 <= hi + 1:
                return hi
        return after

    def _forget_delivered(self, acked: int) -> None:
        self._delivered = [(max(lo, acked + 1), hi) for lo, hi in self._delivered if hi > acked]

    def _is_historical(self, rec: Any) -> bool:
        return rec.seq <= max(self._node_watermark, self._watermarks.get(rec.stream, 0))

    def _publish_record(self, client: Client, rec: Any, historical: bool) -> asyncio.Future[None] | None:
        mtype = rec.headers.get("type", "")
        if mtype not in ("DDATA", "NDATA"):
            return None  # bridged MQTT messages are for the Kafka uplink only
        try:
            device = self.node.device_of_stream(rec.stream)
        except PayloadError as exc:
            log.warning("record %d skipped: %s", rec.seq, exc)
            return None
        if device is not None and device not in self._born:
            # Stored while the device was dead: history, never live data after a DDEATH.
            historical = True
        correction_ms, unsynced = clock_fix(self.clock, rec.headers)
        try:
            data = stamp_data(rec.payload, seq=self._seq.take(), ts_ms=now_ms(), device=device,
                              aliases=self.aliases, historical=historical,
                              correction_ms=correction_ms, clock_unsynced=unsynced)
        except PayloadError as exc:
            log.warning("record %d skipped: %s", rec.seq, exc)
            return None
        assert self._acks is not None
        client.publish(self.node.topic(MessageType(mtype), device), data, qos=1, retain=False)
        self.counters["published"] += 1
        if historical:
            self.counters["historical"] += 1
        return self._acks.ack_future()

    async def _goodbye(self, client: Client) -> None:
        """Planned end of session: publish NDEATH (QoS 1, wait for PUBACK), then DISCONNECT.

        The specification asks for an NDEATH published by the edge node followed by
        DISCONNECT (tck-id-operational-behavior-edge-node-intentional-disconnect-*); a normal
        DISCONNECT then makes the broker discard the Will, so hosts see exactly one NDEATH.
        This is the same for MQTT 3.1.1 and 5.
        """
        self.connected_server = None
        try:
            client.publish(self.node.topic(MessageType.NDEATH), build_ndeath(self.bdseq or 0),
                           qos=1, retain=False)
            assert self._acks is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acks.wait_empty(), 5.0)
            await client.disconnect()
        except Exception as exc:  # the socket may already be gone: the Will covers it
            log.info("disconnect: %s", exc)

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        self.connected_server = None
        self._lost.set()
        if client is None:
            return
        if self._acks is not None:
            for fut in self._acks.waiters.values():
                if not fut.done():
                    fut.cancel()
            self._acks.waiters.clear()
        conn = client._connection  # gmqtt has no public abort
        with contextlib.suppress(Exception):
            if conn is not None and not conn.is_closing():
                # Abrupt close, no DISCONNECT: a dropped session must leave the Will (NDEATH)
                # to the broker; a clean DISCONNECT would discard it.
                conn._transport.abort()

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- inbound messages -----------------------------------------------------------------

    def _on_message(self, _client: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        try:
            t = parse_topic(topic)
        except TopicError as exc:
            log.warning("message on %r ignored: %s", topic, exc)
            return 0
        if t.message_type is MessageType.STATE and self._host is not None:
            try:
                if self._host.update(payload):
                    log.info("primary host %r is %s", t.host_id,
                             "online" if self._host.online else "offline")
                    self._host_changed.set()
            except PayloadError as exc:
                log.warning("%s", exc)
        elif t.message_type is MessageType.NCMD:
            self._on_ncmd(payload)
        elif t.message_type is MessageType.DCMD and t.device_id is not None:
            self._on_dcmd(t.device_id, payload)
        return 0

    def _on_ncmd(self, payload: bytes) -> None:
        cmd, rejected = parse_ncmd(payload)
        for r in rejected:
            self.counters["commands_rejected"] += 1
            log.warning("%s", r)
        if cmd.rebirth:
            now = time.monotonic()
            if now - self._last_rebirth < self.settings.rebirth_debounce:
                log.info("NCMD rebirth ignored: the last one was %.1fs ago", now - self._last_rebirth)
            else:
                self._last_rebirth = now
                self._rebirth_requested = True
                self.counters["rebirths"] += 1
                log.info("NCMD rebirth: NBIRTH and DBIRTHs again with bdSeq %s", self.bdseq)
        if cmd.next_server:
            self._next_server = True

    def _on_dcmd(self, device: str, payload: bytes) -> None:
        points = self.devices.get(device)
        if points is None:
            self.counters["commands_rejected"] += 1
            log.warning("DCMD for unknown device %r ignored", device)
            return
        writes, rejected = parse_dcmd(device, payload, points, self.aliases)
        for r in rejected:
            self.counters["commands_rejected"] += 1
            log.warning("%s", r)
        for w in writes:
            self.counters["commands"] += 1
            task = asyncio.get_running_loop().create_task(
                self._write(w.device, w.point, w.value), name=f"dcmd-write {w.device}/{w.point}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, device: str, point: str, value: Any) -> None:
        try:
            await self.write_cb(device, point, value)
            log.info("DCMD %s/%s = %r written", device, point, value)
        except DriverError as exc:
            self.counters["writes_failed"] += 1
            log.warning("DCMD %s/%s = %r failed: %s", device, point, value, exc)
        except Exception:
            self.counters["writes_failed"] += 1
            log.exception("DCMD %s/%s = %r: write callback crashed", device, point, value)

