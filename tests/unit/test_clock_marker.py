"""The clock marker on MQTT: a host can tell, for every metric, whether its timestamp was
taken on an unsynchronised clock, and flagged and trusted readings never share a payload.

The host side here reads only the protobuf bytes and the README's rule (the marker is the
metric named `Outpost/Clock/Unsynced` in the device's DBIRTH; a DATA payload that carries
its alias with value true has every metric flagged), not Outpost's own helpers, so a
marker that is lost, put on the wrong alias or left undeclared fails these tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from drivers.base import PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.records import clock_fix
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import (
    CLOCK_MARKER,
    AliasTable,
    NodeIdentity,
    build_dbirth,
    build_nbirth,
    clock_flags,
    stamp_data,
)
from gateway.sparkplug.errors import PayloadError, SparkplugError
from gateway.sparkplug.node_metrics import NodeMetricsReporter, build_ndata, node_metric_defs
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink
from tests.unit.test_clock_guard import REAL_NOW_NS, FakeHost, S
from tests.unit.test_sparkplug_session_rules import FakeConn, Rec

NODE = NodeIdentity("plant-7", "pump-3")
POINTS = {
    "meter1": [PointInfo("voltage_l1_v", "float32", unit="V"), PointInfo("energy_total_kwh", "uint32"),
               PointInfo("breaker_closed", "bool", writable=True)],
    "meter2": [PointInfo("pressure_kpa_1", "int16"), PointInfo("pressure_kpa_2", "int16")],
}
VALUES: dict[str, Any] = {"voltage_l1_v": 230.5, "energy_total_kwh": 123_456, "breaker_closed": True,
                          "pressure_kpa_1": -12, "pressure_kpa_2": 301}


class Host:
    """A Sparkplug host that follows the README's clock rule, from the bytes alone."""

    def __init__(self) -> None:
        self.markers: dict[str, int] = {}         # device -> alias of its clock marker
        self.aliases: dict[str, dict[int, str]] = {}  # device -> alias -> point name

    def birth(self, device: str, data: bytes) -> None:
        p = pb.Payload.FromString(data)
        self.aliases[device] = {}
        for m in p.metrics:
            assert m.HasField("name") and m.HasField("alias") and m.HasField("datatype")
            if m.name == CLOCK_MARKER:
                assert m.datatype == 11 and m.WhichOneof("value") == "boolean_value"  # Boolean
                self.markers[device] = m.alias
            else:
                self.aliases[device][m.alias] = m.name

    def data(self, device: str, data: bytes) -> list[tuple[str, int, bool]]:
        """(point, timestamp, flagged) for every sample metric of one DDATA."""
        p = pb.Payload.FromString(data)
        flagged = None
        samples = []
        for m in p.metrics:
            assert not m.HasField("name"), "DATA metrics go by alias only"
            assert m.HasField("timestamp"), "every DATA metric has a timestamp"
            if m.alias == self.markers[device]:
                assert flagged is None, "one marker per payload"
                flagged = m.boolean_value
            else:
                assert m.alias in self.aliases[device], f"alias {m.alias} not in the DBIRTH"
                samples.append((self.aliases[device][m.alias], m.timestamp))
        return [(name, ts, bool(flagged)) for name, ts in samples]


def _drain(rbe: ReportByException, guard: Any, ts_ms: int) -> list[Any]:
    for device, points in POINTS.items():
        for p in points:
            rbe.offer(Sample(device, p.name, VALUES[p.name], ts_ms, Quality.GOOD))
    return rbe.drain(guard.record_headers() or None)


