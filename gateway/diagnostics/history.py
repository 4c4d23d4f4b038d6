"""The recent past of the status document: buffer depth, link history and state changes.

A technician arriving in the morning wants to see how the buffer grew during the night's
outage and when each link dropped, not only how things are now. `StatusHistory` samples
the status document every `interval_s` (5 s) into bounded rings held in memory:

- buffer depth per cursor (uplink), the last `window_s` (6 h: 4320 points, about 1 MB);
- each link's up/down changes (the last 100 per link);
- a log of state changes (link up/down, a destination refused, device offline/online, clock
  sync, records dropped or quarantined, a rejected reload), the last 200.

It adds them to the document as `history` (downsampled to at most `points` per series), so
`outpost status`, `outpost status --json` and the status page show the same thing. The
rings are saved to a small JSON file next to the buffer on a clean stop and every 30
minutes, and read back at start, so a restart does not wipe the picture; a missing or
unreadable file only means an empty history.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from common.logs import fields

log = logging.getLogger(__name__)

StatusProvider = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]

HISTORY_FILE = "status-history.json"
_FORMAT = 1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class StatusHistory:
    """Owner of the sampling task and of the rings; `document()` is the status provider to serve."""

    def __init__(
        self,
        provider: StatusProvider,
        *,
        interval_s: float = 5.0,
        window_s: float = 6 * 3600,
        points: int = 360,
        path: str | None = None,
        save_every_s: float = 1800.0,
        link_changes: int = 100,
        events: int = 200,
    ) -> None:
        self._provider = provider
        self.interval_s = interval_s
        self.window_s = window_s
        self.points = points
        self.path = path
        self._save_every_s = save_every_s
        capacity = max(2, math.ceil(window_s / interval_s))
        # (ts_ms, cursor names, depths): the names tuple is shared while the cursors stay the same.
        self.depth: deque[tuple[int, tuple[str, ...], tuple[int, ...]]] = deque(maxlen=capacity)
        self.links: dict[str, deque[tuple[int, str]]] = {}
        self._link_changes = link_changes
        self.events: deque[dict[str, Any]] = deque(maxlen=events)
        self._last: dict[str, Any] | None = None  # what the previous sample saw
        self._names: tuple[str, ...] = ()
        self._task: asyncio.Task[None] | None = None
        self._last_save = time.monotonic()

    # -- serving ------------------------------------------------------------------------

    async def current(self) -> dict[str, Any]:
        result = self._provider()
        if inspect.isawaitable(result):
            result = await result
        return result

    async def document(self) -> dict[str, Any]:
        """The status document with its `history` section (what every renderer gets)."""
        doc = dict(await self.current())
        doc.setdefault("now_ms", _now_ms())
        doc["history"] = self.as_dict()
        return doc

    # -- sampling -----------------------------------------------------------------------

    def record(self, doc: dict[str, Any], now_ms: int | None = None) -> None:
        """Take one sample of a status document (pure: no I/O)."""
        now = _now_ms() if now_ms is None else now_ms
        buf = doc.get("buffer") or {}
        cursors = buf.get("cursors") if isinstance(buf, dict) else None
        if isinstance(cursors, dict):
            names = tuple(sorted(cursors))
            if names != self._names:
                self._names = names
            depths = tuple(int((cursors[n] or {}).get("records") or 0) for n in self._names)
            self.depth.append((now, self._names, depths))
        seen = _observe(doc)
        self._changes(self._last, seen, now)
        self._last = seen

    def _changes(self, before: dict[str, Any] | None, now_seen: dict[str, Any], now: int) -> None:
        for name, (state, since, error) in now_seen["links"].items():
            ring = self.links.get(name)
            if ring is None:
                ring = self.links[name] = deque(maxlen=self._link_changes)
            at = since if isinstance(since, int) and since > 0 else now
            said = f"{name} {state}" + (f": {error}" if error and state != "up" else "")
            level = "info" if state == "up" else "warning"
            prev = before["links"].get(name) if before is not None else None
            if not ring or ring[-1][1] != state:
                ring.append((at, state))
                # A link seen for the first time is news only if it failed (not merely connecting).
                if prev is not None or (state != "up" and error):
                    self._event(at, level, said)
            elif prev is not None and prev[1] != since:
                # Gone and back between two samples: keep the gap visible.
                ring.append((max(ring[-1][0], at - 1), "down" if state == "up" else "up"))
                ring.append((at, state))
                self._event(at, level, f"{said} (changed and back between two samples)")
        if before is None:
            for dev, (online, err) in now_seen["devices"].items():
                if not online:
                    self._event(now, "warning", f"device {dev} offline" + (f": {err}" if err else ""))
            return
        for name, reason in now_seen["refused"].items():
            if name not in before["refused"]:
                self._event(now, "warning", f"{name.replace('/', ' refuses ', 1)}: {reason}")
        for name in before["refused"]:
            if name not in now_seen["refused"]:
                self._event(now, "info", f"{name.replace('/', ' accepts ', 1)} again")
        for dev, (online, err) in now_seen["devices"].items():
            was = before["devices"].get(dev)
            if was is None or was[0] == online:
                continue
            if online:
                self._event(now, "info", f"device {dev} online")
            else:
                self._event(now, "warning", f"device {dev} offline" + (f": {err}" if err else ""))
        if before["clock"] is not None and now_seen["clock"] is not None and before["clock"] != now_seen["clock"]:
            self._event(now, "info" if now_seen["clock"] else "warning",
                        "clock synchronised" if now_seen["clock"] else "clock not synchronised")
        for key, word in (("dropped", "dropped"), ("quarantined", "quarantined")):
            for reason, n in now_seen[key].items():
                more = n - before[key].get(reason, 0)
                if more > 0:
                    self._event(now, "warning", f"{more} record(s) {word}: {reason}")
        if now_seen["reload_error"] and now_seen["reload_error"] != before["reload_error"]:
            self._event(now, "error", f"reload rejected: {now_seen['reload_error']}")

    def _event(self, ts_ms: int, level: str, text: str) -> None:
        self.events.append({"ts_ms": int(ts_ms), "level": level, "text": text})

    # -- rendering ----------------------------------------------------------------------

    def as_dict(self, points: int | None = None) -> dict[str, Any]:
        """The `history` section: depth series downsampled (max per bucket), link changes, events."""
        limit = max(2, points or self.points)
        samples = list(self.depth)
        step = max(1, math.ceil(len(samples) / limit))
        names: list[str] = sorted({n for _, ns, _ in samples for n in ns})
        t_ms: list[int] = []
        series: dict[str, list[int | None]] = {n: [] for n in names}
        for i in range(0, len(samples), step):
            group = samples[i:i + step]
            t_ms.append(group[-1][0])
            for n in names:
                values = [d[ns.index(n)] for _, ns, d in group if n in ns]
                series[n].append(max(values) if values else None)
        return {
            "interval_s": self.interval_s,
            "window_s": self.window_s,
            "step_s": self.interval_s * step,
            "depth": {"t_ms": t_ms, "cursors": series},
            "links": {name: [[ts, state] for ts, state in ring] for name, ring in self.links.items()},
            "events": list(self.events),
        }

    # -- the task -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self.load()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="status-history")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.to_thread(self.save)

    async def _run(self) -> None:
        while True:
            try:
                self.record(await asyncio.wait_for(self.current(), 10.0))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a history gap, never a stopped gateway
                log.warning("status history sample failed", extra=fields(reason=repr(e)))
            if self.path and time.monotonic() - self._last_save >= self._save_every_s:
                self._last_save = time.monotonic()
                await asyncio.to_thread(self.save)
            await asyncio.sleep(self.interval_s)

    # -- persistence --------------------------------------------------------------------

    def save(self) -> None:
        if not self.path:
            return
        doc = {
            "format": _FORMAT,
            "depth": [[ts, list(ns), list(d)] for ts, ns, d in self.depth],
            "links": {name: [list(c) for c in ring] for name, ring in self.links.items()},
            "events": list(self.events),
        }
        tmp = f"{self.path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("status history not saved", extra=fields(path=self.path, reason=str(e)))

    def load(self) -> None:
        if not self.path:
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise ValueError("not a status history file of this version")
            oldest = _now_ms() - int(self.window_s * 1000)
            for ts, ns, d in doc.get("depth", []):
                if int(ts) >= oldest and len(ns) == len(d):
                    self.depth.append((int(ts), tuple(str(n) for n in ns), tuple(int(v) for v in d)))
            for name, ring in (doc.get("links") or {}).items():
                target = self.links.setdefault(str(name), deque(maxlen=self._link_changes))
                target.extend((int(ts), str(state)) for ts, state in ring)
            self.events.extend(e for e in doc.get("events", []) if isinstance(e, dict) and "ts_ms" in e)
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("status history unreadable: starting an empty one",
                        extra=fields(path=self.path, reason=str(e)))
            self.depth.clear()
            self.links.clear()
            self.events.clear()


def _observe(doc: dict[str, Any]) -> dict[str, Any]:
    """What the change log compares between two samples."""
    links: dict[str, tuple[str, Any, str]] = {}
    refused: dict[str, str] = {}
    for name, link in (doc.get("links") or {}).items():
        if not isinstance(link, dict):
            continue
        state = link.get("link") or ("up" if link.get("up") else "down")
        links[name] = (str(state), link.get("since_ms"), str(link.get("last_error") or ""))
        for dest, r in (link.get("refused") or {}).items():
            refused[f"{name}/{dest}"] = str((r or {}).get("reason", "?"))
    devices = {
        name: (bool(d.get("online")), str(d.get("last_error") or ""))
        for name, d in (doc.get("devices") or {}).items() if isinstance(d, dict)
    }
    buf = doc.get("buffer") or {}
    clock = doc.get("clock")
    return {
        "links": links,
        "refused": refused,
        "devices": devices,
        "clock": bool(clock.get("synced")) if isinstance(clock, dict) and clock else None,
        "dropped": {k: int(v) for k, v in (buf.get("dropped") or {}).items() if isinstance(v, int)},
        "quarantined": {k: int(v) for k, v in ((buf.get("quarantine") or {}).get("total_by_reason") or {}).items()
                        if isinstance(v, int)},
        "reload_error": doc.get("reload_error"),
    }
