"""Toxiproxy v2 as the fault proxy: installed with `go install` (cached), driven over its HTTP API.

`ToxiproxyServer.create(name, upstream)` returns a `Proxy` whose methods are the faults the
tests need (cut, blackhole, latency, bandwidth, reset_peer, clear). Byte counts come from
toxiproxy's own Prometheus endpoint (`/metrics`, the server runs with `-proxy-metrics`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .common import (
    CACHE_DIR,
    HarnessError,
    ManagedProcess,
    RunDir,
    cache_lock,
    free_port,
    log_tail,
    port_open,
    require_binary,
    run_checked,
    wait_until,
)

TOXIPROXY_VERSION = "v2.12.0"
TOXIPROXY_MODULE = "github.com/Shopify/toxiproxy/v2/cmd/server"
BIN_DIR = CACHE_DIR / "bin"
BINARY = BIN_DIR / f"toxiproxy-server-{TOXIPROXY_VERSION}"

STREAMS = ("upstream", "downstream")


def ensure_toxiproxy() -> Path:
    """The cached toxiproxy-server binary, built from the Go module proxy on first use."""
    if BINARY.exists():
        return BINARY
    with cache_lock("toxiproxy"):
        if BINARY.exists():
            return BINARY
        go = require_binary("go", "install Go 1.22+ (the machine toolchain or Debian golang-go) to build toxiproxy")
        build_bin = BIN_DIR / ".build"
        shutil.rmtree(build_bin, ignore_errors=True)
        build_bin.mkdir(parents=True)
        run_checked([go, "install", f"{TOXIPROXY_MODULE}@{TOXIPROXY_VERSION}"],
                    f"building toxiproxy {TOXIPROXY_VERSION}",
                    env={"GOBIN": str(build_bin), "CGO_ENABLED": "0"}, timeout_s=900)
        built = build_bin / "server"
        if not built.exists():
            raise HarnessError(f"go install succeeded but {built} is missing")
        os.replace(built, BINARY)
        shutil.rmtree(build_bin, ignore_errors=True)
    return BINARY


class ToxiproxyServer:
    """One toxiproxy-server process and its API client."""

    def __init__(self, run: RunDir, *, detached: bool = False) -> None:
        self.host = "127.0.0.1"
        self.api_port = free_port()
        self.api = f"http://{self.host}:{self.api_port}"
        self.log_path = run.log("toxiproxy")
        self.process = ManagedProcess(
            "toxiproxy",
            [ensure_toxiproxy(), "-host", self.host, "-port", str(self.api_port),
             "-proxy-metrics"],
            self.log_path,
            detached=detached,
        )
        self._proxies: dict[str, Proxy] = {}

    @classmethod
    def attach(cls, api: str) -> ToxiproxyServer:
        """A client for a server started elsewhere (e.g. by `python -m tests.harness up`)."""
        self = cls.__new__(cls)
        self.api = api.rstrip("/")
        m = re.match(r"https?://([^:/]+):(\d+)", self.api)
        if not m:
            raise HarnessError(f"toxiproxy API address {api!r} is not http://host:port")
        self.host, self.api_port = m.group(1), int(m.group(2))
        self.log_path = Path(os.devnull)
        self.process = None
        self._proxies = {}
        return self

    def start(self) -> ToxiproxyServer:
        self.process.start()

        def ready() -> bool:
            self.process.check_alive()
            return port_open(self.host, self.api_port) and bool(self.request("GET", "/version"))

        try:
            wait_until(ready, 20, f"toxiproxy API at {self.api}",
                       on_timeout=lambda: log_tail(self.log_path))
        except BaseException:
            self.process.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    @property
    def pid(self) -> int | None:
        """The server's pid when this harness started it (None when attached)."""
        return self.process.pid if self.process is not None else None

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise HarnessError(f"toxiproxy {method} {path} -> HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise HarnessError(f"toxiproxy API {self.api} unreachable ({method} {path}): "
                               f"{exc}") from exc
        if not raw:
            return {}
        text = raw.decode()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def create(self, name: str, upstream: str, listen: str = "127.0.0.1:0") -> Proxy:
        """A new proxy `name` forwarding to `upstream`; replaces an old one of the same name."""
        if name in self._proxies or name in self.request("GET", "/proxies"):
            self.request("DELETE", f"/proxies/{name}")
        info = self.request("POST", "/proxies",
                            {"name": name, "listen": listen, "upstream": upstream,
                             "enabled": True})
        proxy = Proxy(self, name, info["listen"], upstream)
        self._proxies[name] = proxy
        return proxy

    def get(self, name: str) -> Proxy:
        info = self.request("GET", f"/proxies/{name}")
        return Proxy(self, name, info["listen"], info["upstream"])

    def reset(self) -> None:
        """Enable every proxy and remove every toxic (between tests)."""
        self.request("POST", "/reset")

    def metrics_text(self) -> str:
        text = self.request("GET", "/metrics")
        return text if isinstance(text, str) else ""


