"""Configuration model for simulated devices (demos, load tests, CI without hardware).

Every waveform is a pure function of the tick number and the seed, so two runs with the
same config produce the same values: load tests are repeatable.
"""

from __future__ import annotations

import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from drivers.base import PointInfo
from drivers.units import Duration


class SimulatorPointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str = Field(min_length=1)
    waveform: Literal["sine", "ramp", "step", "random_walk", "counter", "constant"] = "sine"
    type: Literal["float64", "float32", "int32", "int64", "uint32", "uint64", "bool"] = "float64"
    count: int = Field(default=1, ge=1, le=100_000, description="expand into name_0..name_{count-1}")
    period: Duration = Field(default=60.0, gt=0, description="sine/ramp/step period")
    amplitude: float = 1.0
    offset: float = 0.0
    step: float = Field(default=1.0, description="counter increment / random walk max step")
    min: float | None = None
    max: float | None = None
    interval: Duration | None = Field(default=None, gt=0)
    unit: str = ""
    deadband: float | None = Field(default=None, ge=0)
    max_report_interval: Duration | None = Field(default=None, gt=0)
    writable: bool = False

    @model_validator(mode="after")
    def _check(self) -> SimulatorPointConfig:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"point {self.name!r}: min {self.min} is greater than max {self.max}")
        if self.type == "bool" and self.waveform not in ("step", "constant"):
            raise ValueError(f"point {self.name!r}: type bool needs waveform step or constant")
        return self

    def names(self) -> list[str]:
        if self.count == 1:
            return [self.name]
        # Interned: the check, the driver, report by exception and the write checks each ask,
        # and 10,000 expanded names would otherwise be held four times over.
        return [sys.intern(f"{self.name}_{i}") for i in range(self.count)]


class SimulatorDeviceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    driver: Literal["simulator"]
    name: str = Field(min_length=1, description="Sparkplug device id")
    interval: Duration = Field(default=1.0, gt=0)
    seed: int = 0
    points: list[SimulatorPointConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> SimulatorDeviceConfig:
        seen: set[str] = set()
        dup: set[str] = set()
        for n in (n for p in self.points for n in p.names()):
            (dup if n in seen else seen).add(n)
        if dup:
            raise ValueError(f"duplicate point names: {sorted(dup)}")
        return self

    def point_infos(self) -> list[PointInfo]:
        out = []
        for p in self.points:
            for n in p.names():
                out.append(
                    PointInfo(
                        name=n,
                        datatype=p.type,
                        unit=p.unit,
                        writable=p.writable,
                        min=p.min,
                        max=p.max,
                        deadband=p.deadband,
                        max_report_interval=p.max_report_interval,
                    )
                )
        return out
