"""What every driver produces and offers: samples, device state and writes.

The gateway sees drivers only through this module. A driver owns its I/O (a bus, a
port), polls its devices, and hands `Sample`s and `DeviceEvent`s to the callbacks it was
given. It never knows about the buffer or the uplinks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol


class Quality(enum.StrEnum):
    GOOD = "good"
    BAD = "bad"
    STALE = "stale"


def now_ms() -> int:
    """Wall-clock UTC milliseconds, as Sparkplug timestamps want them."""
    return time.time_ns() // 1_000_000


class Sample(NamedTuple):
    """One reading of one point. A named tuple rather than a frozen dataclass: drivers make
    one per register read (10,000 a second in the gateway benchmark), and a tuple is made
    in about a third of the time of a frozen dataclass, which sets each field through
    object.__setattr__."""

    device: str             # the device name from the config (Sparkplug device id)
    point: str              # the point name within the device
    value: Any              # decoded and scaled value; None when quality is bad
    ts_ms: int              # source timestamp, UTC ms, taken when the reply arrived
    quality: Quality = Quality.GOOD
    reason: str = ""        # why quality is not good ("timeout", "exception 2", ...)
    datatype: str = ""      # the point's configured type ("float32", "bool", "string", ...)


# The Sparkplug-visible datatypes a point can have (names match Sample.datatype).
DATATYPES: tuple[str, ...] = (
    "bool",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "float32", "float64",
    "string",
)


@dataclass(frozen=True, slots=True)
class PointInfo:
    """What the Sparkplug layer needs to announce a point in DBIRTH, whatever the driver."""

    name: str
    datatype: str                         # one of DATATYPES
    unit: str = ""
    writable: bool = False
    min: float | None = None
    max: float | None = None
    deadband: float | None = None
    max_report_interval: float | None = None   # seconds; None = report by exception only

    def __post_init__(self) -> None:
        if self.datatype not in DATATYPES:
            raise ValueError(f"point {self.name!r}: unknown datatype {self.datatype!r}")


class DeviceState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    device: str
    state: DeviceState
    reason: str = ""
    ts_ms: int = field(default_factory=now_ms)


SampleSink = Callable[[Sample], None]
DeviceEventSink = Callable[[DeviceEvent], None]


class DriverError(Exception):
    """Root of every driver error. `retriable` tells callers whether trying again helps."""

    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class WriteRejected(DriverError):
    """A write failed the point's checks (not writable, wrong type, out of min/max)."""


class Driver(Protocol):
    """One running driver instance: a Modbus bus with its devices, a serial port, a simulator.

    `run()` is the driver's single owner task body: it returns only when cancelled.
    `write()` performs one checked write and raises WriteRejected or DriverError.
    """

    name: str

    def devices(self) -> list[str]: ...

    async def run(self) -> None: ...

    async def write(self, device: str, point: str, value: Any) -> None: ...
