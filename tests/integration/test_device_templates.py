"""Every device template in deploy/templates/, as a technician would use it, end to end.

A pymodbus server serves each meter's register map, written out in this test from the
maker's documentation (one unit per template) and holding known values. For each template,
`outpost probe modbus --emit-toml --template NAME` (a real process) reads the device and
prints the configuration; the texts go into conf.d/ as
drop-ins; `outpost check` accepts them as they are; `outpost run` (a real process) reads the
devices and publishes Sparkplug B to a real Mosquitto, where a subscriber decodes DBIRTH and
DDATA and finds every point of every template with the value the server holds; and
`outpost buffer export --format csv --cursor kafka`, run beside the live gateway, reads the
same values back from the buffer (the Kafka uplink points at a closed port, so every record
waits there).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simserver import SimServer, SimUnit
from gateway.cli import commission as cm
from tests.harness.common import until
from tests.harness.gateway import GatewayProcess
from tests.integration.test_sparkplug_session import TestHost

pytestmark = pytest.mark.integration
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
REPO = Path(__file__).resolve().parents[2]

# Each meter's register map as its maker documents it, written out here independently of
# the templates, so a template with a wrong address, type or scale fails this test:
# point -> (table, 0-based address, type as stored, what the registers hold, scale).
# float32 values are exact in float32.
REGISTER_MAPS: dict[str, dict[str, tuple[str, int, str, Any, float]]] = {
    "eastron-sdm630": {   # Eastron SDM630 Modbus protocol: input registers 30001.. (3xxxx - 30001)
        "voltage_l1": ("input", 0x00, "float32", 231.5, 1), "voltage_l2": ("input", 0x02, "float32", 229.25, 1),
        "voltage_l3": ("input", 0x04, "float32", 232.75, 1), "current_l1": ("input", 0x06, "float32", 5.5, 1),
        "current_l2": ("input", 0x08, "float32", 4.25, 1), "current_l3": ("input", 0x0A, "float32", 6.125, 1),
        "power_l1": ("input", 0x0C, "float32", 1250.5, 1), "power_l2": ("input", 0x0E, "float32", 980.25, 1),
        "power_l3": ("input", 0x10, "float32", 1420.0, 1), "power_total": ("input", 0x34, "float32", 3650.75, 1),
        "power_factor": ("input", 0x3E, "float32", 0.96875, 1), "frequency": ("input", 0x46, "float32", 49.96875, 1),
        "energy_import": ("input", 0x48, "float32", 12345.5, 1),
        "energy_export": ("input", 0x4A, "float32", 12.25, 1),
        "energy_total": ("input", 0x156, "float32", 12357.75, 1),
    },
    "eastron-sdm120": {   # Eastron SDM120 Modbus protocol
        "voltage": ("input", 0x00, "float32", 230.5, 1), "current": ("input", 0x06, "float32", 3.25, 1),
        "power": ("input", 0x0C, "float32", 740.5, 1), "apparent_power": ("input", 0x12, "float32", 749.25, 1),
        "reactive_power": ("input", 0x18, "float32", -112.5, 1),
        "power_factor": ("input", 0x1E, "float32", 0.984375, 1),
        "frequency": ("input", 0x46, "float32", 50.03125, 1), "energy_import": ("input", 0x48, "float32", 4321.25, 1),
        "energy_export": ("input", 0x4A, "float32", 0.5, 1),
        "energy_total": ("input", 0x156, "float32", 4321.75, 1),
    },
    "generic-vfd": {      # the status block at 0x2100 the template documents
        "status_word": ("holding", 0x2100, "uint16", 0x0025, 1),   # bit 0 (running) set
        "fault_code": ("holding", 0x2101, "uint16", 17, 1),
        "output_frequency": ("holding", 0x2103, "int16", -4250, 0.01),
        "output_current": ("holding", 0x2104, "uint16", 123, 0.1),
        "dc_bus_voltage": ("holding", 0x2105, "uint16", 5402, 0.1),
    },
}
DERIVED = {"generic-vfd": {"running": True}}     # points read from another point's register


def expected_values(name: str) -> dict[str, Any]:
    out = {point: raw * scale for point, (_t, _a, _ty, raw, scale) in REGISTER_MAPS[name].items()}
    return {**out, **DERIVED.get(name, {})}


VALUES = {name: expected_values(name) for name in REGISTER_MAPS}


def serve(name: str) -> SimUnit:
    unit = SimUnit()
    for table, address, value_type, raw, _scale in REGISTER_MAPS[name].values():
        unit.set_value(table, address, value_type, raw)
    return unit


async def outpost(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *argv, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


def readings_in(text: str) -> dict[str, float | str]:
    """point name -> the value in its `# read now:` comment."""
    out: dict[str, float | str] = {}
    for block in text.split("[[devices.points]]")[1:]:
        name = re.search(r'^name = "(.*)"$', block, re.M).group(1)
        read = re.search(r"^# read now: (\S+)", block, re.M)
        if read:
            try:
                out[name] = float(read.group(1))
            except ValueError:
                out[name] = read.group(1)
    return out


def same(got: Any, want: Any, rel: float = 1e-9) -> bool:
    if isinstance(want, bool | str) or isinstance(got, bool | str):
        return got == want and type(got) is type(want)
    return got == pytest.approx(want, rel=rel)


async def test_every_template_reads_its_meter_through_outpost_run(mosquitto, tmp_path: Path) -> None:
    templates = sorted(cm.list_templates())
    assert set(templates) == set(VALUES), "a template without values to serve in this test"
    units = {unit_id: serve(name) for unit_id, name in enumerate(templates, start=1)}
    for name in templates:
        table, _ = cm.load_template(name)
        assert set(VALUES[name]) == {p["name"] for p in table["points"]}, name
    sim = await SimServer.tcp(units)
    group = f"tpl-{uuid.uuid4().hex[:6]}"
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    main = tmp_path / "outpost.toml"
    main.write_text(f"""
