"""Run the fuzzers for a time budget and count what they tried and found."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

_SETTINGS = settings(
    max_examples=40, deadline=None, database=None, derandomize=False,
    suppress_health_check=list(HealthCheck), phases=(Phase.generate,),
)


def run_writes(budget_s: float) -> dict[str, Any]:
    from tests.fuzz.writes import WriteRig, dcmd_payloads, kafka_messages

    rig = WriteRig().start()
    deadline = time.monotonic() + budget_s
    cases = st.one_of(kafka_messages().map(lambda m: ("kafka", m)), dcmd_payloads().map(lambda d: ("dcmd", d)))

    @_SETTINGS
    @given(cases)
    def prop(case: tuple[str, Any]) -> None:
        if time.monotonic() > deadline:
            return
        kind, data = case
        if kind == "kafka":
            rig.kafka(*data)
        elif data is not None:
            rig.dcmd(*data)

    try:
        while time.monotonic() < deadline:
            prop()
    finally:
        rig.stop()
    s = rig.stats
    return {"cases": s.cases, "reached_device": s.reached, "refused": s.refused,
            "failures": len(s.failures), "examples": sorted(set(s.failures))[:10]}


def run_configs(budget_s: float) -> dict[str, Any]:
    """Half the budget sweeps the examples leaf by leaf, half generates from the models."""
    from tests.fuzz.configs import ConfigStats, check_one, configs, sweep_cases

    stats = ConfigStats()
    deadline = time.monotonic() + budget_s / 2
    swept = 0
    cases = sweep_cases()
    for text in cases:
        if time.monotonic() > deadline:
            break
        check_one(text, stats)
        swept += 1
    deadline = time.monotonic() + budget_s / 2

    @_SETTINGS
    @given(configs())
    def prop(text: str) -> None:
        if time.monotonic() > deadline:
            return
        check_one(text, stats)

    while time.monotonic() < deadline:
        prop()
    return {"cases": stats.cases, "swept": f"{swept}/{len(cases)}", "accepted": stats.accepted,
            "rejected": stats.rejected,
            "failures": len(stats.failures), "examples": sorted(set(stats.failures))[:10]}
