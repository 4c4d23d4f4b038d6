"""The Prometheus series, rendered by prometheus_client from one status document."""

from __future__ import annotations

import re

from gateway.diagnostics.metrics import GatewayMetrics

STATUS = {
    "version": "9.8.7",
    "clock": {"synced": True},
    "devices": {
        "meter1": {"online": True, "samples": 6, "errors": 0, "last_good_ts_ms": 1_795_000_000_500},
        'pump "A"\\1\nB': {"online": False, "samples": 1, "errors": 3, "last_good_ts_ms": None},
    },
    "links": {
        "mqtt": {"up": True, "link": "up", "since_ms": 1_795_000_000_000,
                 "counters": {"published": 250, "reconnects": 0}},
        "kafka": {"up": False, "link": "down", "since_ms": 1_795_000_100_000,
                  "counters": {"delivered": 40, "refused": 2, "reconnects": 1}},
        "primary_host": {"up": True, "since_ms": 1_795_000_000_000, "host_id": "scada"},
    },
    "buffer": {
        "cursors": {"mqtt": {"records": 0}, "kafka": {"records": 2000}},
        "dropped": {"age": 3, "size": 0},
        "quarantine": {"by_reason": {"too_large": 2}},
        "file_bytes": 100_000, "wal_bytes": 23_456,
    },
}


def series(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_every_series_of_the_status_document_keeps_its_name_and_value() -> None:
    text = GatewayMetrics(process=False).render(STATUS).decode()
    s = series(text)
    assert s['outpost_samples_read_total{device="meter1"}'] == 6
    assert s['outpost_errors_total{device="meter1"}'] == 0
    assert s['outpost_samples_published_total{uplink="mqtt"}'] == 250
    assert s['outpost_samples_published_total{uplink="kafka"}'] == 40
    assert s['outpost_uplink_events_total{event="refused",uplink="kafka"}'] == 2
    assert s['outpost_uplink_events_total{event="reconnects",uplink="kafka"}'] == 1
    assert s['outpost_link_up{link="mqtt"}'] == 1
    assert s['outpost_link_up{link="kafka"}'] == 0
    assert s['outpost_link_up{link="primary_host"}'] == 1
    assert s['outpost_link_since_seconds{link="kafka"}'] == 1_795_000_100
    assert s['outpost_buffer_records{cursor="kafka"}'] == 2000
    assert s['outpost_buffer_dropped_total{reason="age"}'] == 3
    assert s['outpost_buffer_quarantine_records{reason="too_large"}'] == 2
    assert s["outpost_buffer_bytes"] == 123_456
    assert s["outpost_clock_synced"] == 1
    assert s['outpost_device_online{device="meter1"}'] == 1
    assert s['outpost_device_last_good_read_seconds{device="meter1"}'] == 1_795_000_000.5
    for name, kind in (("outpost_samples_read_total", "counter"), ("outpost_link_up", "gauge"),
                       ("outpost_buffer_dropped_total", "counter"), ("outpost_uplink_events_total", "counter")):
        assert f"# TYPE {name} {kind}" in text.splitlines()
    assert "# HELP outpost_link_up 1 when the link is connected, else 0." in text.splitlines()


def test_labels_are_escaped_and_build_info_names_the_versions() -> None:
    text = GatewayMetrics(process=False).render(STATUS).decode()
    assert 'outpost_errors_total{device="pump \\"A\\"\\\\1\\nB"} 3.0' in text.splitlines()
    info = next(line for line in text.splitlines() if line.startswith("outpost_build_info{"))
    labels = dict(re.findall(r'(\w+)="([^"]*)"', info))
    assert labels["version"] == "9.8.7"
    assert labels["python"].startswith("3.")
    assert labels["prometheus_client"] and labels["aiokafka"] and labels["pymodbus"]
    assert info.endswith(" 1.0")


def test_process_series_are_there_and_a_missing_section_is_no_error() -> None:
    metrics = GatewayMetrics()
    s = series(metrics.render({}).decode())
    assert s["process_resident_memory_bytes"] > 0
    assert "process_cpu_seconds_total" in s
    assert not any(k.startswith("outpost_buffer_records") for k in s)
    # Nothing of a previous scrape leaks into the next one.
    assert 'outpost_buffer_records{cursor="kafka"}' in series(metrics.render(STATUS).decode())
    assert not any('"kafka"' in k for k in series(metrics.render({"links": {}}).decode()))


def test_a_removed_device_disappears_with_the_document() -> None:
    metrics = GatewayMetrics(process=False)
    assert 'device="old"' in metrics.render({"devices": {"old": {"samples": 1}}}).decode()
    assert 'device="old"' not in metrics.render({"devices": {}}).decode()
