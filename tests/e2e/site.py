"""The simulated field site of the end-to-end scenario: Modbus servers that count, a serial sensor.

Every Modbus holding register counts *the reads it served*: a read returns the current
values and then increments every register it returned, so each poll of the gateway gets a
new, distinct value (report-by-exception never suppresses it) and the server knows exactly
which values it handed out and when (`served`). Counting reads rather than seconds matters:
a clock-driven counter can step twice between two polls, which would show as a "gap" the
gateway never caused. `freeze()` stops the counting (reads repeat the last value served), so the
gateway stops producing new records and the buffer can drain to exactly zero.

The serial sensor writes `count=N level=N.5` lines on one end of a pty pair once a second;
`written` keeps the wall-clock time of every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field

from pymodbus.constants import ExcCodes

from drivers.modbus.simserver import SimServer, SimUnit

HOLDING_FC = 3


@dataclass
class CountingUnit:
    """One Modbus unit: `points` holding registers r00.. at addresses 0..points-1."""

    device: str
    points: int
    values: list[int] = field(default_factory=list)
    # served[address] = wall-clock times of each served value; value k was served at served[a][k-1].
    served: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.values = [1] * self.points
        self.served = [[] for _ in range(self.points)]


class CountingStore:
    """Duck-typed pymodbus server context: holding registers that count the reads they serve."""

    def __init__(self, units: dict[int, CountingUnit]) -> None:
        self.units = units
        self.frozen = False
        self.requests = 0
        self.rejected = 0

    def device_ids(self) -> list[int]:
        return list(self.units)

    async def async_getValues(self, device_id, func_code, address, count=1):
        self.requests += 1
        unit = self.units.get(device_id)
        if unit is None or func_code != HOLDING_FC or address < 0 or address + count > unit.points:
            self.rejected += 1
            return ExcCodes.ILLEGAL_ADDRESS
        values = unit.values[address : address + count]
        if self.frozen:
            # Repeat the last value served, which the gateway already has: nothing new to report.
            return [max(0, v - 1) for v in values]
        else:
            now = time.time()
            for a in range(address, address + count):
                unit.served[a].append(now)
                unit.values[a] = (unit.values[a] + 1) & 0xFFFF
        return list(values)

    async def async_setValues(self, device_id, func_code, address, values):
        self.rejected += 1
        return ExcCodes.ILLEGAL_FUNCTION


class ModbusSite:
    """Modbus TCP servers (one unit each) and RTU servers on pty lines (two units per line)."""

    def __init__(self, points: int) -> None:
        self.points = points
        self.servers: list[SimServer] = []
        self.stores: list[CountingStore] = []
        self.units: dict[str, CountingUnit] = {}  # device name -> unit
        # (bus name, transport, endpoint, [(device, unit_id)])
        self.buses: list[tuple[str, str, str | int, list[tuple[str, int]]]] = []

    def _store(self, server: SimServer, devices: list[tuple[str, int]]) -> None:
        units = {uid: CountingUnit(dev, self.points) for dev, uid in devices}
        for dev, uid in devices:
            self.units[dev] = units[uid]
        store = CountingStore(units)
        # SimServer serves the store it was given; ours replaces it before any client connects.
        server.server.context = store
        self.servers.append(server)
        self.stores.append(store)

    async def add_tcp(self, bus: str, devices: list[tuple[str, int]]) -> None:
        server = await SimServer.tcp({uid: SimUnit() for _, uid in devices})
        self._store(server, devices)
        self.buses.append((bus, "tcp", server.port, devices))

    async def add_rtu(self, bus: str, server_port: str, gateway_port: str,
                      devices: list[tuple[str, int]], baudrate: int) -> None:
        server = await SimServer.rtu(server_port, {uid: SimUnit() for _, uid in devices}, baudrate=baudrate)
        self._store(server, devices)
        self.buses.append((bus, "rtu", gateway_port, devices))

    def freeze(self) -> None:
        for store in self.stores:
            store.frozen = True

    def served(self) -> dict[tuple[str, str], list[float]]:
        """(device, point) -> serve time of value 1, 2, ... (index k-1 holds value k)."""
        return {
            (dev, point_name(a)): list(unit.served[a])
            for dev, unit in self.units.items()
            for a in range(unit.points)
        }

    async def stop(self) -> None:
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.stop()
        self.servers.clear()


def point_name(address: int) -> str:
    return f"r{address:02d}"


class SerialSensor:
    """Writes one `count=N level=N.5` line per interval to a pty; an asyncio task it owns."""

    def __init__(self, device: str, path: str, interval_s: float = 1.0) -> None:
        self.device = device
        self.path = path
        self.interval_s = interval_s
        self.written: list[float] = []  # written[n-1] = time line n was written
        self.skipped = 0  # the pty was full (nobody reading): the line was not written
        self._task: asyncio.Task[None] | None = None
        self._fd: int | None = None

    def start(self) -> None:
        self._fd = os.open(self.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self._task = asyncio.create_task(self._run(), name=f"serial-sensor:{self.device}")

    async def _run(self) -> None:
        assert self._fd is not None
        while True:
            n = len(self.written) + 1
            line = f"count={n} level={n}.5\n".encode()
            try:
                os.write(self._fd, line)
                self.written.append(time.time())
            except BlockingIOError:
                self.skipped += 1
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Stop writing (the freeze before the final drain) and close the pty end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
