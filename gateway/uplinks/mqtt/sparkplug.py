"""The Sparkplug B uplink: one edge node session on MQTT (gmqtt), fed from the buffer.

`SparkplugUplink.run()` owns everything: it connects to the configured servers in order
with backoff, sets the NDEATH Will with a persisted bdSeq, subscribes to NCMD/DCMD (and
the Primary Host's STATE) before any birth, publishes NBIRTH (seq 0) then every DBIRTH,
then the records of the buffer's "mqtt" cursor: it stamps seq and aliases at publish time,
publishes data at QoS 1 and acks the buffer only after PUBACK. Records stored before the
births are the backlog: sent with `is_historical`, oldest first, paced, while live records
keep flowing beside them. Births and deaths go at QoS 0 as the specification says.

We own reconnects: gmqtt's own reconnect would reuse the session (clean_session=False) and
the old Will, which Sparkplug forbids, so each connection is a fresh `MqttConnection` of the
shared client layer (gateway.uplinks.mqtt.client), which also reads every PUBACK's reason
code: a publish the broker refused is never taken for a delivered one. Link state, counters
and their log lines go through the uplink contract (gateway.uplinks.core).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmqtt import Message

from common.backoff import Backoff
from common.logs import fields as _fields
from drivers.base import DeviceEvent, DeviceState, DriverError, Sample, now_ms
from gateway.errors import UplinkError
from gateway.records import H_TYPE, SPARKPLUG_DATA_TYPES, clock_fix
from gateway.sparkplug.edge import (
    AliasTable,
    NodeIdentity,
    PointLike,
    build_dbirth,
    build_ddeath,
    build_nbirth,
    build_ndeath,
    check_point_names,
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
from gateway.sparkplug.node_metrics import (
    NodeMetricsReporter,
    build_ndata,
    node_metric_defs,
    read_system,
    values_from_status,
)
from gateway.sparkplug.topics import MessageType, TopicError, parse_topic, state_topic
from gateway.statefile import read_text, write_atomic
from gateway.uplinks.core import HELD_PREFIX, HeldDestination, Outcome, UplinkState, held_topics
from gateway.uplinks.mqtt.client import (
    RC_DISCONNECT_WITH_WILL,
    RC_SUCCESS,
    ConnectionLost,
    MqttClientSettings,
    MqttConnection,
    MqttError,
    PacketTooLarge,
    ServerList,
    puback_outcome,
    reason_text,
)

log = logging.getLogger(__name__)

CURSOR = "mqtt"
WriteCallback = Callable[[str, str, Any], Awaitable[None]]
Snapshot = Callable[[str], Mapping[str, Sample]]
NodeStatus = Callable[[], Awaitable[Mapping[str, Any]]]


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
    data_qos: int = 1
    historical_max_per_s: float = 500.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    batch_max_records: int = 200
    connect_timeout: float = 10.0
    software: str = "outpost"
    # No DATA for this long after a birth sequence: a host that reacts to the births (asks
    # for a rebirth on seeing the DBIRTH, or drops the session, as the TCK's
    # ReceiveCommandTest does) sees no DATA in between. Data waits in the buffer meanwhile.
    rebirth_quiet: float = 1.0
    node_metrics_interval: float = 5.0

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
            data_qos=m.data_qos, historical_max_per_s=m.historical_max_per_s,
            reconnect_min=m.reconnect_min, reconnect_max=m.reconnect_max,
        )

    def client(self) -> MqttClientSettings:
        return MqttClientSettings(
            servers=tuple(self.servers), username=self.username, password=self.password,
            ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
            keepalive=self.keepalive, protocol=self.protocol, connect_timeout=self.connect_timeout)

    @property
    def default_client_id(self) -> str:
        return self.client_id or f"outpost-{self.group_id}-{self.edge_node_id}"


_WAIT = object()  # _publish_record: the record waits for its device's DBIRTH


class _SessionEnded(Exception):
    """The connection is gone or must be dropped (lost, host offline, next server)."""


class _Refused(UplinkError):
    """The broker refused a publish: nothing of the batch is acknowledged to the buffer."""

    retriable = True


COUNTERS = ("published", "historical", "held", "quarantined", "births", "rebirths", "connects",
            "commands", "commands_rejected", "writes_failed", "refused", "skipped",
            "dropped_unconfigured", "node_data")
DELIVERED_FILE = "mqtt-delivered.json"



class SparkplugUplink:
    """The edge node on MQTT. Drive it with run(); stop() publishes NDEATH and disconnects."""

    def __init__(self, settings: MqttUplinkSettings, buffer: Any,
                 devices: Mapping[str, Sequence[PointLike]], write_cb: WriteCallback, *,
                 snapshot: Snapshot | None = None, clock: Any = None,
                 node_status: NodeStatus | None = None, uplinks: Sequence[str] = (CURSOR,)) -> None:
        try:
            self._servers = ServerList(settings.servers)  # fails here, not in the middle of run()
        except MqttError as exc:
            raise SparkplugError(str(exc)) from None
        self.settings = settings
        self.buffer = buffer
        self.devices = {d: list(p) for d, p in devices.items()}
        try:
            check_point_names(self.devices)
        except PayloadError as exc:
            raise SparkplugError(str(exc)) from None
        self.write_cb = write_cb
        self.snapshot = snapshot or (lambda device: {})
        self.clock = clock  # gateway.clock.ClockGuard: corrects or flags unsynced timestamps
        self.node = NodeIdentity(settings.group_id, settings.edge_node_id)
        self.aliases = AliasTable(self.devices) if settings.use_aliases else None
        self._bdseq_store = BdSeqStore(settings.data_dir)
        self._seq = SeqCounter()
        # The Primary Host's STATE, per server (timestamps on one server say nothing about
        # another); `_host` is the current server's, reset to offline on every connection.
        self._hosts: dict[str, PrimaryHostState] = {}
        self._host: PrimaryHostState | None = (
            self._hosts.setdefault(self._servers.current, PrimaryHostState(settings.primary_host_id))
            if settings.primary_host_id else None)
        self._offlines_at_birth = 0
        self._session_born = False             # an NBIRTH went out on this connection
        self._quiet_until = 0.0
        self._conn: MqttConnection | None = None
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
        self._saved_delivered: list[tuple[int, int]] = []
        self._delivered_path = Path(settings.data_dir) / DELIVERED_FILE
        self._rebirth_requested = False
        self._next_server = False
        # Records of devices without a DBIRTH in this session: device -> the lowest buffer seq
        # waiting. The cursor never passes them; they go out as history after the DBIRTH.
        self._waiting: dict[str, int] = {}
        self._unconfigured: set[str] = set()   # streams of removed devices, logged once each
        # The clock marker's value hosts hold as the live value, per device (None: the node),
        # from its birth and then its last live DATA: a trusted payload after a flagged one
        # carries the marker false once, so a host's live value does not stay true.
        self._clock_live: dict[str | None, bool] = {}
        self._live_after = 0
        self._backlog_pos: int | None = None
        self._backlog_active = False
        self.node_status = node_status
        self._node_reporter = (NodeMetricsReporter(node_metric_defs(list(uplinks)))
                               if node_status is not None else None)
        self._uplinks = list(uplinks)
        self._next_node_poll = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._established = False
        self.bdseq: int | None = None
        self.state = UplinkState("mqtt", counters=COUNTERS, logger=log)
        self.counters = self.state.counters  # the contract's counters, by their short name
        self.state.on_render = self._note_session
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._refusal_backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._held: dict[str, HeldDestination] = {}   # topics the broker refuses (see _serve_held)

    # -- what the runtime calls ----------------------------------------------------------

    def on_device_event(self, ev: DeviceEvent) -> None:
        """Queue a device state change; the publish loop sends DDEATH/DBIRTH in order."""
        if ev.device not in self.devices:
            log.warning("device event for unknown device ignored", extra=_fields(device=ev.device))
            return
        self._events.append(ev)

    @property
    def last_error(self) -> str:
        return self.state.last_error or ""

    def _note_session(self) -> None:
        """Sparkplug facts shown beside the link in `outpost status`."""
        self.state.extra.update({
            "bdseq": self.bdseq,
            "seq_next": self._seq.peek,
            "primary_host": None if self._host is None else {
                "id": self._host.host_id, "online": self._host.online},
            "devices_dead": sorted(self._dead),
        })

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

    async def run(self) -> None:
        """Connect, birth, publish; reconnects with backoff until cancelled or stopped."""
        await self.buffer.register_cursor(CURSOR)
        await self._load_held()
        await self._load_delivered()
        self._running = True
        self._finished.clear()
        try:
            while not self._stopping:
                url = self._servers.current
                self._established = False
                try:
                    await self._session(url)
                except _SessionEnded as exc:
                    if not self._stopping:
                        self.state.link_down(f"{url}: session ended: {exc}", server=url)
                except (OSError, TimeoutError, SparkplugError, UplinkError) as exc:
                    self.state.link_down(f"{url}: {exc}", server=url)
                finally:
                    await self._drop_client()
                if self._stopping:
                    break
                if self._established:
                    self._backoff.reset()  # the session worked: start the backoff over
                if not self._established or self._next_server:
                    self._servers.advance()  # failed, host offline, or NCMD Next Server
                self._next_server = False
                self._note_session()
                with contextlib.suppress(TimeoutError):  # stop() ends the backoff early
                    await asyncio.wait_for(self._stop_event.wait(), self._backoff.next())
        finally:
            await self._cancel_tasks()
            await self._drop_client()
            self.state.stopped()
            self._running = False
            self._finished.set()

    # -- one connection --------------------------------------------------------------------

    async def _session(self, url: str) -> None:
        st = self.settings
        # Failed attempts do not use up a bdSeq: NBIRTHs of successive sessions go +1.
        self.bdseq = await asyncio.to_thread(self._bdseq_store.candidate)
        will = Message(self.node.topic(MessageType.NDEATH), build_ndeath(self.bdseq),
                       qos=1, retain=False)
        conn = MqttConnection(st.client(), st.default_client_id, clean_session=True, will=will,
                              on_message=self._on_message)
        self._conn = conn
        self._session_born = False
        if st.primary_host_id:
            self._host = self._hosts.setdefault(url, PrimaryHostState(st.primary_host_id))
            self._host.begin_connection()
        await conn.open(url)
        await asyncio.to_thread(self._bdseq_store.commit, self.bdseq)
        self.state.count("connects")
        log.info("connected", extra=_fields(server=url, bdseq=self.bdseq))

        # Commands (and STATE) are subscribed before any birth, at QoS 1.
        topics = [self.node.topic(MessageType.NCMD),
                  f"spBv1.0/{st.group_id}/DCMD/{st.edge_node_id}/+"]
        if self._host is not None:
            topics.append(state_topic(self._host.host_id))
        await conn.subscribe(topics, qos=1)
        self._established = True
        self.state.link_up(url)
        self._note_session()
        client = conn

        while not self._stopping:
            if self._host is not None:
                await self._wait_host_online(client)
                if self._stopping:
                    break
            self._host_changed.clear()
            await self._births(client)
            await self._publish_loop(client)
            if not self._rebirth_requested:
                break
        if self._stopping:
            await self._goodbye(client)

    async def _conn_until(self, aw: Awaitable[Any], limit_s: float | None = None) -> Any:
        """Await `aw` unless the connection is lost first (then _SessionEnded)."""
        assert self._conn is not None
        try:
            return await self._conn.until(aw, limit_s)
        except ConnectionLost as exc:
            raise _SessionEnded(str(exc)) from None

    async def _wait_host_online(self, client: MqttConnection) -> None:
        """Wait on this connection for the host's online STATE.

        An offline STATE while waiting: with several servers, walk on to the next one (the
        host may be online there); with one, keep waiting here (reconnecting to the same
        server would only burn bdSeqs).
        """
        assert self._host is not None
        offlines = self._host.offlines
        while not self._host.online and not self._stopping:
            self._host_changed.clear()
            if self._host.offlines != offlines and len(self._servers.urls) > 1:
                self._next_server = True
                await self._goodbye(client)  # no NBIRTH yet: a plain DISCONNECT, no NDEATH
                raise _SessionEnded("primary host offline on this server")
            log.info("waiting for primary host", extra=_fields(host_id=self._host.host_id))
            await self._conn_until(self._host_changed.wait())

    async def _births(self, client: MqttConnection) -> None:
        """NBIRTH (seq 0), then a DBIRTH per live device; takes the historical watermark."""
        stats = await self.buffer.stats()
        node_metrics = await self._node_values()
        self._node_watermark = int(stats.get("last_seq") or 0)
        self._watermarks.clear()
        self._waiting.clear()  # the backlog lane starts again from the cursor, before all of them
        # From here to the NBIRTH nothing awaits: a rebirth request that arrived until now is
        # answered by this NBIRTH; one that arrives after it gets births of its own.
        self._rebirth_requested = False
        ts = now_ms()
        seq = self._seq.reset()
        born = (self._node_reporter.birth(node_metrics)
                if self._node_reporter is not None and node_metrics is not None else ())
        self._clock_live.clear()
        self._clock_live[None] = self._clock_untrusted()
        client.publish(self.node.topic(MessageType.NBIRTH),
                       build_nbirth(self.bdseq or 0, ts, seq=seq, software=self.settings.software,
                                    node_metrics=born, clock_unsynced=self._clock_live[None]),
                       qos=0, retain=False)
        self._session_born = True
        if self._host is not None:
            self._offlines_at_birth = self._host.offlines
        self._apply_pending_events()
        self._born.clear()
        for device, points in self.devices.items():
            if device in self._dead:
                continue
            self._dbirth(client, device, points)
        self._quiet_until = time.monotonic() + self.settings.rebirth_quiet
        self._next_node_poll = time.monotonic() + self.settings.node_metrics_interval
        self.state.count("births")
        log.info("births published", extra=_fields(bdseq=self.bdseq, dbirths=len(self._born)))

    def _dbirth(self, client: MqttConnection, device: str, points: Sequence[PointLike]) -> None:
        untrusted = self._clock_live[device] = self._clock_untrusted()
        client.publish(self.node.topic(MessageType.DBIRTH, device),
                       build_dbirth(device, points, self.snapshot(device), self.aliases,
                                    now_ms(), self._seq.take(), clock_unsynced=untrusted),
                       qos=0, retain=False)
        self._born.add(device)

    def _clock_untrusted(self) -> bool:
        """The clock marker's value in a birth: the clock is not trusted now."""
        return self.clock is not None and not self.clock.trusted

    def _apply_pending_events(self) -> None:
        """Before births: only the latest state of each device matters."""
        for ev in self._events:
            if ev.state is DeviceState.OFFLINE:
                self._dead.add(ev.device)
            else:
                self._dead.discard(ev.device)
        self._events.clear()

    async def _handle_events(self, client: MqttConnection) -> None:
        events, self._events = self._events, []
        for ev in events:
            if ev.state is DeviceState.OFFLINE and ev.device not in self._dead:
                self._dead.add(ev.device)
                if ev.device in self._born:
                    client.publish(self.node.topic(MessageType.DDEATH, ev.device),
                                   build_ddeath(now_ms(), self._seq.take()), qos=0, retain=False)
                    self._born.discard(ev.device)
                    log.info("DDEATH", extra=_fields(device=ev.device, reason=ev.reason or "offline"))
            elif ev.state is DeviceState.ONLINE and ev.device in self._dead:
                self._dead.discard(ev.device)
                # Records stored before this DBIRTH are history for this device.
                stats = await self.buffer.stats()
                self._watermarks[self.node.stream(ev.device)] = int(stats.get("last_seq") or 0)
                self._dbirth(client, ev.device, self.devices[ev.device])
                log.info("DBIRTH", extra=_fields(device=ev.device))
                await self._flush_waiting(client, ev.device)

    def _host_gone(self) -> bool:
        """The Primary Host went offline since the births (even if it is back already)."""
        h = self._host
        return h is not None and (not h.online or h.offlines != self._offlines_at_birth)

    def _stop_data(self) -> bool:
        """DATA must stop at once: checked before every single DATA publish."""
        return (self._rebirth_requested or self._stopping or self._next_server or self._host_gone()
                or (self._conn is not None and self._conn.lost.is_set()))

    async def _publish_loop(self, client: MqttConnection) -> None:
        """Publish the buffer in two lanes until the session ends or a rebirth is due.

        Live lane: records stored after the births' watermark, as they come, oldest first.
        Backlog lane: records up to the watermark, as history, oldest first, paced at
        `historical_max_per_s` so that live data keeps flowing during a long flush.
        Records of a device without a DBIRTH in this session wait (see _publish_record).
        The buffer cursor only moves over contiguous handled records: up to the backlog
        position while a backlog remains, then up to the live position, and never past a
        waiting record.
        """
        st = self.settings
        watermark = self._node_watermark
        self._live_after = max(watermark, self._delivered_upto(watermark))
        self._backlog_pos = None          # None: from the cursor
        self._backlog_active = True
        acked = 0
        tokens, last = 1.0, time.monotonic()
        quiet = self._quiet_until - time.monotonic()
        if quiet > 0:
            with contextlib.suppress(TimeoutError):
                await self._conn_until(self._stop_event.wait(), quiet)
        while not self._stopping:
            if client.lost.is_set():
                raise _SessionEnded("connection lost")
            if self._rebirth_requested:
                return
            if self._host_gone():
                assert self._host is not None
                log.warning("primary host offline: NDEATH, disconnect, next server",
                            extra=_fields(host_id=self._host.host_id))
                self._next_server = True
                await self._goodbye(client)
                raise _SessionEnded("primary host offline")
            if self._next_server:
                await self._goodbye(client)
                raise _SessionEnded("NCMD Next Server")
            if self._events:
                await self._handle_events(client)
                continue  # a DBIRTH may have started a quiet time, or a rebirth was asked
            if self._node_reporter is not None and time.monotonic() >= self._next_node_poll:
                await self._node_data(client)
            progressed = False

            live = await self.buffer.read(CURSOR, limit=st.batch_max_records, after_seq=self._live_after)
            if live:
                todo = [r for r in live if not self._is_delivered(r.seq)]
                stop, refused = await self._publish_batch(client, todo)
                self._live_after = live[-1].seq if stop is None else stop - 1
                progressed = True
                if self._backlog_active:
                    await self._save_delivered()
                if refused:
                    await self._hold_refused(client)
            if self._held and not self._stop_data() and await self._serve_held(client):
                progressed = True

            if self._backlog_active and not self._stop_data():
                now = time.monotonic()
                tokens = min(tokens + (now - last) * st.historical_max_per_s,
                             float(st.batch_max_records))
                last = now
                if tokens >= 1:
                    batch = await self.buffer.read(CURSOR, limit=int(tokens), after_seq=self._backlog_pos)
                    batch = [r for r in batch if r.seq <= watermark]
                    if not batch:
                        self._backlog_active = False
                        log.info("backlog flushed", extra=_fields(upto_seq=watermark))
                    else:
                        todo = [r for r in batch if not self._is_delivered(r.seq)]
                        stop, refused = await self._publish_batch(client, todo)
                        tokens -= len(todo)
                        self._backlog_pos = batch[-1].seq if stop is None else stop - 1
                        progressed = True
                        if refused:
                            await self._hold_refused(client)
            frontier = self._ack_frontier()
            if frontier is not None and frontier > acked:
                await self.buffer.ack(CURSOR, frontier)
                self._forget_delivered(frontier)
                acked = frontier
                await self._save_delivered()  # the ranges of a crash-safe flush shrink with it
            if not progressed:
                if self._backlog_active:  # wait for the next backlog token, or for live records
                    await self._conn_until(self.buffer.wait_for_records(
                        CURSOR, max(0.01, min(0.2, 1.0 / st.historical_max_per_s)),
                        after_seq=self._live_after))
                else:
                    await self._conn_until(self.buffer.wait_for_records(CURSOR, 0.2,
                                                                        after_seq=self._live_after))

    def _ack_frontier(self) -> int | None:
        """The highest buffer seq up to which every record is handled (None: none yet)."""
        if self._backlog_active:
            frontier = self._backlog_pos
        else:
            frontier = self._live_after
        if frontier is None:
            return None
        if self._waiting:
            frontier = min(frontier, min(self._waiting.values()) - 1)
        return frontier

    async def _flush_waiting(self, client: MqttConnection, device: str) -> None:
        """Right after a device's DBIRTH: its waiting records, as history, oldest first.

        Only records the lanes have already passed over; the rest they publish themselves.
        """
        first = self._waiting.get(device)
        if first is None:
            return
        stream = self.node.stream(device)
        upto = self._live_after
        after = first - 1
        while after < upto:
            batch = await self.buffer.read(CURSOR, limit=self.settings.batch_max_records, after_seq=after)
            if not batch:
                break
            after = batch[-1].seq
            todo = [r for r in batch if r.stream == stream and r.seq <= upto and not self._is_delivered(r.seq)
                    and not self._backlog_will_read(r.seq)]
            stop, _refused = await self._publish_batch(client, todo)
            if stop is not None:
                self._waiting[device] = stop  # the rest waits for the next pass or session
                return
        self._waiting.pop(device, None)

    def _backlog_will_read(self, seq: int) -> bool:
        if not self._backlog_active or seq > self._node_watermark:
            return False
        return self._backlog_pos is None or seq > self._backlog_pos

    async def _node_values(self) -> dict[str, Any] | None:
        """The node metrics' current values (None without a status source or on its failure)."""
        if self.node_status is None:
            return None
        try:
            status = dict(await self.node_status())
            status["system"] = await asyncio.to_thread(read_system, self.settings.data_dir)
            await self._oldest_per_uplink(status)
        except Exception as exc:  # node metrics never stop the session
            self.state.error("node_status", "node metrics unavailable", reason=repr(exc))
            return None
        return values_from_status(status, self._uplinks)

    async def _oldest_per_uplink(self, status: dict[str, Any]) -> None:
        """Set `oldest_age_s` of each uplink cursor: the age of its oldest undelivered record."""
        buffer = status.get("buffer")
        cursors = buffer.get("cursors") if isinstance(buffer, dict) else None
        if not isinstance(cursors, dict):
            return
        now = now_ms()
        for name in self._uplinks:
            c = cursors.get(name)
            if not isinstance(c, dict):
                continue
            c = cursors[name] = dict(c)
            oldest = await self.buffer.read(name, limit=1) if c.get("records") else []
            c["oldest_age_s"] = max(0.0, (now - oldest[0].ts_ms) / 1000) if oldest else 0.0

    async def _node_data(self, client: MqttConnection) -> None:
        """NDATA with the node metrics that changed (by exception), always at QoS 0."""
        self._next_node_poll = time.monotonic() + self.settings.node_metrics_interval
        values = await self._node_values()
        if values is None or self._node_reporter is None or self._stop_data():
            return
        changed = self._node_reporter.changes(values)
        if not changed:
            return
        untrusted = self._clock_untrusted()
        marker = True if untrusted else (False if self._clock_live.get(None) else None)
        data = build_ndata(changed, now_ms(), self._seq.peek, clock_marker=marker)
        client.publish(self.node.topic(MessageType.NDATA), data, qos=0, retain=False)
        self._seq.take()
        self._clock_live[None] = untrusted
        self.state.count("node_data")

    async def _publish_batch(self, client: MqttConnection,
                             records: Sequence[Any]) -> tuple[int | None, bool]:
        """Publish within the broker's Receive Maximum and wait for every PUBACK (QoS 1).

        Every outcome is classified (DESIGN rule 6). Delivered (or sent at QoS 0), or skipped
        as not for MQTT: noted as delivered. Refused for this record (too large for the broker,
        payload format): quarantined in the buffer, so the cursor moves past it. Refused for
        its topic (not authorised, quota, bad topic): quarantined as held for that topic, which
        is then held (its later records go aside too, in order) and probed until it accepts. A
        record of a held topic goes aside without being sent. A record of a device without
        DBIRTH in this session waits (see _publish_record). DATA stops before the next record
        as soon as _stop_data() says so. Returns (the seq of the first record not handled:
        stopped there, or retriable such as packet id in use; None when all were handled,
        whether one was retriable), so the caller moves its position only up to it. A
        refusal is never an ack.
        """
        timeout = max(30.0, 3 * self.settings.keepalive)
        window = asyncio.Semaphore(client.inflight_limit())
        pending: list[tuple[Any, str, asyncio.Future[int]]] = []
        aside: list[tuple[Any, str, str]] = []  # (record, quarantine reason, log detail)
        stopped_at: int | None = None
        for rec in records:
            if self._stop_data():
                stopped_at = rec.seq
                break
            topic = self._topic_of(rec)
            if topic is not None and topic in self._held:
                aside.append((rec, self._held[topic].reason_key, "topic held"))
                continue
            await self._conn_until(window.acquire(), timeout)
            if self._stop_data():
                window.release()
                stopped_at = rec.seq
                break
            try:
                sent = self._publish_record(client, rec, self._is_historical(rec))
            except PacketTooLarge as exc:
                window.release()
                aside.append((rec, "too_large", str(exc)))
                continue
            if sent is None or sent is _WAIT:
                window.release()
                if sent is None:
                    self._note_delivered(rec.seq, rec.seq)
                continue
            assert isinstance(sent, tuple)
            topic, fut = sent
            fut.add_done_callback(lambda _f: window.release())
            pending.append((rec, topic, fut))
        if pending:
            await self._conn_until(asyncio.gather(*(f for _, _, f in pending)), timeout)
        delivered = historical = 0
        retry_from: int | None = None
        for rec, topic, fut in pending:
            code = fut.result()
            outcome = puback_outcome(code)
            if outcome is Outcome.DELIVERED:
                self._note_delivered(rec.seq, rec.seq)
                delivered += 1
                historical += self._is_historical(rec)
            elif outcome is Outcome.REFUSED_DESTINATION:
                self._hold(topic, f"PUBACK {reason_text(code)}")
                aside.append((rec, self._held[topic].reason_key, f"PUBACK {reason_text(code)}"))
            elif outcome is Outcome.REFUSED_RECORD:
                aside.append((rec, f"refused_0x{code:02x}", f"PUBACK {reason_text(code)}"))
            else:
                self.state.count("refused")
                retry_from = rec.seq if retry_from is None else min(retry_from, rec.seq)
        self.state.count("published", delivered)
        self.state.count("historical", historical)
        for rec, reason, detail in sorted(aside, key=lambda a: a[0].seq):
            if retry_from is not None and rec.seq > retry_from:
                continue  # offered again with the retriable one, in order
            await self.buffer.quarantine(CURSOR, rec.seq, reason)
            self._note_delivered(rec.seq, rec.seq)  # handled: the cursor may pass it
            if reason.startswith(HELD_PREFIX):
                self.state.count("held")
            else:
                self.state.count("quarantined")
                self.state.error(f"quarantine:{reason}", "record quarantined: the broker refuses it",
                                 seq=rec.seq, stream=rec.stream, reason=detail)
        firsts = [x for x in (stopped_at, retry_from) if x is not None]
        return (min(firsts) if firsts else None), retry_from is not None

    async def _hold_refused(self, client: MqttConnection) -> None:
        """A refusal is not a link failure: keep the session, wait, then offer the records again."""
        delay = self._refusal_backoff.next()
        with contextlib.suppress(TimeoutError):
            await self._conn_until(self._stop_event.wait(), delay)

    def _topic_of(self, rec: Any) -> str | None:
        """The MQTT topic a record is published on (None: not for MQTT, or not this node's)."""
        mtype = rec.headers.get(H_TYPE, "")
        if mtype not in SPARKPLUG_DATA_TYPES:
            return None
        try:
            device = self.node.device_of_stream(rec.stream)
        except PayloadError:
            return None
        return self.node.topic(MessageType(mtype), device)

    # -- held destinations: refused topics, probed until they accept --------------------------

    def _hold(self, topic: str, reason: str) -> None:
        if topic not in self._held:
            st = self.settings
            self._held[topic] = HeldDestination(topic, Backoff(st.reconnect_min, st.reconnect_max))
        held = self._held[topic]
        held.draining = False
        held.next_probe = time.monotonic() + held.backoff.next()
        self.state.refuse(topic, reason)

    async def _load_held(self) -> None:
        """After a restart: topics with records held in the buffer are probed first."""
        st = self.settings
        for topic in held_topics(await self.buffer.stats(), CURSOR):
            self._held.setdefault(topic, HeldDestination(topic, Backoff(st.reconnect_min, st.reconnect_max)))

    async def _serve_held(self, client: MqttConnection) -> bool:
        """Probe each held topic with its oldest record; drain a topic that accepts again.

        Records of a held topic read meanwhile keep going aside behind the older ones, so the
        drain delivers them all oldest first; the topic flows directly again only once
        nothing of it is held. Returns True when something was sent.
        """
        sent = False
        now = time.monotonic()
        for topic, held in list(self._held.items()):
            if not held.draining and now < held.next_probe:
                continue
            parts = topic.split("/")
            device = parts[4] if len(parts) > 4 else None
            if device is not None and device not in self._born:
                continue  # its device has no DBIRTH in this session: no DATA for it yet
            if self._stop_data():
                break
            # Within the broker's Receive Maximum: gmqtt runs out of packet ids beyond it.
            limit = min(self.settings.batch_max_records, client.inflight_limit()) if held.draining else 1
            batch = await self.buffer.quarantine_list(CURSOR, held.reason_key, limit=limit)
            if not batch:
                del self._held[topic]
                self.state.accept(topic)
                log.info("held topic flows again", extra=_fields(topic=topic))
                continue
            delivered: list[int] = []
            refused = ""
            futures = []
            for rec in batch:
                try:
                    out = self._publish_record(client, rec, True)
                except PacketTooLarge as exc:
                    refused = str(exc)  # it stays held; the operator decides (outpost buffer quarantine)
                    break
                if out is None:
                    delivered.append(rec.seq)  # skipped (not encodable): counted by _skip
                elif isinstance(out, tuple):
                    futures.append((rec, out[1]))
            if futures:
                await self._conn_until(asyncio.gather(*(f for _, f in futures)),
                                       max(30.0, 3 * self.settings.keepalive))
            for rec, fut in futures:
                code = fut.result()
                if puback_outcome(code) is Outcome.DELIVERED:
                    delivered.append(rec.seq)
                elif not refused:
                    refused = f"PUBACK {reason_text(code)}"
            if delivered:
                await self.buffer.quarantine_delivered(CURSOR, delivered)
                n = len(futures) - (1 if refused and futures else 0)
                self.state.count("published", max(0, min(n, len(delivered))))
                self.state.count("historical", max(0, min(n, len(delivered))))
                sent = True
            if refused:
                self._hold(topic, refused)
            else:
                held.draining = True
                held.backoff.reset()
        return sent

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

    # During a backlog flush the cursor stays at the backlog's position while live records
    # are delivered beyond it; their ranges are kept in a small state file, so that a crash
    # in the middle of a long flush re-sends at most the batch in flight, not every live
    # record delivered since the flush began (DESIGN guarantee 3).

    async def _save_delivered(self) -> None:
        if self._delivered == self._saved_delivered:
            return
        doc = json.dumps({"cursor": CURSOR, "delivered": self._delivered})
        await asyncio.to_thread(write_atomic, self._delivered_path, doc)
        self._saved_delivered = list(self._delivered)

    async def _load_delivered(self) -> None:
        text = await asyncio.to_thread(read_text, self._delivered_path)
        if not text:
            return
        try:
            ranges = [(int(lo), int(hi)) for lo, hi in json.loads(text)["delivered"]]
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("delivered-ranges file ignored", extra=_fields(path=str(self._delivered_path),
                                                                        reason=str(exc)))
            return
        acked = ((await self.buffer.stats()).get("cursors", {}).get(CURSOR) or {}).get("acked_seq") or 0
        self._delivered = sorted(ranges)
        self._forget_delivered(int(acked))
        self._saved_delivered = list(self._delivered)

    def _forget_delivered(self, acked: int) -> None:
        self._delivered = [(max(lo, acked + 1), hi) for lo, hi in self._delivered if hi > acked]

    def _is_historical(self, rec: Any) -> bool:
        return rec.seq <= max(self._node_watermark, self._watermarks.get(rec.stream, 0))

    def _publish_record(self, client: MqttConnection, rec: Any,
                        historical: bool) -> tuple[str, asyncio.Future[int]] | object | None:
        """Stamp and publish one record: (topic, PUBACK future); None if it is not for MQTT
        (or skipped, or dropped); _WAIT if its device has no DBIRTH in this session."""
        mtype = rec.headers.get(H_TYPE, "")
        if mtype not in SPARKPLUG_DATA_TYPES:
            return None  # bridged MQTT messages are for the Kafka uplink only
        try:
            device = self.node.device_of_stream(rec.stream)
        except PayloadError as exc:
            self._skip(rec, exc)
            return None
        if device is not None and device not in self._born:
            if device not in self.devices:
                # A device removed from the configuration is never born again: count, step past.
                self.state.count("dropped_unconfigured")
                if rec.stream not in self._unconfigured:
                    self._unconfigured.add(rec.stream)
                    log.warning("records of a device that is no longer configured are dropped",
                                extra=_fields(device=device, first_seq=rec.seq))
                return None
            # No DBIRTH in this session (dead, or offline since boot): no host could read its
            # DATA. It waits, and goes out as history right after the device's DBIRTH.
            if rec.seq < self._waiting.get(device, rec.seq + 1):
                self._waiting[device] = rec.seq
            return _WAIT
        fix = clock_fix(self.clock, rec.headers)
        # History never changes a host's live value: only live payloads end a flagged run.
        resynced = not historical and not fix.unsynced and self._clock_live.get(device, False)
        try:
            # seq is taken only once the record stamped: a skipped record leaves no gap.
            data = stamp_data(rec.payload, seq=self._seq.peek, ts_ms=now_ms(), device=device,
                              aliases=self.aliases, historical=historical,
                              correction_ms=fix.correction_ms, clock_unsynced=fix.unsynced,
                              clock_resynced=resynced)
        except PayloadError as exc:
            self._skip(rec, exc)
            return None
        topic = self.node.topic(MessageType(mtype), device)
        fut = client.publish(topic, data, qos=self.settings.data_qos, retain=False)
        self._seq.take()
        if not historical:
            self._clock_live[device] = fix.unsynced
        if fut is None:  # data_qos = 0: handed to the connection is all there is
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(RC_SUCCESS)
        return topic, fut

    def _skip(self, rec: Any, exc: Exception) -> None:
        self.state.count("skipped")
        self.state.error(f"skip:{type(exc).__name__}", "record skipped",
                         seq=rec.seq, stream=rec.stream, reason=str(exc))

    async def _goodbye(self, client: MqttConnection) -> None:
        """Planned end of session: publish NDEATH (QoS 1, wait for PUBACK), then DISCONNECT.

        The specification asks for an NDEATH published by the edge node followed by
        DISCONNECT (tck-id-operational-behavior-edge-node-intentional-disconnect-*), with the
        MQTT 5 reason 0x04 Disconnect with Will Message
        (tck-id-payloads-ndeath-will-message-publisher-disconnect-mqtt50): the broker then
        delivers the Will too, so hosts see the NDEATH twice with the same bdSeq. MQTT 3.1.1
        has no reason code; its DISCONNECT discards the Will. Without an NBIRTH in this
        session (stopped while waiting for the Primary Host) there is no NDEATH at all: a
        plain DISCONNECT, which discards the Will.
        """
        if not self._session_born:
            await client.close(RC_SUCCESS)
            return
        try:
            client.publish(self.node.topic(MessageType.NDEATH), build_ndeath(self.bdseq or 0),
                           qos=1, retain=False)
            await client.wait_acks(5.0)
        except Exception as exc:  # the socket may already be gone: the Will covers it
            log.info("NDEATH not confirmed", extra=_fields(reason=str(exc)))
        self._session_born = False
        await client.close(RC_DISCONNECT_WITH_WILL)

    async def _drop_client(self) -> None:
        """Abrupt close, no DISCONNECT: a dropped session leaves the Will (NDEATH) to the broker."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()

    async def _cancel_tasks(self) -> None:
        tasks, self._tasks = self._tasks, set()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    # -- inbound messages -----------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        try:
            t = parse_topic(topic)
        except TopicError as exc:
            log.warning("message ignored", extra=_fields(topic=topic, reason=str(exc)))
            return 0
        if t.message_type is MessageType.STATE and self._host is not None:
            try:
                if self._host.update(payload):
                    log.info("primary host state", extra=_fields(host_id=t.host_id, online=self._host.online))
                    self._host_changed.set()
            except PayloadError as exc:
                log.warning("bad STATE message", extra=_fields(reason=str(exc)))
        else:
            try:
                if t.message_type is MessageType.NCMD:
                    self._on_ncmd(payload)
                elif t.message_type is MessageType.DCMD and t.device_id is not None:
                    self._on_dcmd(t.device_id, payload)
            except Exception as exc:  # no command can take the session down (DESIGN rule 7)
                self.state.count("commands_rejected")
                self.state.error(f"command:{type(exc).__name__}", "command could not be handled",
                                 topic=topic, reason=f"{type(exc).__name__}: {exc}")
        return 0

    def _on_ncmd(self, payload: bytes) -> None:
        cmd, rejected = parse_ncmd(payload)
        for r in rejected:
            self.state.count("commands_rejected")
            log.warning("command rejected", extra=_fields(reason=str(r)))
        if cmd.rebirth:
            # Every request is honoured: those that arrive before the pending NBIRTH goes out
            # are answered by it, a later one gets births of its own. DATA stops at once.
            if self._rebirth_requested:
                log.info("NCMD rebirth merged with the pending one", extra=_fields(bdseq=self.bdseq))
            else:
                self._rebirth_requested = True
                log.info("NCMD rebirth", extra=_fields(bdseq=self.bdseq))
            self.state.count("rebirths")
        if cmd.next_server:
            self._next_server = True

    def _on_dcmd(self, device: str, payload: bytes) -> None:
        points = self.devices.get(device)
        if points is None:
            self.state.count("commands_rejected")
            log.warning("DCMD for unknown device ignored", extra=_fields(device=device))
            return
        writes, rejected = parse_dcmd(device, payload, points, self.aliases)
        for r in rejected:
            self.state.count("commands_rejected")
            log.warning("command rejected", extra=_fields(reason=str(r)))
        for w in writes:
            self.state.count("commands")
            task = asyncio.get_running_loop().create_task(
                self._write(w.device, w.point, w.value), name=f"dcmd-write {w.device}/{w.point}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(self, device: str, point: str, value: Any) -> None:
        try:
            await self.write_cb(device, point, value)
            log.info("DCMD written", extra=_fields(device=device, point=point, value=value))
        except DriverError as exc:
            self.state.count("writes_failed")
            log.warning("DCMD write failed", extra=_fields(device=device, point=point, value=value, reason=str(exc)))
        except Exception:
            self.state.count("writes_failed")
            log.exception("DCMD write crashed", extra=_fields(device=device, point=point, value=value))

