"""CLI start-up time: `python -m tests.benchmarks.cli --json`.

Issue 16 asks that `outpost --version`, `outpost status` and `outpost tail` start within 3x
a bare `python -c pass`: on a Pi every status call and every shell completion pays it.
Prints one JSON object with the median wall-clock time (and the minimum) of each command
over --repeat interleaved rounds (each round runs every command once, so a load change on
a shared machine hits all of them alike), and each median's ratio to `python -c pass`;
the same for the CPU seconds each process used (user + system, from wait4), which a loaded
machine disturbs less than the wall clock (`within_3x` is on the wall clock):

- python_c_pass: the interpreter of the venv, `-c pass` (the floor);
- version: `outpost --version` (the whole report: build, Python, library versions);
- status_no_gateway: `outpost status` with a configuration whose socket does not exist
  (the error path a technician sees first: it reads the file, connects, fails, exit 1);
- status_default_socket: `outpost status` with a file that names no socket_path, as an
  installed gateway's (the default socket; no TOML parsing is needed then);
- status_running: `outpost status` against a running gateway (one simulator device, no
  uplinks), started here and stopped at the end; skipped with --no-gateway;
- tail_help: `outpost tail --help`.

`--outpost PATH` times another installation's console script (e.g. main's venv) for a
before/after comparison; its interpreter is the one beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp: Path) -> Path:
    cfg = tmp / "outpost.toml"
    cfg.write_text(f"""
[gateway]
group_id = "bench"
edge_node_id = "cli"
data_dir = "{tmp / "data"}"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"

[[devices]]
name = "sim1"
driver = "simulator"
interval = "1s"
  [[devices.points]]
  name = "ramp"
  waveform = "ramp"
""")
    return cfg


def _time_once(cmd: list[str], env: dict[str, str], expect: int | None) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of the child: user + system, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if expect is not None and proc.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}, expected {expect}: {err.decode()[-500:]}")
    return elapsed, usage.ru_utime + usage.ru_stime


def _start_gateway(python: str, cfg: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([python, "-m", "gateway", "run", "--config", str(cfg)], stdout=out, stderr=out,
                                cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sock.exists():
            return proc
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited {proc.returncode}: {log.read_text()[-1000:]}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the gateway made no status socket in 60 s: {log.read_text()[-1000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--repeat", type=int, default=15, help="rounds; each runs every command once (default 15)")
    ap.add_argument("--no-gateway", action="store_true", help="skip `outpost status` against a running gateway")
    ap.add_argument("--outpost", default=str(Path(sys.executable).with_name("outpost")),
                    help="the outpost console script to time (default: the one beside this Python)")
    args = ap.parse_args(argv)
    outpost = Path(args.outpost)
    if not outpost.exists():
        raise SystemExit(f"no console script at {outpost}: install the project (make venv) or pass --outpost")
    python = str(outpost.with_name("python"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_")}
    with tempfile.TemporaryDirectory(prefix="outpost-cli-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = _config(tmp)
        missing = tmp / "missing.toml"
        missing.write_text(cfg.read_text().replace(str(tmp / "outpost.sock"), str(tmp / "nobody.sock")))
        plain = tmp / "plain.toml"
        plain.write_text('[gateway]\ngroup_id = "bench"\nedge_node_id = "cli"\n')
        commands: dict[str, tuple[list[str], int | None]] = {
            "python_c_pass": ([python, "-c", "pass"], 0),
            "version": ([str(outpost), "--version"], 0),
            "status_no_gateway": ([str(outpost), "status", "--config", str(missing)], 1),
            # An installed gateway's file names no socket_path: the default one is asked (exit 1
            # here, or 0 when this machine runs a gateway there).
            "status_default_socket": ([str(outpost), "status", "--config", str(plain)], None),
            "tail_help": ([str(outpost), "tail", "--help"], 0),
        }
        gateway = None
        if not args.no_gateway:
            gateway = _start_gateway(python, cfg, tmp / "outpost.sock", tmp / "gateway.log")
            commands["status_running"] = ([str(outpost), "status", "--config", str(cfg)], 0)
        try:
            for cmd, expect in commands.values():  # warm the page cache and the .pyc files
                _time_once(cmd, env, expect)
            times: dict[str, list[float]] = {name: [] for name in commands}
            cpu: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.repeat):
                for name, (cmd, expect) in commands.items():
                    wall, used = _time_once(cmd, env, expect)
                    times[name].append(wall)
                    cpu[name].append(used)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=30)
    floor = statistics.median(times["python_c_pass"])
    cpu_floor = statistics.median(cpu["python_c_pass"])
    figures: dict[str, object] = {
        "outpost": str(outpost),
        "repeat": args.repeat,
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    for name, samples in times.items():
        figures[f"{name}_median_s"] = round(statistics.median(samples), 4)
        figures[f"{name}_min_s"] = round(min(samples), 4)
        figures[f"{name}_cpu_median_s"] = round(statistics.median(cpu[name]), 4)
        if name != "python_c_pass":
            figures[f"{name}_ratio_to_python"] = round(statistics.median(samples) / floor, 2)
            figures[f"{name}_cpu_ratio_to_python"] = round(statistics.median(cpu[name]) / cpu_floor, 2)
    figures["within_3x"] = all(v <= 3.0 for k, v in figures.items() if k.endswith("_ratio_to_python")
                               and "_cpu_" not in k)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:32} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
