"""The `outpost` command: what a technician types over SSH.

    outpost check   [--config PATH]         validate the configuration, print a summary
    outpost run     [--config PATH]         run the gateway (systemd starts this)
    outpost status  [--json] [--watch]      live state of links, buffer and devices
    outpost tail    [--device D] [--point P] live samples
    outpost doctor  [--config PATH]         what is wrong, with a hint for each
    outpost probe   modbus|serial ...       commissioning without a config
    outpost buffer  stats|export|purge      look into the store-and-forward buffer

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.
Subcommands import their modules lazily so that `outpost check` stays fast on a Pi.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway.config import DEFAULT_CONFIG_PATH, load_config
from gateway.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def outpost_version() -> str:
    from gateway.version import __version__

    return __version__


def _default_config() -> str:
    return os.environ.get("OUTPOST_CONFIG", DEFAULT_CONFIG_PATH)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help=f"configuration file (default {DEFAULT_CONFIG_PATH})")


def _socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return args.socket
    cfg_path = getattr(args, "config", None) or _default_config()
    try:
        return load_config(cfg_path).diagnostics.socket_path
    except ConfigError:
        return "/run/outpost/outpost.sock"


# --- check -------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    paths = args.paths or [args.config or _default_config()]
    worst = EXIT_OK
    from gateway.config_build import load_checked  # builds what `outpost run` builds, without I/O

    if args.schema:
        from gateway.config import json_schema

        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    for path in paths:
        res = load_checked(path, secrets=args.secrets)
        if not res.ok or res.config is None:
            print(str(ConfigError(path, res.problems)), file=sys.stderr)
            worst = EXIT_CONFIG
            continue
        cfg = res.config
        s = cfg.summary()
        uplinks = ", ".join(s["uplinks"]) or "none (buffering only)"
        print(
            f"{path}: ok - gateway {s['gateway']}, {s['buses']} bus(es), {s['devices']} device(s), "
            f"{s['points']} point(s), uplinks: {uplinks}, {s['mappings']} Kafka mapping(s), "
            f"{s['inbound']} inbound mapping(s)"
        )
        for f in res.files[1:]:
            print(f"{path}: merged drop-in {f}")
        for w in res.warnings:
            print(f"{path}: warning: {w}")
        lost = _removal_cost(cfg)
        if lost:
            print(f"{path}: warning: this configuration no longer has uplink(s) {', '.join(lost[1])}: "
                  f"running it (or reloading to it) drops their {lost[0]} undelivered record(s) from "
                  f"the buffer (counted as dropped, reason uplink_removed)")
    return worst


def _removal_cost(cfg: Any) -> tuple[int, list[str]] | None:
    """What removing uplinks costs the existing buffer: (records dropped, cursors removed)."""
    path = Path(cfg.gateway.data_dir) / "buffer.db"
    if not path.exists():
        return None
    from buffer import BufferError
    from buffer import diagnostics as bd

    keep = [name for name, sec in (("mqtt", cfg.mqtt), ("kafka", cfg.kafka)) if sec is not None]
    try:
        cursors = set(bd.stats_for_path(str(path)).get("cursors", {}))
        n = bd.uplink_removal_cost(str(path), keep)
    except (BufferError, OSError):
        return None  # `outpost doctor` and `outpost buffer stats` say what is wrong with it
    gone = sorted(cursors - set(keep))
    return (n, gone) if gone and n else None


# --- run ---------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    path = args.config or _default_config()
    from gateway.config_build import load_checked

    # The same gate as `outpost check`: a file it accepts is a file that starts.
    res = load_checked(path)
    if not res.ok:
        print(f"{path}: {len(res.problems)} problem(s) in the configuration", file=sys.stderr)
        for problem in res.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    assert res.config is not None and res.secrets is not None
    cfg, secrets = res.config, res.secrets
    del res  # the objects built for the check are not kept for years beside the real ones
    from gateway.runtime.supervisor import run_gateway

    return asyncio.run(run_gateway(cfg, secrets, config_path=path))


# --- status / tail -----------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    import time

    from gateway.diagnostics import client
    from gateway.diagnostics.errors import DiagnosticsError

    sock = _socket_path(args)
    try:
        while True:
            try:
                status = client.fetch_status(sock)
            except DiagnosticsError as e:
                print(f"outpost status: {e}", file=sys.stderr)
                if getattr(e, "hint", None):
                    print(f"hint: {e.hint}", file=sys.stderr)
                return EXIT_FAILURE
            if args.json:
                print(json.dumps(status, indent=2, sort_keys=True))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(client.render_status(status), flush=True)
            if not args.watch:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_tail(args: argparse.Namespace) -> int:
    from gateway.diagnostics import client
    from gateway.diagnostics.errors import DiagnosticsError

    sock = _socket_path(args)
    try:
        for event in client.tail(sock, device=args.device, point=args.point):
            print(json.dumps(event) if args.json else client.render_tail_line(event), flush=True)
    except DiagnosticsError as e:
        print(f"outpost tail: {e}", file=sys.stderr)
        if getattr(e, "hint", None):
            print(f"hint: {e.hint}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    return EXIT_OK


# --- doctor ------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    path = args.config or _default_config()
    try:
        cfg = load_config(path)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        print("hint: fix the configuration first; `outpost check` lists every problem", file=sys.stderr)
        return EXIT_CONFIG
    from gateway.diagnostics.doctor import run_for_config

    checks, text = run_for_config(cfg, socket_path=cfg.diagnostics.socket_path)
    print(text)
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILURE


# --- parser ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="outpost", description="Outpost edge gateway")
    p.add_argument("--version", action="version", version=f"outpost {outpost_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("check", help="validate configuration file(s)")
    _add_config(c)
    c.add_argument("paths", nargs="*", help="files to check (default: --config or the default path)")
    c.add_argument("--secrets", action="store_true", help="also resolve ${ENV} and *_file secrets")
    c.add_argument("--schema", action="store_true", help="print the JSON Schema of the file (for editors) and exit")
    c.set_defaults(func=cmd_check)

    r = sub.add_parser("run", help="run the gateway")
    _add_config(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="show the running gateway's state")
    _add_config(s)
    s.add_argument("--socket", help="diagnostics socket (default from the config)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true")
    s.add_argument("--interval", type=float, default=2.0)
    s.set_defaults(func=cmd_status)

    t = sub.add_parser("tail", help="print live samples")
    _add_config(t)
    t.add_argument("--socket")
    t.add_argument("--device")
    t.add_argument("--point")
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.set_defaults(func=cmd_tail)

    d = sub.add_parser("doctor", help="diagnose ports, disk, clock and links")
    _add_config(d)
    d.set_defaults(func=cmd_doctor)

    try:
        from gateway.cli import probe as probe_cli
    except ImportError:  # the probe arrives with the drivers
        probe_cli = None  # type: ignore[assignment]
    if probe_cli is not None:
        probe_cli.add_parser(sub)

    from gateway.cli import buffer as buffer_cli

    buffer_cli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "probe":
        from gateway.cli import probe as probe_cli

        return asyncio.run(probe_cli.run(args))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
