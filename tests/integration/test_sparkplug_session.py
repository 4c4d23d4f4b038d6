"""The Sparkplug edge node against a real Mosquitto, checked message by message.

A test Primary Host (below) publishes STATE and records every message on `spBv1.0/#`;
the tests drive a SparkplugUplink over a real buffer and check order, seq, bdSeq, births,
rebirth, DCMD writes, DDEATH/DBIRTH, the Primary Host rules and the planned-shutdown NDEATH.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv50

from buffer import AsyncBuffer, BufferSettings
from drivers.base import DeviceEvent, DeviceState, PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import NodeIdentity
from gateway.sparkplug.errors import TopicError
from gateway.sparkplug.payload import (
    DataType,
    Metric,
    Payload,
    decode_payload,
    encode_payload,
)
from gateway.sparkplug.topics import MessageType, Topic, parse_topic
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
GROUP, EDGE = "plant-7", "pump-3"
POINTS = {
    "meter1": [PointInfo("voltage", "float32", unit="V", deadband=0.5),
               PointInfo("setpoint", "int16", writable=True, min=-100, max=100)],
    "meter2": [PointInfo("on", "bool", writable=True)],
}


@dataclass
class Broker:
    host: str
    port: int


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest):
    try:
        m = request.getfixturevalue("mosquitto")
        yield Broker(m.host, m.port)
        return
    except pytest.FixtureLookupError:
        pass
    # The harness fixture is not available: run a private broker for this module.
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"outpost-sp-mosq-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "log_dest none\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        time.sleep(0.05)
    yield Broker("127.0.0.1", port)
    proc.terminate()
    proc.wait(10)


@dataclass
class Seen:
    topic: str
    raw: bytes
    qos: int
    retain: bool
    at: float
    parsed: Topic | None
    payload: Payload | None

    @property
    def type(self) -> str:
        return str(self.parsed.message_type) if self.parsed else ""

    def metric(self, name: str) -> Any:
        assert self.payload is not None
        for m in self.payload.metrics:
            if m.name == name:
                return m
        raise KeyError(name)


class TestHost:
    __test__ = False  # not a test class

    def __init__(self, host: str, port: int, host_id: str = "scada-1") -> None:
        self.host, self.port, self.host_id = host, port, host_id
        self.seen: list[Seen] = []
        self.malformed: list[str] = []   # topics under spBv1.0/ that are not Sparkplug topics
        self.client = Client(f"test-host-{uuid.uuid4().hex[:8]}")
        self._types: dict[tuple[str, str | None], dict[Any, DataType]] = {}
        self._changed = asyncio.Event()

    async def start(self, online: bool | None = True) -> TestHost:
        self.client.on_message = self._on_message
        await self.client.connect(self.host, self.port, version=MQTTv50)
        # Retain-As-Published: without it an MQTT 5 server clears RETAIN on every live
        # delivery, and a check that births and data are not retained could never fail.
        self.client.subscribe("spBv1.0/#", qos=1, retain_as_published=True)
        await asyncio.sleep(0.2)  # SUBACK before anything is published
        if online is not None:
            self.publish_state(online)
            # Our own retained STATE must come back flagged retained: proof that the
            # retain flag of what we record is the publisher's.
            own = await self.wait_for(lambda: [s for s in self.seen if s.topic == self.state_topic],
                                      what="our own STATE")
            assert own[-1].retain, "the broker did not keep RETAIN as published"
        return self

    @property
    def state_topic(self) -> str:
        return f"spBv1.0/STATE/{self.host_id}"

    def publish_state(self, online: bool, ts: int | None = None) -> None:
        body = json.dumps({"online": online, "timestamp": ts or time.time_ns() // 1_000_000})
        self.client.publish(f"spBv1.0/STATE/{self.host_id}", body, qos=1, retain=True)

    async def stop(self) -> None:
        # Leave no retained STATE behind for the next test.
        self.client.publish(f"spBv1.0/STATE/{self.host_id}", b"", qos=1, retain=True)
        await asyncio.sleep(0.1)
        await self.client.disconnect()

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.client.publish(topic, payload, qos=qos)

    def _on_message(self, _c: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        parsed = None
        decoded = None
        try:
            parsed = parse_topic(topic)
        except TopicError as exc:
            # Not swallowed: wait_for fails at once naming it, instead of timing out later.
            self.malformed.append(f"{topic}: {exc}")
        if parsed is not None and parsed.message_type is not MessageType.STATE:
            key = (parsed.edge_node_id, parsed.device_id)
            types = self._types.setdefault(key, {})

            def lookup(name: str | None, alias: int | None) -> DataType | None:
                return types.get(name) if name is not None else types.get(alias)

            decoded = decode_payload(payload, lookup)
            if parsed.message_type in (MessageType.NBIRTH, MessageType.DBIRTH):
                for m in decoded.metrics:
                    types[m.name] = m.datatype
                    if m.alias is not None:
                        types[m.alias] = m.datatype
        self.seen.append(Seen(topic, payload, qos, bool(props.get("retain", 0)), time.monotonic(),
                              parsed, decoded))
        self._changed.set()
        return 0

    def of_type(self, *types: str) -> list[Seen]:
        return [s for s in self.seen if s.type in types]

    async def wait_for(self, pred: Any, limit_s: float = 20.0, what: str = "messages") -> Any:
        deadline = time.monotonic() + limit_s
        while True:
            if self.malformed:
                raise AssertionError(f"malformed Sparkplug topics seen while waiting for {what}: "
                                     f"{self.malformed}")
            result = pred()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                summary = [(s.type or s.topic, s.payload.seq if s.payload else None)
                           for s in self.seen[-30:]]
                raise AssertionError(f"timed out waiting for {what}; last seen: {summary}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass


# ----------------------------------------------------------------------------------------
# Helpers


def settings(broker: Broker, data_dir: Path, **kw: Any) -> MqttUplinkSettings:
    base = dict(group_id=GROUP, edge_node_id=EDGE, data_dir=str(data_dir),
                servers=[f"mqtt://{broker.host}:{broker.port}"],
                client_id=f"edge-{uuid.uuid4().hex[:6]}", keepalive=5, primary_host_id="scada-1",
                historical_max_per_s=1000, reconnect_min=0.2,
                reconnect_max=1.0)
    base.update(kw)
    return MqttUplinkSettings(**base)


class Rig:
    """An uplink with its buffer and report-by-exception stage, run as an owned task."""

    def __init__(self, broker: Broker, data_dir: Path, **kw: Any) -> None:
        self.broker, self.data_dir, self.kw = broker, data_dir, kw
        self.node = NodeIdentity(GROUP, EDGE)
        self.rbe = ReportByException(self.node, POINTS)
        self.writes: list[tuple[str, str, Any]] = []
        self.task: asyncio.Task[None] | None = None

    async def open(self, node_status: Any = None) -> Rig:
        self.buf = await AsyncBuffer.open(self.data_dir / "buffer.db",
                                          BufferSettings(10_000_000, 86400.0))
        await self.buf.register_cursor("mqtt")

        async def write(device: str, point: str, value: Any) -> None:
            self.writes.append((device, point, value))

        self.uplink = SparkplugUplink(settings(self.broker, self.data_dir, **self.kw), self.buf,
                                      POINTS, write, snapshot=self.rbe.snapshot, node_status=node_status)
        return self

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.uplink.run(), name="uplink")

    async def sample(self, device: str, point: str, value: Any, ts: int | None = None,
                     quality: Quality = Quality.GOOD) -> None:
        self.rbe.offer(Sample(device, point, value, ts or time.time_ns() // 1_000_000, quality))
        records = self.rbe.drain()
        if records:
            await self.buf.append(records)

    async def close(self, graceful: bool = True) -> None:
        if graceful:
            await self.uplink.stop()
        if self.task is not None:
            if not graceful:
                self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self.task, 10)
        await self.buf.close()


@pytest.fixture
async def host(broker: Broker):
    h = await TestHost(broker.host, broker.port).start(online=True)
    yield h
    await h.stop()


async def retained_on(broker: Broker, topic_filter: str) -> list[str]:
    """Topics under `topic_filter` that hold a retained message now (a fresh subscriber's view)."""
    got: list[str] = []
    c = Client(f"retained-{uuid.uuid4().hex[:8]}")
    c.on_message = lambda _c, topic, _p, _q, props: got.append(topic) or 0
    await c.connect(broker.host, broker.port, version=MQTTv50)
    c.subscribe(topic_filter, qos=1)
    await asyncio.sleep(0.5)  # retained messages come right after the SUBACK
    await c.disconnect()
    return got


def seqs(msgs: list[Seen]) -> list[int | None]:
    return [m.payload.seq if m.payload else None for m in msgs]


def node_msgs(host: TestHost) -> list[Seen]:
    return [s for s in host.seen if s.parsed and s.parsed.message_type is not MessageType.STATE
            and s.parsed.edge_node_id == EDGE]


# ----------------------------------------------------------------------------------------
# Tests


async def test_births_then_history_then_live_data(broker: Broker, host: TestHost,
                                                  tmp_path: Path) -> None:
    rig = await Rig(broker, tmp_path).open()
    t0 = time.time_ns() // 1_000_000 - 60_000
    await rig.sample("meter1", "voltage", 230.0, t0)          # stored while offline
    await rig.sample("meter1", "setpoint", -42, t0 + 1)
    rig.start()
    try:
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 2, what="2 DDATA")
        await rig.sample("meter1", "voltage", 231.0)          # live, beyond the deadband
        await rig.sample("meter1", "voltage", 231.2)          # within the deadband: not sent
        await rig.sample("meter2", "on", True)
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 4, what="4 DDATA")
        await asyncio.sleep(0.3)
    finally:
        await rig.close()
    msgs = node_msgs(host)
    types = [m.type for m in msgs]
    assert types[:3] == ["NBIRTH", "DBIRTH", "DBIRTH"], types
    assert types[-1] == "NDEATH"
    assert all(m.qos == 0 and not m.retain for m in msgs if m.type.endswith("BIRTH"))
    assert all(m.qos == 1 and not m.retain for m in msgs if m.type == "DDATA")
    # One seq counter: NBIRTH 0, then +1 per message.
    body = [m for m in msgs if m.type != "NDEATH"]
    assert seqs(body) == list(range(len(body)))
    assert all(m.payload.timestamp for m in body)
    assert all(x.timestamp for m in body for x in m.payload.metrics)
    nbirth = msgs[0]
    bd = nbirth.metric("bdSeq")
    assert bd.datatype is DataType.Int64 and bd.value == 0
    rebirth = nbirth.metric("Node Control/Rebirth")
    assert rebirth.datatype is DataType.Boolean and rebirth.value is False and rebirth.alias is None
    assert nbirth.payload.timestamp is not None
    dbirth1 = next(m for m in msgs if m.type == "DBIRTH" and m.parsed.device_id == "meter1")
    volt = dbirth1.metric("voltage")
    assert volt.datatype is DataType.Float and volt.properties["engUnit"].value == "V"
    assert volt.properties["readOnly"].value is True
    sp = dbirth1.metric("setpoint")
    assert sp.properties["readOnly"].value is False and sp.properties["engLow"].value == -100
    aliases = {m.alias for b in host.of_type("DBIRTH") for m in b.payload.metrics}
    assert len(aliases) == 5 and None not in aliases  # unique across the node (3 points, 2 clock markers)
    ddata = host.of_type("DDATA")
    hist, live = ddata[:2], ddata[2:]
    # History first, oldest first, with the original timestamps and is_historical.
    assert [m.payload.metrics[0].timestamp for m in hist] == [t0, t0 + 1]
    assert all(x.is_historical for m in hist for x in m.payload.metrics)
    assert hist[0].payload.metrics[0].value == 230.0 and hist[1].payload.metrics[0].value == -42
    assert all(x.name is None and x.alias is not None for m in ddata for x in m.payload.metrics)
    assert not any(x.is_historical for m in live for x in m.payload.metrics)
    values = [x.value for m in live for x in m.payload.metrics]
    assert values == [231.0, True]
    ndeath = msgs[-1]
    assert ndeath.metric("bdSeq").value == 0 and ndeath.qos == 1 and not ndeath.retain
    assert ndeath.payload.seq is None and len(ndeath.payload.metrics) == 1
    # Nothing the edge node published stayed on the broker.
    assert await retained_on(broker, f"spBv1.0/{GROUP}/#") == []


