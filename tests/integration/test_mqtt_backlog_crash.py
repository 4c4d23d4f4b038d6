"""A `kill -9` in the middle of a backlog flush re-sends at most the batch in flight.

During a flush the cursor waits at the backlog's position while live records go out
beside it; before, a crash then re-sent every live record delivered since the flush began
(398 duplicates with 200-record batches). The delivered ranges are now kept in a state file.
A real Mosquitto that comes up only after a backlog built, a paced flush, kill -9 halfway,
a restart, and a subscriber that counts every reading it receives.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path

import pytest
from gmqtt import Client

from gateway.sparkplug.payload import decode_payload
from tests.harness.common import RunDir, until
from tests.harness.gateway import GatewayProcess
from tests.harness.mosquitto import RefusingMosquitto

pytestmark = pytest.mark.integration

DEVICES = 8
BATCH = 200  # the Sparkplug uplink's batch_max_records


def _config(tmp: Path, url: str) -> str:
    devices = "".join(f"""
[[devices]]
driver = "simulator"
name = "sim{i}"
interval = "50ms"
[[devices.points]]
name = "n"
waveform = "counter"
type = "uint64"
""" for i in range(DEVICES))
    return f"""
[gateway]
group_id = "crash"
edge_node_id = "gw"
data_dir = "{tmp / "data"}"

[mqtt]
servers = ["{url}"]
client_id = "outpost-crash-{uuid.uuid4().hex[:6]}"
reconnect_min = "200ms"
reconnect_max = "500ms"
historical_max_per_s = 40

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"
{devices}"""


async def test_kill_9_during_a_backlog_flush_resends_at_most_one_batch(tmp_path) -> None:
    broker = RefusingMosquitto(RunDir(tmp_path / "run"), "crash-broker", "topic readwrite #\n")
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, broker.url))
    # A reading is (device, value, timestamp): the simulator's counter starts again at 0
    # when the gateway restarts, its timestamps do not.
    seen: Counter[tuple[str, int, int]] = Counter()
    messages: Counter[tuple[str, tuple[tuple[int, int], ...]]] = Counter()  # records (DDATA)
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log")
    gateway.start()  # the broker is not there yet: a backlog builds
    await asyncio.sleep(15)  # ~600 records (8 devices, one record each per 200 ms flush)
    broker.start()
    sub = Client(f"count-{uuid.uuid4().hex[:6]}")

    def on_message(_c, topic, payload, _qos, _props) -> int:
        if "/DDATA/" in topic:
            device = topic.rsplit("/", 1)[1]
            # The clock marker (README, "Clock"), on an unsynchronised clock, is the one Boolean
            # metric of this counter-only config: not a reading.
            readings = tuple((int(m.value), int(m.timestamp or 0)) for m in decode_payload(payload).metrics
                             if not isinstance(m.value, bool))
            messages[(device, readings)] += 1
            for v, ts in readings:
                seen[(device, v, ts)] += 1
        return 0

    sub.on_message = on_message
    await sub.connect(broker.host, broker.port)
    sub.subscribe("spBv1.0/crash/#", qos=1)
    try:
        # Halfway through the paced flush (historical_max_per_s = 40), with live records
        # delivered beside it: kill -9.
        # ~12 s into it: ~500 live records delivered beside ~500 of the backlog, which is not
        # flushed yet. Before the ranges were kept, all those live ones came again after the
        # restart (as history).
        await until(lambda: len(messages) > 1000, 60, "flush under way", interval_s=0.1)
        dup_before_kill = sum(n - 1 for n in messages.values() if n > 1)
        await gateway.kill9()
        ranges_file = tmp_path / "data" / "mqtt-delivered.json"
        state_at_kill = ranges_file.read_text() if ranges_file.exists() else None
        await asyncio.sleep(1)
        before = len(messages)
        gateway.start()
        await until(lambda: len(messages) > before + 600, 90, "flush finished after the restart",
                    interval_s=0.2)
    finally:
        await gateway.stop()
        await sub.disconnect()
        broker.stop()
    duplicates = sum(n - 1 for n in messages.values() if n > 1)
    dd = sorted((k for k, n in messages.items() if n > 1), key=lambda k: (k[0], k[1]))
    assert duplicates <= BATCH, (f"{duplicates} records received twice ({dup_before_kill} before the "
                                 f"kill); ranges at the kill {state_at_kill}; {dd[:3]} .. {dd[-3:]}")
    # And nothing missing: each device's counter of the first run arrived 0..n without a gap
    # (the second run counts from 0 again, with later timestamps).
    for d in range(DEVICES):
        first_run = sorted((ts, v) for dev, v, ts in seen if dev == f"sim{d}")
        values = [v for _ts, v in first_run]
        restart = next((i for i in range(1, len(values)) if values[i] < values[i - 1]), len(values))
        assert values[:restart] == list(range(restart)) and restart > 100, f"sim{d}: {values[:restart][-5:]}"
