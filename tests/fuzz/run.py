"""Run the fuzzers for a time budget (or a number of cases) and count what they tried and found."""

from __future__ import annotations

import math
import time
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

_BATCH = 40  # examples per hypothesis run; runs repeat until the budget or the count is spent


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck), phases=(Phase.generate,))


class _Budget:
    def __init__(self, seconds: float | None, cases: int | None) -> None:
        self.deadline = time.monotonic() + seconds if seconds is not None else math.inf
        self.left = cases if cases is not None else math.inf

    def take(self) -> bool:
        if self.left <= 0 or time.monotonic() > self.deadline:
            return False
        self.left -= 1
        return True

    @property
    def open(self) -> bool:
        return self.left > 0 and time.monotonic() <= self.deadline


def run_writes(budget_s: float | None = None, cases: int | None = None) -> dict[str, Any]:
    from tests.fuzz.writes import WriteRig, dcmd_payloads, kafka_messages

    rig = WriteRig().start()
    budget = _Budget(budget_s, cases)
    strategy = st.one_of(kafka_messages().map(lambda m: ("kafka", m)), dcmd_payloads().map(lambda d: ("dcmd", d)))

    @_settings(_BATCH)
    @given(strategy)
    def prop(case: tuple[str, Any]) -> None:
        if not budget.take():
            return
        kind, data = case
        if kind == "kafka":
            rig.kafka(*data)
        elif data is not None:
            rig.dcmd(*data)

    try:
        while budget.open:
            prop()
    finally:
        rig.stop()
    s = rig.stats
    return {"cases": s.cases, "reached_device": s.reached, "refused": s.refused,
            "failures": len(s.failures), "examples": sorted(set(s.failures))[:10]}


def run_configs(budget_s: float | None = None, cases: int | None = None) -> dict[str, Any]:
    """Half the budget sweeps the examples leaf by leaf, half generates from the models."""
    from tests.fuzz.configs import ConfigStats, Sweep, check_one, configs

    stats = ConfigStats()
    half_s = budget_s / 2 if budget_s is not None else None
    half_n = cases // 2 if cases is not None else None
    budget = _Budget(half_s, half_n)
    swept = 0
    sweep = Sweep()
    for text in sweep:
        if not budget.take():
            break
        check_one(text, stats)
        swept += 1
    budget = _Budget(half_s, half_n)

    @_settings(_BATCH)
    @given(configs())
    def prop(text: str) -> None:
        if budget.take():
            check_one(text, stats)

    while budget.open:
        prop()
    return {"cases": stats.cases, "swept": f"{swept}/{len(sweep)}", "accepted": stats.accepted,
            "rejected": stats.rejected, "failures": len(stats.failures),
            "examples": sorted(set(stats.failures))[:10]}
