"""Store-and-forward through link faults (Toxiproxy), TLS with user/password, server failover.

The uplink talks to Mosquitto through a Toxiproxy proxy; the test Primary Host talks to
Mosquitto directly and sees what a SCADA host would see across the outage.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload
from gateway.sparkplug.topics import MessageType
from tests.helpers import flat
from tests.integration.test_sparkplug_session import Broker, Rig, TestHost, node_msgs, seqs

pytestmark = pytest.mark.integration


@pytest.fixture
async def host(mosquitto):
    h = await TestHost(mosquitto.host, mosquitto.port).start(online=True)
    yield h
    await h.stop()


def ddata_values(host: TestHost) -> list[tuple[float, bool, int]]:
    return [(m.value, m.is_historical, m.timestamp) for d in host.of_type("DDATA")
            for m in d.payload.metrics]


async def test_outage_backlog_is_flushed_as_history_after_new_births(
        mosquitto, toxiproxy, host: TestHost, tmp_path: Path) -> None:
    proxy = await asyncio.to_thread(toxiproxy.create, "sparkplug-outage",
                                    f"{mosquitto.host}:{mosquitto.port}")
    rig = await Rig(Broker(proxy.host, proxy.port), tmp_path, keepalive=2).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        await rig.sample("meter1", "voltage", 1.0)
        await host.wait_for(lambda: host.of_type("DDATA"), what="live DDATA")

        await asyncio.to_thread(proxy.cut)
        await host.wait_for(lambda: host.of_type("NDEATH"), what="NDEATH Will on the cut")
        offline_ts = []
        for v in (2.0, 3.0, 4.0):   # produced while the link is down: kept in the buffer
            ts = time.time_ns() // 1_000_000
            offline_ts.append(ts)
            await rig.sample("meter1", "voltage", v, ts)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert len(host.of_type("DDATA")) == 1

        await asyncio.to_thread(proxy.restore)
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="births after outage")
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 4, what="backlog")
        await rig.sample("meter1", "voltage", 5.0)
        await host.wait_for(lambda: len(host.of_type("DDATA")) >= 5, what="live after backlog")
    finally:
        await rig.close()
        await asyncio.to_thread(proxy.restore)
    nbirths = host.of_type("NBIRTH")
    assert [n.metric("bdSeq").value for n in nbirths] == [0, 1]
    assert host.of_type("NDEATH")[0].metric("bdSeq").value == 0
    # After the new NBIRTH: births, then the backlog oldest first with its own timestamps.
    i = host.seen.index(nbirths[1])
    after = [m for m in host.seen[i:] if m.type and m.type != "NDEATH"
             and m.parsed.edge_node_id == "pump-3"]
    assert [m.type for m in after[:3]] == ["NBIRTH", "DBIRTH", "DBIRTH"]
    assert seqs(after) == list(range(len(after)))
    values = ddata_values(host)
    assert values[0][:2] == (1.0, False)
    assert values[1:4] == [(2.0, True, offline_ts[0]), (3.0, True, offline_ts[1]),
                           (4.0, True, offline_ts[2])]
    assert values[4][:2] == (5.0, False)
    assert rig.uplink.counters["historical"] == 3


async def test_data_sent_into_a_blackhole_is_sent_again(
        mosquitto, toxiproxy, host: TestHost, tmp_path: Path) -> None:
    """No PUBACK, no ack: what went into a silent link is published after the reconnect."""
    proxy = await asyncio.to_thread(toxiproxy.create, "sparkplug-blackhole",
                                    f"{mosquitto.host}:{mosquitto.port}")
    rig = await Rig(Broker(proxy.host, proxy.port), tmp_path, keepalive=1).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        await asyncio.to_thread(proxy.blackhole)
        await rig.sample("meter1", "voltage", 42.0)       # swallowed by the silent link
        await host.wait_for(lambda: host.of_type("NDEATH"), limit_s=30,
                            what="NDEATH once the broker gives up on the silent client")
        await asyncio.to_thread(proxy.restore)
        await host.wait_for(lambda: any(v[0] == 42.0 for v in ddata_values(host)), limit_s=30,
                            what="the swallowed value")
    finally:
        await rig.close()
        await asyncio.to_thread(proxy.restore)
    nbirths = host.of_type("NBIRTH")
    assert len(nbirths) >= 2
    # The swallowed value reaches the host once, after the new births, marked as history:
    # it was stored before the reconnect, so it is backlog, not live data.
    resent = [(m, i) for i, m in enumerate(host.seen) if m.type == "DDATA"
              and any(x.value == 42.0 for x in m.payload.metrics)]
    assert len(resent) == 1, [m.payload for m, _ in resent]
    message, position = resent[0]
    assert position > host.seen.index(nbirths[-1])
    (metric,) = [x for x in message.payload.metrics if x.value == 42.0]
    assert metric.is_historical is True


async def test_tls_with_password_and_failover_to_the_next_server(
        mosquitto, host: TestHost, tmp_path: Path) -> None:
    with socket.socket() as s:        # a port where nothing listens: the first server is down
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    rig = await Rig(Broker(mosquitto.host, mosquitto.tls_port), tmp_path,
                    servers=[f"mqtt://127.0.0.1:{dead}", f"mqtts://127.0.0.1:{mosquitto.tls_port}"],
                    username=mosquitto.username, password=mosquitto.password,
                    ca_file=str(mosquitto.ca_file), protocol="3.1.1").open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births over TLS")
        assert flat(rig.uplink.state)["server"] == f"mqtts://127.0.0.1:{mosquitto.tls_port}"
        assert f"127.0.0.1:{dead}" in flat(rig.uplink.state)["last_error"]
    finally:
        await rig.close()
    msgs = node_msgs(host)
    assert [m.type for m in msgs][-1] == str(MessageType.NDEATH)   # 3.1.1: published by us
    assert msgs[-1].metric("bdSeq").value == msgs[0].metric("bdSeq").value


async def test_wrong_password_is_reported_and_retried(mosquitto, tmp_path: Path) -> None:
    rig = await Rig(Broker(mosquitto.host, mosquitto.tls_port), tmp_path,
                    servers=[f"mqtts://127.0.0.1:{mosquitto.tls_port}"],
                    username=mosquitto.username, password="wrong",
                    ca_file=str(mosquitto.ca_file)).open()
    rig.start()
    try:
        for _ in range(100):  # the uplink reports through state(), which we poll
            if flat(rig.uplink.state)["last_error"]:
                break
            await asyncio.sleep(0.1)
    finally:
        await rig.close()
    assert flat(rig.uplink.state)["connected"] is False
    assert f"127.0.0.1:{mosquitto.tls_port}" in flat(rig.uplink.state)["last_error"]


async def test_ncmd_next_server_walks_to_the_next_server(
        mosquitto, toxiproxy, host: TestHost, tmp_path: Path) -> None:
    proxy = await asyncio.to_thread(toxiproxy.create, "sparkplug-second",
                                    f"{mosquitto.host}:{mosquitto.port}")
    first = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    second = f"mqtt://{proxy.host}:{proxy.port}"
    rig = await Rig(Broker(mosquitto.host, mosquitto.port), tmp_path,
                    servers=[first, second]).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        assert flat(rig.uplink.state)["server"] == first
        host.publish("spBv1.0/plant-7/NCMD/pump-3", encode_payload(Payload(timestamp=1, metrics=[
            Metric("Node Control/Next Server", DataType.Boolean, True)])))
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="births on server 2")
        await host.wait_for(lambda: flat(rig.uplink.state)["server"] == second, what="server 2")
    finally:
        await rig.close()
    msgs = node_msgs(host)
    i = msgs.index(host.of_type("NBIRTH")[1])
    assert msgs[i - 1].type == "NDEATH"                 # left the first server cleanly
    assert msgs[i - 1].metric("bdSeq").value == 0 and msgs[i].metric("bdSeq").value == 1


async def test_host_offline_walks_to_the_next_server(mosquitto, toxiproxy, tmp_path: Path) -> None:
    """Born on server 1, the Primary Host goes offline: NDEATH, then server 2, births only once
    the host is online there (tck-id-operational-behavior-primary-application-state-with-multiple-servers-walk)."""
    proxy = await asyncio.to_thread(toxiproxy.create, "sparkplug-walk", f"{mosquitto.host}:{mosquitto.port}")
    first = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    second = f"mqtt://{proxy.host}:{proxy.port}"
    host = await TestHost(mosquitto.host, mosquitto.port, host_id="scada-w").start(online=True)
    rig = await Rig(Broker(mosquitto.host, mosquitto.port), tmp_path, servers=[first, second],
                    primary_host_id="scada-w").open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        assert flat(rig.uplink.state)["server"] == first
        t = time.time_ns() // 1_000_000
        host.publish_state(False, t)
        await host.wait_for(lambda: host.of_type("NDEATH"), what="NDEATH after host offline")
        await host.wait_for(lambda: flat(rig.uplink.state)["server"] == second, what="server 2")
        await asyncio.sleep(1.0)
        assert len(host.of_type("NBIRTH")) == 1          # host still offline: no births
        host.publish_state(True, t + 1)
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="births on server 2")
        assert flat(rig.uplink.state)["server"] == second
    finally:
        await rig.close()
        await host.stop()
    assert [n.metric("bdSeq").value for n in host.of_type("NBIRTH")] == [0, 1]


async def test_live_data_keeps_flowing_while_a_paced_backlog_is_flushed(
        mosquitto, toxiproxy, host: TestHost, tmp_path: Path) -> None:
    proxy = await asyncio.to_thread(toxiproxy.create, "sparkplug-paced",
                                    f"{mosquitto.host}:{mosquitto.port}")
    rig = await Rig(Broker(proxy.host, proxy.port), tmp_path, keepalive=2,
                    historical_max_per_s=4).open()
    rig.start()
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH")[1:], what="births")
        await asyncio.to_thread(proxy.cut)
        await host.wait_for(lambda: host.of_type("NDEATH"), what="NDEATH Will on the cut")
        for i in range(8):   # 8 records of backlog: 2 s at 4 records/s
            await rig.sample("meter1", "voltage", float(i))
        await asyncio.to_thread(proxy.restore)
        await host.wait_for(lambda: len(host.of_type("NBIRTH")) >= 2, what="births after outage")
        await rig.sample("meter1", "voltage", 100.0)
        await host.wait_for(lambda: len(ddata_values(host)) >= 9, what="backlog and live value")
        for _ in range(50):  # the cursor catches up once the backlog is through
            stats = await rig.buf.stats()
            if stats["cursors"]["mqtt"]["acked_seq"] == stats["last_seq"]:
                break
            await asyncio.sleep(0.1)
    finally:
        await rig.close()
        await asyncio.to_thread(proxy.restore)
    values = ddata_values(host)
    history = [v for v, hist, _ts in values if hist]
    assert history == [float(i) for i in range(8)]          # each once, oldest first
    order = [v for v, _h, _ts in values]
    assert order.index(100.0) < order.index(7.0)            # live overtook the backlog
    assert [v for v, hist, _ts in values if not hist] == [100.0]
    assert stats["cursors"]["mqtt"]["acked_seq"] == stats["last_seq"]
