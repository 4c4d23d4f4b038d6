"""docs/sparkplug-conformance.md names real tck-ids, all the edge-node ones, and real tests.

The list of ids is the official TCK's coverage report (generated from the specification's
asciidoc), read from the shared TCK folder at test time (tests/tck: ../shared/tck beside the
clone, or $OUTPOST_SPARKPLUG_TCK).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.tck import EDGE_TESTS, TckMissing, audit_assertions

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "sparkplug-conformance.md"
# Statements about what Host Applications and MQTT Servers must do; the doc says so.
NOT_EDGE_PREFIXES = ("host-topic-", "message-flow-phid-", "message-flow-hid-", "operational-behavior-host-",
                     "operational-behavior-edge-node-termination-host-action-", "payloads-state-", "conformance-")
NOT_EDGE = {"intro-sparkplug-host-state", "components-ph-state", "g"}  # "g": a malformed id in the spec


@pytest.fixture(scope="module")
def spec_ids() -> dict[str, tuple[str, str]]:
    try:
        ids = audit_assertions()
    except TckMissing as exc:
        pytest.fail(str(exc))
    assert len(ids) > 250, "the TCK coverage report lists fewer assertions than Sparkplug 3.0 has"
    return ids


def doc_ids() -> list[str]:
    return re.findall(r"tck-id-([A-Za-z0-9_-]*[A-Za-z0-9])", DOC.read_text(encoding="utf-8"))


def rows() -> dict[str, list[str]]:
    """{id: cells} of every row of the "Statements" tables (first cell: one tck-id)."""
    out = {}
    text = DOC.read_text(encoding="utf-8")
    assert "\n## Statements\n" in text
    section = text.split("\n## Statements\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        m = re.match(r"\|\s*`tck-id-([A-Za-z0-9_-]+)`\s*\|(.*)\|\s*$", line)
        if m:
            assert m.group(1) not in out, f"two rows for tck-id-{m.group(1)}"
            out[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return out


def test_every_id_in_the_doc_exists_in_the_specification(spec_ids: dict[str, tuple[str, str]]) -> None:
    unknown = sorted(set(doc_ids()) - set(spec_ids))
    assert not unknown, f"ids that the Sparkplug 3.0 specification does not have: {unknown}"


def test_every_edge_node_statement_has_a_row(spec_ids: dict[str, tuple[str, str]]) -> None:
    edge = {i for i in spec_ids if i not in NOT_EDGE and not i.startswith(NOT_EDGE_PREFIXES)}
    have = rows()
    missing = sorted(edge - set(have))
    assert not missing, f"edge-node statements without a row: {missing}"
    assert len(have) >= 160 and len(set(doc_ids())) >= 160
    for tid, cells in have.items():
        assert len(cells) == 3 and all(cells), f"tck-id-{tid}: a row needs statement, TCK and tests cells"
        assert cells[2] != "TCK only" or cells[1] not in ("–", "not executed"), f"tck-id-{tid}: nothing covers it"


def test_host_and_server_statements_are_not_rows(spec_ids: dict[str, tuple[str, str]]) -> None:
    host = {i for i in rows() if i in NOT_EDGE or i.startswith(NOT_EDGE_PREFIXES)}
    assert not host, f"host/server statements listed as edge-node rows: {sorted(host)}"


def test_named_tests_exist() -> None:
    text = DOC.read_text(encoding="utf-8")
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= set(re.findall(r"def (test_\w+)", path.read_text(encoding="utf-8")))
    named = set(re.findall(r"`(test_\w+)", text))
    assert named, "the document names no test"
    assert not named - defined, f"tests named in the document that do not exist: {sorted(named - defined)}"
    tck_named = set(re.findall(r"\b([A-Z][A-Za-z]+Test)\b", text))
    assert tck_named <= set(EDGE_TESTS), f"unknown TCK tests: {sorted(tck_named - set(EDGE_TESTS))}"
