"""The diagnostics HTTP listener: the status page, `/status.json` and `/metrics`.

One small asyncio HTTP/1.1 server (GET and HEAD only, one request per connection) on
`diagnostics.metrics_listen`, loopback by default and reached from a laptop with
`ssh -L 9108:127.0.0.1:9108 pi@site`. Everything it serves is read-only:

    GET /             the status page (static HTML; its script polls /status.json)
    GET /page.js, /page.css
    GET /status.json  the status document of `outpost status --json`, with its history
    GET /metrics      Prometheus exposition (prometheus_client), rendered from that document

An address beyond loopback is refused unless the configuration allows it, and then every
request must carry the token (`Authorization: Bearer <token>`, or `?token=` for a browser).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from common.logs import fields
from gateway.config import MIN_TOKEN_CHARS, parse_host_port  # one host:port syntax for every setting
from gateway.diagnostics.clients import ClientTasks
from gateway.diagnostics.errors import DiagnosticsError
from gateway.diagnostics.metrics import CONTENT_TYPE, GatewayMetrics

log = logging.getLogger(__name__)

Document = Callable[[], Awaitable[dict[str, Any]]]

_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
# The page needs nothing from elsewhere: no inline script, no third-party origin, no frames.
_SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


def parse_listen(listen: str) -> tuple[str, int]:
    try:
        return parse_host_port(listen, allow_port_zero=True)
    except ValueError:
        raise DiagnosticsError(
            f"metrics_listen {listen!r}: expected host:port such as 127.0.0.1:9108") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_assets() -> dict[str, bytes]:
    root = resources.files("gateway.diagnostics") / "page"
    return {name: (root / name).read_bytes() for name, _ in set(_ASSETS.values())}


class WebServer:
    """Owner of the HTTP listener and its connections.

    `document` is the status provider with history (`StatusHistory.document`). Loopback only
    unless `allow_remote`, which needs a token of at least 16 characters.
    """

    def __init__(
        self,
        document: Document,
        listen: str = "127.0.0.1:9108",
        *,
        metrics: GatewayMetrics | None = None,
        page: bool = True,
        allow_remote: bool = False,
        token: str | None = None,
        request_timeout_s: float = 5.0,
        max_clients: int = 16,
    ) -> None:
        self.host, self._port = parse_listen(listen)
        if not is_loopback(self.host):
            if not allow_remote:
                raise DiagnosticsError(
                    f"metrics_listen {listen!r} is not a loopback address",
                    hint="the status page and metrics are served on 127.0.0.1; reach them with "
                    "`ssh -L 9108:127.0.0.1:9108 <gateway>`, or set diagnostics.allow_remote and a token_file",
                )
            if not token or len(token) < MIN_TOKEN_CHARS:
                raise DiagnosticsError(
                    f"metrics_listen {listen!r} is beyond loopback and needs a token of at least "
                    f"{MIN_TOKEN_CHARS} characters",
                    hint="put one in diagnostics.token_file (e.g. `openssl rand -hex 24`)",
                )
        self._token = token.encode() if token else None
        self._document = document
        self.metrics = metrics or GatewayMetrics()
        self._assets: dict[str, bytes] = {}
        if page:
            try:
                self._assets = _load_assets()
            except OSError as exc:  # an install without the page's files still serves the metrics
                log.error("status page files missing: serving /metrics and /status.json only",
                          extra=fields(reason=str(exc)))
        self._timeout_s = request_timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._clients = ClientTasks(max_clients)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._server is not None and self._server.sockets:
            return int(self._server.sockets[0].getsockname()[1])
        return self._port

    async def start(self) -> None:
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self._port)
        except OSError as exc:
            raise DiagnosticsError(
                f"cannot serve diagnostics on {self.host}:{self._port}: {exc.strerror or exc}",
                hint="another process uses that port; pick another metrics_listen",
            ) from exc
        log.info("diagnostics http listening", extra=fields(
            listen=f"{self.host}:{self.port}", page=bool(self._assets), token=self._token is not None))

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await self._clients.cancel_all()
        await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def serve() -> None:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout_s)
            await self._answer(writer, head)

        await self._clients.serve(
            writer,
            serve,
            lambda: _respond(writer, 503, "Service Unavailable", b"too many clients\n"),
            quiet=(TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError),
        )

    async def _answer(self, writer: asyncio.StreamWriter, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _respond(writer, 400, "Bad Request", b"bad request\n")
            return
        method, target = parts[0], urlsplit(parts[1])
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if self._token is not None and not self._authorised(headers, target.query):
            await _respond(writer, 401, "Unauthorized", b"token required (Authorization: Bearer, or ?token=)\n",
                           extra=(("WWW-Authenticate", 'Bearer realm="outpost"'),))
            return
        path = target.path
        known = path in ("/metrics", "/status.json") or (path in _ASSETS and bool(self._assets))
        if not known:
            await _respond(writer, 404, "Not Found", b"try /, /status.json or /metrics\n")
            return
        if method not in ("GET", "HEAD"):
            await _respond(writer, 405, "Method Not Allowed", b"GET only\n", extra=(("Allow", "GET, HEAD"),))
            return
        head_only = method == "HEAD"
        if path in _ASSETS:
            name, ctype = _ASSETS[path]
            await _respond(writer, 200, "OK", self._assets[name], content_type=ctype, head_only=head_only)
            return
        try:
            doc = await self._document()
        except Exception as exc:
            log.exception("status provider failed")
            await _respond(writer, 500, "Internal Server Error", f"status failed: {type(exc).__name__}\n".encode())
            return
        doc.setdefault("now_ms", time.time_ns() // 1_000_000)
        if path == "/metrics":
            # A thread would not help: rendering is short and the document is already made.
            body = self.metrics.render(doc)
            await _respond(writer, 200, "OK", body, content_type=CONTENT_TYPE, head_only=head_only)
        else:
            body = json.dumps(doc, default=str, separators=(",", ":")).encode()
            await _respond(writer, 200, "OK", body, content_type="application/json", head_only=head_only)

    def _authorised(self, headers: dict[str, str], query: str) -> bool:
        assert self._token is not None
        auth = headers.get("authorization", "")
        offered = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not offered:
            offered = (parse_qs(query).get("token") or [""])[0]
        return hmac.compare_digest(offered.encode(), self._token)


async def _respond(
    writer: asyncio.StreamWriter,
    code: int,
    reason: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
    extra: tuple[tuple[str, str], ...] = (),
) -> None:
    headers = [
        f"HTTP/1.1 {code} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in (*_SECURITY_HEADERS, *extra)),
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + (b"" if head_only else body))
    await writer.drain()
