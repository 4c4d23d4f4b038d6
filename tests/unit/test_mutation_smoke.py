"""The mutation runner (python -m tests.mutation), run small: it kills a known-bad mutant,
reports a known survivor with file:line, and prints the documented JSON shape."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mutation import TARGETS
from tests.mutation.mutants import in_scope, list_mutants, mutate, scope_lines

ROOT = Path(__file__).resolve().parents[2]
PLANNER = "drivers/modbus/planner.py"


def _find(mutants, before: str, after: str):
    (m,) = [m for m in mutants if m.before == before and m.after == after]
    return m


def test_mutants_are_numbered_stably_and_apply_one_change() -> None:
    source = (ROOT / PLANNER).read_text()
    mutants = list_mutants(source)
    assert mutants == list_mutants(source)
    assert [m.id for m in mutants] == list(range(len(mutants)))
    m = _find(mutants, "new_end - start", "new_end + start")
    mutated = ast.unparse(mutate(source, m.id))
    original = ast.unparse(ast.parse(source))
    diff = [(a, b) for a, b in zip(original.splitlines(), mutated.splitlines(), strict=True) if a != b]
    assert len(diff) == 1 and "new_end + start" in diff[0][1]


def test_docstrings_annotations_and_message_text_are_told_apart() -> None:
    source = '''"""Module doc."""
def f(x: int = 3) -> int:
    """Doc."""
    if x > 1:
        raise ValueError(f"x is {x + 1}")
    log.warning("value %s", x * 2)
    return x - 1
'''
    mutants = list_mutants(source)
    assert not [m for m in mutants if "doc" in m.before.lower()]
    assert not [m for m in mutants if m.before == "int"]
    text = {m.before for m in mutants if m.text_only}
    assert {"x + 1", "x * 2", "'value %s'"} <= text
    scored = {m.describe() for m in mutants if not m.text_only}
    assert {"x > 1 -> x >= 1", "x - 1 -> x + 1", "3 -> 4"} <= scored


def test_error_location_labels_are_text() -> None:
    source = (
        "def g(a, where):\n"
        "    w = f'{where} item {a}'\n"
        "    check(a + 1, w)\n"
        "    return check(a, f'{where} row {a}')\n"
    )
    mutants = list_mutants(source)
    text = {m.describe() for m in mutants if m.text_only}
    assert "w = f'{where} item {a}' -> w = None" in text
    assert "check(a + 1, w) -> check(a + 1, None)" in text
    assert "' row ' -> 'XX row XX'" in text
    scored = {m.describe() for m in mutants if not m.text_only}
    assert "a + 1 -> a - 1" in scored and "check(a + 1, w) -> check(None, w)" in scored


def test_every_target_module_and_test_file_exists() -> None:
    for module, target in TARGETS.items():
        assert (ROOT / module).is_file(), f"{module}: update TARGETS in tests/mutation/__init__.py"
        for pattern in target["tests"]:
            assert list(ROOT.glob(pattern)), pattern
        if target.get("only"):
            assert scope_lines((ROOT / module).read_text(), target["only"]), module


def test_a_module_can_be_restricted_to_named_definitions() -> None:
    source = (
        "X = 1 + 1\n"
        "def f(a):\n"
        "    return a + 5\n"
        "class C:\n"
        "    def m(self):\n"
        "        return 2 * 3\n"
        "    def n(self):\n"
        "        return 7 - 1\n"
    )
    mutants = list_mutants(source)
    assert {m.describe() for m in in_scope(mutants, source, ["f"])} == {"a + 5 -> a - 5", "5 -> 6"}
    method = in_scope(mutants, source, ["C.m"])
    assert {m.describe() for m in method} == {"2 * 3 -> 2 / 3", "2 -> 3", "3 -> 4"}
    assert len(in_scope(mutants, source, ["C"])) == len(method) + 3
    assert in_scope(mutants, source, None) == mutants
    # Ids stay those of the whole module, so --ids and a report's survivors agree.
    assert [m.id for m in method] == [m.id for m in mutants if m.line == 6]
    with pytest.raises(ValueError, match="no definition named 'g'"):
        scope_lines(source, ["f", "g"])


def test_a_small_run_kills_the_bad_mutant_and_reports_the_survivor() -> None:
    mutants = list_mutants((ROOT / PLANNER).read_text())
    killed = _find(mutants, "end = new_end", "end = None")                # breaks the merge
    survivor = _find(mutants, "new_end - start", "new_end + start")       # start is 0 in that test
    res = subprocess.run(
        [sys.executable, "-m", "tests.mutation", "--json", "--quiet", "--module", PLANNER,
         "--tests", "tests/unit/test_modbus_planner.py::test_contiguous_points_become_one_request",
         "--ids", f"{killed.id},{survivor.id}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads(res.stdout)
    (report,) = doc["modules"]
    assert report["error"] is None
    assert report["module"] == PLANNER and report["mutants_total"] == len(mutants)
    assert report["sample"] == 2 and report["seed"] == doc["seed"]
    assert (report["mutants"], report["killed"], report["survived"], report["score"]) == (2, 1, 1, 50.0)
    assert report["killed_ids"] == [killed.id]
    (s,) = report["survivors"]
    assert s == {"id": survivor.id, "where": f"{PLANNER}:{survivor.line}", "operator": "binop",
                 "mutation": "new_end - start -> new_end + start", "covered": True}
    assert {"text_only", "timeouts", "not_covered", "seconds", "tests", "scope"} <= set(report)
    assert report["scope"] is None


def test_reviewed_equivalent_mutants_are_matched_by_function_line_and_mutation(monkeypatch) -> None:
    from tests.mutation import equivalent
    from tests.mutation.runner import _equivalents

    source = (
        "def f(a):\n"
        "    x = a + 1  # a comment\n"
        "    return x + 1\n"
        "def g(a):\n"
        "    x = a + 1\n"
        "    return x\n"
    )
    mutants = list_mutants(source)
    entries = [equivalent.Equivalent("f", "x = a + 1", "a + 1 -> a - 1", "equivalent", "why"),
               equivalent.Equivalent("f", "return x + 2", "x + 2 -> x - 2", "equivalent", "moved")]
    monkeypatch.setitem(equivalent.EQUIVALENT, "m.py", entries)
    found, stale = _equivalents("m.py", source, mutants)
    (mid,) = found
    m = next(m for m in mutants if m.id == mid)
    assert (m.line, m.describe()) == (2, "a + 1 -> a - 1")       # f's, not g's twin on line 5
    assert found[mid].why == "why"
    assert stale == ["f: return x + 2 (x + 2 -> x - 2)"]
    assert _equivalents("other.py", source, mutants) == ({}, [])
