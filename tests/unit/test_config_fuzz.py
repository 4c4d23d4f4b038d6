"""Issue 13 "done when": configurations generated from the models (valid and mutated) never
make `outpost check` show a traceback; what it accepts builds every runtime object; what it
rejects it rejects from validation, with a key path on every problem.

A fixed number of cases runs here; `python -m tests.fuzz --json --budget-s N` runs it longer (a budget
of 150 s sweeps every leaf of every example).
"""

from __future__ import annotations

from tests.fuzz.configs import ConfigStats, check_one
from tests.fuzz.run import run_configs


def test_generated_configurations_check_cleanly_and_accepted_ones_build() -> None:
    report = run_configs(cases=100)
    assert report["failures"] == 0, report["examples"]
    # Not vacuous: both outcomes were reached.
    assert report["accepted"] > 5 and report["rejected"] > 5, report


def test_the_property_catches_a_value_that_only_fails_when_built() -> None:
    # The check's safety net names it, and the fuzz property calls that a gap in validation.
    stats = ConfigStats()
    check_one('[gateway]\ngroup_id = "g"\nedge_node_id = "e"\n[buffer]\nmax_age = "1s"\n', stats)
    assert stats.failures == [] and stats.accepted == 1
    import gateway.config_build as cb

    real = cb.BufferSettings

    def refuse(**kw):
        raise ValueError("max_age_s must be positive seconds")

    cb.BufferSettings = refuse
    try:
        check_one('[gateway]\ngroup_id = "g"\nedge_node_id = "e"\n', stats)
    finally:
        cb.BufferSettings = real
    assert len(stats.failures) == 1 and "a gap in validation" in stats.failures[0]
    assert "buffer: cannot be built: max_age_s must be positive" in stats.failures[0]
