"""Outpost beside the gateways its users would pick instead: `python -m tests.benchmarks.peers --json`.

One run, one machine, the same workload for every peer: one pymodbus TCP server on loopback
(its own process) whose holding registers change on every read, a loopback Mosquitto from
tests/harness, and a subscriber here that decodes every data message of the peer's format
and counts the samples in it (Sparkplug B DDATA metrics through gateway/sparkplug/payload.py,
ThingsBoard gateway JSON values, Telegraf line-protocol or JSON fields). Workloads:

- `1k`:  20 units x 50 registers every 1 s   (1,000 samples/s)
- `10k`: 10 units x 100 registers every 100 ms (10,000 samples/s)

Peers:
- `outpost`: a real `outpost run` child with its durable SQLite buffer and Sparkplug B on MQTT,
  on this machine's clock; `outpost-synced` / `outpost-unsynced`: the same with the kernel's
  clock state forced (an unsynchronised clock flags DDATA, which costs bytes);
- `thingsboard-memory` / `thingsboard-sqlite`: ThingsBoard IoT Gateway (PyPI
  `thingsboard-gateway`, 3.8.x) in its own venv under ~/.cache/outpost/peers/, Modbus
  connector in, its MQTT client pointed at the loopback Mosquitto, memory or SQLite storage;
- `telegraf`: Telegraf built with `go install -tags custom,inputs.modbus,outputs.mqtt` from
  the Go module proxy (binary cached under ~/.cache/outpost/peers/), modbus input, mqtt
  output in line protocol, memory buffer (the only one it has for outputs).

Each peer runs a warm-up, then a measured window: samples delivered (counted at the
subscriber by their own timestamps: those stamped in the window that arrived before the end
of a grace period after it) and their fraction of the nominal rate x window; samples the
peer polled (counted by the server as it answered) likewise; process CPU seconds (user +
system, the process and its children, psutil) per 1,000 delivered samples; peak RSS over the
whole run; MQTT payload bytes per delivered sample; and each figure's ratio to Outpost's in
the same run. A peer that cannot be installed or started here is in the JSON with the
reason, never left out. Installs run in the background from the start and are cached, so
later runs start at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PEERS_CACHE = Path(os.environ.get("OUTPOST_CACHE_DIR", Path.home() / ".cache" / "outpost")) / "peers"
TELEGRAF_VERSION = "v1.37.2"
TELEGRAF_TAGS = "custom,inputs.modbus,outputs.mqtt"
THINGSBOARD_REQUIREMENT = "thingsboard-gateway>=3.8,<3.9"
# The ThingsBoard Modbus connector pip-installs these at import time if they are missing
# (pymodbus at exactly the version it names); installed with the gateway so that no run
# starts with a download.
THINGSBOARD_CONNECTOR_DEPS = ("pymodbus==3.9.2", "pyserial", "pyserial-asyncio")

ALL_PEERS = ("outpost", "outpost-synced", "outpost-unsynced", "thingsboard-memory", "thingsboard-sqlite",
             "telegraf")
DEFAULT_PEERS = ("outpost", "outpost-synced", "thingsboard-memory", "thingsboard-sqlite", "telegraf")


@dataclass(frozen=True)
class Workload:
    name: str
    units: int
    registers: int
    interval_s: float

    @property
    def rate(self) -> float:
        return self.units * self.registers / self.interval_s


WORKLOADS = {
    "1k": Workload("1k", units=20, registers=50, interval_s=1.0),
    "10k": Workload("10k", units=10, registers=100, interval_s=0.1),
}


def point_name(i: int, style: str) -> str:
    """Register i's point name: `short` (r0..r99) or `realistic` (12 characters)."""
    return f"r{i}" if style == "short" else f"register_{i:03d}"


# --- sample counters, one per format (pure; tests/unit/test_peers_counters.py) ------------
# Each returns the samples of one message grouped by their own timestamp, [(ts_ms, count)],
# so that a window counts the samples polled in it, whenever they arrive.

def _grouped(stamps: list[int]) -> list[tuple[int, int]]:
    out: dict[int, int] = {}
    for ts in stamps:
        out[ts] = out.get(ts, 0) + 1
    return sorted(out.items())


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# Outpost's clock marker (a Boolean metric per device, in DDATA while the clock is not
# trusted): it says how to read the timestamps beside it and is not a sample.
CLOCK_MARKER = "Outpost/Clock/Unsynced"


