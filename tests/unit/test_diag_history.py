"""The status history ring, its change log, its file, and the terminal plots drawn from it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gateway.diagnostics.client import render_status
from gateway.diagnostics.history import StatusHistory
from gateway.diagnostics.plots import DOWN, UP, link_strip, resample_max, sparkline

T0 = 1_795_000_000_000


def doc(kafka_depth: int, *, kafka_up: bool = True, kafka_since: int = T0, pump_online: bool = True,
        dropped: int = 0, synced: bool = True, refused: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "gateway": "g/e",
        "clock": {"synced": synced},
        "links": {
            "mqtt": {"up": True, "link": "up", "since_ms": T0, "last_error": ""},
            "kafka": {"up": kafka_up, "link": "up" if kafka_up else "down", "since_ms": kafka_since,
                      "last_error": "" if kafka_up else "connection refused", "refused": refused or {}},
        },
        "buffer": {"cursors": {"mqtt": {"records": 0}, "kafka": {"records": kafka_depth}},
                   "dropped": {"age": dropped}, "quarantine": {"total_by_reason": {}}},
        "devices": {"pump1": {"online": pump_online, "last_error": "" if pump_online else "timeout"}},
    }


def test_depth_is_sampled_per_cursor_and_downsampled_by_maximum() -> None:
    h = StatusHistory(lambda: {}, interval_s=5, window_s=3600, points=10)
    for i in range(100):
        h.record(doc(i * 10), now_ms=T0 + i * 5000)
    out = h.as_dict()
    assert len(out["depth"]["t_ms"]) == 10
    assert out["depth"]["cursors"]["kafka"][-1] == 990  # the maximum of the last bucket
    assert out["depth"]["cursors"]["mqtt"] == [0] * 10
    assert out["step_s"] == 50
    # The ring is bounded: a window of 3600 s at 5 s keeps 720 samples.
    for i in range(100, 1000):
        h.record(doc(i), now_ms=T0 + i * 5000)
    assert len(h.depth) == 720


def test_state_changes_are_logged_once_each() -> None:
    h = StatusHistory(lambda: {})
    h.record(doc(0), now_ms=T0)
    assert h.events == type(h.events)()  # everything up at the start: nothing to say
    h.record(doc(5, kafka_up=False, kafka_since=T0 + 4000), now_ms=T0 + 5000)
    h.record(doc(9, kafka_up=False, kafka_since=T0 + 4000), now_ms=T0 + 10_000)
    h.record(doc(9, kafka_up=False, kafka_since=T0 + 4000, pump_online=False, dropped=7, synced=False,
                 refused={"plant.events": {"reason": "not authorised"}}), now_ms=T0 + 15_000)
    h.record(doc(0, kafka_since=T0 + 18_000, pump_online=True, dropped=7, synced=False), now_ms=T0 + 20_000)
    texts = [e["text"] for e in h.events]
    assert texts == [
        "kafka down: connection refused",
        "kafka refuses plant.events: not authorised",
        "device pump1 offline: timeout",
        "clock not synchronised",
        "7 record(s) dropped: age",
        "kafka up",
        "kafka accepts plant.events again",
        "device pump1 online",
    ]
    assert h.events[0]["ts_ms"] == T0 + 4000  # the link's own `since`, not the sample time
    assert [s for _, s in h.links["kafka"]] == ["up", "down", "up"]
    assert [t for t, _ in h.links["kafka"]] == [T0, T0 + 4000, T0 + 18_000]


def test_an_outage_between_two_samples_is_not_lost() -> None:
    h = StatusHistory(lambda: {})
    h.record(doc(0), now_ms=T0)
    h.record(doc(0, kafka_since=T0 + 3000), now_ms=T0 + 5000)  # down and up again in between
    assert [s for _, s in h.links["kafka"]] == ["up", "down", "up"]
    assert "between two samples" in h.events[-1]["text"]


def test_the_history_survives_a_restart_and_a_damaged_file_is_an_empty_history(tmp_path: Path) -> None:
    path = tmp_path / "status-history.json"
    h = StatusHistory(lambda: {}, path=str(path))
    now = StatusHistory.__module__ and __import__("time").time_ns() // 1_000_000
    h.record(doc(3), now_ms=now - 10_000)
    h.record(doc(8, kafka_up=False, kafka_since=now - 5000), now_ms=now - 5000)
    h.save()
    again = StatusHistory(lambda: {}, path=str(path))
    again.load()
    assert again.as_dict() == h.as_dict()
    path.write_text("{not json")
    broken = StatusHistory(lambda: {}, path=str(path))
    broken.load()
    assert broken.as_dict()["depth"]["t_ms"] == [] and not broken.events
    path.write_text(json.dumps({"format": 999}))
    broken.load()
    assert not broken.links


async def test_document_adds_history_to_the_status() -> None:
    async def provider() -> dict[str, Any]:
        return doc(4)

    h = StatusHistory(provider)
    h.record(await h.current())
    out = await h.document()
    assert out["gateway"] == "g/e" and out["history"]["depth"]["cursors"]["kafka"] == [4]
    assert isinstance(out["now_ms"], int)


def test_sparkline_and_link_strip() -> None:
    assert sparkline([0, 0, 5, 10]) == "▁▁▅█"
    assert sparkline([0, 1, 1000]) == "▁▂█"  # one record is not drawn as nothing
    assert sparkline([None, 0]) == " ▁"
    assert len(sparkline(list(range(500)), 48)) == 48
    assert resample_max([1, 9, 2, 3], 2) == [9, 3]
    strip = link_strip([[0, "up"], [50, "down"], [60, "up"]], 0, 100, 10)
    assert strip == UP * 5 + DOWN + UP * 4
    # A short outage inside one slice still shows.
    assert DOWN in link_strip([[0, "up"], [51, "down"], [52, "up"]], 0, 100, 10)
    assert link_strip([[50, "up"]], 0, 100, 4) == "  " + UP * 2


def test_outpost_status_draws_the_trend_and_the_link_history() -> None:
    h = StatusHistory(lambda: {})
    for i in range(30):
        up = i < 10 or i > 25
        h.record(doc(0 if up else (i - 9) * 100, kafka_up=up,
                     kafka_since=T0 if i < 10 else T0 + 10 * 5000 if not up else T0 + 26 * 5000),
                 now_ms=T0 + i * 5000)
    status = {**doc(0, kafka_since=T0 + 26 * 5000), "history": h.as_dict(), "now_ms": T0 + 29 * 5000}
    text = render_status(status)
    kafka_lines = text.split("Buffer")[1].splitlines()
    spark = next(line for line in kafka_lines if "max 1600" in line)
    assert "█" in spark and "▁" in spark
    links = text.split("Buffer")[0]
    strip = next(line for line in links.splitlines() if "outage" in line and DOWN in line)
    assert strip.strip().startswith(UP) and "1 outage" in strip


def test_a_link_that_is_still_connecting_at_start_is_not_an_outage_event() -> None:
    h = StatusHistory(lambda: {})
    h.record({"links": {}}, now_ms=T0)  # the first sample comes before the uplinks exist
    connecting = doc(0, kafka_up=False, kafka_since=T0 + 100)
    connecting["links"]["kafka"]["last_error"] = ""
    h.record(connecting, now_ms=T0 + 5000)
    h.record(doc(0, kafka_since=T0 + 7000), now_ms=T0 + 10_000)
    assert [e["text"] for e in h.events] == ["kafka up"]
    failing = StatusHistory(lambda: {})
    failing.record(doc(0, kafka_up=False, kafka_since=T0), now_ms=T0)
    assert [e["text"] for e in failing.events] == ["kafka down: connection refused"]
