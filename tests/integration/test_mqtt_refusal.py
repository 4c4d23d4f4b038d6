"""A broker that is up and says no: a refused PUBACK is never taken for a delivery.

A real Mosquitto whose ACL denies DDATA answers each publish with PUBACK reason 0x87 (not
authorised). gmqtt alone would free the packet id and report success; the MQTT client layer
reads the code, so the records stay in the buffer, `outpost status` names the refused topic
and the link stays up (no reconnect storm, no new bdSeq). When the ACL is lifted (SIGHUP
reloads it) the held records are delivered, oldest first.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from gmqtt import Client

from gateway.diagnostics.client import fetch_status
from gateway.sparkplug.payload import decode_payload
from tests.harness.common import RunDir, until
from tests.harness.gateway import GatewayProcess
from tests.harness.mosquitto import RefusingMosquitto

pytestmark = pytest.mark.integration

DENY_DDATA = "topic deny spBv1.0/+/DDATA/#\ntopic readwrite #\n"
ALLOW_ALL = "topic readwrite #\n"


def _config(tmp: Path, url: str) -> str:
    return f"""
[gateway]
group_id = "acl"
edge_node_id = "gw"
data_dir = "{tmp / "data"}"

[mqtt]
servers = ["{url}"]
client_id = "outpost-acl-{uuid.uuid4().hex[:6]}"
reconnect_min = "200ms"
reconnect_max = "1s"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"

[[devices]]
driver = "simulator"
name = "sim1"
interval = "100ms"
[[devices.points]]
name = "n"
waveform = "counter"
type = "uint64"
"""


def _mqtt(status: dict) -> dict:
    return status["links"]["mqtt"]


async def test_refused_ddata_stays_in_the_buffer_until_the_acl_allows_it(tmp_path) -> None:
    broker = RefusingMosquitto(RunDir(tmp_path / "run"), "acl-broker", DENY_DDATA).start()
    cfg = tmp_path / "outpost.toml"
    cfg.write_text(_config(tmp_path, broker.url))
    sock = str(tmp_path / "outpost.sock")
    seen: list[int] = []
    sub = Client(f"watch-{uuid.uuid4().hex[:6]}")

    def on_message(_c, topic, payload, _qos, _props) -> int:
        if "/DDATA/" in topic:
            # On an unsynchronised clock DDATA also carries the clock marker (README, "Clock"):
            # the one Boolean metric of this counter-only config, not a reading.
            seen.extend(int(m.value) for m in decode_payload(payload).metrics if not isinstance(m.value, bool))
        return 0

    sub.on_message = on_message
    await sub.connect(broker.host, broker.port)
    sub.subscribe("spBv1.0/acl/#", qos=1)
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log")
    gateway.start()
    try:
        await until(lambda: _ok(lambda: _mqtt(fetch_status(sock))["counters"]["held"] >= 5),
                    30, "refused records held", interval_s=0.3)
        st = fetch_status(sock)
        link = _mqtt(st)
        assert link["up"], "a refusal is not a link failure"
        assert link["counters"]["published"] == 0, "nothing refused may count as delivered"
        assert any("/DDATA/" in topic and "0x87" in r["reason"] for topic, r in link["refused"].items()), link
        held = st["buffer"]["quarantine"]["by_cursor_reason"]["mqtt"]
        assert held.get("held:spBv1.0/acl/DDATA/gw/sim1", 0) >= 1, held  # kept aside, in order
        assert link["counters"]["held"] >= 1
        assert seen == []
        connects, bdseq = link["counters"]["connects"], link["bdseq"]
        await asyncio.sleep(2)
        link = _mqtt(fetch_status(sock))
        assert (link["counters"]["connects"], link["bdseq"]) == (connects, bdseq), "no reconnect storm"

        broker.set_acl(ALLOW_ALL)
        await until(lambda: _ok(lambda: _mqtt(fetch_status(sock))["counters"]["published"] > 0
                                and not _mqtt(fetch_status(sock))["refused"]),
                    30, "delivered once the ACL allows it", interval_s=0.3)
        await until(lambda: len(seen) > 40, 30, "DDATA reaching the subscriber", interval_s=0.3)
    finally:
        await gateway.stop()
        await sub.disconnect()
        broker.stop()
    # The counter is 0, 1, 2, ...: every reading taken while DDATA was refused (the first
    # seconds, 0..39 at least) arrived once the ACL allowed it. At-least-once delivery may
    # repeat a message around the broker's ACL reload, never more than a few.
    dups = sorted(v for v in set(seen) if seen.count(v) > 1)
    assert len(seen) - len(set(seen)) <= 5, f"duplicates {dups} in {seen}"
    assert sorted(seen)[:40] == list(range(40)), sorted(seen)[:60]


def _ok(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False
