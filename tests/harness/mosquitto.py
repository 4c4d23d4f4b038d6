"""Mosquitto (the Debian package) with a generated config for one harness run.

Three listeners, `per_listener_settings true`: a plain anonymous one, a TLS one that needs
a username and password (mosquitto_passwd file) with a server certificate from the run CA,
and a mutual-TLS one (`require_certificate true`) that accepts only client certificates
signed by the run CA and takes the certificate's CN as the MQTT username
(`use_identity_as_username`). Readiness is a real MQTT CONNECT/CONNACK exchange on all three.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import struct
from pathlib import Path

from .certs import CLIENT_CN, RunCertificates
from .common import (
    HarnessError,
    ManagedProcess,
    RunDir,
    free_ports,
    log_tail,
    require_binary,
    run_checked,
    wait_until,
)

INSTALL_HINT = "install the Debian package `mosquitto` (apt-get install -y mosquitto)"


def _mqtt_string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect_probe(host: str, port: int, *, username: str | None = None,
                       password: str | None = None, ca_file: Path | None = None,
                       cert_file: Path | None = None, key_file: Path | None = None,
                       timeout_s: float = 3.0) -> int:
    """Send an MQTT 3.1.1 CONNECT and return the CONNACK return code (0 = accepted).

    Raises OSError/ssl.SSLError when the connection itself fails.
    """
    flags = 0x02  # clean session
    payload = _mqtt_string(f"outpost-probe-{secrets.token_hex(4)}")
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += _mqtt_string(password)
    variable = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 10)
    body = variable + payload
    packet = b"\x10" + _remaining_length(len(body)) + body
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        sock: socket.socket = raw
        if ca_file is not None:
            ctx = ssl.create_default_context(cafile=str(ca_file))
            if cert_file is not None:
                ctx.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
            sock = ctx.wrap_socket(raw, server_hostname=host)
        sock.sendall(packet)
        ack = b""
        while len(ack) < 4:
            chunk = sock.recv(4 - len(ack))
            if not chunk:
                raise ConnectionError(f"{host}:{port} closed the connection before CONNACK")
            ack += chunk
        if ack[0] != 0x20:
            raise HarnessError(f"{host}:{port} answered CONNECT with packet type {ack[0]:#x}")
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        return ack[3]


class MosquittoService:
    """The broker for one run: `.host`, `.port`, `.tls_port`, `.ca_file`, `.username`, `.password`.

    mTLS: `.mtls_port` (`.mtls_url`), `.client_cert_file`/`.client_key_file` (run CA, accepted;
    MQTT username `.client_cert_identity`), `.other_client_cert_file`/`.other_client_key_file`
    (signed by an unrelated CA, rejected in the TLS handshake).
    """

    def __init__(self, run: RunDir, certs: RunCertificates, *, detached: bool = False) -> None:
        self.host = "127.0.0.1"
        self.port, self.tls_port, self.mtls_port = free_ports(3)
        self.ca_file = certs.ca_file
        self.username = "outpost"
        self.password = secrets.token_hex(8)
        self.client_cert_file = certs.client_cert_file
        self.client_key_file = certs.client_key_file
        self.client_cert_identity = CLIENT_CN
        self.other_client_cert_file = certs.other_client_cert_file
        self.other_client_key_file = certs.other_client_key_file
        self._certs = certs
        self._folder = run.sub("mosquitto")
        self.log_path = run.log("mosquitto")
        self.config_path = self._folder / "mosquitto.conf"
        # Mosquitto block-buffers stdout into log_path; this copy is written line by line, so
        # a test can watch what the broker says about its clients while it runs.
        self.live_log_path = self._folder / "broker.log"
        self._detached = detached
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        return f"mqtts://{self.host}:{self.tls_port}"

    @property
    def mtls_url(self) -> str:
        return f"mqtts://{self.host}:{self.mtls_port}"

    def _write_config(self) -> None:
        passwd = require_binary("mosquitto_passwd", INSTALL_HINT)
        pw_file = self._folder / "passwords"
        pw_file.unlink(missing_ok=True)
        run_checked([passwd, "-b", "-c", pw_file, self.username, self.password],
                    "writing the mosquitto password file")
        pw_file.chmod(0o600)
        self.config_path.write_text(
            "# Generated by tests/harness/mosquitto.py for one test run.\n"
            "per_listener_settings true\n"
            # Stay as the invoking user: when run as root mosquitto would otherwise switch to
            # the `mosquitto` user, which cannot read this run folder's key and passwords.
            "user root\n"
            "persistence false\n"
            "log_dest stdout\n"
            f"log_dest file {self.live_log_path}\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            "connection_messages true\n"
            "max_queued_messages 100000\n"
            f"\nlistener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            f"\nlistener {self.tls_port} {self.host}\n"
            "allow_anonymous false\n"
            f"password_file {pw_file}\n"
            f"cafile {self._certs.ca_file}\n"
            f"certfile {self._certs.cert_file}\n"
            f"keyfile {self._certs.key_file}\n"
            "tls_version tlsv1.2\n"
            # Mutual TLS: no password file; the client certificate is the credential.
            # TLS 1.2 and 1.3 both allowed (mosquitto's default) so a client without a
            # certificate meets the TLS 1.3 case too, where the server's refusal arrives
            # after the client already thinks the handshake is done.
            f"\nlistener {self.mtls_port} {self.host}\n"
            "allow_anonymous false\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            f"cafile {self._certs.ca_file}\n"
            f"certfile {self._certs.cert_file}\n"
            f"keyfile {self._certs.key_file}\n"
        )

    def start(self) -> MosquittoService:
        binary = require_binary("mosquitto", INSTALL_HINT)
        self._write_config()
        self.process = ManagedProcess("mosquitto", [binary, "-c", self.config_path],
                                      self.log_path, detached=self._detached).start()

        def ready() -> bool:
            self.process.check_alive()
            plain = mqtt_connect_probe(self.host, self.port)
            tls = mqtt_connect_probe(self.host, self.tls_port, username=self.username,
                                     password=self.password, ca_file=self.ca_file)
            mtls = mqtt_connect_probe(self.host, self.mtls_port, ca_file=self.ca_file,
                                      cert_file=self.client_cert_file,
                                      key_file=self.client_key_file)
            if plain or tls or mtls:
                raise HarnessError(f"mosquitto refused the probe: CONNACK codes "
                                   f"{plain}/{tls}/{mtls}")
            return True

        try:
            wait_until(ready, 20, f"mosquitto on {self.host}:{self.port}/{self.tls_port}/{self.mtls_port}",
                       on_timeout=lambda: log_tail(self.log_path))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


class RefusingMosquitto:
    """A Mosquitto of its own for one test: one anonymous listener that says no.

    `acl` is the text of an `acl_file` (anonymous clients use its leading `topic` lines);
    `set_acl()` rewrites it and sends SIGHUP, which makes Mosquitto reload it, so a test can
    lift a refusal while the gateway runs. `max_packet_size` (bytes) makes the broker refuse
    larger packets. MQTT 5 clients get the refusal as a PUBACK reason code (0x87).
    `restart(max_packet_size=...)` changes the limit (a restart, as on a real broker);
    `connections(client_id)` counts that client's CONNECTs from the broker's log.
    """

    def __init__(self, run: RunDir, name: str, acl: str, *, max_packet_size: int | None = None) -> None:
        self.host = "127.0.0.1"
        (self.port,) = free_ports(1)
        self._folder = run.sub(name)
        self.log_path = run.log(name)
        self.acl_path = self._folder / "acl"
        self.config_path = self._folder / "mosquitto.conf"
        self.live_log_path = self._folder / "broker.log"  # written line by line
        self._acl = acl
        self._max_packet_size = max_packet_size
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> RefusingMosquitto:
        binary = require_binary("mosquitto", INSTALL_HINT)
        self.acl_path.write_text(self._acl)
        limit = f"max_packet_size {self._max_packet_size}\n" if self._max_packet_size else ""
        self.config_path.write_text(
            "user root\npersistence false\nlog_dest stdout\n"
            f"log_dest file {self.live_log_path}\nconnection_messages true\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
            f"{limit}listener {self.port} {self.host}\nallow_anonymous true\n"
            f"acl_file {self.acl_path}\n")
        self.process = ManagedProcess("mosquitto-refusing", [binary, "-c", self.config_path],
                                      self.log_path).start()
        try:
            wait_until(lambda: self.process.check_alive() or mqtt_connect_probe(self.host, self.port) == 0,
                       20, f"mosquitto on {self.host}:{self.port}",
                       on_timeout=lambda: log_tail(self.log_path))
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, *, max_packet_size: int | None) -> None:
        """Stop, and start again on the same port with another `max_packet_size` (None: none).

        Mosquitto reads `max_packet_size` only at start: changing it costs every client its
        connection, as it does on a real broker.
        """
        self.stop()
        self._max_packet_size = max_packet_size
        self.start()

    def connections(self, client_id: str) -> int:
        """How many times a client with this id connected (the broker's own log lines)."""
        try:
            text = self.live_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines()
                   if "New client connected" in line and f" as {client_id} " in line)

    def set_acl(self, acl: str) -> None:
        import os
        import signal

        self.acl_path.write_text(acl)
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
