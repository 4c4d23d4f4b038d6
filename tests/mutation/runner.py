"""Runs mutants of one module against its tests, each in a forked child running pytest.

The parent imports pytest and the heavy third-party libraries once; each child installs the
mutated module through an import hook (so every importer sees it, including the package's
`__init__`), runs pytest on the tests that executed the mutated lines in the baseline run,
and exits. A failing test, a collection error or a timeout kills the mutant.

The baseline run (unmutated code, all the module's tests) must pass; it records, under a
line tracer, which test executed which line of the module and how long each test took. A
mutant on lines no test executed survives without being run ("not covered").
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.mutation import equivalent as equivalents
from tests.mutation.mutants import Mutant, functions_by_line, in_scope, list_mutants, mutate

ROOT = Path(__file__).resolve().parents[2]
# Loaded before forking so children do not pay for them (each child imports the project).
_PRELOAD = ("pytest", "hypothesis", "hypothesis.strategies", "pydantic", "google.protobuf.message",
            "sqlite3", "asyncio", "struct", "json")
_IMPORT_TIME = "<import>"
_SETUP_FAILED = 99
# pytest exit codes: 1 tests failed, 2 interrupted (a collection error), 3 internal error: the
# mutant broke something, it is killed. 4 (usage) and 5 (no tests ran) are the runner's fault.
_KILLED_CODES = {1, 2, 3}
_CHECK_CODES = {4, 5}


@dataclass
class ModuleReport:
    module: str
    tests: list[str]
    mutants_total: int
    sample: int | None
    seed: int
    scope: list[str] | None = None  # only these definitions of the module were mutated
    mutants: int = 0            # mutants run for the score (text-only ones excluded)
    killed: int = 0
    survived: int = 0
    timeouts: int = 0           # counted as killed
    not_covered: int = 0        # survivors no test executed (counted in survived)
    score: float = 0.0
    text_only: int = 0          # message/log-text mutants in the sample, not in the score
    equivalent: int = 0         # reviewed as equivalent (tests/mutation/equivalent.py), not in the score
    equivalents: list[dict[str, Any]] = field(default_factory=list)
    stale_equivalents: list[str] = field(default_factory=list)  # entries that match nothing now
    seconds: float = 0.0
    survivors: list[dict[str, Any]] = field(default_factory=list)
    killed_ids: list[int] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _MutantFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, name: str, path: str, code: Any) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, self.path, loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        exec(self.code, module.__dict__)


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _child_pytest(args: list[str], basetemp: str, plugins: list[Any]) -> int:
    import hypothesis
    import pytest

    # Same examples in the baseline and in every mutant run, no example database, no deadline
    # (a slower mutant is not a killed one), no shrinking (a failure is all we need to know).
    hypothesis.settings.register_profile(
        "mutation", derandomize=True, database=None, deadline=None, print_blob=False,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate])
    hypothesis.settings.load_profile("mutation")
    os.chdir(ROOT)
    return int(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly",
                            f"--basetemp={basetemp}", "-o", "addopts=", *args], plugins=plugins))


class _Tracer:
    """Records (line, test) pairs for one file while pytest runs (the baseline)."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.current = _IMPORT_TIME
        self.lines: dict[int, set[str]] = {}
        self.durations: dict[str, float] = {}

    def global_trace(self, frame, event, arg):
        if frame.f_code.co_filename == self.filename:
            return self.local_trace
        return None

    def local_trace(self, frame, event, arg):
        if event in ("line", "call"):
            self.lines.setdefault(frame.f_lineno, set()).add(self.current)
        return self.local_trace

    # pytest hooks (the tracer is passed as a plugin)
    def pytest_runtest_logstart(self, nodeid, location):
        self.current = nodeid

    def pytest_runtest_logreport(self, report):
        self.durations[report.nodeid] = self.durations.get(report.nodeid, 0.0) + report.duration

    def pytest_runtest_logfinish(self, nodeid, location):
        self.current = _IMPORT_TIME


def _fork(fn, timeout: float | None, log_path: str) -> tuple[str, int | None]:
    """Run fn() in a forked child (stdout/stderr to log_path); ("exit", code) or ("timeout", None)."""
    pid = os.fork()
    if pid == 0:  # child
        code = _SETUP_FAILED
        try:
            os.setpgid(0, 0)
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = 3
            code = fn()
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = None if timeout is None else time.monotonic() + timeout
    finished = False
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished = True
                return "exit", os.waitstatus_to_exitcode(status)
            if deadline is not None and time.monotonic() > deadline:
                return "timeout", None
            time.sleep(0.02)
    finally:
        if not finished:  # timeout, or the runner itself is being stopped: take the child along
            for target in (-pid, pid):
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)


