"""`outpost doctor`: find what is wrong on site, and say what to do about each problem.

Every check returns `Check(name, ok, detail, hint)`; none raises for the condition it
tests. Inputs are plain values taken from the configuration by the CLI, so the checks run
even when the gateway itself cannot start. Network checks have timeouts: a blackholed
firewall must cost seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import grp
import os
import pwd
import shutil
import socket
import sqlite3
import ssl
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway import config
from gateway.clock import ClockStatus, read_clock_status
from gateway.diagnostics.errors import DiagnosticsError


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    hint: str = ""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server to reach: `label` names it in the output ("mqtt", "kafka")."""

    label: str
    host: str
    port: int
    tls: bool
    ca_file: str | None = None


def parse_mqtt_url(url: str) -> Endpoint:
    """"mqtt://host:1883" / "mqtts://host:8883" (also tcp://, ssl://, tls://), as the config reads them."""
    try:
        s = config.parse_server_url(url)
    except ValueError as exc:
        raise DiagnosticsError(
            f"MQTT server {url!r}: {exc}", hint="write servers as mqtt://host:1883 or mqtts://host:8883"
        ) from None
    return Endpoint("mqtt", s.host, s.port, s.tls)


def parse_host_port(value: str, *, default_port: int = 9092) -> tuple[str, int]:
    """"host:port" or "[v6addr]:port" as Kafka bootstrap servers are written."""
    try:
        return config.parse_host_port(value, default_port=default_port)
    except ValueError as exc:
        raise DiagnosticsError(f"server {value!r}: {exc}") from None


# ----------------------------------------------------------------------------- serial ports


def check_serial_port(path: str, *, service_user: str = "outpost") -> Check:
    name = f"serial port {path}"
    if not os.path.exists(path):
        hint = "check the cable and the USB adapter; `ls -l /dev/serial/by-id/` lists what is plugged in"
        if os.path.islink(path):
            return Check(name, False, "the link exists but points at nothing (adapter unplugged?)", hint)
        return Check(name, False, "does not exist", hint)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError as exc:
        return Check(name, False, f"cannot stat {real}: {exc.strerror}", "check the device node")
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, False, f"{real} is not a character device", "configure the tty device path")
    group = _group_name(st.st_gid)
    where = f"{real} (group {group}, mode {stat.filemode(st.st_mode)})"
    if not os.access(real, os.R_OK | os.W_OK):
        return Check(
            name, False, f"{where}: this user cannot read and write it",
            f"add the user to the {group} group: `sudo usermod -aG {group} $USER`",
        )
    member = _user_can_use(service_user, st)
    if member is False:
        return Check(
            name, False, f"{where}: the service user {service_user} is not in group {group}",
            f"`sudo usermod -aG {group} {service_user}` or SupplementaryGroups={group} in the unit",
        )
    return Check(name, True, f"{where}, readable and writable")


