"""The status page in a real browser, against a running gateway and real peers.

`outpost run` with a Modbus TCP device (a pymodbus server), Mosquitto, and Kafka reached only
through Toxiproxy; Debian's Chromium, headless, loads the page from the gateway's loopback
listener (tests/harness/browser.py). The assertions read what a person would see: the DOM's
text and the attributes the page sets from the status document (`data-state` of a link row,
`data-records` of a cursor, `data-online` of a device, the plot's polylines), never timings.

Three states, each saved as a screenshot under test-output/status-page/ (or
$OUTPOST_TEST_OUTPUT/status-page/): all up; Kafka cut with the buffer growing; a device
offline. Throughout, the console stays free of errors (exceptions, console.error, failed
loads, CSP violations). `test_a_broken_page_is_caught` shows those checks fail on a page
whose script throws.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from drivers.modbus.simserver import SimServer, SimUnit
from gateway.diagnostics.client import fetch_status, render_status
from tests.harness.browser import Browser, Page
from tests.harness.common import REPO_ROOT, free_port, log_tail, port_open, until
from tests.harness.gateway import GatewayProcess

pytestmark = pytest.mark.integration
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

OUTPUT = Path(os.environ.get("OUTPOST_TEST_OUTPUT", REPO_ROOT / "test-output")) / "status-page"

# What the page shows, read from the DOM (text and the attributes the page sets).
SNAPSHOT_JS = """(() => { if (!document.querySelector("#events")) return "{}"; return JSON.stringify({
  renders: Number(document.body.dataset.renders || 0),
  state: document.body.dataset.state,
  gateway: document.querySelector('#gateway').textContent,
  banner: document.querySelector('#banner').hidden ? '' : document.querySelector('#banner').textContent,
  links: Object.fromEntries([...document.querySelectorAll('#links tr[data-link]')].map(
    r => [r.dataset.link, {state: r.dataset.state, text: r.textContent,
                           segments: [...r.querySelectorAll('svg.timeline rect')].map(x => x.dataset.state)}])),
  cursors: Object.fromEntries([...document.querySelectorAll('#depth-now [data-cursor]')].map(
    s => [s.dataset.cursor, Number(s.dataset.records)])),
  plot: Object.fromEntries([...document.querySelectorAll('#depth-plot polyline')].map(
    p => [p.dataset.cursor, {points: Number(p.dataset.points), last: Number(p.dataset.last)}])),
  devices: Object.fromEntries([...document.querySelectorAll('#devices tr[data-device]')].map(
    r => [r.dataset.device, {online: r.dataset.online, text: r.textContent}])),
  clock: document.querySelector('#clock').dataset.synced,
  events: [...document.querySelectorAll('#events li')].map(li => li.textContent),
}); })()"""
EMPTY = {"renders": 0, "state": "", "gateway": "", "banner": "", "links": {}, "cursors": {}, "plot": {},
         "devices": {}, "clock": "", "events": []}


async def snapshot(page: Page) -> dict[str, Any]:
    # Before the page has loaded (about:blank), the snapshot is empty.
    return {**EMPTY, **json.loads(await page.evaluate(SNAPSHOT_JS))}


def _config(tmp: Path, mosquitto, kafka, sim_port: int, http_port: int, topic: str) -> str:
    return f"""
[gateway]
group_id = "page"
edge_node_id = "station-{uuid.uuid4().hex[:4]}"
data_dir = "{tmp / "data"}"

[buffer]
flush_interval = "100ms"

[[buses]]
name = "plc-net"
transport = "tcp"
host = "127.0.0.1"
port = {sim_port}
timeout = "300ms"
reconnect_min = "200ms"
reconnect_max = "1s"

[[devices]]
name = "pump1"
bus = "plc-net"
unit_id = 1
interval = "100ms"
  [[devices.points]]
  name = "flow"
  table = "holding"
  address = 0
  type = "uint16"
  [[devices.points]]
  name = "pressure"
  table = "holding"
  address = 1
  type = "uint16"

[[devices]]
driver = "simulator"
name = "meter1"
interval = "100ms"
  [[devices.points]]
  name = "energy"
  waveform = "counter"
  type = "uint64"

[mqtt]
servers = ["mqtt://{mosquitto.host}:{mosquitto.port}"]
client_id = "outpost-page-{uuid.uuid4().hex[:6]}"

