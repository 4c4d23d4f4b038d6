"""Node metrics: declared in NBIRTH with datatypes, then NDATA by exception with deadbands."""

from __future__ import annotations

from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.node_metrics import (
    PREFIX,
    NodeMetricsReporter,
    add_node_metrics,
    build_ndata,
    node_metric_defs,
    read_system,
    values_from_status,
)
from gateway.sparkplug.payload import DataType, decode_payload

UPLINKS = ["mqtt", "kafka"]


def status(**over):
    st = {
        "version": "0.1.0",
        "uptime_s": 12.7,
        "clock": {"synced": False, "holdover": True, "jumps": 1},
        "links": {"mqtt": {"up": True}, "kafka": {"up": False}},
        "buffer": {"cursors": {"mqtt": {"records": 0}, "kafka": {"records": 5000}},
                   "oldest_age_s": 3600.5, "dropped": {"age": 3}},
        "system": {"cpu_temp_c": 48.3, "disk_free_bytes": 1_000_000_000},
    }
    for k, v in over.items():
        st[k] = v
    return st


def test_node_metrics_are_declared_in_nbirth() -> None:
    defs = node_metric_defs(UPLINKS)
    names = [d.name for d in defs]
    assert len(names) == len(set(names))
    rep = NodeMetricsReporter(defs)
    born = dict((d.name, v) for d, v in rep.birth(values_from_status(status(), UPLINKS)))
    assert set(born) == set(names)          # every metric it will ever report, even unknown ones
    assert born["Properties/Version"] == "0.1.0"
    assert born[f"{PREFIX}/Uptime"] == 12
    assert born[f"{PREFIX}/Clock/State"] == "holdover"
    assert born[f"{PREFIX}/Link/mqtt"] is True and born[f"{PREFIX}/Link/kafka"] is False
    assert born[f"{PREFIX}/Buffer/kafka/Depth"] == 5000
    assert born[f"{PREFIX}/Buffer/kafka/Oldest Age"] == 3600.5
    assert born[f"{PREFIX}/Buffer/mqtt/Oldest Age"] == 0.0
    assert born[f"{PREFIX}/Buffer/Dropped/age"] == 3 and born[f"{PREFIX}/Buffer/Dropped/size"] == 0
    assert born[f"{PREFIX}/Buffer/mqtt/Quarantined"] is None   # no quarantine figure: null, still declared
    assert born[f"{PREFIX}/Buffer/Dropped/quarantine_dropped"] == 0
    st = status()
    st["buffer"]["quarantine"] = {"by_cursor": {"kafka": 3}, "by_reason": {
        "held:spBv1.0/g/DDATA/e/v7": 2, "too_large": 1, "refused_0x99": 4, "not_encodable": 1}}
    born = dict((d.name, v) for d, v in rep.birth(values_from_status(st, UPLINKS)))
    assert born[f"{PREFIX}/Buffer/kafka/Quarantined"] == 3 and born[f"{PREFIX}/Buffer/mqtt/Quarantined"] == 0
    assert [born[f"{PREFIX}/Buffer/Quarantined/{c}"] for c in ("held", "too_large", "refused", "other")] == [
        2, 1, 4, 1]
    p = pb.Payload()
    add_node_metrics(p, rep.birth(values_from_status(status(system={}), UPLINKS)), 1000, birth=True)
    decoded = {m.name: m for m in decode_payload(p.SerializeToString()).metrics}
    temp = decoded[f"{PREFIX}/System/CPU Temperature"]
    assert temp.datatype is DataType.Float and temp.value is None   # no sensor here: is_null
    assert temp.properties["engUnit"].value == "°C"
    assert decoded[f"{PREFIX}/Uptime"].datatype is DataType.UInt64
    assert all(m.timestamp == 1000 and m.alias is None for m in decoded.values())


def test_node_metrics_are_reported_by_exception() -> None:
    rep = NodeMetricsReporter(node_metric_defs(UPLINKS))
    rep.birth(values_from_status(status(), UPLINKS))
    assert rep.changes(values_from_status(status(), UPLINKS)) == []
    # within the deadbands: uptime +20 s, depth +50, temperature +0.5 °C: nothing to send
    st = status(uptime_s=32.0, system={"cpu_temp_c": 48.8, "disk_free_bytes": 1_000_000_000})
    st["buffer"]["cursors"]["kafka"]["records"] = 5050
    assert rep.changes(values_from_status(st, UPLINKS)) == []
    # beyond: a link goes down, a drop, uptime +31 s since last sent
    st = status(uptime_s=43.9)
    st["links"]["mqtt"]["up"] = False
    st["buffer"]["dropped"] = {"age": 4}
    changed = {d.name: v for d, v in rep.changes(values_from_status(st, UPLINKS))}
    assert changed == {f"{PREFIX}/Link/mqtt": False, f"{PREFIX}/Buffer/Dropped/age": 4, f"{PREFIX}/Uptime": 43}
    assert rep.changes(values_from_status(st, UPLINKS)) == []   # sent once
    # a value that becomes unknown is reported as null once
    st["system"] = {"cpu_temp_c": None, "disk_free_bytes": 1_000_000_000}
    assert [(d.name, v) for d, v in rep.changes(values_from_status(st, UPLINKS))] == [
        (f"{PREFIX}/System/CPU Temperature", None)]


def test_ndata_carries_names_values_and_seq_without_datatypes() -> None:
    rep = NodeMetricsReporter(node_metric_defs(UPLINKS))
    rep.birth(values_from_status(status(), UPLINKS))
    st = status()
    st["links"]["kafka"]["up"] = True
    data = build_ndata(rep.changes(values_from_status(st, UPLINKS)), 2000, seq=9)
    raw = pb.Payload()
    raw.ParseFromString(data)
    assert raw.seq == 9 and raw.timestamp == 2000
    assert [(m.name, m.boolean_value, m.datatype, m.timestamp) for m in raw.metrics] == [
        (f"{PREFIX}/Link/kafka", True, 0, 2000)]


def test_read_system_on_this_machine(tmp_path) -> None:
    sysvals = read_system(str(tmp_path))
    assert isinstance(sysvals["disk_free_bytes"], int) and sysvals["disk_free_bytes"] > 0
    assert sysvals["cpu_temp_c"] is None or -40 < sysvals["cpu_temp_c"] < 150
