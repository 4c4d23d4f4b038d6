"""Refusals and poison records (issue 11), shortened: every case of tests/e2e/refusals.py.

One test per numbered item of the issue, each against real services (the session's
SecuredKafka with SASL users, ACLs and no topic auto-creation; a Mosquitto of its own with
an ACL file or a `max_packet_size`; a pymodbus server) and a real `outpost run`. Each
asserts what the program checks: nothing lost, the refused destination delivered in order
once the refusal is lifted, healthy destinations not stalled, and the case's own checks.
The figures are printed (seen with -s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.refusals import CASES, Env, Params, run_case
from tests.harness.common import RunDir

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.mark.parametrize("number", sorted(CASES), ids=[f"{n}-{CASES[n][0]}" for n in sorted(CASES)])
async def test_refusal_case(number, secured_kafka, kcat, tmp_path_factory):
    # A short folder: status socket paths must stay under the 108-byte Unix limit.
    work = Path(tmp_path_factory.mktemp(f"rf{number}"))
    env = Env(secured_kafka, kcat, RunDir(work / "run"), work)
    result = await run_case(number, env, Params.shortened())
    report = result.as_dict()
    print(json.dumps(report, indent=1, default=str))
    assert result.error is None, result.error
    assert result.lost == 0, f"case {number}: {result.lost} readings lost: {report['figures']}"
    failed = {k: v for k, v in result.checks.items() if not v}
    figures = json.dumps(report["figures"], default=str)[:3000]
    assert not failed, f"case {number} failed {sorted(failed)}; figures {figures}"
