"""Config validation: impossible combinations are rejected with messages that name the fix."""

import pytest
from pydantic import TypeAdapter, ValidationError

from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig

BUS = TypeAdapter(ModbusBusConfig)


def device(*points, **kw):
    return ModbusDeviceConfig.model_validate({"name": "m", "bus": "b", "points": list(points), **kw})


@pytest.mark.parametrize(
    ("point", "message"),
    [
        ({"name": "x", "table": "coil", "address": 0, "type": "float32"}, "type must be bool"),
        ({"name": "x", "address": 0, "type": "bool", "bit": 16}, "bit must be 0..15"),
        ({"name": "x", "address": 0, "type": "bool"}, "needs bit"),
        ({"name": "x", "address": 0, "type": "string"}, "needs length"),
        ({"name": "x", "table": "input", "address": 0, "writable": True}, "only coil and holding"),
        ({"name": "x", "address": 0, "type": "float32", "writable": True, "write_function": 6}, "use 16"),
        ({"name": "x", "table": "coil", "address": 0, "writable": True, "write_function": 16}, "does not write a coil"),
        ({"name": "x", "address": 0, "min": 5, "max": 1}, "greater than max"),
        ({"name": "x", "address": 0, "scale": 0}, "must not be 0"),
        ({"name": "x", "address": 65535, "type": "float32"}, "runs past 65535"),
        ({"name": "x", "address": 0, "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_points_are_rejected(point, message):
    with pytest.raises(ValidationError, match=message):
        device(point)


def test_address_base_one_rejects_zero_and_shifts_addresses():
    with pytest.raises(ValidationError, match="address 0 does not exist"):
        device({"name": "x", "address": 0}, address_base=1)
    dev = device({"name": "x", "address": 40}, address_base=1)
    assert dev.protocol_address(dev.points[0]) == 39


def test_duplicate_point_names():
    with pytest.raises(ValidationError, match="duplicate point name"):
        device({"name": "x", "address": 0}, {"name": "x", "address": 1})


def test_defaults_and_point_infos():
    dev = device(
        {"name": "c", "table": "coil", "address": 1, "writable": True},
        {"name": "v", "table": "input", "address": 0, "type": "float32", "unit": "V", "deadband": 0.5},
        {"name": "s", "address": 10, "scale": 0.1},
    )
    infos = {i.name: i for i in dev.point_infos()}
    assert infos["c"].datatype == "bool" and infos["c"].writable
    assert infos["v"].datatype == "float32" and infos["v"].unit == "V" and infos["v"].deadband == 0.5
    assert infos["s"].datatype == "float64"   # a scaled register is published as a float
    assert dev.points[2].type == "uint16"


def test_bus_transports_and_durations():
    rtu = BUS.validate_python({"name": "a", "transport": "rtu", "port": "/dev/ttyUSB0",
                               "timeout": "800ms", "inter_frame_delay": "30ms", "parity": "E"})
    assert rtu.timeout == pytest.approx(0.8) and rtu.inter_frame_delay == pytest.approx(0.03)
    tcp = BUS.validate_python({"name": "t", "transport": "tcp", "host": "10.0.0.5"})
    assert tcp.port == 502
    with pytest.raises(ValidationError):
        BUS.validate_python({"name": "t", "transport": "tcp", "host": "h", "baudrate": 9600})
    with pytest.raises(ValidationError, match="duration"):
        BUS.validate_python({"name": "t", "transport": "tcp", "host": "h", "timeout": 1})