class SparkplugCounter:
    """Samples of Sparkplug B messages: the metrics of each DDATA (births and node data are
    not samples; neither is the clock marker, known by name or by the alias its DBIRTH
    gave it), each at its metric timestamp, else the payload's. Decoded with the project's
    payload module; a metric it cannot decode still arrived and is counted."""

    def __init__(self) -> None:
        self.markers: set[tuple[str, int]] = set()  # (device topic, alias) of clock markers

    def __call__(self, topic: str, payload: bytes) -> list[tuple[int, int]]:
        from gateway.sparkplug.payload import decode_payload_each

        parts = topic.split("/")
        kind = parts[2] if len(parts) > 2 else ""
        if kind not in ("DDATA", "DBIRTH"):
            return []
        device = "/".join(parts[3:])
        decoded, errors = decode_payload_each(payload)
        if kind == "DBIRTH":
            for m in decoded.metrics:
                if m.name == CLOCK_MARKER and m.alias is not None:
                    self.markers.add((device, m.alias))
            return []
        base = decoded.timestamp if decoded.timestamp is not None else _now_ms()
        stamps = [m.timestamp if m.timestamp is not None else base for m in decoded.metrics
                  if m.name != CLOCK_MARKER and (device, m.alias) not in self.markers]
        return _grouped(stamps + [base] * len(errors))


def count_sparkplug(topic: str, payload: bytes) -> list[tuple[int, int]]:
    """SparkplugCounter for one message on its own (no births seen)."""
    return SparkplugCounter()(topic, payload)


def count_thingsboard(payload: bytes) -> list[tuple[int, int]]:
    """Samples of a ThingsBoard gateway telemetry message (`v1/gateway/telemetry`):
    {"device": [{"ts": ..., "values": {...}}, ...]}, or one object instead of the list, or
    values without the ts/values envelope (then stamped on arrival)."""
    doc = json.loads(payload)
    if not isinstance(doc, dict):
        raise ValueError(f"not a ThingsBoard gateway telemetry object: {type(doc).__name__}")
    out: dict[int, int] = {}
    for entries in doc.values():
        for entry in entries if isinstance(entries, list) else [entries]:
            if not isinstance(entry, dict):
                raise ValueError(f"telemetry entry is {type(entry).__name__}, not an object")
            if "ts" in entry or "values" in entry:
                values, ts = entry.get("values", {}), int(entry.get("ts") or _now_ms())
            else:
                values, ts = entry, _now_ms()
            out[ts] = out.get(ts, 0) + len(values)
    return sorted(out.items())


def _split_unescaped(text: str, sep: str) -> list[str]:
    """Split on `sep` outside double quotes and not escaped by a backslash."""
    parts, cur, quoted, i = [], [], False, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i : i + 2])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == sep and not quoted:
            parts.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _epoch_ms(value: float) -> int:
    """A Unix timestamp in s, ms, us or ns (told apart by magnitude) in ms."""
    for limit, div in ((1e11, 1e-3), (1e14, 1.0), (1e17, 1e3)):
        if abs(value) < limit:
            return int(value / div)
    return int(value // 1_000_000)


def count_line_protocol(payload: bytes) -> list[tuple[int, int]]:
    """Samples of InfluxDB line protocol: the fields of every line (one line per metric), at
    the line's timestamp (ns by default), else on arrival."""
    out: dict[int, int] = {}
    for line in payload.decode().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        # measurement[,tags] fields [timestamp]: spaces in the key are escaped, in string
        # field values quoted.
        sections = [s for s in _split_unescaped(line, " ") if s]
        if len(sections) < 2:
            raise ValueError(f"line protocol without fields: {line[:80]!r}")
        ts = _epoch_ms(int(sections[2])) if len(sections) > 2 else _now_ms()
        out[ts] = out.get(ts, 0) + len(_split_unescaped(sections[1], ","))
    return sorted(out.items())


def count_telegraf_json(payload: bytes) -> list[tuple[int, int]]:
    """Samples of Telegraf's JSON serializer output: one metric, or {"metrics": [...]}."""
    doc = json.loads(payload)
    metrics = doc.get("metrics", [doc]) if isinstance(doc, dict) else doc
    out: dict[int, int] = {}
    for m in metrics:
        ts = _epoch_ms(m["timestamp"]) if "timestamp" in m else _now_ms()
        out[ts] = out.get(ts, 0) + len(m.get("fields", {}))
    return sorted(out.items())


def telegraf_counter(topic: str, payload: bytes) -> list[tuple[int, int]]:
    if payload.lstrip()[:1] in (b"{", b"["):
        return count_telegraf_json(payload)
    return count_line_protocol(payload)


def samples(groups: list[tuple[int, int]]) -> int:
    return sum(n for _, n in groups)


# --- the Modbus server (a child process) ------------------------------------------------

class ChangingRegisters:
    """A pymodbus server context whose holding/input registers change on every read: unit u,
    read n, register a answers (u * 1000 + n * 7 + a) mod 2**16, so each poll of a register
    gives a new value and report-by-exception passes every sample."""

    def __init__(self, units: int, registers: int) -> None:
        self.unit_ids = list(range(1, units + 1))
        self.registers = registers
        self.reads = dict.fromkeys(self.unit_ids, 0)
        self.served = 0  # register values answered

    def device_ids(self) -> list[int]:
        return self.unit_ids

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1) -> Any:
        from pymodbus.constants import ExcCodes

        if func_code not in (3, 4) or device_id not in self.reads:
            return ExcCodes.ILLEGAL_FUNCTION
        if address < 0 or address + count > self.registers:
            return ExcCodes.ILLEGAL_ADDRESS
        n = self.reads[device_id] = self.reads[device_id] + 1
        self.served += count
        base = device_id * 1000 + n * 7
        return [(base + a) & 0xFFFF for a in range(address, address + count)]

    async def async_setValues(self, device_id: int, func_code: int, address: int, values: Any) -> Any:
        from pymodbus.constants import ExcCodes

        return ExcCodes.ILLEGAL_FUNCTION