def _port_checks(port: str, service_user: str, policy: DevicePolicy | None) -> list[Check]:
    """File access, then (for a port that exists) the unit's device policy."""
    checks = [check_serial_port(port, service_user=service_user)]
    if policy is not None and os.path.exists(port):
        checks.append(check_device_policy(port, policy))
    return checks


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_can_use(user: str, st: os.stat_result) -> bool | None:
    """Can the service user open this node? None when that user does not exist here."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    if pw.pw_uid == 0 or pw.pw_uid == st.st_uid:
        return True
    if st.st_mode & 0o006 == 0o006:
        return True
    if st.st_mode & 0o060 != 0o060:
        return False
    if pw.pw_gid == st.st_gid:
        return True
    try:
        return user in grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        return False


# ----------------------------------------------------------------------------- unit device policy

UNIT_PATHS = ("/etc/systemd/system/outpost.service", "/lib/systemd/system/outpost.service")


@dataclass(frozen=True, slots=True)
class DevicePolicy:
    """DevicePolicy= and DeviceAllow= of the installed unit, drop-ins applied."""

    source: str
    policy: str = "auto"
    allow: tuple[tuple[str, str], ...] = ()  # (device, access) as written


def load_device_policy(unit_path: str | None = None) -> DevicePolicy | None:
    """The device policy of the installed unit and its drop-ins; None when no unit is installed."""
    path = unit_path or next((p for p in UNIT_PATHS if os.path.exists(p)), None)
    if path is None or not os.path.exists(path):
        return None
    files = [path]
    dropins = path + ".d"
    if os.path.isdir(dropins):
        files += sorted(os.path.join(dropins, f) for f in os.listdir(dropins) if f.endswith(".conf"))
    policy, allow = "auto", []
    for file in files:
        section = ""
        with open(file, encoding="utf-8") as f:
            for raw in f:
                line = raw.strip()
                if line.startswith("["):
                    section = line
                    continue
                if section != "[Service]" or "=" not in line or line.startswith(("#", ";")):
                    continue
                key, _, value = (part.strip() for part in line.partition("="))
                if key == "DevicePolicy":
                    policy = value
                elif key == "DeviceAllow":
                    if not value:
                        allow = []  # an empty assignment resets the list, as in systemd
                    else:
                        dev, _, access = value.partition(" ")
                        allow.append((dev, access.strip() or "rwm"))
    return DevicePolicy(", ".join(files), policy, tuple(allow))


def _char_majors(proc_devices: str) -> dict[int, set[str]]:
    """major -> driver names, from the "Character devices:" part of /proc/devices."""
    majors: dict[int, set[str]] = {}
    in_char = False
    for line in proc_devices.splitlines():
        if line.strip().endswith("devices:"):
            in_char = line.startswith("Character")
            continue
        parts = line.split()
        if in_char and len(parts) == 2 and parts[0].isdigit():
            majors.setdefault(int(parts[0]), set()).add(parts[1])
    return majors


def check_device_policy(path: str, policy: DevicePolicy, *, proc_devices: str | None = None) -> Check:
    """Would the unit's DevicePolicy=/DeviceAllow= let the gateway open this port read-write?

    A port can be readable by the service user and still be refused by the unit's device
    cgroup (an RS-485 HAT's /dev/ttySC0 under a list that allows only ttyUSB): the open
    fails with "Operation not permitted" only once the service runs.
    """
    name = f"unit device policy for {path}"
    try:
        st = os.stat(path)
    except OSError as exc:
        return Check(name, False, f"cannot stat {path}: {exc.strerror}", "check the device node")
    if not stat.S_ISCHR(st.st_mode):
        return Check(name, False, f"{os.path.realpath(path)} is not a character device",
                     "configure the tty device path")
    if proc_devices is None:
        with open("/proc/devices", encoding="ascii") as f:
            proc_devices = f.read()
    major = os.major(st.st_rdev)
    drivers = _char_majors(proc_devices).get(major, set())
    label = f"{os.path.realpath(path)} (major {major}: {', '.join(sorted(drivers)) or 'unknown driver'})"
    if policy.policy == "auto" and not policy.allow:
        return Check(name, True, f"{label}: the unit restricts no device ({policy.source})")
    implicit = [("char-pts", "rw")] if policy.policy in ("auto", "closed") else []
    for dev, access in [*policy.allow, *implicit]:
        if not {"r", "w"} <= set(access):
            continue
        if dev.startswith("char-") and any(fnmatch.fnmatchcase(d, dev[5:]) for d in drivers):
            return Check(name, True, f"{label}: allowed by DeviceAllow={dev} {access}")
        if dev.startswith("/dev/"):
            with contextlib.suppress(OSError):
                if os.stat(dev).st_rdev == st.st_rdev:
                    return Check(name, True, f"{label}: allowed by DeviceAllow={dev} {access}")
    group = sorted(d for d in drivers if not d.startswith("/"))
    wanted = f"char-{group[0]}" if group else os.path.realpath(path)
    return Check(
        name, False,
        f"{label}: DevicePolicy={policy.policy} and no DeviceAllow= entry lets the service open it "
        f"({policy.source})",
        f"`sudo systemctl edit outpost` and add: [Service] DeviceAllow={wanted} rw",
    )


# ----------------------------------------------------------------------------- disk, buffer, clock


def check_disk(data_dir: str, *, min_free_bytes: int = 200_000_000, min_free_fraction: float = 0.05) -> Check:
    name = f"disk space at {data_dir}"
    probe = data_dir
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return Check(name, False, f"cannot read disk usage: {exc.strerror}", "check that the path is mounted")
    free_fraction = usage.free / usage.total if usage.total else 0.0
    detail = f"{usage.free / 1e9:.2f} GB free of {usage.total / 1e9:.2f} GB ({free_fraction:.0%})"
    if probe != data_dir:
        detail += f"; {data_dir} does not exist yet (checked {probe})"
    if usage.free < min_free_bytes or free_fraction < min_free_fraction:
        return Check(
            name, False, detail,
            "free space: `journalctl --vacuum-size=50M`, remove old files, or lower buffer.max_size_bytes",
        )
    return Check(name, True, detail)


def check_buffer_file(path: str) -> Check:
    """Open the buffer read-only and run SQLite's quick_check."""
    name = f"buffer file {path}"
    if not os.path.exists(path):
        return Check(name, True, "does not exist yet (created on first start)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        return Check(name, False, f"cannot open: {exc}", "check permissions of the data directory")
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        return Check(
            name, False, f"not a readable SQLite database: {exc}",
            "the gateway moves a corrupt buffer aside and starts a new one on its next start; "
            "`outpost buffer export` first if the data matters",
        )
    finally:
        conn.close()
    results = [r[0] for r in rows]
    size = os.path.getsize(path)
    wal = f"{path}-wal"
    wal_size = os.path.getsize(wal) if os.path.exists(wal) else 0
    if results != ["ok"]:
        return Check(
            name, False, "quick_check: " + "; ".join(str(r) for r in results[:5]),
            "stop the gateway and run `outpost buffer export` to save what is readable; "
            "the gateway recovers the file on its next start",
        )
    return Check(name, True, f"quick_check ok, {size / 1e6:.1f} MB, wal {wal_size / 1e6:.1f} MB")


def check_clock(probe: Callable[[], ClockStatus] = read_clock_status) -> Check:
    status = probe()
    if not status.available:
        return Check("clock", False, f"cannot read the kernel clock state ({status.source})",
                     "check `timedatectl`")
    if status.synced:
        return Check("clock", True, f"synchronised (max error {status.maxerror_us / 1000:.0f} ms)")
    return Check(
        "clock", False, "not synchronised",
        "enable NTP: `sudo timedatectl set-ntp true`; check `timedatectl timesync-status` "
        "and that UDP port 123 is allowed out",
    )


# ----------------------------------------------------------------------------- network


async def check_endpoint(endpoint: Endpoint, *, timeout_s: float = 5.0) -> list[Check]:
    """DNS, then TCP, then (for TLS endpoints) a verified TLS handshake."""
    target = f"{endpoint.host}:{endpoint.port}"
    label = f"{endpoint.label} {target}"
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM), timeout_s
        )
    except TimeoutError:
        return [Check(f"{label} dns", False, f"no DNS answer for {endpoint.host} within {timeout_s:g}s",
                      "check /etc/resolv.conf and the uplink (`resolvectl status`)")]
    except socket.gaierror as exc:
        return [Check(f"{label} dns", False, f"{endpoint.host} does not resolve: {exc.strerror}",
                      "check the host name in the configuration and the DNS server")]
    addresses = sorted({info[4][0] for info in infos})
    checks = [Check(f"{label} dns", True, "resolves to " + ", ".join(addresses))]

    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port), timeout_s
        )
    except TimeoutError:
        checks.append(Check(
            f"{label} tcp", False, f"no answer within {timeout_s:g}s (packets dropped)",
            "a firewall drops the traffic or the route is missing; test with `nc -vz "
            f"{endpoint.host} {endpoint.port}`",
        ))
        return checks
    except ConnectionRefusedError:
        checks.append(Check(
            f"{label} tcp", False, "connection refused",
            "the host answers but nothing listens on that port: check the port and the service",
        ))
        return checks
    except OSError as exc:
        checks.append(Check(f"{label} tcp", False, f"connect failed: {exc.strerror or exc}",
                            "check the network route (`ip route`) and the cellular link"))
        return checks
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    checks.append(Check(f"{label} tcp", True, "connected"))

    if endpoint.tls:
        checks.append(await _check_tls(endpoint, label, timeout_s))
    return checks