def run_module(path: str, tests: list[str], *, sample: int | None, seed: int, ids: list[int] | None = None,
               workdir: str | None = None, progress=None, scope: list[str] | None = None) -> ModuleReport:
    """Mutation-test one module (a path relative to the repository) against `tests`;
    `scope`: only the mutants inside these definitions (functions, classes, "Class.method")."""
    started = time.monotonic()
    src_path = ROOT / path
    source = src_path.read_text()
    all_mutants = in_scope(list_mutants(source), source, scope)
    chosen = all_mutants
    if ids is not None:
        chosen = [m for m in all_mutants if m.id in set(ids)]
    elif sample is not None and sample < len(all_mutants):
        chosen = sorted(random.Random(seed).sample(all_mutants, sample), key=lambda m: m.id)
    report = ModuleReport(module=path, tests=tests, mutants_total=len(all_mutants),
                          sample=len(chosen) if len(chosen) < len(all_mutants) else None, seed=seed,
                          scope=list(scope) if scope is not None else None)
    report.text_only = sum(m.text_only for m in chosen)
    reviewed, report.stale_equivalents = _equivalents(path, source, all_mutants)
    scored = []
    for m in chosen:
        if m.text_only:
            continue
        e = reviewed.get(m.id)
        if e is None:
            scored.append(m)
            continue
        report.equivalent += 1
        report.equivalents.append({"id": m.id, "where": f"{path}:{m.line}", "mutation": m.describe(),
                                   "kind": e.kind, "why": e.why})
    for mod in _PRELOAD:
        __import__(mod)

    run_dir = tempfile.mkdtemp(prefix="outpost-mutation-", dir=workdir or _tmp_root())
    try:
        cover_file = os.path.join(run_dir, "baseline.json")
        filename = str(src_path)
        name = module_name(path)

        def baseline() -> int:
            tracer = _Tracer(filename)
            threading.settrace(tracer.global_trace)
            sys.settrace(tracer.global_trace)
            try:
                code = _child_pytest(tests, os.path.join(run_dir, "tmp-baseline"), [tracer])
            finally:
                sys.settrace(None)
                threading.settrace(None)  # type: ignore[arg-type]
            with open(cover_file, "w") as f:
                json.dump({"lines": {k: sorted(v) for k, v in tracer.lines.items()},
                           "durations": tracer.durations}, f)
            return code

        how, code = _fork(baseline, None, os.path.join(run_dir, "baseline.log"))
        if how != "exit" or code != 0:
            log_text = Path(run_dir, "baseline.log").read_text()[-3000:]
            report.error = f"the tests fail on the unmutated module (pytest exit {code}):\n{log_text}"
            return report
        with open(cover_file) as f:
            cov = json.load(f)
        lines = {int(k): set(v) for k, v in cov["lines"].items()}
        durations: dict[str, float] = cov["durations"]

        def _clean_run_passes(args: list[str]) -> bool:
            how, code = _fork(lambda: _child_pytest(args, os.path.join(run_dir, "tmp-clean"), []),
                              None, os.path.join(run_dir, "clean.log"))
            return how == "exit" and code == 0

        for n, m in enumerate(scored, 1):
            selected: set[str] = set()
            for line in m.lines():
                selected |= lines.get(line, set())
            if not selected:
                report.survived += 1
                report.not_covered += 1
                report.survivors.append(_survivor(path, m, covered=False))
                continue
            if _IMPORT_TIME in selected:
                selected = set(durations)  # module-level code: every test depends on it
            selected.discard(_IMPORT_TIME)
            # Fastest tests first: most mutants die in the first test that runs.
            args = sorted(selected, key=lambda t: durations.get(t, 0.0))
            timeout = 20.0 + 3 * sum(durations.get(t, 1.0) for t in args)
            code_obj = compile(mutate(source, m.id), filename, "exec")

            def child(code_obj=code_obj, args=args, mid=m.id) -> int:
                sys.meta_path.insert(0, _MutantFinder(name, filename, code_obj))
                return _child_pytest(args, os.path.join(run_dir, f"tmp-{mid}"), [])

            how, code = _fork(child, timeout, os.path.join(run_dir, "mutant.log"))
            if how == "timeout":
                report.timeouts += 1
                report.killed += 1
                report.killed_ids.append(m.id)
            elif code == 0:
                report.survived += 1
                report.survivors.append(_survivor(path, m, covered=True))
            elif code in _KILLED_CODES or code < 0 or (code in _CHECK_CODES and _clean_run_passes(args)):
                # A failing test or a crash; or pytest found no such test, which the mutant
                # caused (an import error, or parametrize ids built from mutated constants)
                # when the same selection passes on the unmutated module.
                report.killed += 1
                report.killed_ids.append(m.id)
            else:
                log_text = Path(run_dir, "mutant.log").read_text()[-2000:] if Path(run_dir, "mutant.log").exists() \
                    else ""
                raise RuntimeError(f"mutant {m.id} of {path}: the run itself failed (exit {code}):\n{log_text}")
            shutil.rmtree(os.path.join(run_dir, f"tmp-{m.id}"), ignore_errors=True)
            if progress:
                progress(f"{path}: {n}/{len(scored)} killed={report.killed} survived={report.survived}")
        report.mutants = report.killed + report.survived
        report.score = round(100.0 * report.killed / report.mutants, 1) if report.mutants else 100.0
        return report
    finally:
        report.seconds = round(time.monotonic() - started, 1)
        shutil.rmtree(run_dir, ignore_errors=True)


def _equivalents(path: str, source: str, mutants: list[Mutant]) -> tuple[dict[int, Any], list[str]]:
    """Mutant id -> its reviewed entry; and the entries that match no mutant any more."""
    index = equivalents.index(path)
    if not index:
        return {}, []
    lines = source.splitlines()
    functions = functions_by_line(source)
    found: dict[int, Any] = {}
    used: set[int] = set()
    for m in mutants:
        code = lines[m.line - 1].split("  #")[0].strip().replace('"', "'")
        for e in index.get((functions.get(m.line, "<module>"), code, m.describe()), []):
            if e.col is None or e.col == m.col:
                found[m.id] = e
                used.add(id(e))
    stale = [f"{e.function}: {e.code} ({e.mutation})" for es in index.values() for e in es if id(e) not in used]
    return found, stale


def _survivor(path: str, m: Mutant, *, covered: bool) -> dict[str, Any]:
    return {"id": m.id, "where": f"{path}:{m.line}", "operator": m.operator,
            "mutation": m.describe(), "covered": covered}


def _tmp_root() -> str:
    # tmpfs makes the buffer's fsyncs cheap; the tests' behaviour does not depend on the disk.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()