async def serve_modbus(port: int, units: int, registers: int, count_file: Path) -> None:
    from pymodbus.server import ModbusTcpServer

    from drivers.modbus.simserver import SimServer

    store = ChangingRegisters(units, registers)
    sim = await SimServer.tcp({}, port=port)
    sim.server.context = store
    tmp = count_file.with_suffix(".tmp")
    assert isinstance(sim.server, ModbusTcpServer)
    while True:
        tmp.write_text(str(store.served))
        tmp.replace(count_file)
        await asyncio.sleep(0.2)


def read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):
        return 0


# --- installs ----------------------------------------------------------------------------

class Unavailable(Exception):
    """A peer that cannot be installed or started here; the reason goes into the JSON."""


@dataclass
class Install:
    name: str
    thread: threading.Thread | None = None
    result: Any = None
    error: str | None = None
    seconds: float = 0.0
    cached: bool = False

    def wait(self, timeout_s: float) -> Any:
        if self.thread is not None:
            self.thread.join(timeout_s)
            if self.thread.is_alive():
                raise Unavailable(f"{self.name}: install still running after {timeout_s:.0f}s")
        if self.error is not None:
            raise Unavailable(self.error)
        return self.result


def _run(argv: list[str], log: Path, timeout_s: float, env: dict[str, str] | None = None) -> None:
    with open(log, "ab") as out:
        out.write(f"\n=== {' '.join(argv)}\n".encode())
        out.flush()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, **(env or {})}, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise Unavailable(f"`{' '.join(argv[:4])} ...` exited {done.returncode}: " + " | ".join(tail))


def install_telegraf(log: Path) -> tuple[Path, bool]:
    """Telegraf with only the modbus input and mqtt output, built from the Go module proxy."""
    home = PEERS_CACHE / f"telegraf-{TELEGRAF_VERSION}"
    binary = home / "bin" / "telegraf"
    if binary.exists():
        return binary, True
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        raise Unavailable("telegraf: no Go toolchain (`go`) on PATH to build it with")
    home.mkdir(parents=True, exist_ok=True)
    env = {"GOBIN": str(home / "bin"), "GOPATH": str(PEERS_CACHE / "gopath"), "GOFLAGS": "-modcacherw",
           "CGO_ENABLED": "0"}
    _run([go, "install", "-tags", TELEGRAF_TAGS,
          f"github.com/influxdata/telegraf/cmd/telegraf@{TELEGRAF_VERSION}"], log, 3600, env)
    if not binary.exists():
        raise Unavailable(f"telegraf: go install finished but {binary} is missing")
    return binary, False


def install_thingsboard(log: Path) -> tuple[Path, bool]:
    """ThingsBoard IoT Gateway 3.8.x and its Modbus connector's libraries, in their own venv."""
    venv = PEERS_CACHE / "thingsboard-3.8-venv"
    python = venv / "bin" / "python"
    marker = venv / ".outpost-complete"
    if marker.exists():
        return python, True
    shutil.rmtree(venv, ignore_errors=True)
    _run([sys.executable, "-m", "venv", str(venv)], log, 300)
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
          THINGSBOARD_REQUIREMENT, *THINGSBOARD_CONNECTOR_DEPS], log, 1800)
    _run([str(python), "-c", "import thingsboard_gateway.tb_gateway, pymodbus"], log, 120)
    marker.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return python, False


