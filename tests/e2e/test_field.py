"""The end-to-end field scenario in `make test`: a shortened outage, the same audit.

Runs tests/e2e/field.py on the session's services (Mosquitto, Kafka behind Toxiproxy,
socat pty pairs): 10 Modbus devices x 50 points at 1 s plus a serial sensor, a 25 s Kafka
cut (longer than the 10 s delivery deadline and every reconnect backoff configured), a
`kill -9` during the cut, then the drain. See field.py for what each figure means.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.field import FieldParams, Services, run_and_analyse

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


async def test_field_site_survives_outage_and_kill9(mosquitto, kafka, pty_pair, kcat, tmp_path_factory):
    # A short folder: the status socket path must stay under the 108-byte Unix limit.
    work = Path(tmp_path_factory.mktemp("e2e"))
    services = Services(mosquitto.host, mosquitto.port, kafka, lambda name: pty_pair(name), kcat)
    params = FieldParams(before_cut_s=12, outage_s=25, kill_after_s=10, restart_after_s=3,
                         request_timeout_s=4, drain_timeout_s=150)
    report = await run_and_analyse(services, params, work)
    text = json.dumps(report, indent=1, default=str)
    print(text)

    assert report["readings_expected"] > 10 * 50 * 20, text  # the site really produced
    for name in ("kafka", "mqtt"):
        up = report["uplinks"][name]
        assert up["readings_lost"] == 0, f"{name} lost readings: {up['lost_examples']}"
        assert up["unexpected"] == 0, f"{name} delivered values never produced: {up['unexpected_examples']}"
        assert up["order_errors"] == [], f"{name} out of order: {up['order_errors'][:5]}"
        assert up["crash_window_non_tail_losses"] == 0, name
    k, m = report["uplinks"]["kafka"], report["uplinks"]["mqtt"]
    assert k["duplicates_within_allowance"], f"kafka duplicate runs {k['duplicate_runs']}"
    # MQTT: resends only in the session after the crash, at most one batch of records.
    assert m["sessions"] >= 2
    dup_sessions = m["duplicate_messages_by_session"]
    assert set(dup_sessions) <= set(range(2, m["sessions"] + 1)), dup_sessions
    assert sum(dup_sessions.values()) <= 200, dup_sessions
    assert m["historical_metrics"] > 0, "the backlog after the restart was not published as history"
    assert m["historical_missing"] == [], m["historical_missing"][:5]
    assert m["data_before_birth"] == [], m["data_before_birth"][:5]
    assert m["seq_gaps"] == 0, "Sparkplug seq not continuous within a session"
    assert report["final_state"]["ok"], report["final_state"]
    # The supervisor restarts a crashed task, but in this scenario nothing may crash at all.
    assert report["final_state"]["task_crashes"] == {}, report["final_state"]["task_crashes"]
