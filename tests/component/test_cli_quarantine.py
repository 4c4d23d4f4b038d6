"""`outpost buffer quarantine list|export|retry|drop` on a real buffer file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from buffer import Buffer, BufferSettings, NewRecord

ROOT = Path(__file__).resolve().parents[2]


def _outpost(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_quarantine_commands(tmp_path: Path) -> None:
    path = str(tmp_path / "buffer.db")
    buf = Buffer.open(path, BufferSettings(100_000_000, 86400.0))
    buf.register_cursor("kafka")
    now = int(time.time() * 1000)
    seqs = buf.append([NewRecord("g/e/d", b"x" * 10, now, {"topic": "t", "type": "DDATA"}),
                       NewRecord("g/e/d", b"y" * 99, now, {"topic": "t", "type": "DDATA"})])
    buf.quarantine("kafka", seqs[0], "too_large:telemetry")
    buf.quarantine("kafka", seqs[1], "held:plant.events")
    buf.ack("kafka", seqs[-1])
    buf.close()

    listed = _outpost("buffer", "--file", path, "quarantine", "list")
    assert listed.returncode == 0, listed.stderr
    assert "too_large:telemetry" in listed.stdout and "held:plant.events" in listed.stdout
    assert "2 quarantined record(s)" in listed.stderr

    exported = _outpost("buffer", "--file", path, "quarantine", "export", "--reason", "held:plant.events")
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [seqs[1]] and rows[0]["payload_bytes"] == 99

    retried = _outpost("buffer", "--file", path, "quarantine", "retry", "--reason", "too_large:telemetry")
    assert retried.returncode == 0 and "1 record(s)" in retried.stdout, retried.stderr
    refused = _outpost("buffer", "--file", path, "quarantine", "drop")
    assert refused.returncode == 2, "no silent drop without --yes off a terminal"
    dropped = _outpost("buffer", "--file", path, "quarantine", "drop", "--yes")
    assert dropped.returncode == 0 and "dropped 1" in dropped.stdout, dropped.stderr

    buf = Buffer.open(path, BufferSettings(100_000_000, 86400.0))
    try:
        again = buf.read("kafka", limit=10)
        assert [r.payload for r in again] == [b"x" * 10], "the retried record is back for its uplink"
        st = buf.stats()
        assert st["quarantine"]["records"] == 0
        assert st["dropped"]["quarantine_dropped"] == 1
    finally:
        buf.close()


def test_check_says_what_removing_an_uplink_would_drop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    buf = Buffer.open(str(data / "buffer.db"), BufferSettings(100_000_000, 86400.0))
    buf.register_cursor("mqtt")
    buf.register_cursor("kafka")
    now = int(time.time() * 1000)
    seqs = buf.append([NewRecord("g/e/d", b"x", now, {"topic": "t", "type": "DDATA"}) for _ in range(7)])
    buf.ack("mqtt", seqs[-1])
    buf.close()
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(f'[gateway]\ngroup_id = "g"\nedge_node_id = "e"\ndata_dir = "{data}"\n'
                   '[mqtt]\nservers = ["mqtt://127.0.0.1:1883"]\n')
    res = _outpost("check", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "no longer has uplink(s) kafka" in res.stdout and "7 undelivered record(s)" in res.stdout, res.stdout
