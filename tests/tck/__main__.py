"""The Sparkplug TCK (edge profile) in both DATA QoS modes, as a program that prints figures.

    python -m tests.tck prepare            Maven fetch of HiveMQ CE into ~/.cache/sparkplug-tck, once
    python -m tests.tck [--json] [--sequential] [--tests A,B] [--workdir DIR]

Runs the seven edge tests with `data_qos = 0` (every assertion must pass) and with the default
`data_qos = 1` (only the two DATA-QoS assertions may fail), both at once on separate brokers
unless --sequential. Prints a table per mode; with --json the last stdout line is one object
with the per-mode verdicts, failed tck-ids and seconds. Exit 0 when both modes are as expected.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.tck import EDGE_TESTS, ModeResult, prepare, run_mode, verdict


def run_both(workdir: Path, tests: list[str], parallel: bool) -> list[ModeResult]:
    prepare()
    modes = [0, None]
    if parallel:
        with ThreadPoolExecutor(2) as ex:
            futs = [ex.submit(run_mode, q, workdir / f"qos-{q if q is not None else 'default'}", tests=tests)
                    for q in modes]
            return [f.result() for f in futs]
    return [run_mode(q, workdir / f"qos-{q if q is not None else 'default'}", tests=tests) for q in modes]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.tck", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", nargs="?", default="run", choices=["run", "prepare"])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--sequential", action="store_true", help="one mode after the other (default: both at once)")
    ap.add_argument("--tests", default=",".join(EDGE_TESTS))
    ap.add_argument("--workdir", help="where the run directories go (default: a new temp dir)")
    args = ap.parse_args(argv)
    if args.action == "prepare":
        print(prepare())
        return 0
    tests = [t for t in args.tests.split(",") if t]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="outpost-tck-"))
    t0 = time.monotonic()
    results = run_both(workdir, tests, parallel=not args.sequential)
    total = time.monotonic() - t0
    ok = True
    out = sys.stderr if args.json else sys.stdout
    summary = {"workdir": str(workdir), "parallel": not args.sequential, "seconds_total": round(total, 1),
               "modes": []}
    for r in results:
        problems = verdict(r, tests)
        ok = ok and not problems
        print(r.table(), file=out)
        for p in problems:
            print(f"  PROBLEM: {p}", file=out)
        summary["modes"].append({
            "data_qos": 1 if r.data_qos is None else r.data_qos, "default": r.data_qos is None,
            "seconds": round(r.seconds, 1), "as_expected": not problems, "problems": problems,
            "failed_tck_ids": sorted(r.failed_ids), "run_dir": str(r.run_dir),
            "tests": {t: v["overall"] for t, v in r.tests().items()},
        })
    print(f"total {total:.0f}s, {'as expected' if ok else 'NOT as expected'}; logs in {workdir}", file=out)
    summary["as_expected"] = ok
    if args.json:
        print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