def start_install(name: str, fn: Any, log: Path) -> Install:
    inst = Install(name)

    def body() -> None:
        t0 = time.monotonic()
        try:
            inst.result, inst.cached = fn(log)
        except Unavailable as exc:
            inst.error = str(exc)
        except Exception as exc:  # any install failure is a reason in the report
            inst.error = f"{name}: {type(exc).__name__}: {exc}"
        inst.seconds = round(time.monotonic() - t0, 1)

    inst.thread = threading.Thread(target=body, name=f"install-{name}", daemon=True)
    inst.thread.start()
    return inst


def thingsboard_version(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                           "print(version('thingsboard-gateway'))"], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout.strip() or "unknown"


# --- the subscriber -----------------------------------------------------------------------

@dataclass
class Tally:
    """What the subscriber counted for one peer: samples and payload bytes by sample time."""

    samples: int = 0
    undecodable: int = 0
    last_error: str | None = None
    by_ts: dict[int, int] = field(default_factory=dict)        # ts_ms -> samples
    messages: list[tuple[int, int]] = field(default_factory=list)  # (first ts_ms, payload bytes)

    def add(self, groups: list[tuple[int, int]], payload_bytes: int) -> None:
        n = 0
        for ts, k in groups:
            self.by_ts[ts] = self.by_ts.get(ts, 0) + k
            n += k
        if n:
            self.samples += n
            self.messages.append((groups[0][0], payload_bytes))

    def window(self, t0_ms: int, t1_ms: int) -> tuple[int, int, int]:
        """(samples, messages, payload bytes) stamped in [t0_ms, t1_ms)."""
        n = sum(k for ts, k in self.by_ts.items() if t0_ms <= ts < t1_ms)
        msgs = [b for ts, b in self.messages if t0_ms <= ts < t1_ms]
        return n, len(msgs), sum(msgs)


TB_RPC_REQUEST = "v1/devices/me/rpc/request/"
# What the benchmark answers in ThingsBoard's place: no rate limits, and ThingsBoard CE's
# default in-flight window and MQTT payload limit.
TB_SESSION_LIMITS = {"rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
                     "maxInflightMessages": 100, "maxPayloadSize": 65536}


@dataclass
class Subscriber:
    """One gmqtt client on the loopback Mosquitto; counts samples with the active counter."""

    host: str
    port: int
    tally: Tally = field(default_factory=Tally)
    counter: Any = None     # (topic, payload) -> samples
    prefix: str = ""        # topic prefix of the active peer's data messages
    _client: Any = None

    async def start(self, topics: list[str]) -> None:
        from gmqtt import Client

        subscribed = asyncio.Event()
        client = Client(f"peers-bench-{uuid.uuid4().hex[:8]}", clean_session=True)

        def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
            if topic.startswith(TB_RPC_REQUEST):
                self._answer_thingsboard(client, topic, payload)
                return 0
            counter = self.counter
            if counter is None or not topic.startswith(self.prefix):
                return 0
            try:
                groups = counter(topic, payload)
            except Exception as exc:  # counted: a peer's bad message must not stop the run
                self.tally.undecodable += 1
                self.tally.last_error = f"{topic}: {type(exc).__name__}: {exc}"[:300]
                return 0
            self.tally.add(groups, len(payload))
            return 0

        client.on_message = on_message
        client.on_subscribe = lambda *_a, **_k: subscribed.set()
        await client.connect(self.host, self.port, keepalive=60)
        self._client = client
        for t in topics:
            subscribed.clear()
            client.subscribe(t, qos=1)
            await asyncio.wait_for(subscribed.wait(), 10)

    def _answer_thingsboard(self, client: Any, topic: str, payload: bytes) -> None:
        """Answer as a ThingsBoard server would: the gateway sends no telemetry before its
        session limits arrive (`getSessionLimits`, an RPC to the server)."""
        try:
            method = json.loads(payload).get("method")
        except (ValueError, AttributeError):
            return
        if method == "getSessionLimits":
            req_id = topic.rsplit("/", 1)[1]
            client.publish(f"v1/devices/me/rpc/response/{req_id}", json.dumps(TB_SESSION_LIMITS), qos=1)

    def use(self, counter: Any, prefix: str) -> None:
        self.tally = Tally()
        self.counter = counter
        self.prefix = prefix

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)


# --- peers ----------------------------------------------------------------------------------

@dataclass
class Figures:
    peak_rss_bytes: int = 0


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its children, now."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


async def sample_process(pid: int, figures: Figures) -> None:
    """Peak RSS of `pid` and its children, looked at every 0.25 s (psutil)."""
    import psutil

    try:
        root = psutil.Process(pid)
        while True:
            procs = [root, *root.children(recursive=True)]
            rss = 0
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
                    rss += p.memory_info().rss
            figures.peak_rss_bytes = max(figures.peak_rss_bytes, rss)
            await asyncio.sleep(0.25)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return


