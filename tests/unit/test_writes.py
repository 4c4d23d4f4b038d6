"""Issue 13 item 3: one write check for every path, with the same words on each."""

from __future__ import annotations

import math
from collections import namedtuple
from typing import Any

import pytest

from drivers.base import PointInfo, WriteRejected
from gateway.config import parse_config
from gateway.inbound.kafka_commands import CommandError, InboundMapping, KafkaInbound, parse_command
from gateway.sparkplug.edge import AliasTable
from gateway.sparkplug.node import parse_dcmd
from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload
from gateway.uplinks.kafka.settings import KafkaSettings
from gateway.writes import (
    CheckedWriter,
    CommandJsonError,
    WriteRefused,
    WriteSpec,
    check_value,
    check_write,
    loads_command_json,
    specs_from_config,
)

CONFIG = """
[gateway]
group_id = "g"
edge_node_id = "e"
[[buses]]
name = "b"
transport = "tcp"
host = "127.0.0.1"
[[devices]]
name = "plc"
bus = "b"
points = [
  {name = "n", address = 0, type = "int16", writable = true, min = -100, max = 100},
  {name = "sp", address = 1, type = "int16", scale = 0.1, writable = true},
  {name = "f", address = 2, type = "float32", writable = true},
  {name = "d", address = 4, type = "float64", writable = true},
  {name = "label", address = 8, type = "string", length = 2, writable = true},
  {name = "ro", address = 10},
  {name = "run", table = "coil", address = 0, writable = true},
]
"""
SPECS = specs_from_config(parse_config(CONFIG))


def refusal(point: str, value: Any) -> str:
    with pytest.raises(WriteRefused) as exc:
        check_write(SPECS, "plc", point, value)
    return str(exc.value)


@pytest.mark.parametrize(("point", "value", "why"), [
    ("n", 42.7, "int16 expects an integer, got 42.7"),
    ("n", math.nan, "nan is not a finite number"),
    ("f", math.inf, "inf is not a finite number"),
    ("d", -math.inf, "-inf is not a finite number"),
    ("n", 101, "101 is above the point's max 100"),
    ("n", -101, "-101 is below the point's min -100"),
    ("n", 40000, "40000 is out of range for int16"),
    ("n", True, "expects a number, got True"),
    ("n", "5", "expects a number, got '5'"),
    ("n", None, "null is not a value to write"),
    ("run", 1, "expects true or false, got 1"),
    ("ro", 1, "point is read-only"),
    ("sp", 4.27, "not a whole step of this point"),
    ("sp", 4000.0, "out of range for the device's int16"),
    ("f", 1e39, "out of range for float32"),
    ("d", 2**64 - 1, "cannot be written exactly as float64"),
    ("d", 10**400, "cannot be written exactly as float64"),
    ("label", "too long", "does not fit the point's 4 bytes"),
    ("label", "é", "cannot be written in ascii"),
    ("nope", 1, "no such point on this device"),
])
def test_refusals_name_the_point_and_why(point: str, value: Any, why: str) -> None:
    text = refusal(point, value)
    assert text.startswith(f"write plc/{point} refused: ") and why in text, text


def test_accepted_values_come_back_as_the_device_takes_them() -> None:
    assert check_write(SPECS, "plc", "n", 42.0) == 42 and isinstance(check_write(SPECS, "plc", "n", 42.0), int)
    assert check_write(SPECS, "plc", "sp", 4.2) == 4.2  # 41.99999999999999 raw is step 42
    assert check_write(SPECS, "plc", "d", 2**53) == float(2**53)
    assert check_write(SPECS, "plc", "run", False) is False
    assert check_write(SPECS, "plc", "label", "AB") == "AB"


def test_a_refused_value_is_a_write_rejected_for_every_caller() -> None:
    assert issubclass(WriteRefused, WriteRejected)


@pytest.mark.parametrize(("raw", "why"), [
    (b'{"device":"plc","point":"f","value":NaN}', "NaN is not a number"),
    (b'{"device":"plc","point":"f","value":Infinity}', "Infinity is not a number"),
    (b'{"device":"plc","point":"f","value":-Infinity}', "-Infinity is not a number"),
    (b'{"device":"plc","point":"f","value":1e999}', "out of the range of a number"),
    (b'{"device":"plc","point":"n","value":' + b"1" * 5000 + b"}", "integer of 5000 digits is too large"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
])
def test_kafka_commands_refuse_nan_infinity_and_huge_numbers(raw: bytes, why: str) -> None:
    with pytest.raises(CommandError, match=why):
        parse_command(raw)
    with pytest.raises(CommandJsonError):
        loads_command_json(raw)


Msg = namedtuple("Msg", "topic partition offset key value")


async def test_dcmd_and_kafka_refuse_42_7_to_an_int16_with_the_same_words() -> None:
    written: list[tuple[str, str, Any]] = []

    async def write(device: str, point: str, value: Any) -> None:
        written.append((device, point, value))

    inbound = KafkaInbound(KafkaSettings(bootstrap_servers=("k:9092",)),
                           InboundMapping("cmds", ("cmds",), "g", "device_command"), write=write, specs=SPECS)
    await inbound._handle(Msg("cmds", 0, 0, None, b'{"device":"plc","point":"n","value":42.7}'))
    kafka_text = inbound.state.last_error or ""
    await inbound._handle(Msg("cmds", 0, 1, None, b'{"device":"plc","point":"f","value":NaN}'))
    assert written == []
    assert inbound.state.counters["rejected"] == 1 and inbound.state.counters["malformed"] == 1

    infos = {"plc": parse_config(CONFIG).devices[0].point_infos()}
    payload = encode_payload(Payload(timestamp=1, metrics=[Metric("n", DataType.Double, 42.7)]))
    writes, rejected = parse_dcmd("plc", payload, infos["plc"], AliasTable(infos))
    assert writes == []
    reason = "int16 expects an integer, got 42.7"
    assert reason in str(rejected[0]) and reason in kafka_text
    assert str(rejected[0]) == f"DCMD plc/n: {reason}"
    assert kafka_text == f"write plc/n refused: {reason}"


async def test_checked_writer_never_calls_the_driver_with_a_refused_value() -> None:
    calls: list[Any] = []

    async def write(device: str, point: str, value: Any) -> None:
        calls.append(value)

    checked = CheckedWriter(SPECS, write)
    await checked("plc", "n", 7.0)
    with pytest.raises(WriteRefused):
        await checked("plc", "n", 7.5)
    assert calls == [7]


def test_point_info_specs_check_the_published_type() -> None:
    spec = WriteSpec(datatype="uint8", writable=True)
    assert check_value(spec, 255) == 255
    with pytest.raises(WriteRefused, match="out of range for uint8"):
        check_value(spec, 256)
    with pytest.raises(WriteRefused, match="read-only"):
        check_value(WriteSpec(datatype="float64"), 1.0)
    assert PointInfo("x", "int16", writable=True)  # the DCMD path builds its spec from this