async def _check_tls(endpoint: Endpoint, label: str, timeout_s: float) -> Check:
    name = f"{label} tls"
    try:
        ctx = ssl.create_default_context(cafile=endpoint.ca_file)
    except (OSError, ssl.SSLError) as exc:
        return Check(name, False, f"cannot load CA file {endpoint.ca_file}: {exc}",
                     "check the ca_file path and that it is PEM")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(endpoint.host, endpoint.port, ssl=ctx, server_hostname=endpoint.host),
            timeout_s,
        )
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or str(exc)
        if "expired" in reason or "not yet valid" in reason:
            hint = "the certificate's dates do not match this clock: check the clock first (NTP)"
        elif "hostname" in reason.lower() or "IP address mismatch" in reason:
            hint = f"the certificate is not issued for {endpoint.host}: use the name it was issued for"
        else:
            hint = "the server's CA is not trusted: set ca_file to the CA that signed its certificate"
        return Check(name, False, f"certificate rejected: {reason}", hint)
    except ssl.SSLError as exc:
        detail = exc.reason or str(exc)
        hint = "check the TLS settings of the server"
        if "WRONG_VERSION_NUMBER" in str(exc) or "record layer" in str(exc):
            hint = "this port does not speak TLS: use the TLS port, or mqtt:// / PLAINTEXT"
        return Check(name, False, f"handshake failed: {detail}", hint)
    except TimeoutError:
        return Check(name, False, f"no TLS handshake within {timeout_s:g}s",
                     "the port may not speak TLS, or a proxy holds the connection")
    except (ConnectionError, OSError) as exc:
        return Check(name, False, f"connection lost during handshake: {exc}",
                     "the server closed the connection: is this its TLS port?")
    ssl_obj = writer.get_extra_info("ssl_object")
    version = ssl_obj.version() if ssl_obj is not None else "?"
    cert = ssl_obj.getpeercert() if ssl_obj is not None else {}
    expires = cert.get("notAfter", "?") if cert else "?"
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return Check(name, True, f"{version}, certificate valid until {expires}")