async def test_bdseq_persists_across_restarts(broker: Broker, host: TestHost,
                                              tmp_path: Path) -> None:
    for expected in (0, 1, 2):
        rig = await Rig(broker, tmp_path).open()
        rig.start()
        await host.wait_for(lambda n=expected: len(host.of_type("NBIRTH")) > n, what="NBIRTH")
        await asyncio.sleep(0.2)
        await rig.close()
        await host.wait_for(lambda n=expected: len(host.of_type("NDEATH")) > n, what="NDEATH")
    births = [m.metric("bdSeq").value for m in host.of_type("NBIRTH")]
    # MQTT 5: the node's own NDEATH, then the same one as the Will (DISCONNECT reason 0x04).
    deaths = [m.metric("bdSeq").value for m in host.of_type("NDEATH")]
    assert births == [0, 1, 2] and list(dict.fromkeys(deaths)) == [0, 1, 2]
    assert all(deaths.count(b) <= 2 for b in births)
    assert (tmp_path / "sparkplug-bdseq").read_text().strip() == "2"


# Every rebirth request is honoured (no debounce): a second host asking a second after the
# first still gets its births.
async def test_ncmd_rebirth_same_bdseq_no_reconnect_every_request(broker: Broker, host: TestHost,
                                                                 tmp_path: Path) -> None:
    rig = await Rig(broker, tmp_path).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        await rig.sample("meter1", "voltage", 12.0)
        await host.wait_for(lambda: host.of_type("DDATA"), what="DDATA")
        connects = rig.uplink.counters["connects"]
        cmd = encode_payload(Payload(timestamp=1, metrics=[
            Metric("Node Control/Rebirth", DataType.Boolean, True)]))
        host.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", cmd)
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="second NBIRTH")
        await host.wait_for(lambda: len(host.of_type("DBIRTH")) >= 4, what="second DBIRTHs")
        await rig.sample("meter1", "voltage", 20.0)
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 2, what="DDATA after rebirth")
        host.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", cmd)  # well inside the old 1 s debounce
        await host.wait_for(lambda: len(host.of_type("DBIRTH")) >= 6, what="third births")
        await asyncio.sleep(0.5)
        assert rig.uplink.counters["connects"] == connects  # no reconnect
    finally:
        await rig.close()
    nbirths = host.of_type("NBIRTH")
    assert len(nbirths) == 3
    assert [n.metric("bdSeq").value for n in nbirths] == [0, 0, 0]
    for nb in nbirths[1:]:
        i = host.seen.index(nb)
        after = [m for m in host.seen[i:] if m.type and m.type != "NDEATH"]
        assert [m.type for m in after[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
        assert seqs(after[:3]) == [0, 1, 2]
    i = host.seen.index(nbirths[1])
    between = [m for m in host.seen[i:host.seen.index(nbirths[2])]
               if m.type in ("NBIRTH", "DBIRTH", "DDATA", "NDATA", "DDEATH")]
    assert seqs(between) == list(range(len(between)))
    # NDEATH only at the planned stop (the node's own, then the Will with DISCONNECT 0x04)
    assert all(host.seen.index(d) > host.seen.index(nbirths[2]) for d in host.of_type("NDEATH"))


async def test_dcmd_by_alias_and_name_reaches_write_callback(broker: Broker, host: TestHost,
                                                             tmp_path: Path) -> None:
    rig = await Rig(broker, tmp_path).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        dbirth = next(m for m in host.of_type("DBIRTH") if m.parsed.device_id == "meter1")
        alias = dbirth.metric("setpoint").alias
        topic1 = f"spBv1.0/{GROUP}/DCMD/{EDGE}/meter1"
        host.publish(topic1, encode_payload(Payload(timestamp=1, metrics=[
            Metric(alias=alias, datatype=DataType.Int16, value=-5)])))
        host.publish(f"spBv1.0/{GROUP}/DCMD/{EDGE}/meter2", encode_payload(Payload(
            timestamp=1, metrics=[Metric("on", DataType.Boolean, False)])))
        # Refused: read-only, out of range, unknown, wrong type; none reaches the driver.
        host.publish(topic1, encode_payload(Payload(timestamp=1, metrics=[
            Metric("voltage", DataType.Float, 1.0),
            Metric("setpoint", DataType.Int16, 500),
            Metric("nope", DataType.Int16, 1),
            Metric("setpoint", DataType.String, "x")])))
        host.publish(topic1, b"\xff\x00garbage")
        await host.wait_for(lambda: len(rig.writes) >= 2 or None, limit_s=3, what="writes")
        await asyncio.sleep(0.5)
    finally:
        await rig.close()
    assert sorted(rig.writes) == [("meter1", "setpoint", -5), ("meter2", "on", False)]
    assert rig.uplink.counters["commands_rejected"] == 5


# A device gets no DATA between its DDEATH and its next DBIRTH; what was stored meanwhile
# waits and is sent as history right after that DBIRTH.
async def test_ddeath_and_dbirth_follow_device_events(broker: Broker, host: TestHost,
                                                      tmp_path: Path) -> None:
    rig = await Rig(broker, tmp_path).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        rig.uplink.on_device_event(DeviceEvent("meter2", DeviceState.OFFLINE, "timeout"))
        await host.wait_for(lambda: host.of_type("DDEATH"), what="DDEATH")
        await rig.sample("meter2", "on", True)   # stored while dead: waits for the DBIRTH
        await rig.sample("meter1", "voltage", 50.0)  # another device's data goes on meanwhile
        await host.wait_for(lambda: host.of_type("DDATA"), what="DDATA of meter1")
        await asyncio.sleep(0.5)
        assert [m.parsed.device_id for m in host.of_type("DDATA")] == ["meter1"]
        rig.uplink.on_device_event(DeviceEvent("meter2", DeviceState.ONLINE))
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 2, what="meter2's DDATA after its DBIRTH")
    finally:
        await rig.close()
    msgs = [m for m in node_msgs(host) if m.type != "NDEATH"]
    assert [(m.type, m.parsed.device_id) for m in msgs] == [
        ("NBIRTH", None), ("DBIRTH", "meter1"), ("DBIRTH", "meter2"), ("DDEATH", "meter2"),
        ("DDATA", "meter1"), ("DBIRTH", "meter2"), ("DDATA", "meter2")]
    assert seqs(msgs) == list(range(7))
    assert msgs[3].payload.timestamp
    assert not msgs[4].payload.metrics[0].is_historical
    assert msgs[6].payload.metrics[0].is_historical and msgs[6].payload.metrics[0].value is True


# A device that is offline when the node births gets no DBIRTH and no DATA (alias-only DDATA
# that no host could map); its records wait for its DBIRTH and are then sent as history.
async def test_device_offline_at_birth_gets_no_data_until_its_dbirth(broker: Broker, host: TestHost,
                                                                    tmp_path: Path) -> None:
    rig = await Rig(broker, tmp_path).open()
    rig.uplink.on_device_event(DeviceEvent("meter2", DeviceState.OFFLINE, "no answer at boot"))
    await rig.sample("meter2", "on", False)      # read once before it went quiet
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH"), what="meter1's DBIRTH")
        await rig.sample("meter1", "voltage", 7.0)
        await host.wait_for(lambda: host.of_type("DDATA"), what="meter1's DDATA")
        await asyncio.sleep(0.5)
        assert [(m.type, m.parsed.device_id) for m in node_msgs(host)] == [
            ("NBIRTH", None), ("DBIRTH", "meter1"), ("DDATA", "meter1")]
        rig.uplink.on_device_event(DeviceEvent("meter2", DeviceState.ONLINE))
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 2, what="meter2's DDATA")
    finally:
        await rig.close()
    msgs = [m for m in node_msgs(host) if m.type != "NDEATH"]
    assert [(m.type, m.parsed.device_id) for m in msgs][3:] == [("DBIRTH", "meter2"), ("DDATA", "meter2")]
    assert msgs[4].payload.metrics[0].is_historical
    assert msgs[4].payload.metrics[0].alias == msgs[3].metric("on").alias
    assert seqs(msgs) == list(range(5))


