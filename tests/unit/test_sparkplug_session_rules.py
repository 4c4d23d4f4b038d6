"""The Sparkplug session's per-record rules, against a recording stand-in for the MQTT connection.

What is checked here is decided record by record inside one batch, where a real broker cannot
make the timing deterministic: DATA stops before the very next record once a rebirth is asked,
a skipped corrupt record uses up no seq, a device without DBIRTH gets no DATA (its records wait),
and the Primary Host's STATE is kept per server and reset per connection.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.base import PointInfo, Sample
from gateway.pipeline.report import ReportByException
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import NodeIdentity
from gateway.sparkplug.node import PrimaryHostState
from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload
from gateway.uplinks.mqtt.sparkplug import MqttUplinkSettings, SparkplugUplink

NODE = NodeIdentity("g", "e")
POINTS = {"m1": [PointInfo("v", "float64")], "m2": [PointInfo("on", "bool")]}
REBIRTH = encode_payload(Payload(timestamp=1, metrics=[Metric("Node Control/Rebirth", DataType.Boolean, True)]))


@dataclass
class Rec:
    seq: int
    stream: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"type": "DDATA"})


class FakeConn:
    """Records every PUBLISH; PUBACKs at once; `on_publish` runs after each one."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.published: list[tuple[str, bytes, int]] = []
        self.on_publish: Any = None

    def inflight_limit(self) -> int:
        return 20

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> asyncio.Future[int] | None:
        self.published.append((topic, payload, qos))
        if self.on_publish is not None:
            self.on_publish(len(self.published))
        if qos == 0:
            return None
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.set_result(0)
        return fut

    async def until(self, aw: Any, limit_s: float | None = None) -> Any:
        return await asyncio.wait_for(aw, limit_s)


def uplink(tmp_path: Path, **kw: Any) -> tuple[SparkplugUplink, FakeConn]:
    async def write(*_a: object) -> None:
        pass

    s = MqttUplinkSettings("g", "e", str(tmp_path), ["mqtt://127.0.0.1:1"], **kw)
    up = SparkplugUplink(s, None, POINTS, write)
    conn = FakeConn()
    up._conn = conn  # type: ignore[assignment]
    up._born = set(POINTS)
    up._seq.reset()  # as after an NBIRTH: the next DATA is seq 1
    return up, conn


def records(device: str, n: int, first_seq: int = 1) -> list[Rec]:
    rbe = ReportByException(NODE, POINTS)
    out = []
    for i in range(n):
        point = POINTS[device][0]
        value: Any = float(i) if point.datatype == "float64" else bool(i % 2)
        rbe.offer(Sample(device, point.name, value, 1_700_000_000_000 + i))
        (r,) = rbe.drain()
        out.append(Rec(first_seq + i, r.stream, r.payload))
    return out


def seq_of(payload: bytes) -> int:
    p = pb.Payload()
    p.ParseFromString(payload)
    return p.seq


async def test_rebirth_stops_data_at_once(tmp_path: Path) -> None:
    up, conn = uplink(tmp_path)
    conn.on_publish = lambda n: up._on_ncmd(REBIRTH) if n == 3 else None
    stop, refused = await up._publish_batch(conn, records("m1", 10))  # type: ignore[arg-type]
    assert len(conn.published) == 3, "DATA went on after the rebirth request"
    assert stop == 4 and refused is False   # the caller's position stops before record 4
    assert up._rebirth_requested
    up._on_ncmd(REBIRTH)                     # a second request before the NBIRTH: merged
    assert up.counters["rebirths"] == 2 and up._rebirth_requested


async def test_seq_is_taken_only_for_a_stamped_record(tmp_path: Path) -> None:
    up, conn = uplink(tmp_path)
    good = records("m1", 3)
    batch = [good[0], Rec(2, good[1].stream, b"\xff\xff not protobuf"), Rec(3, good[2].stream, good[2].payload)]
    stop, _ = await up._publish_batch(conn, batch)  # type: ignore[arg-type]
    assert stop is None
    assert [seq_of(p) for _, p, _ in conn.published] == [1, 2]   # no gap for the skipped record
    assert up.counters["skipped"] == 1
    assert up._is_delivered(2)   # stepped past: the cursor does not stall on it


async def test_a_device_without_dbirth_gets_no_data_its_records_wait(tmp_path: Path) -> None:
    up, conn = uplink(tmp_path)
    up._born = {"m1"}   # m2: offline at the births
    batch = records("m2", 2, first_seq=1) + records("m1", 1, first_seq=3) + records("m2", 1, first_seq=4)
    stop, _ = await up._publish_batch(conn, batch)  # type: ignore[arg-type]
    assert stop is None
    assert [t for t, _, _ in conn.published] == ["spBv1.0/g/DDATA/e/m1"]
    assert up._waiting == {"m2": 1}                 # the lowest waiting seq: the cursor stops before it
    assert not up._is_delivered(1) and not up._is_delivered(4) and up._is_delivered(3)
    up._backlog_active, up._live_after = False, 4
    assert up._ack_frontier() == 0


async def test_records_of_a_removed_device_are_counted_and_stepped_past(tmp_path: Path) -> None:
    up, conn = uplink(tmp_path)
    gone = Rec(1, "g/e/old-meter", records("m1", 1)[0].payload)
    stop, _ = await up._publish_batch(conn, [gone, *records("m1", 1, first_seq=2)])  # type: ignore[arg-type]
    assert stop is None and len(conn.published) == 1
    assert up.counters["dropped_unconfigured"] == 1 and up._is_delivered(1) and not up._waiting


async def test_data_qos_0_publishes_at_qos_0_and_counts_it_delivered(tmp_path: Path) -> None:
    up, conn = uplink(tmp_path, data_qos=0)
    stop, _ = await up._publish_batch(conn, records("m1", 2))  # type: ignore[arg-type]
    assert stop is None and [q for _, _, q in conn.published] == [0, 0]
    assert up._is_delivered(1) and up._is_delivered(2)


def state(online: bool, ts: int) -> bytes:
    return json.dumps({"online": online, "timestamp": ts}).encode()


def test_primary_host_state_is_kept_per_server() -> None:
    a, b = PrimaryHostState("scada"), PrimaryHostState("scada")
    assert a.update(state(True, 200)) and a.online
    assert b.update(state(True, 100)) and b.online        # server B's clock of STATEs is its own
    a.begin_connection()                                   # reconnect to A: offline until a STATE
    assert not a.online
    assert not a.update(state(True, 150)) and not a.online  # stale retained online on A: ignored
    assert a.update(state(True, 200)) and a.online
    # an offline then a newer online, both before the session looks: the offline is not lost
    offlines = a.offlines
    a.update(state(False, 300))
    a.update(state(True, 301))
    assert a.online and a.offlines == offlines + 1
    assert not a.update(state(False, 250)) and a.offlines == offlines + 1   # older: ignored
