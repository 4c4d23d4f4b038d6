"""The one record schema: what a buffered record's headers mean, and the publish-time policy.

The buffer stores opaque bytes with string headers (DESIGN contract 2). This module is the
only place that names those headers, says how streams are named, and applies the clock rule
at publish time, so every uplink (MQTT, Kafka, anything later) reads a record the same way.

Headers written by the pipeline (and the bridge):
- `topic`: the MQTT topic the record belongs to (Sparkplug DDATA topic, or a bridged topic)
- `type`: `DDATA` / `NDATA` (Sparkplug data) or `bridged` (another client's MQTT message)
- `gateway`: the gateway id `group/edge_node`
- `clock`, `clock_offset_ns`, `boot_id`: present only on records stamped while the system
  clock was not synchronised (see gateway.clock); they let an uplink correct the record's
  timestamps once the clock has synchronised in the same boot, or flag them otherwise.

Streams: `group/edge_node` for node data, `group/edge_node/device` for a device's data, the
MQTT topic itself for bridged messages. Order is kept per stream (DESIGN guarantee 3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

H_TOPIC = "topic"
H_TYPE = "type"
H_GATEWAY = "gateway"
H_CLOCK = "clock"
H_CLOCK_OFFSET = "clock_offset_ns"
H_CLOCK_BOOT = "boot_id"

TYPE_DDATA = "DDATA"
TYPE_NDATA = "NDATA"
TYPE_BRIDGED = "bridged"
SPARKPLUG_DATA_TYPES = frozenset((TYPE_DDATA, TYPE_NDATA))

CLOCK_UNSYNCED = "unsynced"


def gateway_id(group_id: str, edge_node_id: str) -> str:
    return f"{group_id}/{edge_node_id}"


def stream_name(gateway: str, device: str | None) -> str:
    """The stream of a device's records (or of the node's own, for `device=None`)."""
    return gateway if device is None else f"{gateway}/{device}"


@dataclass(frozen=True, slots=True)
class ClockFix:
    """What the clock rule does to one record at publish time.

    `correction_ms` is added to every timestamp of the record (the clock synchronised since
    it was stamped, in the same boot); `unsynced` means the timestamps could not be
    corrected and the record must be published flagged. Never both.
    """

    correction_ms: int = 0
    unsynced: bool = False

    @property
    def changes_anything(self) -> bool:
        return bool(self.correction_ms) or self.unsynced


NO_FIX = ClockFix()


def clock_fix(clock: Any, headers: Mapping[str, str]) -> ClockFix:
    """The clock rule for one record: publish at once, corrected if possible, else flagged.

    `clock` is the gateway's ClockGuard (None: nothing can be corrected). A record without
    clock headers was stamped on a trusted clock and is left alone.
    """
    if H_CLOCK not in headers:
        return NO_FIX
    if clock is None:
        return ClockFix(0, True)
    res = clock.resolve_record(headers, held_for_s=0.0, max_hold_s=0.0)
    if res.action == "publish":
        return ClockFix(int(res.delta_ms or 0), False)
    return ClockFix(0, True)
