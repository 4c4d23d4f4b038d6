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
        self.client.subscribe("spBv1.0/#", qos=1)
        await asyncio.sleep(0.2)  # SUBACK before anything is published
        if online is not None:
            self.publish_state(online)
        return self

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
                rebirth_debounce=1.0, historical_max_per_s=1000, reconnect_min=0.2,
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

    async def open(self) -> Rig:
        self.buf = await AsyncBuffer.open(self.data_dir / "buffer.db",
                                          BufferSettings(10_000_000, 86400.0))
        await self.buf.register_cursor("mqtt")

        async def write(device: str, point: str, value: Any) -> None:
            self.writes.append((device, point, value))

        self.uplink = SparkplugUplink(settings(self.broker, self.data_dir, **self.kw), self.buf,
                                      POINTS, write, snapshot=self.rbe.snapshot)
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
    assert len(aliases) == 3 and None not in aliases  # unique across the node
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
    deaths = [m.metric("bdSeq").value for m in host.of_type("NDEATH")]
    assert births == [0, 1, 2] and deaths == [0, 1, 2]
    assert (tmp_path / "sparkplug-bdseq").read_text().strip() == "2"


async def test_ncmd_rebirth_same_bdseq_no_reconnect_debounced(broker: Broker, host: TestHost,
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
        host.publish(f"spBv1.0/{GROUP}/NCMD/{EDGE}", cmd)  # within the debounce: ignored
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="second NBIRTH")
        await host.wait_for(lambda: len(host.of_type("DBIRTH")) >= 4, what="second DBIRTHs")
        await rig.sample("meter1", "voltage", 20.0)
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 2, what="DDATA after rebirth")
        await asyncio.sleep(0.5)
        assert rig.uplink.counters["connects"] == connects  # no reconnect
    finally:
        await rig.close()
    nbirths = host.of_type("NBIRTH")
    assert len(nbirths) == 2
    assert [n.metric("bdSeq").value for n in nbirths] == [0, 0]
    i = host.seen.index(nbirths[1])
    after = [m for m in host.seen[i:] if m.type and m.type != "NDEATH"]
    assert [m.type for m in after[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert seqs(after) == list(range(len(after)))
    assert not host.of_type("NDEATH")[:-1]  # only the final planned one


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


async def test_ddeath_and_dbirth_follow_device_events(broker: Broker, host: TestHost,
                                                      tmp_path: Path) -> None:
    rig = await Rig(broker, tmp_path).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        rig.uplink.on_device_event(DeviceEvent("meter2", DeviceState.OFFLINE, "timeout"))
        await host.wait_for(lambda: host.of_type("DDEATH"), what="DDEATH")
        await rig.sample("meter2", "on", True)   # stored while dead: sent as history
        await host.wait_for(lambda: host.of_type("DDATA"), what="DDATA")
        rig.uplink.on_device_event(DeviceEvent("meter2", DeviceState.ONLINE))
        await host.wait_for(lambda: len(host.of_type("DBIRTH")) >= 3, what="DBIRTH again")
    finally:
        await rig.close()
    msgs = [m for m in node_msgs(host) if m.type != "NDEATH"]
    assert [m.type for m in msgs] == ["NBIRTH", "DBIRTH", "DBIRTH", "DDEATH", "DDATA", "DBIRTH"]
    assert seqs(msgs) == list(range(6))
    assert msgs[3].parsed.device_id == "meter2" and msgs[3].payload.timestamp
    assert msgs[4].payload.metrics[0].is_historical


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
