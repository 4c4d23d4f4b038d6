"""Kafka uplink security: TLS with the run's CA and SASL PLAIN / SCRAM-SHA-256 / SCRAM-SHA-512.

Against the harness broker's SASL_SSL listener; what arrived is read back by kcat on the
plain listener.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.uplinks.kafka.mappings import Mapping
from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
from tests.helpers import flat
from tests.integration.test_kafka_support import (
    GATEWAY_ID,
    Feeder,
    check_delivery,
    kcat_consume_async,
    open_buffer,
    running,
    unique_topic,
    wait_acked,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _settings(kafka, mechanism: str, password: str | None = None) -> KafkaSettings:
    user, pw = kafka.sasl_users[mechanism]
    return KafkaSettings(
        bootstrap_servers=(kafka.sasl_ssl_bootstrap,),
        security_protocol="SASL_SSL",
        sasl_mechanism=mechanism,
        sasl_username=user,
        sasl_password=pw if password is None else password,
        ca_file=str(kafka.ca_file),
        linger_s=0.05,
        request_timeout_s=5.0,
        reconnect_min_s=0.2,
        reconnect_max_s=1.0,
    )


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
async def test_sasl_over_tls_delivers(kafka, kcat, tmp_path, mechanism: str) -> None:
    topic = unique_topic(f"sasl-{mechanism.lower()}")
    kafka.create_topic(topic)
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    uplink = KafkaUplink(_settings(kafka, mechanism), buf,
                         [Mapping("telemetry", ("spBv1.0/#",), topic)], GATEWAY_ID)
    try:
        async with running(uplink) as task:
            await feeder.run_for(1.0)
            await wait_acked(uplink, task, feeder.last_seq, limit_s=60)
    finally:
        await buf.close()
    messages = await kcat_consume_async(kcat, kafka.bootstrap, topic)
    counts = check_delivery(messages, feeder.appended, max_duplicates=0)
    assert counts["messages"] == len(feeder.appended)


async def test_wrong_password_keeps_the_link_down_and_acks_nothing(
    kafka, tmp_path, caplog
) -> None:
    buf = await open_buffer(str(tmp_path / "buffer.db"))
    feeder = Feeder(buf)
    await feeder.tick()
    uplink = KafkaUplink(_settings(kafka, "SCRAM-SHA-256", password="wrong"), buf,
                         [Mapping("telemetry", ("spBv1.0/#",), unique_topic("sasl-bad"))],
                         GATEWAY_ID)
    try:
        async with running(uplink):
            for _ in range(100):
                if flat(uplink.state)["last_error"]:
                    break
                await asyncio.sleep(0.1)
            state = flat(uplink.state)
        assert state["link"] == "down"
        assert "bootstrap" in state["last_error"], state["last_error"]
        # aiokafka reports the reason itself when bootstrapping fails.
        assert "authentication" in caplog.text.lower()
        assert state["acked_seq"] is None
        assert (await buf.stats())["cursors"]["kafka"]["records"] == 4
    finally:
        await buf.close()


def test_tls_without_the_ca_is_refused(kafka) -> None:
    import ssl

    from gateway.uplinks.kafka.adapter import client_kwargs

    kw = client_kwargs(_settings(kafka, "PLAIN"))
    assert kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert kw["ssl_context"].check_hostname is True
    assert kw["sasl_mechanism"] == "PLAIN"
