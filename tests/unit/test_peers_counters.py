"""The pure parts of the peer benchmark (tests/benchmarks/peers.py): the per-format sample
counters that decide every delivered figure, the changing Modbus registers, and the Outpost
configuration it generates (which must be one `outpost run` accepts)."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.config import load_config
from gateway.sparkplug import sparkplug_b_pb2 as pb
from tests.benchmarks import peers


def _ddata(n: int, *, aliases: bool) -> bytes:
    msg = pb.Payload(timestamp=1, seq=3)
    for i in range(n):
        m = msg.metrics.add(timestamp=1000 + i % 2)
        if aliases:
            m.alias = i + 1  # DATA metrics may omit the datatype: counted all the same
        else:
            m.name = f"register_{i:03d}"
            m.datatype = 6
        m.int_value = i
    return msg.SerializeToString()


def test_sparkplug_counts_ddata_metrics_only_at_their_timestamps() -> None:
    assert peers.count_sparkplug("spBv1.0/peers/DDATA/outpost/unit1", _ddata(50, aliases=True)) == [
        (1000, 25), (1001, 25)]
    assert peers.samples(peers.count_sparkplug("spBv1.0/peers/DDATA/outpost/unit1",
                                               _ddata(7, aliases=False))) == 7
    # Births and node data are not samples of the workload.
    assert peers.count_sparkplug("spBv1.0/peers/DBIRTH/outpost/unit1", _ddata(50, aliases=False)) == []
    assert peers.count_sparkplug("spBv1.0/peers/NDATA/outpost", _ddata(3, aliases=False)) == []
    with pytest.raises(Exception, match="not a Sparkplug B payload"):
        peers.count_sparkplug("spBv1.0/peers/DDATA/outpost/unit1", b"\xff\xff\xff")


def test_sparkplug_leaves_out_the_clock_marker_by_name_and_by_its_birth_alias() -> None:
    counter = peers.SparkplugCounter()
    birth = pb.Payload(timestamp=1, seq=1)
    for i in range(3):
        birth.metrics.add(name=f"register_{i:03d}", alias=i + 1, datatype=6, int_value=0)
    birth.metrics.add(name=peers.CLOCK_MARKER, alias=4, datatype=11, boolean_value=True)
    assert counter("spBv1.0/peers/DBIRTH/outpost/unit1", birth.SerializeToString()) == []
    data = pb.Payload(timestamp=7, seq=2)
    for alias in (1, 2, 3, 4):
        data.metrics.add(alias=alias, timestamp=7, int_value=1)
    assert counter("spBv1.0/peers/DDATA/outpost/unit1", data.SerializeToString()) == [(7, 3)]
    # Alias 4 is a point on a device whose birth gave the marker another alias.
    assert counter("spBv1.0/peers/DDATA/outpost/unit2", data.SerializeToString()) == [(7, 4)]
    named = pb.Payload(timestamp=7, seq=3)
    named.metrics.add(name="register_000", timestamp=7, datatype=6, int_value=1)
    named.metrics.add(name=peers.CLOCK_MARKER, timestamp=7, datatype=11, boolean_value=True)
    assert counter("spBv1.0/peers/DDATA/outpost/unit3", named.SerializeToString()) == [(7, 1)]


def test_thingsboard_counts_values_of_every_device_and_entry() -> None:
    doc = {"unit1": [{"ts": 5, "values": {"a": 1, "b": 2}}, {"ts": 6, "values": {"a": 3}}],
           "unit2": {"ts": 5, "values": {"x": 1, "y": 2, "z": 3}},
           "unit3": [{"k": 1}]}
    groups = peers.count_thingsboard(json.dumps(doc).encode())
    assert groups[:2] == [(5, 5), (6, 1)] and peers.samples(groups) == 7
    with pytest.raises(ValueError):
        peers.count_thingsboard(b"[1, 2]")
    with pytest.raises(ValueError):
        peers.count_thingsboard(b'{"unit1": [3]}')


def test_line_protocol_counts_fields_with_escapes_and_quoted_strings() -> None:
    text = (
        "modbus,host=a,name=peers,slave_id=1,type=holding_register r0=1i,r1=2i,r2=3i 1700000000000000000\n"
        "my\\ measurement,tag\\,x=a\\ b f\\ 1=1.5,s=\"a, b c=d\" 1700000000000000000\n"
        "\n"
        "# a comment\n"
        "m v=1u 1700000000001000000\n"
    )
    assert peers.count_line_protocol(text.encode()) == [(1_700_000_000_000, 5), (1_700_000_000_001, 1)]
    with pytest.raises(ValueError, match="without fields"):
        peers.count_line_protocol(b"lonely_measurement\n")


def test_telegraf_counter_takes_json_or_line_protocol() -> None:
    one = {"fields": {"a": 1, "b": 2}, "name": "modbus", "tags": {}, "timestamp": 1_700_000_000}
    batch = {"metrics": [one, {"fields": {"c": 1}, "name": "modbus", "tags": {}, "timestamp": 1_700_000_001}]}
    assert peers.telegraf_counter("telegraf/h/modbus", json.dumps(one).encode()) == [(1_700_000_000_000, 2)]
    assert peers.samples(peers.telegraf_counter("telegraf/h/modbus", json.dumps(batch).encode())) == 3
    assert peers.telegraf_counter("telegraf/h/modbus", b"modbus r0=1i,r1=2i 1700000000000\n") == [
        (1_700_000_000_000, 2)]


def test_tally_window_counts_by_sample_time_not_arrival() -> None:
    tally = peers.Tally()
    tally.add([(999, 10)], 100)
    tally.add([(1000, 50)], 400)
    tally.add([(1999, 5), (2000, 7)], 90)
    tally.add([], 30)  # a message without samples is not a data message
    assert tally.window(1000, 2000) == (55, 2, 490)
    assert tally.samples == 72


def test_registers_change_on_every_read_and_refuse_what_is_not_there() -> None:
    store = peers.ChangingRegisters(units=2, registers=10)

    async def reads() -> tuple:
        first = await store.async_getValues(1, 3, 0, 10)
        second = await store.async_getValues(1, 3, 0, 10)
        other = await store.async_getValues(2, 3, 0, 10)
        beyond = await store.async_getValues(1, 3, 5, 6)
        unknown = await store.async_getValues(3, 3, 0, 1)
        return first, second, other, beyond, unknown

    first, second, other, beyond, unknown = asyncio.run(reads())
    assert len(first) == 10 and all(a != b for a, b in zip(first, second, strict=True))
    assert first != other
    assert not isinstance(beyond, list) and not isinstance(unknown, list)
    assert store.served == 30


def test_outpost_config_is_accepted_and_polls_the_whole_workload(tmp_path) -> None:
    w = peers.WORKLOADS["10k"]
    setup = peers.outpost_setup(w, tmp_path, ("127.0.0.1", 1883), 5020, "realistic")
    cfg = load_config(tmp_path / "outpost.toml")
    assert len(cfg.devices) == w.units
    assert {len(d.points) for d in cfg.devices} == {w.registers}
    assert isinstance(setup.counter, peers.SparkplugCounter)
    assert setup.argv[1:3] == ["-m", "gateway"]
    (tmp_path / "f").mkdir()
    forced = peers.outpost_setup(w, tmp_path / "f", ("127.0.0.1", 1883), 5020, "short", "synced")
    assert forced.argv[3:5] == [peers.CLOCK_CHILD_FLAG, "synced"]


def test_ratios_are_to_outpost_and_skip_failed_peers() -> None:
    base = {"cpu_s_per_1000_samples": 0.02, "peak_rss_mb": 50.0, "mqtt_payload_bytes_per_sample": 20.0,
            "fraction_delivered": 1.0}
    peer = {"cpu_s_per_1000_samples": 0.1, "peak_rss_mb": 75.0, "mqtt_payload_bytes_per_sample": 10.0,
            "fraction_delivered": 0.5}
    results = {"outpost": base, "thingsboard-memory": dict(peer), "telegraf": {"error": "no Go toolchain"}}
    peers.add_ratios(results)
    assert results["thingsboard-memory"]["ratio_to_outpost"] == {
        "cpu_s_per_1000_samples": 5.0, "peak_rss_mb": 1.5, "mqtt_payload_bytes_per_sample": 0.5,
        "fraction_delivered": 0.5}
    assert "ratio_to_outpost" not in results["telegraf"]
