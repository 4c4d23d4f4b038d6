"""The official Eclipse Sparkplug 3.0 TCK, edge profile: all seven edge tests against `outpost run`.

Run twice, both at once on separate HiveMQ+TCK brokers (tests/tck): with `data_qos = 0` every
assertion of every test must pass; with the default `data_qos = 1` exactly the two DATA-QoS
assertions fail (the documented deviation in docs/sparkplug-conformance.md) and nothing else.
The TCK lives in ../shared/tck beside the clone (or $OUTPOST_SPARKPLUG_TCK); `make tools` fetches
HiveMQ CE into ~/.cache/sparkplug-tck once. The run directories (broker, TCK and Outpost logs, the
topic trace, every assertion) are named in the failure message.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.tck import QOS1_DEVIATION, ModeResult, TckMissing, prepare, run_mode, tck_dir, verdict

pytestmark = pytest.mark.integration
TESTS = ["SessionEstablishmentTest", "SessionTerminationTest", "SendDataTest", "SendComplexDataTest",
         "ReceiveCommandTest", "PrimaryHostTest", "MultipleBrokerTest"]


@pytest.fixture(scope="module")
def tck_runs() -> Iterator[dict[str, ModeResult]]:
    try:
        tck_dir()
    except TckMissing as exc:
        pytest.fail(str(exc))
    prepare()
    # Not pytest's tmp_path: it keeps only the last few runs of the whole machine, and a failure's
    # logs must outlive them. Removed again when both modes are as expected (~50 MB: brokers).
    base = Path(tempfile.mkdtemp(prefix="outpost-sparkplug-tck-"))
    with ThreadPoolExecutor(2) as ex:
        strict = ex.submit(run_mode, 0, base / "qos-0", tests=TESTS)
        default = ex.submit(run_mode, None, base / "qos-default", tests=TESTS)
        runs = {"qos0": strict.result(), "default": default.result()}
    yield runs
    if not any(verdict(r, TESTS) for r in runs.values()):
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_tck_every_edge_test_passes_with_data_qos_0(tck_runs: dict[str, ModeResult]) -> None:
    res = tck_runs["qos0"]
    problems = verdict(res, TESTS)
    assert not problems, f"{problems}\n{res.table()}\nlogs: {res.run_dir}"
    assert res.summary["all_passed"] and not res.failed_ids
    assert [t["test"] for t in res.summary["tests"]] == TESTS


@pytest.mark.timeout(1200)
def test_tck_default_data_qos_1_fails_only_the_two_qos_assertions(tck_runs: dict[str, ModeResult]) -> None:
    res = tck_runs["default"]
    problems = verdict(res, TESTS)
    assert not problems, f"{problems}\n{res.table()}\nlogs: {res.run_dir}"
    assert res.failed_ids == QOS1_DEVIATION, res.table()
    failing = {t for t, v in res.tests().items() if v["verdict"] != "PASS"}
    assert failing == {"SendDataTest"}, res.table()
