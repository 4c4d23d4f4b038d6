"""Refusals and poison records (issue 11): a peer that is up and says no, case by case.

`python -m tests.e2e.refusals --json [--short] [--case N ...]` starts its own services
(tests/harness: a Kafka with SASL users, ACLs and no topic auto-creation; a Mosquitto per
case with an ACL file or a `max_packet_size`; an in-process pymodbus server where a case
writes to a device) and runs one case per numbered item of issue 11 against a real
`python -m gateway run`. tests/e2e/test_refusals.py runs the shortened form (`--short`:
fewer readings, shorter refusals, every case) on the pytest fixtures.

Every case prints the same figures:
- `expected`: readings the case's devices produced that the gateway had to deliver: a
  counter point `n` per device (value k is tick k), up to the newest value delivered;
  produced means seen by `outpost tail` on the status socket before the buffer (the
  simulator skips a tick it is too late for), or delivered;
- `delivered`: of those, the readings an independent consumer saw (a gmqtt subscriber on
  MQTT, kcat as the Kafka admin user on Kafka);
- `held`: records of the refused destination held in the buffer just before the refusal
  was lifted (quarantined as `held:<destination>` where the gateway keeps them there,
  else behind the uplink's cursor);
- `quarantined`: records quarantined for good (too large, not encodable; `outpost status`
  buffer.quarantine less the held ones) at the end of the refusal;
- `lost`: expected readings never delivered, not found in the stopped gateway's buffer
  (records after the cursor, quarantined records: late, not lost) and not counted as lost
  by it;
- `healthy_stalled_s`: the longest gap between two deliveries on a destination that was
  not refused, measured by the consumer while the refusal lasted (a healthy 100 ms point
  delivers every ~0.1-0.3 s).
Then `checks` (each true or false, the case passes when all are true), `figures` (what
the checks are computed from) and `error` (a case that could not finish).

A case whose gateway behaviour is not built yet fails with the check that names it; no
case is ever skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gmqtt import Client
from pymodbus.constants import ExcCodes

from drivers.modbus.simserver import SimServer, SimUnit
from gateway.diagnostics.client import fetch_status, tail
from gateway.sparkplug import sparkplug_b_pb2 as pb
from tests.harness.common import REPO_ROOT, RunDir
from tests.harness.gateway import GatewayProcess
from tests.harness.kafka import SecuredKafka
from tests.harness.mosquitto import RefusingMosquitto

GROUP = "refusals"
ALLOW_ALL = "topic readwrite #\n"


@dataclass
class Params:
    short: bool = False
    warmup_s: float = 6.0       # deliveries before the refusal starts
    refuse_s: float = 20.0      # how long a refusal lasts
    backlog_s: float = 20.0     # how long a backlog builds (cases 6, 7, 8)
    pin_s: float = 20.0         # how long the WAL is pinned (case 9)
    drain_timeout_s: float = 120.0
    # Case 8's Kafka batches: small, so that flushing its backlog takes many round trips and
    # the kill lands inside the flush (the test's consumer sees messages in chunks; with 200
    # a fast drain could finish before the consumer saw a quarter of it).
    kafka_batch_max_records: int = 50

    @classmethod
    def shortened(cls) -> Params:
        return cls(short=True, warmup_s=3.0, refuse_s=7.0, backlog_s=8.0, pin_s=8.0,
                   drain_timeout_s=30.0)


@dataclass
class Env:
    """What the cases need from the harness (the pytest fixtures, or a stack of our own)."""

    kafka: SecuredKafka
    kcat: str
    run: RunDir
    work: Path


@dataclass
class CaseResult:
    case: int
    name: str
    expected: int = 0
    delivered: int = 0
    held: int | None = None
    quarantined: int | None = None
    lost: int = 0
    healthy_stalled_s: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(self.checks.values())

    @property
    def failed(self) -> list[str]:
        out = [k for k, v in self.checks.items() if not v]
        if self.error:
            out.append(f"error: {self.error}")
        return out

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["failed"] = self.failed
        return d


# -- observing -----------------------------------------------------------------------------


@dataclass
class Delivery:
    t: float                    # time.monotonic() at the consumer
    device: str
    values: list[Any]           # values of point `n` (or every metric for non-counter devices)
    extra: dict[str, Any] = field(default_factory=dict)


def _metric_value(m: Any) -> Any:
    kind = m.WhichOneof("value")
    return None if kind is None else getattr(m, kind)


class MqttWatcher:
    """A plain gmqtt subscriber: DDATA per device, NBIRTHs, and raw messages of other topics."""

    def __init__(self, host: str, port: int, edge: str, extra_filters: tuple[str, ...] = ()) -> None:
        self.host, self.port, self.edge = host, port, edge
        self.extra_filters = extra_filters
        self.ddata: list[Delivery] = []
        self.births = 0
        self.other: list[tuple[float, str, bytes]] = []
        self._client: Client | None = None

    async def start(self) -> None:
        client = Client(f"watch-{uuid.uuid4().hex[:8]}")
        # No reconnect task of gmqtt's own: after a broker restart the case calls reconnect().
        client.set_config({"reconnect_retries": -2, "reconnect_delay": 3600})
        subscribed = asyncio.Event()

        def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
            now = time.monotonic()
            parts = topic.split("/")
            if topic.startswith("spBv1.0/") and len(parts) >= 4 and parts[3] == self.edge:
                if parts[2] == "NBIRTH":
                    self.births += 1
                elif parts[2] == "DDATA" and len(parts) == 5:
                    p = pb.Payload()
                    p.ParseFromString(payload)
                    named = [(m.name, _metric_value(m)) for m in p.metrics]
                    values = [v for n, v in named if n == "n"] or [v for _, v in named]
                    # Sparkplug sends a backlog as history beside live data: order is kept
                    # per lane, so the audit checks it per lane.
                    historical = any(m.is_historical for m in p.metrics)
                    self.ddata.append(Delivery(now, parts[4], values,
                                               {"bytes": len(payload), "metrics": len(named),
                                                "historical": historical}))
            elif not topic.startswith("spBv1.0/"):
                self.other.append((now, topic, bytes(payload)))
            return 0

        client.on_message = on_message
        client.on_subscribe = lambda *_a, **_k: subscribed.set()
        await client.connect(self.host, self.port, keepalive=30)
        self._client = client
        client.subscribe(f"spBv1.0/{GROUP}/#", qos=1)
        await asyncio.wait_for(subscribed.wait(), 10)
        for f in self.extra_filters:
            subscribed.clear()
            client.subscribe(f, qos=1)
            await asyncio.wait_for(subscribed.wait(), 10)

    async def reconnect(self) -> None:
        """A new connection and subscriptions (after the broker restarted); data is kept."""
        await self.stop()
        await self.start()

    async def publish(self, topic: str, payload: bytes) -> None:
        assert self._client is not None
        self._client.publish(topic, payload, qos=1)
        await asyncio.sleep(0)

    async def stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.disconnect(), 5)


class KafkaWatcher:
    """kcat as the Kafka admin user, reading one topic from the beginning as it arrives."""

    def __init__(self, env: Env, topic: str) -> None:
        self.env, self.topic = env, topic
        self.messages: list[Delivery] = []
        self.headers: list[dict[str, str]] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self.env.kcat, "-C", *self.env.kafka.kcat_args("admin"), "-t", self.topic,
            "-o", "beginning", "-J", "-u", "-q", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL,
            limit=16 * 1024 * 1024)
        self._task = asyncio.create_task(self._read(), name=f"kcat:{self.topic}")

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        async for line in self._proc.stdout:
            now = time.monotonic()
            line = line.strip()
            if not line:
                continue
            env = json.loads(line)
            raw = env.get("headers") or []
            headers = {raw[i]: raw[i + 1] for i in range(0, len(raw) - 1, 2)}
            try:
                doc = json.loads(env.get("payload") or "null")
            except ValueError:
                doc = None
            device = (headers.get("outpost-stream") or "").rsplit("/", 1)[-1]
            values: list[Any] = []
            if isinstance(doc, dict):
                named = [(m.get("name"), m.get("value")) for m in doc.get("metrics", [])]
                values = [v for n, v in named if n == "n"] or [v for _, v in named]
            self.headers.append(headers)
            self.messages.append(Delivery(now, device, values, {"seq": headers.get("outpost-seq"),
                                                                "stream": headers.get("outpost-stream")}))

    async def stop(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._proc.wait(), 5)
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


def of_device(deliveries: list[Delivery], device: str) -> list[Delivery]:
    return [d for d in deliveries if d.device == device]


class SampleTail:
    """`outpost tail --point n` on the gateway's socket: every counter value the devices
    produced, seen before the buffer (the reference for `expected`: the simulator skips a
    tick it was too late for, and such a value was never produced)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.values: dict[str, set[int]] = {}
        self.dropped = 0
        self.connected = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"tail:{socket.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Before the gateway stops: the closed socket then ends the thread."""
        self._stopping.set()

    def join(self) -> None:
        self._thread.join(10)

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                for ev in tail(str(self.socket), point="n", timeout_s=5):
                    self.connected = True
                    if "dropped" in ev:
                        self.dropped += int(ev["dropped"])
                        continue
                    smp = ev.get("sample", ev)
                    if isinstance(smp.get("value"), int | float):
                        self.values.setdefault(str(smp.get("device")), set()).add(int(smp["value"]))
            except Exception:
                if self.connected or self._stopping.is_set():
                    return  # the gateway went away
                time.sleep(0.02)

    def produced(self, device: str) -> set[int] | None:
        return None if self.dropped or device not in self.values else self.values[device]


