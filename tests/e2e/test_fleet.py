"""The fleet scenario, shortened: three gateways on the three-broker cluster, each on its own
proxied link, with at least one link cut, one spell of lost acknowledgements (so there are
duplicates to drop) and one `kill -9` during 20 s; the reference
consumer must find every acknowledged record of every gateway exactly once after
de-duplication. The full run is `python -m tests.e2e.fleet --json` (>= 20 gateways).
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.fleet import FleetParams, run_fleet

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


async def test_fleet_loses_nothing_through_cuts_and_kills(kafka_cluster, tmp_path) -> None:
    p = FleetParams(gateways=3, seconds=20, devices=2, points=10, partitions=6,
                    cut_every_s=5.0, cut_s=(2.0, 7.0), kill_every_s=8.0, seed=7)
    report = await run_fleet(kafka_cluster, None, tmp_path, p, force_faults=True)
    totals = report["totals"]
    print(json.dumps(totals))
    assert totals["kills"] >= 1, report["events"]
    assert totals["link_faults"]["cut"] >= 1 and totals["link_faults"]["acks_lost"] >= 1, report["events"]
    # Answers lost for longer than the delivery deadline: the broker had appended what the
    # gateway then sent again, so the consumer must have dropped duplicates.
    assert totals["duplicates"] > 0, report["events"]
    assert totals["malformed"] == 0 and totals["out_of_order"] == 0, totals
    for edge, g in report["gateways"].items():
        assert g["lost"] == 0, (edge, g)
        assert g["produced"] > 20, (edge, g)  # it streamed for real (2 records/s)
        # Everything acknowledged arrived once; a few records past the ack point may too.
        assert g["produced"] <= g["delivered_once"] <= g["stored"], (edge, g)
        # A fault resends at most the two windows in flight (one batch per partition each).
        faults = g["kills"] + g["cuts"] + 1
        assert g["duplicates"] <= faults * 2 * p.batch_max_records * 4, (edge, g)
    assert totals["samples_delivered"] > 0