_METRIC = re.compile(
    r'^toxiproxy_proxy_(received|sent)_bytes_total\{(?P<labels>[^}]*)\}\s+(?P<value>[0-9.eE+]+)$'
)


class Proxy:
    """A TCP proxy in toxiproxy; its methods add faults, `clear()`/`restore()` remove them.

    Streams, in toxiproxy's words: "upstream" is client -> server, "downstream" is
    server -> client. Toxics stay until `clear()` (or `ToxiproxyServer.reset()`).
    """

    def __init__(self, server: ToxiproxyServer, name: str, listen: str, upstream: str) -> None:
        self.server = server
        self.name = name
        self.listen = listen
        self.upstream = upstream
        host, _, port = listen.rpartition(":")
        self.host = host
        self.port = int(port)

    def __repr__(self) -> str:
        return f"Proxy({self.name!r}, listen={self.listen}, upstream={self.upstream})"

    # -- link state -------------------------------------------------------------------
    def cut(self) -> None:
        """Disable the proxy: open connections are closed and new ones refused."""
        self.server.request("POST", f"/proxies/{self.name}", {"enabled": False})

    def restore(self) -> None:
        """Enable the proxy again and remove every toxic."""
        self.clear()
        self.server.request("POST", f"/proxies/{self.name}", {"enabled": True})

    def enabled(self) -> bool:
        return bool(self.server.request("GET", f"/proxies/{self.name}")["enabled"])

    # -- toxics -------------------------------------------------------------------------
    def add_toxic(self, kind: str, attributes: dict[str, Any], *, stream: str = "downstream",
                  name: str | None = None, toxicity: float = 1.0) -> str:
        """Add one raw toxiproxy toxic; returns its name. `stream` may also be "both"."""
        streams = STREAMS if stream == "both" else (stream,)
        if any(s not in STREAMS for s in streams):
            raise HarnessError(f"proxy {self.name}: stream {stream!r} is not "
                               "upstream, downstream or both")
        base = name or kind
        for s in streams:
            self.server.request("POST", f"/proxies/{self.name}/toxics",
                                {"name": f"{base}_{s}", "type": kind, "stream": s,
                                 "toxicity": toxicity, "attributes": attributes})
        return base

    def blackhole(self, stream: str = "both") -> None:
        """Traffic is silently dropped (no RST, no FIN): a `timeout` toxic with timeout 0."""
        self.add_toxic("timeout", {"timeout": 0}, stream=stream, name="blackhole")

    def latency(self, ms: int, jitter_ms: int = 0, stream: str = "downstream") -> None:
        """Delay data by `ms` (+- jitter). Default downstream only, so round trips grow by `ms`."""
        self.add_toxic("latency", {"latency": int(ms), "jitter": int(jitter_ms)},
                       stream=stream, name="latency")

    def bandwidth(self, kb_per_s: int, stream: str = "both") -> None:
        """Limit throughput to `kb_per_s` KB/s in each chosen direction."""
        self.add_toxic("bandwidth", {"rate": int(kb_per_s)}, stream=stream, name="bandwidth")

    def reset_peer(self, timeout_ms: int = 0, stream: str = "downstream") -> None:
        """Connections are reset (TCP RST) after `timeout_ms`; new ones too, until `clear()`."""
        self.add_toxic("reset_peer", {"timeout": int(timeout_ms)}, stream=stream,
                       name="reset_peer")

    def toxics(self) -> list[dict[str, Any]]:
        return list(self.server.request("GET", f"/proxies/{self.name}/toxics"))

    def clear(self) -> None:
        """Remove every toxic (the proxy's enabled state is left as it is)."""
        for toxic in self.toxics():
            self.server.request("DELETE", f"/proxies/{self.name}/toxics/{toxic['name']}")

    # -- counters -----------------------------------------------------------------------
    def bytes(self) -> dict[str, int]:
        """Bytes through this proxy since it was created: closed plus live connections.

        Toxiproxy's Prometheus counters (`-proxy-metrics`) only add a connection's bytes when
        it ends, so live connections are read from the kernel (`ss -ti`: tcp_info
        bytes_received/bytes_sent of toxiproxy's own sockets) and added. While one of this
        proxy's connections is closing, the call waits (up to 2 s) for toxiproxy to book it.
        Keys: "upstream" (client -> server, as forwarded to the server), "downstream"
        (server -> client, as forwarded to the client), the four raw counters
        "<received|sent>_<upstream|downstream>", and "live_connections". Use differences.
        """
        deadline = time.monotonic() + 2.0
        while True:
            closed = self._closed_counters()
            live, n_live, n_closing = self._live_counters()
            settled = n_closing == 0 and self._closed_counters() == closed
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        out = {k: closed[k] + live[k] for k in closed}
        out["upstream"] = out["sent_upstream"]
        out["downstream"] = out["sent_downstream"]
        out["live_connections"] = n_live
        return out

    def _closed_counters(self) -> dict[str, int]:
        out = {f"{kind}_{d}": 0 for kind in ("received", "sent") for d in STREAMS}
        for line in self.server.metrics_text().splitlines():
            m = _METRIC.match(line.strip())
            if not m:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
            if labels.get("proxy") != self.name:
                continue
            key = f"{m.group(1)}_{labels.get('direction')}"
            if key in out:
                out[key] += int(float(m.group("value")))
        return out

    def _live_counters(self) -> tuple[dict[str, int], int, int]:
        """Counters of toxiproxy's established sockets for this proxy, how many client
        connections are live, and how many of its sockets are closing."""
        out = {f"{kind}_{d}": 0 for kind in ("received", "sent") for d in STREAMS}
        ss = shutil.which("ss")
        if ss is None:
            raise HarnessError("`ss` (Debian package iproute2) is needed to count the bytes of "
                               "live connections through toxiproxy")
        done = subprocess.run([ss, "-tinpH", "state", "connected"], capture_output=True,
                              text=True, timeout=10, check=False)
        if done.returncode != 0:
            raise HarnessError(f"ss failed: {done.stderr.strip()}")
        pid = self.server.pid
        n_live = n_closing = 0
        sockets: list[list[str]] = []  # [head line, tcp_info line...] per socket
        for line in done.stdout.splitlines():
            if line[:1].isspace() and sockets:
                sockets[-1].append(line)
            elif line.strip():
                sockets.append([line])
        for head, *rest in sockets:
            fields = head.split()
            if len(fields) < 5:
                continue
            state, local, peer = fields[0], fields[3], fields[4]
            owner = re.search(r'\("([^"]+)",pid=(\d+)', head)
            if owner is None:  # TIME-WAIT and orphaned sockets: already booked by toxiproxy
                continue
            if pid is not None and int(owner.group(2)) != pid:
                continue
            if pid is None and not owner.group(1).startswith("toxiproxy"):
                continue
            if local != self.listen and peer != self.upstream:
                continue
            if state != "ESTAB":
                n_closing += 1
                continue
            counts = {k: int(v) for k, v in re.findall(r"\b(bytes_sent|bytes_received):(\d+)",
                                                         " ".join(rest))}
            if local == self.listen:  # toxiproxy's end of a client connection
                n_live += 1
                out["received_upstream"] += counts.get("bytes_received", 0)
                out["sent_downstream"] += counts.get("bytes_sent", 0)
            else:  # toxiproxy's connection to the server
                out["sent_upstream"] += counts.get("bytes_sent", 0)
                out["received_downstream"] += counts.get("bytes_received", 0)
        return out, n_live, n_closing
