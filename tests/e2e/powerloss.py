"""Power loss, tested for real (issue 19): the buffer and the bdSeq file on LazyFS, cut many times.

`python -m tests.e2e.powerloss --json [--cycles N] [--mode full|normal|both] [--seed S]`
prints one JSON object: per mode `cycles`, `integrity_failures`, `committed_lost`,
`lost_inside_window`, `restart_failures` (plus details). tests/e2e/test_powerloss.py runs
a few cycles per mode in `make test`.

LazyFS (../shared/lazyfs, see its README) is a FUSE file system with its own page cache;
on command it drops everything not fsynced: a power cut. One cycle:
1. start tests/e2e/powerloss_driver.py on the mount; it uses AsyncBuffer as the gateway
   does (appends, acks, quarantines, checkpoints, the bdSeq file) and reports each call
   on a pipe only after it returned ("reported committed");
2. cut: SIGSTOP the driver, drop LazyFS's cache, SIGKILL (the README's order). Where:
   `random` after a random time; `checkpoint` as an explicit checkpoint starts or right
   after it ended (plus the automatic ones, every 256 KiB of WAL); `trim` while every
   append drops records for size and age; `ack` as an ack or a quarantine starts;
   `recovery` while the buffer moves a corrupt file aside and salvages it; `torn`: LazyFS
   tears the next write to the WAL or the main file (only some parts reach the disk) and
   dies, with everything unsynced; `slow` after 3-8 s of appending at the gateway's pace
   (25 records/s), where no checkpoint syncs the WAL and only the normal-mode timer does;
3. unmount, remount (power back), check offline, then the next cycle's driver is the
   restart (it must open the buffer and append).

Checks per cycle (on the files as the cut left them):
- `PRAGMA integrity_check` = ok, seqs contiguous, no record twice, every record's payload
  the one reported for its seq (`integrity_failures`);
- every record reported committed is present, unless its cursor acknowledged it or a
  retention drop counted it (`committed_lost`; with synchronous="normal", a record
  reported committed within the documented window before the cut counts under
  `lost_inside_window` instead: less than `normal_sync_interval_s` + 0.5 s before it, and
  at most `normal_sync_records` of them);
- every quarantine reported done is there (counted like records);
- the cursor is at or behind the last ack that was started (never ahead: no record
  skipped) (`cursor_ahead`, an integrity failure);
- the bdSeq file parses and is the last value reported persisted or the one after it
  (never backwards) (`bdseq_backwards`);
- the next start opens the buffer and appends (`restart_failures`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from buffer import BufferSettings

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = ("random", "checkpoint", "trim", "ack", "recovery", "torn", "slow")
WINDOW_GRACE_S = 0.5
READY_TIMEOUT_S = 60.0


def lazyfs_dir() -> Path:
    """Where the packaged LazyFS lives: $OUTPOST_LAZYFS_DIR, else ../shared/lazyfs next to
    the repository (or one level up), else /work/shared/lazyfs."""
    candidates = [os.environ.get("OUTPOST_LAZYFS_DIR"), REPO.parent / "shared" / "lazyfs",
                  REPO.parent.parent / "shared" / "lazyfs", "/work/shared/lazyfs"]
    for c in candidates:
        if c and (Path(c) / "lazyfs.py").is_file():
            return Path(c)
    raise RuntimeError("LazyFS not found: set OUTPOST_LAZYFS_DIR to the folder holding "
                       f"lazyfs.py and build.sh (looked in {[str(c) for c in candidates if c]})")


def lazyfs_binary() -> str:
    """$LAZYFS_BIN, else build (cached under ~/.cache/outpost/lazyfs) with its build.sh."""
    env = os.environ.get("LAZYFS_BIN")
    if env and os.access(env, os.X_OK):
        return env
    cache = os.environ.get("LAZYFS_CACHE") or os.path.expanduser("~/.cache/outpost/lazyfs")
    out = subprocess.run(["bash", str(lazyfs_dir() / "build.sh")], stdout=subprocess.PIPE,
                         check=True, text=True, env={**os.environ, "LAZYFS_CACHE": cache})
    return out.stdout.strip().splitlines()[-1]


def _lazyfs_class() -> Any:
    d = str(lazyfs_dir())
    if d not in sys.path:
        sys.path.insert(0, d)
    from lazyfs import LazyFS  # type: ignore[import-not-found]

    return LazyFS


# ---------------------------------------------------------------------- the driver's reports


@dataclass
class Reports:
    """What the driver reported before the cut, with the monotonic time of each line."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cond: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.cond = threading.Condition(self.lock)

    def add(self, line: str) -> None:
        with self.cond:
            self.lines.append((time.monotonic(), line))
            self.cond.notify_all()

    def wait_for(self, pred: Any, timeout: float) -> tuple[float, str] | None:
        """The first line (from any already seen) for which pred(line, index) holds."""
        deadline = time.monotonic() + timeout
        i = 0
        with self.cond:
            while True:
                while i < len(self.lines):
                    if pred(self.lines[i][1], i):
                        return self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.lines)


