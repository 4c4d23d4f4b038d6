"""sd_notify against a real datagram socket standing in for systemd."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.runtime.systemd import Notifier, SystemdNotifyError, Watchdog, watchdog_interval_s


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket, as systemd creates for NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


async def pings_within(sock: socket.socket, count: int, timeout_s: float) -> bool:
    """True once `count` WATCHDOG=1 datagrams arrived (polling keeps the loop free)."""
    seen = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        seen += sum(1 for m in drain(sock) if m == "WATCHDOG=1")
        if seen >= count:
            return True
        await asyncio.sleep(0.01)
    return False


async def until(cond, what: str, limit_s: float = 10.0) -> None:
    """Wait for an observable state (a counter, a log line), not for a duration."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def test_ready_status_stopping_arrive_as_datagrams(manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("running: 3 devices")
    assert notifier.status("buffering: kafka down\nsince 10:00")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.stopping("shutting down")
    got = drain(sock)
    notifier.close()
    assert got[0] == "READY=1\nSTATUS=running: 3 devices"
    assert got[1] == "STATUS=buffering: kafka down since 10:00"
    assert got[2] == "WATCHDOG=1"
    assert got[3].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(got[3].split("MONOTONIC_USEC=")[1]) > 0
    assert got[4] == "STOPPING=1\nSTATUS=shutting down"


def test_abstract_namespace_socket() -> None:
    name = f"outpost-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        notifier = Notifier(f"@{name}")
        assert notifier.ready()
        assert sock.recv(100) == b"READY=1"
        notifier.close()
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_a_vanished_manager_socket_raises_a_retriable_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    with pytest.raises(SystemdNotifyError, match=r"gone\.sock") as info:
        notifier.ready()
    assert info.value.retriable
    notifier.close()


def test_assignments_must_be_single_key_value_lines(manager: tuple[str, socket.socket]) -> None:
    notifier = Notifier(manager[0])
    with pytest.raises(ValueError):
        notifier.notify("READY")
    with pytest.raises(ValueError):
        notifier.notify("STATUS=a\nb")
    notifier.close()


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_pid() -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=4242) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    with pytest.raises(SystemdNotifyError):
        watchdog_interval_s({"WATCHDOG_USEC": "soon"})


async def test_watchdog_pings_from_the_loop_and_a_blocked_loop_stops_them(
    manager: tuple[str, socket.socket],
) -> None:
    path, sock = manager
    notifier = Notifier(path)
    watchdog = Watchdog(notifier, interval_s=0.02)
    watchdog.start()
    try:
        assert await pings_within(sock, 3, timeout_s=5)
        drain(sock)
        # A hung event loop: no ping can be sent while it is blocked.
        time.sleep(0.3)  # noqa: ASYNC251 - blocking on purpose, this is the hang
        assert drain(sock) == []
        assert await pings_within(sock, 1, timeout_s=5)
    finally:
        await watchdog.stop()
        notifier.close()
    assert not watchdog.active


async def test_watchdog_withholds_pings_while_unhealthy(manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    healthy = False
    checks = 0
    five_checks = asyncio.Event()

    def health() -> bool:
        nonlocal checks
        checks += 1
        if checks == 5:
            five_checks.set()
        return healthy

    notifier = Notifier(path)
    watchdog = Watchdog(notifier, interval_s=0.02, healthy=health)
    watchdog.start()
    try:
        # Five decisions taken while unhealthy (a counter, not a duration): none sent a ping.
        await asyncio.wait_for(five_checks.wait(), 10)
        assert drain(sock) == [] and watchdog.pings == 0
        healthy = True
        assert await pings_within(sock, 1, timeout_s=5)
        assert watchdog.pings >= 1
    finally:
        await watchdog.stop()
        notifier.close()


async def test_watchdog_survives_send_failures(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.runtime.systemd")
    path = str(tmp_path / "late.sock")
    notifier = Notifier(path)
    watchdog = Watchdog(notifier, interval_s=0.02)
    watchdog.start()
    # The first send met no socket (logged once), and the watchdog goes on.
    await until(lambda: any("watchdog ping failed" in r.getMessage() for r in caplog.records),
                "the failed send to be logged")
    assert watchdog.active and watchdog.pings == 0
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        got = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 100), 2)
        assert got == b"WATCHDOG=1"
        assert watchdog.pings >= 1
    finally:
        await watchdog.stop()
        notifier.close()
        sock.close()


async def test_watchdog_does_nothing_without_interval_or_socket(manager: tuple[str, socket.socket]) -> None:
    w1 = Watchdog(Notifier(manager[0]), interval_s=None)
    w2 = Watchdog(Notifier(None), interval_s=1.0)
    w1.start()
    w2.start()
    assert not w1.active and not w2.active
    await w1.stop()
    await w2.stop()


async def test_every_liveness_check_must_pass_before_a_ping(
    manager: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture,
) -> None:
    path, sock = manager
    caplog.set_level(logging.INFO, logger="gateway.runtime.systemd")
    writer_stalled: str | None = "no commit for 40 s"
    notifier = Notifier(path)
    watchdog = Watchdog(notifier, interval_s=0.02)
    watchdog.add_check("loop", lambda: None)
    watchdog.add_check("buffer-writer", lambda: writer_stalled)
    with pytest.raises(ValueError, match="already registered"):
        watchdog.add_check("loop", lambda: None)
    watchdog.start()
    try:
        await until(lambda: watchdog.withheld >= 3, "three withheld pings")
        assert drain(sock) == [] and watchdog.pings == 0
        assert watchdog.withheld >= 3
        assert watchdog.failing() == {"buffer-writer": "no commit for 40 s"}
        # Logged once (not every tick), naming the check and its reason.
        withheld = [r for r in caplog.records if "pings withheld" in r.getMessage()]
        assert len(withheld) == 1 and "buffer-writer: no commit for 40 s" in withheld[0].getMessage()
        writer_stalled = None
        assert await pings_within(sock, 2, timeout_s=5)
        assert any("pings resumed" in r.getMessage() for r in caplog.records)
    finally:
        await watchdog.stop()
        notifier.close()


async def test_a_check_that_raises_withholds_pings(manager: tuple[str, socket.socket]) -> None:
    path, sock = manager
    notifier = Notifier(path)
    watchdog = Watchdog(notifier, interval_s=0.02)

    def broken() -> str | None:
        raise RuntimeError("heartbeat file gone")

    watchdog.add_check("buffer-writer", broken)
    watchdog.start()
    try:
        await until(lambda: watchdog.withheld >= 3, "three withheld pings")
        assert drain(sock) == [] and watchdog.pings == 0
        assert "heartbeat file gone" in watchdog.failing()["buffer-writer"]
    finally:
        await watchdog.stop()
        notifier.close()
