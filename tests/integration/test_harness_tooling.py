"""The harness's own tooling: `python -m tests.harness up|env|down` and the leak checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness.common import REPO_ROOT, HarnessError, ManagedProcess, pid_alive, wait_until
from tests.harness.mosquitto import mqtt_connect_probe

pytestmark = pytest.mark.integration


def _harness(args: list[str], root: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUTPOST_SERVICES_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "tests.harness", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def _exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(\S+)$", text, re.MULTILINE))


def test_cli_up_env_down_runs_detached_services(tmp_path):
    up = _harness(["up", "toxiproxy", "mosquitto"], tmp_path)
    pids: dict[str, int] = {}
    try:
        assert up.returncode == 0, up.stderr
        env = _exports(up.stdout)
        assert mqtt_connect_probe(env["OUTPOST_MQTT_HOST"], int(env["OUTPOST_MQTT_PORT"])) == 0
        assert env["OUTPOST_TOXIPROXY_API"].startswith("http://127.0.0.1:")
        assert (tmp_path / "stack" / "env.sh").read_text().strip() == up.stdout.strip()

        again = _harness(["env"], tmp_path)
        assert again.returncode == 0 and _exports(again.stdout) == env
        # A second `up` while the stack runs reuses it instead of starting another.
        assert _exports(_harness(["up", "toxiproxy", "mosquitto"], tmp_path).stdout) == env
        pids = json.loads((tmp_path / "stack" / "state.json").read_text())["pids"]
        assert set(pids) == {"toxiproxy", "mosquitto"}
    finally:
        down = _harness(["down"], tmp_path)
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(p) for p in pids.values())
    assert _harness(["env"], tmp_path).returncode == 1


LEAKY_TESTS = '''
import asyncio
import threading
import time

async def test_leaks_a_task():
    asyncio.get_running_loop().create_task(asyncio.sleep(30), name="forgotten")

def test_leaks_a_thread():
    threading.Thread(target=time.sleep, args=(6,), name="forgotten-thread", daemon=True).start()

async def test_cleans_up():
    task = asyncio.create_task(asyncio.sleep(30))
    task.cancel()
    worker = threading.Thread(target=time.sleep, args=(0.3,))
    worker.start()   # ends within the grace period: not a leak

def test_thread_of_a_session_fixture_is_not_a_leak(session_worker):
    assert session_worker.is_alive()
'''

CONFTEST = '''
import threading
import time

import pytest

from tests.conftest import (  # noqa: F401 - the fixtures and hooks under test
    _outpost_leak_check,
    _outpost_task_leak_check,
    pytest_configure,
    pytest_fixture_setup,
)

@pytest.fixture(scope="session")
def session_worker():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="session-worker")
    t.start()
    yield t
    stop.set()
    t.join()
'''


def test_leak_check_fails_tests_that_leak_tasks_or_threads(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(LEAKY_TESTS))
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_mode = auto\n"
                                         "asyncio_default_fixture_loop_scope = function\n")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OUTPOST_LEAK_CHECK="fail")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    out = done.stdout
    errors = set(re.findall(r"^ERROR test_leaky.py::(\w+)", out, re.MULTILINE))
    assert errors == {"test_leaks_a_task", "test_leaks_a_thread"}, out
    assert "test left 1 asyncio task(s) running: 'forgotten'" in out
    assert "test left 1 thread(s) running: 'forgotten-thread'" in out
    assert "4 passed, 2 errors" in out


def test_a_program_that_dies_at_start_is_reported_with_its_log_tail(tmp_path):
    proc = ManagedProcess("doomed", ["sh", "-c", "echo 'bad key on line 3'; exit 3"],
                          tmp_path / "doomed.log").start()

    def up() -> bool:
        proc.check_alive()
        return False

    with pytest.raises(HarnessError, match=r"(?s)doomed exited with code 3.*bad key on line 3"):
        wait_until(up, 10, "doomed")
    proc.stop()


SERVICE_USER_TEST = '''
import os
import time

def test_uses_mosquitto(mosquitto):
    with open(os.environ["PID_FILE"], "w") as fh:
        fh.write(str(mosquitto.process.pid))
    if os.environ.get("HANG"):
        time.sleep(120)
'''


@pytest.mark.parametrize("ending", ["normal", "sigkill"])
def test_services_die_with_the_test_session(tmp_path, ending):
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import _outpost_stack, mosquitto  # noqa: F401\n")
    (tmp_path / "test_user.py").write_text(SERVICE_USER_TEST)
    pid_file = tmp_path / "mosquitto.pid"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OUTPOST_SERVICES_ROOT=str(tmp_path / "s"),
               PID_FILE=str(pid_file), HANG="1" if ending == "sigkill" else "")
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                str(tmp_path / "test_user.py")], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "", 60,
                   "the inner session to start mosquitto")
        broker = int(pid_file.read_text())
        if ending == "sigkill":
            session.send_signal(signal.SIGKILL)
        out = session.communicate(timeout=60)[0].decode()
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    if ending == "normal":
        assert session.returncode == 0, out
    wait_until(lambda: not pid_alive(broker), 10, f"mosquitto (pid {broker}) to be gone")
