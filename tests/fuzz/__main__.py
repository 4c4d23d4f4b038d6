"""python -m tests.fuzz [--json] [--budget-s N] [--only configs|writes]"""

from __future__ import annotations

import argparse
import json
import sys

from tests.fuzz.run import run_configs, run_writes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--budget-s", type=float, default=60.0, help="seconds for each fuzzer (default 60)")
    ap.add_argument("--only", choices=("configs", "writes"))
    args = ap.parse_args(argv)
    out = {"budget_s": args.budget_s}
    if args.only in (None, "configs"):
        out["configs"] = run_configs(args.budget_s)
    if args.only in (None, "writes"):
        out["writes"] = run_writes(args.budget_s)
    failures = sum(v["failures"] for v in out.values() if isinstance(v, dict))
    out["failures"] = failures
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name in ("configs", "writes"):
            if name in out:
                r = out[name]
                print(f"{name}: {r['cases']} case(s), {r['failures']} failure(s)")
                for e in r["examples"]:
                    print(f"  - {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
