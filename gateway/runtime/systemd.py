"""systemd integration without libsystemd: readiness, status and watchdog over $NOTIFY_SOCKET.

The unit is `Type=notify` with `WatchdogSec=`. The gateway sends READY=1 once it runs,
STATUS=... lines that `systemctl status` shows, STOPPING=1 on shutdown, and WATCHDOG=1
pings from a task on the event loop itself: if the loop hangs, the pings stop and systemd
restarts the process. Liveness checks registered with `Watchdog.add_check` (the buffer
writer's heartbeat, for example) must all pass before a ping is sent, so a process whose
loop runs but whose work has stalled is restarted too. The gateway's housekeeping
refreshes the STATUS= text (links, buffer depth). Outside systemd (no NOTIFY_SOCKET) everything
here is a no-op.

    notifier = Notifier.from_environment()
    watchdog = Watchdog(notifier, interval_s=watchdog_interval_s())
    watchdog.add_check("buffer-writer", buffer_writer_liveness)  # None, or why not alive
    watchdog.start()
    notifier.ready("running: 10 devices")
    ...
    notifier.stopping()
    await watchdog.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from common.logs import StateLog
from gateway.errors import OutpostError

log = logging.getLogger(__name__)


class SystemdNotifyError(OutpostError):
    """A notification could not be delivered to the service manager."""

    retriable = True


def _socket_address(value: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte instead of a file path.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def watchdog_interval_s(
    env: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Ping interval (half of WatchdogSec) when systemd asked this process for pings.

    None means no watchdog is configured (not a failure). systemd sets WATCHDOG_PID when
    the variable is meant for one process; a child that inherited it must not ping.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        value = int(usec)
    except ValueError as exc:
        raise SystemdNotifyError(f"WATCHDOG_USEC={usec!r} is not an integer") from exc
    if value <= 0:
        return None
    wd_pid = env.get("WATCHDOG_PID", "")
    if wd_pid and wd_pid.isdigit() and int(wd_pid) != (os.getpid() if pid is None else pid):
        return None
    return value / 1_000_000 / 2


class Notifier:
    """Sends sd_notify datagrams. Disabled (every call returns False) without a socket."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *assignments: str) -> bool:
        """Send "KEY=value" lines in one datagram. False when there is no service manager."""
        if self.address is None:
            return False
        for line in assignments:
            if "=" not in line or "\n" in line:
                raise ValueError(f"sd_notify wants single-line KEY=value assignments, got {line!r}")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # A stuck manager must never block the event loop: fail instead and retry later.
            sock.setblocking(False)
            self._sock = sock
        try:
            self._sock.sendto("\n".join(assignments).encode(), _socket_address(self.address))
        except OSError as exc:
            raise SystemdNotifyError(
                f"sd_notify to NOTIFY_SOCKET={self.address}: {exc.strerror or exc}"
            ) from exc
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """Before applying a new configuration; follow with ready() when done."""
        mono_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={mono_usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())


LivenessCheck = Callable[[], str | None]
"""Returns None while the thing it watches is alive, else a short reason ("no commit for 40 s")."""


class Watchdog:
    """Owner of the task that sends WATCHDOG=1 every `interval_s` from the event loop.

    Before every ping, `healthy` (optional, a bool) and every check added with `add_check`
    are asked; any failure withholds the ping, so systemd restarts a process whose loop
    still runs but whose work has stalled (a buffer writer thread that stopped committing).
    A check that raises counts as failed. Which checks fail, and why, is logged once when
    the pings stop and once when they resume. A failed send is logged once and retried at
    the next tick.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None,
        *,
        healthy: Callable[[], bool] | None = None,
    ) -> None:
        self._notifier = notifier
        self.interval_s = interval_s
        self._healthy = healthy
        self._checks: dict[str, LivenessCheck] = {}
        self._task: asyncio.Task[None] | None = None
        self._states = StateLog(log)
        self.pings = 0
        self.withheld = 0

    def add_check(self, name: str, check: LivenessCheck) -> None:
        """Register a liveness check; all of them must return None for a ping to be sent."""
        if name in self._checks:
            raise ValueError(f"watchdog check {name!r} is already registered")
        self._checks[name] = check

    def failing(self) -> dict[str, str]:
        """Name -> reason for every check that fails now (empty: healthy)."""
        failures: dict[str, str] = {}
        if self._healthy is not None and not self._healthy():
            failures["healthy"] = "gateway reports itself unhealthy"
        for name, check in self._checks.items():
            try:
                reason = check()
            except Exception as exc:  # a broken check must not kill the watchdog task
                reason = f"check raised {type(exc).__name__}: {exc}"
            if reason is not None:
                failures[name] = str(reason) or "not alive"
        return failures

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        if self.interval_s is None or not self._notifier.enabled or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(), name="systemd-watchdog")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _run(self) -> None:
        assert self.interval_s is not None
        while True:
            failures = self.failing()
            if not failures:
                self._states.recovered("watchdog:health", "watchdog pings resumed")
                try:
                    self._notifier.watchdog()
                    self.pings += 1
                    self._states.recovered("watchdog:send", "watchdog ping delivered again")
                except SystemdNotifyError as exc:
                    self._states.problem("watchdog:send", "watchdog ping failed", reason=str(exc))
            else:
                self.withheld += 1
                why = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
                self._states.problem(
                    "watchdog:health",
                    f"watchdog pings withheld, systemd will restart the gateway: {why}",
                    level=logging.ERROR,
                    reason=why,
                )
            await asyncio.sleep(self.interval_s)