def test_the_flag_of_every_metric_is_recoverable_and_payloads_never_mix() -> None:
    aliases = AliasTable(POINTS)
    host = Host()
    for seq, (device, points) in enumerate(POINTS.items(), start=1):
        host.birth(device, build_dbirth(device, points, {}, aliases, 1, seq, clock_unsynced=False))
    # Aliases stay unique across the node with the markers: points 1..5, then markers 6, 7.
    declared = [a for d in POINTS for a in host.aliases[d]] + list(host.markers.values())
    assert sorted(declared) == [1, 2, 3, 4, 5, 6, 7]

    # Readings of an earlier boot taken on an unsynchronised clock (cannot be corrected),
    # then readings of this boot after NTP: the first must come out flagged, the second not.
    before = FakeHost(1_000 * S, synced=False)
    old_guard = before.guard(boot_id="boot-a")
    rbe = ReportByException(NODE, POINTS)
    old = _drain(rbe, old_guard, 1_000_000)
    now = FakeHost(REAL_NOW_NS, synced=True)
    guard = now.guard(boot_id="boot-b")
    fresh = _drain(rbe, guard, REAL_NOW_NS // 1_000_000)
    published = []
    for seq, rec in enumerate(old + fresh, start=10):
        was_old = seq < 10 + len(old)
        fix = clock_fix(guard, rec.headers)
        device = NODE.device_of_stream(rec.stream)
        assert device is not None
        data = stamp_data(rec.payload, seq=seq, ts_ms=REAL_NOW_NS // 1_000_000, device=device,
                          aliases=aliases, historical=False, clock_unsynced=fix.unsynced)
        published.append((was_old, device, data))

    for was_old, device, data in published:
        got = host.data(device, data)
        assert {name for name, _, _ in got} == {p.name for p in POINTS[device]}  # no sample lost
        assert {flag for _, _, flag in got} == {was_old}, "a payload mixes or loses the flag"
        want_ts = 1_000_000 if was_old else REAL_NOW_NS // 1_000_000
        assert {ts for _, ts, _ in got} == {want_ts}  # flagged, not shifted; trusted untouched
        # Outpost's own reader of the rule agrees with the host's.
        assert clock_flags(data, host.markers[device]) == [flag for _, _, flag in got]


def test_a_marker_on_another_devices_alias_is_not_a_flag() -> None:
    aliases = AliasTable(POINTS)
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(Sample("meter2", "pressure_kpa_1", 7, 6))
    (rec,) = rbe.drain()
    data = stamp_data(rec.payload, seq=1, ts_ms=7, device="meter2", aliases=aliases,
                      historical=False, clock_unsynced=True)
    assert aliases.marker("meter1") != aliases.marker("meter2")
    assert clock_flags(data, aliases.marker("meter2")) == [True]
    assert clock_flags(data, aliases.marker("meter1")) == [False, False]  # the marker counted as a sample


def test_the_flag_costs_one_metric_per_payload_not_bytes_per_sample() -> None:
    points = {"plc": [PointInfo(f"pressure_kpa_{i}", "int32") for i in range(100)]}
    aliases = AliasTable(points)
    for n in (1, 100):
        rbe = ReportByException(NODE, points)
        for i in range(n):
            rbe.offer(Sample("plc", f"pressure_kpa_{i}", i, REAL_NOW_NS // 1_000_000))
        (rec,) = rbe.drain()
        kw: dict[str, Any] = {"seq": 1, "ts_ms": REAL_NOW_NS // 1_000_000, "device": "plc",
                              "aliases": aliases, "historical": False}
        plain, flagged = stamp_data(rec.payload, **kw), stamp_data(rec.payload, clock_unsynced=True, **kw)
        assert len(flagged) - len(plain) <= 14, (n, len(flagged) - len(plain))
        assert clock_flags(flagged, aliases.marker("plc")) == [True] * n


def test_stamp_data_refuses_both_marker_values() -> None:
    with pytest.raises(ValueError, match="exclude"):
        stamp_data(b"", seq=0, ts_ms=0, device=None, aliases=None, historical=False,
                   clock_unsynced=True, clock_resynced=True)


def test_clock_flags_rejects_a_marker_that_is_not_boolean() -> None:
    p = pb.Payload()
    m = p.metrics.add()
    m.name, m.int_value = CLOCK_MARKER, 1
    with pytest.raises(PayloadError, match="Boolean"):
        clock_flags(p.SerializeToString())


def test_nbirth_declares_the_node_marker_by_name() -> None:
    p = pb.Payload.FromString(build_nbirth(3, 1000, clock_unsynced=True))
    (m,) = [m for m in p.metrics if m.name == CLOCK_MARKER]
    assert m.datatype == 11 and m.boolean_value is True and not m.HasField("alias")
    assert CLOCK_MARKER not in {m.name for m in pb.Payload.FromString(build_nbirth(3, 1000)).metrics}


def test_a_point_may_not_take_the_markers_name(tmp_path: Path) -> None:
    bad = {"m1": [PointInfo(CLOCK_MARKER, "bool")]}
    with pytest.raises(PayloadError, match="reserved"):
        AliasTable(bad)

    async def write(*_a: object) -> None:
        pass

    s = MqttUplinkSettings("g", "e", str(tmp_path), ["mqtt://127.0.0.1:1"], use_aliases=False)
    with pytest.raises(SparkplugError, match="reserved"):
        SparkplugUplink(s, None, bad, write)


# -- the uplink: births declare it, a flagged run ends with the marker false once ------------


def _rec(seq: int, ts_ms: int, headers: dict[str, str]) -> Rec:
    rbe = ReportByException(NODE, POINTS)
    rbe.offer(Sample("meter2", "pressure_kpa_1", seq, ts_ms))
    (r,) = rbe.drain()
    return Rec(seq, r.stream, r.payload, {"type": "DDATA", **headers})


async def test_uplink_births_and_live_runs_of_the_marker(tmp_path: Path) -> None:
    async def write(*_a: object) -> None:
        pass

    clock_host = FakeHost(1_000 * S, synced=False)
    guard = clock_host.guard(boot_id="boot-b")
    guard.poll()
    s = MqttUplinkSettings("plant-7", "pump-3", str(tmp_path), ["mqtt://127.0.0.1:1"])
    up = SparkplugUplink(s, None, POINTS, write, clock=guard)
    conn = FakeConn()
    up._conn = conn  # type: ignore[assignment]
    up._seq.reset()
    up._dbirth(conn, "meter2", POINTS["meter2"])  # type: ignore[arg-type]
    host = Host()
    host.birth("meter2", conn.published[0][1])
    dbirth = pb.Payload.FromString(conn.published[0][1])
    assert [m.boolean_value for m in dbirth.metrics if m.name == CLOCK_MARKER] == [True]  # untrusted now

    other_boot = FakeHost(1_000 * S, synced=False).guard(boot_id="boot-a").record_headers()
    this_boot = guard.record_headers()
    batch = [_rec(1, 1_000_000, other_boot), _rec(2, 1_000_001, this_boot)]
    await up._publish_batch(conn, batch)  # type: ignore[arg-type]
    clock_host.ntp_step_to(REAL_NOW_NS)   # NTP: this boot's readings can be corrected from now on
    guard.poll()
    batch = [_rec(3, 1_000_002, this_boot),                          # corrected: ends the flagged run
             _rec(4, REAL_NOW_NS // 1_000_000, {}),                  # trusted: no marker at all
             _rec(5, 1_000_003, other_boot)]                         # still flagged (other boot)
    await up._publish_batch(conn, batch)  # type: ignore[arg-type]
    up._watermarks[NODE.stream("meter2")] = 7  # records 6, 7 are history
    batch = [_rec(6, 1_000_004, other_boot), _rec(7, REAL_NOW_NS // 1_000_000, {}),
             _rec(8, REAL_NOW_NS // 1_000_000, {})]
    await up._publish_batch(conn, batch)  # type: ignore[arg-type]

    ddata = [p for t, p, _ in conn.published[1:]]
    assert len(ddata) == 8
    markers = []
    for data in ddata:
        p = pb.Payload.FromString(data)
        ms = [m for m in p.metrics if m.alias == host.markers["meter2"]]
        markers.append(ms[0].boolean_value if ms else None)
        flags = {f for _, _, f in host.data("meter2", data)}
        assert flags == {bool(ms and ms[0].boolean_value)}
    # 1, 2 flagged; 3 corrected (false: ends the run); 4 trusted (nothing); 5 flagged again;
    # 6 historical flagged; 7 historical trusted (history never ends a live run: nothing);
    # 8 the first live trusted payload after 5: false once.
    assert markers == [True, True, False, None, True, True, None, False]
    hist = pb.Payload.FromString(ddata[5])
    assert all(m.is_historical for m in hist.metrics)  # the marker too, like every metric of history


def test_node_metrics_ndata_carries_the_node_marker_by_name() -> None:
    reporter = NodeMetricsReporter(node_metric_defs(["mqtt"]))
    reporter.birth({"Outpost/Uptime": 5})
    changed = reporter.changes({"Outpost/Uptime": 100})
    flagged = build_ndata(changed, 1000, 4, clock_marker=True)
    *metrics, marker = pb.Payload.FromString(flagged).metrics
    assert [m.name for m in metrics] == ["Outpost/Uptime"]
    assert (marker.name, marker.boolean_value, marker.timestamp) == (CLOCK_MARKER, True, 1000)
    assert not marker.HasField("datatype") and not marker.HasField("alias")
    assert clock_flags(flagged) == [True]
    assert clock_flags(build_ndata(changed, 1000, 4, clock_marker=False)) == [False]
    assert clock_flags(build_ndata(changed, 1000, 4)) == [False]
    assert len(pb.Payload.FromString(build_ndata(changed, 1000, 4)).metrics) == 1
