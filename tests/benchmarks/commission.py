"""The field engineer's commands, measured: `python -m tests.benchmarks.commission --json`.

Prints one JSON object:
- export: `outpost buffer export` (a real process) of a buffer of --records records written by
  the real pipeline encoder (4 metrics each), per format: wall and CPU seconds, records and
  rows per CPU second, and the process's peak RSS; and the peak RSS of the same export over a tenth of the records, so a
  reader sees whether memory grows with the buffer (it should not: the export streams);
- wal: a writer appends continuously (batches of 200 every 10 ms) while a slow reader (a
  pause of 0.25 s each 1000 records, as a terminal or an ssh pipe reads) walks --wal-records
  records, once with the export's short reads (`buffer.diagnostics.iter_records`) and once
  with one statement walked row by row (what sqlite-utils' `rows_where` does; with
  `--sqlite-utils`, sqlite-utils itself, if importable): the WAL's peak size each way;
- scan: `outpost probe modbus --scan 1-N` (a real process) against a pymodbus server with
  two units, at --scan-timeout 0.2 and at the default 1 s when --full-scan: seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from buffer import Buffer, BufferSettings, NewRecord, diagnostics
from drivers.base import PointInfo, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import NodeIdentity

REPO = Path(__file__).resolve().parents[2]
POINTS = [PointInfo("voltage", "float32", "V"), PointInfo("current", "float32", "A"),
          PointInfo("state", "string"), PointInfo("count", "uint32")]


def _settings() -> BufferSettings:
    return BufferSettings(max_size_bytes=10 * 1024**3, max_age_s=1e9, synchronous="normal",
                          check_on_open="none")


def build_buffer(path: Path, records: int) -> None:
    rbe = ReportByException(NodeIdentity("plant", "gw"), {"meter": POINTS})
    t0 = int(time.time() * 1000) - records
    with Buffer.open(path, _settings()) as buf:
        batch: list[NewRecord] = []
        for i in range(records):
            ts = t0 + i
            rbe.offer(Sample("meter", "voltage", 230.0 + (i % 100) / 10, ts))
            rbe.offer(Sample("meter", "current", 5.0 + (i % 50) / 100, ts))
            rbe.offer(Sample("meter", "state", f"running, step {i % 7}", ts))
            rbe.offer(Sample("meter", "count", i, ts))
            batch += rbe.drain()
            if len(batch) == 2000:
                buf.append(batch)
                batch = []
        if batch:
            buf.append(batch)


def run_measured(argv: list[str]) -> dict[str, Any]:
    """Run a child to its end: wall seconds, CPU seconds and peak RSS from its own rusage
    (the machine may be shared, so CPU seconds are the steadier figure)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{argv}: exit {code}: {err}")
    return {"seconds": round(seconds, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "stderr": err.strip().splitlines()[-1] if err.strip() else ""}


def bench_export(tmp: Path, records: int) -> dict[str, Any]:
    out: dict[str, Any] = {"records": records}
    small, large = tmp / "small.db", tmp / "large.db"
    build_buffer(small, max(1, records // 10))
    build_buffer(large, records)
    out["buffer_file_mb"] = round(os.path.getsize(large) / 1e6, 1)
    for fmt in ("jsonl", "csv", "raw"):
        r = run_measured([sys.executable, "-m", "gateway", "buffer", "--file", str(large), "export",
                          "--format", fmt])
        rows = records * (1 if fmt == "raw" else len(POINTS))
        out[fmt] = {**r, "records_per_cpu_s": round(records / r["cpu_s"]),
                    "rows_per_cpu_s": round(rows / r["cpu_s"])}
        out[fmt]["peak_rss_mb_at_a_tenth"] = run_measured(
            [sys.executable, "-m", "gateway", "buffer", "--file", str(small), "export",
             "--format", fmt])["peak_rss_mb"]
    return out


def wal_peak(path: Path, mode: str, n: int) -> dict[str, Any]:
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(f"{path}{suffix}"):
            os.remove(f"{path}{suffix}")
    stop, ready = threading.Event(), threading.Event()
    peak = [0]
    appended = [0]

    def writer() -> None:
        buf = Buffer.open(path, _settings())
        now = int(time.time() * 1000)
        buf.append([NewRecord("g/e/d", os.urandom(200), now, {"type": "bridged", "topic": "t"})
                    for _ in range(n)])
        ready.set()
        while not stop.is_set():
            buf.append([NewRecord("g/e/d", os.urandom(200), now, {"type": "bridged", "topic": "t"})
                        for _ in range(200)])
            appended[0] += 200
            wal = f"{path}-wal"
            peak[0] = max(peak[0], os.path.getsize(wal) if os.path.exists(wal) else 0)
            time.sleep(0.01)
        buf.close()

    t = threading.Thread(target=writer, name="bench-writer")
    t.start()
    ready.wait()
    t0 = time.perf_counter()
    seen = 0
    if mode == "short_reads":
        for r in diagnostics.iter_records(path):
            seen += 1
            if r.seq >= n:
                break
            if seen % 1000 == 0:
                time.sleep(0.25)
    else:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        if mode == "sqlite_utils":
            import sqlite_utils

            rows = sqlite_utils.Database(conn)["records"].rows_where("seq <= ?", [n], order_by="seq")
        else:
            rows = conn.execute("SELECT * FROM records WHERE seq <= ? ORDER BY seq", (n,))
        for _ in rows:
            seen += 1
            if seen % 1000 == 0:
                time.sleep(0.25)
        conn.close()
    seconds = time.perf_counter() - t0
    stop.set()
    t.join()
    return {"read": seen, "seconds": round(seconds, 1), "appended_per_s": round(appended[0] / seconds),
            "peak_wal_mb": round(peak[0] / 1e6, 1)}


def bench_wal(tmp: Path, n: int, with_sqlite_utils: bool) -> dict[str, Any]:
    modes = ["short_reads", "one_statement"] + (["sqlite_utils"] if with_sqlite_utils else [])
    return {mode: wal_peak(tmp / f"wal-{mode}.db", mode, n) for mode in modes}


async def bench_scan(last: int, full: bool) -> dict[str, Any]:
    from drivers.modbus.simserver import SimServer, SimUnit

    units = {2: SimUnit(), last - 1: SimUnit()}
    srv = await SimServer.tcp(units)
    out: dict[str, Any] = {"ids": last}
    try:
        for label, extra in (("scan_timeout_0.2s", ["--scan-timeout", "0.2"]),
                             *((("default_timeout_1s", []),) if full else ())):
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "probe", "modbus", "--host", "127.0.0.1",
                "--tcp-port", str(srv.port), "--scan", f"1-{last}", *extra, cwd=REPO,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            first_at = None
            lines = []
            while line := await proc.stdout.readline():
                lines.append(line)
                if first_at is None:
                    first_at = time.perf_counter() - t0
            await proc.wait()
            out[label] = {"seconds": round(time.perf_counter() - t0, 1), "found": len(lines),
                          "first_unit_printed_after_s": round(first_at or 0, 2)}
    finally:
        await srv.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output)")
    ap.add_argument("--records", type=int, default=200_000, help="records in the exported buffer")
    ap.add_argument("--wal-records", type=int, default=20_000, help="records the slow reader walks")
    ap.add_argument("--sqlite-utils", action="store_true",
                    help="also measure sqlite-utils' rows_where (needs it importable)")
    ap.add_argument("--scan-ids", type=int, default=247, help="scan unit ids 1..N")
    ap.add_argument("--full-scan", action="store_true", help="also scan at the default 1 s timeout")
    ap.add_argument("--skip", action="append", default=[], choices=["export", "wal", "scan"],
                    help="leave a part out (repeatable)")
    args = ap.parse_args()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="outpost-bench-commission-") as d:
        tmp = Path(d)
        if "export" not in args.skip:
            result["export"] = bench_export(tmp, args.records)
        if "wal" not in args.skip:
            result["wal"] = bench_wal(tmp, args.wal_records, args.sqlite_utils)
    if "scan" not in args.skip:
        result["scan"] = asyncio.run(bench_scan(args.scan_ids, args.full_scan))
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
