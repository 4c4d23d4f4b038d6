"""The Kafka uplink over mutual TLS, against the harness broker's MTLS listener.

That listener is SSL with `ssl.client.auth=required`: only a client certificate signed by
the run CA gets in. With it, a KafkaUplink (security_protocol "SSL", ca_file, cert_file,
key_file) delivers every record, read back by kcat through the same listener with the same
certificate; without a certificate, or with one from an unrelated CA, nothing is acknowledged
and state() shows the link down with an error.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from gateway.uplinks.kafka.adapter import client_kwargs
from gateway.uplinks.kafka.mappings import Mapping
from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
from tests.helpers import flat
from tests.integration.test_kafka_support import (
    GATEWAY_ID,
    Feeder,
    check_delivery,
    kcat_consume,
    open_buffer,
    running,
    unique_topic,
    wait_acked,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


def _mtls_kafka(kafka):
    if kafka.mtls_bootstrap is None:
        pytest.fail("the kafka fixture has no mTLS listener (OUTPOST_TEST_KAFKA points at an "
                    "external cluster); unset it to let the harness run its own broker")
    return kafka


def _settings(kafka, cert_file: Path | None, key_file: Path | None) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=(kafka.mtls_bootstrap,),
        security_protocol="SSL",
        ca_file=str(kafka.ca_file),
        cert_file=None if cert_file is None else str(cert_file),
        key_file=None if key_file is None else str(key_file),
        linger_s=0.05,
        request_timeout_s=5.0,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )


def _kcat_mtls(kafka) -> list[str]:
    """kcat (librdkafka) options for the MTLS listener with the run's client certificate."""
    return ["-X", "security.protocol=ssl", "-X", f"ssl.ca.location={kafka.ca_file}",
            "-X", f"ssl.certificate.location={kafka.client_cert_file}",
            "-X", f"ssl.key.location={kafka.client_key_file}"]


def _log_size(kafka) -> int:
    return Path(kafka.log_path).stat().st_size


def _handshake_failures(kafka, start: int) -> int:
    """Lines the broker logged since byte `start` about a failed TLS handshake on MTLS."""
    with Path(kafka.log_path).open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    mark = f"channelId={kafka.mtls_bootstrap}-"
    return sum(1 for line in text.splitlines()
               if "Failed authentication" in line and "SSL handshake failed" in line
               and mark in line)


async def test_client_certificate_from_the_run_ca_delivers(kafka, kcat, tmp_path) -> None:
    kafka = _mtls_kafka(kafka)
    topic = unique_topic("mtls")
    kafka.create_topic(topic)
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    settings = _settings(kafka, kafka.client_cert_file, kafka.client_key_file)
    uplink = KafkaUplink(settings, buf, [Mapping("telemetry", ("spBv1.0/#",), topic)],
                         GATEWAY_ID)
    try:
        async with running(uplink) as task:
            await feeder.run_for(1.0)
            await wait_acked(uplink, task, feeder.last_seq, limit_s=45)
            state = flat(uplink.state)
    finally:
        await buf.close()
    assert state["link"] == "up", state
    assert state["server"] == kafka.mtls_bootstrap
    # Read back through the mTLS listener itself, by a different client library.
    messages = await asyncio.to_thread(kcat_consume, kcat, kafka.mtls_bootstrap, topic,
                                       *_kcat_mtls(kafka))
    counts = check_delivery(messages, feeder.appended, max_duplicates=0)
    assert counts["messages"] == len(feeder.appended) == state["delivered"]


@pytest.mark.parametrize("which", ["no_certificate", "other_ca"])
async def test_without_an_accepted_certificate_nothing_is_delivered(
        kafka, kcat, tmp_path, which: str) -> None:
    kafka = _mtls_kafka(kafka)
    topic = unique_topic(f"mtls-{which.replace('_', '-')}")
    kafka.create_topic(topic)
    if which == "other_ca":
        settings = _settings(kafka, kafka.other_client_cert_file, kafka.other_client_key_file)
    else:
        settings = _settings(kafka, None, None)
    # TLS itself is on and verifies the broker: only the client certificate is at fault.
    assert client_kwargs(settings)["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    log_start = _log_size(kafka)
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    await feeder.tick()
    uplink = KafkaUplink(settings, buf, [Mapping("telemetry", ("spBv1.0/#",), topic)],
                         GATEWAY_ID)
    try:
        async with running(uplink):
            for _ in range(150):
                state = flat(uplink.state)
                if state["last_error"] and state["last_error_ms"]:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # a retry or two: still nothing may get through
            state = flat(uplink.state)
        assert state["link"] == "down", state
        assert state["last_error"], state
        # aiokafka names the address it could not bootstrap from; under TLS 1.3 the broker's
        # certificate verdict arrives after the client's handshake, as a closed connection,
        # so the text cannot say "certificate".
        port = kafka.mtls_bootstrap.rsplit(":", 1)[1]
        assert "bootstrap" in state["last_error"] and port in state["last_error"], state
        assert state["acked_seq"] is None and state["delivered"] == 0, state
        assert (await buf.stats())["cursors"]["kafka"]["records"] == len(feeder.appended)
    finally:
        await buf.close()
    # The broker refused the client in the TLS handshake (Kafka books that as authentication).
    for _ in range(50):
        if _handshake_failures(kafka, log_start):
            break
        await asyncio.sleep(0.1)
    assert _handshake_failures(kafka, log_start) >= 1, "the broker logged no failed handshake"
    # Nothing reached the topic (read on the plain listener, which needs no certificate).
    assert await asyncio.to_thread(kcat_consume, kcat, kafka.bootstrap, topic) == []
