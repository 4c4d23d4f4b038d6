"""Benchmark: 50 devices x 100 points on a local Modbus TCP server.

Prints requests per poll cycle with coalescing versus one request per point, samples/s and
CPU seconds per 1000 samples in the driver process (the server runs in a child process).
Run: python -m tests.benchmarks.modbus --json [--devices 50 --points 100 --seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import socket
import time

DEVICES_DEFAULT = 50
POINTS_DEFAULT = 100
TYPES = ["uint16", "int16", "float32", "int32", "float64", "uint32"]


def layout(points: int) -> list[dict]:
    """Realistic map: mixed types, small gaps, a few coils."""
    out, addr = [], 0
    for i in range(points):
        if i % 10 == 9:
            out.append({"name": f"c{i}", "table": "coil", "address": i})
            continue
        t = TYPES[i % len(TYPES)]
        out.append({"name": f"p{i}", "table": "holding", "address": addr, "type": t})
        addr += {"uint16": 1, "int16": 1, "float32": 2, "int32": 2, "float64": 4, "uint32": 2}[t]
        addr += 1 if i % 7 == 0 else 0     # occasional unused register
    return out


def serve(port: int, devices: int, ready_conn) -> None:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    from drivers.modbus.simserver import SimServer, SimUnit

    async def main():
        units = {}
        for u in range(1, devices + 1):
            unit = SimUnit()
            unit.set_range("holding", 0, [(u * 7 + a) & 0xFFFF for a in range(1200)])
            unit.set_range("coil", 0, [a % 3 == 0 for a in range(200)])
            units[u] = unit
        await SimServer.tcp(units, port=port)
        ready_conn.send("ready")
        await asyncio.Event().wait()

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(port: int, devices: int, points: int, seconds: float) -> dict:
    from drivers.modbus.config import ModbusDeviceConfig, TcpBusConfig
    from drivers.modbus.driver import ModbusBusDriver
    from drivers.modbus.planner import PlanPoint, one_per_point

    bus = TcpBusConfig(name="bench", transport="tcp", host="127.0.0.1", port=port, timeout="2s")
    configs = [
        ModbusDeviceConfig.model_validate({"name": f"d{u}", "bus": "bench", "unit_id": u,
                                           "interval": "100ms", "points": layout(points)})
        for u in range(1, devices + 1)
    ]
    count = [0]

    def on_sample(s):
        count[0] += 1

    drv = ModbusBusDriver(bus, configs, on_sample, lambda e: None)
    coalesced = sum(len(drv.plan(c.name)) for c in configs)
    naive = sum(
        len(one_per_point([PlanPoint(p.name, p.table, p.address, p.register_count) for p in c.points]))
        for c in configs
    )
    task = asyncio.create_task(drv.run(), name=drv.name)
    await asyncio.sleep(1.0)           # connect and warm up
    n0, r0, cpu0, t0 = count[0], drv.stats["requests"], time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    n1, r1, cpu1, t1 = count[0], drv.stats["requests"], time.process_time(), time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    samples = n1 - n0
    return {
        "devices": devices,
        "points_per_device": points,
        "requests_per_cycle_coalesced": coalesced,
        "requests_per_cycle_one_per_point": naive,
        "coalescing_ratio": round(naive / coalesced, 2),
        "seconds": round(t1 - t0, 2),
        "samples": samples,
        "samples_per_s": round(samples / (t1 - t0), 1),
        "requests_per_s": round((r1 - r0) / (t1 - t0), 1),
        "cpu_s_per_1000_samples": round((cpu1 - cpu0) / samples * 1000, 4) if samples else None,
        "overruns": drv.stats["overruns"],
        "timeouts": drv.stats["timeouts"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--devices", type=int, default=DEVICES_DEFAULT)
    ap.add_argument("--points", type=int, default=POINTS_DEFAULT)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    server = ctx.Process(target=serve, args=(port, args.devices, child_conn), daemon=True)
    server.start()
    try:
        if not parent_conn.poll(30):
            raise SystemExit("benchmark server did not start")
        result = asyncio.run(measure(port, args.devices, args.points, args.seconds))
    finally:
        server.terminate()
        server.join(5)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:34} {v}")


if __name__ == "__main__":
    main()