# ----------------------------------------------------------------------------- all together


def check_status_socket(socket_path: str, *, timeout_s: float = 3.0) -> Check:
    """Is the gateway running and answering on its status socket?"""
    from gateway.diagnostics.client import fetch_status

    name = f"gateway status socket {socket_path}"
    try:
        status = fetch_status(socket_path, timeout_s=timeout_s)
    except DiagnosticsError as exc:
        return Check(name, False, str(exc), exc.hint)
    return Check(name, True, f"answering: version {status.get('version', '?')}, up {status.get('uptime_s', '?')}s")


async def run_doctor(
    *,
    status_socket: str | None = None,
    serial_ports: Sequence[str] = (),
    data_dir: str | None = None,
    buffer_path: str | None = None,
    mqtt_servers: Sequence[str] = (),
    mqtt_ca_file: str | None = None,
    kafka_bootstrap: Sequence[str] = (),
    kafka_tls: bool = False,
    kafka_ca_file: str | None = None,
    clock_probe: Callable[[], ClockStatus] = read_clock_status,
    timeout_s: float = 5.0,
    service_user: str = "outpost",
    extra_endpoints: Sequence[Endpoint] = (),
    device_policy: DevicePolicy | None = None,
) -> list[Check]:
    """Every check, local ones first. Network checks run concurrently."""
    checks: list[Check] = []
    for port in serial_ports:
        checks.extend(await asyncio.to_thread(_port_checks, port, service_user, device_policy))
    if data_dir:
        checks.append(await asyncio.to_thread(check_disk, data_dir))
    if buffer_path:
        checks.append(await asyncio.to_thread(check_buffer_file, buffer_path))
    checks.append(check_clock(clock_probe))
    if status_socket:
        checks.append(await asyncio.to_thread(check_status_socket, status_socket))

    endpoints: list[Endpoint] = list(extra_endpoints)
    for url in mqtt_servers:
        try:
            ep = parse_mqtt_url(url)
        except DiagnosticsError as exc:
            checks.append(Check(f"mqtt {url}", False, str(exc), exc.hint))
            continue
        endpoints.append(Endpoint("mqtt", ep.host, ep.port, ep.tls, mqtt_ca_file))
    for server in kafka_bootstrap:
        try:
            host, port = parse_host_port(server)
        except DiagnosticsError as exc:
            checks.append(Check(f"kafka {server}", False, str(exc), exc.hint))
            continue
        endpoints.append(Endpoint("kafka", host, port, kafka_tls, kafka_ca_file))
    results = await asyncio.gather(*(check_endpoint(ep, timeout_s=timeout_s) for ep in endpoints))
    for result in results:
        checks.extend(result)
    return checks


def render_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}")
        if not c.ok and c.hint:
            lines.append(f"      -> {c.hint}")
    failed = sum(1 for c in checks if not c.ok)
    lines.append("")
    lines.append("all checks passed" if failed == 0 else f"{failed} of {len(checks)} checks failed")
    return "\n".join(lines)


def run_for_config(
    cfg: Any, *, socket_path: str | None = None, timeout_s: float = 5.0
) -> tuple[list[Check], str]:
    """`outpost doctor`: every check the configuration calls for, and the rendered report.

    `cfg` is a validated OutpostConfig; only plain attributes are read from it.
    """
    ports: list[str] = []
    modbus_tcp: list[Endpoint] = []
    for bus in cfg.buses:
        if bus.transport == "rtu":
            ports.append(bus.port)
        else:
            modbus_tcp.append(Endpoint(f"modbus bus {bus.name}", bus.host, int(bus.port), False))
    for device in cfg.devices:
        if getattr(device, "driver", "") == "serial_line":
            ports.append(device.port)
    data_dir = cfg.gateway.data_dir
    mqtt = cfg.mqtt
    kafka = cfg.kafka
    checks = asyncio.run(run_doctor(
        status_socket=socket_path,
        serial_ports=list(dict.fromkeys(ports)),
        data_dir=data_dir,
        buffer_path=os.path.join(data_dir, "buffer.db"),
        mqtt_servers=list(mqtt.servers) if mqtt else [],
        mqtt_ca_file=mqtt.ca_file if mqtt else None,
        kafka_bootstrap=list(kafka.bootstrap_servers) if kafka else [],
        kafka_tls=bool(kafka and kafka.security_protocol in ("SSL", "SASL_SSL")),
        kafka_ca_file=kafka.ca_file if kafka else None,
        extra_endpoints=modbus_tcp,
        timeout_s=timeout_s,
        device_policy=load_device_policy() if ports else None,
    ))
    return checks, render_checks(checks)
