"""`python -m tests.harness up|down|env|status|install`: the test services for manual work.

`up` starts Toxiproxy, Mosquitto and Kafka detached (they outlive this command), records
them in .services/stack/state.json and prints `export OUTPOST_...=` lines; `env` prints
them again; `down` stops what `up` started. `make services` / `make services-down` call this.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys

from .common import SERVICES_DIR, HarnessError, log_tail, pid_alive, require_binary, stop_pid
from .stack import Stack, export_lines, stack_dir

STATE = SERVICES_DIR / "stack" / "state.json"
ENV_FILE = SERVICES_DIR / "stack" / "env.sh"
ALL_SERVICES = ("toxiproxy", "mosquitto", "kafka")


def _read_state() -> dict | None:
    try:
        state = json.loads(STATE.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return state


def _alive(state: dict) -> bool:
    return bool(state.get("pids")) and all(pid_alive(p) for p in state["pids"].values())


def cmd_up(services: list[str]) -> int:
    state = _read_state()
    if state and _alive(state):
        print("# services already running (make services-down to stop them)", file=sys.stderr)
        print(export_lines(state["env"]))
        return 0
    if state:
        _stop(state)  # a half-dead stack from before: clear it out
    shutil.rmtree(SERVICES_DIR / "stack", ignore_errors=True)
    stack = Stack(stack_dir(SERVICES_DIR), detached=True)
    try:
        for name in services:
            print(f"# starting {name} ...", file=sys.stderr, flush=True)
            getattr(stack, name)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        stack.close()
        return 1
    state = {"pids": stack.pids(), "env": stack.env()}
    STATE.write_text(json.dumps(state, indent=2))
    ENV_FILE.write_text(export_lines(state["env"]) + "\n")
    print(export_lines(state["env"]))
    print(f"# also in {ENV_FILE} (source it in another shell)", file=sys.stderr)
    return 0


def _stop(state: dict) -> None:
    # Kafka first: it shuts down cleanly only while its proxy and peers are still there.
    for name in ("kafka", "mosquitto", "toxiproxy"):
        pid = state.get("pids", {}).get(name)
        if pid:
            stop_pid(pid, timeout_s=60 if name == "kafka" else 10)


def cmd_install() -> int:
    """Fetch and build what the services need, so the first test does not pay for it."""
    from .kafka import ensure_kafka
    from .mosquitto import INSTALL_HINT
    from .pty import INSTALL_HINT as SOCAT_HINT
    from .tools import ensure_node_peers, kcat_path
    from .toxiproxy import ensure_toxiproxy

    try:
        for what, step in (
            ("toxiproxy", ensure_toxiproxy),
            ("kafka", ensure_kafka),
            ("node peers", ensure_node_peers),
            ("kcat", kcat_path),
            ("mosquitto", lambda: require_binary("mosquitto", INSTALL_HINT)),
            ("mosquitto_passwd", lambda: require_binary("mosquitto_passwd", INSTALL_HINT)),
            ("socat", lambda: require_binary("socat", SOCAT_HINT)),
            ("openssl", lambda: require_binary("openssl", "install openssl")),
            ("java", lambda: require_binary("java", "install a Java 17 runtime")),
        ):
            print(f"# {what}: {step()}", file=sys.stderr, flush=True)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_down() -> int:
    state = _read_state()
    if state is None:
        print("# no services recorded in .services/stack", file=sys.stderr)
        return 0
    _stop(state)
    STATE.unlink(missing_ok=True)
    ENV_FILE.unlink(missing_ok=True)
    print("# services stopped", file=sys.stderr)
    return 0


def cmd_env() -> int:
    state = _read_state()
    if state is None or not _alive(state):
        print("error: no running services; start them with `make services`", file=sys.stderr)
        return 1
    print(export_lines(state["env"]))
    return 0


def cmd_status() -> int:
    state = _read_state()
    if state is None:
        print("no services recorded")
        return 1
    for name, pid in state.get("pids", {}).items():
        print(f"{name:10s} pid {pid:<8d} {'running' if pid_alive(pid) else 'DEAD'}")
        if not pid_alive(pid):
            print(log_tail(SERVICES_DIR / "stack" / "logs" / f"{name}.log", 15))
    return 0 if _alive(state) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.harness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the services and print export lines")
    up.add_argument("services", nargs="*", metavar="SERVICE",
                    help=f"which of {', '.join(ALL_SERVICES)} (default: all)")
    sub.add_parser("down", help="stop the services started by `up`")
    sub.add_parser("env", help="print the export lines of the running services")
    sub.add_parser("status", help="show which services are running")
    sub.add_parser("install", help="fetch/build Kafka, Toxiproxy and the Node peers (cached)")
    args = parser.parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # readiness retries are expected
    if args.command == "up":
        unknown = [s for s in args.services if s not in ALL_SERVICES]
        if unknown:
            parser.error(f"unknown service(s) {unknown}; choose from {list(ALL_SERVICES)}")
        return cmd_up(list(args.services) or list(ALL_SERVICES))
    if args.command == "down":
        return cmd_down()
    if args.command == "env":
        return cmd_env()
    if args.command == "install":
        return cmd_install()
    return cmd_status()


if __name__ == "__main__":
    sys.exit(main())