@dataclass
class PeerSetup:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    counter: Any
    prefix: str
    topics: list[str]
    version: str
    notes: list[str] = field(default_factory=list)


def outpost_setup(w: Workload, work: Path, mqtt: tuple[str, int], modbus_port: int, names: str,
                  clock: str = "system") -> PeerSetup:
    """`outpost run` on the workload; `clock`: as this machine's kernel says (`system`), or
    forced `synced`/`unsynced` (the child answers the kernel clock probe itself, so the
    figures do not depend on this machine's NTP state)."""
    lines = [
        "[gateway]", 'group_id = "peers"', 'edge_node_id = "outpost"', f'data_dir = "{work / "data"}"', "",
        "[buffer]", "max_size_bytes = 2_000_000_000", 'max_age = "1d"', "",
        "[[buses]]", 'name = "lan"', 'transport = "tcp"', 'host = "127.0.0.1"', f"port = {modbus_port}",
        'timeout = "1s"', "",
    ]
    for u in range(1, w.units + 1):
        lines += ["[[devices]]", 'driver = "modbus"', f'name = "unit{u}"', 'bus = "lan"', f"unit_id = {u}",
                  f'interval = "{int(w.interval_s * 1000)}ms"', ""]
        for i in range(w.registers):
            lines += ["[[devices.points]]", f'name = "{point_name(i, names)}"', 'table = "holding"',
                      f"address = {i}", 'type = "uint16"', ""]
    lines += ["[mqtt]", f'servers = ["mqtt://{mqtt[0]}:{mqtt[1]}"]', 'client_id = "outpost-peers"', "",
              "[diagnostics]", f'socket_path = "{work / "outpost.sock"}"', ""]
    cfg = work / "outpost.toml"
    cfg.write_text("\n".join(lines))
    from gateway.version import __version__ as version

    argv = [sys.executable, "-m", "gateway", "run", "--config", str(cfg)]
    if clock != "system":
        argv = [sys.executable, "-m", "tests.benchmarks.peers", CLOCK_CHILD_FLAG, clock, "run", "--config", str(cfg)]
    # The child runs in its work folder: the repository on its path for tests.benchmarks.
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    return PeerSetup(argv, env, work, SparkplugCounter(), "spBv1.0/peers/", ["spBv1.0/peers/#"],
                     f"outpost {version} (clock: {clock})")


CLOCK_CHILD_FLAG = "--outpost-child-clock"


def outpost_child(clock: str, argv: list[str]) -> int:
    """`outpost <argv>` with the kernel clock probe answering `clock` (synced/unsynced)."""
    from gateway import clock as clock_mod
    from gateway.cli import main as outpost_main

    forced = clock_mod.ClockStatus(synced=clock == "synced", source=f"benchmark: forced {clock}")
    kwdefaults = clock_mod.ClockGuard.__init__.__kwdefaults__
    if not kwdefaults or "probe" not in kwdefaults:
        raise SystemExit("gateway.clock.ClockGuard(probe=...) changed: cannot force the clock")
    kwdefaults["probe"] = lambda: forced
    return outpost_main(argv)


