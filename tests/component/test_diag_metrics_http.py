"""The metrics endpoint answering real HTTP requests on a loopback port."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest

from gateway.diagnostics.errors import DiagnosticsError
from gateway.diagnostics.metrics import GatewayMetrics, MetricsRegistry, MetricsServer


def get(url: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


async def test_get_metrics_returns_the_registry() -> None:
    registry = MetricsRegistry()
    m = GatewayMetrics(registry)
    server = MetricsServer(registry, "127.0.0.1:0")
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        m.samples_published.inc(250, uplink="kafka")
        code, headers, body = await asyncio.to_thread(get, f"{base}/metrics")
        assert code == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'outpost_samples_published_total{uplink="kafka"} 250' in body.splitlines()

        m.samples_published.inc(uplink="kafka")
        _, _, body = await asyncio.to_thread(get, f"{base}/metrics?x=1")
        assert 'outpost_samples_published_total{uplink="kafka"} 251' in body.splitlines()

        code, headers, body = await asyncio.to_thread(get, f"{base}/metrics", "HEAD")
        assert code == 200 and body == "" and int(headers["Content-Length"]) > 0

        assert (await asyncio.to_thread(get, f"{base}/"))[0] == 404
        assert (await asyncio.to_thread(get, f"{base}/metrics", "POST"))[0] == 405
    finally:
        await server.close()


async def test_a_silent_or_garbage_client_does_not_block_scrapes() -> None:
    registry = MetricsRegistry()
    GatewayMetrics(registry)
    server = MetricsServer(registry, "127.0.0.1:0", request_timeout_s=0.5)
    await server.start()
    try:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
        g_reader, g_writer = await asyncio.open_connection("127.0.0.1", server.port)
        g_writer.write(b"NONSENSE\r\n\r\n")
        assert (await asyncio.wait_for(g_reader.read(), 5)).startswith(b"HTTP/1.1 400")
        code, _, _ = await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/metrics")
        assert code == 200
        # The idle connection is closed by the server after its request timeout.
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        for w in (idle_writer, g_writer):
            w.close()
    finally:
        await server.close()


async def test_a_busy_port_is_reported() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        server = MetricsServer(MetricsRegistry(), f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(DiagnosticsError, match="cannot serve metrics"):
            await server.start()
    finally:
        taken.close()
