"""The uplink contract, seen from outside a running gateway: one state, three renderings.

Every uplink of `outpost run` (the Sparkplug edge node, the Kafka uplink, the local bridge and
a Kafka inbound consumer) against a real Mosquitto and a real Kafka. For each of them, every
counter of its state in `outpost status --json` is also a Prometheus series with the same
value, its link is up with a `since`, and the human `outpost status` names it. A counter kept
in one place and missing in another (as `outpost_samples_published_total` once was) fails here.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from pathlib import Path

import pytest

from gateway.diagnostics.client import fetch_status, render_status
from tests.harness.common import free_port, until
from tests.harness.gateway import GatewayProcess

pytestmark = pytest.mark.integration

UPLINKS = ("mqtt", "kafka", "bridge", "inbound:to-mqtt")


def _config(tmp: Path, mosquitto, kafka, topic: str, inbound: str, metrics_port: int) -> str:
    return f"""
[gateway]
group_id = "contract"
edge_node_id = "gw"
data_dir = "{tmp / "data"}"

[mqtt]
servers = ["mqtt://{mosquitto.host}:{mosquitto.port}"]
client_id = "outpost-contract-{uuid.uuid4().hex[:6]}"

[kafka]
bootstrap_servers = ["{kafka.bootstrap}"]
request_timeout = "10s"
[[kafka.mappings]]
name = "all"
mqtt_topic_filters = ["spBv1.0/#", "site/#"]
kafka_topic = "{topic}"
subscribe = true
format = "raw"
[[kafka.inbound]]
name = "to-mqtt"
kafka_topics = ["{inbound}"]
group_id = "outpost-contract-{uuid.uuid4().hex[:6]}"
action = "mqtt_publish"
mqtt_topic_template = "site/cmd/{{key}}"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"
metrics_listen = "127.0.0.1:{metrics_port}"

[[devices]]
driver = "simulator"
name = "sim1"
interval = "100ms"
[[devices.points]]
name = "n"
waveform = "counter"
type = "uint64"
"""


def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not m or line.startswith("#"):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


async def test_every_uplink_counter_is_in_status_and_metrics_and_every_link_has_since(
        tmp_path, mosquitto, kafka) -> None:
    topic, inbound = f"contract-{uuid.uuid4().hex[:8]}", f"contract-in-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    kafka.create_topic(inbound)
    port = free_port()
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, mosquitto, kafka, topic, inbound, port))
    sock = str(tmp_path / "outpost.sock")
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log")
    gateway.start()
    try:
        def ready() -> bool:
            links = fetch_status(sock)["links"]
            return (all(links.get(u, {}).get("up") for u in UPLINKS)
                    and links["mqtt"]["counters"]["published"] > 0
                    and links["kafka"]["counters"]["delivered"] > 0)

        await until(lambda: _quietly(ready), 60, "every uplink up and delivering", interval_s=0.5)
        before = fetch_status(sock)
        metrics = await asyncio.to_thread(_metrics, port)
        after = fetch_status(sock)
    finally:
        await gateway.stop()

    for name in UPLINKS:
        link = before["links"][name]
        assert isinstance(link["since_ms"], int) and link["since_ms"] > 1_700_000_000_000, (name, link)
        assert metrics[("outpost_link_up", (("link", name),))] == 1.0, name
        assert metrics[("outpost_link_since_seconds", (("link", name),))] == pytest.approx(
            link["since_ms"] / 1000, abs=0.01)
        assert link["counters"], f"{name} has no counters"
        for event, value in link["counters"].items():
            key = ("outpost_uplink_events_total", (("event", event), ("uplink", name)))
            assert key in metrics, f"{name}.{event} is in status but not in the metrics"
            assert value <= metrics[key] <= after["links"][name]["counters"][event], (name, event)
    published = metrics[("outpost_samples_published_total", (("uplink", "mqtt"),))]
    assert published >= before["links"]["mqtt"]["counters"]["published"] > 0
    text = render_status(after)
    for name in UPLINKS:
        assert re.search(rf"^  {re.escape(name)}\s+UP ", text, re.M), text


def _quietly(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False