def thingsboard_setup(w: Workload, work: Path, mqtt: tuple[str, int], modbus_port: int, names: str,
                      python: Path, storage: str) -> PeerSetup:
    config_dir = work / "config"
    config_dir.mkdir(parents=True)
    pkg = Path(subprocess.run([str(python), "-c", "import thingsboard_gateway, os; "
                               "print(os.path.dirname(thingsboard_gateway.__file__))"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip())
    shipped = json.loads((pkg / "config" / "tb_gateway.json").read_text())
    tb = shipped["thingsboard"]
    tb.update({"host": mqtt[0], "port": mqtt[1], "remoteConfiguration": False, "remoteShell": False,
               "security": {"type": "accessToken", "accessToken": "peers-bench"}, "qos": 1})
    tb["statistics"] = {**tb.get("statistics", {}), "enable": False}
    if storage == "memory":
        shipped["storage"] = {**shipped["storage"], "type": "memory", "max_records_count": 1_000_000}
    else:
        shipped["storage"] = {"type": "sqlite", "data_file_path": str(work / "data" / "data.db"),
                              "messages_ttl_check_in_hours": 1, "messages_ttl_in_days": 7}
        (work / "data").mkdir()
    shipped["grpc"] = {**shipped.get("grpc", {}), "enabled": False}
    shipped["connectors"] = [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}]
    (config_dir / "tb_gateway.json").write_text(json.dumps(shipped, indent=2))
    logs = json.loads((pkg / "config" / "logs.json").read_text())
    for h in logs.get("handlers", {}).values():
        if "filename" in h:
            h["filename"] = str(work / "logs" / Path(h["filename"]).name)
    (work / "logs").mkdir()
    (config_dir / "logs.json").write_text(json.dumps(logs, indent=2))
    slaves = []
    for u in range(1, w.units + 1):
        slaves.append({
            "host": "127.0.0.1", "port": modbus_port, "type": "tcp", "method": "socket", "unitId": u,
            "deviceName": f"unit{u}", "deviceType": "default", "timeout": 35, "byteOrder": "BIG",
            "wordOrder": "BIG", "retries": 1, "retryOnEmpty": True, "retryOnInvalid": True,
            "pollPeriod": int(w.interval_s * 1000), "connectAttemptTimeMs": 500, "connectAttemptCount": 5,
            "waitAfterFailedAttemptsMs": 1000, "attributes": [],
            "timeseries": [{"tag": point_name(i, names), "type": "16uint", "functionCode": 3,
                            "objectsCount": 1, "address": i} for i in range(w.registers)],
            "attributeUpdates": [], "rpc": [],
        })
    (config_dir / "modbus.json").write_text(json.dumps({"master": {"slaves": slaves}}, indent=2))
    version = thingsboard_version(python)
    argv = [str(python), "-c", "from thingsboard_gateway.tb_gateway import daemon; daemon()"]
    return PeerSetup(argv, {"TB_GW_CONFIG_DIR": str(config_dir)}, work,
                     lambda _t, p: count_thingsboard(p), "v1/gateway/telemetry", ["v1/gateway/telemetry"],
                     f"thingsboard-gateway {version} ({storage} storage)")


def telegraf_setup(w: Workload, work: Path, mqtt: tuple[str, int], modbus_port: int, names: str,
                   binary: Path) -> PeerSetup:
    interval = f"{int(w.interval_s * 1000)}ms"
    lines = [
        "[agent]", f'  interval = "{interval}"', "  round_interval = true", "  metric_batch_size = 1000",
        "  metric_buffer_limit = 100000", '  collection_jitter = "0s"', '  flush_interval = "1s"',
        '  flush_jitter = "0s"', "  omit_hostname = false", "",
        "[[inputs.modbus]]", '  name = "peers"', f'  controller = "tcp://127.0.0.1:{modbus_port}"',
        '  timeout = "1s"', '  configuration_type = "request"', "",
    ]
    for u in range(1, w.units + 1):
        lines += ["  [[inputs.modbus.request]]", f"    slave_id = {u}", '    byte_order = "ABCD"',
                  '    register = "holding"', '    measurement = "modbus"', "    fields = ["]
        lines += [f'      {{ address = {i}, name = "{point_name(i, names)}", type = "UINT16" }},'
                  for i in range(w.registers)]
        lines += ["    ]", ""]
    lines += [
        "[[outputs.mqtt]]", f'  servers = ["{mqtt[0]}:{mqtt[1]}"]',
        '  topic = "telegraf/{{ .Hostname }}/{{ .PluginName }}"', "  qos = 1",
        '  client_id = "telegraf-peers"', '  data_format = "influx"', "",
    ]
    cfg = work / "telegraf.conf"
    cfg.write_text("\n".join(lines))
    return PeerSetup([str(binary), "--config", str(cfg)], {}, work, telegraf_counter, "telegraf/",
                     ["telegraf/#"], f"telegraf {TELEGRAF_VERSION} (go install -tags {TELEGRAF_TAGS})",
                     ["memory buffer only (Telegraf outputs have no disk buffer in this build)"])


async def measure(name: str, setup: PeerSetup, w: Workload, sub: Subscriber, count_file: Path,
                  warmup_s: float, window_s: float, start_limit_s: float, grace_s: float) -> dict[str, Any]:
    from tests.harness.common import ManagedProcess, log_tail

    sub.use(setup.counter, setup.prefix)
    proc = ManagedProcess(f"peer-{name}", setup.argv, setup.cwd / "peer.log", env=setup.env,
                          cwd=setup.cwd).start()
    figures = Figures()
    sampler = asyncio.create_task(sample_process(proc.pid, figures), name=f"{name}-sampler")
    try:
        deadline = time.monotonic() + start_limit_s
        while sub.tally.samples == 0:
            if not proc.alive():
                raise Unavailable(f"{name} exited before delivering a sample:\n{log_tail(proc.log_path, 15)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"{name} delivered no sample within {start_limit_s:.0f}s "
                                  f"(undecodable messages: {sub.tally.undecodable}, "
                                  f"last error: {sub.tally.last_error})\n{log_tail(proc.log_path, 15)}")
            await asyncio.sleep(0.2)
        started_s = start_limit_s - (deadline - time.monotonic())
        await asyncio.sleep(warmup_s)
        t0, w0, cpu0, polled0 = time.monotonic(), _now_ms(), process_cpu_s(proc.pid), read_count(count_file)
        await asyncio.sleep(window_s)
        t1, w1, cpu1, polled1 = time.monotonic(), _now_ms(), process_cpu_s(proc.pid), read_count(count_file)
        if not proc.alive():
            raise Unavailable(f"{name} exited during the measurement:\n{log_tail(proc.log_path, 15)}")
        # Samples stamped in the window that arrive within the grace period are delivered;
        # the peer keeps running meanwhile (its CPU after t1 is not counted).
        await asyncio.sleep(grace_s)
        delivered, messages, payload_bytes = sub.tally.window(w0, w1)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await asyncio.to_thread(proc.stop, 20)
        sub.use(None, "")
    elapsed = t1 - t0
    expected = w.rate * (w1 - w0) / 1000
    cpu = cpu1 - cpu0
    return {
        "version": setup.version,
        "notes": setup.notes,
        "first_sample_after_s": round(started_s, 1),
        "window_s": round(elapsed, 1),
        "samples_expected": round(expected),
        "samples_delivered": delivered,
        "fraction_delivered": round(delivered / expected, 3),
        "samples_polled": polled1 - polled0,
        "fraction_polled": round((polled1 - polled0) / expected, 3),
        "messages": messages,
        "undecodable_messages": sub.tally.undecodable,
        "cpu_s": round(cpu, 2),
        "cpu_cores": round(cpu / elapsed, 3),
        "cpu_s_per_1000_samples": round(cpu / delivered * 1000, 4) if delivered else None,
        "peak_rss_mb": round(figures.peak_rss_bytes / 2**20, 1),
        "mqtt_payload_bytes_per_sample": round(payload_bytes / delivered, 2) if delivered else None,
    }


RATIO_KEYS = ("cpu_s_per_1000_samples", "peak_rss_mb", "mqtt_payload_bytes_per_sample", "fraction_delivered")


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Each measured peer's figures divided by Outpost's (same workload, same run)."""
    base = results.get("outpost")
    if not base or "error" in base:
        return
    for name, r in results.items():
        if name == "outpost" or "error" in r:
            continue
        r["ratio_to_outpost"] = {k: round(r[k] / base[k], 3) if r[k] is not None and base[k] else None
                                 for k in RATIO_KEYS}


async def run(args: argparse.Namespace, base: Path, installs: dict[str, Install]) -> dict[str, Any]:
    from tests.harness.common import ManagedProcess, RunDir, free_port
    from tests.harness.stack import Stack

    stack = Stack(RunDir(base / "services"))
    report: dict[str, Any] = {"benchmark": "peers", "workloads": {}, "installs": {}}
    try:
        mosq = stack.mosquitto
        mqtt = (mosq.host, mosq.port)
        sub = Subscriber(*mqtt)
        await sub.start(["spBv1.0/peers/#", "v1/gateway/telemetry", "telegraf/#", TB_RPC_REQUEST + "+"])
        for wname in args.workloads:
            w = WORKLOADS[wname]
            print(f"[peers] workload {wname}: {w.units} units x {w.registers} registers every "
                  f"{w.interval_s:g} s", file=sys.stderr, flush=True)
            port = free_port()
            count_file = base / f"modbus-{wname}.count"
            server = ManagedProcess(
                f"modbus-{wname}",
                [sys.executable, "-m", "tests.benchmarks.peers", "--serve-modbus", str(port),
                 "--units", str(w.units), "--registers", str(w.registers), "--count-file", str(count_file)],
                base / f"modbus-{wname}.log").start()
            try:
                await _wait_port(port, server)
                results: dict[str, dict[str, Any]] = {}
                for peer in args.peers:
                    work = base / wname / peer
                    work.mkdir(parents=True)
                    try:
                        if peer.startswith("outpost"):
                            clock = peer.split("-", 1)[1] if "-" in peer else "system"
                            setup = outpost_setup(w, work, mqtt, port, args.point_names, clock)
                        elif peer.startswith("thingsboard-"):
                            python = installs["thingsboard"].wait(args.install_limit)
                            setup = thingsboard_setup(w, work, mqtt, port, args.point_names, python,
                                                      peer.split("-", 1)[1])
                        else:
                            binary = installs["telegraf"].wait(args.install_limit)
                            setup = telegraf_setup(w, work, mqtt, port, args.point_names, binary)
                        reps = []
                        for rep in range(args.repeat):
                            print(f"[peers]   {peer} ({rep + 1}/{args.repeat}) ...", file=sys.stderr, flush=True)
                            r = await measure(peer, setup, w, sub, count_file, args.warmup, args.duration,
                                              args.start_limit, args.grace)
                            print(f"[peers]   {json.dumps(r)}", file=sys.stderr, flush=True)
                            reps.append(r)
                            if rep + 1 < args.repeat:
                                shutil.rmtree(work / "data", ignore_errors=True)
                        results[peer] = _combine(reps)
                    except Unavailable as exc:
                        results[peer] = {"error": str(exc)}
                        print(f"[peers]   {peer}: {exc}", file=sys.stderr, flush=True)
                add_ratios(results)
                report["workloads"][wname] = {"units": w.units, "registers": w.registers,
                                              "interval_s": w.interval_s, "samples_per_s": w.rate,
                                              "peers": results}
            finally:
                server.stop()
        await sub.stop()
    finally:
        stack.close()
    for name, inst in installs.items():
        report["installs"][name] = ({"ok": True, "cached": inst.cached, "seconds": inst.seconds}
                                    if inst.error is None and inst.result is not None
                                    else {"ok": False, "reason": inst.error or "not finished"})
    return report


async def _wait_port(port: int, server: Any) -> None:
    from tests.harness.common import log_tail, port_open

    deadline = time.monotonic() + 30
    while not await asyncio.to_thread(port_open, "127.0.0.1", port):
        if not server.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the Modbus server did not listen on {port}:\n{log_tail(server.log_path)}")
        await asyncio.sleep(0.2)


def _combine(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One repetition as is; several: the first's fields, the numbers as [min, max] beside."""
    out = dict(reps[0])
    if len(reps) > 1:
        out["repetitions"] = reps
        for k in RATIO_KEYS:
            vals = [r[k] for r in reps if r[k] is not None]
            out[k] = round(sum(vals) / len(vals), 4) if vals else None
            out[f"{k}_range"] = [min(vals), max(vals)] if vals else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.benchmarks.peers", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    ap.add_argument("--workloads", default="1k,10k", help="comma-separated: 1k, 10k")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated from {', '.join(ALL_PEERS)} (outpost: this machine's clock; "
                         "-synced/-unsynced: the clock forced)")
    ap.add_argument("--duration", type=float, default=20.0, help="measured window per peer, seconds")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds after the first delivered sample")
    ap.add_argument("--grace", type=float, default=5.0,
                    help="seconds after the window for its samples to arrive and count as delivered")
    ap.add_argument("--repeat", type=int, default=1, help="repetitions per peer and workload")
    ap.add_argument("--point-names", choices=("short", "realistic"), default="realistic",
                    help="short: r0..r99; realistic: register_000 (12 characters)")
    ap.add_argument("--start-limit", type=float, default=90.0, help="seconds a peer has to deliver its first sample")
    ap.add_argument("--install-limit", type=float, default=3600.0, help="seconds to wait for a peer's install")
    ap.add_argument("--serve-modbus", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--units", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--registers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--count-file", type=Path, help=argparse.SUPPRESS)
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == [CLOCK_CHILD_FLAG]:
        return outpost_child(raw[1], raw[2:])
    args = ap.parse_args(argv)
    if args.serve_modbus:
        asyncio.run(serve_modbus(args.serve_modbus, args.units, args.registers, args.count_file))
        return 0
    args.workloads = [x.strip() for x in args.workloads.split(",") if x.strip()]
    args.peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    for x in args.workloads:
        if x not in WORKLOADS:
            ap.error(f"--workloads: unknown workload {x!r} (known: {', '.join(WORKLOADS)})")
    for x in args.peers:
        if x not in ALL_PEERS:
            ap.error(f"--peers: unknown peer {x!r} (known: {', '.join(ALL_PEERS)})")
    PEERS_CACHE.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="outpost-bench-peers-"))
    installs: dict[str, Install] = {}
    if any(p.startswith("thingsboard-") for p in args.peers):
        installs["thingsboard"] = start_install("thingsboard", install_thingsboard,
                                                PEERS_CACHE / "thingsboard-install.log")
    if "telegraf" in args.peers:
        installs["telegraf"] = start_install("telegraf", install_telegraf, PEERS_CACHE / "telegraf-install.log")
    try:
        report = asyncio.run(run(args, base, installs))
        from gateway.clock import read_clock_status

        report.update({"duration_s": args.duration, "warmup_s": args.warmup, "repeat": args.repeat,
                       "point_names": args.point_names, "grace_s": args.grace,
                       "machine_clock_synchronised": read_clock_status().synced})
        print(json.dumps(report, indent=2))
        return 0
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
