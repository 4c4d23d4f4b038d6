"""The local status server that `outpost status` and `outpost tail` talk to.

A Unix stream socket (mode 0660, group `outpost` when that group exists) speaking
newline-delimited JSON. Each request is one line; see README.md for the protocol:

    {"cmd": "status"}                              -> {"ok": true, "status": {...}}
    {"cmd": "tail", "device": "m1", "point": null} -> {"ok": true, "tail": {...}}, then
                                                      {"sample": {...}} lines, and
                                                      {"dropped": n} before a sample that
                                                      follows n lines this client missed

The gateway feeds samples with `publish_sample(dict)`, which never blocks: every tail
client has a bounded queue, and a client that reads too slowly loses lines (and is told
how many) instead of slowing the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import inspect
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from common.logs import fields
from gateway.diagnostics.clients import ClientTasks
from gateway.diagnostics.errors import DiagnosticsError

log = logging.getLogger(__name__)

StatusProvider = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]

MAX_REQUEST_BYTES = 64 * 1024


@dataclass(eq=False, slots=True)
class _TailClient:
    device: str | None
    point: str | None
    queue: asyncio.Queue[tuple[int, dict[str, Any]]]
    pending_drops: int = 0      # lines lost since the last one queued
    dropped_total: int = 0
    sent: int = 0
    peer: str = field(default="")

    def wants(self, sample: dict[str, Any]) -> bool:
        return (self.device is None or sample.get("device") == self.device) and (
            self.point is None or sample.get("point") == self.point
        )


class StatusServer:
    """Owner of the listening socket and of every client connection.

    `start()` binds, `close()` stops listening, ends every client and removes the socket.
    """

    def __init__(
        self,
        socket_path: str,
        status_provider: StatusProvider,
        *,
        group: str | None = "outpost",
        mode: int = 0o660,
        tail_queue_lines: int = 1000,
        max_clients: int = 16,
    ) -> None:
        self.socket_path = socket_path
        self._provider = status_provider
        self._group = group
        self._mode = mode
        self._tail_queue_lines = tail_queue_lines
        self._server: asyncio.AbstractServer | None = None
        self._clients = ClientTasks(max_clients)
        self._tails: set[_TailClient] = set()
        self._inode: int | None = None

    @property
    def tail_clients(self) -> int:
        return len(self._tails)

    async def start(self) -> None:
        if self._server is not None:
            return
        self._make_directory()
        await self._remove_stale_socket()
        sock = self._bind_with_permissions()
        try:
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=MAX_REQUEST_BYTES
            )
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.socket_path)
            raise
        log.info("status socket listening", extra=fields(path=self.socket_path))

    def _make_directory(self) -> None:
        # Normally /run/outpost from RuntimeDirectory=; created here for other setups.
        os.makedirs(os.path.dirname(os.path.abspath(self.socket_path)), exist_ok=True)

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.socket_path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise DiagnosticsError(
                f"status socket path {self.socket_path} exists and is not a socket",
                hint="set diagnostics.socket_path to a free path, or remove that file",
            )
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.socket_path), timeout=2.0
            )
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            # Left behind by a process that died (kill -9, power loss): safe to replace.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
            return
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise DiagnosticsError(
            f"another process is already serving status on {self.socket_path}",
            hint="is a second outpost running? check `systemctl status outpost`",
        )

    def _bind_with_permissions(self) -> socket.socket:
        # Bind under a temporary name, fix mode and group, then rename into place, so the
        # socket is never reachable with looser permissions than configured.
        tmp = f"{self.socket_path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, self._mode)
            gid = self._group_id()
            if gid is not None:
                try:
                    os.chown(tmp, -1, gid)
                except PermissionError:
                    log.warning(
                        "cannot give the status socket to its group",
                        extra=fields(path=self.socket_path, group=self._group),
                    )
            os.rename(tmp, self.socket_path)
            self._inode = os.stat(self.socket_path).st_ino
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return sock

    def _group_id(self) -> int | None:
        if not self._group:
            return None
        try:
            return grp.getgrnam(self._group).gr_gid
        except KeyError:
            return None

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._clients.cancel_all()
        if server is not None:
            await server.wait_closed()
            # Only remove the socket file if it is still ours (not a successor's).
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.socket_path).st_ino == self._inode:
                    os.unlink(self.socket_path)

    def publish_sample(self, sample: dict[str, Any]) -> None:
        """Offer a sample to every tail client that wants it. Never blocks; call on the loop."""
        if not self._tails:
            return
        for client in self._tails:
            if not client.wants(sample):
                continue
            try:
                client.queue.put_nowait((client.pending_drops, sample))
            except asyncio.QueueFull:
                client.pending_drops += 1
                client.dropped_total += 1
            else:
                client.pending_drops = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._clients.serve(
            writer,
            lambda: self._serve(reader, writer),
            lambda: _send(writer, {"ok": False, "error": "too many diagnostics clients"}),
            quiet=(ConnectionError, BrokenPipeError),
        )

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                await _send(writer, {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                return
            if not line:
                return
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("a request is a JSON object")
            except ValueError as exc:
                await _send(writer, {"ok": False, "error": f"malformed request: {exc}"})
                continue
            cmd = request.get("cmd")
            if cmd == "status":
                await _send(writer, await self._status_response())
            elif cmd == "tail":
                await self._tail(reader, writer, request)
                return
            else:
                await _send(writer, {
                    "ok": False,
                    "error": f"unknown cmd {cmd!r}; expected \"status\" or \"tail\"",
                })

    async def _status_response(self) -> dict[str, Any]:
        try:
            result = self._provider()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            log.exception("status provider failed")
            return {"ok": False, "error": f"status provider failed: {type(exc).__name__}: {exc}"}
        if not isinstance(result, dict):
            return {"ok": False, "error": f"status provider returned {type(result).__name__}"}
        status = dict(result)
        status.setdefault("now_ms", time.time_ns() // 1_000_000)
        return {"ok": True, "status": status}

    async def _tail(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict[str, Any]
    ) -> None:
        device, point = request.get("device"), request.get("point")
        for name, value in (("device", device), ("point", point)):
            if value is not None and not isinstance(value, str):
                await _send(writer, {"ok": False, "error": f"{name} must be a string or null"})
                return
        client = _TailClient(device, point, asyncio.Queue(maxsize=self._tail_queue_lines))
        self._tails.add(client)
        # The client sends nothing more; EOF on its side means it went away.
        eof = asyncio.ensure_future(reader.read())
        try:
            await _send(writer, {"ok": True, "tail": {
                "device": device, "point": point, "queue_lines": self._tail_queue_lines,
            }})
            while not eof.done():
                get = asyncio.ensure_future(client.queue.get())
                try:
                    await asyncio.wait({get, eof}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not get.done():
                        get.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await get
                if not get.done() or get.cancelled():
                    break
                # Write everything queued in one go, then wait for the socket once.
                items = [get.result()]
                while not client.queue.empty():
                    items.append(client.queue.get_nowait())
                chunks: list[bytes] = []
                for drops, sample in items:
                    if drops:
                        chunks.append(_line({"dropped": drops}))
                    chunks.append(_line({"sample": sample}))
                writer.write(b"".join(chunks))
                client.sent += len(items)
                await writer.drain()
        finally:
            self._tails.discard(client)
            eof.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await eof


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, default=str, separators=(",", ":")).encode() + b"\n"


async def _send(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
    writer.write(_line(doc))
    await writer.drain()
