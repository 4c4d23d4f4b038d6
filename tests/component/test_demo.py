"""`make demo` runs: the simulated meter is read and readings pile up in the buffer."""

import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_reads_devices_and_buffers_without_services(tmp_path: Path) -> None:
    port = str(_free_port())
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway.cli.demo",
            "--duration",
            "8",
            "--no-watch",
            "--no-services",
            "--meter-port",
            port,
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=90,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    last = out[out.rindex("Outpost ") :]
    assert re.search(r"meter1\s+online", last), last
    assert re.search(r"pump1\s+online", last), last
    waiting = [int(n) for n in re.findall(r"(?:kafka|mqtt)\s+(\d+) records", last)]
    assert len(waiting) == 2 and min(waiting) > 0, last
    assert "the gateway is buffering" in last
