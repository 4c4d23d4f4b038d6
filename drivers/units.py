"""Duration and size values for configuration models.

Durations are strings with a unit ("800ms", "30s", "7d") so that a config file never
leaves the reader guessing whether 30 means seconds or milliseconds. They live in
`drivers` because driver config models need them and `drivers` may not import `gateway`;
`gateway` imports them from here.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS_S = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d)\s*$")


def parse_duration(value: Any) -> float:
    """Return seconds for a duration string such as "800ms", "30s", "5m", "7d"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration string with a unit, such as \"800ms\" or \"30s\"")
    if isinstance(value, int | float):
        raise ValueError(
            f"expected a duration string with a unit, such as \"{value}s\" or \"{value}ms\", "
            f"got the bare number {value!r}"
        )
    if not isinstance(value, str):
        raise ValueError(f"expected a duration string such as \"800ms\", got {value!r}")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(
            f"expected a duration such as \"800ms\", \"30s\", \"5m\", \"2h\" or \"7d\", got {value!r}"
        )
    return float(m.group(1)) * _UNITS_S[m.group(2)]


def format_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_S[unit]
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000, 3):g}ms"


def parse_size(value: Any) -> int:
    """Sizes are plain byte counts (TOML allows 512_000_000)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a size in bytes as an integer such as 512_000_000, got {value!r}")
    if value < 0:
        raise ValueError(f"expected a non-negative size in bytes, got {value}")
    return value


# Seconds as float in Python, a unit string in TOML.
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
SizeBytes = Annotated[int, BeforeValidator(parse_size)]
