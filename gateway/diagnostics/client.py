"""What `outpost status` and `outpost tail` call: talk to the status socket and render answers.

Plain blocking sockets: the CLI is a short-lived synchronous program. Every failure raises
DiagnosticsError with a hint for the technician (is the gateway running, is the user in
the `outpost` group).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

from gateway.diagnostics.errors import DiagnosticsError
from gateway.diagnostics.plots import link_strip, sparkline

PLOT_WIDTH = 48

_MAX_LINE = 16 * 1024 * 1024

TYPE_CHECKING = False  # typing is a tenth of a Python start: `outpost status` needs none of it
if TYPE_CHECKING:
    from typing import Any


def _connect(socket_path: str, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(socket_path)
    except FileNotFoundError as exc:
        sock.close()
        raise DiagnosticsError(
            f"no status socket at {socket_path}",
            hint="is the gateway running? `systemctl status outpost`; "
            "or pass the socket path from diagnostics.socket_path",
            retriable=True,
        ) from exc
    except PermissionError as exc:
        sock.close()
        raise DiagnosticsError(
            f"permission denied on {socket_path}",
            hint="run as a member of the `outpost` group (`sudo usermod -aG outpost $USER`, "
            "then log in again) or with sudo",
        ) from exc
    except ConnectionRefusedError as exc:
        sock.close()
        raise DiagnosticsError(
            f"nothing is listening on {socket_path} (stale socket file)",
            hint="the gateway is not running or is restarting: `systemctl status outpost`, "
            "`journalctl -u outpost -n 50`",
            retriable=True,
        ) from exc
    except OSError as exc:
        sock.close()
        raise DiagnosticsError(f"cannot connect to {socket_path}: {exc}") from exc
    return sock


class _Lines:
    """Reads newline-delimited JSON documents from a blocking socket."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock = sock
        self._where = where
        self._buf = b""

    def next(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise DiagnosticsError(
                    f"no answer from {self._where} in time",
                    hint="the gateway may be overloaded or its event loop hung; "
                    "check `journalctl -u outpost`",
                    retriable=True,
                ) from exc
            except OSError as exc:
                raise DiagnosticsError(f"reading from {self._where}: {exc}", retriable=True) from exc
            if not chunk:
                raise DiagnosticsError(f"{self._where} closed the connection", retriable=True)
            self._buf += chunk
            if len(self._buf) > _MAX_LINE:
                raise DiagnosticsError(f"answer from {self._where} exceeds {_MAX_LINE} bytes")
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise DiagnosticsError(f"malformed answer from {self._where}: {exc}") from exc
        if not isinstance(doc, dict):
            raise DiagnosticsError(f"malformed answer from {self._where}: not an object")
        return doc


def _request(sock: socket.socket, doc: dict[str, Any], where: str) -> None:
    try:
        sock.sendall(json.dumps(doc).encode() + b"\n")
    except OSError as exc:
        raise DiagnosticsError(f"sending to {where}: {exc}", retriable=True) from exc


def fetch_status(socket_path: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """One status document from the running gateway."""
    with _connect(socket_path, timeout_s) as sock:
        _request(sock, {"cmd": "status"}, socket_path)
        answer = _Lines(sock, socket_path).next()
    if not answer.get("ok"):
        raise DiagnosticsError(f"gateway refused status: {answer.get('error', 'no reason given')}")
    status = answer.get("status")
    if not isinstance(status, dict):
        raise DiagnosticsError(f"gateway answered without a status document: {answer!r}")
    return status


def tail(
    socket_path: str,
    device: str | None = None,
    point: str | None = None,
    timeout_s: float = 5.0,
) -> Iterator[dict[str, Any]]:
    """Live samples. Yields {"sample": {...}} or {"dropped": n} (lines this client missed).

    Runs until the caller stops iterating (Ctrl-C) or the gateway goes away.
    """
    sock = _connect(socket_path, timeout_s)
    try:
        _request(sock, {"cmd": "tail", "device": device, "point": point}, socket_path)
        lines = _Lines(sock, socket_path)
        answer = lines.next()
        if not answer.get("ok"):
            raise DiagnosticsError(f"gateway refused tail: {answer.get('error', 'no reason')}")
        # Samples arrive only when devices are read: waiting long is normal now.
        sock.settimeout(None)
        while True:
            yield lines.next()
    finally:
        sock.close()


def render_tail_line(event: dict[str, Any]) -> str:
    """One human line for a tail event."""
    if "dropped" in event:
        return f"... {event['dropped']} lines dropped (this terminal read too slowly)"
    s = event.get("sample", event)
    ts = s.get("ts_ms")
    when = _utc(ts) if isinstance(ts, int) else "-"
    quality = s.get("quality", "good")
    tail_part = "" if quality in ("good", None) else f"  [{quality}{': ' + s['reason'] if s.get('reason') else ''}]"
    unit = f" {s['unit']}" if s.get("unit") else ""
    return f"{when}  {s.get('device', '?')}/{s.get('point', '?')} = {s.get('value')!r}{unit}{tail_part}"


def _utc(ts_ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts_ms / 1000)) + f".{ts_ms % 1000:03d}Z"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{(seconds % 3600) // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{(seconds % 86400) // 3600:02.0f}h"


def _bytes(n: Any) -> str:
    if not isinstance(n, int | float):
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def _since(now_ms: int, since_ms: Any) -> str:
    if not isinstance(since_ms, int | float) or since_ms <= 0:
        return ""
    return f" for {_age((now_ms - since_ms) / 1000)} (since {_utc(int(since_ms))})"


def _changes_word(changes: list[Any], from_ms: int) -> str:
    downs = sum(1 for c in changes if isinstance(c, list | tuple) and len(c) == 2
                and c[1] != "up" and isinstance(c[0], int | float) and c[0] >= from_ms)
    return "no outage" if not downs else f"{downs} outage{'s' if downs > 1 else ''}"


def render_status(status: dict[str, Any], *, now_ms: int | None = None) -> str:
    """The human view of a status document (`outpost status`, `--watch`).

    Missing sections are shown as such instead of failing: an older gateway or a gateway
    without Kafka still gets a readable screen.
    """
    now = now_ms if now_ms is not None else int(status.get("now_ms") or time.time() * 1000)
    out: list[str] = []
    gw = status.get("gateway", "")
    out.append(
        f"Outpost {status.get('version', '?')}"
        + (f"  {gw}" if gw else "")
        + f"  up {_age(status.get('uptime_s'))}"
    )

    clock = status.get("clock") or {}
    if clock:
        if clock.get("synced"):
            state = "synchronised"
        elif clock.get("holdover"):
            state = "holdover (was synchronised, NTP lost)"
        else:
            state = "NOT SYNCHRONISED: timestamps are held for correction or flagged"
        extra = f", {clock['jumps']} jump(s)" if clock.get("jumps") else ""
        out.append(f"Clock     {state}{extra}")
    else:
        out.append("Clock     unknown")

    history = status.get("history") if isinstance(status.get("history"), dict) else {}
    depth = history.get("depth") or {}
    times = [t for t in (depth.get("t_ms") or []) if isinstance(t, int | float)]
    from_ms = int(min(times[0], now - 60_000)) if times else now - 60_000
    window = f" (last {_age((now - from_ms) / 1000)}, oldest left)" if history else ""

    out.append("")
    out.append("Links" + window)
    links = status.get("links") or {}
    link_history = history.get("links") or {}
    if not links:
        out.append("  (none configured)")
    for name, link in links.items():
        if not isinstance(link, dict):
            continue
        up = link.get("up")
        word = "UP  " if up else "DOWN"
        target = link.get("server") or link.get("host_id") or ""
        err = "" if up or not link.get("last_error") else f"  last error: {link['last_error']}"
        out.append(f"  {name:<13} {word} {target}{_since(now, link.get('since_ms'))}{err}")
        for dest, r in (link.get("refused") or {}).items():
            out.append(f"  {'':<13} {dest} REFUSED: {r.get('reason', '?')}{_since(now, r.get('since_ms'))}")
        counters = {k: v for k, v in (link.get("counters") or {}).items() if v}
        if counters:
            out.append(f"  {'':<13} " + ", ".join(f"{k} {v}" for k, v in counters.items()))
        changes = link_history.get(name)
        if history and isinstance(changes, list):
            strip = link_strip(changes, from_ms, now, PLOT_WIDTH)
            out.append(f"  {'':<13} {strip}  {_changes_word(changes, from_ms)}")

    if status.get("reload_error"):
        out.append(f"  LAST RELOAD REJECTED (running the previous configuration): {status['reload_error']}")

    out.append("")
    buf = status.get("buffer") or {}
    if buf:
        file_part = f"file {_bytes(buf.get('file_bytes'))}, wal {_bytes(buf.get('wal_bytes'))}"
        out.append(f"Buffer    {file_part}, oldest record {_age(buf.get('oldest_age_s'))} old")
        for cursor, c in (buf.get("cursors") or {}).items():
            lag = f", oldest unsent {_age(c.get('oldest_age_s'))}" if c.get("oldest_age_s") else ""
            out.append(
                f"  {cursor:<13} {c.get('records', 0):>9} records  {_bytes(c.get('bytes'))} waiting{lag}"
            )
            series = (depth.get("cursors") or {}).get(cursor)
            if history and isinstance(series, list) and series:
                top = max((v for v in series if isinstance(v, int | float)), default=0)
                out.append(f"  {'':<13} {sparkline(series, PLOT_WIDTH)}  max {top}")
        dropped = {k: v for k, v in (buf.get("dropped") or {}).items() if v}
        if dropped:
            out.append("  DROPPED: " + ", ".join(f"{n} by {why}" for why, n in sorted(dropped.items())))
        else:
            out.append("  dropped: none")
    else:
        out.append("Buffer    unknown")

    out.append("")
    devices = status.get("devices") or {}
    out.append(f"Devices ({len(devices)})")
    if devices:
        out.append(f"  {'name':<20} {'state':<8} {'last good read':<22} {'errors':>7}  quality")
    for name, d in sorted(devices.items()):
        if not isinstance(d, dict):
            continue
        state = "online" if d.get("online") else "OFFLINE"
        last = d.get("last_good_ts_ms")
        last_s = f"{_age((now - last) / 1000)} ago" if isinstance(last, int) and last > 0 else "never"
        errors = d.get("errors", 0)
        quality = d.get("quality", "-")
        if isinstance(quality, dict):
            quality = ", ".join(f"{k}:{v}" for k, v in sorted(quality.items()) if v)
        line = f"  {name:<20} {state:<8} {last_s:<22} {errors:>7}  {quality}"
        if d.get("last_error") and not d.get("online", True):
            line += f"  ({d['last_error']})"
        out.append(line)
    return "\n".join(out)
