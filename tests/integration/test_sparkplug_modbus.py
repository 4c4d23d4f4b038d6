"""End to end: a DCMD from the Primary Host reaches a pymodbus server through the Modbus driver.

pymodbus TCP server <- ModbusBusDriver <- SparkplugUplink <- Mosquitto <- test Primary Host,
and the written value comes back as DDATA after the driver reads it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from buffer import AsyncBuffer, BufferSettings
from drivers.modbus import codec
from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver
from drivers.modbus.simserver import SimServer, SimUnit
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import NodeIdentity
from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload
from gateway.uplinks.mqtt.sparkplug import SparkplugUplink
from tests.integration.test_sparkplug_session import Broker, TestHost, settings

pytestmark = pytest.mark.integration
logging.getLogger("pymodbus").setLevel(logging.CRITICAL)


async def test_dcmd_writes_a_modbus_register_and_the_new_value_comes_back(
        mosquitto, tmp_path: Path) -> None:
    units = {1: SimUnit()}
    units[1].set_range("holding", 0, [0, 0, 0])
    sim = await SimServer.tcp(units)
    bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1", port=sim.port,
                       timeout="300ms", reconnect_min="100ms", reconnect_max="400ms")
    device = ModbusDeviceConfig.model_validate({
        "name": "plc", "bus": "b", "unit_id": 1, "interval": "100ms", "points": [
            {"name": "setpoint", "address": 0, "type": "int16", "writable": True,
             "min": -100, "max": 100},
            {"name": "flow", "address": 1, "type": "float32"}]})
    devices = {"plc": device.point_infos()}
    rbe = ReportByException(NodeIdentity("plant-7", "pump-3"), devices)
    buf = await AsyncBuffer.open(tmp_path / "buffer.db", BufferSettings(10_000_000, 86400.0))
    host = await TestHost(mosquitto.host, mosquitto.port).start(online=True)
    uplink_ref: list[SparkplugUplink] = []
    driver = ModbusBusDriver(bus, [device], rbe.offer,
                             lambda ev: uplink_ref and uplink_ref[0].on_device_event(ev))
    uplink = SparkplugUplink(settings(Broker(mosquitto.host, mosquitto.port), tmp_path),
                             buf, devices, driver.write, snapshot=rbe.snapshot)
    uplink_ref.append(uplink)

    async def flush() -> None:  # the runtime's job: drain the edge stage into the buffer
        while True:
            records = rbe.drain()
            if records:
                await buf.append(records)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(driver.run(), name="modbus"),
             asyncio.create_task(flush(), name="flush"),
             asyncio.create_task(uplink.run(), name="uplink")]
    try:
        await host.wait_for(lambda: host.of_type("DBIRTH"), what="DBIRTH")
        alias = next(m.alias for m in host.of_type("DBIRTH")[0].payload.metrics
                     if m.name == "setpoint")
        host.publish("spBv1.0/plant-7/DCMD/pump-3/plc", encode_payload(Payload(
            timestamp=1, metrics=[Metric(alias=alias, datatype=DataType.Int16, value=-42)])))
        host.publish("spBv1.0/plant-7/DCMD/pump-3/plc", encode_payload(Payload(
            timestamp=1, metrics=[Metric("setpoint", DataType.Int16, 500)])))  # above max

        def new_value_seen() -> bool:
            return any(m.alias == alias and m.value == -42 and not m.is_historical
                       for d in host.of_type("DDATA") for m in d.payload.metrics)

        await host.wait_for(new_value_seen, what="DDATA with the written setpoint")
    finally:
        await uplink.stop()
        for t in reversed(tasks):
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await buf.close()
        await host.stop()
        await sim.stop()
    assert units[1].writes == [("holding", 0, codec.encode("int16", -42))]
    assert uplink.counters["commands_rejected"] == 1
