"""The `outpost` command: what a technician types over SSH.

    outpost check   [--config PATH]         validate the configuration, print a summary
    outpost run     [--config PATH]         run the gateway (systemd starts this)
    outpost status  [--json] [--watch]      live state of links, buffer and devices
    outpost tail    [--device D] [--point P] live samples
    outpost doctor  [--config PATH]         what is wrong, with a hint for each
    outpost probe   modbus|serial ...       commissioning without a config
    outpost buffer  stats|export|purge      look into the store-and-forward buffer

Exit codes and environment variables: EXIT_CODES and ENVIRONMENT below (they are printed
by `outpost --help` and written into the man page, gateway/cli/docgen.py).

Start-up cost matters: a Pi runs `outpost status` from scripts and over slow SSH sessions,
and pydantic, the client libraries and protobuf take several times a bare Python start to
import. So this module uses the standard library only, `main` builds only the subcommand a
command line names (see CORE_COMMANDS), each subcommand imports what it needs when it runs,
and `status`, `tail` and `--version` never load the configuration models or a client library
(tests/component/test_cli_conventions.py checks; tests/benchmarks/cli.py measures).
"""

from __future__ import annotations

import argparse
import os
import sys

from gateway.errors import ConfigError

TYPE_CHECKING = False  # typing itself is a tenth of a bare Python start: annotations only
if TYPE_CHECKING:
    from typing import Any

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

# The same defaults as gateway.config (which imports pydantic); a test checks they agree.
DEFAULT_CONFIG_PATH = "/etc/outpost/outpost.toml"
DEFAULT_SOCKET_PATH = "/run/outpost/outpost.sock"

# What `outpost` returns, as the code does it (every subcommand returns one of these).
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success; `doctor`: every check passed; `status --watch` and `tail` ended with Ctrl-C; "
              "`run`: stopped by SIGTERM or SIGINT"),
    (EXIT_FAILURE, "a runtime failure: `run` could not start (buffer, driver or OS error); `status`/`tail` "
                   "cannot reach the gateway's socket; `doctor` found a failing check; `probe` got no answer "
                   "or cannot open the port; `buffer`: no buffer file or a damaged one; an unexpected error"),
    (EXIT_CONFIG, "bad configuration or usage: `check`, `run` or `doctor` found problems in the configuration "
                  "(each is printed with file, line and key path); an unknown option or missing argument; "
                  "`buffer purge`/`quarantine drop` without --yes when not at a terminal; invalid `probe` "
                  "arguments"),
    (130, "`probe --scan` stopped with Ctrl-C (the unit ids found so far are printed)"),
)

# Every environment variable Outpost reads (grep os.environ), and who reads it.
ENVIRONMENT: tuple[tuple[str, str], ...] = (
    ("OUTPOST_CONFIG", f"the configuration file when --config is not given (default {DEFAULT_CONFIG_PATH}); "
                       "read by check, run, status, tail, doctor and buffer"),
    ("${NAME} in the file", "a password written as ${NAME} (mqtt.password, kafka.sasl_password) is read from "
                            "the environment; the installed unit loads /etc/outpost/outpost.env"),
    ("OUTPOST_TEMPLATE_DIR", "`probe --template NAME` looks here first (then /opt/outpost/templates)"),
    ("NOTIFY_SOCKET", "set by systemd (Type=notify): `run` reports readiness, status and stopping there"),
    ("WATCHDOG_USEC, WATCHDOG_PID", "set by systemd (WatchdogSec=): `run` pings the watchdog every half period"),
    ("JOURNAL_STREAM", "set by systemd when stdout is the journal: log lines carry priority prefixes and no "
                       "time stamp"),
    ("COLUMNS", "the width of --help text (else the terminal's, else 80)"),
)


def outpost_version() -> str:
    from gateway.version import __version__

    return __version__


