"""Edge node session state that outlives a connection: bdSeq, seq, Primary Host STATE, commands.

`BdSeqStore` does blocking file I/O (call it from a thread); everything else is pure and
is driven by gateway.uplinks.mqtt.sparkplug.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.sparkplug.edge import NEXT_SERVER, REBIRTH, AliasTable, PointLike
from gateway.sparkplug.errors import CommandRejected, PayloadError
from gateway.sparkplug.payload import DataType, decode_payload_each, driver_datatype
from gateway.statefile import write_atomic
from gateway.writes import WriteRefused, check_value, spec_from_point


class BdSeqStore:
    """The bdSeq of the last connection, persisted so that a restart never reuses it.

    Written with write-to-temp, fsync, rename, fsync(dir): after a power cut the file holds
    either the old or the new value, never a torn one.
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / "sparkplug-bdseq"

    def last(self) -> int | None:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return None
        try:
            value = int(text)
        except ValueError:
            return None  # a corrupt file: start again at 0 rather than refuse to run
        return value if 0 <= value <= 255 else None

    def candidate(self) -> int:
        """The bdSeq for the next connection attempt (last + 1, wrapping at 255); not saved."""
        last = self.last()
        return 0 if last is None else (last + 1) % 256

    def commit(self, value: int) -> None:
        """Persist `value` once its connection is accepted, so the next NBIRTH is +1."""
        write_atomic(self.path, f"{value}\n")

    def next(self) -> int:
        value = self.candidate()
        self.commit(value)
        return value


class SeqCounter:
    """One seq for every message of the node after NBIRTH (0) , wrapping 255 -> 0."""

    def __init__(self) -> None:
        self._next = 0

    def reset(self) -> int:
        """For NBIRTH: returns 0 and the next call of take() returns 1."""
        self._next = 1
        return 0

    def take(self) -> int:
        value = self._next
        self._next = (value + 1) % 256
        return value

    @property
    def peek(self) -> int:
        return self._next


class PrimaryHostState:
    """Tracks `spBv1.0/STATE/<host_id>` on one MQTT server; a STATE older than the newest seen
    there is ignored.

    Keep one per server (a host's STATE timestamps on one server say nothing about another)
    and call `begin_connection()` on every new connection: the host counts as offline until a
    STATE arrives on that connection. `offlines` counts every accepted offline STATE, so that
    a session notices an offline even when a newer online follows before it looks.
    """

    def __init__(self, host_id: str) -> None:
        self.host_id = host_id
        self.online = False
        self.timestamp: int | None = None
        self.offlines = 0

    def begin_connection(self) -> None:
        self.online = False

    def update(self, payload: bytes) -> bool:
        """Apply one STATE message; returns True when it changed `online`.

        Raises PayloadError for a payload that is not the 3.0.0 JSON form.
        """
        try:
            doc = json.loads(payload)
            online, ts = doc["online"], doc["timestamp"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PayloadError(
                f"STATE of primary host {self.host_id!r} is not "
                f'{{"online": bool, "timestamp": ms}}: {payload[:100]!r} ({exc})'
            ) from None
        if not isinstance(online, bool) or isinstance(ts, bool) or not isinstance(ts, int):
            raise PayloadError(f"STATE of primary host {self.host_id!r} has wrong types: {doc}")
        if self.timestamp is not None and ts < self.timestamp:
            return False  # a stale retained or reordered message
        self.timestamp = ts
        if not online:
            self.offlines += 1
        changed = online != self.online
        self.online = online
        return changed


@dataclass(frozen=True, slots=True)
class Write:
    device: str
    point: str
    value: Any


def _coerce(info: PointLike, value: Any, where: str) -> Any:
    """Check a commanded value against the point: the one write check (gateway.writes)."""
    try:
        return check_value(spec_from_point(info), value)
    except WriteRefused as exc:
        raise CommandRejected(f"{where}: {exc}") from None


def parse_dcmd(device: str, data: bytes, points: Sequence[PointLike],
               aliases: AliasTable | None) -> tuple[list[Write], list[CommandRejected]]:
    """Checked writes from a DCMD, by alias or by name, and what was refused (and why).

    A bad metric never stops the others in the same DCMD.
    """
    by_name = {p.name: p for p in points}

    def resolve(name: str | None, alias: int | None) -> PointLike | None:
        if name is not None:
            return by_name.get(name)
        if alias is not None and aliases is not None:
            hit = aliases.point(alias)
            if hit is not None and hit[0] == device:
                return by_name.get(hit[1])
        return None

    def datatype_of(name: str | None, alias: int | None) -> DataType | None:
        info = resolve(name, alias)
        return driver_datatype(info.datatype) if info is not None else None

    try:
        payload, bad = decode_payload_each(data, datatype_of)
    except PayloadError as exc:
        return [], [CommandRejected(f"DCMD for device {device!r}: {exc}")]
    writes: list[Write] = []
    rejected: list[CommandRejected] = [CommandRejected(f"DCMD for device {device!r}: {e}") for e in bad]
    for m in payload.metrics:
        info = resolve(m.name, m.alias)
        label = m.name if m.name is not None else f"alias {m.alias}"
        where = f"DCMD {device}/{label}"
        if info is None:
            rejected.append(CommandRejected(f"{where}: no such point on this device"))
            continue
        try:
            writes.append(Write(device, info.name, _coerce(info, m.value, f"DCMD {device}/{info.name}")))
        except CommandRejected as exc:
            rejected.append(exc)
    return writes, rejected


@dataclass(frozen=True, slots=True)
class NodeCommand:
    rebirth: bool = False
    next_server: bool = False


def parse_ncmd(data: bytes) -> tuple[NodeCommand, list[CommandRejected]]:
    known = {REBIRTH: DataType.Boolean, NEXT_SERVER: DataType.Boolean}
    try:
        payload, bad = decode_payload_each(data, lambda name, alias: known.get(name or ""))
    except PayloadError as exc:
        return NodeCommand(), [CommandRejected(f"NCMD: {exc}")]
    rebirth = next_server = False
    rejected = [CommandRejected(f"NCMD: {e}") for e in bad]
    for m in payload.metrics:
        if m.name == REBIRTH and m.value is True:
            rebirth = True
        elif m.name == NEXT_SERVER and m.value is True:
            next_server = True
        else:
            rejected.append(CommandRejected(f"NCMD: metric {m.name or m.alias!r} = {m.value!r} "
                                            "is not a command this edge node takes"))
    return NodeCommand(rebirth, next_server), rejected


def points_by_device(devices: Mapping[str, Sequence[PointLike]]) -> dict[str, dict[str, PointLike]]:
    return {d: {p.name: p for p in pts} for d, pts in devices.items()}