def counter_audit(deliveries: list[Delivery], produced: set[int] | None = None) -> dict[str, Any]:
    """Counter values 0, 1, 2, ... in arrival order: holes, duplicates, order (per lane:
    live and historical Sparkplug messages are two lanes; Kafka has one).

    Expected: every value up to the newest delivered one that was produced: seen by the
    tail (`produced`), delivered, or older than the first value the tail saw (it connects
    a moment after the devices start). Without a tail, every value from 0 up.
    """
    seen: list[int] = [int(v) for d in deliveries for v in d.values if isinstance(v, int | float)]
    lanes: dict[bool, list[int]] = {}
    for d in deliveries:
        lanes.setdefault(bool(d.extra.get("historical")), []).extend(
            int(v) for v in d.values if isinstance(v, int | float))
    distinct = set(seen)
    top = max(distinct, default=-1)
    if produced:
        expected = {v for v in produced | distinct | set(range(min(produced))) if v <= top}
    else:
        expected = set(range(top + 1))
    holes = sorted(expected - distinct)
    dups = 0
    got: set[int] = set()
    dup_values: list[int] = []
    for v in seen:
        if v in got:
            dups += 1
            dup_values.append(v)
        else:
            got.add(v)
    inversions = []
    for lane in lanes.values():
        firsts: list[int] = []
        met: set[int] = set()
        for v in lane:
            if v not in met:
                met.add(v)
                firsts.append(v)
        inversions += [(a, b) for a, b in itertools.pairwise(firsts) if a >= b]
    return {"max": top, "expected": len(expected), "delivered": len(distinct & expected),
            "reference": "tail" if produced else "contiguous",
            "holes": len(holes), "hole_examples": holes[:8], "duplicates": dups,
            "duplicate_range": [min(dup_values), max(dup_values)] if dup_values else None,
            "in_order": not inversions, "order_examples": inversions[:5],
            "arrival_head": seen[:12], "_holes": holes}