async def test_waits_for_primary_host_and_leaves_when_it_goes_offline(
        broker: Broker, tmp_path: Path) -> None:
    host = await TestHost(broker.host, broker.port, host_id="scada-9").start(online=None)
    rig = await Rig(broker, tmp_path, primary_host_id="scada-9").open()
    rig.start()
    try:
        await asyncio.sleep(1.5)
        assert not node_msgs(host), "births before the primary host is online"
        t = time.time_ns() // 1_000_000
        host.publish_state(True, t)
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        host.publish_state(False, t - 10_000)        # older than the online one: ignored
        await asyncio.sleep(0.5)
        assert not host.of_type("NDEATH")
        host.publish_state(False, t + 1)
        await host.wait_for(lambda: host.of_type("NDEATH"), what="NDEATH after host offline")
        await asyncio.sleep(1.0)
        assert len(host.of_type("NBIRTH")) == 1       # waits while the host is offline
        host.publish_state(True, t + 2)
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="births again")
    finally:
        await rig.close()
        await host.stop()
    nbirths = host.of_type("NBIRTH")
    assert [n.metric("bdSeq").value for n in nbirths] == [0, 1]  # a new connection
    assert host.of_type("NDEATH")[0].metric("bdSeq").value == 0


async def test_primary_host_state_is_reset_on_every_connection(broker: Broker, tmp_path: Path) -> None:
    host = await TestHost(broker.host, broker.port, host_id="scada-7").start(online=True)
    rig = await Rig(broker, tmp_path, primary_host_id="scada-7").open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        # The host's retained STATE goes away (a broker restart would do the same) and the
        # connection drops: after the reconnect nothing says the host is online.
        host.client.publish(host.state_topic, b"", qos=1, retain=True)
        await asyncio.sleep(0.3)
        connects = rig.uplink.counters["connects"]
        assert rig.uplink._conn is not None
        rig.uplink._conn.abort()
        await host.wait_for(lambda: rig.uplink.counters["connects"] > connects, what="reconnect")
        await asyncio.sleep(1.5)
        assert len(host.of_type("NBIRTH")) == 1, "births on the previous connection's STATE"
        host.publish_state(True)
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="births after STATE online")
    finally:
        await rig.close()
        await host.stop()
    assert [n.metric("bdSeq").value for n in host.of_type("NBIRTH")] == [0, 1]


