"""`outpost probe modbus|serial`: commissioning diagnostics over SSH.

`probe modbus` reads a range of one table from one unit and prints every register with its
value decoded as every type and byte order, so a technician finds the right mapping in one
look; `--scan` lists which unit ids answer on a bus. `probe serial` prints framed lines and
what the configured parser reads from them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    probe = subparsers.add_parser("probe", help="commissioning: read a device directly")
    kinds = probe.add_subparsers(dest="probe_kind", required=True)

    mb = kinds.add_parser("modbus", help="read registers and show every decoding")
    where = mb.add_mutually_exclusive_group(required=True)
    where.add_argument("--host", help="Modbus TCP host")
    where.add_argument("--port", dest="serial_port", help="serial device for Modbus RTU")
    mb.add_argument("--tcp-port", type=int, default=502)
    mb.add_argument("--rtu-over-tcp", action="store_true", help="RTU framing over the TCP socket")
    mb.add_argument("--baudrate", type=int, default=9600)
    mb.add_argument("--parity", choices=["N", "E", "O"], default="N")
    mb.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    mb.add_argument("--unit", type=int, default=1, help="unit id (slave address)")
    mb.add_argument("--table", choices=["holding", "input", "coil", "discrete"], default="holding")
    mb.add_argument("--address", type=int, default=0, help="0-based protocol address")
    mb.add_argument("--count", type=int, default=10)
    mb.add_argument("--timeout", type=float, default=1.0, help="seconds per request")
    mb.add_argument("--scan", nargs="?", const="1-247", metavar="FIRST-LAST",
                    help="find which unit ids answer (default 1-247)")
    mb.add_argument("--json", action="store_true", help="machine-readable output")

    se = kinds.add_parser("serial", help="print framed lines and how the parser reads them")
    se.add_argument("--config", help="outpost config file; probe the serial_line device --device")
    se.add_argument("--device", help="device name in the config")
    se.add_argument("--port", dest="serial_port", help="serial port (without --config)")
    se.add_argument("--baudrate", type=int, default=9600)
    se.add_argument("--terminator", default="\\n")
    se.add_argument("--lines", type=int, default=10, help="stop after this many frames")
    se.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    se.add_argument("--json", action="store_true")
    return probe


async def run(args: argparse.Namespace) -> int:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    if args.probe_kind == "modbus":
        return await _modbus(args)
    return await _serial(args)


# ----- modbus ---------------------------------------------------------------------------

def _bus(args: argparse.Namespace, timeout: float):
    from drivers.modbus.config import RtuBusConfig, RtuOverTcpBusConfig, TcpBusConfig

    t = f"{timeout * 1000:g}ms"
    if args.host:
        cls = RtuOverTcpBusConfig if args.rtu_over_tcp else TcpBusConfig
        transport = "rtu_over_tcp" if args.rtu_over_tcp else "tcp"
        return cls(name="probe", transport=transport, host=args.host, port=args.tcp_port, timeout=t)
    return RtuBusConfig(name="probe", transport="rtu", port=args.serial_port, baudrate=args.baudrate,
                        parity=args.parity, stopbits=args.stopbits, timeout=t)


async def _modbus(args: argparse.Namespace) -> int:
    from drivers.modbus.driver import EXCEPTION_NAMES, make_client

    bus = _bus(args, args.timeout)
    client = make_client(bus)
    if not await client.connect():
        print(f"probe: cannot connect to {bus.endpoint}", file=sys.stderr)
        return EXIT_FAIL
    try:
        if args.scan:
            return await _scan(client, args, bus.endpoint)
        fn = {"holding": client.read_holding_registers, "input": client.read_input_registers,
              "coil": client.read_coils, "discrete": client.read_discrete_inputs}[args.table]
        try:
            resp = await fn(args.address, count=args.count, device_id=args.unit)
        except Exception as exc:
            print(f"probe: unit {args.unit} at {bus.endpoint}: no valid reply: {exc}", file=sys.stderr)
            return EXIT_FAIL
        if resp.isError():
            code = resp.exception_code
            print(f"probe: unit {args.unit} answered exception {code} "
                  f"({EXCEPTION_NAMES.get(code, 'unknown')}) for {args.table} "
                  f"{args.address}+{args.count}", file=sys.stderr)
            return EXIT_FAIL
        if args.table in ("coil", "discrete"):
            rows = [{"address": args.address + i, "value": bool(b)}
                    for i, b in enumerate(resp.bits[: args.count])]
        else:
            rows = registers_table(args.address, list(resp.registers))
        _print_rows(rows, args.json)
        return EXIT_OK
    finally:
        client.close()


def registers_table(start: int, registers: list[int]) -> list[dict[str, Any]]:
    from drivers.modbus.codec import decode_all

    rows = decode_all(registers)
    for row in rows:
        row["address"] = start + row.pop("offset")
    return rows


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        head = f"{row['address']:>5}"
        rest = "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "address")
        print(f"{head}  {rest}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


async def _scan(client, args: argparse.Namespace, endpoint: str) -> int:
    first, _, last = args.scan.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        print(f"probe: --scan expects FIRST-LAST such as 1-247, got {args.scan!r}", file=sys.stderr)
        return EXIT_USAGE
    found = []
    for unit in range(lo, hi + 1):
        try:
            resp = await client.read_holding_registers(args.address, count=1, device_id=unit)
        except Exception:
            continue
        # Any reply, even an exception, proves a unit answers at this id.
        found.append({"unit": unit, "reply": f"exception {resp.exception_code}"
                      if resp.isError() else f"register {args.address} = {resp.registers[0]}"})
    if args.json:
        print(json.dumps(found))
    else:
        for f in found:
            print(f"unit {f['unit']:>3} answers at {endpoint}: {f['reply']}")
        if not found:
            print(f"no unit answered at {endpoint} in {lo}..{hi}")
    return EXIT_OK if found else EXIT_FAIL


# ----- serial ---------------------------------------------------------------------------

async def _serial(args: argparse.Namespace) -> int:
    import serial_asyncio_fast

    from drivers.serial_line.codec import BadLine, Framer, LineParser
    from drivers.serial_line.config import SerialLineDeviceConfig

    if args.config:
        import tomllib

        try:
            text = await asyncio.to_thread(_read_text, args.config)
            data = tomllib.loads(text)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            print(f"probe: cannot read {args.config}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        matches = [d for d in data.get("devices", [])
                   if d.get("driver") == "serial_line" and (not args.device or d.get("name") == args.device)]
        if len(matches) != 1:
            print(f"probe: {args.config}: need exactly one serial_line device"
                  f"{' named ' + repr(args.device) if args.device else ''}, found {len(matches)}",
                  file=sys.stderr)
            return EXIT_USAGE
        cfg = SerialLineDeviceConfig.model_validate(matches[0])
        parser: LineParser | None = LineParser(cfg)
    elif args.serial_port:
        cfg = SerialLineDeviceConfig.model_validate({
            "driver": "serial_line", "name": "probe", "port": args.serial_port,
            "baudrate": args.baudrate, "terminator": args.terminator, "parser": "csv",
            "points": [{"name": "first", "source": 0, "type": "string"}],
        })
        parser = None
    else:
        print("probe serial: give --config (and --device) or --port", file=sys.stderr)
        return EXIT_USAGE
    try:
        reader, writer = await serial_asyncio_fast.open_serial_connection(
            url=cfg.port, baudrate=cfg.baudrate)
    except Exception as exc:
        print(f"probe: cannot open {cfg.port}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    framer = Framer(cfg)
    seen = 0
    deadline = time.monotonic() + args.seconds
    try:
        if cfg.poll_command:
            writer.write(cfg.poll_bytes)
        while seen < args.lines and time.monotonic() < deadline:
            try:
                async with asyncio.timeout(min(1.0, deadline - time.monotonic())):
                    data = await reader.read(4096)
                frames = framer.feed(data)
            except TimeoutError:
                frames = framer.flush()
                if cfg.poll_command:
                    writer.write(cfg.poll_bytes)
            for frame in frames:
                seen += 1
                row: dict[str, Any] = {"line": frame.decode("latin-1")}
                if parser is not None:
                    try:
                        row["values"] = parser.parse(frame)
                    except BadLine as exc:
                        row["error"] = str(exc)
                print(json.dumps(row) if args.json else _serial_text(row))
        if framer.overflows:
            print(f"{framer.overflows} line(s) longer than max_line_length = {cfg.max_line_length}")
    finally:
        writer.close()
    return EXIT_OK if seen else EXIT_FAIL


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _serial_text(row: dict[str, Any]) -> str:
    out = repr(row["line"])
    if "values" in row:
        out += "  ->  " + ", ".join(f"{k}={v!r}" for k, v in row["values"].items())
    if "error" in row:
        out += f"  ->  BAD: {row['error']}"
    return out