async def poll_until(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll a condition on what the observers collected; True when it held in time."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval_s)
    return True


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time without a delivery inside [start, end]."""
    inside = sorted(t for t in times if start <= t <= end)
    points = [start, *inside, end]
    return round(max((b - a for a, b in itertools.pairwise(points)), default=end - start), 2)


# -- the gateway ---------------------------------------------------------------------------


def sim_device(name: str, interval: str = "100ms", extra_points: int = 0) -> str:
    """A simulator device with a counter point `n` (value = tick) and optional more counters."""
    out = ["[[devices]]", 'driver = "simulator"', f'name = "{name}"', f'interval = "{interval}"',
           "[[devices.points]]", 'name = "n"', 'waveform = "counter"', 'type = "uint64"']
    if extra_points:
        out += ["[[devices.points]]", 'name = "p"', 'waveform = "counter"', 'type = "uint64"',
                f"count = {extra_points}"]
    return "\n".join(out) + "\n"


@dataclass
class KafkaSetup:
    mappings: list[tuple[str, str, str]] = field(default_factory=list)  # (name, filter, topic)
    inbound: list[dict[str, Any]] = field(default_factory=list)
    batch_max_bytes: int | None = None
    batch_max_records: int = 200
    bootstrap: str | None = None  # default: the secured broker


class Gateway:
    """One `outpost run` of a case: its config, its process, its status socket."""

    def __init__(self, env: Env, case: int, *, mqtt_url: str | None, devices: str,
                 kafka: KafkaSetup | None = None, buses: str = "", buffer: str = "") -> None:
        self.env = env
        self.case = case
        self.edge = f"c{case}"
        self.folder = Path(tempfile.mkdtemp(prefix=f"c{case}-", dir=env.work))
        self.data_dir = self.folder / "data"
        self.socket = self.folder / "s.sock"
        self.config_path = self.folder / "outpost.toml"
        self.client_id = f"outpost-rf-c{case}-{uuid.uuid4().hex[:6]}"
        self.mqtt_url, self.devices, self.kafka, self.buses, self.buffer = (
            mqtt_url, devices, kafka, buses, buffer)
        self.proc = GatewayProcess(self.config_path, self.folder / "gateway.log")
        self.tail: SampleTail | None = None  # the first run's
        self.write_config()

    def config_text(self) -> str:
        lines = ["[gateway]", f'group_id = "{GROUP}"', f'edge_node_id = "{self.edge}"',
                 f'data_dir = "{self.data_dir}"', "", "[buffer]", 'flush_interval = "100ms"',
                 self.buffer, ""]
        if self.mqtt_url:
            lines += ["[mqtt]", f'servers = ["{self.mqtt_url}"]', f'client_id = "{self.client_id}"',
                      'protocol = "5"', "use_aliases = false", 'keepalive = "5s"',
                      'reconnect_min = "200ms"', 'reconnect_max = "1s"', ""]
        if self.kafka is not None:
            k = self.kafka
            pw = self.folder / "kafka.pw"
            pw.write_text(self.env.kafka.users["outpost"] + "\n")
            lines += ["[kafka]", f'bootstrap_servers = ["{k.bootstrap or self.env.kafka.bootstrap}"]',
                      f'client_id = "outpost-rf-c{self.case}"', 'security_protocol = "SASL_PLAINTEXT"',
                      'sasl_mechanism = "PLAIN"', 'sasl_username = "outpost"',
                      f'sasl_password_file = "{pw}"', 'request_timeout = "5s"',
                      'reconnect_min = "200ms"', 'reconnect_max = "2s"', 'linger = "50ms"',
                      f"batch_max_records = {k.batch_max_records}"]
            if k.batch_max_bytes:
                lines.append(f"batch_max_bytes = {k.batch_max_bytes}")
            for name, flt, topic in k.mappings:
                lines += ["[[kafka.mappings]]", f'name = "{name}"', f'mqtt_topic_filters = ["{flt}"]',
                          f'kafka_topic = "{topic}"', 'format = "json"']
            for inb in k.inbound:
                lines.append("[[kafka.inbound]]")
                lines += [f"{key} = {json.dumps(v)}" for key, v in inb.items()]
            lines.append("")
        lines += [self.buses, self.devices, "[diagnostics]", f'socket_path = "{self.socket}"', ""]
        return "\n".join(lines)

    def write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    def ddata_filter(self, device: str) -> str:
        return f"spBv1.0/{GROUP}/DDATA/{self.edge}/{device}"

    def start(self) -> None:
        self.proc.start()
        if self.tail is None:
            self.tail = SampleTail(self.socket)
            self.tail.start()

    def produced(self, device: str) -> set[int] | None:
        return None if self.tail is None else self.tail.produced(device)

    def audit(self, deliveries: list[Delivery], device: str) -> dict[str, Any]:
        return counter_audit(of_device(deliveries, device), self.produced(device))

    async def stop(self) -> None:
        if self.tail is not None:
            self.tail.stop()
        await self.proc.stop()
        if self.tail is not None:
            await asyncio.to_thread(self.tail.join)

    async def status(self) -> dict[str, Any] | None:
        try:
            return await asyncio.to_thread(fetch_status, str(self.socket), 3.0)
        except Exception:
            return None

    async def wait(self, check: Callable[[dict[str, Any]], bool], timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"the gateway exited while waiting for {what}: "
                                   f"{_log_tail(self.proc.log_path)}")
            st = await self.status()
            if st is not None:
                last = st
                try:
                    if check(st):
                        return st
                except (KeyError, TypeError, AttributeError):
                    pass
            await asyncio.sleep(0.3)
        brief = {k: (last or {}).get(k) for k in ("links", "buffer")}
        raise TimeoutError(f"{what}: not reached in {timeout_s:.0f}s; last status "
                           f"{json.dumps(brief, default=str)[:1500]}")

    def log_text(self) -> str:
        try:
            return self.proc.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _log_tail(path: Path, n: int = 15) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def link(st: dict[str, Any] | None, name: str) -> dict[str, Any]:
    return ((st or {}).get("links") or {}).get(name) or {}


def cursor_records(st: dict[str, Any] | None, name: str) -> int | None:
    c = (((st or {}).get("buffer") or {}).get("cursors") or {}).get(name)
    return None if c is None else int(c.get("records", 0))


def quarantined(st: dict[str, Any] | None) -> int | None:
    """Records quarantined for good (not `held:`), as `outpost status` shows them (None: no
    quarantine in status)."""
    return quarantine_split(st)[1]


def quarantine_split(st: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(held, quarantined): records in the quarantine because their destination refused
    them (reason `held:<destination>`, delivered in order once it accepts), and records no
    retry can deliver (too large, not encodable). (None, None): no quarantine in status."""
    q = ((st or {}).get("buffer") or {}).get("quarantine")
    if not isinstance(q, dict):
        return None, None
    by_reason = q.get("by_reason") or {}
    held = sum(int(v) for k, v in by_reason.items() if str(k).startswith("held"))
    return held, int(q.get("records") or 0) - held


def held_records(st: dict[str, Any] | None, cursor: str) -> int | None:
    """Records a refused destination holds: in the quarantine as `held:...` where the
    gateway holds them there, else behind the uplink's cursor."""
    held, _ = quarantine_split(st)
    if held:
        return held
    return cursor_records(st, cursor)


def task_crashes(st: dict[str, Any] | None) -> dict[str, int]:
    return {k: int(v.get("crashes") or 0) for k, v in ((st or {}).get("tasks") or {}).items()
            if isinstance(v, dict) and (v.get("crashes") or 0)}


def refused_of(st: dict[str, Any] | None, uplink: str) -> dict[str, Any]:
    return link(st, uplink).get("refused") or {}


def run_cli(config: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, check=False)


def run_cli_sub(config: Path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """A subcommand whose options come after its own words (`buffer quarantine retry`)."""
    return subprocess.run([sys.executable, "-m", "gateway", *args[:1], "--config", str(config), *args[1:]],
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT, check=False)


# -- a Modbus server whose reads and writes are timed --------------------------------------


class TimedStore:
    """Duck-typed pymodbus server context: holding registers per unit, every read and write
    timed (time.monotonic()), writes optionally slow (a serial line's turnaround)."""

    def __init__(self, tables: dict[int, dict[int, int]], write_delay_s: float = 0.0) -> None:
        self.tables = tables
        self.write_delay_s = write_delay_s
        self.reads: dict[int, list[float]] = {uid: [] for uid in tables}
        self.writes: list[tuple[float, int, int, list[int]]] = []

    def device_ids(self) -> list[int]:
        return list(self.tables)

    async def async_getValues(self, device_id: int, func_code: int, address: int, count: int = 1) -> Any:
        table = self.tables.get(device_id)
        if table is None:
            return ExcCodes.ILLEGAL_ADDRESS
        try:
            values = [table[a] for a in range(address, address + count)]
        except KeyError:
            return ExcCodes.ILLEGAL_ADDRESS
        if func_code == 3:
            self.reads[device_id].append(time.monotonic())
        return values

    async def async_setValues(self, device_id: int, func_code: int, address: int, values: list[int]) -> Any:
        table = self.tables.get(device_id)
        if table is None or any(a not in table for a in range(address, address + len(values))):
            return ExcCodes.ILLEGAL_ADDRESS
        if self.write_delay_s:
            await asyncio.sleep(self.write_delay_s)
        for i, v in enumerate(values):
            table[address + i] = int(v)
        self.writes.append((time.monotonic(), device_id, address, [int(v) for v in values]))
        return None


async def modbus_server(store: TimedStore) -> SimServer:
    server = await SimServer.tcp({uid: SimUnit() for uid in store.tables})
    server.server.context = store  # serve our timed tables instead of SimServer's
    return server


def modbus_bus(port: int) -> str:
    return ("[[buses]]\nname = \"plc-bus\"\ntransport = \"tcp\"\nhost = \"127.0.0.1\"\n"
            f"port = {port}\ntimeout = \"1s\"\n")


def ascii_registers(text: str, registers: int) -> list[int]:
    raw = text.encode().ljust(2 * registers, b" ")[: 2 * registers]
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


def dcmd_payload(metrics: list[tuple[str, int, int]], bad_property_on: str | None = None) -> bytes:
    """A DCMD payload: (name, datatype code, integer value) per metric; `bad_property_on`
    gets a property whose type (9999) no Sparkplug version defines."""
    p = pb.Payload()
    p.timestamp = int(time.time() * 1000)
    for name, dt, value in metrics:
        m = p.metrics.add()
        m.name = name
        m.datatype = dt
        m.int_value = value
        if name == bad_property_on:
            m.properties.keys.append("odd")
            v = m.properties.values.add()
            v.type = 9999
            v.int_value = 1
    return p.SerializeToString()


UINT16 = 6  # Sparkplug DataType UInt16


# -- the cases -----------------------------------------------------------------------------

CaseFn = Callable[[Env, Params, CaseResult], Awaitable[None]]
CASES: dict[int, tuple[str, CaseFn]] = {}


def case(n: int, name: str) -> Callable[[CaseFn], CaseFn]:
    def register(fn: CaseFn) -> CaseFn:
        CASES[n] = (name, fn)
        return fn
    return register


def unique(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def stored_readings(db: Path, cursor: str) -> dict[str, set[int]] | None:
    """Counter values still in a stopped gateway's buffer for `cursor`: records after its
    cursor and its quarantined (held) records. An undelivered reading found here is not lost
    (nothing stored is lost), only late. None: the file could not be read."""
    out: dict[str, set[int]] = {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            row = c.execute("SELECT acked_seq FROM cursors WHERE name = ?", (cursor,)).fetchone()
            acked = row[0] if row else 0
            rows = c.execute("SELECT s.name, r.payload FROM records r JOIN streams s ON s.id = r.stream_id "
                             "WHERE r.seq > ?", (acked,)).fetchall()
            with contextlib.suppress(sqlite3.OperationalError):  # a buffer without a quarantine
                rows += c.execute("SELECT s.name, q.payload FROM quarantine q JOIN streams s ON "
                                  "s.id = q.stream_id WHERE q.cursor = ?", (cursor,)).fetchall()
    except sqlite3.Error:
        return None
    for stream, payload in rows:
        p = pb.Payload()
        with contextlib.suppress(Exception):
            p.ParseFromString(payload)
        vals = {int(_metric_value(m)) for m in p.metrics if m.name == "n"
                and isinstance(_metric_value(m), int | float)}
        out.setdefault(stream.rsplit("/", 1)[-1], set()).update(vals)
    return out


def salvage_book(db: Path) -> dict[str, int] | None:
    """Records salvaged from moved-aside files and records counted lost by the salvage."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as c:
            rec, lost, files = c.execute("SELECT coalesce(sum(records), 0), coalesce(sum(lost), 0), "
                                         "count(*) FROM salvaged").fetchone()
            return {"files": int(files), "records": int(rec), "lost": int(lost)}
    except sqlite3.Error:
        return None


def discount_stored(r: CaseResult, audits: dict[str, dict[str, Any]], stored: dict[str, set[int]] | None) -> None:
    """After fill_counters and the gateway's stop: a reading not delivered but still stored
    in the buffer is late, not lost (`pending_in_buffer`)."""
    if stored is None:
        r.figures["stored_after_stop"] = "unreadable"
        return
    pending = 0
    for d, a in audits.items():
        missing = set(a.get("_missing", []))
        late = missing & stored.get(d, set())
        a["pending_in_buffer"] = len(late)
        a["holes"] -= len(late)
        pending += len(late)
    r.lost = sum(a["holes"] for a in audits.values())
    r.figures["pending_in_buffer_after_stop"] = pending


def fill_counters(r: CaseResult, audits: dict[str, dict[str, Any]]) -> None:
    """Sum the per-device audits into the case's figures.

    The simulator skips a tick it was too late for (an event loop that stalled beyond one
    interval; counted as an overrun), and one driver ticks every simulated device, so a
    skipped tick is missing on every device whose values went past it. Such a value was
    never produced and is not a loss: a hole of one device is a skipped tick when every
    other device that got past that value misses it too (and at least one did).
    """
    holes = {d: set(a.pop("_holes")) for d, a in audits.items()}
    skipped: set[int] = set()
    for d, hs in holes.items():
        if audits[d]["reference"] == "tail":
            continue  # the tail saw what was produced: a hole is a loss
        for v in hs:
            others = [e for e, a in audits.items() if e != d and a["max"] >= v
                      and a["reference"] != "tail"]
            if others and all(v in holes[e] for e in others):
                skipped.add(v)
    for d, a in audits.items():
        mine = {v for v in skipped if v <= a["max"]} if a["reference"] != "tail" else set()
        a["skipped_by_source"] = len(mine)
        a["expected"] -= len(mine)
        a["holes"] = len(holes[d] - mine)
        a["hole_examples"] = sorted(holes[d] - mine)[:8]
        a["_missing"] = sorted(holes[d] - mine)
    r.expected = sum(a["expected"] for a in audits.values())
    r.delivered = sum(a["delivered"] for a in audits.values())
    r.lost = sum(a["holes"] for a in audits.values())
    r.figures["ticks_skipped_by_the_simulator"] = len(skipped)
    r.figures["audit"] = audits


@case(1, "mqtt_acl_denies_ddata")
async def case_mqtt_acl(env: Env, p: Params, r: CaseResult) -> None:
    """Mosquitto (MQTT 5) denies one device's DDATA and the bridge's Kafka->MQTT topic."""
    edge = "c1"
    deny = (f"topic deny spBv1.0/{GROUP}/DDATA/{edge}/refused\n"
            "topic read site/in/#\n"
            "topic readwrite spBv1.0/#\n")
    broker = RefusingMosquitto(env.run, f"mosq-c1-{uuid.uuid4().hex[:4]}", deny).start()
    cmd_topic = unique("c1.in")
    group = unique("c1-bridge")
    await asyncio.to_thread(env.kafka.create_topic, cmd_topic)
    n_cmds = 5
    await asyncio.to_thread(env.kafka.produce, cmd_topic,
                            [json.dumps({"k": i}).encode() for i in range(n_cmds)], b"k1")
    await asyncio.to_thread(env.kafka.commit, group, cmd_topic, 0)  # the gateway starts at 0
    gw = Gateway(env, 1, mqtt_url=broker.url, devices=sim_device("healthy") + sim_device("refused"),
                 kafka=KafkaSetup(inbound=[{"name": "tomqtt", "kafka_topics": [cmd_topic],
                                            "group_id": group, "action": "mqtt_publish",
                                            "mqtt_topic_template": "site/in/{key}"}]))
    watch = MqttWatcher(broker.host, broker.port, edge, ("site/in/#",))
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "mqtt")["up"], 30, "mqtt up")
        t0 = time.monotonic()
        connects_at_start = broker.connections(gw.client_id)
        await asyncio.sleep(p.refuse_s)
        st = await gw.status()
        t1 = time.monotonic()
        r.checks["no reconnect during the refusal"] = broker.connections(gw.client_id) == connects_at_start
        refused_seen = of_device(watch.ddata, "refused")
        r.held = held_records(st, "mqtt")
        r.quarantined = quarantined(st)
        r.healthy_stalled_s = longest_gap([d.t for d in of_device(watch.ddata, "healthy")], t0 + 2, t1)
        mq = link(st, "mqtt")
        inbound = link(st, "inbound:tomqtt")
        committed_while = await asyncio.to_thread(env.kafka.committed, group, cmd_topic)
        r.checks["refused DDATA not delivered while denied"] = not refused_seen
        r.checks["refused DDATA not counted as published (held in the buffer)"] = (r.held or 0) > 0
        r.checks["link up while refused"] = bool(mq.get("up"))
        r.checks["status names the refused topic"] = any("/refused" in t for t in mq.get("refused") or {})
        r.checks["bridge: no offset committed for refused publishes"] = committed_while in (None, 0)
        r.checks["bridge: refused publishes not counted as published"] = (
            (inbound.get("counters") or {}).get("published", 0) == 0)
        r.checks["bridge: nothing reached the subscriber while denied"] = not watch.other
        broker.set_acl(ALLOW_ALL)
        t_lift = time.monotonic()
        try:
            await gw.wait(lambda s: (held_records(s, "mqtt") or 0) < 20 and not refused_of(s, "mqtt"),
                          p.drain_timeout_s, "mqtt drained after the lift")
            drained = True
        except (TimeoutError, RuntimeError) as exc:
            drained = False
            r.figures["drain_error"] = str(exc)[:600]
        r.checks["held records drained after the lift"] = drained
        await poll_until(lambda: len(watch.other) >= n_cmds, p.drain_timeout_s)
        committed_after = await asyncio.to_thread(env.kafka.committed, group, cmd_topic)
        await asyncio.sleep(1.0)
        healthy = gw.audit(watch.ddata, "healthy")
        refused = gw.audit(watch.ddata, "refused")
        fill_counters(r, {"healthy": healthy, "refused": refused})
        held_end = held_records(await gw.status(), "mqtt")
        await gw.stop()
        discount_stored(r, {"healthy": healthy, "refused": refused},
                        await asyncio.to_thread(stored_readings, gw.data_dir / "buffer.db", "mqtt"))
        bridged = [json.loads(payload)["k"] for _t, _topic, payload in watch.other]
        r.checks["refused device delivered in order after the lift"] = refused["in_order"] and refused["holes"] == 0
        r.checks["refused device caught up with the healthy one"] = refused["max"] >= healthy["max"] - 30
        r.checks["healthy device stalled at most 2 s"] = (r.healthy_stalled_s or 99) <= 2.0
        r.checks["no task crash"] = not task_crashes(await gw.status())
        r.checks["bridge: every refused message delivered in order after the lift"] = (
            bridged[:n_cmds] == list(range(n_cmds)))
        r.checks["bridge: offsets committed after the lift"] = committed_after == n_cmds
        r.checks["lost == 0"] = r.lost == 0
        r.figures.update({"held_at_end": held_end,
                          "bridged_after_lift": bridged, "committed_while_refused": committed_while,
                          "committed_after_lift": committed_after, "lift_to_drained_s":
                          round(time.monotonic() - t_lift, 1), "mqtt_refused": mq.get("refused"),
                          "inbound_counters": inbound.get("counters"),
                          "task_crashes": task_crashes(st)})
    finally:
        await gw.stop()
        await watch.stop()
        broker.stop()


@case(2, "mqtt_record_larger_than_max_packet_size")
async def case_mqtt_too_large(env: Env, p: Params, r: CaseResult) -> None:
    """One record larger than the broker's max_packet_size: quarantined, the rest flows."""
    edge = "c2"
    # Above the NBIRTH (about 1.5 kB with the node metrics) and every DBIRTH.
    limit = 2048
    # 20 strings of 250 characters: one change of > 5000 bytes. A poll's 20 requests may
    # straddle the change, so it can reach the uplink as two records: each over the limit.
    strings, length = 20, 125
    table = {a: 0x2020 for a in range(strings * length)}
    store = TimedStore({1: table})
    server = await modbus_server(store)
    points = "".join(f'[[devices.points]]\nname = "s{i}"\ntable = "holding"\naddress = {i * length}\n'
                     f'type = "string"\nlength = {length}\n' for i in range(strings))
    devices = (sim_device("healthy") + sim_device("twin") + "[[devices]]\nname = \"big\"\nbus = \"plc-bus\"\n"
               'unit_id = 1\ninterval = "200ms"\n' + points)
    broker = RefusingMosquitto(env.run, f"mosq-c2-{uuid.uuid4().hex[:4]}", ALLOW_ALL,
                               max_packet_size=limit).start()
    gw = Gateway(env, 2, mqtt_url=broker.url, devices=devices, buses=modbus_bus(server.port))
    watch = MqttWatcher(broker.host, broker.port, edge)
    try:
        await watch.start()
        gw.start()
        st0 = await gw.wait(lambda s: link(s, "mqtt")["up"] and (s.get("devices") or {}).get("big", {}).get("online"),
                            30, "mqtt up and the Modbus device read")
        await asyncio.sleep(p.warmup_s)
        st0 = await gw.status()
        connects0, bdseq0 = broker.connections(gw.client_id), link(st0, "mqtt").get("bdseq")
        t0 = time.monotonic()
        for i in range(strings):  # all at once: one or two records, each over the limit
            for a, v in enumerate(ascii_registers(chr(ord("A") + i) * (2 * length), length)):
                table[i * length + a] = v
        await asyncio.sleep(1.5)
        for i in range(strings):  # back to short values: small records again
            for a, v in enumerate(ascii_registers(f"ok{i}", length)):
                table[i * length + a] = v
        await asyncio.sleep(p.refuse_s)
        t1 = time.monotonic()
        st = await gw.status()
        r.quarantined = quarantined(st)
        r.held = cursor_records(st, "mqtt")
        r.healthy_stalled_s = longest_gap([d.t for d in of_device(watch.ddata, "healthy")], t0, t1)
        big = of_device(watch.ddata, "big")
        big_after = [d for d in big if d.t > t0]
        short_seen = any(isinstance(v, str) and v.startswith("ok") for d in big_after for v in d.values)
        r.checks["oversized record quarantined (status buffer.quarantine)"] = (r.quarantined or 0) >= 1
        r.checks["later records of the same device delivered"] = short_seen
        r.checks["healthy device stalled at most 2 s"] = (r.healthy_stalled_s or 99) <= 2.0
        r.checks["no reconnect storm (CONNECTs unchanged)"] = broker.connections(gw.client_id) == connects0
        r.checks["bdSeq unchanged"] = link(st, "mqtt").get("bdseq") == bdseq0
        r.checks["mqtt cursor not stuck behind it"] = (r.held or 0) < 50
        r.figures.update({"limit_bytes": limit, "connects": broker.connections(gw.client_id) - connects0,
                          "mqtt_counters": link(st, "mqtt").get("counters"),
                          "mqtt_refused": link(st, "mqtt").get("refused"),
                          "largest_ddata_bytes": max((d.extra["bytes"] for d in watch.ddata), default=0)})
        # The readings up to here; the restart below starts the simulator's counters over.
        fill_counters(r, {d: gw.audit(watch.ddata, d) for d in ("healthy", "twin")})
        # Lift: the operator raises the broker's limit, stops the gateway, re-sends the
        # quarantine (`outpost buffer quarantine retry`) and starts it again.
        await gw.stop()
        await asyncio.to_thread(broker.restart, max_packet_size=None)
        await watch.reconnect()
        retry = await asyncio.to_thread(run_cli_sub, gw.config_path, "buffer", "quarantine", "retry")
        r.figures["quarantine_retry"] = {"rc": retry.returncode, "out": (retry.stdout + retry.stderr)[-400:]}
        gw.start()
        long_seen = await poll_until(lambda: any(
            isinstance(v, str) and len(v) >= 2 * length for d in of_device(watch.ddata, "big") for v in d.values),
            p.drain_timeout_s)
        r.checks["quarantined record delivered after the limit is raised and it is re-sent"] = long_seen
        r.expected += 1  # the oversized record's reading
        r.delivered += int(long_seen)
        r.lost += int(not long_seen and not r.quarantined)
        r.checks["lost == 0"] = r.lost == 0
    finally:
        await gw.stop()
        await watch.stop()
        broker.stop()
        await server.stop()


async def _sample_connections(pid_of: Callable[[], int | None], port: int, seen: set[int],
                              stop: asyncio.Event) -> None:
    """Local ports of the gateway's TCP connections to `port`: each new one is a new client."""
    import psutil

    while not stop.is_set():
        pid = pid_of()
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                for c in psutil.Process(pid).net_connections(kind="tcp"):
                    if c.raddr and c.raddr.port == port:
                        seen.add(c.laddr.port)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


@case(3, "kafka_topic_not_authorised_and_missing")
async def case_kafka_topics(env: Env, p: Params, r: CaseResult) -> None:
    """One mapping's topic is denied to the gateway, another's does not exist."""
    ok_t, denied_t, missing_t = unique("c3.ok"), unique("c3.denied"), unique("c3.missing")
    for t in (ok_t, denied_t):
        await asyncio.to_thread(env.kafka.create_topic, t)
    await asyncio.to_thread(env.kafka.refuse_topic, denied_t)
    gw = Gateway(env, 3, mqtt_url=None,
                 devices=sim_device("healthy") + sim_device("denied") + sim_device("missing"),
                 kafka=KafkaSetup(mappings=[("ok", f"spBv1.0/{GROUP}/DDATA/c3/healthy", ok_t),
                                            ("denied", f"spBv1.0/{GROUP}/DDATA/c3/denied", denied_t),
                                            ("missing", f"spBv1.0/{GROUP}/DDATA/c3/missing", missing_t)]))
    watchers = {"healthy": KafkaWatcher(env, ok_t), "denied": KafkaWatcher(env, denied_t)}
    ports: set[int] = set()
    stop_sampling = asyncio.Event()
    sampler = None
    lifted = False
    try:
        for w in watchers.values():
            await w.start()
        gw.start()
        kport = int(env.kafka.bootstrap.rsplit(":", 1)[1])
        sampler = asyncio.create_task(_sample_connections(
            lambda: gw.proc.proc.pid if gw.proc.proc is not None else None, kport, ports, stop_sampling),
            name="c3-connections")
        await gw.wait(lambda s: "kafka" in (s.get("links") or {}), 30, "kafka link in status")
        # The stall is measured from the healthy topic's first message on (the gateway's
        # start is not a stall), over the whole refusal, probes of the refused topics included.
        await poll_until(lambda: bool(watchers["healthy"].messages), 30)
        t0 = watchers["healthy"].messages[0].t if watchers["healthy"].messages else time.monotonic()
        await asyncio.sleep(max(p.refuse_s, 10.0))
        t1 = time.monotonic()
        st = await gw.status()
        k = link(st, "kafka")
        r.held = held_records(st, "kafka")
        r.quarantined = quarantined(st)
        r.healthy_stalled_s = longest_gap([d.t for d in watchers["healthy"].messages], t0, t1)
        refused = k.get("refused") or {}
        r.checks["healthy mapping delivered while the others are refused"] = bool(watchers["healthy"].messages)
        r.checks["healthy mapping stalled at most 3 s"] = (r.healthy_stalled_s or 99) <= 3.0
        r.checks["link shown up"] = bool(k.get("up"))
        r.checks["status names the denied topic"] = any(denied_t in d for d in refused)
        r.checks["status names the missing topic"] = any(missing_t in d for d in refused)
        r.checks["few connections opened (no producer storm)"] = len(ports) <= 10
        r.checks["no task crash"] = not task_crashes(st)
        r.figures.update({"connections_opened_while_refused": len(ports), "kafka_refused": refused,
                          "kafka_counters": k.get("counters"), "kafka_last_error": k.get("last_error"),
                          "task_crashes": task_crashes(st)})
        # Lift both refusals.
        await asyncio.to_thread(env.kafka.lift_topic_refusal, denied_t)
        await asyncio.to_thread(env.kafka.create_topic, missing_t)
        lifted = True
        watchers["missing"] = KafkaWatcher(env, missing_t)
        await watchers["missing"].start()
        with contextlib.suppress(TimeoutError):
            await gw.wait(lambda s: not refused_of(s, "kafka") and (held_records(s, "kafka") or 0) < 50,
                          p.drain_timeout_s, "kafka drained after the lift")
        await asyncio.sleep(2.0)
        audits = {name: gw.audit(w.messages, name) for name, w in watchers.items()}
        fill_counters(r, audits)
        top = audits["healthy"]["max"]
        for name in ("denied", "missing"):
            a = audits[name]
            r.checks[f"{name} topic delivered in order after the lift"] = (
                a["in_order"] and a["holes"] == 0 and a["max"] >= top - 30)
        r.checks["lost == 0"] = r.lost == 0
    finally:
        stop_sampling.set()
        if sampler is not None:
            await sampler
        await gw.stop()
        for w in watchers.values():
            await w.stop()
        if not lifted:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(env.kafka.lift_topic_refusal, denied_t)


@case(4, "malformed_kafka_command_and_dcmd")
async def case_malformed_commands(env: Env, p: Params, r: CaseResult) -> None:
    """A 5000-digit JSON integer before a valid Kafka command; a DCMD with an unknown datatype."""
    edge = "c4"
    table = {a: 0 for a in range(6)}
    store = TimedStore({1: table})
    server = await modbus_server(store)
    points = "".join(f'[[devices.points]]\nname = "sp{i}"\ntable = "holding"\naddress = {i}\n'
                     'type = "uint16"\nwritable = true\n' for i in range(6))
    devices = "[[devices]]\nname = \"plc\"\nbus = \"plc-bus\"\nunit_id = 1\ninterval = \"500ms\"\n" + points
    broker = RefusingMosquitto(env.run, f"mosq-c4-{uuid.uuid4().hex[:4]}", ALLOW_ALL).start()
    cmd_topic, group = unique("c4.cmd"), unique("c4-cmd")
    await asyncio.to_thread(env.kafka.create_topic, cmd_topic)
    bad = b'{"device": "plc", "point": "sp0", "value": ' + b"7" * 5000 + b"}"
    good = json.dumps({"device": "plc", "point": "sp1", "value": 42}).encode()
    await asyncio.to_thread(env.kafka.produce, cmd_topic, [bad, good])
    await asyncio.to_thread(env.kafka.commit, group, cmd_topic, 0)
    gw = Gateway(env, 4, mqtt_url=broker.url, devices=devices, buses=modbus_bus(server.port),
                 kafka=KafkaSetup(inbound=[{"name": "cmds", "kafka_topics": [cmd_topic], "group_id": group,
                                            "action": "device_command"}]))
    watch = MqttWatcher(broker.host, broker.port, edge)
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "mqtt")["up"] and watch.births > 0, 30, "mqtt up and born")
        await poll_until(lambda: any(w[2] == 1 for w in store.writes), 30)
        await asyncio.sleep(1.0)
        committed = await asyncio.to_thread(env.kafka.committed, group, cmd_topic)
        written_sp1 = [w for w in store.writes if w[2] == 1]
        r.checks["valid Kafka command behind the malformed one written"] = (
            bool(written_sp1) and written_sp1[-1][3] == [42])
        r.checks["offsets committed past both"] = committed == 2
        r.checks["malformed one never written"] = not any(w[2] == 0 for w in store.writes)
        # Two DCMDs: an unknown metric datatype (9999) on sp2 beside a valid sp3; a property
        # of unknown type (9999) on sp4 beside a valid sp5.
        dcmd = f"spBv1.0/{GROUP}/DCMD/{edge}/plc"
        await watch.publish(dcmd, dcmd_payload([("sp2", 9999, 5), ("sp3", UINT16, 7)]))
        await watch.publish(dcmd, dcmd_payload([("sp4", UINT16, 9), ("sp5", UINT16, 11)], bad_property_on="sp4"))
        await poll_until(lambda: {3, 5} <= {w[2] for w in store.writes}, 15)
        await asyncio.sleep(0.5)
        st = await gw.status()
        by_addr = {w[2]: w[3] for w in store.writes}
        r.checks["DCMD: valid metric beside an unknown metric datatype applied"] = by_addr.get(3) == [7]
        r.checks["DCMD: valid metric beside a property of unknown type applied"] = by_addr.get(5) == [11]
        r.checks["DCMD: unknown datatype not written"] = 2 not in by_addr
        r.checks["no task crash"] = not task_crashes(st)
        r.checks["gateway still running"] = gw.proc.alive()
        r.figures["sp4_with_unknown_property_type_written"] = 4 in by_addr
        r.expected, r.delivered = 3, len({w[2] for w in store.writes} & {1, 3, 5})
        r.lost = r.expected - r.delivered
        r.checks["lost == 0"] = r.lost == 0
        r.figures.update({"committed": committed, "writes": [(w[1], w[2], w[3]) for w in store.writes],
                          "inbound_counters": link(st, "inbound:cmds").get("counters"),
                          "mqtt_counters": link(st, "mqtt").get("counters"), "task_crashes": task_crashes(st)})
    finally:
        await gw.stop()
        await watch.stop()
        broker.stop()
        await server.stop()


@case(5, "kafka_record_larger_than_batch_max_bytes")
async def case_kafka_too_large(env: Env, p: Params, r: CaseResult) -> None:
    """A record larger than `batch_max_bytes`: counted (quarantined) and visible."""
    # `json` records of this device take ~2.5 kB with short strings, ~10 kB with the long ones.
    strings, length = 16, 125
    table = {a: 0x2020 for a in range(strings * length)}
    store = TimedStore({1: table})
    server = await modbus_server(store)
    points = "".join(f'[[devices.points]]\nname = "s{i}"\ntable = "holding"\naddress = {i * length}\n'
                     f'type = "string"\nlength = {length}\n' for i in range(strings))
    devices = (sim_device("healthy") + sim_device("twin") + "[[devices]]\nname = \"big\"\nbus = \"plc-bus\"\n"
               'unit_id = 1\ninterval = "200ms"\n' + points)
    topic = unique("c5.t")
    await asyncio.to_thread(env.kafka.create_topic, topic)
    setup = KafkaSetup(mappings=[("all", f"spBv1.0/{GROUP}/DDATA/c5/#", topic)], batch_max_bytes=4096)
    gw = Gateway(env, 5, mqtt_url=None, devices=devices, buses=modbus_bus(server.port), kafka=setup)
    watch = KafkaWatcher(env, topic)
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "kafka").get("up") and (s.get("devices") or {}).get("big", {}).get("online"),
                      40, "kafka up and the Modbus device read")
        await asyncio.sleep(p.warmup_s)
        t0 = time.monotonic()
        # One change, all at once; a poll's 16 requests may straddle it, so the change can reach
        # Kafka as two records. Quotes double in JSON: each half is still over 4 kB.
        for i in range(strings):
            for a, v in enumerate(ascii_registers(chr(ord("A") + i) + '"' * (2 * length - 1), length)):
                table[i * length + a] = v
        await asyncio.sleep(1.5)
        for i in range(strings):
            for a, v in enumerate(ascii_registers(f"ok{i}", length)):
                table[i * length + a] = v
        await asyncio.sleep(p.refuse_s)
        t1 = time.monotonic()
        st = await gw.status()
        k = link(st, "kafka")
        r.quarantined = quarantined(st)
        r.held = cursor_records(st, "kafka")
        r.healthy_stalled_s = longest_gap([d.t for d in of_device(watch.messages, "healthy")], t0, t1)
        big_after = [d for d in of_device(watch.messages, "big") if d.t > t0]
        r.checks["oversized record quarantined (status buffer.quarantine)"] = (r.quarantined or 0) >= 1
        counters = k.get("counters") or {}
        r.checks["oversized record counted in the uplink's status"] = (
            counters.get("quarantined", 0) + counters.get("refused", 0) >= 1)
        r.checks["later records of the same device delivered"] = any(
            isinstance(v, str) and v.startswith("ok") for d in big_after for v in d.values)
        r.checks["healthy device stalled at most 2 s"] = (r.healthy_stalled_s or 99) <= 2.0
        r.figures.update({"kafka_counters": k.get("counters"), "kafka_last_error": k.get("last_error")})
        fill_counters(r, {d: gw.audit(watch.messages, d) for d in ("healthy", "twin")})
        # Lift: the gateway stopped, a larger batch_max_bytes, the quarantine re-sent
        # (`outpost buffer quarantine retry`), the gateway started again.
        await gw.stop()
        gw.kafka = KafkaSetup(mappings=setup.mappings, batch_max_bytes=1_000_000)
        gw.write_config()
        retry = await asyncio.to_thread(run_cli_sub, gw.config_path, "buffer", "quarantine", "retry")
        r.figures["quarantine_retry"] = {"rc": retry.returncode, "out": (retry.stdout + retry.stderr)[-400:]}
        gw.start()
        long_seen = await poll_until(lambda: any(
            isinstance(v, str) and len(v) >= 2 * length for d in of_device(watch.messages, "big") for v in d.values),
            p.drain_timeout_s)
        r.checks["quarantined record delivered after the limit is raised and it is re-sent"] = long_seen
        r.expected += 1
        r.delivered += int(long_seen)
        r.lost += int(not long_seen and not r.quarantined)
        r.checks["lost == 0"] = r.lost == 0
    finally:
        await gw.stop()
        await watch.stop()
        await server.stop()


