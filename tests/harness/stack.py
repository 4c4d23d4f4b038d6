"""The whole service stack for one run, each service started lazily on first use.

Used two ways: by tests/conftest.py (one `Stack` per pytest session, stopped at session end)
and by `python -m tests.harness up` (detached services recorded in .services/stack/).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .certs import RunCertificates, make_certificates
from .common import HarnessError, RunDir
from .kafka import ExternalKafka, KafkaService
from .mosquitto import MosquittoService
from .pty import PtyPair
from .toxiproxy import ToxiproxyServer

EXTERNAL_KAFKA_ENV = "OUTPOST_TEST_KAFKA"
_PORT_TAKEN = re.compile(r"Address already in use|BindException|address in use", re.IGNORECASE)


class Stack:
    def __init__(self, run: RunDir, *, detached: bool = False) -> None:
        self.run = run
        self.detached = detached
        self._certs: RunCertificates | None = None
        self._toxiproxy: ToxiproxyServer | None = None
        self._mosquitto: MosquittoService | None = None
        self._kafka: KafkaService | ExternalKafka | None = None
        self._ptys: list[PtyPair] = []
        self._failures: dict[str, str] = {}

    # -- lazily started services ----------------------------------------------------------
    @property
    def certs(self) -> RunCertificates:
        if self._certs is None:
            self._certs = make_certificates(self.run.sub("certs"))
        return self._certs

    def _service(self, name: str, factory: Callable[[], Any]) -> Any:
        """Start `name` once; a failed start is remembered so later tests fail fast with it."""
        current = getattr(self, f"_{name}")
        if current is not None:
            return current
        if name in self._failures:
            raise HarnessError(f"{name} failed to start earlier in this run:\n"
                               f"{self._failures[name]}")
        for attempt in range(3):
            try:
                service = factory()
                break
            except Exception as exc:
                # Ports are picked free but bound a few seconds later by the program; a
                # concurrent test run can take one in between. New ports fix that.
                if attempt < 2 and isinstance(exc, HarnessError) and _PORT_TAKEN.search(str(exc)):
                    continue
                self._failures[name] = str(exc)
                raise
        setattr(self, f"_{name}", service)
        return service

    @property
    def toxiproxy(self) -> ToxiproxyServer:
        return self._service(
            "toxiproxy", lambda: ToxiproxyServer(self.run, detached=self.detached).start())

    @property
    def mosquitto(self) -> MosquittoService:
        return self._service(
            "mosquitto",
            lambda: MosquittoService(self.run, self.certs, detached=self.detached).start())

    @property
    def kafka(self) -> KafkaService | ExternalKafka:
        def make() -> KafkaService | ExternalKafka:
            external = os.environ.get(EXTERNAL_KAFKA_ENV, "").strip()
            if external:
                return ExternalKafka(external).start()
            return KafkaService(self.run, self.certs, self.toxiproxy,
                                detached=self.detached).start()

        return self._service("kafka", make)

    def pty_pair(self, name: str | None = None) -> PtyPair:
        name = name or f"pty{len(self._ptys)}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise HarnessError(f"pty pair name {name!r} must be letters, digits, _ . -")
        folder = self.run.sub("pty")
        pair = PtyPair(folder / f"{name}-a", folder / f"{name}-b",
                       self.run.log(f"socat-{name}"), detached=self.detached)
        self._ptys.append(pair)
        return pair.open()

    # -- state ------------------------------------------------------------------------------
    def started(self, name: str) -> bool:
        return getattr(self, f"_{name}") is not None

    def heal(self) -> None:
        """Undo what a test may have left behind: toxics, disabled proxies, a stopped broker."""
        if self._toxiproxy is not None:
            self._toxiproxy.reset()
        k = self._kafka
        if isinstance(k, KafkaService) and (k.process is None or not k.process.alive()):
            k.start()

    def close_ptys(self) -> None:
        for pair in self._ptys:
            pair.close()
        self._ptys.clear()

    def close(self) -> None:
        """Stop every service this stack started; keep going past individual failures."""
        errors: list[str] = []
        self.close_ptys()
        for name in ("_kafka", "_mosquitto", "_toxiproxy"):
            service = getattr(self, name)
            if service is None or isinstance(service, ExternalKafka):
                continue
            try:
                service.stop()
            except Exception as exc:
                errors.append(f"{name[1:]}: {exc}")
            setattr(self, name, None)
        if errors:
            raise HarnessError("stopping the test services failed: " + "; ".join(errors))

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in ("kafka", "mosquitto", "toxiproxy"):
            service = getattr(self, f"_{name}")
            proc = getattr(service, "process", None)
            if proc is not None and proc.alive():
                out[name] = proc.pid
        return out

    def env(self) -> dict[str, str]:
        """OUTPOST_* variables describing the started services (for `make services`)."""
        env: dict[str, str] = {"OUTPOST_STACK_DIR": str(self.run.path)}
        if self._certs is not None:
            c = self._certs
            env.update({
                "OUTPOST_TEST_CA_FILE": str(c.ca_file),
                "OUTPOST_TEST_CLIENT_CERT_FILE": str(c.client_cert_file),
                "OUTPOST_TEST_CLIENT_KEY_FILE": str(c.client_key_file),
                "OUTPOST_TEST_OTHER_CLIENT_CERT_FILE": str(c.other_client_cert_file),
                "OUTPOST_TEST_OTHER_CLIENT_KEY_FILE": str(c.other_client_key_file),
            })
        if self._toxiproxy is not None:
            env["OUTPOST_TOXIPROXY_API"] = self._toxiproxy.api
        m = self._mosquitto
        if m is not None:
            env.update({
                "OUTPOST_MQTT_HOST": m.host, "OUTPOST_MQTT_PORT": str(m.port),
                "OUTPOST_MQTT_URL": m.url, "OUTPOST_MQTT_TLS_PORT": str(m.tls_port),
                "OUTPOST_MQTT_TLS_URL": m.tls_url, "OUTPOST_MQTT_CA_FILE": str(m.ca_file),
                "OUTPOST_MQTT_USERNAME": m.username, "OUTPOST_MQTT_PASSWORD": m.password,
                "OUTPOST_MQTT_MTLS_PORT": str(m.mtls_port), "OUTPOST_MQTT_MTLS_URL": m.mtls_url,
            })
        k = self._kafka
        if k is not None:
            env["OUTPOST_KAFKA_BOOTSTRAP"] = k.bootstrap
            if k.proxied_bootstrap and k.proxy is not None:
                env["OUTPOST_KAFKA_PROXIED_BOOTSTRAP"] = k.proxied_bootstrap
                env["OUTPOST_KAFKA_PROXY_NAME"] = k.proxy.name
            if k.sasl_ssl_bootstrap:
                env["OUTPOST_KAFKA_SASL_SSL_BOOTSTRAP"] = k.sasl_ssl_bootstrap
                env["OUTPOST_KAFKA_CA_FILE"] = str(k.ca_file)
            if k.mtls_bootstrap:
                env["OUTPOST_KAFKA_MTLS_BOOTSTRAP"] = k.mtls_bootstrap
            for mech, (user, password) in k.sasl_users.items():
                key = mech.replace("-", "_")
                env[f"OUTPOST_KAFKA_{key}_USERNAME"] = user
                env[f"OUTPOST_KAFKA_{key}_PASSWORD"] = password
        return env


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))


def stack_dir(root: Path) -> RunDir:
    return RunDir(root / "stack")