def _pump(stream: Any, reports: Reports) -> None:
    for raw in stream:
        reports.add(raw.rstrip("\n"))


# ---------------------------------------------------------------------- the suite


@dataclass
class ModeResult:
    mode: str
    cycles: int = 0
    integrity_failures: int = 0
    committed_lost: int = 0
    lost_inside_window: int = 0
    restart_failures: int = 0
    cursor_ahead: int = 0
    acks_regressed: int = 0
    bdseq_backwards: int = 0
    driver_errors: int = 0
    quarantine_lost: int = 0
    records_committed: int = 0
    records_checked_present: int = 0
    by_scenario: dict[str, int] = field(default_factory=dict)
    cut_points: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failures) < 30:
            self.failures.append(f"cycle {self.cycles}: {kind}: {text}")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "mode"}


class Suite:
    def __init__(self, mode: str, work: Path, seed: int) -> None:
        self.mode = mode
        self.work = work
        self.rng = random.Random(seed)
        self.seed = seed
        # Short names: a LazyFS fault command naming a file must stay under 100 bytes.
        self.mnt = work / "m"
        self.backing = work / "b"
        self.fs = _lazyfs_class()(str(self.mnt), str(self.backing), str(work / "r"),
                                  lazyfs_binary())
        self.res = ModeResult(mode)
        self.next_id = 1
        self.present: dict[int, int] = {}      # record id -> seq, after the last check
        self.dropped_total = 0
        self.acked = 0                          # cursor position after the last check
        self.bdseq: int | None = None
        s = BufferSettings(max_size_bytes=1, max_age_s=1, synchronous=mode)
        self.window_s = s.normal_sync_interval_s + WINDOW_GRACE_S
        self.window_records = s.normal_sync_records

    # -- mount handling
    def mount(self) -> None:
        self.fs.mount()

    def umount(self) -> None:
        if not self.fs._alive():
            # LazyFS killed itself (torn write): the mount is dead, detach it at once.
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
        self.fs.umount(force=True)

    # -- one cycle
    def cycle(self, scenario: str) -> None:
        res = self.res
        res.cycles += 1
        res.by_scenario[scenario] = res.by_scenario.get(scenario, 0) + 1
        reports = Reports()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.powerloss_driver", "--dir", str(self.mnt),
             "--mode", self.mode, "--scenario", scenario, "--seed", str(self.rng.randrange(2**31)),
             "--next-id", str(self.next_id)],
            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, reports), daemon=True)
        pump.start()
        errs: list[str] = []
        self.errs = errs
        err_pump = threading.Thread(target=lambda: errs.extend(proc.stderr), daemon=True)
        err_pump.start()
        try:
            ready = reports.wait_for(lambda ln, i: ln.startswith(("READY", "ERR")), READY_TIMEOUT_S)
            first = ready and reports.wait_for(lambda ln, i: ln.startswith(("C ", "ERR")),
                                               READY_TIMEOUT_S)
            if not ready or not first or first[1].startswith("ERR") or ready[1].startswith("ERR"):
                tail = "".join(errs[-5:])[-600:]
                res.fail("restart_failures", f"no READY/append: {ready} {first} {tail}")
                self._cut(proc, "restart_failed")
            else:
                self._cut_when(scenario, proc, reports)
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            pump.join(10)
            err_pump.join(10)
            self.umount()
        self.mount()                            # power back on
        self._check(scenario, reports.snapshot())

    def _cut(self, proc: subprocess.Popen, where: str) -> float:
        t = time.monotonic()
        self.res.cut_points[where] = self.res.cut_points.get(where, 0) + 1
        if proc.poll() is not None and self.fs._alive():
            # The driver died by itself before the cut: a bug in the buffer (or driver).
            self.res.fail("driver_errors", f"driver exited {proc.returncode} before the cut "
                                           f"({where}): {''.join(self.errs[-8:])[-800:]}")
        if self.fs._alive() and proc.poll() is None:
            self.fs.power_cut(proc.pid)
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        self.cut_at = t
        return t

    def _cut_when(self, scenario: str, proc: subprocess.Popen, reports: Reports) -> None:
        rng = self.rng
        run_s = rng.uniform(0.3, 2.5)

        def nth(prefix: tuple[str, ...], n: int) -> Any:
            seen = [0]

            def pred(line: str, i: int) -> bool:
                if line.startswith(prefix):
                    seen[0] += 1
                    return seen[0] >= n
                return line.startswith("ERR")
            return pred

        if scenario == "checkpoint":
            during = rng.random() < 0.5
            hit = reports.wait_for(nth(("KB",) if during else ("K",), rng.randint(1, 4)), 15)
            if hit and during and rng.random() < 0.5:
                time.sleep(rng.uniform(0, 0.02))
            self._cut(proc, "checkpoint_during" if during else "checkpoint_after")
        elif scenario == "ack":
            prefix = rng.choice([("AB",), ("QB",), ("A ",)])
            reports.wait_for(nth(prefix, rng.randint(1, 6)), 15)
            self._cut(proc, {"AB": "ack_during", "QB": "quarantine_during",
                             "A ": "ack_after"}[prefix[0]])
        elif scenario == "recovery":
            if rng.random() < 0.6 and any(ln == "RB" for _, ln in reports.snapshot()):
                time.sleep(rng.uniform(0, 0.3))
                self._cut(proc, "recovery_during")
            else:
                time.sleep(run_s)
                self._cut(proc, "recovery_after")
        elif scenario == "trim":
            if rng.random() < 0.5:
                reports.wait_for(nth(("DROPPED",), rng.randint(1, 3)), 15)
                self._cut(proc, "trim_after_drop")
            else:
                time.sleep(run_s)
                self._cut(proc, "trim_random")
        elif scenario == "torn":
            time.sleep(run_s)
            backing = self.backing
            target = rng.choice(["buffer.db-wal", "buffer.db-wal", "buffer.db"])
            if rng.random() < 0.5:
                parts = rng.choice([2, 3, 4])
                keep = sorted(rng.sample(range(1, parts + 1), rng.randint(1, parts - 1)))
                cmd = (f"lazyfs::torn-op::file={backing / target}::"
                       f"persist={','.join(map(str, keep))}::parts={parts}")
            else:
                keep = sorted(rng.sample(range(1, 5), rng.randint(1, 3)))
                cmd = (f"lazyfs::torn-seq::op=write::file={backing / target}::"
                       f"persist={','.join(map(str, keep))}")
            if len(cmd) >= 100:
                raise RuntimeError(f"LazyFS fault command too long (>= 100 bytes): {cmd}")
            self.fs.send(cmd)
            deadline = time.monotonic() + 5
            while self.fs._alive() and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.fs._alive():
                self._cut(proc, f"torn_not_triggered:{target}")   # no write came: a plain cut
            else:
                self._cut(proc, f"torn:{target}")
        elif scenario == "slow":
            # The gateway's own pace (5 records every 200 ms): seconds without a checkpoint,
            # so only the WAL sync bounds what synchronous="normal" loses.
            time.sleep(rng.uniform(3.0, 8.0))
            self._cut(proc, "slow")
        else:
            time.sleep(run_s)
            self._cut(proc, "random")

    # -- the offline checks
    def _check(self, scenario: str, lines: list[tuple[float, str]]) -> None:
        res = self.res
        path = self.mnt / "buffer.db"
        committed: dict[int, tuple[int, float]] = {}    # id -> (seq, reported at)
        ack_started = ack_done = self.acked
        quarantined: dict[int, float] = {}
        bdseq_done = self.bdseq
        recovered = False
        max_id = self.next_id - 1
        for t, line in lines:
            parts = line.split()
            if parts[0] == "C":
                first, last, id0 = map(int, parts[1:4])
                for k in range(last - first + 1):
                    committed[id0 + k] = (first + k, t)
                max_id = max(max_id, id0 + last - first)
            elif parts[0] == "AB":
                ack_started = max(ack_started, int(parts[1]))
            elif parts[0] == "A":
                ack_done = max(ack_done, int(parts[1]))
            elif parts[0] == "Q":
                quarantined[int(parts[1])] = t
            elif parts[0] == "B":
                bdseq_done = int(parts[1])
            elif parts[0] in ("RB", "R"):
                recovered = True
        res.records_committed += len(committed)
        self.next_id = max_id + 1
        cut = self.cut_at

        # The files as the cut left them.
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, timeout=10)
            ok = conn.execute("PRAGMA integrity_check").fetchall()
            rows = conn.execute("SELECT seq, substr(payload, 1, 10) FROM records ORDER BY seq").fetchall()
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            cur = conn.execute("SELECT acked_seq FROM cursors WHERE name = 'up'").fetchone()
            qseqs = {r[0] for r in conn.execute("SELECT seq FROM quarantine WHERE cursor = 'up'")}
            conn.close()
        except sqlite3.Error as e:
            res.fail("integrity_failures", f"cannot read the buffer after the cut: {e}")
            self._reset_expectations()
            return
        damaged_original = (scenario == "recovery" and "R" not in
                            {ln.split()[0] for _, ln in lines})
        if ok != [("ok",)]:
            if damaged_original:
                # Cut before the driver's open moved the deliberately damaged file aside:
                # what is at the path is that file; the next start recovers it.
                res.cut_points["recovery_before_move"] = (
                    res.cut_points.get("recovery_before_move", 0) + 1)
            else:
                res.fail("integrity_failures", f"integrity_check: {ok[:3]}")
        seqs = [r[0] for r in rows]
        ids = [int(r[1]) for r in rows]
        if seqs and seqs != list(range(seqs[0], seqs[-1] + 1)):
            res.fail("integrity_failures", "seqs not contiguous")
        if seqs and meta.get("last_seq", 0) < seqs[-1]:
            res.fail("integrity_failures", f"meta last_seq {meta.get('last_seq')} < {seqs[-1]}")
        if len(set(ids)) != len(ids):
            res.fail("integrity_failures", f"{len(ids) - len(set(ids))} records twice")
        now_present = dict(zip(ids, seqs, strict=True))
        lo = seqs[0] if seqs else meta.get("last_seq", 0) + 1
        acked_db = cur[0] if cur is not None else None
        dropped_now = sum(v for k, v in meta.items() if k.startswith("dropped."))
        if not (recovered or scenario == "recovery"):
            for i, (seq, _t) in committed.items():
                if i in now_present and now_present[i] != seq:
                    res.fail("integrity_failures", f"record {i} at seq {now_present[i]}, "
                                                   f"reported at {seq}")
                    break
            if acked_db is not None and acked_db > ack_started:
                res.fail("cursor_ahead", f"cursor at {acked_db}, acks started up to {ack_started}")
            if acked_db is not None and acked_db < ack_done:
                if self.mode == "full":
                    res.fail("acks_regressed", f"cursor at {acked_db} after ack {ack_done} returned")
        # Expected: what was present after the last check plus what was reported committed.
        expected: dict[int, tuple[int | None, float | None]] = {
            i: (s, None) for i, s in self.present.items()}
        expected.update(committed)
        renumbered = recovered or scenario == "recovery"
        missing_window: list[int] = []
        explained_drops = 0
        for i, (seq, t) in sorted(expected.items()):
            if i in now_present:
                res.records_checked_present += 1
                continue
            if not renumbered and seq is not None and acked_db is not None and seq <= acked_db:
                continue                      # delivered and acknowledged
            if not renumbered and seq is not None and seq < lo:
                explained_drops += 1          # a retention drop, if counted (below)
                continue
            if self.mode == "normal" and t is not None and cut - t <= self.window_s:
                missing_window.append(i)
                continue
            res.fail("committed_lost", f"record {i} (seq {seq}) missing")
        if explained_drops and explained_drops > dropped_now - self.dropped_total:
            res.fail("committed_lost", f"{explained_drops} records gone from the oldest end, "
                                       f"drop counters grew by {dropped_now - self.dropped_total}")
        if len(missing_window) > self.window_records:
            res.committed_lost += len(missing_window) - self.window_records
        res.lost_inside_window += min(len(missing_window), self.window_records)
        for q, t in quarantined.items():
            if q not in qseqs and not (self.mode == "normal" and cut - t <= self.window_s):
                res.fail("quarantine_lost", f"quarantine of seq {q} missing")
                res.committed_lost += 1
        # bdSeq: never backwards, never torn.
        text = None
        with contextlib.suppress(FileNotFoundError):
            text = (self.mnt / "state" / "sparkplug-bdseq").read_text()
        if bdseq_done is not None:
            try:
                value = int((text or "").strip())
            except ValueError:
                res.fail("bdseq_backwards", f"bdSeq file {text!r} after {bdseq_done} was persisted")
            else:
                if value not in (bdseq_done, (bdseq_done + 1) % 256):
                    res.fail("bdseq_backwards", f"bdSeq file {value}, {bdseq_done} persisted")
                bdseq_done = value
        self.bdseq = bdseq_done
        # A commit can be in the file but unreported (the cut fell between the commit and
        # the report): never hand out its ids again.
        self.next_id = max([self.next_id, *(i + 1 for i in ids)])
        # Rows the cursor passed are retired: still in the file until reclaimed, never
        # owed again (a salvage rightly leaves them behind).
        self.present = {i: s for i, s in now_present.items()
                        if acked_db is None or s > acked_db}
        self.dropped_total = dropped_now
        self.acked = acked_db if acked_db is not None else 0

    def _reset_expectations(self) -> None:
        self.present = {}
        self.dropped_total = 0
        self.acked = 0

    def final_restart(self) -> None:
        """After the last cut: the gateway must start and append once more."""
        self.cycle("random")
        self.res.cycles -= 1
        self.res.by_scenario["random"] -= 1


