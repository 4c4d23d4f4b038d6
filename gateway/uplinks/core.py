"""The one uplink contract: a typed state, named events, and the outcome of a delivery.

Every uplink (the Sparkplug edge node on MQTT, the Kafka uplink, the local MQTT bridge and
each Kafka inbound consumer) owns one `UplinkState` and changes it only through its event
methods. An event updates the counter, the Prometheus series and the log line together,
so a figure cannot exist in one place and be missing in another: `outpost status`,
`outpost status --json`, `/metrics` and the systemd status line are all rendered from
`UplinkState.as_dict()` and the metric series bound here.

    state = UplinkState("kafka", counters=("delivered", "refused", "skipped"))
    state.link_up("kafka-1:9092")            # logs once, sets since, link gauge 1
    state.count("delivered", 1000)           # counter + outpost_uplink_events_total
    state.link_down("timeout", retry_in_s=2) # logs the outage once, repeats at debug
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from common.logs import StateLog, fields

log = logging.getLogger("outpost.uplinks")


class Outcome(enum.StrEnum):
    """What became of one publish or produce (DESIGN guarantee 6)."""

    DELIVERED = "delivered"                      # acknowledged: the record may leave the buffer
    RETRIABLE = "retriable"                      # link, leader, timeout: retry, nothing moves
    REFUSED_RECORD = "refused_record"            # too large, not encodable: this record only
    REFUSED_DESTINATION = "refused_destination"  # not authorised, unknown topic, quota


@dataclass(slots=True)
class Refusal:
    """A destination that is up and says no: held in order and probed until it clears."""

    reason: str
    since_ms: int
    probes: int = 0


class UplinkState:
    """The state of one uplink; mutate it only through the methods below."""

    __slots__ = ("_states", "counters", "extra", "last_error", "last_error_ms", "link",
                 "name", "on_render", "refused", "server", "since_ms")

    def __init__(self, name: str, *, counters: Iterable[str] = (), logger: logging.Logger | None = None) -> None:
        self.name = name
        self.counters = dict.fromkeys((*counters, "reconnects"), 0)
        self.link = "down"
        self.since_ms = int(time.time() * 1000)
        self.server = None
        self.last_error = None
        self.last_error_ms = None
        self.refused = {}
        self.extra = {}
        self.on_render: Callable[[], None] | None = None  # refreshes `extra` before rendering
        self._states = StateLog(logger or log)

    # -- events -------------------------------------------------------------------------

    def count(self, event: str, n: int = 1) -> None:
        """`n` more of a named outcome (delivered, refused, skipped, unmatched, ...)."""
        if n <= 0:
            if event not in self.counters:
                self.counters[event] = 0
            return
        self.counters[event] = self.counters.get(event, 0) + n

    def link_up(self, server: str | None) -> None:
        """The link works (connected and, where it applies, acknowledged something)."""
        changed = self.link != "up" or server != self.server
        self.server = server
        if self.link != "up":
            self._set_link("up")
        if changed:
            if not self._states.recovered(
                    "link", "link up", uplink=self.name, server=server):
                log.info("link up", extra=fields(uplink=self.name, server=server))

    def link_down(self, error: str, *, server: str | None = None, **kv: Any) -> None:
        """The link failed: logged once per outage (and once per new reason), never per retry."""
        self.last_error = error
        self.last_error_ms = int(time.time() * 1000)
        if server is not None:
            self.server = server
        was_up = self.link == "up"
        if was_up:
            self.count("reconnects")
        self._set_link("down")
        logged = self._states.problem(
            "link", "link down", uplink=self.name, server=self.server, reason=error, **kv)
        if not logged:
            log.debug("link still down", extra=fields(uplink=self.name, reason=error, **kv))

    def stopped(self) -> None:
        if self.link == "up":
            log.info("link stopped", extra=fields(uplink=self.name, server=self.server))
        self._set_link("stopped")

    def error(self, key: str, message: str, **kv: Any) -> bool:
        """A problem that does not take the link down, logged once per `key`.

        `last_error` becomes its `reason` (the precise words) when one is given.
        """
        self.last_error = str(kv["reason"]) if kv.get("reason") else message
        self.last_error_ms = int(time.time() * 1000)
        return self._states.once(
            f"error:{key}", message, uplink=self.name, **kv)

    def refuse(self, destination: str, reason: str) -> bool:
        """`destination` refused (not authorised, unknown topic, quota); True when it is new."""
        current = self.refused.get(destination)
        if current is not None:
            current.probes += 1
            current.reason = reason
            return False
        self.refused[destination] = Refusal(reason, int(time.time() * 1000))
        self.count("refusals")
        self._states.problem(
            f"refused:{destination}", "destination refused", uplink=self.name,
            destination=destination, reason=reason)
        return True

    def accept(self, destination: str) -> None:
        """`destination` accepts again: its held records flow in order."""
        if self.refused.pop(destination, None) is not None:
            self._states.recovered(
                f"refused:{destination}", "destination accepts again", uplink=self.name,
                destination=destination)

    def _set_link(self, link: str) -> None:
        if link != self.link:
            self.link = link
            self.since_ms = int(time.time() * 1000)

    # -- rendering ----------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.link == "up"

    def as_dict(self) -> dict[str, Any]:
        """The status document of this uplink (`outpost status --json` -> links.<name>)."""
        if self.on_render is not None:
            self.on_render()
        return {
            "up": self.link == "up",
            "link": self.link,
            "since_ms": self.since_ms,
            "server": self.server,
            "last_error": self.last_error or "",
            "last_error_ms": self.last_error_ms,
            "counters": dict(self.counters),
            "refused": {d: {"reason": r.reason, "since_ms": r.since_ms, "probes": r.probes}
                        for d, r in self.refused.items()},
            **self.extra,
        }

    def summary(self) -> str:
        """One short phrase for the systemd status line: `kafka up`, `mqtt down 2m`."""
        word = self.link
        if self.refused:
            word += f" ({len(self.refused)} refused)"
        return f"{self.name} {word}"


HELD_PREFIX = "held:"  # quarantine reason of a held destination's records: held:<topic>


@dataclass(slots=True)
class HeldDestination:
    """A destination that refuses (not authorised, unknown topic, quota): its records wait in
    the buffer's quarantine under `reason_key`, in order; it is probed with `backoff` until it
    accepts, and then drained oldest first before it flows directly again. The same for the
    Sparkplug session (MQTT topics) and the Kafka uplink (Kafka topics)."""

    topic: str
    backoff: Any  # common.backoff.Backoff
    draining: bool = False
    next_probe: float = 0.0

    @property
    def reason_key(self) -> str:
        return held_key(self.topic)


def held_key(topic: str) -> str:
    return (HELD_PREFIX + topic)[:200]  # the buffer keeps reasons of at most 200 characters


def held_topics(stats: dict[str, Any], cursor: str) -> list[str]:
    """Destinations with records held in the buffer for `cursor` (after a restart)."""
    reasons = ((stats.get("quarantine") or {}).get("by_cursor_reason") or {}).get(cursor, {})
    return [r[len(HELD_PREFIX):] for r in reasons if r.startswith(HELD_PREFIX)]


class Uplink(Protocol):
    """What the supervisor needs of every uplink and inbound consumer."""

    state: UplinkState

    async def run(self) -> None: ...

    async def stop(self) -> None: ...
