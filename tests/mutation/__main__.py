"""CLI: `python -m tests.mutation [--json] [--module M ...] [--sample N] [--seed S]`.

Prints, per module: mutants, killed, survived, score and the survivors (file:line and the
mutation). Mutants that only change a message or log text are counted apart ("text_only")
and are not run; so are mutants reviewed as equivalent, each listed with why
(tests/mutation/equivalent.py). `--sample` draws that many mutants per module with a fixed seed (the
default table samples buffer/core.py); the sample size is printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import signal
import sys

from tests.mutation import DEFAULT_SEED, TARGETS
from tests.mutation.mutants import scope_lines
from tests.mutation.runner import ROOT, run_module


def _tests_for(patterns: list[str]) -> list[str]:
    found: list[str] = []
    for pattern in patterns:
        if "::" in pattern:
            found.append(pattern)
            continue
        matches = sorted(glob.glob(pattern, root_dir=ROOT))
        if not matches:
            raise SystemExit(f"tests.mutation: no test file matches {pattern!r}; update TARGETS in "
                             "tests/mutation/__init__.py")
        found += [m for m in matches if m not in found]
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    ap.add_argument("--module", action="append", help="a module path from TARGETS (repeatable)")
    ap.add_argument("--sample", type=int, help="mutants per module, drawn with --seed (default: the table's)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--tests", action="append", help="override the module's tests (file or node id)")
    ap.add_argument("--ids", help="run only these mutant ids (comma separated)")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)
    # A SIGTERM unwinds like Ctrl-C, so the running child (own process group) is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    modules = args.module or list(TARGETS)
    for m in modules:
        if m not in TARGETS:
            ap.error(f"unknown module {m!r}; known: {', '.join(TARGETS)}")
        if not (ROOT / m).is_file():
            ap.error(f"{m} does not exist (moved?); update TARGETS in tests/mutation/__init__.py")
        if TARGETS[m].get("only"):
            try:
                scope_lines((ROOT / m).read_text(), TARGETS[m]["only"])
            except ValueError as e:
                ap.error(f"{m}: {e}; update TARGETS in tests/mutation/__init__.py")
    ids = [int(x) for x in args.ids.split(",")] if args.ids else None
    progress = None
    if not args.quiet:
        tty = sys.stderr.isatty()
        progress = lambda s: print(f"\r{s}   " if tty else s, end="" if tty else "\n",  # noqa: E731
                                   file=sys.stderr, flush=True)

    reports = []
    for m in modules:
        target = TARGETS[m]
        tests = _tests_for(args.tests or target["tests"])
        sample = args.sample if args.sample is not None else target.get("sample")
        report = run_module(m, tests, sample=sample, seed=args.seed, ids=ids, progress=progress,
                            scope=target.get("only"))
        if progress:
            progress(f"{m}: done, score {report.score}%\n")
            if args.json:  # the survivors as soon as a module is done, not only at the end
                for s in report.stale_equivalents:
                    progress(f"  STALE entry in tests/mutation/equivalent.py, review it: {s}")
                for s in report.survivors:
                    progress(f"  survivor {s['where']}: {s['mutation']}{'' if s['covered'] else '  [not covered]'}")
        reports.append(report)
        if not args.json:
            _print_text(report)
    if args.json:
        print(json.dumps({"seed": args.seed, "modules": [r.as_dict() for r in reports]}, indent=2))
    return 1 if any(r.error for r in reports) else 0


def _print_text(r) -> None:
    sampled = f" (sample of {r.sample} from {r.mutants_total}, seed {r.seed})" if r.sample else ""
    if r.scope:
        sampled += f" [only {', '.join(r.scope)}]"
    if r.error:
        print(f"{r.module}: ERROR {r.error}")
        return
    print(f"{r.module}{sampled}: mutants {r.mutants} killed {r.killed} survived {r.survived} "
          f"score {r.score}% (not scored: text-only {r.text_only}, reviewed equivalent {r.equivalent}; "
          f"not covered: {r.not_covered}; {r.seconds}s)")
    for e in r.equivalents:
        print(f"  equivalent ({e['kind']}) {e['where']}: {e['mutation']}: {e['why']}")
    for s in r.stale_equivalents:
        print(f"  STALE entry in tests/mutation/equivalent.py, review it: {s}")
    for s in r.survivors:
        print(f"  {s['where']}: {s['mutation']}{'' if s['covered'] else '  [not covered]'}")


if __name__ == "__main__":
    sys.exit(main())
