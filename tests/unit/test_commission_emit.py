"""`outpost probe modbus --emit-toml`: the TOML it prints goes through the real config loader
(the one `outpost check` and `outpost run` use) as a main file and as a conf.d drop-in."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import commission as cm
from gateway.cli import probe as probe_cli
from gateway.config_build import load_checked

MAIN = """
[gateway]
group_id = "plant"
edge_node_id = "gw"
data_dir = "{data}"
"""
TEMPLATES = sorted(cm.list_templates())


def parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="outpost")
    probe_cli.add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["probe", *argv])


async def emit(capsys, *argv: str) -> tuple[int, str, str]:
    rc = await probe_cli.run(parse("modbus", *argv))
    out, err = capsys.readouterr()
    return rc, out, err


def check(tmp_path: Path, text: str, *, drop_in: bool, main_extra: str = "") -> object:
    main = tmp_path / "outpost.toml"
    body = MAIN.format(data=tmp_path / "data") + main_extra
    if drop_in:
        (tmp_path / "conf.d").mkdir(exist_ok=True)
        (tmp_path / "conf.d" / "50-device.toml").write_text(text)
    else:
        body += "\n" + text
    main.write_text(body)
    res = load_checked(main, secrets=False)
    assert res.ok, "\n".join(res.problems) + "\n---\n" + text
    return res.config


def test_the_library_has_the_meters_the_field_asks_for() -> None:
    assert {"eastron-sdm630", "eastron-sdm120", "generic-vfd"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
async def test_every_template_emits_a_configuration_the_loader_accepts(name, tmp_path, capsys) -> None:
    rc, out, err = await emit(capsys, "--port", "/dev/serial/by-id/usb-FTDI-if00-port0", "--baudrate",
                              "19200", "--parity", "E", "--unit", "17", "--emit-toml", "--template",
                              name, "--no-read")
    assert rc == 0, err
    cfg = check(tmp_path, out, drop_in=True)
    (dev,) = cfg.devices
    (bus,) = cfg.buses
    assert dev.unit_id == 17 and dev.bus == bus.name and dev.name == f"{name.split('-')[-1]}-17"
    assert (bus.transport, bus.port, bus.baudrate, bus.parity) == \
        ("rtu", "/dev/serial/by-id/usb-FTDI-if00-port0", 19200, "E")
    template, _ = cm.load_template(name)
    assert [p.name for p in dev.points] == [p["name"] for p in template["points"]]
    assert [p.address for p in dev.points] == [p["address"] for p in template["points"]]
    assert out.startswith("# Written by `outpost probe modbus --emit-toml` for unit 17 from template")


async def test_points_from_the_command_line_over_tcp(tmp_path, capsys) -> None:
    rc, out, err = await emit(
        capsys, "--host", "10.0.0.5", "--tcp-port", "5020", "--unit", "3", "--emit-toml", "--no-read",
        "--device-name", "pump,\"one\"", "--byte-order", "CDAB",
        "--point", "voltage:input:0:float32:unit=V:deadband=0.5",
        "--point", "speed:holding:0x1E:int16:scale=0.1:unit=Hz:writable=true",
        "--point", "alarm:holding:20:bool:bit=3",
        "--point", "serial:holding:100:string:length=8",
        "--point", "label:holding:200:uint16:unit=1")   # a unit that looks like a number stays text
    assert rc == 0, err
    cfg = check(tmp_path, out, drop_in=False)
    (dev,) = cfg.devices
    assert dev.name == 'pump,"one"' and dev.byte_order == "CDAB" and dev.unit_id == 3
    p = {x.name: x for x in dev.points}
    assert (p["voltage"].table, p["voltage"].type, p["voltage"].unit, p["voltage"].deadband) == \
        ("input", "float32", "V", 0.5)
    assert (p["speed"].address, p["speed"].scale, p["speed"].writable) == (30, 0.1, True)
    assert (p["alarm"].bit, p["serial"].length, p["label"].unit) == (3, 8, "1")
    assert (cfg.buses[0].transport, cfg.buses[0].host, cfg.buses[0].port) == ("tcp", "10.0.0.5", 5020)


async def test_a_point_replaces_the_template_point_of_the_same_name(tmp_path, capsys) -> None:
    rc, out, _ = await emit(capsys, "--port", "/dev/ttyUSB0", "--emit-toml", "--no-read", "--template",
                            "generic-vfd", "--point", "fault_code:holding:9000:uint16",
                            "--point", "extra:input:5")
    assert rc == 0
    dev = check(tmp_path, out, drop_in=True).devices[0]
    names = [x.name for x in dev.points]
    assert names.count("fault_code") == 1 and names[-1] == "extra"
    assert next(x.address for x in dev.points if x.name == "fault_code") == 9000


async def test_an_existing_bus_gets_only_the_device(tmp_path, capsys) -> None:
    rc, out, _ = await emit(capsys, "--emit-toml", "--bus", "rs485-a", "--unit", "4",
                            "--template", "eastron-sdm120")
    assert rc == 0
    assert "[[buses]]" not in out and "# read now" not in out   # nothing to read without a port
    bus = '\n[[buses]]\nname = "rs485-a"\ntransport = "rtu"\nport = "/dev/ttyAMA0"\n'
    cfg = check(tmp_path, out, drop_in=True, main_extra=bus)
    assert cfg.devices[0].bus == "rs485-a"


@pytest.mark.parametrize(("argv", "says"), [
    (["--point", "v:coil:0:float32"], "--point 'v:coil:0:float32'"),
    (["--point", "v:input"], "expected NAME:TABLE:ADDRESS"),
    (["--point", "v:input:zero"], "address 'zero' is not a number"),
    (["--point", "v:input:0:float32:scale"], "'scale' is not key=value"),
    (["--point", "v:input:0:float32:colour=red"], "colour"),
    (["--point", "a:input:0", "--point", "a:input:1"], "duplicate point name"),
    (["--template", "no-such-meter"], "no such template"),
    ([], "needs registers"),
])
async def test_bad_choices_are_refused_naming_what(argv, says, capsys) -> None:
    rc, out, err = await emit(capsys, "--port", "/dev/ttyUSB0", "--emit-toml", "--no-read", *argv)
    assert rc == 2 and out == "" and says in err, err


async def test_emit_needs_a_bus(capsys) -> None:
    rc, _, err = await emit(capsys, "--emit-toml", "--point", "v:input:0")
    assert rc == 2 and "--bus NAME" in err


async def test_list_templates(capsys) -> None:
    rc, out, _ = await emit(capsys, "--list-templates")
    assert rc == 0 and "eastron-sdm630" in out and "Eastron SDM630" in out


@given(st.text())
def test_any_string_survives_toml(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return   # lone surrogates: not text a file can hold
    assert tomllib.loads(f"k = {cm.toml_scalar(s)}")["k"] == s


@given(st.floats(allow_nan=False) | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.booleans())
def test_any_number_survives_toml(v) -> None:
    assert tomllib.loads(f"k = {cm.toml_scalar(v)}")["k"] == v


def test_templates_are_found_where_the_installer_puts_them(tmp_path, monkeypatch) -> None:
    # deploy/install.sh: the venv in PREFIX/venv, the templates in PREFIX/templates.
    (tmp_path / "templates").mkdir()
    src = Path(cm.list_templates()["generic-vfd"][0]).read_text()
    (tmp_path / "templates" / "site-pump.toml").write_text(src.replace("Generic", "Site"))
    (tmp_path / "override").mkdir()
    (tmp_path / "override" / "generic-vfd.toml").write_text(src.replace("Generic", "Overridden"))
    monkeypatch.setattr("sys.prefix", str(tmp_path / "venv"))
    monkeypatch.setenv(cm.TEMPLATE_DIR_ENV, str(tmp_path / "override"))
    found = cm.list_templates()
    assert found["site-pump"][0] == tmp_path / "templates" / "site-pump.toml"
    assert found["generic-vfd"][1].startswith("Overridden")     # the environment's comes first
    assert "eastron-sdm630" in found                             # and the checkout's still count
