"""`python -m tests.harness up|down|env|status|install`: the test services for manual work.

`up` starts Toxiproxy, Mosquitto and Kafka detached (they outlive this command), records
them in .services/stack/state.json and prints `export OUTPOST_...=` lines; `env` prints
them again; `down` stops what `up` started. `make services` / `make services-down` call this.
`up --cluster` (`make services CLUSTER=1`) starts the three-broker cluster (service
`kafka-cluster`: RF 3, min.insync.replicas 2, one Toxiproxy proxy per broker) instead of the
single Kafka node.
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
ALL_SERVICES = ("toxiproxy", "mosquitto", "kafka", "kafka-cluster")
DEFAULT_SERVICES = ("toxiproxy", "mosquitto", "kafka")
CLUSTER_SERVICES = ("toxiproxy", "mosquitto", "kafka-cluster")


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
    cluster = None
    try:
        for name in services:
            print(f"# starting {name} ...", file=sys.stderr, flush=True)
            if name == "kafka-cluster":
                cluster = _start_cluster(stack)
            else:
                getattr(stack, name)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if cluster is not None:
            cluster.stop()
        stack.close()
        return 1
    state = {"pids": stack.pids(), "env": stack.env()}
    if cluster is not None:
        state["pids"].update(cluster.pids())
        state["env"].update(cluster_env(cluster))
    STATE.write_text(json.dumps(state, indent=2))
    ENV_FILE.write_text(export_lines(state["env"]) + "\n")
    print(export_lines(state["env"]))
    print(f"# also in {ENV_FILE} (source it in another shell)", file=sys.stderr)
    return 0


def _start_cluster(stack: Stack):
    from .kafka import KafkaCluster

    cluster = KafkaCluster(stack.run, stack.toxiproxy, detached=True).start()
    print(f"# kafka-cluster: {len(cluster.brokers)} brokers + "
          f"{len(cluster.nodes) - len(cluster.brokers)} controller-only voters ready in "
          f"{cluster.start_s}s", file=sys.stderr, flush=True)
    return cluster


def cluster_env(cluster) -> dict[str, str]:
    env = {
        "OUTPOST_KAFKA_CLUSTER_BOOTSTRAP": cluster.bootstrap,
        "OUTPOST_KAFKA_CLUSTER_PROXIED_BOOTSTRAP": cluster.proxied_bootstrap,
    }
    for b in cluster.brokers:
        env[f"OUTPOST_KAFKA_CLUSTER_PROXY_{b.node_id}"] = b.proxy.name
    return env


def _stop(state: dict) -> None:
    # Kafka first: it shuts down cleanly only while its proxy and peers are still there.
    # Cluster nodes in id order: the brokers (1-3) before the controller-only voters.
    pids = state.get("pids", {})
    order = [n for n in sorted(pids) if n.startswith("kcluster-")]
    order += ["kafka", "mosquitto", "toxiproxy"]
    for name in order:
        pid = pids.get(name)
        if pid:
            stop_pid(pid, timeout_s=60 if "kafka" in name or "kcluster" in name else 10)


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
                    help=f"which of {', '.join(ALL_SERVICES)} "
                         f"(default: {', '.join(DEFAULT_SERVICES)})")
    up.add_argument("--cluster", action="store_true",
                    help="the three-broker Kafka cluster instead of the single node "
                         f"(default services then: {', '.join(CLUSTER_SERVICES)})")
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
        default = CLUSTER_SERVICES if args.cluster else DEFAULT_SERVICES
        return cmd_up(list(args.services) or list(default))
    if args.command == "down":
        return cmd_down()
    if args.command == "env":
        return cmd_env()
    if args.command == "install":
        return cmd_install()
    return cmd_status()


if __name__ == "__main__":
    sys.exit(main())