def damage_pages(path: Path, fraction_from: float = 0.3, fraction_to: float = 0.7, every: int = 3) -> list[int]:
    """Garbage over every `every`-th page between two fractions of the buffer file, where
    only old, unsent records live (not the first pages: the schema; not the last: where
    appends go), such that the running gateway meets it on its next read of those records.

    Its connection keeps recent pages in its cache and in the WAL, so first a truncating
    checkpoint moves every page into the file, then the pages are overwritten, then a write
    of the same `user_version` makes every other connection drop its page cache.
    """
    with contextlib.closing(sqlite3.connect(str(path), timeout=10, isolation_level=None)) as c:
        busy, _frames, _done = c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            raise RuntimeError(f"{path}: the truncating checkpoint was blocked by a reader")
        page = c.execute("PRAGMA page_size").fetchone()[0]
        pages = path.stat().st_size // page
        hit = list(range(max(2, int(pages * fraction_from)), int(pages * fraction_to), every))
        with open(path, "r+b") as f:
            for n in hit:
                f.seek(n * page)
                f.write(b"\xff" * page)
            f.flush()
            os.fsync(f.fileno())
        version = c.execute("PRAGMA user_version").fetchone()[0]
        c.execute(f"PRAGMA user_version = {int(version)}")
    return hit


