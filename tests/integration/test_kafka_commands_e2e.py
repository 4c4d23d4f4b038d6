"""Kafka command topic to a real Modbus device, through `outpost run`.

A JSON command becomes the same checked write as a Sparkplug DCMD: the value reaches the
pymodbus server's register. A malformed command, a command for an unknown point and one
outside the point's min/max are logged, counted and committed past, and write nothing.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from drivers.modbus.simserver import SimServer, SimUnit
from gateway.diagnostics.client import fetch_status
from gateway.diagnostics.errors import DiagnosticsError
from tests.harness.common import until
from tests.harness.gateway import GatewayProcess

pytestmark = pytest.mark.integration


def _config(tmp: Path, modbus_port: int, kafka, topic: str, group: str) -> str:
    return f"""
[gateway]
group_id = "cmd-test"
edge_node_id = "gw"
data_dir = "{tmp / "data"}"

[[buses]]
name = "lan"
transport = "tcp"
host = "127.0.0.1"
port = {modbus_port}
timeout = "500ms"

[[devices]]
name = "plc1"
bus = "lan"
unit_id = 1
interval = "200ms"
  [[devices.points]]
  name = "speed_setpoint"
  table = "holding"
  address = 100
  type = "uint16"
  writable = true
  min = 0
  max = 1800

[kafka]
bootstrap_servers = ["{kafka.bootstrap}"]
[[kafka.inbound]]
name = "commands"
kafka_topics = ["{topic}"]
group_id = "{group}"
action = "device_command"

[diagnostics]
socket_path = "{tmp / "outpost.sock"}"
"""


async def _status(sock: str) -> dict:
    return await asyncio.to_thread(fetch_status, sock)


async def test_kafka_commands_write_modbus_and_bad_ones_write_nothing(tmp_path, kafka) -> None:
    unit = SimUnit()
    unit.set_range("holding", 100, [0])
    server = await SimServer.tcp({1: unit})
    topic = f"commands-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic)
    cfg = tmp_path / "outpost.toml"
    group = f"outpost-cmd-{uuid.uuid4().hex[:6]}"
    cfg.write_text(_config(tmp_path, server.port, kafka, topic, group))
    sock = str(tmp_path / "outpost.sock")
    gateway = GatewayProcess(cfg, tmp_path / "gateway.log")
    gateway.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)
    await producer.start()
    try:

        async def consumer_ready() -> bool:
            inbound = (await _status(sock))["links"].get("inbound:commands") or {}
            return inbound.get("up") is True

        await until(consumer_ready, 60, "inbound consumer up", interval_s=0.3, ignore=(OSError, DiagnosticsError))

        async def assigned() -> bool:
            # A new group starts at the latest offset: produce only once it owns the partition.
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
            await admin.start()
            try:
                (resp,) = await admin.describe_consumer_groups([group])
                # Raw protocol response: groups = [(error, group, state, type, protocol, members)]
                (_err, _name, state, _type, _proto, members) = resp.groups[0][:6]
                return state == "Stable" and any(m[-1] for m in members)  # an assignment is present
            finally:
                await admin.close()

        await until(assigned, 60, "consumer group assigned", interval_s=0.3)
        bad = [
            b"{not json",
            json.dumps({"device": "plc1", "point": "no_such_point", "value": 1}).encode(),
            json.dumps({"device": "plc1", "point": "speed_setpoint", "value": 5000}).encode(),  # > max
        ]
        for payload in bad:
            await producer.send_and_wait(topic, payload, key=b"plc1")
        good = json.dumps({"device": "plc1", "point": "speed_setpoint", "value": 1200}).encode()
        await producer.send_and_wait(topic, good, key=b"plc1")

        async def written() -> bool:
            return unit.tables["holding"].get(100) == 1200

        await until(written, 60, "register written", interval_s=0.3)
        # Only the good command reached the device, in order after the bad ones.
        holding_writes = [w for w in unit.writes if w[0] == "holding"]
        assert holding_writes == [("holding", 100, [1200])], unit.writes
        inbound = (await _status(sock))["links"]["inbound:commands"]["counters"]
        assert inbound["written"] == 1
        assert inbound["malformed"] == 1
        assert inbound["rejected"] == 2
    finally:
        await producer.stop()
        returncode = await gateway.stop()
        await server.stop()
    assert returncode == 0, (tmp_path / "gateway.log").read_text()[-3000:]
