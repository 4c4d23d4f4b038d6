"""Plots for a terminal: a sparkline of the buffer depth and a strip of a link's history.

Pure functions over the `history` section of the status document (gateway.diagnostics.history),
used by `outpost status`. Eight block characters give a trend at a glance in 48 columns;
the exact figures stay in the lines above and in `--json`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

BLOCKS = "▁▂▃▄▅▆▇█"
UP, DOWN, UNKNOWN = "█", "░", " "


def resample_max(values: Sequence[float | int | None], width: int) -> list[float | None]:
    """`values` squeezed (or kept) into at most `width` buckets, each the maximum of its bucket."""
    if width <= 0 or not values:
        return []
    if len(values) <= width:
        return [None if v is None else float(v) for v in values]
    out: list[float | None] = []
    for i in range(width):
        lo, hi = (i * len(values)) // width, ((i + 1) * len(values)) // width
        bucket = [float(v) for v in values[lo:max(hi, lo + 1)] if v is not None]
        out.append(max(bucket) if bucket else None)
    return out


def sparkline(values: Sequence[float | int | None], width: int = 48) -> str:
    """Zero is the lowest block, the maximum the highest; any record at all shows above zero."""
    points = resample_max(values, width)
    top = max((v for v in points if v is not None), default=0.0)
    chars = []
    for v in points:
        if v is None:
            chars.append(" ")
        elif v <= 0 or top <= 0:
            chars.append(BLOCKS[0])
        else:
            chars.append(BLOCKS[max(1, math.ceil(v / top * (len(BLOCKS) - 1)))])
    return "".join(chars)


def link_strip(changes: Sequence[Sequence[object]], from_ms: int, to_ms: int, width: int = 48) -> str:
    """One character per slice of [from_ms, to_ms]: up, down (or stopped), or not yet known.

    `changes` are `[ts_ms, state]` pairs, oldest first. A slice in which the link was down at
    all shows as down, so a short outage is not hidden by the resolution.
    """
    if width <= 0 or to_ms <= from_ms:
        return ""
    span = (to_ms - from_ms) / width
    marks = [UNKNOWN] * width
    pairs = [(int(ts), str(state)) for ts, state in changes]  # type: ignore[call-overload]
    for i, (start, state) in enumerate(pairs):
        end = pairs[i + 1][0] if i + 1 < len(pairs) else to_ms
        if end < from_ms or start > to_ms:
            continue
        first = max(0, int((max(start, from_ms) - from_ms) // span))
        last = max(first, min(width - 1, int((min(end, to_ms) - 1 - from_ms) // span)))
        for k in range(first, last + 1):
            if state == "up":
                if marks[k] == UNKNOWN:
                    marks[k] = UP
            else:
                marks[k] = DOWN
    return "".join(marks)
