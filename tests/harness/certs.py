"""A throw-away certificate authority for one harness run, made with the openssl CLI.

Mosquitto's TLS listener and Kafka's SASL_SSL listener both present a server certificate
for 127.0.0.1/localhost signed by this CA; clients trust `ca_file`. Java wants PKCS12
stores, so the server key pair is also exported as `server.p12` and the CA as a truststore.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from .common import HarnessError, require_binary, run_checked


@dataclass(frozen=True)
class RunCertificates:
    ca_file: Path
    cert_file: Path
    key_file: Path
    keystore_p12: Path
    truststore_p12: Path
    store_password: str


def make_certificates(folder: Path) -> RunCertificates:
    """Create (or reuse, when a previous call made them in `folder`) the run's CA and cert."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "server.key", folder / "server.csr", folder / "server.crt"
    p12, trust = folder / "server.p12", folder / "truststore.p12"
    pw_file = folder / "store.password"
    if all(p.exists() for p in (ca_crt, key, crt, p12, trust, pw_file)):
        return RunCertificates(ca_crt, crt, key, p12, trust, pw_file.read_text().strip())

    openssl = require_binary("openssl", "install the Debian package `openssl`")
    password = secrets.token_hex(12)
    pw_file.write_text(password)
    run_checked([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30",
                 "-subj", "/CN=Outpost test CA", "-keyout", ca_key, "-out", ca_crt,
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
                "creating the test CA")
    run_checked([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                 "-keyout", key, "-out", csr], "creating the server key")
    ext = folder / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    run_checked([openssl, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
                 "-CAcreateserial", "-days", "30", "-sha256", "-extfile", ext, "-out", crt],
                "signing the server certificate")
    run_checked([openssl, "pkcs12", "-export", "-in", crt, "-inkey", key, "-certfile", ca_crt,
                 "-name", "server", "-out", p12, "-passout", f"pass:{password}"],
                "exporting the server PKCS12 keystore")
    keytool = require_binary("keytool", "install a Java 17 JDK (Debian openjdk-17-jdk-headless)")
    if trust.exists():
        trust.unlink()
    run_checked([keytool, "-importcert", "-noprompt", "-alias", "outpost-test-ca",
                 "-file", ca_crt, "-keystore", trust, "-storetype", "PKCS12",
                 "-storepass", password], "building the PKCS12 truststore")
    for p in (ca_key, key):
        p.chmod(0o600)
    if not crt.exists():
        raise HarnessError(f"openssl reported success but {crt} is missing")
    return RunCertificates(ca_crt, crt, key, p12, trust, password)
