"""Pure Modbus read planning: coalesce points into the fewest requests a device accepts.

Points of one table are merged into one request while the request stays within the
device's cap (registers or bits) and the unused span between two points stays within
`max_gap`. A value is never split across requests. Address ranges a device refused with
exception 2 ("holes") are remembered and never spanned again. No I/O here.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

BIT_TABLES = ("coil", "discrete")


@dataclass(frozen=True, slots=True)
class PlanPoint:
    key: Hashable        # what the caller uses to find the point again
    table: str           # coil | discrete | holding | input
    address: int         # 0-based protocol address
    count: int           # registers (or bits) the value occupies


@dataclass(frozen=True, slots=True)
class Hole:
    """Addresses [start, end) of one table a device refuses; end == start is a barrier
    (two neighbours readable alone but not together)."""

    table: str
    start: int
    end: int

    def conflicts(self, table: str, start: int, end: int) -> bool:
        # One test serves both: a barrier (end == start) conflicts with a span that
        # contains it strictly, start < self.start < end.
        return table == self.table and start < self.end and end > self.start


@dataclass(frozen=True, slots=True)
class ReadBlock:
    table: str
    address: int
    count: int
    points: tuple[PlanPoint, ...]

    @property
    def end(self) -> int:
        return self.address + self.count


def plan_reads(
    points: Iterable[PlanPoint],
    *,
    max_registers: int = 125,
    max_bits: int = 2000,
    max_gap: int = 10,
    holes: Sequence[Hole] = (),
) -> list[ReadBlock]:
    """Return read requests covering every point, ordered by table then address."""
    by_table: dict[str, list[PlanPoint]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    blocks: list[ReadBlock] = []
    for table in sorted(by_table):
        cap = max_bits if table in BIT_TABLES else max_registers
        table_holes = [h for h in holes if h.table == table]
        current: list[PlanPoint] = []
        start = end = 0
        for p in sorted(by_table[table], key=lambda q: (q.address, q.count)):
            if p.count > cap:
                raise ValueError(f"point {p.key!r} takes {p.count} > cap {cap}; cannot be read")
            if current:
                new_end = max(end, p.address + p.count)
                fits = (
                    new_end - start <= cap
                    and p.address - end <= max_gap
                    and not any(h.conflicts(table, start, new_end) for h in table_holes)
                )
                if fits:
                    current.append(p)
                    end = new_end
                    continue
                blocks.append(ReadBlock(table, start, end - start, tuple(current)))
            current = [p]
            start, end = p.address, p.address + p.count
        if current:
            blocks.append(ReadBlock(table, start, end - start, tuple(current)))
    return blocks


def one_per_point(points: Iterable[PlanPoint]) -> list[ReadBlock]:
    """The naive plan (one request per point), for comparison in benchmarks."""
    return [ReadBlock(p.table, p.address, p.count, (p,)) for p in points]


def split_block(block: ReadBlock) -> tuple[ReadBlock, ReadBlock]:
    """Split a refused multi-point block into two halves at a point boundary."""
    pts = sorted(block.points, key=lambda q: (q.address, q.count))
    if len(pts) < 2:
        raise ValueError("a single-point block cannot be split")
    mid = len(pts) // 2
    return _block_of(block.table, pts[:mid]), _block_of(block.table, pts[mid:])


def _block_of(table: str, pts: Sequence[PlanPoint]) -> ReadBlock:
    start = min(p.address for p in pts)
    end = max(p.address + p.count for p in pts)
    return ReadBlock(table, start, end - start, tuple(pts))


def hole_between(left: ReadBlock, right: ReadBlock) -> Hole:
    """Both halves of a refused block read fine: the refusal lies between them."""
    if right.address >= left.end:
        return Hole(left.table, left.end, right.address)
    # Overlapping halves (two bits of one register): remember a barrier.
    return Hole(left.table, right.address, right.address)
