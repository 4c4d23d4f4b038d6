"""Cross-check our Sparkplug B bytes against Eclipse Tahu's npm `sparkplug-payload`, run by Node.

Node decodes the bytes we produce and we decode the bytes it produces, for every datatype,
negative integers and arrays included: the codec both ways, and a whole session of the bytes
the edge node itself publishes (build_* and stamp_data in gateway.sparkplug.edge). Array types
are packed and unpacked in the peer with Node's Buffer, because Tahu 1.0.x has no array support
(see tests/peers/sparkplug_tahu.js).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from drivers.base import DATATYPES, PointInfo, Quality, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import (
    CLOCK_MARKER,
    AliasTable,
    NodeIdentity,
    build_dbirth,
    build_ddeath,
    build_nbirth,
    build_ndeath,
    stamp_data,
)
from gateway.sparkplug.node_metrics import NodeMetricsReporter, build_ndata, node_metric_defs
from gateway.sparkplug.payload import (
    DataSet,
    DataType,
    Metric,
    Parameter,
    Payload,
    PropertyValue,
    Template,
    decode_payload,
    driver_datatype,
    encode_payload,
    quality_properties,
)
from gateway.sparkplug.topics import MessageType

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "peers" / "sparkplug_tahu.js"
TS = 1_700_000_000_123


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


@pytest.fixture(scope="module")
def node_modules(request: pytest.FixtureRequest) -> Path:
    candidates: list[Path] = []
    try:
        candidates.append(Path(request.getfixturevalue("node_peers")) / "node_modules")
    except pytest.FixtureLookupError:
        pass
    candidates.append(REPO / "tests" / "peers" / "node_modules")
    if os.environ.get("OUTPOST_NODE_MODULES"):
        candidates.append(Path(os.environ["OUTPOST_NODE_MODULES"]))
    for c in candidates:
        if (c / "sparkplug-payload").is_dir():
            return c
    pytest.fail(f"sparkplug-payload is not installed in any of {candidates}: run npm install "
                "in tests/peers (the node_peers fixture does it)")


def run_node(node_modules: Path, request: dict) -> dict:
    node = shutil.which("node")
    assert node, "node is not on PATH"
    env = dict(os.environ, NODE_PATH=str(node_modules))
    proc = subprocess.run([node, str(SCRIPT)], input=json.dumps(request), capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# name, datatype, our value, what Tahu's decoder shows (64-bit as strings)
SCALARS = [
    ("i8_neg", DataType.Int8, -128, -128),
    ("i8_pos", DataType.Int8, 127, 127),
    ("i16_neg", DataType.Int16, -2, -2),
    ("i32_neg", DataType.Int32, -2_000_000_000, -2_000_000_000),
    ("i64_neg", DataType.Int64, -(2**63), str(-(2**63))),
    ("i64_pos", DataType.Int64, 2**62 + 5, str(2**62 + 5)),
    ("u8", DataType.UInt8, 255, 255),
    ("u16", DataType.UInt16, 65535, 65535),
    ("u32", DataType.UInt32, 123_456, 123_456),
    ("u64", DataType.UInt64, 2**64 - 1, str(2**64 - 1)),
    ("float", DataType.Float, 1.5, 1.5),
    ("double", DataType.Double, -3.141592653589793, -3.141592653589793),
    ("bool", DataType.Boolean, True, True),
    ("string", DataType.String, "héllo", "héllo"),
    ("text", DataType.Text, "long text", "long text"),
    ("uuid", DataType.UUID, "3f1c2b44-0000-4000-8000-000000000001", "3f1c2b44-0000-4000-8000-000000000001"),
    ("datetime", DataType.DateTime, TS, str(TS)),
]
ARRAYS = [
    ("a_i8", DataType.Int8Array, [-128, 0, 127]),
    ("a_i16", DataType.Int16Array, [-32768, -1, 32767]),
    ("a_i32", DataType.Int32Array, [-(2**31), 5, 2**31 - 1]),
    ("a_i64", DataType.Int64Array, [-(2**63), -1, 2**63 - 1]),
    ("a_u8", DataType.UInt8Array, [0, 255]),
    ("a_u16", DataType.UInt16Array, [0, 65535]),
    ("a_u32", DataType.UInt32Array, [0, 2**32 - 1]),
    ("a_u64", DataType.UInt64Array, [0, 2**64 - 1]),
    ("a_float", DataType.FloatArray, [1.5, -2.25]),
    ("a_double", DataType.DoubleArray, [1e300, -0.1]),
    ("a_bool", DataType.BooleanArray, [True, False, True, True, False, False, False, False, True]),
    ("a_string", DataType.StringArray, ["a", "", "ünï"]),
    ("a_datetime", DataType.DateTimeArray, [TS, TS + 1]),
]


def test_tahu_decodes_our_bytes(node_modules: Path) -> None:
    metrics = [Metric(n, t, v, timestamp=TS) for n, t, v, _ in SCALARS]
    metrics += [Metric(n, t, v, timestamp=TS) for n, t, v in ARRAYS]
    metrics.append(Metric("bytes", DataType.Bytes, b"\x00\xffab", timestamp=TS))
    metrics.append(Metric("null_float", DataType.Float, None, timestamp=TS))
    metrics.append(Metric("bad", DataType.Double, None, timestamp=TS,
                          properties=quality_properties(Quality.BAD)))
    metrics.append(Metric("stale", DataType.Int16, -7, timestamp=TS,
                          properties=quality_properties(Quality.STALE)))
    metrics.append(Metric("ds", DataType.DataSet, DataSet(
        ["n", "x", "ok", "s"], [DataType.Int64, DataType.Double, DataType.Boolean, DataType.String],
        [[-5, 1.25, True, "a"], [7, -2.5, False, "b"]]), timestamp=TS))
    metrics.append(Metric("tpl", DataType.Template, Template(
        metrics=[Metric("inner", DataType.Int32, -9, timestamp=TS)],
        parameters=[Parameter("limit", DataType.Double, 2.5)],
        version="1.0", template_ref="Motor"), timestamp=TS))
    data = encode_payload(Payload(metrics=metrics, timestamp=TS, seq=0))

    out = run_node(node_modules, {"op": "decode", "b64": base64.b64encode(data).decode()})
    tahu = {m["name"]: m for m in out["tahu"]["metrics"]}
    assert out["tahu"]["timestamp"] == str(TS) and out["tahu"]["seq"] == "0"
    for name, dt, _value, shown in SCALARS:
        assert tahu[name]["type"] == dt.name, name
        assert tahu[name]["value"] == shown, name
        assert tahu[name]["timestamp"] == str(TS)
    wide = (DataType.Int64Array, DataType.UInt64Array, DataType.DateTimeArray)
    for name, dt, value in ARRAYS:
        expected = [str(v) for v in value] if dt in wide else value
        if dt is DataType.FloatArray:
            expected = [_f32(v) for v in value]
        assert out["arrays"][name] == expected, name
    assert tahu["bytes"]["value"] == {"hex": "00ff6162"}
    assert tahu["null_float"]["value"] is None
    assert tahu["bad"]["value"] is None
    assert tahu["bad"]["properties"]["Quality"] == {"value": 0, "type": "Int32"}
    assert tahu["stale"]["value"] == -7
    assert tahu["stale"]["properties"]["Quality"] == {"value": 500, "type": "Int32"}
    ds = tahu["ds"]["value"]
    assert ds["columns"] == ["n", "x", "ok", "s"]
    assert ds["types"] == ["Int64", "Double", "Boolean", "String"]
    # Tahu JS reads DataSet Int64 cells unsigned (no toSigned()), so -5 shows as its
    # two's complement: the bytes are what Tahu Java writes for a negative long.
    assert ds["rows"] == [[str(2**64 - 5), 1.25, True, "a"], ["7", -2.5, False, "b"]]
    tpl = tahu["tpl"]["value"]
    assert tpl["templateRef"] == "Motor" and tpl["version"] == "1.0"
    assert tpl["metrics"][0]["value"] == -9
    assert tpl["parameters"][0] == {"value": 2.5, "type": "Double", "name": "limit"}


def test_we_decode_tahu_bytes(node_modules: Path) -> None:
    metrics = []
    for name, dt, value, _shown in SCALARS:
        v = str(value) if dt in (DataType.Int64, DataType.UInt32, DataType.UInt64,
                                 DataType.DateTime) else value
        metrics.append({"name": name, "type": dt.name, "value": v, "timestamp": TS})
    metrics.append({"name": "bytes", "type": "Bytes", "value": {"hex": "0001ff"}, "timestamp": TS})
    metrics.append({"name": "null_i32", "type": "Int32", "value": None, "timestamp": TS})
    metrics.append({"name": "q", "type": "Int16", "value": -300, "timestamp": TS,
                    "properties": {"Quality": {"type": "Int32", "value": 500}}})
    metrics.append({"name": "ds", "type": "DataSet", "timestamp": TS, "value": {
        "numOfColumns": 2, "columns": ["a", "b"], "types": ["Double", "String"],
        "rows": [[1.5, "x"], [2.5, "y"]]}})
    metrics.append({"name": "tpl", "type": "Template", "timestamp": TS, "value": {
        "isDefinition": True, "version": "2", "metrics": [
            {"name": "speed", "type": "Float", "value": 0.5}],
        "parameters": [{"name": "p", "type": "String", "value": "v"}]}})
    for name, dt, value in ARRAYS:
        metrics.append({"name": name, "datatype": int(dt), "array": True, "timestamp": TS,
                        "value": [str(v) if isinstance(v, int) and not isinstance(v, bool)
                                  and dt in (DataType.Int64Array, DataType.UInt64Array,
                                             DataType.DateTimeArray) else v for v in value]})
    out = run_node(node_modules, {"op": "encode", "payload": {
        "timestamp": TS, "seq": 7, "metrics": metrics}})
    p = decode_payload(base64.b64decode(out["b64"]))
    assert p.timestamp == TS and p.seq == 7
    got = {m.name: m for m in p.metrics}
    for name, dt, value, _shown in SCALARS:
        assert got[name].datatype is dt, name
        expected = _f32(value) if dt is DataType.Float else value
        assert got[name].value == expected, name
        assert got[name].timestamp == TS
    for name, dt, value in ARRAYS:
        assert got[name].datatype is dt
        assert got[name].value == value, name
    assert got["bytes"].value == b"\x00\x01\xff"
    assert got["null_i32"].value is None
    assert got["q"].value == -300 and got["q"].quality is Quality.STALE
    assert got["q"].properties == {"Quality": PropertyValue(DataType.Int32, 500)}
    assert got["ds"].value == DataSet(["a", "b"], [DataType.Double, DataType.String],
                                      [[1.5, "x"], [2.5, "y"]])
    tpl = got["tpl"].value
    assert tpl.is_definition and tpl.version == "2"
    assert tpl.metrics[0].name == "speed" and tpl.metrics[0].value == 0.5
    assert tpl.parameters == [Parameter("p", DataType.String, "v")]


# ----------------------------------------------------------------------------------------
# The bytes the edge node publishes: build_* and stamp_data, decoded by Tahu as a host would


def test_tahu_reads_the_edge_nodes_own_messages(node_modules: Path) -> None:
    """A whole session as gateway.sparkplug.edge makes it, not as a test encoder would.

    NBIRTH and DBIRTH from build_nbirth/build_dbirth, DDATA from stored ReportByException
    records through stamp_data (aliases only, no datatypes, historical, clock-corrected and
    clock-flagged), DDEATH and the NDEATH Will. Tahu learns aliases and datatypes from the
    births and decodes the DATA with them, like a Sparkplug host.
    """
    node = NodeIdentity("plant-7", "pump-3")
    points = {
        "meter1": [PointInfo(f"p_{dt}", dt, unit="u" if dt != "bool" else "", writable=dt == "int16",
                             min=-10 if dt == "int16" else None, max=10 if dt == "int16" else None)
                   for dt in DATATYPES],
        "meter2": [PointInfo("on", "bool", writable=True)],
    }
    values = {"bool": True, "int8": -128, "int16": -7, "int32": -2_000_000_000, "int64": -(2**63),
              "uint8": 255, "uint16": 65535, "uint32": 2**32 - 1, "uint64": 2**64 - 1,
              "float32": 1.5, "float64": -3.141592653589793, "string": "héllo"}
    rbe = ReportByException(node, points)
    aliases = AliasTable(points)
    for dt in DATATYPES:
        rbe.offer(Sample("meter1", f"p_{dt}", values[dt], TS + 1))
    rbe.offer(Sample("meter2", "on", None, TS + 2, Quality.BAD))
    records = rbe.drain()
    assert [r.stream for r in records] == ["plant-7/pump-3/meter1", "plant-7/pump-3/meter2"]

    reporter = NodeMetricsReporter(node_metric_defs(["mqtt"]))
    node_values = {"Outpost/Uptime": 5, "Outpost/Link/mqtt": True, "Outpost/System/CPU Temperature": None}
    born_node = reporter.birth(node_values)
    ndata = build_ndata(reporter.changes({"Outpost/Uptime": 100, "Outpost/Link/mqtt": False}), TS + 13, 6)
    msgs: list[tuple[str, bytes]] = [
        (node.topic(MessageType.NBIRTH), build_nbirth(7, TS, seq=0, software="outpost-test",
                                                      node_metrics=born_node, clock_unsynced=False)),
        (node.topic(MessageType.DBIRTH, "meter1"),
         build_dbirth("meter1", points["meter1"], rbe.snapshot("meter1"), aliases, TS, 1,
                      clock_unsynced=False)),
        (node.topic(MessageType.DBIRTH, "meter2"),
         build_dbirth("meter2", points["meter2"], {}, aliases, TS, 2, clock_unsynced=False)),
        (node.topic(MessageType.DDATA, "meter1"),
         stamp_data(records[0].payload, seq=3, ts_ms=TS + 10, device="meter1", aliases=aliases,
                    historical=True, correction_ms=1000)),
        (node.topic(MessageType.DDATA, "meter2"),
         stamp_data(records[1].payload, seq=4, ts_ms=TS + 11, device="meter2", aliases=aliases,
                    historical=False, clock_unsynced=True)),
        (node.topic(MessageType.DDEATH, "meter2"), build_ddeath(TS + 12, 5)),
        (node.topic(MessageType.NDATA), ndata),
        (node.topic(MessageType.NDEATH), build_ndeath(7)),
    ]
    out = run_node(node_modules, {"op": "session", "messages": [
        {"topic": t, "b64": base64.b64encode(b).decode()} for t, b in msgs]})["messages"]
    nbirth, dbirth1, dbirth2, ddata1, ddata2, ddeath, ndata, ndeath = (m["tahu"] for m in out)

    assert nbirth["seq"] == "0" and nbirth["timestamp"] == str(TS)
    nb = {m["name"]: m for m in nbirth["metrics"]}
    assert nb["bdSeq"]["type"] == "Int64" and nb["bdSeq"]["value"] == "7"
    assert nb["Node Control/Rebirth"] == {"name": "Node Control/Rebirth", "type": "Boolean", "value": False,
                                          "timestamp": str(TS)}  # no alias
    assert nb["Properties/Software"]["value"] == "outpost-test"
    assert nb["Outpost/Uptime"]["type"] == "UInt64" and nb["Outpost/Uptime"]["value"] == "5"
    temp = nb["Outpost/System/CPU Temperature"]
    assert temp["type"] == "Float" and temp["value"] is None
    assert nb["Outpost/Link/mqtt"]["value"] is True and "alias" not in nb["Outpost/Link/mqtt"]

    assert dbirth1["seq"] == "1" and dbirth2["seq"] == "2"
    born = {m["name"]: m for m in dbirth1["metrics"]}
    for dt in DATATYPES:
        m = born[f"p_{dt}"]
        assert m["type"] == driver_datatype(dt).name, dt
        assert m["alias"] == str(aliases.alias("meter1", f"p_{dt}")), dt
        assert m["timestamp"] == str(TS + 1)
        assert m["properties"]["readOnly"]["value"] is (dt != "int16")
    assert born["p_int16"]["properties"]["engLow"] == {"type": "Double", "value": -10.0}
    assert born["p_float64"]["properties"]["engUnit"] == {"type": "String", "value": "u"}
    never_read = dbirth2["metrics"][0]
    assert never_read["value"] is None and never_read["properties"]["Quality"]["value"] == 500

    assert out[3]["filled"] == len(DATATYPES) and ddata1["seq"] == "3"
    assert ddata1["timestamp"] == str(TS + 10)
    by_alias = {m["alias"]: m for m in ddata1["metrics"]}
    for dt in DATATYPES:
        m = by_alias[str(aliases.alias("meter1", f"p_{dt}"))]
        assert "name" not in m and m["isHistorical"] is True, dt
        assert m["timestamp"] == str(TS + 1 + 1000), dt   # corrected by the clock sync
        want = values[dt]
        if dt in ("int64", "uint64"):  # 64-bit as strings, as in SCALARS
            want = str(want)
        assert m["value"] == want, dt
    bad, marker = ddata2["metrics"]
    assert "isHistorical" not in bad and bad["value"] is None
    assert bad["properties"]["Quality"]["value"] == 0
    # clock_unsynced: the payload's clock marker, declared in the DBIRTH, flags every metric
    assert "clock_unsynced" not in bad["properties"] and out[4]["filled"] == 2
    assert marker == {"alias": str(aliases.marker("meter2")), "type": "Boolean", "value": True,
                      "timestamp": str(TS + 2)}
    born_marker = dbirth2["metrics"][-1]
    assert (born_marker["name"], born_marker["type"], born_marker["value"]) == (CLOCK_MARKER, "Boolean", False)
    assert born_marker["alias"] == marker["alias"]

    assert ddeath["seq"] == "5" and ddeath["metrics"] == []
    assert out[6]["filled"] == 2 and ndata["seq"] == "6"   # node metrics: datatype by name from NBIRTH
    assert {m["name"]: (m["type"], m["value"]) for m in ndata["metrics"]} == {
        "Outpost/Uptime": ("UInt64", "100"), "Outpost/Link/mqtt": ("Boolean", False)}
    assert "seq" not in ndeath and [(m["name"], m["type"], m["value"]) for m in ndeath["metrics"]] == [
        ("bdSeq", "Int64", "7")]