@case(6, "buffer_corruption_met_by_uplink_reads")
async def case_corruption(env: Env, p: Params, r: CaseResult) -> None:
    """Pages holding unsent records are damaged while the gateway runs; the uplink reads them."""
    edge = "c6"
    broker = RefusingMosquitto(env.run, f"mosq-c6-{uuid.uuid4().hex[:4]}",
                               f"topic deny spBv1.0/{GROUP}/DDATA/{edge}/#\ntopic readwrite #\n").start()
    devices = "".join(sim_device(f"d{i}", extra_points=30) for i in range(6))
    gw = Gateway(env, 6, mqtt_url=broker.url, devices=devices)
    watch = MqttWatcher(broker.host, broker.port, edge)
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "mqtt")["up"], 30, "mqtt up")
        await asyncio.sleep(p.backlog_s)
        st = await gw.status()
        r.held = cursor_records(st, "mqtt")
        db = gw.data_dir / "buffer.db"
        hit = await asyncio.to_thread(damage_pages, db)
        await asyncio.sleep(1.0)
        broker.set_acl(ALLOW_ALL)
        t_lift = time.monotonic()
        drained = True
        try:
            st = await gw.wait(lambda s: cursor_records(s, "mqtt") is not None
                               and cursor_records(s, "mqtt") + (held_records(s, "mqtt") or 0) < 50,
                               p.drain_timeout_s, "mqtt drained after the lift")
        except (TimeoutError, RuntimeError) as exc:
            drained = False
            r.figures["drain_error"] = str(exc)[:500]
            st = await gw.status()
        await asyncio.sleep(1.0)
        buf = (st or {}).get("buffer") or {}
        audits = {f"d{i}": gw.audit(watch.ddata, f"d{i}") for i in range(6)}
        fill_counters(r, audits)
        alive = gw.proc.alive()
        await gw.stop()
        discount_stored(r, audits, await asyncio.to_thread(stored_readings, gw.data_dir / "buffer.db", "mqtt"))
        counted_lost = 0
        salv = buf.get("salvage") or buf.get("salvaged")
        if isinstance(salv, dict):
            counted_lost = int(salv.get("lost") or 0)
        # What the buffer itself recorded of its salvages (`salvaged` table of the new file).
        book = await asyncio.to_thread(salvage_book, gw.data_dir / "buffer.db")
        r.figures["salvage_book"] = book
        if salv is None and book is not None:
            salv = book["records"]
            counted_lost = max(counted_lost, book["lost"])
        dropped = buf.get("dropped") or {}
        counted_lost += sum(int(v) for k, v in dropped.items() if "corrupt" in k or "lost" in k)
        # A record holds ~2 samples of `n` per device (100 ms points, 100 ms flushes, jitter).
        r.figures.update({"pages_damaged": len(hit), "salvaged": salv, "dropped": dropped,
                          "buffer_keys": sorted(buf), "counted_lost_records": counted_lost,
                          "readings_missing": r.lost, "task_crashes": task_crashes(st),
                          "gateway_alive": alive, "lift_to_drained_s": round(time.monotonic() - t_lift, 1)})
        r.quarantined = quarantined(st)
        uncounted = max(0, r.lost - 3 * counted_lost)
        r.lost = uncounted
        r.checks["gateway alive, no crash loop"] = alive and all(v < 3 for v in task_crashes(st).values())
        r.checks["buffer recovered: uplink drained after the lift"] = drained
        # Readable unsent records come back (salvaged); what the damage took is counted as
        # lost by the buffer. Where the garbage lands decides which: never neither.
        salvaged_any = bool(salv if not isinstance(salv, dict) else salv.get("records"))
        r.checks["unsent records salvaged, or counted lost where unreadable"] = (
            salvaged_any or counted_lost > 0)
        r.checks["every missing reading counted as lost by the buffer"] = uncounted == 0
        r.checks["lost == 0"] = r.lost == 0
    finally:
        await gw.stop()
        await watch.stop()
        broker.stop()