async def test_stop_while_waiting_for_the_host_publishes_no_ndeath(broker: Broker, tmp_path: Path) -> None:
    host = await TestHost(broker.host, broker.port, host_id="scada-8").start(online=None)
    rig = await Rig(broker, tmp_path, primary_host_id="scada-8").open()
    rig.start()
    try:
        await host.wait_for(lambda: rig.uplink.counters["connects"] >= 1, what="connected")
        await asyncio.sleep(0.5)
    finally:
        await rig.close()
    await asyncio.sleep(1.0)  # time for a Will, had the broker published one
    await host.stop()
    assert not node_msgs(host), "an NDEATH (or anything) without an NBIRTH in the session"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_disconnect_after_ndeath_carries_reason_0x04(broker: Broker, host: TestHost, tmp_path: Path,
                                                            protocol: str) -> None:
    """MQTT 5: DISCONNECT with reason 0x04 (Disconnect with Will Message) after the published
    NDEATH, so the broker delivers the Will too; MQTT 3.1.1 has no reason code (Will discarded)."""
    rig = await Rig(broker, tmp_path, protocol=protocol).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
    finally:
        await rig.close()
    await host.wait_for(lambda: host.of_type("NDEATH"), what="NDEATH")
    await asyncio.sleep(1.0)
    deaths = [m.metric("bdSeq").value for m in host.of_type("NDEATH")]
    assert deaths == ([0, 0] if protocol == "5" else [0])