[kafka]
bootstrap_servers = ["{kafka.proxied_bootstrap}"]
request_timeout = "5s"
reconnect_min = "500ms"
reconnect_max = "2s"
[[kafka.mappings]]
mqtt_topic_filters = ["spBv1.0/#"]
kafka_topic = "{topic}"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"
metrics_listen = "127.0.0.1:{http_port}"
"""


async def test_status_page_follows_a_running_gateway(tmp_path: Path, mosquitto, kafka) -> None:
    topic = f"page-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    kafka.proxy.restore()
    unit = SimUnit()
    unit.set_range("holding", 0, [100, 200])
    sim = await SimServer.tcp({1: unit})
    http_port = free_port()
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, mosquitto, kafka, sim.port, http_port, topic))
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log")
    gateway.start()
    sim_stopped = False
    browser = await Browser.start(tmp_path)
    last: dict[str, Any] = {}

    async def shows(check, what: str, limit_s: float = 90.0) -> dict[str, Any]:
        async def ok() -> bool:
            last.clear()
            last.update(await snapshot(page))
            return bool(check(last))
        try:
            await until(ok, limit_s, what, interval_s=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}\npage: {json.dumps(last, indent=1)[:3000]}\nconsole: {page.console[-20:]}\n"
                                 f"{log_tail(tmp_path / 'gateway.log')}") from None
        return dict(last)

    try:
        page = await browser.new_page(1280, 900)
        await until(lambda: port_open("127.0.0.1", http_port), 60, "the gateway's HTTP listener", interval_s=0.2)
        await page.goto(f"http://127.0.0.1:{http_port}/")

        # 1. All up: both uplinks, the Primary-less MQTT session, the Modbus device and the simulator.
        up = await shows(lambda s: s["renders"] > 0 and s["state"] == "ok"
                         and {"mqtt", "kafka"} <= set(s["links"])
                         and all(s["links"][n]["state"] == "up" for n in ("mqtt", "kafka"))
                         and s["devices"].get("pump1", {}).get("online") == "true"
                         and s["devices"].get("meter1", {}).get("online") == "true"
                         and "kafka" in s["plot"],
                         "every link up and every device online on the page")
        status = fetch_status(str(tmp_path / "outpost.sock"))
        assert up["gateway"] == status["gateway"]
        assert up["links"]["kafka"]["segments"][-1] == "up"
        assert "online" in up["devices"]["pump1"]["text"]
        await page.screenshot(OUTPUT / "1-all-up.png")

        # 2. Kafka cut through the proxy: the link goes down and the Kafka cursor grows on the page.
        kafka.proxy.cut()
        down = await shows(lambda s: s["links"].get("kafka", {}).get("state") == "down"
                           and s["cursors"].get("kafka", 0) > 0, "the Kafka link shown down")
        first = down["cursors"]["kafka"]
        grown = await shows(lambda s: s["cursors"].get("kafka", 0) > first + 20
                            and s["plot"].get("kafka", {}).get("last", 0) > first
                            and s["links"]["kafka"]["segments"][-1] == "down",
                            "the Kafka backlog growing in the numbers and in the plot")
        assert grown["links"]["mqtt"]["state"] == "up"      # a dead Kafka does not stall MQTT
        assert grown["cursors"].get("mqtt", 0) < grown["cursors"]["kafka"]
        assert any("kafka down" in e for e in grown["events"]), grown["events"]
        await page.screenshot(OUTPUT / "2-kafka-cut-buffer-growing.png")
        # The terminal shows the same trend from the same ring.
        text = render_status(fetch_status(str(tmp_path / "outpost.sock")))
        assert any(ch in text for ch in "▂▃▄▅▆▇█"), text

        # 3. The Modbus server stops: the device goes offline on the page, the other stays online.
        await sim.stop()
        sim_stopped = True
        offline = await shows(lambda s: s["devices"].get("pump1", {}).get("online") == "false"
                              and any("device pump1 offline" in e for e in s["events"]),
                              "pump1 shown offline")
        assert offline["devices"]["meter1"]["online"] == "true"
        assert "OFFLINE" in offline["devices"]["pump1"]["text"]
        await page.screenshot(OUTPUT / "3-device-offline.png")

        # 4. Kafka back: the link comes back up and its history shows the outage.
        kafka.proxy.restore()
        back = await shows(lambda s: s["links"].get("kafka", {}).get("state") == "up"
                           and s["links"]["kafka"]["segments"][-1] == "up", "the Kafka link back up")
        assert "down" in back["links"]["kafka"]["segments"]
        assert not page.errors, page.errors
    finally:
        kafka.proxy.restore()
        await browser.close()
        await gateway.stop()
        if not sim_stopped:
            await sim.stop()


async def test_a_broken_page_is_caught(tmp_path: Path) -> None:
    """The console checks above can fail: a page whose script throws is reported as such."""
    from gateway.diagnostics.web import WebServer

    async def document() -> dict[str, Any]:
        return {"gateway": "g/e", "links": {"kafka": {"up": True, "link": "up"}}, "devices": {}}

    server = WebServer(document, "127.0.0.1:0")
    server._assets["page.js"] = server._assets["page.js"].replace(b"function render(doc) {",
                                                                  b"function render(doc) { doc.no.such;")
    await server.start()
    browser = await Browser.start(tmp_path)
    try:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{server.port}/")
        await until(lambda: page.errors, 30, "the script's error in the console", interval_s=0.2)
        assert any("TypeError" in e for e in page.errors), page.errors
        state = await snapshot(page)
        assert state["renders"] == 0 and not state["links"]
    finally:
        await browser.close()
        await server.close()