@case(7, "uplink_removed_by_reload")
async def case_uplink_removed(env: Env, p: Params, r: CaseResult) -> None:
    """A Kafka backlog, then [kafka] removed from the configuration and SIGHUP."""
    edge = "c7"
    from tests.harness.common import free_port

    dead = f"127.0.0.1:{free_port()}"  # nothing listens: the Kafka backlog grows
    broker = RefusingMosquitto(env.run, f"mosq-c7-{uuid.uuid4().hex[:4]}", ALLOW_ALL).start()
    gw = Gateway(env, 7, mqtt_url=broker.url, devices=sim_device("healthy") + sim_device("other"),
                 kafka=KafkaSetup(mappings=[("all", f"spBv1.0/{GROUP}/DDATA/{edge}/#", "c7.t")], bootstrap=dead))
    watch = MqttWatcher(broker.host, broker.port, edge)
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "mqtt")["up"], 30, "mqtt up")
        await asyncio.sleep(p.backlog_s)
        gw.kafka = None
        gw.write_config()
        check = await asyncio.to_thread(run_cli, gw.config_path, "check")
        before = await gw.status()
        backlog = cursor_records(before, "kafka") or 0
        t0 = time.monotonic()
        assert gw.proc.proc is not None
        os.kill(gw.proc.proc.pid, signal.SIGHUP)
        st = await gw.wait(lambda s: "kafka" not in ((s.get("buffer") or {}).get("cursors") or {}), 30,
                           "the kafka cursor gone after the reload")
        await asyncio.sleep(p.warmup_s)
        t1 = time.monotonic()
        dropped = (st.get("buffer") or {}).get("dropped") or {}
        counted = sum(int(v) for k, v in dropped.items() if "uplink" in k or "removed" in k)
        r.held = backlog
        r.healthy_stalled_s = longest_gap([d.t for d in of_device(watch.ddata, "healthy")], t0, t1)
        r.expected = backlog
        r.delivered = 0
        r.lost = max(0, backlog - counted)  # records dropped without a counted reason
        says = check.stdout + check.stderr
        log_line = any("uplink" in line and ("drop" in line or "removed" in line) and "kafka" in line
                       for line in gw.log_text().splitlines())
        r.checks["backlog dropped only with a counted reason"] = backlog > 0 and counted >= backlog
        r.checks["a log line says so"] = log_line
        r.checks["`outpost check` says how many records the reload would drop"] = any(
            str(n) in says for n in range(max(1, backlog - 2000), backlog + 2000)) and "drop" in says.lower()
        r.checks["mqtt stalled at most 3 s by the reload"] = (r.healthy_stalled_s or 99) <= 3.0
        r.checks["lost == 0"] = r.lost == 0
        r.figures.update({"backlog_records": backlog, "dropped": dropped, "check_output": says[-600:]})
    finally:
        await gw.stop()
        await watch.stop()
        broker.stop()


