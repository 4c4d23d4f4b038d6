"""`outpost probe modbus` against an in-process server: every decoding, and a unit scan."""

import argparse
import json
import logging

from drivers.modbus import codec
from drivers.modbus.simserver import SimServer, SimUnit
from gateway.cli import probe as probe_cli

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


def parse(*argv):
    ap = argparse.ArgumentParser(prog="outpost")
    probe_cli.add_parser(ap.add_subparsers(dest="command"))
    return ap.parse_args(["probe", *argv])


async def test_probe_prints_every_type_and_byte_order(capsys):
    unit = SimUnit()
    unit.set_range("holding", 100, [*codec.encode("float32", 230.25, "CDAB"), 0x4142, 0, 0, 0])
    srv = await SimServer.tcp({1: unit, 7: SimUnit()})
    try:
        rc = await probe_cli.run(parse("modbus", "--host", "127.0.0.1", "--tcp-port", str(srv.port),
                                       "--address", "100", "--count", "6", "--json"))
        rows = json.loads(capsys.readouterr().out)
        assert rc == 0
        assert rows[0]["address"] == 100 and rows[0]["float32_CDAB"] == 230.25
        assert rows[2]["ascii"] == "AB" and rows[2]["uint16"] == 0x4142
        assert "float64_DCBA" in rows[0] and "float64_DCBA" not in rows[3]

        rc = await probe_cli.run(parse("modbus", "--host", "127.0.0.1", "--tcp-port", str(srv.port),
                                       "--address", "500", "--count", "2"))
        assert rc == 1 and "exception 2" in capsys.readouterr().err

        rc = await probe_cli.run(parse("modbus", "--host", "127.0.0.1", "--tcp-port", str(srv.port),
                                       "--scan", "1-8", "--timeout", "0.2", "--json"))
        found = json.loads(capsys.readouterr().out)
        assert rc == 0
        assert [f["unit"] for f in found] == [1, 7]
        assert found[1]["reply"] == "exception 2"   # answers, but has no register 0
    finally:
        await srv.stop()
