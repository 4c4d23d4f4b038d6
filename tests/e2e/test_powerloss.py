"""The power-loss suite in `make test`: a few LazyFS cycles per durability mode, one of each
cut placement (random, during/after a checkpoint, during trimming, during an ack or a
quarantine, during a corrupt-file recovery, a torn write). See tests/e2e/powerloss.py;
`python -m tests.e2e.powerloss --json --cycles 200` is the full program."""

from __future__ import annotations

import json

import pytest

from tests.e2e.powerloss import SCENARIOS, run_mode

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("mode", ["full", "normal"])
def test_power_cuts_lose_nothing_committed(mode, tmp_path_factory):
    cycles = 1 + 2 * len(SCENARIOS)          # the first cycle is a plain random cut
    report = run_mode(mode, cycles, seed=20261202)
    text = json.dumps(report, indent=1)
    assert report["cycles"] == cycles, text
    assert sum(report["cut_points"].values()) == cycles + 1, text   # + the final restart
    assert report["records_committed"] > 1000, text                 # it really ran
    assert report["records_checked_present"] > 0, text
    assert report["integrity_failures"] == 0, text
    assert report["committed_lost"] == 0, text
    assert report["restart_failures"] == 0, text
    assert report["cursor_ahead"] == 0, text
    assert report["bdseq_backwards"] == 0, text
    assert report["driver_errors"] == 0, text
    if mode == "full":
        assert report["lost_inside_window"] == 0, text
        assert report["acks_regressed"] == 0, text
    # Torn writes really happened (LazyFS tore a write and died), not only plain cuts.
    assert any(k.startswith("torn:") for k in report["cut_points"]), text