@case(8, "kill9_during_backlog_flush")
async def case_kill_during_flush(env: Env, p: Params, r: CaseResult) -> None:
    """A Kafka backlog (topic denied), the denial lifted, `kill -9` during the flush."""
    topic = unique("c8.t")
    await asyncio.to_thread(env.kafka.create_topic, topic)
    await asyncio.to_thread(env.kafka.refuse_topic, topic)
    n_dev = 12
    devices = "".join(sim_device(f"d{i}") for i in range(n_dev))
    gw = Gateway(env, 8, mqtt_url=None, devices=devices,
                 kafka=KafkaSetup(mappings=[("all", f"spBv1.0/{GROUP}/DDATA/c8/#", topic)],
                                  batch_max_records=p.kafka_batch_max_records))
    watch = KafkaWatcher(env, topic)
    lifted = False
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: (held_records(s, "kafka") or 0) > 0, 30, "records for kafka")
        await asyncio.sleep(p.backlog_s)
        st = await gw.status()
        r.held = held_records(st, "kafka")
        await asyncio.to_thread(env.kafka.lift_topic_refusal, topic)
        lifted = True
        target = max(50, (r.held or 0) // 4)
        await poll_until(lambda: len(watch.messages) >= target, p.drain_timeout_s, 0.05)
        at_kill = len(watch.messages)
        await gw.proc.kill9()
        await asyncio.sleep(1.0)
        gw.start()
        try:
            await gw.wait(lambda s: (held_records(s, "kafka") or 0) < 100, p.drain_timeout_s,
                          "kafka drained after the restart")
            r.checks["drained after the restart"] = True
        except (TimeoutError, RuntimeError) as exc:
            r.checks["drained after the restart"] = False
            r.figures["drain_error"] = str(exc)[:600]
        await asyncio.sleep(2.0)
        keys = [(h.get("outpost-stream"), h.get("outpost-seq")) for h in watch.headers]
        dup = len(keys) - len(set(keys))
        # The restarted simulator counts from 0 again: audit the first run's values only.
        first_run = [d for d in watch.messages if d.extra.get("seq") is not None]
        r.figures.update({"backlog_records": r.held, "messages_at_kill": at_kill, "messages": len(keys),
                          "duplicates": dup, "batch_max_records": p.kafka_batch_max_records})
        seq_holes = 0
        seqs_by_stream: dict[str, set[int]] = {}
        for s, q in keys:
            if s and q:
                seqs_by_stream.setdefault(s, set()).add(int(q))
        all_seqs = sorted(q for v in seqs_by_stream.values() for q in v)
        if all_seqs:
            seq_holes = len(set(range(all_seqs[0], all_seqs[-1] + 1)) - set(all_seqs))
        r.expected = len(set(all_seqs)) + seq_holes
        r.delivered = len(set(all_seqs))
        r.lost = seq_holes
        r.figures["outpost_seq_holes"] = seq_holes
        r.figures["records_seen"] = len(first_run)
        r.checks["kill happened during the flush"] = 0 < at_kill < (r.held or 0)
        r.checks["at most one batch re-sent"] = dup <= p.kafka_batch_max_records
        r.checks["no outpost-seq hole"] = seq_holes == 0
        r.checks["lost == 0"] = r.lost == 0
    finally:
        await gw.stop()
        await watch.stop()
        if not lifted:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(env.kafka.lift_topic_refusal, topic)


@case(9, "reader_pins_the_wal")
async def case_pinned_wal(env: Env, p: Params, r: CaseResult) -> None:
    """An sqlite3 reader holds a read transaction on the buffer (field diagnosis)."""
    edge = "c9"
    broker = RefusingMosquitto(env.run, f"mosq-c9-{uuid.uuid4().hex[:4]}", ALLOW_ALL).start()
    # Enough data that the WAL passes the buffer's checkpoint size (4 MB) while pinned.
    devices = "".join(sim_device(f"d{i}", extra_points=40) for i in range(8))
    gw = Gateway(env, 9, mqtt_url=broker.url, devices=devices)
    watch = MqttWatcher(broker.host, broker.port, edge)
    reader: sqlite3.Connection | None = None
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "mqtt")["up"], 30, "mqtt up")
        await asyncio.sleep(p.warmup_s)
        reader = sqlite3.connect(str(gw.data_dir / "buffer.db"), timeout=5, check_same_thread=False)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM records").fetchone()  # a snapshot: the WAL is pinned
        t0 = time.monotonic()
        wal: list[int] = []
        pinned_seen = False
        stored0 = ((await gw.status()) or {}).get("buffer", {}).get("stored", 0)
        # Pinned for pin_s, and longer (up to 4x) until the WAL passed 6 MB: by then the
        # buffer tried at least one checkpoint against the reader.
        while (time.monotonic() - t0 < p.pin_s
               or (max(wal, default=0) < 6 * 2**20 and time.monotonic() - t0 < 4 * p.pin_s)):
            st = await gw.status()
            buf = (st or {}).get("buffer") or {}
            wal.append(int(buf.get("wal_bytes") or 0))
            pinned_seen = pinned_seen or bool(buf.get("wal_pinned"))
            await asyncio.sleep(0.5)
        t1 = time.monotonic()
        st = await gw.status()
        stored1 = ((st or {}).get("buffer") or {}).get("stored", 0)
        reader.rollback()
        reader.close()
        reader = None
        gaps = [longest_gap([d.t for d in of_device(watch.ddata, f"d{i}")], t0, t1) for i in range(8)]
        r.healthy_stalled_s = max(gaps)
        await asyncio.sleep(min(15.0, p.pin_s))
        after = []
        for _ in range(10):
            st = await gw.status()
            after.append(int(((st or {}).get("buffer") or {}).get("wal_bytes") or 0))
            await asyncio.sleep(0.5)
        audits = {f"d{i}": gw.audit(watch.ddata, f"d{i}") for i in range(8)}
        fill_counters(r, audits)
        r.held = cursor_records(st, "mqtt")
        r.quarantined = quarantined(st)
        r.checks["writer not stalled: deliveries kept coming (gap <= 2 s)"] = r.healthy_stalled_s <= 2.0
        r.checks["records kept being stored while pinned"] = stored1 > stored0
        r.checks["WAL passed the checkpoint size while pinned"] = max(wal, default=0) >= 6 * 2**20
        r.checks["pinned WAL reported in status"] = pinned_seen
        r.checks["WAL bounded after release (<= 8 MB)"] = min(after, default=1 << 40) <= 8 * 2**20
        r.checks["lost == 0"] = r.lost == 0
        r.figures.update({"wal_bytes_max_while_pinned": max(wal, default=0), "wal_bytes_after": after[-1:],
                          "pinned_s": round(t1 - t0, 1),
                          "stored_while_pinned": stored1 - stored0, "gaps_s": gaps})
    finally:
        if reader is not None:
            reader.close()
        await gw.stop()
        await watch.stop()
        broker.stop()


