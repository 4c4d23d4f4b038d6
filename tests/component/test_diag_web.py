"""The diagnostics HTTP listener answering real HTTP requests: page, /status.json, /metrics, token."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest

from gateway.diagnostics.errors import DiagnosticsError
from gateway.diagnostics.web import WebServer, parse_listen

TOKEN = "0123456789abcdef0123"


def get(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


class Doc:
    def __init__(self) -> None:
        self.published = 250

    async def __call__(self) -> dict[str, Any]:
        return {"gateway": "g/e", "links": {"kafka": {"up": True, "counters": {"delivered": self.published}}},
                "history": {"depth": {"t_ms": [1, 2], "cursors": {"kafka": [0, 5]}}}}


async def test_page_status_json_and_metrics_are_served_read_only() -> None:
    doc = Doc()
    server = WebServer(doc, "127.0.0.1:0")
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        code, headers, body = await asyncio.to_thread(get, f"{base}/metrics")
        assert code == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert 'outpost_samples_published_total{uplink="kafka"} 250.0' in body.splitlines()
        doc.published = 251  # rendered at scrape time
        _, _, body = await asyncio.to_thread(get, f"{base}/metrics?x=1")
        assert 'outpost_samples_published_total{uplink="kafka"} 251.0' in body.splitlines()

        code, headers, body = await asyncio.to_thread(get, f"{base}/status.json")
        assert code == 200 and headers["Content-Type"] == "application/json"
        status = json.loads(body)
        assert status["gateway"] == "g/e" and status["history"]["depth"]["cursors"]["kafka"] == [0, 5]
        assert isinstance(status["now_ms"], int)

        code, headers, body = await asyncio.to_thread(get, f"{base}/")
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert '<script src="page.js"' in body
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        code, headers, body = await asyncio.to_thread(get, f"{base}/page.js")
        assert code == 200 and "status.json" in body and headers["Content-Type"].startswith("text/javascript")

        code, headers, body = await asyncio.to_thread(get, f"{base}/metrics", "HEAD")
        assert code == 200 and body == "" and int(headers["Content-Length"]) > 0
        assert (await asyncio.to_thread(get, f"{base}/nothing"))[0] == 404
        assert (await asyncio.to_thread(get, f"{base}/status.json", "POST"))[0] == 405
        assert (await asyncio.to_thread(get, f"{base}/", "PUT"))[0] == 405
    finally:
        await server.close()


async def test_without_the_page_only_metrics_and_status_json_answer() -> None:
    server = WebServer(Doc(), "127.0.0.1:0", page=False)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert (await asyncio.to_thread(get, f"{base}/"))[0] == 404
        assert (await asyncio.to_thread(get, f"{base}/page.js"))[0] == 404
        assert (await asyncio.to_thread(get, f"{base}/metrics"))[0] == 200
    finally:
        await server.close()


async def test_a_token_is_required_when_one_is_set() -> None:
    server = WebServer(Doc(), "127.0.0.1:0", token=TOKEN)
    await server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        for path in ("/", "/status.json", "/metrics", "/page.js"):
            code, headers, _ = await asyncio.to_thread(get, f"{base}{path}")
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
        assert (await asyncio.to_thread(get, f"{base}/metrics", "GET", {"Authorization": "Bearer wrong"}))[0] == 401
        assert (await asyncio.to_thread(get, f"{base}/status.json?token={TOKEN[:-1]}"))[0] == 401
        assert (await asyncio.to_thread(get, f"{base}/metrics", "GET", {"Authorization": f"Bearer {TOKEN}"}))[0] == 200
        assert (await asyncio.to_thread(get, f"{base}/status.json?token={TOKEN}"))[0] == 200
        assert (await asyncio.to_thread(get, f"{base}/?token={TOKEN}"))[0] == 200
    finally:
        await server.close()


def test_beyond_loopback_is_refused_unless_allowed_and_then_needs_a_token() -> None:
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    with pytest.raises(DiagnosticsError, match="loopback"):
        WebServer(Doc(), "0.0.0.0:9108")
    with pytest.raises(DiagnosticsError, match="token"):
        WebServer(Doc(), "0.0.0.0:9108", allow_remote=True)
    with pytest.raises(DiagnosticsError, match="token"):
        WebServer(Doc(), "0.0.0.0:9108", allow_remote=True, token="short")
    WebServer(Doc(), "0.0.0.0:9108", allow_remote=True, token=TOKEN)
    with pytest.raises(DiagnosticsError, match="host:port"):
        parse_listen("9108")


async def test_a_silent_or_garbage_client_does_not_block_scrapes() -> None:
    server = WebServer(Doc(), "127.0.0.1:0", request_timeout_s=0.5)
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


async def test_a_failing_status_provider_is_a_500_not_a_dead_listener() -> None:
    calls = []

    async def broken() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {}

    server = WebServer(broken, "127.0.0.1:0")
    await server.start()
    try:
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/metrics"))[0] == 500
        assert (await asyncio.to_thread(get, f"http://127.0.0.1:{server.port}/metrics"))[0] == 200
    finally:
        await server.close()


async def test_a_busy_port_is_reported() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        server = WebServer(Doc(), f"127.0.0.1:{taken.getsockname()[1]}")
        with pytest.raises(DiagnosticsError, match="cannot serve diagnostics"):
            await server.start()
    finally:
        taken.close()
