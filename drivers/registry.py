"""Which drivers exist, how their devices are configured, and how running drivers are built.

The gateway's config loader takes `DeviceConfig` (the union of every driver's device model,
chosen by the `driver` key, "modbus" when absent) and the runtime calls `build_drivers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import Discriminator, Tag

from drivers.base import DeviceEventSink, Driver, DriverError, SampleSink
from drivers.modbus.config import ModbusBusConfig, ModbusDeviceConfig
from drivers.serial_line.config import SerialLineDeviceConfig
from drivers.simulator.config import SimulatorDeviceConfig

# factory(devices of this driver, buses by name, on_sample, on_event) -> running drivers
DriverFactory = Callable[[list[Any], dict[str, Any], SampleSink, DeviceEventSink], list[Driver]]


def _modbus_factory(devices, buses, on_sample, on_event):
    from drivers.modbus.driver import ModbusBusDriver

    by_bus: dict[str, list[ModbusDeviceConfig]] = {}
    for dev in devices:
        if dev.bus not in buses:
            raise DriverError(
                f"device {dev.name!r}: bus {dev.bus!r} is not configured "
                f"(known buses: {sorted(buses) or 'none'})"
            )
        by_bus.setdefault(dev.bus, []).append(dev)
    # One driver per bus: it owns the line's lock and serialises every request on it.
    return [ModbusBusDriver(buses[name], devs, on_sample, on_event) for name, devs in by_bus.items()]


def _serial_factory(devices, buses, on_sample, on_event):
    from drivers.serial_line.driver import SerialLineDriver

    return [SerialLineDriver(dev, on_sample, on_event) for dev in devices]


def _simulator_factory(devices, buses, on_sample, on_event):
    from drivers.simulator.driver import SimulatorDriver

    return [SimulatorDriver(devices, on_sample, on_event)] if devices else []


DRIVERS: dict[str, tuple[type, DriverFactory]] = {
    "modbus": (ModbusDeviceConfig, _modbus_factory),
    "serial_line": (SerialLineDeviceConfig, _serial_factory),
    "simulator": (SimulatorDeviceConfig, _simulator_factory),
}


def _driver_key(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("driver", "modbus")
    return getattr(value, "driver", "modbus")


# Use as `devices: list[DeviceConfig]` in the gateway config model.
DeviceConfig = Annotated[
    Annotated[ModbusDeviceConfig, Tag("modbus")]
    | Annotated[SerialLineDeviceConfig, Tag("serial_line")]
    | Annotated[SimulatorDeviceConfig, Tag("simulator")],
    Discriminator(_driver_key),
]

__all__ = ["DRIVERS", "DeviceConfig", "ModbusBusConfig", "build_drivers"]


def build_drivers(
    buses: Sequence[Any],
    devices: Sequence[Any],
    on_sample: SampleSink,
    on_event: DeviceEventSink,
) -> list[Driver]:
    """One modbus driver per bus (with all its devices), one per serial device, one simulator."""
    bus_by_name = {b.name: b for b in buses}
    if len(bus_by_name) != len(buses):
        raise DriverError("two buses share one name")
    names = [d.name for d in devices]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DriverError(f"device names must be unique, repeated: {dup}")
    grouped: dict[str, list[Any]] = {name: [] for name in DRIVERS}
    for dev in devices:
        key = getattr(dev, "driver", "modbus")
        if key not in DRIVERS:
            raise DriverError(f"device {dev.name!r}: unknown driver {key!r}")
        grouped[key].append(dev)
    drivers: list[Driver] = []
    for key, devs in grouped.items():
        if devs:
            drivers.extend(DRIVERS[key][1](devs, bus_by_name, on_sample, on_event))
    return drivers
