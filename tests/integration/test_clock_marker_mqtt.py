"""`outpost run` on a clock that synchronises while it runs, seen by a host on real Mosquitto.

The gateway child's kernel clock probe answers "not synchronised" until the test creates a
file (tests/benchmarks/gateway.py, `file:` clock). A host written from the README's rule
then reads, per device: the DBIRTH declares the clock marker (true: the clock is not trusted
at the birth); DDATA carry it true while the clock is untrusted, false once in the first
payload after the sync, then not at all. Every DDATA metric is an alias its DBIRTH declared.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from gmqtt import Client

from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.edge import CLOCK_MARKER
from tests.benchmarks.gateway import ClockedGateway, config

pytestmark = pytest.mark.integration


async def _until(cond: Any, timeout_s: float, what: str, gw: ClockedGateway) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline or not gw.alive():
            raise AssertionError(f"{what}: not within {timeout_s}s; see {gw.log_path}")
        await asyncio.sleep(0.2)


async def test_marker_true_while_unsynced_false_once_after_sync_then_absent(mosquitto, tmp_path: Path) -> None:
    work = tmp_path
    cfg = work / "outpost.toml"
    # 10 simulator devices (sim0..sim9), 3 counter points each, read every second.
    cfg.write_text(config(30, work, (mosquitto.host, mosquitto.port), None, "", "json")
                   .replace('group_id = "bench"', f'group_id = "clk{uuid.uuid4().hex[:6]}"'))
    group = re.search(r'group_id = "([^"]+)"', cfg.read_text()).group(1)  # type: ignore[union-attr]
    messages: list[tuple[str, str, bytes]] = []  # (type, device or "", payload) in arrival order

    def on_message(_c: Any, topic: str, payload: bytes, _qos: int, _props: Any) -> int:
        parts = topic.split("/")
        messages.append((parts[2], parts[4] if len(parts) > 4 else "", bytes(payload)))
        return 0

    sub = Client(f"clock-host-{uuid.uuid4().hex[:6]}")
    subscribed = asyncio.Event()
    sub.on_message = on_message
    sub.on_subscribe = lambda *_a, **_k: subscribed.set()
    await sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe(f"spBv1.0/{group}/#", qos=1)
    await asyncio.wait_for(subscribed.wait(), 10)

    synced_flag = work / "clock-synced"
    gw = ClockedGateway(cfg, work / "gateway.log", f"file:{synced_flag}")
    gw.start()
    try:
        await _until(lambda: sum(t == "DDATA" for t, _, _ in messages) >= 20, 60, "DDATA on the unsynced clock", gw)
        synced_flag.touch()  # NTP answers: the next clock poll (every 5 s) trusts the clock
        flipped_at = len(messages)

        def unmarked_after_flip() -> bool:
            born = {(d, m.alias) for t, d, data in messages if t == "DBIRTH"
                    for m in pb.Payload.FromString(data).metrics if m.name == CLOCK_MARKER}
            seen: dict[str, int] = {}
            for t, d, data in messages[flipped_at:]:
                if t == "DDATA" and not any((d, m.alias) in born for m in pb.Payload.FromString(data).metrics):
                    seen[d] = seen.get(d, 0) + 1
            return len(seen) == 10 and min(seen.values()) >= 2

        await _until(unmarked_after_flip, 60, "trusted DDATA of every device after the sync", gw)
    finally:
        await gw.stop()
        await sub.disconnect()

    markers: dict[str, int] = {}
    declared: dict[str, set[int]] = {}
    runs: dict[str, str] = {}
    nbirths = [pb.Payload.FromString(p) for t, _, p in messages if t == "NBIRTH"]
    assert len(nbirths) == 1
    (node_marker,) = [m for m in nbirths[0].metrics if m.name == CLOCK_MARKER]
    assert node_marker.boolean_value is True and not node_marker.HasField("alias")
    for t, device, data in messages:
        p = pb.Payload.FromString(data)
        if t == "DBIRTH":
            (m,) = [m for m in p.metrics if m.name == CLOCK_MARKER]
            assert m.datatype == 11 and m.boolean_value is True, "untrusted clock at the birth"
            markers[device] = m.alias
            declared[device] = {x.alias for x in p.metrics}
            runs[device] = ""
        elif t == "DDATA":
            assert device in markers, f"DDATA of {device} before its DBIRTH"
            values = [m.boolean_value for m in p.metrics if m.alias == markers[device]]
            for m in p.metrics:
                assert not m.HasField("name") and m.HasField("timestamp")
                assert m.alias in declared[device], f"{device}: alias {m.alias} never born"
            assert len(values) <= 1, "one marker per payload"
            runs[device] += "N" if not values else ("T" if values[0] else "F")
    assert len(set(markers.values())) == 10  # one alias per device, unique on the node
    assert sorted(markers.values()) == list(range(31, 41))  # after the 30 point aliases
    for device, run in runs.items():
        # flagged while untrusted, false exactly once at the sync, then nothing
        assert re.fullmatch(r"T*FN{2,}", run), f"{device}: {run}"
    assert sum(r.count("T") for r in runs.values()) >= 10, runs
