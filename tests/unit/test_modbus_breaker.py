"""The per-device circuit breaker: offline after N failed cycles, capped backoff with jitter."""

import random

from drivers.base import DeviceState
from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
from drivers.modbus.driver import ModbusBusDriver, _Timeout


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make(rng_seed=1):
    bus = TcpBusConfig(name="b", transport="tcp", host="127.0.0.1")
    dev = ModbusDeviceConfig.model_validate({
        "name": "m", "bus": "b", "interval": "1s", "offline_after_failures": 3,
        "probe_backoff_max": "16s", "points": [{"name": "x", "address": 0}]})
    events = []
    clock = Clock()
    drv = ModbusBusDriver(bus, [dev], lambda s: None, events.append, clock=clock,
                          rng=random.Random(rng_seed))
    return drv, drv._devices["m"], events, clock


def test_offline_after_n_failed_cycles_and_back_online():
    drv, st, events, _ = make()
    drv._cycle_result(st, True, None)
    for _ in range(2):
        drv._cycle_result(st, False, _Timeout("timeout"))
    assert [e.state for e in events] == [DeviceState.ONLINE]
    drv._cycle_result(st, False, _Timeout("timeout after 1s"))
    assert events[-1].state is DeviceState.OFFLINE and "timeout after 1s" in events[-1].reason
    drv._cycle_result(st, False, _Timeout("timeout"))
    assert len(events) == 2          # OFFLINE is announced once
    drv._cycle_result(st, True, None)
    assert events[-1].state is DeviceState.ONLINE and st.failed_cycles == 0


def test_probe_backoff_grows_is_capped_and_jittered():
    drv, st, _, clock = make()
    delays = []
    for _ in range(8):
        drv._schedule_probe(st)
        delays.append(st.next_probe - clock.now)
    caps = [min(16.0, 2.0 ** (k + 1)) for k in range(8)]
    for d, cap in zip(delays, caps, strict=True):
        assert 1.0 <= d <= cap  # the one backoff: full jitter from the poll interval up
    assert st.probe_backoff is not None and st.probe_backoff.cap() == 16.0
    assert len({round(d, 6) for d in delays[3:]}) > 1
    # Two devices that died together do not probe in lockstep.
    other, st2, _, _ = make(rng_seed=2)
    other._schedule_probe(st2)
    drv2, st3, _, _ = make(rng_seed=1)
    drv2._schedule_probe(st3)
    assert st2.next_probe != st3.next_probe
