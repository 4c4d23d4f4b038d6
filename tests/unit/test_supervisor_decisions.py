"""The supervisor's decisions, in-process (gateway.runtime.supervisor.Gateway): what a
reload keeps and what it changes, and that stopping (for a reload or for good) commits the
samples read so far. Simulated devices and a real buffer file; the MQTT uplink, where one is
configured, points at a closed port (it only needs its buffer cursor here).

The process around it (signals, the status socket, systemd) is tested by
tests/component/test_supervisor.py."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from buffer.diagnostics import stats_for_path
from gateway.config_build import load_checked
from gateway.runtime.supervisor import Gateway


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp: Path, devices: list[str], *, flush: str = "60s", mqtt_port: int | None = None,
           data_dir: str = "data", max_size_bytes: int | None = None) -> Path:
    text = f"""
[gateway]
group_id = "g"
edge_node_id = "e"
data_dir = "{tmp / data_dir}"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"

[buffer]
flush_interval = "{flush}"
"""
    if max_size_bytes is not None:
        text += f"max_size_bytes = {max_size_bytes}\n"
    if mqtt_port is not None:
        text += f'\n[mqtt]\nservers = ["mqtt://127.0.0.1:{mqtt_port}"]\n'
    for name in devices:
        text += f"""
[[devices]]
name = "{name}"
driver = "simulator"
interval = "20ms"
  [[devices.points]]
  name = "ramp"
  waveform = "ramp"
  count = 2
