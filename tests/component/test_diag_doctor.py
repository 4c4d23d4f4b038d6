"""Doctor network checks against real local sockets: listening, closed, TLS, unresolvable."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.clock import ClockStatus
from gateway.diagnostics.doctor import Endpoint, check_endpoint, render_checks, run_doctor


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, plus an unrelated CA."""
    d = tmp_path_factory.mktemp("doctor-certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=doctor test CA",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))
    _openssl("req", *ec, "-subj", "/CN=localhost", "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"))
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
             "-CAcreateserial", "-days", "2", "-extfile", str(d / "ext.cnf"), "-out", str(d / "server.crt"))
    _openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=unrelated CA",
             "-keyout", str(d / "other.key"), "-out", str(d / "other.crt"))
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key", d / "other.crt")


@dataclass
class Servers:
    plain_port: int
    tls_port: int
    silent_port: int
    closed_port: int


@pytest.fixture
async def servers(certs: Certs) -> AsyncIterator[Servers]:
    async def answer_plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Like a plain MQTT/HTTP port: reply with bytes that are not a TLS record.
        try:
            await reader.read(1)
            writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    silent_conns: list[asyncio.StreamWriter] = []

    async def say_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_conns.append(writer)  # accept, then never answer (a wedged proxy)

    async def tls_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(100)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs.cert, certs.key)
    plain = await asyncio.start_server(answer_plain, "127.0.0.1", 0)
    tls = await asyncio.start_server(tls_ok, "127.0.0.1", 0, ssl=ctx)
    silent = await asyncio.start_server(say_nothing, "127.0.0.1", 0)
    # A port that was just free: nothing listens, so connecting is refused.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()
    try:
        yield Servers(
            plain.sockets[0].getsockname()[1],
            tls.sockets[0].getsockname()[1],
            silent.sockets[0].getsockname()[1],
            closed_port,
        )
    finally:
        for w in silent_conns:
            w.close()
        for s in (plain, tls, silent):
            s.close()
            await s.wait_closed()


def by_suffix(checks: list, suffix: str):  # type: ignore[no-untyped-def]
    return next(c for c in checks if c.name.endswith(suffix))


async def test_a_listening_port_passes_dns_and_tcp(servers: Servers) -> None:
    checks = await check_endpoint(Endpoint("mqtt", "127.0.0.1", servers.plain_port, False), timeout_s=3)
    assert [c.ok for c in checks] == [True, True]
    assert checks[0].name == f"mqtt 127.0.0.1:{servers.plain_port} dns"
    assert "127.0.0.1" in checks[0].detail


async def test_a_closed_port_is_refused_with_a_hint(servers: Servers) -> None:
    checks = await check_endpoint(Endpoint("kafka", "127.0.0.1", servers.closed_port, False), timeout_s=3)
    tcp = by_suffix(checks, "tcp")
    assert not tcp.ok and tcp.detail == "connection refused"
    assert "nothing listens" in tcp.hint


async def test_a_name_that_does_not_resolve_stops_at_dns() -> None:
    checks = await check_endpoint(Endpoint("mqtt", "nonexistent.invalid", 1883, True), timeout_s=5)
    assert len(checks) == 1
    assert checks[0].name.endswith("dns") and not checks[0].ok
    assert "does not resolve" in checks[0].detail or "no DNS answer" in checks[0].detail


async def test_tls_with_the_right_ca_passes(servers: Servers, certs: Certs) -> None:
    checks = await check_endpoint(
        Endpoint("mqtt", "localhost", servers.tls_port, True, str(certs.ca)), timeout_s=3
    )
    tls = by_suffix(checks, "tls")
    assert tls.ok, tls
    assert "TLSv1." in tls.detail and "valid until" in tls.detail


async def test_tls_with_an_untrusted_ca_fails_and_says_which_setting_to_fix(servers: Servers, certs: Certs) -> None:
    checks = await check_endpoint(
        Endpoint("mqtt", "127.0.0.1", servers.tls_port, True, str(certs.other_ca)), timeout_s=3
    )
    tls = by_suffix(checks, "tls")
    assert not tls.ok and "certificate rejected" in tls.detail
    assert "ca_file" in tls.hint
    assert by_suffix(checks, "tcp").ok


