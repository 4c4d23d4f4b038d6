"""The human views of `outpost status` and `outpost tail`."""

from __future__ import annotations

from typing import Any

from gateway.diagnostics.client import render_status, render_tail_line
from gateway.runtime.supervisor import links_of
from gateway.uplinks.kafka.uplink import KafkaSettings, KafkaUplink
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink

NOW = 1_795_000_000_000


async def _write(device: str, point: str, value: Any) -> None:
    raise AssertionError("not called")


def real_links() -> dict[str, Any]:
    """The links section as the supervisor builds it, from real uplinks driven by their events."""
    mqtt = SparkplugUplink(
        MqttUplinkSettings(group_id="plant-7", edge_node_id="pump-3", data_dir="/nonexistent",
                           servers=["mqtts://broker:8883"], primary_host_id="scada-1"),
        None, {}, _write)
    mqtt.state.link_up("mqtts://broker:8883")
    mqtt.state.count("published", 1200)
    mqtt.state.refuse("spBv1.0/plant-7/DDATA/pump-3/valve7", "PUBACK 0x87 not authorized")
    mqtt.state.since_ms = NOW - 3_600_000
    mqtt.state.refused["spBv1.0/plant-7/DDATA/pump-3/valve7"].since_ms = NOW - 60_000
    assert mqtt._host is not None
    mqtt._host.online = True
    kafka = KafkaUplink(KafkaSettings(bootstrap_servers=("kafka:9093",)), None, [], "plant-7/pump-3")
    kafka.state.link_up("kafka:9093")
    kafka.state.count("delivered", 5000)
    kafka.state.link_down("connection refused")
    kafka.state.since_ms = NOW - 125_000
    links = links_of([mqtt, kafka])
    links["primary_host"]["since_ms"] = NOW - 3_000_000
    return links


def full_status() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "gateway": "plant-7/pump-3",
        "uptime_s": 93784.0,
        "now_ms": NOW,
        "clock": {"synced": True, "jumps": 0},
        "links": real_links(),
        "buffer": {
            "cursors": {
                "mqtt": {"records": 0, "bytes": 0},
                "kafka": {"records": 125000, "bytes": 31_250_000, "oldest_age_s": 125.0},
            },
            "oldest_age_s": 125.0,
            "dropped": {"max_age": 0, "max_size": 12},
            "file_bytes": 40_000_000,
            "wal_bytes": 4_000_000,
        },
        "devices": {
            "meter1": {"online": True, "last_good_ts_ms": NOW - 800, "errors": 0, "quality": "good"},
            "meter2": {"online": False, "last_good_ts_ms": NOW - 7_200_000, "errors": 1532,
                       "quality": "bad", "last_error": "timeout"},
        },
    }


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def test_status_view_answers_the_technicians_questions() -> None:
    text = render_status(full_status())
    assert text.splitlines()[0] == "Outpost 0.1.0  plant-7/pump-3  up 1d02h"
    assert line_with(text, "Clock") == "Clock     synchronised"
    kafka = line_with(text, "kafka ")
    assert "DOWN" in kafka and "for 2m05s" in kafka and "last error: connection refused" in kafka
    assert "UP" in line_with(text, "mqtt ") and "for 1h00m" in line_with(text, "mqtt ")
    assert "scada-1" in line_with(text, "primary_host")
    refused = line_with(text, "REFUSED")
    assert "spBv1.0/plant-7/DDATA/pump-3/valve7" in refused and "not authorized" in refused
    assert "for 1m00s" in refused
    assert "published 1200" in text and "delivered 5000, reconnects 1" in text
    assert "file 40.0 MB, wal 4.0 MB, oldest record 2m05s old" in text
    backlog = line_with(text, "125000 records")
    assert "31.2 MB waiting" in backlog and "oldest unsent 2m05s" in backlog
    assert "DROPPED: 12 by max_size" in text
    m2 = line_with(text, "meter2")
    assert "OFFLINE" in m2 and "2h00m ago" in m2 and "1532" in m2 and "(timeout)" in m2
    assert "online" in line_with(text, "meter1 ")


def test_unsynced_clock_and_no_drops_are_stated() -> None:
    doc = full_status()
    doc["clock"] = {"synced": False, "jumps": 2}
    doc["buffer"]["dropped"] = {}
    text = render_status(doc)
    assert "NOT SYNCHRONISED" in line_with(text, "Clock") and "2 jump(s)" in text
    assert "dropped: none" in text
    doc["clock"] = {"synced": False, "holdover": True}
    assert "holdover" in line_with(render_status(doc), "Clock")


def test_missing_sections_render_instead_of_crashing() -> None:
    text = render_status({"version": "0.0.9"})
    assert "Outpost 0.0.9" in text
    assert "Clock     unknown" in text and "Buffer    unknown" in text and "(none configured)" in text
    odd = render_status({"devices": {"x": {"online": True}}, "links": {"mqtt": "garbage"}, "now_ms": NOW})
    assert "never" in line_with(odd, "x ")


def test_tail_lines() -> None:
    good = {"sample": {"device": "m1", "point": "v", "value": 230.5, "ts_ms": NOW + 7, "unit": "V"}}
    assert render_tail_line(good) == "2026-11-18 11:06:40.007Z  m1/v = 230.5 V"
    bad = {"sample": {"device": "m1", "point": "v", "value": None, "ts_ms": NOW,
                      "quality": "bad", "reason": "timeout"}}
    assert render_tail_line(bad).endswith("m1/v = None  [bad: timeout]")
    assert render_tail_line({"dropped": 17}).startswith("... 17 lines dropped")
