"""The end-to-end field scenario: a whole site, a Kafka outage, a `kill -9`, and a full audit.

`python -m tests.e2e.field --json` runs it on services it starts itself (tests/harness) and
prints one JSON object; tests/e2e/test_field.py runs a shortened form on the pytest fixtures.

The site: Modbus devices with `points` counters each, polled at 1 s (RTU over socat pty
pairs, two unit ids per line, and Modbus TCP), one serial-line sensor on a pty, Mosquitto
with a test Sparkplug Primary Host, and Kafka reached by the gateway only through the
Toxiproxy proxy. The gateway is a real `python -m gateway run` subprocess.

Timeline: run `before_cut_s`; cut the Kafka proxy for `outage_s`; `kill -9` the gateway
`kill_after_s` into the outage and start it again `restart_after_s` later; the Primary Host
publishes STATE offline at the kill and online `host_offline_after_restart_s` after the
restart, so the restarted edge node holds its data and must publish it as history after
its births (otherwise the MQTT backlog after a restart may be empty); restore the link;
wait until the Kafka backlog has caught up with live data (the drain time); then freeze
the devices (no new values) and wait until both buffer cursors are at exactly 0.

What "every reading produced" means here (the audit, `analyse()`):
- A reading is (device, point, value). A Modbus register returns a new value on every read
  it serves (see tests/e2e/site.py), so the servers know exactly which values they handed
  to the gateway and when. The serial sensor knows which lines it wrote and when.
- Produced = every value the servers served / the sensor wrote.
- Not guaranteed = values served or written in the crash window. For Modbus: from
  `crash_window_s` before the `kill -9` to the kill (the gateway had them in memory, not yet
  committed to the buffer; DESIGN.md promises only committed samples); they must form one
  uncommitted tail per point (no value lost while a later one from before the kill
  arrived), which the audit checks. For the serial sensor: from `crash_window_s` before the
  kill until the restarted gateway's status shows it reading the sensor again (lines
  written while the port was closed may or may not reach the new driver). The sensor only
  starts writing once the first gateway is up. Such values are counted apart.
- Expected = produced minus not guaranteed. Lost (per uplink) = expected values that the
  independent consumer never saw: kcat on the Kafka topic (json mapping of
  spBv1.0/+/DDATA/#), the Primary Host on MQTT (DDATA only, aliases resolved from the
  DBIRTHs). A delivered value that was never produced is counted as `unexpected`.
- Duplicates: Kafka messages whose `outpost-seq` header was already seen, in contiguous
  runs of at most `batch_max_records` (one window resent after a link failure or the
  crash); MQTT DDATA readings seen twice, allowed only in the session after the crash and
  at most one MQTT batch (200 records) of them.
- Order: per device on Kafka (new outpost-seq and every point's value strictly increasing);
  on MQTT per point within each session and lane (live, historical), since the edge node
  publishes the backlog as history beside live data after a birth, as Sparkplug allows.
- Historical: on MQTT, a DDATA metric whose source timestamp is older than its session's
  NBIRTH by more than `historical_margin_ms` must carry is_historical; DDATA of a device
  only after that device's DBIRTH in the same session; the node's `seq` continuous (mod
  256) from each NBIRTH on (`seq_gaps`).
- No stuck state: at the end, the status socket reports MQTT, Kafka and the Primary Host up,
  both cursors at 0 records, nothing pending in memory, every device online; and no task
  of the supervisor crashed on the way (`task_crashes`, from the status socket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.diagnostics.client import fetch_status
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import CLOCK_MARKER
from tests.e2e.observers import MqttMessage, PrimaryHost, kcat_consume, kcat_headers
from tests.e2e.site import ModbusSite, SerialSensor, point_name
from tests.harness.gateway import GatewayProcess

GROUP = "e2e"
EDGE = "site1"
HOST_ID = "e2e-host"
SERIAL_DEVICE = "sensor1"
MQTT_BATCH_RECORDS = 200  # SparkplugUplink's batch_max_records (not a config key)


@dataclass
class FieldParams:
    rtu_lines: int = 2            # two unit ids per line
    tcp_devices: int = 6
    points: int = 50
    before_cut_s: float = 20.0
    outage_s: float = 60.0
    kill_after_s: float = 25.0    # into the outage
    restart_after_s: float = 5.0  # after the kill
    host_offline_after_restart_s: float = 4.0  # the Primary Host comes back this long after the restart
    request_timeout_s: float = 5.0  # kafka.request_timeout; the uplink's delivery deadline is 2x
    kafka_batch_max_records: int = 500
    crash_window_s: float = 2.0
    historical_margin_ms: int = 1500
    drain_timeout_s: float = 240.0
    final_timeout_s: float = 60.0
    baudrate: int = 19200

    def check(self) -> None:
        longest = max(2 * self.request_timeout_s, 3.0)
        if self.outage_s <= longest + 2:
            raise ValueError(f"outage_s {self.outage_s} must exceed the client timeouts ({longest}s)")
        if not 0 < self.kill_after_s < self.outage_s - self.restart_after_s - self.host_offline_after_restart_s:
            raise ValueError("the kill and the restart must both fall inside the outage")


@dataclass
class Services:
    """What the scenario needs from tests/harness (the pytest fixtures or a Stack)."""

    mqtt_host: str
    mqtt_port: int
    kafka: Any                     # KafkaService: .bootstrap, .proxied_bootstrap, .proxy, .create_topic
    pty_pair: Callable[[str], Any]  # name -> PtyPair (a, b paths)
    kcat: str


# -- the gateway process ----------------------------------------------------------------


# -- configuration ----------------------------------------------------------------------


def gateway_config(params: FieldParams, site: ModbusSite, serial_port: str, services: Services,
                   data_dir: Path, socket_path: Path, kafka_topic: str) -> str:
    lines = [
        "[gateway]",
        f'group_id = "{GROUP}"',
        f'edge_node_id = "{EDGE}"',
        f'data_dir = "{data_dir}"',
        "",
        "[buffer]",
        "max_size_bytes = 500_000_000",
        'max_age = "1d"',
        'flush_interval = "200ms"',
        "",
    ]
    for bus, transport, endpoint, _ in site.buses:
        lines += ["[[buses]]", f'name = "{bus}"', f'transport = "{transport}"', 'timeout = "1s"',
                  'reconnect_min = "200ms"', 'reconnect_max = "2s"']
        if transport == "tcp":
            lines += ['host = "127.0.0.1"', f"port = {endpoint}"]
        else:
            lines += [f'port = "{endpoint}"', f"baudrate = {params.baudrate}"]
        lines.append("")
    for bus, _, _, devices in site.buses:
        for dev, uid in devices:
            lines += ["[[devices]]", f'name = "{dev}"', f'bus = "{bus}"', f"unit_id = {uid}",
                      'interval = "1s"']
            for a in range(params.points):
                lines += ["  [[devices.points]]", f'  name = "{point_name(a)}"', '  table = "holding"',
                          f"  address = {a}", '  type = "uint16"']
            lines.append("")
    lines += [
        "[[devices]]",
        'driver = "serial_line"',
        f'name = "{SERIAL_DEVICE}"',
        f'port = "{serial_port}"',
        "baudrate = 9600",
        'parser = "kv"',
        'offline_after = "30s"',
        "  [[devices.points]]",
        '  name = "count"',
        '  type = "int64"',
        "  [[devices.points]]",
        '  name = "level"',
        '  type = "float64"',
        "",
        "[mqtt]",
        f'servers = ["mqtt://{services.mqtt_host}:{services.mqtt_port}"]',
        'client_id = "outpost-e2e-site1"',
        f'primary_host_id = "{HOST_ID}"',
        'keepalive = "5s"',
        'reconnect_min = "500ms"',
        'reconnect_max = "2s"',
        "historical_max_per_s = 2000",
        "",
        "[kafka]",
        f'bootstrap_servers = ["{services.kafka.proxied_bootstrap}"]',
        'client_id = "outpost-e2e"',
        f'request_timeout = "{params.request_timeout_s}s"',
        'reconnect_min = "500ms"',
        'reconnect_max = "3s"',
        'linger = "50ms"',
        f"batch_max_records = {params.kafka_batch_max_records}",
        "[[kafka.mappings]]",
        'name = "telemetry"',
        'mqtt_topic_filters = ["spBv1.0/+/DDATA/#"]',
        f'kafka_topic = "{kafka_topic}"',
        'format = "json"',
        "",
        "[diagnostics]",
        f'socket_path = "{socket_path}"',
        "",
    ]
    return "\n".join(lines)


# -- the scenario -------------------------------------------------------------------------


@dataclass
class Timeline:
    start: float = 0.0
    ready: float = 0.0
    cut: float = 0.0
    kill: float = 0.0
    restart: float = 0.0
    ready_again: float = 0.0
    host_online: float = 0.0
    restore: float = 0.0
    caught_up: float = 0.0
    frozen: float = 0.0
    drained: float = 0.0


@dataclass
class Observed:
    served: dict[tuple[str, str], list[float]]
    written: list[float]
    mqtt: list[MqttMessage]
    kafka: list[dict[str, Any]]
    timeline: Timeline
    final_status: dict[str, Any]
    statuses: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    gateway: dict[str, Any] = field(default_factory=dict)  # CPU and RSS of the gateway process(es)


async def _status(socket_path: Path) -> dict[str, Any] | None:
    try:
        return await asyncio.to_thread(fetch_status, str(socket_path), 3.0)
    except Exception:
        return None


def _cursor_records(status: dict[str, Any], name: str) -> int | None:
    c = (status.get("buffer") or {}).get("cursors", {}).get(name)
    return None if c is None else int(c.get("records", 0))


def _link_up(status: dict[str, Any], name: str) -> bool:
    return bool((status.get("links") or {}).get(name, {}).get("up"))


async def _wait_status(socket_path: Path, gw: GatewayProcess, what: str, timeout_s: float,
                       check: Callable[[dict[str, Any]], bool], log: list[tuple[float, dict[str, Any]]]
                       ) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        if not gw.alive():
            raise RuntimeError(f"the gateway exited while waiting for {what}; see {gw.log_path}")
        st = await _status(socket_path)
        if st is not None:
            last = st
            log.append((time.time(), st))
            if check(st):
                return st
            # A task the supervisor keeps restarting will not get better by waiting.
            looping = {k: v for k, v in (st.get("tasks") or {}).items() if (v.get("crashes") or 0) >= 3}
            if looping:
                raise RuntimeError(f"gateway task crash loop while waiting for {what}: "
                                   f"{json.dumps(looping, default=str)[:2000]}; log: {gw.log_path}")
        await asyncio.sleep(0.5)
    summary = {k: (last or {}).get(k) for k in ("links", "buffer", "tasks")}
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}; last status: "
                       f"{json.dumps(summary, default=str)[:3000]}; log: {gw.log_path}")


async def run_scenario(services: Services, params: FieldParams, workdir: Path,
                       progress: Callable[[str], None] = lambda _m: None) -> Observed:
    """Run the site and the faults; returns what the servers and the consumers saw."""
    params.check()
    tl = Timeline(start=time.time())
    statuses: list[tuple[float, dict[str, Any]]] = []
    topic = f"outpost.e2e.{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(services.kafka.create_topic, topic, 1)
    proxy = services.kafka.proxy

    site = ModbusSite(params.points)
    sensor: SerialSensor | None = None
    host = PrimaryHost(services.mqtt_host, services.mqtt_port, HOST_ID)
    gw = GatewayProcess(workdir / "outpost.toml", workdir / "gateway.log")
    socket_path = workdir / "outpost.sock"
    try:
        # The site.
        n = 0
        for line in range(params.rtu_lines):
            pair = await asyncio.to_thread(services.pty_pair, f"e2e-rtu{line}")
            gateway_end, server_end = list(pair)
            devices = [(f"rtu{line}-u{uid}", uid) for uid in (1, 2)]
            await site.add_rtu(f"rtu{line}", server_end, gateway_end, devices, params.baudrate)
            n += 2
        for i in range(params.tcp_devices):
            await site.add_tcp(f"tcp{i}", [(f"tcp{i}", 1)])
        serial_pair = await asyncio.to_thread(services.pty_pair, "e2e-serial")
        serial_gateway_end, serial_sensor_end = list(serial_pair)
        sensor = SerialSensor(SERIAL_DEVICE, serial_sensor_end)
        await host.start()

        (workdir / "outpost.toml").write_text(gateway_config(
            params, site, serial_gateway_end, services, workdir / "data", socket_path, topic))

        def all_up(st: dict[str, Any]) -> bool:
            return all(_link_up(st, k) for k in ("mqtt", "kafka", "primary_host"))

        gw.start()
        await _wait_status(socket_path, gw, "MQTT, Kafka and the Primary Host up", 90, all_up, statuses)
        tl.ready = time.time()
        # The sensor starts once the gateway listens: lines written to a pty nobody has opened
        # yet are not readings the gateway could have read.
        sensor.start()
        progress(f"gateway up; running {params.before_cut_s}s before the Kafka cut")
        await asyncio.sleep(params.before_cut_s)

        await asyncio.to_thread(proxy.cut)
        tl.cut = time.time()
        progress(f"Kafka link cut for {params.outage_s}s")
        await asyncio.sleep(params.kill_after_s)
        await gw.kill9()
        tl.kill = time.time()
        # The Primary Host goes offline too, so that the restarted gateway must hold its data
        # until the host is back and then publish it as history after the births.
        await host.set_online(False)
        progress("gateway killed with SIGKILL; Primary Host offline")
        await asyncio.sleep(params.restart_after_s)
        gw.start()
        tl.restart = time.time()
        await _wait_status(socket_path, gw, "the restarted gateway reading the serial sensor", 60,
                           lambda st: (st.get("devices") or {}).get(SERIAL_DEVICE, {}).get("samples", 0) > 0,
                           statuses)
        tl.ready_again = time.time()
        await asyncio.sleep(params.host_offline_after_restart_s)
        await host.set_online(True)
        tl.host_online = time.time()
        progress("gateway restarted; Primary Host online again")
        await asyncio.sleep(max(0.0, tl.cut + params.outage_s - time.time()))
        await asyncio.to_thread(proxy.restore)
        tl.restore = time.time()
        progress("Kafka link restored; waiting for the drain")

        live_records = 3 * (len(site.units) + 1)  # about 3 s of records: one per device per poll

        def caught_up(st: dict[str, Any]) -> bool:
            k = _cursor_records(st, "kafka")
            return all_up(st) and k is not None and k <= live_records

        await _wait_status(socket_path, gw, "the Kafka backlog to drain", params.drain_timeout_s,
                           caught_up, statuses)
        tl.caught_up = time.time()
        progress(f"drained in {tl.caught_up - tl.restore:.1f}s; freezing the devices")

        site.freeze()
        await sensor.stop()
        tl.frozen = time.time()
        await asyncio.sleep(1.5)  # the last poll's records reach the buffer

        def drained(st: dict[str, Any]) -> bool:
            return (all_up(st) and _cursor_records(st, "kafka") == 0 and _cursor_records(st, "mqtt") == 0
                    and (st.get("buffer") or {}).get("pending_in_memory") == 0)

        final = await _wait_status(socket_path, gw, "both cursors at 0", params.final_timeout_s,
                                   drained, statuses)
        tl.drained = time.time()
        await asyncio.sleep(2.0)  # the last PUBACKed messages reach our subscriber
        final = await _status(socket_path) or final
        kafka_messages = await asyncio.to_thread(kcat_consume, services.kcat, services.kafka.bootstrap, topic)
        obs = Observed(
            served=site.served(), written=list(sensor.written), mqtt=list(host.messages),
            kafka=kafka_messages, timeline=tl, final_status=final, statuses=statuses,
        )
    finally:
        await gw.stop()
        if sensor is not None:
            await sensor.stop()
        await host.stop()
        await site.stop()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(proxy.restore)
    obs.gateway = gw.figures()
    return obs


# -- the audit ------------------------------------------------------------------------------

Reading = tuple[str, str, Any]  # (device, point, value)


def _expected(obs: Observed, params: FieldParams) -> tuple[set[Reading], set[Reading], dict[Reading, float]]:
    """(expected, not_guaranteed, serve time of every produced reading); see the module docstring."""
    tl = obs.timeline
    lo = tl.kill - params.crash_window_s
    expected: set[Reading] = set()
    window: set[Reading] = set()
    when: dict[Reading, float] = {}
    for (device, point), times in obs.served.items():
        for i, t in enumerate(times):
            r = (device, point, i + 1)
            when[r] = t
            (window if lo <= t <= tl.kill else expected).add(r)
    for i, t in enumerate(obs.written):
        count = i + 1
        for r in ((SERIAL_DEVICE, "count", count), (SERIAL_DEVICE, "level", count + 0.5)):
            when[r] = t
            (window if lo <= t <= tl.ready_again else expected).add(r)
    return expected, window, when


def _kafka_view(messages: list[dict[str, Any]], batch_max: int) -> dict[str, Any]:
    seen_seq: set[int] = set()
    readings: set[Reading] = set()
    dup_runs: list[int] = []
    in_run = False
    order_errors: list[str] = []
    last_seq: dict[str, int] = {}
    last_value: dict[tuple[str, str], Any] = {}
    for env in messages:
        h = kcat_headers(env)
        seq = int(h["outpost-seq"])
        stream = h["outpost-stream"]
        if seq in seen_seq:
            if not in_run:
                dup_runs.append(0)
                in_run = True
            dup_runs[-1] += 1
            continue
        in_run = False
        seen_seq.add(seq)
        if seq <= last_seq.get(stream, 0):
            order_errors.append(f"{stream}: outpost-seq {seq} after {last_seq[stream]}")
        last_seq[stream] = seq
        doc = json.loads(env["payload"])
        device = stream.rsplit("/", 1)[-1]
        for m in doc["metrics"]:
            key = (device, m["name"])
            v = m["value"]
            if key in last_value and not v > last_value[key]:
                order_errors.append(f"{device}/{m['name']}: {v} after {last_value[key]} (seq {seq})")
            last_value[key] = v
            readings.add((device, m["name"], v))
    return {
        "readings": readings,
        "messages": len(messages),
        "duplicates": sum(dup_runs),
        "duplicate_runs": dup_runs,
        "duplicates_within_allowance": len(dup_runs) <= 2 and all(r <= batch_max for r in dup_runs),
        "order_errors": order_errors,
    }


def _mqtt_view(messages: list[MqttMessage], margin_ms: int) -> dict[str, Any]:
    prefix = f"spBv1.0/{GROUP}/"
    session = 0
    nbirth_ts = 0
    aliases: dict[int, tuple[str, str]] = {}
    born: set[str] = set()
    readings: dict[Reading, int] = defaultdict(int)
    dup_messages_by_session: dict[int, int] = defaultdict(int)
    last: dict[tuple[str, str, int, bool], Any] = {}
    order_errors: list[str] = []
    historical_missing: list[str] = []
    live_marked_historical = 0
    historical_metrics = 0
    data_before_birth: list[str] = []
    seq_gaps = 0
    next_seq: int | None = None
    ddata = 0
    for msg in messages:
        if not msg.topic.startswith(prefix):
            continue
        parts = msg.topic.split("/")  # spBv1.0/group/TYPE/edge[/device]
        mtype, edge = parts[2], parts[3]
        if edge != EDGE:
            continue
        device = parts[4] if len(parts) > 4 else None
        p = pb.Payload.FromString(msg.payload)
        if mtype == "NDEATH":
            next_seq = None
            continue
        if p.HasField("seq"):
            # One seq counter 0..255 for every node message; an NBIRTH starts it again at 0.
            if next_seq is not None and p.seq != next_seq and mtype != "NBIRTH":
                seq_gaps += 1
            next_seq = (p.seq + 1) % 256
        if mtype == "NBIRTH":
            session += 1
            nbirth_ts = p.timestamp
            born = set()
            continue
        if mtype == "DBIRTH":
            for m in p.metrics:
                if m.HasField("alias"):
                    aliases[m.alias] = (device, m.name)
            born.add(device)
            continue
        if mtype != "DDATA":
            continue
        ddata += 1
        if device not in born:
            data_before_birth.append(f"session {session}: DDATA {device} before its DBIRTH")
        all_dup = True
        for m in p.metrics:
            name = m.name if m.HasField("name") else aliases.get(m.alias, (device, f"alias-{m.alias}"))[1]
            if name == CLOCK_MARKER:
                continue  # flags the payload's timestamps (README, "Clock"); not a reading
            kind = m.WhichOneof("value")
            v: Any = getattr(m, kind) if kind else None
            hist = bool(m.is_historical)
            historical_metrics += hist
            r = (device, name, v)
            readings[r] += 1
            if readings[r] == 1:
                all_dup = False
            if m.timestamp < nbirth_ts - margin_ms and not hist:
                historical_missing.append(f"session {session}: {device}/{name}={v} ts {m.timestamp} "
                                          f"< NBIRTH {nbirth_ts} not historical")
            if hist and m.timestamp > nbirth_ts + 2 * margin_ms + 2000:
                live_marked_historical += 1
            key = (device, name, session, hist)
            if key in last and not v > last[key]:
                order_errors.append(f"session {session} {'historical' if hist else 'live'} "
                                    f"{device}/{name}: {v} after {last[key]}")
            last[key] = v
        if all_dup and p.metrics:
            dup_messages_by_session[session] += 1
    duplicates = sum(n - 1 for n in readings.values() if n > 1)
    return {
        "readings": set(readings),
        "sessions": session,
        "ddata_messages": ddata,
        "duplicates": duplicates,
        "duplicate_messages_by_session": dict(dup_messages_by_session),
        "historical_metrics": historical_metrics,
        "historical_missing": historical_missing,
        "live_marked_historical": live_marked_historical,
        "data_before_birth": data_before_birth,
        "order_errors": order_errors,
        "seq_gaps": seq_gaps,
    }


def _uncommitted_tail_ok(window: set[Reading], delivered: set[Reading], obs: Observed) -> int:
    """Window losses that are not a tail: a Modbus value missing while a later one from before the kill arrived."""
    bad = 0
    for (device, point), times in obs.served.items():
        before_kill = [i + 1 for i, t in enumerate(times) if t <= obs.timeline.kill]
        got = [v for v in before_kill if (device, point, v) in delivered]
        top = max(got, default=0)
        bad += sum(1 for v in before_kill if v < top and (device, point, v) not in delivered
                   and (device, point, v) in window)
    return bad


def _task_crashes(obs: Observed) -> dict[str, dict[str, Any]]:
    """Tasks that crashed in either gateway process: highest count seen and the last error."""
    out: dict[str, dict[str, Any]] = {}
    for _, st in [*obs.statuses, (0.0, obs.final_status)]:
        for name, t in (st.get("tasks") or {}).items():
            if (t.get("crashes") or 0) > out.get(name, {}).get("crashes", 0):
                out[name] = {"crashes": t["crashes"], "last_error": t.get("last_error")}
    return out


def analyse(obs: Observed, params: FieldParams) -> dict[str, Any]:
    expected, window, when = _expected(obs, params)
    produced = expected | window
    kafka = _kafka_view(obs.kafka, params.kafka_batch_max_records)
    mqtt = _mqtt_view(obs.mqtt, params.historical_margin_ms)
    uplinks: dict[str, Any] = {}
    for name, view in (("kafka", kafka), ("mqtt", mqtt)):
        got: set[Reading] = view.pop("readings")
        lost = sorted(expected - got, key=lambda r: when[r])
        uplinks[name] = {
            "readings_expected": len(expected),
            "readings_delivered": len(expected & got),
            "readings_lost": len(lost),
            "lost_examples": [f"{d}/{p}={v} served {when[(d, p, v)] - obs.timeline.start:.1f}s" for d, p, v
                              in lost[:10]],
            "crash_window_delivered": len(window & got),
            "crash_window_lost": len(window - got),
            "crash_window_lost_examples": [f"{d}/{p}={v} served {when[(d, p, v)] - obs.timeline.kill:+.1f}s"
                                           f" from the kill" for d, p, v in sorted(window - got, key=str)[:6]],
            "crash_window_non_tail_losses": _uncommitted_tail_ok(window, got, obs),
            "unexpected": len(got - produced),
            "unexpected_examples": [str(r) for r in list(got - produced)[:5]],
            **view,
        }
    tl = obs.timeline
    st = obs.final_status
    buf = st.get("buffer") or {}
    devices = st.get("devices") or {}
    stuck = {
        "links_up": {k: _link_up(st, k) for k in ("mqtt", "kafka", "primary_host")},
        "cursor_records": {k: _cursor_records(st, k) for k in ("mqtt", "kafka")},
        "pending_in_memory": buf.get("pending_in_memory"),
        "dropped": buf.get("dropped"),
        "devices_offline": sorted(d for d, v in devices.items() if not v.get("online")),
        "task_crashes": _task_crashes(obs),
    }
    stuck["ok"] = (all(stuck["links_up"].values()) and stuck["cursor_records"] == {"mqtt": 0, "kafka": 0}
                   and stuck["pending_in_memory"] == 0 and not stuck["devices_offline"])
    return {
        "devices": len({d for d, _ in obs.served}) + 1,
        "points": len(obs.served) + 2,
        "readings_produced": len(produced),
        "readings_not_guaranteed_crash_window": len(window),
        "readings_expected": len(expected),
        "uplinks": uplinks,
        "drain_time_s": round(tl.caught_up - tl.restore, 2),
        "final_drain_time_s": round(tl.drained - tl.frozen, 2),
        "outage_s": round(tl.restore - tl.cut, 1),
        "downtime_s": round(tl.ready_again - tl.kill, 1),
        "run_s": round(tl.drained - tl.start, 1),
        "final_state": stuck,
        "params": asdict(params),
    }


async def run_and_analyse(services: Services, params: FieldParams, workdir: Path,
                          progress: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
    obs = await run_scenario(services, params, workdir, progress)
    report = analyse(obs, params)
    report.update(obs.gateway)
    return report


# -- the program ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.e2e.field", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (the only output mode)")
    ap.add_argument("--outage", type=float, default=60.0, help="seconds the Kafka link is cut")
    ap.add_argument("--before-cut", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs, config, buffer)")
    args = ap.parse_args(argv)

    from tests.harness.common import RunDir
    from tests.harness.stack import Stack
    from tests.harness.tools import kcat_path

    params = FieldParams(outage_s=args.outage, before_cut_s=args.before_cut,
                         kill_after_s=args.outage * 0.4, restart_after_s=min(5.0, args.outage * 0.1))
    work = Path(tempfile.mkdtemp(prefix="outpost-e2e-"))
    stack = Stack(RunDir(work / "services"))
    try:
        services = Services(stack.mosquitto.host, stack.mosquitto.port, stack.kafka,
                            stack.pty_pair, kcat_path())

        def progress(msg: str) -> None:
            print(f"[field {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

        report = asyncio.run(run_and_analyse(services, params, work, progress))
        report["workdir"] = str(work) if args.keep else None
        print(json.dumps(report, indent=2, default=str))
        ok = (all(u["readings_lost"] == 0 for u in report["uplinks"].values()) and report["final_state"]["ok"]
              and not report["final_state"]["task_crashes"])
        return 0 if ok else 1
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