def run_mode(mode: str, cycles: int, seed: int, scenarios: tuple[str, ...] = SCENARIOS,
             work: Path | None = None, progress: bool = False,
             keep: bool = False) -> dict[str, Any]:
    own = work is None
    # LazyFS takes a --config-path that contains "-o" (any case) for a mount option and falls
    # back to config/default.toml: no hyphen in the name, and never such a path.
    work = Path(tempfile.mkdtemp(prefix=f"opl_{mode[0]}_")) if own else work
    if "-o" in str(work).lower():
        raise ValueError(f"{work}: LazyFS cannot take a path containing '-o' (it reads it as a mount option)")
    suite = Suite(mode, work, seed)
    suite.mount()
    failed = False
    try:
        for n in range(cycles):
            # The first cycle has nothing to recover from: start with random.
            scenario = "random" if n == 0 else scenarios[n % len(scenarios)]
            seen = len(suite.res.failures)
            suite.cycle(scenario)
            if progress:
                r = suite.res
                print(f"[powerloss {mode}] cycle {n + 1}/{cycles} {scenario}: "
                      f"integrity={r.integrity_failures} lost={r.committed_lost} "
                      f"window={r.lost_inside_window} restart={r.restart_failures}",
                      file=sys.stderr, flush=True)
                for text in r.failures[seen:]:
                    print(f"[powerloss {mode}]   {text}", file=sys.stderr, flush=True)
            failed = failed or len(suite.res.failures) > seen
        suite.final_restart()
    finally:
        with contextlib.suppress(Exception):
            suite.umount()
        if own and not (keep and failed):
            shutil.rmtree(work, ignore_errors=True)
        elif progress:
            print(f"[powerloss {mode}] files kept in {work}", file=sys.stderr)
    out = suite.res.as_dict()
    out["window"] = ({"seconds": suite.window_s - WINDOW_GRACE_S, "grace_s": WINDOW_GRACE_S,
                      "records": suite.window_records} if mode == "normal" else None)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--mode", choices=("full", "normal", "both"), default="both")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="only these scenarios (repeatable; default: all, in turn)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the files after a failure")
    args = ap.parse_args(argv)
    modes = ("full", "normal") if args.mode == "both" else (args.mode,)
    scenarios = tuple(args.scenario) if args.scenario else SCENARIOS
    t0 = time.monotonic()
    report: dict[str, Any] = {"seed": args.seed, "cycles_per_mode": args.cycles,
                              "scenarios": list(scenarios), "modes": {}}
    for mode in modes:
        report["modes"][mode] = run_mode(mode, args.cycles, args.seed, scenarios,
                                         progress=not args.quiet, keep=args.keep)
    report["seconds"] = round(time.monotonic() - t0, 1)
    bad = any(m["integrity_failures"] or m["committed_lost"] or m["restart_failures"]
              or m["cursor_ahead"] or m["bdseq_backwards"] or m["driver_errors"] for m in report["modes"].values())
    report["ok"] = not bad
    print(json.dumps(report, indent=None if args.json else 2))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