async def test_node_metrics_in_nbirth_then_ndata_by_exception(broker: Broker, host: TestHost,
                                                              tmp_path: Path) -> None:
    clock = {"synced": False, "holdover": False, "jumps": 0}
    rig = Rig(broker, tmp_path, node_metrics_interval=0.2)

    async def status() -> dict[str, Any]:
        return {"version": "9.9.9", "uptime_s": 3.0, "clock": dict(clock),
                "links": {"mqtt": {"up": True}}, "buffer": await rig.buf.stats()}

    await rig.open(node_status=status)
    await rig.sample("meter1", "voltage", 1.0, time.time_ns() // 1_000_000 - 90_000)  # a backlog record
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        await asyncio.sleep(1.0)
        clock["synced"] = True          # NTP synchronised: reported once
        await host.wait_for(lambda: {m.name for d in host.of_type("NDATA") for m in d.payload.metrics}
                            >= {"Outpost/Clock/State", "Outpost/Buffer/mqtt/Oldest Age"}, what="NDATA")
        await asyncio.sleep(1.0)
    finally:
        await rig.close()
    nbirth = host.of_type("NBIRTH")[0]
    assert nbirth.metric("Properties/Version").value == "9.9.9"
    assert nbirth.metric("Outpost/Clock/State").value == "unsynced"
    assert nbirth.metric("Outpost/Link/mqtt").value is True
    assert nbirth.metric("Outpost/Buffer/mqtt/Depth").value == 1
    assert 85 < nbirth.metric("Outpost/Buffer/mqtt/Oldest Age").value < 200   # that record's age
    assert nbirth.metric("Outpost/Buffer/mqtt/Depth").datatype is DataType.UInt64
    ndata = host.of_type("NDATA")
    # The backlog record was delivered (oldest age 90 s -> 0: beyond its 60 s deadband; depth
    # 1 -> 0: within its deadband) and the clock synchronised. Each change once, nothing else
    # (Outpost/System/* are this machine's own temperature and free disk, which may move).
    reported = [(m.name, m.value) for d in ndata for m in d.payload.metrics
                if not m.name.startswith("Outpost/System/")]
    assert sorted(reported) == [("Outpost/Buffer/mqtt/Oldest Age", 0.0), ("Outpost/Clock/State", "synced")]
    assert all(d.qos == 0 and not d.retain for d in ndata)
    body = [m for m in node_msgs(host) if m.type != "NDEATH"]
    assert seqs(body) == list(range(len(body)))


KILL_SCRIPT = """
import asyncio, sys
from buffer import AsyncBuffer, BufferSettings
from drivers.base import PointInfo
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink

async def main():
    buf = await AsyncBuffer.open(sys.argv[3] + "/buffer.db", BufferSettings(10_000_000, 86400.0))
    async def write(*a):
        pass
    s = MqttUplinkSettings(group_id="plant-7", edge_node_id="pump-3", data_dir=sys.argv[3],
                           servers=[f"mqtt://{sys.argv[1]}:{sys.argv[2]}"], keepalive=5,
                           primary_host_id="scada-1", protocol=sys.argv[4])
    await SparkplugUplink(s, buf, {"meter2": [PointInfo("on", "bool")]}, write).run()

asyncio.run(main())
"""


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_will_ndeath_on_killed_process(broker: Broker, host: TestHost, tmp_path: Path,
                                             protocol: str) -> None:
    argv = [sys.executable, "-c", KILL_SCRIPT, broker.host, str(broker.port), str(tmp_path),
            protocol]
    proc = subprocess.Popen(argv, cwd=REPO)  # noqa: ASYNC220 - one start, killed below
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH"), what="births from the child")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    ndeath = await host.wait_for(lambda: host.of_type("NDEATH"), what="NDEATH Will")
    assert ndeath[0].metric("bdSeq").value == host.of_type("NBIRTH")[0].metric("bdSeq").value
    assert ndeath[0].qos == 1 and not ndeath[0].retain
