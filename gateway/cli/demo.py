"""`make demo`: a simulated site, the real gateway, and its live status on one screen.

What it does:
1. starts a simulated Modbus TCP energy meter (pymodbus, 127.0.0.1:15020) whose voltage and
   current change every second;
2. runs `outpost run` on `deploy/examples/demo.toml` (the meter plus the simulator driver),
   with the SQLite buffer in `.demo/`;
3. points the MQTT and Kafka uplinks at the services of `make services` when that stack is
   running. If it is not, the gateway buffers, and the demo re-points it (a SIGHUP reload)
   as soon as the stack appears, so you see the backlog drain;
4. when the stack runs, it cuts the Kafka link through Toxiproxy for a while, so the buffer
   grows for the Kafka cursor while MQTT keeps flowing, then restores it and the backlog
   drains;
5. prints `outpost status` every two seconds until Ctrl-C (or `--duration`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import struct
import sys
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / ".demo"  # replaced by --state-dir
STACK_STATE = ROOT / ".services" / "stack" / "state.json"
METER_PORT = 15020


def _stack_env() -> dict[str, str] | None:
    try:
        return json.loads(STACK_STATE.read_text())["env"]
    except (OSError, ValueError, KeyError):
        return None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for the demo config: tables, arrays of tables, scalars and lists."""
    out: list[str] = []

    def table(prefix: str, d: dict[str, Any], array: bool) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict) and not _is_table_list(v)}
        out.append(f"[[{prefix}]]" if array else f"[{prefix}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        out.append("")
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v, False)
            elif _is_table_list(v):
                for item in v:
                    table(f"{prefix}.{k}", item, True)

    for key, value in data.items():
        if isinstance(value, dict):
            table(key, value, False)
        elif _is_table_list(value):
            for item in value:
                table(key, item, True)
    return "\n".join(out)


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def write_config(base: Path, env: dict[str, str] | None, meter_port: int = METER_PORT) -> Path:
    data = tomllib.loads(base.read_text())
    for bus in data.get("buses", []):
        if bus.get("port") == METER_PORT:
            bus["port"] = meter_port
    data["gateway"]["data_dir"] = str(DEMO_DIR / "data")
    data["diagnostics"]["socket_path"] = str(DEMO_DIR / "outpost.sock")
    data["diagnostics"].pop("metrics_listen", None)
    if env:
        data["mqtt"]["servers"] = [env["OUTPOST_MQTT_URL"]]
        data["kafka"]["bootstrap_servers"] = [
            env.get("OUTPOST_KAFKA_PROXIED_BOOTSTRAP") or env["OUTPOST_KAFKA_BOOTSTRAP"]
        ]
        # Short timeouts so that the demo's link cut is noticed within seconds.
        data["kafka"]["request_timeout"] = "10s"
        data["kafka"]["reconnect_max"] = "5s"
    out = DEMO_DIR / "demo.toml"
    out.write_text(_dump_toml(data))
    return out


def _toxiproxy(env: dict[str, str], enabled: bool) -> bool:
    api, name = env.get("OUTPOST_TOXIPROXY_API"), env.get("OUTPOST_KAFKA_PROXY_NAME")
    if not api or not name:
        return False
    req = urllib.request.Request(
        f"{api.rstrip('/')}/proxies/{name}",
        data=json.dumps({"enabled": enabled}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=5):
            return True
    except OSError:
        return False


async def _meter(stop: asyncio.Event, port: int) -> None:
    from drivers.modbus.simserver import SimServer, SimUnit

    unit = SimUnit()
    server = await SimServer.tcp({1: unit}, host="127.0.0.1", port=port)
    unit.set_range("coil", 0, [True])
    t0 = time.monotonic()
    try:
        while not stop.is_set():
            t = time.monotonic() - t0
            volts = 230.0 + 4.0 * math.sin(t / 20.0)
            amps = 12.0 + 3.0 * math.sin(t / 7.0)
            unit.set_range("holding", 0, list(struct.unpack(">HH", struct.pack(">f", volts))))
            unit.set_range("holding", 2, list(struct.unpack(">HH", struct.pack(">f", amps))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await server.stop()


def _status_text(sock: Path) -> str:
    from gateway.diagnostics import client

    try:
        return client.render_status(client.fetch_status(str(sock)))
    except Exception as e:
        return f"(gateway starting: {e})"


async def main_async(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    meter = asyncio.create_task(_meter(stop, args.meter_port), name="demo:meter")
    env = None if args.no_services else _stack_env()
    cfg_path = write_config(Path(args.config), env, args.meter_port)
    log = open(DEMO_DIR / "gateway.log", "ab")  # noqa: ASYNC230 - once, before the loop runs anything else
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(cfg_path), stdout=log, stderr=log
    )
    started = time.monotonic()
    cut_at, restore_at = 25.0, 55.0
    link_state = "normal"
    note = ""
    try:
        while not stop.is_set() and proc.returncode is None:
            elapsed = time.monotonic() - started
            if env is None and not args.no_services and (fresh := _stack_env()) is not None:
                env = fresh
                write_config(Path(args.config), env, args.meter_port)
                proc.send_signal(signal.SIGHUP)
                started = time.monotonic()
                note = "`make services` is up: reloaded the gateway (SIGHUP) to point at it; watch the backlog drain"
            elif env is not None and link_state == "normal" and elapsed > cut_at:
                if _toxiproxy(env, enabled=False):
                    link_state = "cut"
                    note = "the demo CUT the Kafka link (Toxiproxy): the kafka cursor's backlog grows, MQTT goes on"
            elif env is not None and link_state == "cut" and elapsed > restore_at:
                _toxiproxy(env, enabled=True)
                link_state = "restored"
                note = "the demo RESTORED the Kafka link: the backlog drains"
            if not args.no_watch:
                print("\033[2J\033[H", end="")
            print(_status_text(DEMO_DIR / "outpost.sock"))
            if env is None:
                print("\nNo services running: the gateway is buffering. Run `make services` in another")
                print("terminal and the demo points the gateway at them.")
            if note:
                print(f"\n>>> {note}")
            print(f"\n(log: {DEMO_DIR / 'gateway.log'}; Ctrl-C stops the demo)", flush=True)
            if args.duration and time.monotonic() - started > args.duration:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
    finally:
        if env is not None and link_state == "cut":
            _toxiproxy(env, enabled=True)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
        stop.set()
        await meter
        log.close()
    return 0 if proc.returncode in (0, None) else 1


def main(argv: list[str] | None = None) -> int:
    global DEMO_DIR
    ap = argparse.ArgumentParser(description="Run the Outpost demo site")
    ap.add_argument("--config", default=str(ROOT / "deploy" / "examples" / "demo.toml"))
    ap.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: until Ctrl-C)")
    ap.add_argument("--no-watch", action="store_true", help="print status blocks instead of redrawing the screen")
    ap.add_argument("--meter-port", type=int, default=METER_PORT, help="TCP port of the simulated meter")
    ap.add_argument("--state-dir", default=str(ROOT / ".demo"), help="buffer, socket and log of the demo gateway")
    ap.add_argument("--no-services", action="store_true", help="ignore a running `make services` stack")
    args = ap.parse_args(argv)
    DEMO_DIR = Path(args.state_dir).resolve()
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