@case(10, "dcmd_with_500_metrics")
async def case_big_dcmd(env: Env, p: Params, r: CaseResult) -> None:
    """One DCMD with 500 metrics; a 100 ms point on the same bus must keep its schedule."""
    edge = "c10"
    n = 500
    table1 = {a: 0 for a in range(n)}
    store = TimedStore({1: table1, 2: {0: 1}}, write_delay_s=0.01)
    server = await modbus_server(store)
    points = "".join(f'[[devices.points]]\nname = "w{i}"\ntable = "holding"\naddress = {i}\n'
                     'type = "uint16"\nwritable = true\n' for i in range(n))
    devices = ("[[devices]]\nname = \"plc\"\nbus = \"plc-bus\"\nunit_id = 1\ninterval = \"5s\"\n" + points +
               "[[devices]]\nname = \"fast\"\nbus = \"plc-bus\"\nunit_id = 2\ninterval = \"100ms\"\n"
               '[[devices.points]]\nname = "v"\ntable = "holding"\naddress = 0\ntype = "uint16"\n')
    broker = RefusingMosquitto(env.run, f"mosq-c10-{uuid.uuid4().hex[:4]}", ALLOW_ALL).start()
    gw = Gateway(env, 10, mqtt_url=broker.url, devices=devices, buses=modbus_bus(server.port))
    watch = MqttWatcher(broker.host, broker.port, edge)
    try:
        await watch.start()
        gw.start()
        await gw.wait(lambda s: link(s, "mqtt")["up"] and watch.births > 0, 30, "mqtt up and born")
        await asyncio.sleep(p.warmup_s)
        t0 = time.monotonic()
        await watch.publish(f"spBv1.0/{GROUP}/DCMD/{edge}/plc",
                            dcmd_payload([(f"w{i}", UINT16, i + 1) for i in range(n)]))
        window = max(8.0, p.refuse_s)
        await asyncio.sleep(window)
        t1 = time.monotonic()
        fast_reads = store.reads[2]
        r.healthy_stalled_s = longest_gap(fast_reads, t0, t1)
        writes = [w for w in store.writes if w[1] == 1]
        await poll_until(lambda: len({w[2] for w in store.writes if w[1] == 1}) >= n,
                         p.drain_timeout_s / 2, 0.5)
        writes = [w for w in store.writes if w[1] == 1]
        written = {w[2]: w[3][-1] for w in writes}
        st = await gw.status()
        r.expected = n
        r.delivered = sum(1 for a, v in written.items() if v == a + 1)
        r.lost = n - r.delivered
        r.checks["100 ms point polled on schedule during the writes (gap <= 1 s)"] = r.healthy_stalled_s <= 1.0
        r.checks["every point written with its value"] = r.lost == 0
        r.checks["no task crash"] = not task_crashes(st)
        r.checks["lost == 0"] = r.lost == 0
        span = round(writes[-1][0] - writes[0][0], 2) if writes else None
        r.figures.update({"writes": len(writes), "write_span_s": span,
                          "fast_reads_in_window": sum(1 for t in fast_reads if t0 <= t <= t1),
                          "window_s": round(t1 - t0, 1), "mqtt_counters": link(st, "mqtt").get("counters")})
    finally:
        await gw.stop()
        await watch.stop()
        broker.stop()
        await server.stop()


# -- running ---------------------------------------------------------------------------------


async def run_case(n: int, env: Env, params: Params) -> CaseResult:
    name, fn = CASES[n]
    r = CaseResult(n, name)
    started = time.monotonic()
    try:
        await fn(env, params, r)
    except Exception as exc:
        r.error = f"{type(exc).__name__}: {exc}"[:1500]
        r.figures["traceback"] = traceback.format_exc()[-1500:]
    for a in (r.figures.get("audit") or {}).values():
        if isinstance(a, dict):
            a.pop("_missing", None)
    r.seconds = round(time.monotonic() - started, 1)
    return r


def main_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


async def run_all(env: Env, params: Params, cases: list[int],
                  progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    results = []
    for n in cases:
        progress(f"case {n} {CASES[n][0]}")
        res = await run_case(n, env, params)
        progress(f"case {n}: {'ok' if res.ok else 'FAILED ' + '; '.join(res.failed)} ({res.seconds}s)")
        results.append(res)
    return {
        "commit": main_commit(),
        "short": params.short,
        "cases": [r.as_dict() for r in results],
        "matrix": [{k: r.as_dict()[k] for k in ("case", "name", "ok", "expected", "delivered", "held",
                                                 "quarantined", "lost", "healthy_stalled_s", "failed")}
                   for r in results],
        "passed": sum(r.ok for r in results),
        "failed": sum(not r.ok for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.refusals", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    ap.add_argument("--short", action="store_true", help="fewer readings, shorter refusals, every case")
    ap.add_argument("--case", type=int, action="append", choices=sorted(CASES), help="run only these")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs, buffers)")
    args = ap.parse_args(argv)

    from tests.harness.tools import kcat_path

    params = Params.shortened() if args.short else Params()
    work = Path(tempfile.mkdtemp(prefix="rf-"))
    run = RunDir(work / "services")
    kafka = SecuredKafka(run)

    def progress(msg: str) -> None:
        print(f"[refusals {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    try:
        progress("starting the secured Kafka")
        kafka.start()
        env = Env(kafka, kcat_path(), run, work)
        report = asyncio.run(run_all(env, params, args.case or sorted(CASES), progress))
        report["workdir"] = str(work) if args.keep else None
        print(json.dumps(report, indent=2, default=str))
        return 0 if report["failed"] == 0 else 1
    finally:
        kafka.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
