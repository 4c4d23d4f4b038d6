"""Small helpers shared by test modules (no services, no fixtures)."""

from __future__ import annotations

from typing import Any


def flat(state: Any) -> dict[str, Any]:
    """An uplink's UplinkState as one flat dict: the status document plus its counters."""
    doc = state.as_dict()
    return {**doc, **doc["counters"], "connected": doc["up"]}
