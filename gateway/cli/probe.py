"""`outpost probe modbus|serial`: commissioning diagnostics over SSH.

`probe modbus` reads a range of one table from one unit and prints every register with its
value decoded as every type and byte order, so a technician finds the right mapping in one
look; `--scan` lists which unit ids answer on a bus, each as it answers; `--emit-toml`
prints the `[[buses]]`/`[[devices]]`/`[[devices.points]]` blocks for the registers chosen
(or a device template), read once from the device. `probe serial` prints framed lines and
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
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    probe = subparsers.add_parser("probe", help="commissioning: read a device directly")
    kinds = probe.add_subparsers(dest="probe_kind", required=True)

    mb = kinds.add_parser("modbus", help="read registers and show every decoding",
                          description="Read registers from one unit and show every decoding; "
                          "--scan finds unit ids; --emit-toml prints configuration blocks.")
    where = mb.add_mutually_exclusive_group()
    where.add_argument("--host", help="Modbus TCP host (or serial-device server with --rtu-over-tcp)")
    where.add_argument("--port", dest="serial_port", help="serial device for Modbus RTU, e.g. /dev/ttyUSB0")
    mb.add_argument("--tcp-port", type=int, default=502, help="TCP port with --host (default 502)")
    mb.add_argument("--rtu-over-tcp", action="store_true", help="RTU framing over the TCP socket")
    mb.add_argument("--baudrate", type=int, default=9600, help="serial speed with --port (default 9600)")
    mb.add_argument("--parity", choices=["N", "E", "O"], default="N", help="serial parity (default N)")
    mb.add_argument("--stopbits", type=int, choices=[1, 2], default=1, help="serial stop bits (default 1)")
    mb.add_argument("--unit", type=int, default=1, help="unit id (slave address, default 1)")
    mb.add_argument("--table", choices=["holding", "input", "coil", "discrete"], default="holding",
                    help="which table to read (default holding)")
    mb.add_argument("--address", type=int, default=0, help="0-based protocol address (default 0)")
    mb.add_argument("--count", type=int, default=10, help="registers or bits to read (default 10)")
    mb.add_argument("--timeout", type=float, default=1.0, help="seconds per request (default 1)")
    mb.add_argument("--scan", nargs="?", const="1-247", metavar="FIRST-LAST",
                    help="find which unit ids answer (default 1-247); each is printed as it answers")
    mb.add_argument("--scan-timeout", type=float, metavar="SECONDS",
                    help="seconds to wait for each unit id during --scan (default --timeout); "
                    "0.2 scans 247 ids in under a minute where devices answer fast")
    mb.add_argument("--json", action="store_true", help="machine-readable output")
    em = mb.add_argument_group("configuration output (--emit-toml)")
    em.add_argument("--emit-toml", action="store_true",
                    help="print [[buses]]/[[devices]]/[[devices.points]] blocks for --point/--template, "
                    "for the main file or a conf.d/ drop-in")
    em.add_argument("--point", action="append", metavar="NAME:TABLE:ADDRESS[:TYPE][:key=value...]",
                    help="a register to include (repeatable), e.g. voltage:input:0:float32:unit=V or "
                    "speed:holding:30:int16:scale=0.1; keys are those of [[devices.points]]")
    em.add_argument("--template", metavar="NAME|FILE",
                    help="start from a device template (see --list-templates), e.g. eastron-sdm630")
    em.add_argument("--list-templates", action="store_true", help="list the device templates and exit")
    em.add_argument("--device-name", help="the device's name (Sparkplug device id; default from the "
                    "template, else unitN)")
    em.add_argument("--bus", metavar="NAME", help="name of a bus already in the configuration: "
                    "print only the device (no [[buses]] block; --host/--port then only for reading)")
    em.add_argument("--byte-order", choices=["ABCD", "DCBA", "BADC", "CDAB"],
                    help="the device's byte order for 32/64-bit values (default: template's, else ABCD)")
    em.add_argument("--no-read", action="store_true",
                    help="do not read the points from the device (prepare a configuration offline)")

    se = kinds.add_parser("serial", help="print framed lines and how the parser reads them")
    se.add_argument("--config", help="outpost config file; probe the serial_line device --device")
    se.add_argument("--device", help="device name in the config")
    se.add_argument("--port", dest="serial_port", help="serial port (without --config)")
    se.add_argument("--baudrate", type=int, default=9600, help="serial speed (default 9600)")
    se.add_argument("--terminator", default="\\n", help="end of a frame, with escapes (default \\n)")
    se.add_argument("--lines", type=int, default=10, help="stop after this many frames")
    se.add_argument("--seconds", type=float, default=30.0, help="stop after this long")
    se.add_argument("--json", action="store_true", help="one JSON object per frame")
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

    if args.list_templates or args.emit_toml:
        return await _emit(args)
    if not (args.host or args.serial_port):
        print("probe modbus: give --host (Modbus TCP) or --port (Modbus RTU)", file=sys.stderr)
        return EXIT_USAGE
    timeout = args.scan_timeout if args.scan and args.scan_timeout else args.timeout
    bus = _bus(args, timeout)
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


class _ScanProgress:
    """The scan's progress on stderr: one line rewritten in place at a terminal; otherwise a
    plain line at each tenth of the range, so a log or a pipe gets a few lines, not 247."""

    def __init__(self, lo: int, hi: int, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.lo, self.total = lo, hi - lo + 1
        self.step = max(10, self.total // 10)
        self.shown = False

    def update(self, unit: int, found: int) -> None:
        done = unit - self.lo + 1
        if self.tty:
            self.stream.write(f"\r\033[Kscanning unit {unit} ({done}/{self.total}), {found} found")
            self.stream.flush()
            self.shown = True
        elif done % self.step == 0 or done == self.total:
            print(f"probe: scanned {done}/{self.total} unit ids, {found} found",
                  file=self.stream, flush=True)

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


async def _scan(client, args: argparse.Namespace, endpoint: str) -> int:
    first, _, last = args.scan.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        print(f"probe: --scan expects FIRST-LAST such as 1-247, got {args.scan!r}", file=sys.stderr)
        return EXIT_USAGE
    if not 0 <= lo <= hi <= 255:
        print(f"probe: --scan {args.scan!r}: unit ids are 0..255 (1..247 for devices), FIRST <= LAST",
              file=sys.stderr)
        return EXIT_USAGE
    found: list[dict[str, Any]] = []
    progress = _ScanProgress(lo, hi)
    interrupted = False
    try:
        for unit in range(lo, hi + 1):
            try:
                resp = await client.read_holding_registers(args.address, count=1, device_id=unit)
            except Exception:
                progress.update(unit, len(found))
                continue
            # Any reply, even an exception, proves a unit answers at this id.
            f = {"unit": unit, "reply": f"exception {resp.exception_code}"
                 if resp.isError() else f"register {args.address} = {resp.registers[0]}"}
            found.append(f)
            if not args.json:
                progress.clear()
                print(f"unit {unit:>3} answers at {endpoint}: {f['reply']}", flush=True)
            progress.update(unit, len(found))
    except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C: asyncio.run cancels us
        interrupted = True
    progress.clear()
    if args.json:
        print(json.dumps(found), flush=True)
    elif interrupted:
        units = ", ".join(str(f["unit"]) for f in found) or "none"
        print(f"interrupted: {len(found)} unit(s) answered so far at {endpoint}: {units}", flush=True)
    elif not found:
        print(f"no unit answered at {endpoint} in {lo}..{hi}")
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if found else EXIT_FAIL


# ----- emit-toml ------------------------------------------------------------------------

def _bus_table(args: argparse.Namespace, name: str) -> dict[str, Any]:
    t = f"{args.timeout * 1000:g}ms"
    if args.host:
        return {"name": name, "transport": "rtu_over_tcp" if args.rtu_over_tcp else "tcp",
                "host": args.host, "port": args.tcp_port, "timeout": t}
    return {"name": name, "transport": "rtu", "port": args.serial_port, "baudrate": args.baudrate,
            "parity": args.parity, "stopbits": args.stopbits, "timeout": t}


def _bus_name(args: argparse.Namespace) -> str:
    import re

    if args.host:
        return "modbus-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", args.host)
    return "rs485-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", args.serial_port.rsplit("/", 1)[-1])


async def _emit(args: argparse.Namespace) -> int:
    from gateway.cli import commission as cm

    if args.list_templates:
        for name, (path, what) in sorted(cm.list_templates().items()):
            print(f"{name:<20} {what}  ({path})")
        return EXIT_OK
    if not (args.host or args.serial_port or args.bus):
        print("probe modbus --emit-toml: give --host or --port (the bus to read and to write into "
              "the configuration), or --bus NAME for a bus the configuration already has",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        template, tpath = cm.load_template(args.template) if args.template else (None, None)
        points = [cm.parse_point_spec(spec) for spec in args.point or []]
        bus_name = args.bus or _bus_name(args)
        tname = template.get("name") if template else None
        name = args.device_name or (f"{tname}-{args.unit}" if tname else f"unit{args.unit}")
        device = cm.build_device(name=name, bus=bus_name, unit_id=args.unit, template=template,
                                 points=points, overrides={"byte_order": args.byte_order})
        bus = None if args.bus else _bus_table(args, bus_name)
        if bus is not None:
            _check_bus(bus)
    except cm.EmitError as exc:
        print(f"probe modbus --emit-toml: {exc}", file=sys.stderr)
        return EXIT_USAGE
    readings: dict[str, str] = {}
    failed = 0
    if not args.no_read and (args.host or args.serial_port):
        readings, failed = await _read_points(args, device)
    header = [f"Written by `outpost probe modbus --emit-toml` for unit {args.unit}"
              + (f" from template {tpath.stem}" if tpath else "") + "."]
    if tpath:
        header += ["", *_template_notes(tpath)]
    print(cm.render_toml(device, bus, header, readings), end="", flush=True)
    if failed:
        print(f"probe modbus --emit-toml: {failed} of {len(device['points'])} point(s) could not be "
              "read from the device (see the `# read now` comments); the configuration above is "
              "valid but check the addresses, types and unit id", file=sys.stderr)
        return EXIT_FAIL
    return EXIT_OK


def _check_bus(bus: dict[str, Any]) -> None:
    from pydantic import TypeAdapter

    from drivers.modbus.config import ModbusBusConfig
    from gateway.cli.commission import EmitError

    try:
        TypeAdapter(ModbusBusConfig).validate_python(bus)
    except ValueError as exc:
        raise EmitError(f"bus {bus['name']!r}: {exc}") from None


def _template_notes(path: Any) -> list[str]:
    notes = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if not text.startswith("Fill in with:"):
            notes.append(text)
    return notes


async def _read_points(args: argparse.Namespace, device_table: dict[str, Any]) -> tuple[dict[str, str], int]:
    """Read every point once, as the driver would decode it: name -> text for a comment."""
    from drivers.modbus import codec
    from drivers.modbus.config import ModbusDeviceConfig
    from drivers.modbus.driver import EXCEPTION_NAMES, make_client

    device = ModbusDeviceConfig.model_validate(device_table)
    bus = _bus(args, args.timeout)
    client = make_client(bus)
    out: dict[str, str] = {}
    failed = 0
    if not await client.connect():
        print(f"probe: cannot connect to {bus.endpoint}; points not read", file=sys.stderr)
        return {p.name: "not read (no connection)" for p in device.points}, len(device.points)
    try:
        for p in device.points:
            fn = {"holding": client.read_holding_registers, "input": client.read_input_registers,
                  "coil": client.read_coils, "discrete": client.read_discrete_inputs}[p.table]
            try:
                resp = await fn(device.protocol_address(p), count=p.register_count,
                                device_id=device.unit_id)
            except Exception as exc:
                out[p.name], failed = f"no reply ({exc})", failed + 1
                continue
            if resp.isError():
                code = resp.exception_code
                out[p.name], failed = f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')})", failed + 1
                continue
            try:
                if p.table in ("coil", "discrete"):
                    value: Any = bool(resp.bits[0])
                else:
                    value = codec.decode(p.type or "uint16", list(resp.registers[: p.register_count]),
                                         p.byte_order or device.byte_order, bit=p.bit,
                                         encoding=p.encoding, strip=p.strip)
                    if p.type not in ("bool", "string"):
                        value = value * p.scale + p.offset
            except codec.CodecError as exc:
                out[p.name], failed = f"cannot decode ({exc})", failed + 1
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = json.dumps(value, ensure_ascii=False)   # one line, whatever it holds
            else:
                text = _fmt(value)
            out[p.name] = f"{text} {p.unit}".rstrip()
    finally:
        client.close()
    return out, failed


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
