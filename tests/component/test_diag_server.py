"""The status socket with real Unix-socket clients: status, tail, slow clients, permissions."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway.diagnostics.client import fetch_status, render_status, tail
from gateway.diagnostics.errors import DiagnosticsError
from gateway.diagnostics.server import StatusServer


# Plain file helpers: a test may block for a stat, the gateway code may not.
def exists(path: str) -> bool:
    return os.path.exists(path)


def write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def read_text(path: str) -> str:
    return Path(path).read_text()


def status_doc() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "uptime_s": 42.0,
        "clock": {"synced": True},
        "links": {"mqtt": {"up": True, "since_ms": 1}},
        "buffer": {"cursors": {"mqtt": {"records": 0, "bytes": 0}}},
        "devices": {"meter1": {"online": True, "last_good_ts_ms": 1, "errors": 0, "quality": "good"}},
    }


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path is short enough on Linux.
    return str(tmp_path / "run" / "outpost.sock")


async def read_line(reader: asyncio.StreamReader) -> dict[str, Any]:
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line, "server closed the connection"
    return json.loads(line)


async def test_status_round_trip_with_the_cli_client(sock_path: str) -> None:
    calls = 0

    def provider() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return status_doc()

    server = StatusServer(sock_path, provider)
    await server.start()
    try:
        status = await asyncio.to_thread(fetch_status, sock_path)
        assert status["version"] == "0.1.0" and status["devices"]["meter1"]["online"] is True
        assert isinstance(status["now_ms"], int)
        assert calls == 1
        assert "meter1" in render_status(status)
    finally:
        await server.close()
    assert not exists(sock_path)


async def test_async_provider_and_provider_failure_are_reported(sock_path: str) -> None:
    fail = False

    async def provider() -> dict[str, Any]:
        if fail:
            raise RuntimeError("buffer thread gone")
        return status_doc()

    server = StatusServer(sock_path, provider)
    await server.start()
    try:
        assert (await asyncio.to_thread(fetch_status, sock_path))["uptime_s"] == 42.0
        fail = True
        with pytest.raises(DiagnosticsError, match="buffer thread gone"):
            await asyncio.to_thread(fetch_status, sock_path)
    finally:
        await server.close()


async def test_socket_permissions_are_0660_and_group_outpost_when_it_exists(sock_path: str) -> None:
    server = StatusServer(sock_path, status_doc)
    await server.start()
    try:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        try:
            expected_gid = grp.getgrnam("outpost").gr_gid
        except KeyError:
            expected_gid = os.getgid()
        assert st.st_gid == expected_gid
        assert not [p for p in os.listdir(os.path.dirname(sock_path)) if p.endswith(".tmp")]
    finally:
        await server.close()


async def test_socket_is_given_to_the_configured_group(sock_path: str) -> None:
    # Any existing group other than ours shows that chown happens (root can chown to any).
    other = next(g for g in grp.getgrall() if g.gr_gid != os.getgid())
    server = StatusServer(sock_path, status_doc, group=other.gr_name)
    await server.start()
    try:
        if os.geteuid() == 0:
            assert os.stat(sock_path).st_gid == other.gr_gid
        else:
            assert os.stat(sock_path).st_gid in (other.gr_gid, os.getgid())
    finally:
        await server.close()


async def test_stale_socket_from_a_dead_process_is_replaced(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock_path)
    dead.close()  # the file stays, nothing listens: what kill -9 leaves behind
    server = StatusServer(sock_path, status_doc)
    await server.start()
    try:
        assert (await asyncio.to_thread(fetch_status, sock_path))["version"] == "0.1.0"
    finally:
        await server.close()


async def test_a_second_gateway_does_not_steal_a_live_socket(sock_path: str) -> None:
    first = StatusServer(sock_path, status_doc)
    await first.start()
    try:
        with pytest.raises(DiagnosticsError, match="already serving"):
            await StatusServer(sock_path, status_doc).start()
        assert (await asyncio.to_thread(fetch_status, sock_path))["version"] == "0.1.0"
    finally:
        await first.close()


async def test_a_regular_file_at_the_socket_path_is_never_deleted(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path))
    write_text(sock_path, "important")
    with pytest.raises(DiagnosticsError, match="not a socket"):
        await StatusServer(sock_path, status_doc).start()
    assert read_text(sock_path) == "important"


async def test_malformed_and_unknown_requests_get_errors_and_the_connection_survives(sock_path: str) -> None:
    server = StatusServer(sock_path, status_doc)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b"{not json\n")
        assert "malformed" in (await read_line(reader))["error"]
        writer.write(b'["status"]\n')
        assert (await read_line(reader))["ok"] is False
        writer.write(b'{"cmd": "reboot"}\n')
        assert "unknown cmd" in (await read_line(reader))["error"]
        writer.write(b'{"cmd": "status"}\n')
        assert (await read_line(reader))["ok"] is True
        writer.write(b'{"cmd": "status"}\n')
        assert (await read_line(reader))["status"]["version"] == "0.1.0"
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()


async def test_missing_socket_gives_a_hint() -> None:
    with pytest.raises(DiagnosticsError) as info:
        fetch_status("/nonexistent/outpost.sock", timeout_s=1)
    assert "systemctl status outpost" in info.value.hint


def sample(device: str, point: str, value: float) -> dict[str, Any]:
    return {"device": device, "point": point, "value": value, "ts_ms": 1_795_000_000_000, "quality": "good"}


async def test_tail_filters_by_device_and_point(sock_path: str) -> None:
    server = StatusServer(sock_path, status_doc)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "tail", "device": "m1", "point": "v"}\n')
        ack = await read_line(reader)
        assert ack["ok"] is True and ack["tail"]["device"] == "m1"
        assert server.tail_clients == 1
        server.publish_sample(sample("m2", "v", 1))
        server.publish_sample(sample("m1", "i", 2))
        server.publish_sample(sample("m1", "v", 3))
        assert (await read_line(reader)) == {"sample": sample("m1", "v", 3)}
        writer.close()
        await writer.wait_closed()
        for _ in range(100):
            if server.tail_clients == 0:
                break
            await asyncio.sleep(0.01)
        assert server.tail_clients == 0
    finally:
        await server.close()


async def test_a_client_that_does_not_read_loses_lines_and_is_told_how_many(sock_path: str) -> None:
    server = StatusServer(sock_path, status_doc, tail_queue_lines=100)
    await server.start()
    try:
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "tail"}\n')
        assert (await read_line(reader))["ok"] is True
        # 20,000 samples in one go: the gateway never waits for this client.
        for i in range(20_000):
            server.publish_sample(sample("m1", "v", i))
        await asyncio.sleep(0.05)
        server.publish_sample(sample("m1", "v", 20_000))
        got = [await read_line(reader) for _ in range(102)]
        values = [line["sample"]["value"] for line in got if "sample" in line]
        drops = [line["dropped"] for line in got if "dropped" in line]
        assert values[:100] == list(range(100))
        assert drops == [19_900]
        assert values[100] == 20_000
        assert "dropped" in got[100] and "sample" in got[101]
        writer.close()
        await writer.wait_closed()
    finally:
        await server.close()


async def test_a_stalled_client_never_slows_a_reading_client_or_status(sock_path: str) -> None:
    server = StatusServer(sock_path, status_doc, tail_queue_lines=1000)
    await server.start()
    try:
        stalled_reader, stalled_writer = await asyncio.open_unix_connection(sock_path)
        stalled_writer.write(b'{"cmd": "tail"}\n')
        assert (await read_line(stalled_reader))["ok"] is True

        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "tail"}\n')
        assert (await read_line(reader))["ok"] is True

        received: list[dict[str, Any]] = []

        async def consume() -> None:
            while len(received) < 10_000:
                received.append(await read_line(reader))

        consumer = asyncio.create_task(consume())
        try:
            for batch in range(50):
                for i in range(200):
                    server.publish_sample(sample("m1", "v" * 40, batch * 200 + i))
                # Pace the gateway to the reading client (so that it never has to drop);
                # the stalled client meanwhile falls ever further behind.
                for _ in range(2000):
                    if len(received) >= (batch + 1) * 200:
                        break
                    await asyncio.sleep(0.005)
            await asyncio.wait_for(consumer, 20)
        finally:
            consumer.cancel()
        assert [r["sample"]["value"] for r in received] == list(range(10_000))
        stalled = [c for c in server._tails if c.sent < 10_000]
        assert len(stalled) == 1 and stalled[0].dropped_total > 0
        assert (await asyncio.to_thread(fetch_status, sock_path))["version"] == "0.1.0"
        for w in (writer, stalled_writer):
            w.close()
    finally:
        await server.close()


async def test_cli_tail_generator_yields_samples_and_drop_notices(sock_path: str) -> None:
    server = StatusServer(sock_path, status_doc, tail_queue_lines=10)
    await server.start()
    events: list[dict[str, Any]] = []
    done = threading.Event()

    def run_tail() -> None:
        gen = tail(sock_path, device="m1")
        try:
            for event in gen:
                events.append(event)
                if len(events) == 3:
                    break
        finally:
            gen.close()
            done.set()

    thread = threading.Thread(target=run_tail)
    thread.start()
    try:
        for _ in range(200):
            if server.tail_clients:
                break
            await asyncio.sleep(0.01)
        for i in range(15):
            server.publish_sample(sample("m1", "v", i))
        await asyncio.sleep(0.05)
        server.publish_sample(sample("m1", "v", 99))
        for _ in range(500):
            if done.is_set():
                break
            await asyncio.sleep(0.01)
    finally:
        await server.close()
        thread.join(5)
    assert events[0] == {"sample": sample("m1", "v", 0)}
    assert events[1] == {"sample": sample("m1", "v", 1)}
    assert len(events) == 3


async def test_close_ends_tail_clients_and_removes_the_socket(sock_path: str) -> None:
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        server = StatusServer(sock_path, status_doc)
        await server.start()
        reader, writer = await asyncio.open_unix_connection(sock_path)
        writer.write(b'{"cmd": "tail"}\n')
        assert (await read_line(reader))["ok"] is True
        idle_reader, idle_writer = await asyncio.open_unix_connection(sock_path)
        await asyncio.sleep(0.05)
        await asyncio.wait_for(server.close(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
        assert not exists(sock_path)
        writer.close()
        idle_writer.close()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    # Shutting down must not leave "Exception in callback" noise in the journal.
    assert loop_errors == []