async def test_tls_against_a_plain_port_says_the_port_does_not_speak_tls(servers: Servers, certs: Certs) -> None:
    checks = await check_endpoint(
        Endpoint("mqtt", "127.0.0.1", servers.plain_port, True, str(certs.ca)), timeout_s=3
    )
    tls = by_suffix(checks, "tls")
    assert not tls.ok
    assert "does not speak TLS" in tls.hint


async def test_tls_against_a_silent_server_times_out(servers: Servers, certs: Certs) -> None:
    checks = await check_endpoint(
        Endpoint("kafka", "127.0.0.1", servers.silent_port, True, str(certs.ca)), timeout_s=0.5
    )
    tls = by_suffix(checks, "tls")
    assert not tls.ok and "no TLS handshake within 0.5s" in tls.detail


async def test_run_doctor_covers_every_input_and_renders(servers: Servers, certs: Certs, tmp_path: Path) -> None:
    checks = await run_doctor(
        serial_ports=["/dev/serial/by-id/usb-missing"],
        data_dir=str(tmp_path),
        buffer_path=str(tmp_path / "buffer.db"),
        mqtt_servers=[f"mqtts://localhost:{servers.tls_port}", f"mqtt://127.0.0.1:{servers.closed_port}", "bogus://x"],
        mqtt_ca_file=str(certs.ca),
        kafka_bootstrap=[f"127.0.0.1:{servers.plain_port}", "nonexistent.invalid:9092"],
        clock_probe=lambda: ClockStatus(False, "adjtimex"),
        status_socket=str(tmp_path / "no.sock"),
        timeout_s=3,
    )
    names = {c.name: c.ok for c in checks}
    assert names["serial port /dev/serial/by-id/usb-missing"] is False
    assert names[f"disk space at {tmp_path}"] is True
    assert names[f"buffer file {tmp_path / 'buffer.db'}"] is True
    assert names["clock"] is False
    assert names[f"gateway status socket {tmp_path / 'no.sock'}"] is False
    assert names[f"mqtt localhost:{servers.tls_port} tls"] is True
    assert names[f"mqtt 127.0.0.1:{servers.closed_port} tcp"] is False
    assert names["mqtt bogus://x"] is False
    assert names[f"kafka 127.0.0.1:{servers.plain_port} tcp"] is True
    assert names["kafka nonexistent.invalid:9092 dns"] is False
    text = render_checks(checks)
    assert text.count("FAIL") == sum(1 for c in checks if not c.ok)
    assert "-> " in text


def test_run_for_config_checks_what_the_configuration_names(tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.diagnostics.doctor import run_for_config

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    free_port = probe.getsockname()[1]
    probe.close()
    cfg_path = tmp_path / "outpost.toml"
    cfg_path.write_text(f"""
[gateway]
group_id = "plant-7"
edge_node_id = "pump-3"
data_dir = "{tmp_path / 'data'}"

[[buses]]
name = "rs485-a"
transport = "rtu"
port = "/dev/serial/by-id/usb-missing"

[[buses]]
name = "plc"
transport = "tcp"
host = "127.0.0.1"
port = {free_port}

[mqtt]
servers = ["mqtt://127.0.0.1:{free_port}"]

[kafka]
bootstrap_servers = ["127.0.0.1:{free_port}"]
security_protocol = "SSL"
""")
    checks, text = run_for_config(load_config(str(cfg_path)), socket_path=str(tmp_path / "none.sock"), timeout_s=2)
    names = {c.name: c.ok for c in checks}
    assert names["serial port /dev/serial/by-id/usb-missing"] is False
    assert names[f"modbus bus plc 127.0.0.1:{free_port} tcp"] is False
    assert names[f"mqtt 127.0.0.1:{free_port} tcp"] is False
    assert names[f"kafka 127.0.0.1:{free_port} tcp"] is False
    assert names[f"buffer file {tmp_path / 'data' / 'buffer.db'}"] is True
    assert text.endswith(f"{sum(1 for ok in names.values() if not ok)} of {len(checks)} checks failed")
