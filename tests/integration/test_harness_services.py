"""Proof that the test harness's services work as the other tests assume (issue 2).

Kafka through the fault proxy (and a cut link), Kafka over SASL_SSL, a broker restart that
keeps data, Mosquitto over TLS with a password, Toxiproxy faults, socat pty pairs, kcat and
the Node peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import ssl
import subprocess

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context
from gmqtt import Client as MQTTClient
from gmqtt.mqtt.handler import MQTTConnectError

from tests.harness.mosquitto import mqtt_connect_probe

pytestmark = pytest.mark.integration


def _topic(prefix: str) -> str:
    return f"harness.{prefix}.{secrets.token_hex(4)}"


async def _consume(bootstrap: str, topic: str, count: int, timeout_s: float = 30,
                   **options: object) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None, **options)
    await consumer.start()
    try:
        values: list[bytes] = []
        async with asyncio.timeout(timeout_s):
            async for msg in consumer:
                values.append(msg.value)
                if len(values) >= count:
                    return values
        return values
    finally:
        await consumer.stop()


async def test_kafka_round_trip_through_the_proxy(kafka):
    topic = _topic("proxied")
    kafka.create_topic(topic)
    before = kafka.proxy.bytes()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.proxied_bootstrap, acks="all")
    await producer.start()
    try:
        # The broker advertises the proxy's port on this listener, so the client stays behind it.
        brokers = producer.client.cluster.brokers()
        assert {(b.host, b.port) for b in brokers} == {(kafka.proxy.host, kafka.proxy.port)}
        for i in range(5):
            await producer.send_and_wait(topic, f"m{i}".encode())
        during = kafka.proxy.bytes()  # the producer's connections are still open
        assert during["live_connections"] >= 1
        assert during["upstream"] > before["upstream"] + 5 * len(b"m0")
        assert during["downstream"] > before["downstream"]
    finally:
        await producer.stop()
    got = await _consume(kafka.proxied_bootstrap, topic, 5)
    assert got == [f"m{i}".encode() for i in range(5)]


async def test_cut_link_times_out_a_send_and_restore_lets_it_through(kafka):
    topic = _topic("cut")
    kafka.create_topic(topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.proxied_bootstrap, acks="all",
                                request_timeout_ms=3000, retry_backoff_ms=100)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before")
        kafka.proxy.cut()
        with pytest.raises((KafkaError, TimeoutError)):
            async with asyncio.timeout(20):
                await producer.send_and_wait(topic, b"during")
        kafka.proxy.restore()
        async with asyncio.timeout(60):
            while True:  # the client reconnects on its own; retry until a send succeeds
                try:
                    await producer.send_and_wait(topic, b"after")
                    break
                except KafkaError:
                    await asyncio.sleep(0.2)
    finally:
        kafka.proxy.restore()
        await producer.stop()
    got = await _consume(kafka.bootstrap, topic, 2)
    assert got[0] == b"before"
    assert b"after" in got


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_kafka_sasl_ssl_round_trip(kafka, mechanism):
    if kafka.sasl_ssl_bootstrap is None:
        pytest.fail("OUTPOST_TEST_KAFKA cluster has no SASL_SSL listener known to the harness")
    user, password = kafka.sasl_users[mechanism]
    options = dict(security_protocol="SASL_SSL", sasl_mechanism=mechanism,
                   sasl_plain_username=user, sasl_plain_password=password,
                   ssl_context=create_ssl_context(cafile=str(kafka.ca_file)))
    topic = _topic(mechanism.lower())
    kafka.create_topic(topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.sasl_ssl_bootstrap, acks="all",
                                **options)
    await producer.start()
    try:
        await producer.send_and_wait(topic, mechanism.encode())
    finally:
        await producer.stop()
    assert await _consume(kafka.sasl_ssl_bootstrap, topic, 1, **options) == [mechanism.encode()]


async def test_kafka_sasl_ssl_refuses_a_wrong_password(kafka):
    user, _ = kafka.sasl_users["SCRAM-SHA-512"]
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.sasl_ssl_bootstrap, security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=user,
        sasl_plain_password="not-the-password", request_timeout_ms=5000,
        ssl_context=create_ssl_context(cafile=str(kafka.ca_file)))
    try:
        with pytest.raises(KafkaError):
            await producer.start()
    finally:
        await producer.stop()


async def test_kafka_restart_keeps_data_and_ports(kafka):
    if kafka.external:
        pytest.fail("OUTPOST_TEST_KAFKA is an external cluster; the harness cannot restart it")
    topic = _topic("restart")
    kafka.create_topic(topic)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"kept")
    finally:
        await producer.stop()
    bootstrap = kafka.bootstrap
    await asyncio.to_thread(kafka.stop)
    assert not kafka.process.alive()
    await asyncio.to_thread(kafka.start)
    assert kafka.bootstrap == bootstrap
    assert await _consume(kafka.bootstrap, topic, 1) == [b"kept"]


async def test_kcat_produces_to_the_broker(kafka, kcat):
    topic = _topic("kcat")
    kafka.create_topic(topic)
    done = await asyncio.to_thread(
        subprocess.run, [kcat, "-b", kafka.bootstrap, "-t", topic, "-P"],
        input=b"from-kcat\n", capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert await _consume(kafka.bootstrap, topic, 1) == [b"from-kcat"]


async def _mqtt_client(name: str, mosquitto, *, password: str | None = None) -> MQTTClient:
    client = MQTTClient(f"harness-{name}-{secrets.token_hex(3)}")
    client.set_auth_credentials(mosquitto.username,
                                mosquitto.password if password is None else password)
    ctx = ssl.create_default_context(cafile=str(mosquitto.ca_file))
    await client.connect(mosquitto.host, mosquitto.tls_port, ssl=ctx, keepalive=10)
    return client


async def test_mqtt_round_trip_over_tls_with_auth(mosquitto):
    topic = f"harness/tls/{secrets.token_hex(4)}"
    received: asyncio.Queue[bytes] = asyncio.Queue()
    sub = await _mqtt_client("sub", mosquitto)
    pub = await _mqtt_client("pub", mosquitto)
    try:
        sub.on_message = lambda client, t, payload, qos, props: received.put_nowait(payload)
        sub.subscribe(topic, qos=1)
        await asyncio.sleep(0.2)  # let the SUBACK land before publishing
        pub.publish(topic, b"over-tls", qos=1)
        async with asyncio.timeout(10):
            assert await received.get() == b"over-tls"
    finally:
        await _disconnect(pub)
        await _disconnect(sub)


async def _disconnect(client: MQTTClient) -> None:
    # gmqtt closes the TLS session right after DISCONNECT; an ack still in flight from the
    # broker then arrives after our close_notify and ssl raises APPLICATION_DATA_AFTER_
    # CLOSE_NOTIFY. That is a client shutdown race, not a broker or harness fault.
    with contextlib.suppress(ssl.SSLError):
        await client.disconnect()


async def test_mqtt_tls_listener_refuses_a_bad_password(mosquitto):
    client = MQTTClient(f"harness-bad-{secrets.token_hex(3)}")
    client.set_auth_credentials(mosquitto.username, "wrong-password")
    ctx = ssl.create_default_context(cafile=str(mosquitto.ca_file))
    try:
        with pytest.raises(MQTTConnectError):
            async with asyncio.timeout(10):
                await client.connect(mosquitto.host, mosquitto.tls_port, ssl=ctx, keepalive=10)
    finally:
        await _disconnect(client)


def test_mqtt_listeners_enforce_their_own_auth(mosquitto):
    # Plain listener: anonymous accepted. TLS listener: anonymous refused (CONNACK 5).
    assert mqtt_connect_probe(mosquitto.host, mosquitto.port) == 0
    assert mqtt_connect_probe(mosquitto.host, mosquitto.tls_port, ca_file=mosquitto.ca_file) == 5
    with pytest.raises(ssl.SSLError):  # the server certificate is for 127.0.0.1/localhost only
        ctx = ssl.create_default_context()  # system CAs: must not trust the run CA
        with socket.create_connection((mosquitto.host, mosquitto.tls_port), timeout=5) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost")


def test_toxiproxy_faults_on_an_mqtt_link(toxiproxy, mosquitto):
    proxy = toxiproxy.create("harness-mqtt", upstream=f"{mosquitto.host}:{mosquitto.port}")
    assert proxy.bytes()["upstream"] == 0
    assert mqtt_connect_probe(proxy.host, proxy.port) == 0
    closed = proxy.bytes()  # the probe's connection is closed: toxiproxy's own counters
    assert closed["upstream"] > 4 and closed["downstream"] == 4  # CONNECT out, CONNACK back
    assert closed["live_connections"] == 0

    # A live connection is counted too (from the kernel's tcp_info, not toxiproxy's metrics).
    with socket.create_connection((proxy.host, proxy.port), timeout=5) as live:
        live.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x0a\x00\x00")  # CONNECT, empty id
        assert live.recv(4) == b"\x20\x02\x00\x00"
        now = proxy.bytes()
        assert now["live_connections"] == 1
        assert now["upstream"] - closed["upstream"] == 14
        assert now["downstream"] - closed["downstream"] == 4

    proxy.blackhole()
    with pytest.raises(TimeoutError):  # connected, but nothing ever comes back
        mqtt_connect_probe(proxy.host, proxy.port, timeout_s=1.0)
    proxy.clear()
    assert mqtt_connect_probe(proxy.host, proxy.port) == 0

    proxy.reset_peer()
    with pytest.raises((ConnectionError, OSError)):
        mqtt_connect_probe(proxy.host, proxy.port, timeout_s=3.0)
    proxy.clear()

    proxy.latency(50, jitter_ms=5)
    proxy.bandwidth(64)
    assert {t["type"] for t in proxy.toxics()} == {"latency", "bandwidth"}
    assert mqtt_connect_probe(proxy.host, proxy.port) == 0

    proxy.cut()
    with pytest.raises(ConnectionRefusedError):
        mqtt_connect_probe(proxy.host, proxy.port)
    proxy.restore()
    assert proxy.toxics() == []
    assert mqtt_connect_probe(proxy.host, proxy.port) == 0


def test_pty_pair_carries_bytes_both_ways_and_can_vanish(pty_pair):
    pair = pty_pair("harness")
    a, b = pair

    def exchange() -> None:
        fa = os.open(a, os.O_RDWR | os.O_NOCTTY)
        fb = os.open(b, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(fa, b"\x01\x03ping")
            assert _read_exactly(fb, 6) == b"\x01\x03ping"
            os.write(fb, b"pong\xff")
            assert _read_exactly(fa, 5) == b"pong\xff"
        finally:
            os.close(fa)
            os.close(fb)

    exchange()
    pair.close()
    assert not os.path.exists(a) and not os.path.exists(b)
    pair.recreate()
    exchange()


def _read_exactly(fd: int, n: int, timeout_s: float = 5.0) -> bytes:
    import select

    out = b""
    while len(out) < n:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"read {out!r}, wanted {n} bytes")
        out += os.read(fd, n - len(out))
    return out


def test_node_peers_load_modbus_serial_and_sparkplug_payload(node_peers):
    script = ("const sp = require('sparkplug-payload').get('spBv1.0');"
              "require('modbus-serial');"
              "const b = sp.encodePayload({timestamp: 1, metrics: [{name: 'x', type: 'Int32',"
              " value: 7}]});"
              "process.stdout.write(JSON.stringify(sp.decodePayload(b).metrics[0].value));")
    done = subprocess.run(["node", "-e", script], cwd=node_peers, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b"7"
