"""A throw-away certificate authority for one harness run, made with the openssl CLI.

Mosquitto's TLS listeners and Kafka's SASL_SSL and mTLS listeners present a server
certificate for 127.0.0.1/localhost signed by this CA; clients trust `ca_file`. Java wants
PKCS12 stores, so the server key pair is also exported as `server.p12` and the CA as a
truststore (which is also what Kafka checks client certificates against).

For the mutual-TLS listeners there are two client certificates: one signed by the run CA
(`client_cert_file`, accepted) and one signed by a second, unrelated CA
(`other_client_cert_file`, which the brokers must reject).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from .common import HarnessError, require_binary, run_checked

CLIENT_CN = "outpost-edge-client"
OTHER_CLIENT_CN = "outpost-intruder"


@dataclass(frozen=True)
class RunCertificates:
    ca_file: Path
    cert_file: Path
    key_file: Path
    keystore_p12: Path
    truststore_p12: Path
    store_password: str
    # Client certificates for the mTLS listeners (PEM; keys unencrypted).
    client_cert_file: Path
    client_key_file: Path
    other_ca_file: Path
    other_client_cert_file: Path
    other_client_key_file: Path


def make_certificates(folder: Path) -> RunCertificates:
    """Create (or reuse, when a previous call made them in `folder`) the run's CAs and certs."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, crt = folder / "server.key", folder / "server.crt"
    p12, trust = folder / "server.p12", folder / "truststore.p12"
    pw_file = folder / "store.password"
    if not all(p.exists() for p in (ca_crt, ca_key, key, crt, p12, trust, pw_file)):
        _make_server_side(folder)
    # Made separately, from the existing CA, so a stack started before client certificates
    # existed (`python -m tests.harness up`) keeps its CA and gains them.
    other_ca_key, other_ca_crt = folder / "other-ca.key", folder / "other-ca.crt"
    if not (other_ca_crt.exists() and other_ca_key.exists()):
        _make_ca(other_ca_key, other_ca_crt, "Outpost unrelated test CA")
    client = _make_client(folder, "client", CLIENT_CN, ca_crt, ca_key)
    other = _make_client(folder, "other-client", OTHER_CLIENT_CN, other_ca_crt, other_ca_key)
    return RunCertificates(
        ca_crt, crt, key, p12, trust, pw_file.read_text().strip(),
        client_cert_file=client[0], client_key_file=client[1], other_ca_file=other_ca_crt,
        other_client_cert_file=other[0], other_client_key_file=other[1])


def _openssl() -> str:
    return require_binary("openssl", "install the Debian package `openssl`")


def _make_ca(ca_key: Path, ca_crt: Path, name: str) -> None:
    run_checked([_openssl(), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                 "-subj", f"/CN={name}", "-keyout", ca_key, "-out", ca_crt,
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                f"creating the test CA {name!r}")
    ca_key.chmod(0o600)


def _sign(folder: Path, stem: str, subject: str, extensions: str, ca_crt: Path,
          ca_key: Path) -> tuple[Path, Path]:
    """A new key `<stem>.key` and certificate `<stem>.crt` signed by `ca_crt`."""
    openssl = _openssl()
    key, csr, crt = folder / f"{stem}.key", folder / f"{stem}.csr", folder / f"{stem}.crt"
    ext = folder / f"{stem}.ext"
    run_checked([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", key, "-out", csr], f"creating the {stem} key")
    key.chmod(0o600)
    ext.write_text(extensions)
    # -set_serial rather than -CAcreateserial: two CAs share this folder.
    run_checked([openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
                 "-set_serial", str(secrets.randbits(63)), "-days", "30", "-sha256",
                 "-extfile", ext, "-out", crt], f"signing the {stem} certificate")
    if not crt.exists():
        raise HarnessError(f"openssl reported success but {crt} is missing")
    return crt, key


def _make_client(folder: Path, stem: str, cn: str, ca_crt: Path,
                 ca_key: Path) -> tuple[Path, Path]:
    crt, key = folder / f"{stem}.crt", folder / f"{stem}.key"
    if crt.exists() and key.exists():
        return crt, key
    return _sign(folder, stem, f"/CN={cn}",
                 "basicConstraints=CA:FALSE\n"
                 "keyUsage=critical,digitalSignature,keyEncipherment\n"
                 "extendedKeyUsage=clientAuth\n", ca_crt, ca_key)


def _make_server_side(folder: Path) -> None:
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    p12, trust = folder / "server.p12", folder / "truststore.p12"
    pw_file = folder / "store.password"
    password = secrets.token_hex(12)
    pw_file.write_text(password)
    _make_ca(ca_key, ca_crt, "Outpost test CA")
    crt, key = _sign(folder, "server", "/CN=localhost",
                     "basicConstraints=CA:FALSE\n"
                     "keyUsage=critical,digitalSignature,keyEncipherment\n"
                     "extendedKeyUsage=serverAuth,clientAuth\n"
                     "subjectAltName=IP:127.0.0.1,DNS:localhost\n", ca_crt, ca_key)
    run_checked([_openssl(), "pkcs12", "-export", "-in", crt, "-inkey", key,
                 "-certfile", ca_crt, "-name", "server", "-out", p12,
                 "-passout", f"pass:{password}"],
                "exporting the server PKCS12 keystore")
    keytool = require_binary("keytool", "install a Java 17 JDK (Debian openjdk-17-jdk-headless)")
    if trust.exists():
        trust.unlink()
    run_checked([keytool, "-importcert", "-noprompt", "-alias", "outpost-test-ca",
                 "-file", ca_crt, "-keystore", trust, "-storetype", "PKCS12",
                 "-storepass", password], "building the PKCS12 truststore")
