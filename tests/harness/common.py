"""Shared plumbing for the test services: run folders, free ports, child processes, waits.

Every service module (kafka, mosquitto, toxiproxy, pty) starts its programs through
`ManagedProcess`, so that output goes to a log file under the run folder, a failed start
shows the log tail, and whatever happens (a failing fixture, Ctrl-C, an exception at
session end) the process is killed: by the fixture finalizer, by the atexit hook, and,
when the test process itself is SIGKILLed, by the kernel (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import inspect
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_DIR = Path(os.environ.get("OUTPOST_SERVICES_ROOT", REPO_ROOT / ".services"))
CACHE_DIR = Path(os.environ.get("OUTPOST_CACHE_DIR", Path.home() / ".cache" / "outpost"))


class HarnessError(Exception):
    """A test service could not be installed, started or driven. Not retriable by tests."""

    retriable: bool = False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's choice for an ephemeral bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports; the sockets stay bound until all are chosen so none repeats."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool],
    timeout_s: float,
    what: str,
    interval_s: float = 0.1,
    on_timeout: Callable[[], str] | None = None,
) -> None:
    """Poll `check` until it returns true; raise HarnessError naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except HarnessError:
            raise  # a definite failure (e.g. the program exited), not a "not yet"
        except Exception as exc:  # the check's own failure is only a "not yet"
            last_exc = exc
        time.sleep(interval_s)
    detail = f" (last error: {last_exc!r})" if last_exc else ""
    extra = f"\n{on_timeout()}" if on_timeout else ""
    raise HarnessError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}{extra}")


async def until(
    check: Callable[[], Any],
    limit_s: float = 10.0,
    what: str = "condition",
    *,
    interval_s: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> None:
    """Poll `check` (sync, or async returning a bool) on the event loop until it is true.

    Errors of the types in `ignore` mean "not yet" (a socket that is not there yet);
    any other error fails at once. On timeout, AssertionError names `what`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    last_exc: BaseException | None = None
    while True:
        try:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
        except ignore as exc:
            last_exc = exc
        if loop.time() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"{what}: not reached within {limit_s:g}s{detail}")
        await asyncio.sleep(interval_s)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def require_binary(name: str, hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HarnessError(f"`{name}` is not on PATH; {hint}")
    return path


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL it if the thread
    # that forked it dies, so a SIGKILLed pytest leaves no orphan brokers behind.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_live: set[ManagedProcess] = set()
_live_lock = threading.Lock()


class ManagedProcess:
    """One child program with its output in a log file, stopped by process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        detached: bool = False,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        # detached: for `python -m tests.harness up`, where the service must outlive us.
        self.detached = detached
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise HarnessError(f"{self.name} was never started")
        return self.proc.pid

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        # PDEATHSIG fires when the forking *thread* exits, so only use it from the main thread.
        tie = (not self.detached) and threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if tie else None,
                )
            except OSError as exc:
                raise HarnessError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        if not self.detached:
            with _live_lock:
                _live.add(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise with the log tail if the program already exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(
                f"{self.name} exited with code {self.proc.returncode}\n{log_tail(self.log_path)}"
            )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # The group may hold children of the program (none of ours fork, but be sure).
        _signal_group(proc.pid, signal.SIGKILL)
        with _live_lock:
            _live.discard(self)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        with _live_lock:
            _live.discard(self)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """Stop a detached service started by an earlier `up` (its own process group)."""
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return
        time.sleep(0.1)
    _signal_group(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def kill_all_live() -> None:
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        proc.kill()


atexit.register(kill_all_live)


def run_checked(argv: Sequence[str], what: str, *, cwd: Path | None = None,
                timeout_s: float = 600, env: dict[str, str] | None = None) -> str:
    """Run a short command to completion; raise HarnessError with its output if it fails."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        done = subprocess.run(
            [str(a) for a in argv], cwd=cwd, env=full_env, capture_output=True,
            text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{what}: `{' '.join(map(str, argv))}` timed out "
                           f"after {timeout_s:.0f}s") from exc
    except OSError as exc:
        raise HarnessError(f"{what}: cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        out = (done.stdout + done.stderr)[-4000:]
        raise HarnessError(f"{what}: `{' '.join(map(str, argv))}` exited "
                           f"{done.returncode}\n{out}")
    return done.stdout


class RunDir:
    """The folder one harness run writes to: configs, certs, data dirs and logs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def log(self, name: str) -> Path:
        return self.sub("logs") / f"{name}.log"


def session_run_dir() -> RunDir:
    """A fresh folder for this pytest process; folders of finished sessions are pruned."""
    SERVICES_DIR.mkdir(parents=True, exist_ok=True)
    for old in SERVICES_DIR.glob("pytest-*"):
        try:
            pid = int(old.name.split("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    return RunDir(SERVICES_DIR / f"pytest-{os.getpid()}")

@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Serialise installs into the shared cache between concurrent test runs on one machine."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


