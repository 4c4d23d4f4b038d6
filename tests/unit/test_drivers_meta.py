"""Every registered driver is documented, and its sample config validates."""

import tomllib
from pathlib import Path

import pytest
from pydantic import TypeAdapter

import drivers
from drivers.base import DATATYPES
from drivers.modbus.config import ModbusBusConfig
from drivers.registry import DRIVERS, DeviceConfig, build_drivers

ROOT = Path(drivers.__file__).parent


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_driver_folder_is_complete(name):
    folder = ROOT / name
    for part in ("config.py", "driver.py", "sample.toml", "README.md"):
        assert (folder / part).is_file(), f"drivers/{name}/{part} is missing"
    assert any(p.name.endswith("codec.py") or p.name == "waveforms.py" for p in folder.iterdir())
    sample = (folder / "sample.toml").read_text()
    assert sample in (folder / "README.md").read_text(), f"drivers/{name}/README.md lacks sample.toml"


@pytest.mark.parametrize("name", sorted(DRIVERS))
def test_sample_validates_and_builds(name):
    data = tomllib.loads((ROOT / name / "sample.toml").read_text())
    model = DRIVERS[name][0]
    devices = [model.model_validate(d) for d in data["devices"]]
    union = TypeAdapter(list[DeviceConfig]).validate_python(data["devices"])
    assert [type(d) for d in union] == [model] * len(devices)
    buses = TypeAdapter(list[ModbusBusConfig]).validate_python(data.get("buses", []))
    for dev in devices:
        infos = dev.point_infos()
        assert infos and all(i.datatype in DATATYPES for i in infos)
    built = build_drivers(buses, devices, lambda s: None, lambda e: None)
    assert built and sorted(n for d in built for n in d.devices()) == sorted(d.name for d in devices)