"""
    path = tmp / f"outpost-{len(list(tmp.glob('outpost-*.toml')))}.toml"
    path.write_text(text)
    return path


async def started(path: Path) -> Gateway:
    res = load_checked(str(path))
    assert res.ok, res.problems
    gw = Gateway(res.config, res.secrets, config_path=str(path))
    await gw.start()
    return gw


async def until(cond, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def buffer_file(tmp: Path, data_dir: str = "data") -> str:
    return str(tmp / data_dir / "buffer.db")


async def samples_of(gw: Gateway, device: str) -> int:
    return (await gw.status())["devices"].get(device, {}).get("samples", 0)


async def test_stopping_commits_the_samples_read_since_the_last_flush(tmp_path: Path) -> None:
    # The writer flushes every 60 s here: anything in the buffer got there by the stop.
    gw = await started(config(tmp_path, ["sim1"]))
    try:
        await until(lambda: gw.counters["samples"] >= 10, "ten samples")
        assert (await gw.status())["buffer"]["records"] == 0
    finally:
        await gw.stop()
    st = stats_for_path(buffer_file(tmp_path))
    assert st["records"] > 0


async def test_a_rejected_reload_keeps_everything_running_and_says_why(tmp_path: Path) -> None:
    gw = await started(config(tmp_path, ["sim1"]))
    try:
        bad = tmp_path / "bad.toml"
        bad.write_text(config(tmp_path, ["sim1", "sim2"]).read_text().replace('interval = "20ms"', "interval = 20"))
        before = gw.counters["samples"]
        assert await gw.reload(str(bad)) is False
        status = await gw.status()
        assert status["counters"]["reload_failures"] == 1 and status["counters"]["reloads"] == 0
        assert "interval" in status["reload_error"] and status["reload_error"].startswith("2 problem(s): ")
        assert status["reload"]["ok"] is False
        assert list(status["devices"]) == ["sim1"]
        await until(lambda: gw.counters["samples"] > before + 5, "samples after the rejected reload")
        assert status["buffer"]["records"] == 0      # nothing was stopped, so nothing flushed
    finally:
        await gw.stop()


async def test_a_reload_adds_a_device_commits_what_was_read_and_clears_the_last_error(tmp_path: Path) -> None:
    gw = await started(config(tmp_path, ["sim1"]))
    try:
        bad = tmp_path / "bad.toml"
        bad.write_text("[gateway]\n")
        assert await gw.reload(str(bad)) is False
        await until(lambda: gw.counters["samples"] >= 5, "samples")
        assert await gw.reload(str(config(tmp_path, ["sim1", "sim2"]))) is True
        status = await gw.status()
        assert status["counters"]["reloads"] == 1 and status["counters"]["reload_failures"] == 1
        assert status["reload_error"] is None and status["reload"]["ok"] is True
        # The samples read under the old configuration were committed by the reload's stop.
        assert status["buffer"]["records"] > 0
        assert set(status["devices"]) == {"sim1", "sim2"}
        for _ in range(200):
            if await samples_of(gw, "sim2") > 0:
                break
            await asyncio.sleep(0.02)
        assert await samples_of(gw, "sim2") > 0
        # The device that stayed keeps its figures across the reload.
        assert await samples_of(gw, "sim1") >= 5
    finally:
        await gw.stop()


async def test_a_reload_that_removes_a_device_stops_polling_it(tmp_path: Path) -> None:
    gw = await started(config(tmp_path, ["sim1", "sim2"]))
    try:
        await until(lambda: gw.counters["samples"] >= 10, "samples")
        assert await gw.reload(str(config(tmp_path, ["sim1"]))) is True
        status = await gw.status()
        assert list(status["devices"]) == ["sim1"]
        assert not [t for t in status["tasks"] if "sim2" in t]
    finally:
        await gw.stop()


async def test_buffer_and_data_dir_changes_wait_for_a_restart(tmp_path: Path, caplog) -> None:
    gw = await started(config(tmp_path, ["sim1"]))
    try:
        changed = config(tmp_path, ["sim1", "sim2"], data_dir="elsewhere", flush="50ms",
                         max_size_bytes=2_000_000)
        assert await gw.reload(str(changed)) is True
        assert any("need a restart" in r.getMessage() for r in caplog.records)
        # The devices changed; the buffer and the data directory did not.
        assert set((await gw.status())["devices"]) == {"sim1", "sim2"}
        assert gw.cfg.gateway.data_dir == str(tmp_path / "data")
        assert gw.cfg.buffer.flush_interval == 60.0
        assert not (tmp_path / "elsewhere").exists()
    finally:
        await gw.stop()


async def test_removing_an_uplink_on_reload_releases_its_buffer_cursor(tmp_path: Path) -> None:
    port = _closed_port()
    gw = await started(config(tmp_path, ["sim1"], mqtt_port=port))
    try:
        await until(lambda: gw.counters["samples"] >= 5, "samples")
        status = await gw.status()
        assert list(status["buffer"]["cursors"]) == ["mqtt"]
        assert status["links"]["mqtt"]["up"] is False
        assert await gw.reload(str(config(tmp_path, ["sim1"]))) is True
        status = await gw.status()
        assert status["buffer"]["cursors"] == {}
        assert "mqtt" not in status["links"]
        # With no uplink left the records stay for the next one configured, not dropped.
        assert status["buffer"]["dropped"]["uplink_removed"] == 0
        assert status["buffer"]["records"] > 0
        assert await gw.reload(str(config(tmp_path, ["sim1"], mqtt_port=port))) is True
        status = await gw.status()
        assert status["buffer"]["cursors"]["mqtt"]["records"] == status["buffer"]["records"] > 0
    finally:
        await gw.stop()


@pytest.mark.parametrize("online", [True, False])
async def test_the_status_line_counts_devices_links_and_the_backlog(tmp_path: Path, online: bool) -> None:
    port = _closed_port()
    gw = await started(config(tmp_path, ["sim1", "sim2"], mqtt_port=port, flush="20ms"))
    try:
        await until(lambda: gw.counters["samples"] >= 10, "samples")
        for _ in range(500):
            st = await gw.status()
            if st["buffer"]["cursors"].get("mqtt", {}).get("records", 0) > 0:
                break
            await asyncio.sleep(0.02)
        line = await gw.status_line()
        parts = line.split("; ")
        assert parts[0] == "2/2 devices"
        assert parts[1].startswith("mqtt down")
        depth = int(parts[2].split()[1])
        assert parts[2] == f"buffer {depth} records" and depth > 0
    finally:
        await gw.stop()
