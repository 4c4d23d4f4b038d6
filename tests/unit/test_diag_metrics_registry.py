"""The Prometheus text exposition produced by the metrics registry."""

from __future__ import annotations

import pytest

from gateway.diagnostics.errors import DiagnosticsError
from gateway.diagnostics.metrics import GatewayMetrics, MetricsRegistry, MetricsServer, parse_listen


def test_counters_and_gauges_render_in_text_format() -> None:
    registry = MetricsRegistry()
    m = GatewayMetrics(registry)
    m.samples_read.inc(device="meter1")
    m.samples_read.inc(5, device="meter1")
    m.samples_read.inc(device="meter2")
    m.link_up.set(1, link="mqtt")
    m.link_up.set(0, link="kafka")
    m.buffer_bytes.set(123456)
    m.buffer_dropped.inc(3, reason="max_age")
    text = registry.render()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert "# TYPE outpost_samples_read_total counter" in lines
    assert 'outpost_samples_read_total{device="meter1"} 6' in lines
    assert 'outpost_samples_read_total{device="meter2"} 1' in lines
    assert "# TYPE outpost_link_up gauge" in lines
    assert 'outpost_link_up{link="kafka"} 0' in lines
    assert 'outpost_link_up{link="mqtt"} 1' in lines
    assert "outpost_buffer_bytes 123456" in lines
    assert 'outpost_buffer_dropped_total{reason="max_age"} 3' in lines
    # HELP precedes TYPE precedes samples, per metric family.
    i = lines.index("# HELP outpost_link_up 1 when the link is connected, else 0.")
    assert lines[i + 1] == "# TYPE outpost_link_up gauge"


def test_label_values_are_escaped_and_floats_kept() -> None:
    registry = MetricsRegistry()
    g = registry.gauge("x_value", "help with \\ backslash\nand newline", ("device",))
    g.set(0.25, device='pump "A"\\1\nB')
    g.set(float("inf"), device="inf")
    text = registry.render()
    assert 'x_value{device="pump \\"A\\"\\\\1\\nB"} 0.25' in text
    assert 'x_value{device="inf"} +Inf' in text
    assert "# HELP x_value help with \\\\ backslash\\nand newline" in text


def test_wrong_labels_and_decreasing_counters_are_refused() -> None:
    registry = MetricsRegistry()
    c = registry.counter("outpost_errors_total", "errors", ("device",))
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(uplink="mqtt")
    with pytest.raises(ValueError, match="cannot decrease"):
        c.inc(-1, device="m1")
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("outpost_errors_total", "again")
    with pytest.raises(ValueError, match="invalid metric name"):
        registry.gauge("bad-name", "x")
    with pytest.raises(ValueError, match="invalid label"):
        registry.gauge("ok_name", "x", ("__reserved",))


def test_collectors_refresh_gauges_at_scrape_time_and_a_failing_one_does_not_break_it() -> None:
    registry = MetricsRegistry()
    m = GatewayMetrics(registry)
    depth = {"mqtt": 10, "kafka": 2000}

    def collect() -> None:
        for cursor, n in depth.items():
            m.buffer_records.set(n, cursor=cursor)

    def broken() -> None:
        raise RuntimeError("boom")

    registry.add_collector(broken)
    registry.add_collector(collect)
    assert 'outpost_buffer_records{cursor="kafka"} 2000' in registry.render()
    depth["kafka"] = 0
    assert 'outpost_buffer_records{cursor="kafka"} 0' in registry.render()


def test_removed_devices_disappear() -> None:
    registry = MetricsRegistry()
    m = GatewayMetrics(registry)
    m.errors.inc(device="old")
    m.errors.remove(device="old")
    assert 'device="old"' not in registry.render()


def test_listen_must_be_loopback_unless_allowed() -> None:
    assert parse_listen("127.0.0.1:9108") == ("127.0.0.1", 9108)
    assert parse_listen("[::1]:9108") == ("::1", 9108)
    with pytest.raises(DiagnosticsError, match="loopback"):
        MetricsServer(MetricsRegistry(), "0.0.0.0:9108")
    MetricsServer(MetricsRegistry(), "0.0.0.0:9108", allow_remote=True)
    with pytest.raises(DiagnosticsError, match="host:port"):
        parse_listen("9108")


def test_label_handles_update_the_same_series() -> None:
    registry = MetricsRegistry()
    m = GatewayMetrics(registry)
    child = m.samples_read.labels(device="meter1")
    for _ in range(3):
        child.inc()
    m.samples_read.inc(device="meter1")
    assert m.samples_read.value(device="meter1") == 4
    with pytest.raises(ValueError, match="cannot decrease"):
        child.inc(-1)
    with pytest.raises(TypeError, match="counter"):
        child.set(0)
    up = m.link_up.labels(link="mqtt")
    up.set(1)
    assert 'outpost_link_up{link="mqtt"} 1' in registry.render()
    with pytest.raises(ValueError, match="takes labels"):
        m.samples_read.labels(devices="typo")
