"""Structured logging for a process that runs for years under journald: one line shape.

Every line is `key=value` fields (or one JSON object) on stdout, where journald picks it
up: a short message that names the event (`msg="link down"`) and the facts as fields
(`fields(link="kafka", reason=...)`), never `event=...` spelled inside the message text.
Under systemd (JOURNAL_STREAM set) each line starts with its syslog priority (`<4>`), which
journald turns into the entry's priority with `SyslogLevelPrefix=yes` (the default), so
`journalctl -u outpost -p warning` works.

`StateLog` is the one log-once mechanism: a condition that repeats every poll (a link that
stays down, a device that keeps timing out) becomes exactly two lines: one when the state
changes and one when it recovers, the latter carrying how many repetitions were suppressed
and for how long. `once()` logs a condition that does not recover by itself once per key.

    setup_logging("INFO", fmt="kv")
    log = logging.getLogger("gateway.uplink.mqtt")
    log.info("connected", extra=fields(server="mqtts://broker:8883"))

    states = StateLog(log)
    states.problem("link:mqtt", "link down", link="mqtt", reason="connection refused")
    states.recovered("link:mqtt", "link up", link="mqtt")
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

# The attribute under which structured fields travel through logging's `extra`.
_FIELDS_ATTR = "outpost_fields"

# Characters that force quoting of a value in key=value output.
_NEEDS_QUOTES = frozenset(' "=\\\t\n\r')


def fields(**kv: Any) -> dict[str, dict[str, Any]]:
    """Wrap structured fields for `logger.info(msg, extra=fields(device="meter1"))`."""
    return {_FIELDS_ATTR: kv}


def _kv_value(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "-"
    else:
        text = str(value)
    if text == "" or any(c in _NEEDS_QUOTES for c in text):
        escaped = (
            text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            .replace("\r", "\\r").replace("\t", "\\t")
        )
        return f'"{escaped}"'
    return text


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = getattr(record, _FIELDS_ATTR, None)
    return dict(extra) if isinstance(extra, dict) else {}


class KeyValueFormatter(logging.Formatter):
    """`level=warning logger=gateway.uplink msg="link down" link=mqtt reason=...`.

    journald stamps each line itself, so the timestamp is left out when stdout is the
    journal (systemd sets JOURNAL_STREAM) and kept otherwise (a terminal, a file).
    """

    def __init__(self, *, with_time: bool, priority_prefix: bool = False) -> None:
        super().__init__()
        self.with_time = with_time
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        parts: list[str] = []
        if self.with_time:
            parts.append("ts=" + _iso_utc(record.created))
        parts.append("level=" + record.levelname.lower())
        parts.append("logger=" + _kv_value(record.name))
        parts.append("msg=" + _kv_value(record.getMessage()))
        for key, value in _record_fields(record).items():
            parts.append(f"{key}={_kv_value(value)}")
        if record.exc_info:
            parts.append("exc=" + _kv_value(self.formatException(record.exc_info)))
        line = " ".join(parts)
        return f"<{_syslog_priority(record.levelno)}>{line}" if self.priority_prefix else line


def _syslog_priority(levelno: int) -> int:
    """syslog severity of a logging level: 3 error (and above), 4 warning, 6 info, 7 debug."""
    if levelno >= logging.ERROR:
        return 2 if levelno >= logging.CRITICAL else 3
    if levelno >= logging.WARNING:
        return 4
    return 6 if levelno >= logging.INFO else 7


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers that parse JSON."""

    def __init__(self, *, priority_prefix: bool = False) -> None:
        super().__init__()
        self.priority_prefix = priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _record_fields(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        line = json.dumps(doc, default=str, separators=(",", ":"))
        return f"<{_syslog_priority(record.levelno)}>{line}" if self.priority_prefix else line


def _iso_utc(created: float) -> str:
    secs = int(created)
    ms = int((created - secs) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ms:03d}Z"


_HANDLER_MARK = "_outpost_handler"


def setup_logging(level: str | int = "INFO", fmt: str = "kv", stream: TextIO | None = None) -> None:
    """Route every logger to stdout in the chosen format. Safe to call again (on reload)."""
    if fmt not in ("kv", "json"):
        raise ValueError(f"log format must be \"kv\" or \"json\", got {fmt!r}")
    if isinstance(level, str):
        numeric = logging.getLevelName(level.upper())
        if not isinstance(numeric, int):
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = numeric
    handler = logging.StreamHandler(stream if stream is not None else sys.stdout)
    journal = "JOURNAL_STREAM" in os.environ
    if fmt == "json":
        handler.setFormatter(JsonFormatter(priority_prefix=journal))
    else:
        handler.setFormatter(KeyValueFormatter(with_time=not journal, priority_prefix=journal))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


@dataclass(slots=True)
class _Open:
    """A problem that has been logged and not yet recovered."""

    since: float
    suppressed: int = 0
    last_reason: str = ""
    last_reminder: float = 0.0


class StateLog:
    """Log a problem once, its recovery once, and count the repetitions in between.

    Keys name the thing that fails ("link:kafka", "device:meter1", "buffer:dropping").
    `problem()` logs only when the key was not already in trouble; `recovered()` logs only
    when it was. With `remind_every_s`, a problem that lasts is repeated at most that
    often ("still ...") so that a long outage remains visible in a short journal window.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        remind_every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._remind_every_s = remind_every_s
        self._clock = clock
        self._open: dict[str, _Open] = {}

    def problem(
        self, key: str, message: str, *, level: int = logging.WARNING, **kv: Any
    ) -> bool:
        """Report that `key` is in trouble. Returns True when a line was written."""
        now = self._clock()
        reason = str(kv.get("reason", ""))
        state = self._open.get(key)
        if state is None:
            self._open[key] = _Open(since=now, last_reason=reason, last_reminder=now)
            self._log.log(level, message, extra=fields(**kv))
            return True
        state.suppressed += 1
        if reason:
            state.last_reason = reason
        if self._remind_every_s is not None and now - state.last_reminder >= self._remind_every_s:
            state.last_reminder = now
            self._log.log(
                level,
                f"still {message}",
                extra=fields(**kv, for_s=round(now - state.since, 1), repeats=state.suppressed),
            )
            return True
        return False

    def recovered(self, key: str, message: str, *, level: int = logging.INFO, **kv: Any) -> bool:
        """Report that `key` is fine. Logs only if a problem was open for it."""
        state = self._open.pop(key, None)
        if state is None:
            return False
        extra = dict(kv)
        extra["after_s"] = round(self._clock() - state.since, 1)
        extra["suppressed"] = state.suppressed
        if state.last_reason:
            extra.setdefault("last_reason", state.last_reason)
        self._log.log(level, message, extra=fields(**extra))
        return True

    def once(self, key: str, message: str, *, level: int = logging.WARNING, **kv: Any) -> bool:
        """Log `message` the first time `key` is seen, count it silently after that.

        For conditions that do not recover by themselves (a record that cannot be formatted,
        an unknown point): one line per reason, the counters tell the rest.
        """
        if key in self._open:
            self._open[key].suppressed += 1
            return False
        if len(self._open) >= self.MAX_KEYS:
            self._open.clear()  # bounded: a flood of distinct reasons cannot grow memory
        return self.problem(key, message, level=level, **kv)

    MAX_KEYS = 4096

    def first_in(self, key: str, window_s: float) -> bool:
        """True (and noted) when `key` was not seen in the last `window_s`; counts repeats.

        The bookkeeping behind `RepeatFilter`: decides without writing a line itself.
        """
        now = self._clock()
        state = self._open.get(key)
        if state is not None and now - state.since < window_s:
            state.suppressed += 1
            return False
        if len(self._open) >= self.MAX_KEYS:
            self._open.clear()
        self._open[key] = _Open(since=now)
        return True

    def is_open(self, key: str) -> bool:
        return key in self._open

    def open_keys(self) -> list[str]:
        return sorted(self._open)

    def suppressed(self, key: str) -> int:
        state = self._open.get(key)
        return 0 if state is None else state.suppressed


class RepeatFilter(logging.Filter):
    """Log-once for client libraries we do not write: a repeat of the same message within
    `window_s` is dropped (aiokafka and gmqtt log every failed connection attempt; while a
    cellular link is down that is a line per retry on an SD card). The first occurrence,
    with its reason (a SASL failure only aiokafka reports), is kept. StateLog's bookkeeping.
    """

    def __init__(self, window_s: float = 600.0, *, prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.window_s = window_s
        self.prefixes = prefixes  # on a handler: only these loggers (and their children)
        self._seen = StateLog(logging.getLogger(__name__))
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.prefixes and not record.name.startswith(self.prefixes):
            return True
        if self._seen.first_in(f"{record.name}:{record.levelno}:{record.getMessage()}", self.window_s):
            return True
        self.suppressed += 1
        return False


def install_handler_filter(flt: logging.Filter) -> None:
    """Add `flt` to the handler setup_logging() installed (it sees every logger's records)."""
    for h in logging.getLogger().handlers:
        if getattr(h, _HANDLER_MARK, False):
            h.addFilter(flt)