[gateway]
group_id = "{group}"
edge_node_id = "gw"
data_dir = "{tmp_path / "data"}"

[mqtt]
servers = ["{mosquitto.url}"]
client_id = "outpost-{group}"
reconnect_min = "200ms"
reconnect_max = "1s"

# Nothing listens here: every record waits in the buffer for Kafka, for the export to read.
[kafka]
bootstrap_servers = ["127.0.0.1:1"]
[[kafka.mappings]]
mqtt_topic_filters = ["spBv1.0/{group}/DDATA/#"]
kafka_topic = "plant.telemetry"
format = "json"

[diagnostics]
socket_path = "{tmp_path / "outpost.sock"}"
""")
    host = gateway = None
    try:
        names: dict[str, str] = {}
        for unit_id, name in enumerate(templates, start=1):
            # The first brings the bus; the others join it by name.
            bus = [] if unit_id == 1 else ["--bus", "modbus-127.0.0.1"]
            rc, text, err = await outpost("probe", "modbus", "--host", "127.0.0.1", "--tcp-port",
                                          str(sim.port), "--unit", str(unit_id), "--emit-toml",
                                          "--template", name, *bus)
            assert rc == 0, f"{name}: {err}\n{text}"
            assert ("[[buses]]" in text) == (unit_id == 1)
            read = readings_in(text)
            for point, want in VALUES[name].items():
                want = str(want).lower() if isinstance(want, bool) else want
                assert same(read.get(point), want, rel=1e-5), \
                    f"{name}.{point}: read {read.get(point)}, serves {want}"
            names[name] = re.search(r'^\[\[devices\]\]\ndriver = "modbus"\nname = "(.*)"$', text,
                                    re.M).group(1)
            (conf_d / f"{unit_id:02d}-{name}.toml").write_text(text)

        rc, out, err = await outpost("check", "--config", str(main))
        assert rc == 0, err
        assert f"{len(templates)} device(s)" in out and f"{sum(map(len, VALUES.values()))} point(s)" in out

        host = await TestHost(mosquitto.host, mosquitto.port).start(online=None)
        gateway = GatewayProcess(main, tmp_path / "gateway.log")
        gateway.start()

        def published() -> dict[str, dict[str, Any]]:
            """device -> metric name -> the newest value seen on the broker."""
            seen: dict[str, dict[str, Any]] = {}
            aliases: dict[tuple[str, int], str] = {}
            for s in host.of_type("DBIRTH", "DDATA"):
                if s.parsed is None or s.parsed.group_id != group or s.payload is None:
                    continue
                dev = s.parsed.device_id
                for m in s.payload.metrics:
                    if m.name is not None and m.alias is not None:
                        aliases[dev, m.alias] = m.name
                    metric = m.name if m.name is not None else aliases.get((dev, m.alias))
                    if metric is not None and m.value is not None:
                        seen.setdefault(dev, {})[metric] = m.value
            return seen

        def all_values_arrived() -> bool:
            seen = published()
            return all(set(VALUES[t]) <= set(seen.get(names[t], {})) for t in templates)

        await until(all_values_arrived, 60, "every template's values on the broker", interval_s=0.3)
        seen = published()
        for t in templates:
            for point, want in VALUES[t].items():
                got = seen[names[t]][point]
                assert same(got, want), f"{t}.{point}: {got!r} on the broker, the meter holds {want!r}"

        # The same values, decoded from the live buffer beside the running gateway: what
        # waits for the (unreachable) Kafka.
        rc, out, err = await outpost("buffer", "--config", str(main), "export", "--format", "csv",
                                     "--cursor", "kafka")
        assert rc == 0, err
        rows = list(csv.DictReader(io.StringIO(out, newline="")))
        exported = {(r["device"], r["metric"]): r for r in rows}
        for t in templates:
            for point, want in VALUES[t].items():
                r = exported[names[t], point]
                assert r["quality"] == "GOOD" and r["time"].endswith("Z")
                got = r["value"] == "true" if isinstance(want, bool) else float(r["value"])
                assert same(got, want), \
                    f"{t}.{point}: {r['value']} in the export, the meter holds {want!r}"
    finally:
        if gateway is not None:
            assert await gateway.stop() == 0
        if host is not None:
            await host.stop()
        await sim.stop()
