"""`outpost probe modbus --scan` as a technician runs it: a real `outpost` process against an
in-process pymodbus server, units printed as they answer, progress at a terminal, Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pty
import signal
import sys
from pathlib import Path

from drivers.modbus.simserver import SimServer, SimUnit

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
REPO = Path(__file__).resolve().parents[2]


async def start_scan(port: int, *extra: str, stderr: int = asyncio.subprocess.PIPE):
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "probe", "modbus", "--host", "127.0.0.1", "--tcp-port", str(port),
        "--scan", "1-12", "--scan-timeout", "0.25", *extra, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=stderr)


async def servers() -> SimServer:
    units = {2: SimUnit(), 10: SimUnit()}
    units[2].set_range("holding", 0, [1234])
    return await SimServer.tcp(units)


async def test_each_unit_is_printed_as_it_answers_and_ctrl_c_keeps_them() -> None:
    srv = await servers()
    try:
        proc = await start_scan(srv.port)
        first = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert first.decode() == f"unit   2 answers at 127.0.0.1:{srv.port}: register 0 = 1234\n"
        # Units 3..9 are silent (0.25 s each) and 10 comes later: the scan is still running.
        assert proc.returncode is None
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 130
        assert out.decode() == f"interrupted: 1 unit(s) answered so far at 127.0.0.1:{srv.port}: 2\n"
        assert b"Traceback" not in err

        proc = await start_scan(srv.port)                 # and left alone, it finds both
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        assert out.decode().splitlines() == [
            f"unit   2 answers at 127.0.0.1:{srv.port}: register 0 = 1234",
            f"unit  10 answers at 127.0.0.1:{srv.port}: exception 2"]
        # Not a terminal: plain progress lines, a few, not one per unit.
        assert err.decode().splitlines() == ["probe: scanned 10/12 unit ids, 2 found",
                                             "probe: scanned 12/12 unit ids, 2 found"]
    finally:
        await srv.stop()


async def test_progress_line_at_a_terminal() -> None:
    srv = await servers()
    master, slave = pty.openpty()
    try:
        proc = await start_scan(srv.port, "--json", stderr=slave)
        os.close(slave)
        slave = -1
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        assert out.decode().strip() == '[{"unit": 2, "reply": "register 0 = 1234"}, ' \
                                       '{"unit": 10, "reply": "exception 2"}]'
        tty = b""
        with contextlib.suppress(OSError):    # EIO once the other side is closed and drained
            while chunk := os.read(master, 65536):
                tty += chunk
        text = tty.decode()
        assert "\r\x1b[Kscanning unit 1 (1/12), 0 found" in text
        assert "\r\x1b[Kscanning unit 2 (2/12), 1 found" in text
        assert "\r\x1b[Kscanning unit 12 (12/12), 2 found" in text
        assert text.endswith("\r\x1b[K")      # the line is cleared at the end
    finally:
        if slave != -1:
            os.close(slave)
        os.close(master)
        await srv.stop()


async def test_emit_toml_reads_each_point_once_and_says_which_failed(capsys, tmp_path) -> None:
    import argparse
    import tomllib

    from drivers.modbus import codec
    from gateway.cli import probe as probe_cli

    unit = SimUnit()
    unit.set_range("input", 0, codec.encode("float32", 231.5))
    unit.set_range("holding", 30, codec.encode("int16", -425))
    unit.set_range("holding", 100, codec.encode("string", "SN-0042", length=4))
    srv = await SimServer.tcp({5: unit})
    ap = argparse.ArgumentParser(prog="outpost")
    probe_cli.add_parser(ap.add_subparsers(dest="command"))
    try:
        rc = await probe_cli.run(ap.parse_args([
            "probe", "modbus", "--host", "127.0.0.1", "--tcp-port", str(srv.port), "--unit", "5",
            "--timeout", "0.5", "--emit-toml", "--point", "voltage:input:0:float32:unit=V",
            "--point", "speed:holding:30:int16:scale=0.1:unit=Hz",
            "--point", "serial:holding:100:string:length=4",
            "--point", "missing:holding:200:uint16"]))
        out, err = capsys.readouterr()
    finally:
        await srv.stop()
    assert rc == 1 and "1 of 4 point(s) could not be read" in err
    assert "\n# read now: 231.5 V\n" in out
    assert "\n# read now: -42.5 Hz\n" in out
    assert '\n# read now: "SN-0042"\n' in out
    assert "\n# read now: exception 2 (illegal data address)\n" in out
    data = tomllib.loads(out)        # still a whole, valid file
    assert [p["name"] for p in data["devices"][0]["points"]] == ["voltage", "speed", "serial", "missing"]