class _VersionAction(argparse.Action):
    """`--version`: the report is built only when asked (it reads package metadata)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        from gateway.version import version_report

        try:
            sys.stdout.write(version_report() + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `outpost --version | head -1`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        parser.exit()


def _default_config() -> str:
    return os.environ.get("OUTPOST_CONFIG", DEFAULT_CONFIG_PATH)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, metavar="PATH",
                   help=f"configuration file (default: $OUTPOST_CONFIG, else {DEFAULT_CONFIG_PATH})")


def _socket_path(args: argparse.Namespace) -> str:
    if getattr(args, "socket", None):
        return args.socket
    return socket_path_from_config(getattr(args, "config", None) or _default_config())


def _add_socket(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH",
                   help="the running gateway's status socket (default: diagnostics.socket_path from the "
                        f"configuration, else {DEFAULT_SOCKET_PATH})")


def socket_path_from_config(path: str) -> str:
    """`diagnostics.socket_path` from the file and its conf.d/*.toml drop-ins, read as TOML
    only: `status` and `tail` must not pay for validating the whole file (pydantic) to learn
    one path. A file that cannot be read or parsed, a key set in two files, or a value that is
    not a non-empty string gives the default. (When the models read it, any invalid file gave
    the default; now a socket_path beside an unrelated mistake is used: a gateway still
    running the file's previous version most likely listens there.)"""
    conf_d = os.path.join(os.path.dirname(path), "conf.d")
    try:
        dropins = sorted(n for n in os.listdir(conf_d) if n.endswith(".toml")) if os.path.isdir(conf_d) else []
        texts = []
        for f in [path, *(os.path.join(conf_d, n) for n in dropins)]:
            with open(f, encoding="utf-8") as fh:
                texts.append(fh.read())
    except (OSError, UnicodeDecodeError):
        return DEFAULT_SOCKET_PATH
    if not any("socket_path" in t for t in texts):
        return DEFAULT_SOCKET_PATH  # the usual case; tomllib alone costs a third of a Python start
    simple = [_plain_socket_path(t) for t in texts]
    if all(understood for understood, _ in simple):
        values = [v for _, v in simple if v is not None]
        if len(values) > 1:
            return DEFAULT_SOCKET_PATH  # set in two files: the configuration is invalid
        return values[0] if values and values[0] else DEFAULT_SOCKET_PATH
    import tomllib

    found = None
    try:
        for text in texts:
            diag = tomllib.loads(text).get("diagnostics")
            if isinstance(diag, dict) and "socket_path" in diag:
                if found is not None:
                    return DEFAULT_SOCKET_PATH  # set in two files: the configuration is invalid
                found = diag["socket_path"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return DEFAULT_SOCKET_PATH
    return found if isinstance(found, str) and found else DEFAULT_SOCKET_PATH


def _plain_socket_path(text: str) -> tuple[bool, str | None]:
    """(understood, value) for a file whose every `socket_path` is a plain line
    `socket_path = "..."` (or '...') under a plain `[diagnostics]` header: read without tomllib.
    Anything else naming socket_path (a dotted key, an inline table, a comment or string that
    mentions it, multi-line strings anywhere) is not understood here: tomllib reads it."""
    import re

    if '"""' in text or "'''" in text:
        return False, None
    table = ""
    value = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            table = "diagnostics" if re.fullmatch(r"\[diagnostics\]\s*(#.*)?", stripped) else "other"
        if "socket_path" not in line:
            continue
        m = re.fullmatch(r"""socket_path\s*=\s*(?:"([^"\\]*)"|'([^']*)')\s*(?:#[^"']*)?""", stripped)
        if table != "diagnostics" or m is None or value is not None:
            return False, None
        value = m.group(1) if m.group(1) is not None else m.group(2)
    return True, value


# --- check -------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    paths = args.paths or [args.config or _default_config()]
    worst = EXIT_OK
    from gateway.config_build import load_checked  # builds what `outpost run` builds, without I/O

    if args.schema:
        import json

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
    from pathlib import Path

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
    import asyncio

    from gateway.runtime.supervisor import run_gateway

    return asyncio.run(run_gateway(cfg, secrets, config_path=path))


# --- status / tail -----------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    import json
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
    import json

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
    from gateway.config import load_config

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


def _epilog() -> str:
    """Exit codes and environment variables, for `outpost --help` (the man page has them too)."""
    import textwrap

    def block(rows: tuple[tuple[Any, str], ...]) -> list[str]:
        out = []
        for key, text in rows:
            out += textwrap.wrap(text, 88, initial_indent=f"  {key!s:<30}", subsequent_indent=" " * 32)
        return out

    return "\n".join([
        "exit codes:", *block(EXIT_CODES), "",
        "environment:", *block(ENVIRONMENT), "",
        "`outpost COMMAND --help` describes each command; `man outpost` all of them.",
    ])


def _help_width() -> int:
    """The width argparse's formatter computes, found as shutil.get_terminal_size finds it:
    argparse imports shutil (and with it zlib, bz2 and lzma) for that alone, and makes a
    formatter for every option it adds."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=_help_width())


def _raw_formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, width=_help_width())


class _Parser(argparse.ArgumentParser):
    """Every `outpost` parser and subparser: argparse's, with the formatter above."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _formatter)
        super().__init__(*args, **kwargs)


class _TopParser(_Parser):
    """`outpost` itself: the epilog (textwrap) is written only when help is printed."""

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = _epilog()
        return super().format_help()


def build_parser(*, only: str | None = None) -> argparse.ArgumentParser:
    """The whole `outpost` parser; with `only` (one of CORE_COMMANDS, or "--version"), just
    that subcommand: what `main` builds for a command line that names it (see _only)."""
    p = _TopParser(
        prog="outpost",
        description="Outpost edge gateway: Modbus and serial devices to Sparkplug B over MQTT and to Apache Kafka, "
                    "with a store-and-forward buffer.",
        formatter_class=_raw_formatter,  # type: ignore[arg-type]
    )
    p.add_argument("--version", action=_VersionAction,
                   help="print the version, the build, Python's and the key libraries' versions, and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", parser_class=_Parser)

    if only in (None, "check"):
        c = sub.add_parser("check", help="validate configuration file(s)",
                           description="Validate configuration files (with their conf.d drop-ins) without any I/O "
                                       "to devices or brokers, and print a summary; exit 2 lists every problem.")
        _add_config(c)
        c.add_argument("paths", nargs="*", metavar="PATH",
                       help="files to check (default: --config or the default path)")
        c.add_argument("--secrets", action="store_true",
                       help="also resolve ${ENV} and *_file secrets (fails when one is missing)")
        c.add_argument("--schema", action="store_true", help="print the JSON Schema of the file (for editors) and exit")
        c.set_defaults(func=cmd_check)

    if only in (None, "run"):
        r = sub.add_parser("run", help="run the gateway",
                           description="Run the gateway in the foreground (systemd starts this); SIGHUP reloads "
                                       "the configuration, SIGTERM stops it cleanly.")
        _add_config(r)
        r.set_defaults(func=cmd_run)

    if only in (None, "status"):
        s = sub.add_parser("status", help="show the running gateway's state",
                           description="Links, buffer and devices of the running gateway, asked over its "
                                       "status socket (members of the outpost group need no sudo).")
        _add_config(s)
        _add_socket(s)
        s.add_argument("--json", action="store_true",
                       help="print the whole status document as JSON (its schema: gateway/diagnostics/README.md)")
        s.add_argument("--watch", action="store_true", help="redraw the status every --interval seconds until Ctrl-C")
        s.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                       help="seconds between redraws with --watch (default: %(default)s)")
        s.set_defaults(func=cmd_status)

    if only in (None, "tail"):
        t = sub.add_parser("tail", help="print live samples",
                           description="Print the running gateway's samples as they are read, until Ctrl-C.")
        _add_config(t)
        _add_socket(t)
        t.add_argument("--device", metavar="NAME", help="only samples of this device (its name in the configuration)")
        t.add_argument("--point", metavar="NAME", help="only samples of points with this name")
        t.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
        t.set_defaults(func=cmd_tail)

    if only in (None, "doctor"):
        d = sub.add_parser("doctor", help="diagnose ports, disk, clock and links",
                           description="Check serial ports, disk, clock and links for the configuration, "
                                       "with a hint for each problem; exit 1 when a check fails.")
        _add_config(d)
        d.set_defaults(func=cmd_doctor)

    if only is not None:
        return p
    try:
        from gateway.cli import probe as probe_cli
    except ImportError:  # the probe arrives with the drivers
        probe_cli = None  # type: ignore[assignment]
    if probe_cli is not None:
        probe_cli.add_parser(sub)

    from gateway.cli import buffer as buffer_cli

    buffer_cli.add_parser(sub)
    return p


# Commands defined in this module. For one of these (or `--version`) the parser is built with
# that subcommand only: it need not load gateway/cli/probe.py and buffer.py, modules free to
# import what they need at their top (asyncio alone costs a bare Python start again), nor
# build the others (argparse asks the terminal's size for every option): the arguments of
# one subcommand never depend on another's. Help, the man page and completion build it all.
CORE_COMMANDS = frozenset({"check", "run", "status", "tail", "doctor"})


def _only(argv: list[str]) -> str | None:
    """The one subcommand the parser needs for this command line; None: all of them."""
    if argv and (argv[0] in CORE_COMMANDS or argv[0] == "--version"):
        return argv[0]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(only=_only(argv)).parse_args(argv)
    if args.cmd == "probe":
        import asyncio

        from gateway.cli import probe as probe_cli

        return asyncio.run(probe_cli.run(args))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
