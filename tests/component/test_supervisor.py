"""`outpost run` as a process: status socket, SIGHUP reload (bad file kept out), SIGTERM exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from buffer.diagnostics import stats_for_path
from gateway.diagnostics.client import fetch_status

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path, devices: list[str]) -> str:
    text = f"""
[gateway]
group_id = "g"
edge_node_id = "e"
data_dir = "{tmp / "data"}"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"
"""
    for name in devices:
        text += f"""
[[devices]]
name = "{name}"
driver = "simulator"
interval = "100ms"
  [[devices.points]]
  name = "ramp"
  waveform = "ramp"
  count = 3
"""
    return text


def _wait(predicate, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # the socket may not be there yet
            last = e
        time.sleep(0.2)
    raise AssertionError(f"condition not met in {timeout_s}s (last error: {last!r})")


@pytest.fixture
def gateway_proc(tmp_path: Path):
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, ["sim1"]))
    log = open(tmp_path / "gateway.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg)], stdout=log, stderr=log, cwd=ROOT
    )
    yield proc, cfg, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_status_reload_and_clean_stop(gateway_proc) -> None:
    proc, cfg, tmp = gateway_proc
    sock = str(tmp / "outpost.sock")
    status = _wait(lambda: (s := fetch_status(sock))["devices"].get("sim1", {}).get("samples", 0) > 0 and s)
    assert status["gateway"] == "g/e" and status["devices"]["sim1"]["online"]

    # An invalid file is reported and the running configuration stays.
    cfg.write_text(_config(tmp, ["sim1"]).replace('interval = "100ms"', "interval = 100"))
    proc.send_signal(signal.SIGHUP)
    _wait(lambda: "reload rejected" in (tmp / "gateway.log").read_text())
    assert proc.poll() is None
    assert "interval" in fetch_status(sock)["reload_error"], "a rejected reload is visible in outpost status"
    before = fetch_status(sock)["devices"]["sim1"]["samples"]
    _wait(lambda: fetch_status(sock)["devices"]["sim1"]["samples"] > before)

    # A valid one is applied: a device is added without restarting the process.
    cfg.write_text(_config(tmp, ["sim1", "sim2"]))
    proc.send_signal(signal.SIGHUP)
    _wait(lambda: fetch_status(sock)["devices"].get("sim2", {}).get("samples", 0) > 0)
    assert fetch_status(sock)["counters"]["reloads"] == 1
    assert fetch_status(sock)["reload_error"] is None

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    log = (tmp / "gateway.log").read_text()
    assert "msg=stopped" in log
    stats = stats_for_path(str(tmp / "data" / "buffer.db"))
    assert stats["records"] > 0
    # A clean stop removes its status socket (a stale file would make the next start probe it).
    assert not os.path.exists(sock), f"{sock} left behind after a clean stop"


def test_invalid_config_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[gateway]\ngroup_id = 'g'\n")
    res = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 2
    assert "gateway.edge_node_id" in res.stderr


def _outpost(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT, input=stdin, timeout=60
    )


def test_field_commands_against_a_running_gateway(gateway_proc) -> None:
    proc, cfg, tmp = gateway_proc
    sock = str(tmp / "outpost.sock")
    _wait(lambda: fetch_status(sock)["devices"]["sim1"]["samples"] > 0)

    st = _outpost("status", "--config", str(cfg), "--json")
    assert st.returncode == 0, st.stderr
    assert '"sim1"' in st.stdout
    human = _outpost("status", "--config", str(cfg))
    assert "sim1" in human.stdout and "online" in human.stdout

    # tail prints live samples; stop it after a few lines.
    tail = subprocess.Popen(
        [sys.executable, "-m", "gateway", "tail", "--config", str(cfg), "--device", "sim1", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    lines = [tail.stdout.readline() for _ in range(3)]
    tail.terminate()
    tail.wait(timeout=10)
    assert all('"sim1"' in line for line in lines), lines

    # purge refuses while the gateway holds the buffer, and says why.
    busy = _outpost("buffer", "--config", str(cfg), "purge", "--yes")
    assert busy.returncode == 1 and "purge" in busy.stderr

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0

    stats = _outpost("buffer", "--config", str(cfg), "stats")
    assert stats.returncode == 0 and '"records"' in stats.stdout
    out = tmp / "export.jsonl"
    exp = _outpost("buffer", "--config", str(cfg), "export", "--since", "1h", "--format", "jsonl", "-o", str(out))
    assert exp.returncode == 0, exp.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # one per metric, decoded
    assert rows and all(r["stream"] == "g/e/sim1" and r["device"] == "sim1" for r in rows)
    exported = sorted({r["seq"] for r in rows})

    no = _outpost("buffer", "--config", str(cfg), "purge")  # not a terminal, no --yes: refuses
    assert no.returncode == 2
    yes = _outpost("buffer", "--config", str(cfg), "purge", "--yes")
    assert yes.returncode == 0 and f"purged {len(exported)}" in yes.stdout
    after = stats_for_path(str(tmp / "data" / "buffer.db"))
    assert after["records"] == 0 and after["dropped"]["purged"] == len(exported)


def test_doctor_names_what_is_wrong(tmp_path: Path) -> None:
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        _config(tmp_path, ["sim1"])
        + """
[mqtt]
servers = ["mqtt://127.0.0.1:1"]
"""
    )
    res = _outpost("doctor", "--config", str(cfg))
    assert res.returncode == 1
    assert "127.0.0.1:1" in res.stdout


def test_systemd_readiness_watchdog_and_stopping(tmp_path: Path) -> None:
    import socket

    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, ["sim1"]))
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(15)
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "1000000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=env,
    )
    try:
        seen: list[str] = []
        while sum("WATCHDOG=1" in m for m in seen) < 2:  # pings every 0.5 s from the event loop
            seen.append(notify.recv(4096).decode())
        ready = next(m for m in seen if "READY=1" in m)
        # The status line is rendered from the running gateway: devices and buffer depth...
        assert "STATUS=1/1 devices" in ready and "buffer " in ready, ready
        # ... and kept current by the housekeeping loop, not left at its start-up text.
        while not any(m.startswith("STATUS=") for m in seen):
            seen.append(notify.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in seen):
            seen.append(notify.recv(4096).decode())
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


async def test_buffer_drops_reach_the_metrics(tmp_path: Path) -> None:
    from buffer import NewRecord
    from gateway.config import parse_config, resolve_secrets
    from gateway.runtime.supervisor import Gateway

    cfg = parse_config(_config(tmp_path, ["sim1"]))
    gw = Gateway(cfg, resolve_secrets(cfg))
    await gw._open_buffer()
    await gw._start_diagnostics()
    try:
        assert gw.buffer is not None
        await gw.buffer.append([NewRecord("g/e/sim1", b"x" * 10, 1, {})])
        assert await gw.buffer.purge() == 1  # counted as dropped, reason "purged"
        await gw._update_metrics()
        await gw._update_metrics()  # follows the total, does not add it again
        assert gw.metrics.buffer_dropped.value(reason="purged") == 1
    finally:
        await gw.stop()
