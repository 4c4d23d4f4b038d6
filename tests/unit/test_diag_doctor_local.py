"""Doctor checks that need no network: serial ports, disk, buffer file, clock, parsing, output."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from gateway.clock import ClockStatus
from gateway.diagnostics.doctor import (
    Check,
    check_buffer_file,
    check_clock,
    check_disk,
    check_serial_port,
    parse_host_port,
    parse_mqtt_url,
    render_checks,
)
from gateway.diagnostics.errors import DiagnosticsError


@pytest.fixture
def pty_path() -> object:
    master, slave = os.openpty()
    try:
        yield os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


def test_an_existing_tty_passes(pty_path: str) -> None:
    check = check_serial_port(pty_path, service_user="root")
    assert check.ok, check
    assert "readable and writable" in check.detail


def test_a_by_id_style_symlink_to_a_tty_passes(pty_path: str, tmp_path: Path) -> None:
    link = tmp_path / "usb-FTDI_FT232R-if00-port0"
    link.symlink_to(pty_path)
    check = check_serial_port(str(link), service_user="root")
    assert check.ok and pty_path in check.detail


def test_a_missing_port_fails_with_a_hint() -> None:
    check = check_serial_port("/dev/serial/by-id/usb-nothing-here")
    assert not check.ok and check.detail == "does not exist"
    assert "/dev/serial/by-id" in check.hint


def test_a_dangling_link_says_the_adapter_is_unplugged(tmp_path: Path) -> None:
    link = tmp_path / "usb-gone"
    link.symlink_to(tmp_path / "ttyUSB9")
    check = check_serial_port(str(link))
    assert not check.ok and "unplugged" in check.detail


def test_a_regular_file_is_not_a_serial_port(tmp_path: Path) -> None:
    f = tmp_path / "ttyFAKE"
    f.write_text("")
    check = check_serial_port(str(f))
    assert not check.ok and "not a character device" in check.detail


def test_disk_check_reports_free_space_and_fails_below_the_minimum(tmp_path: Path) -> None:
    ok = check_disk(str(tmp_path))
    assert ok.ok and "GB free" in ok.detail
    low = check_disk(str(tmp_path), min_free_bytes=10**18)
    assert not low.ok and "max_size_bytes" in low.hint
    future = check_disk(str(tmp_path / "not" / "yet"))
    assert future.ok and "does not exist yet" in future.detail


def test_buffer_check_passes_a_healthy_file_and_fails_a_corrupt_one(tmp_path: Path) -> None:
    assert check_buffer_file(str(tmp_path / "absent.db")).ok
    good = tmp_path / "buffer.db"
    conn = sqlite3.connect(good)
    conn.execute("create table records (seq integer primary key, payload blob)")
    conn.executemany("insert into records (payload) values (?)", [(b"x" * 100,)] * 100)
    conn.commit()
    conn.close()
    check = check_buffer_file(str(good))
    assert check.ok and "quick_check ok" in check.detail

    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    check = check_buffer_file(str(bad))
    assert not check.ok
    assert "outpost buffer export" in check.hint


def test_buffer_check_finds_page_level_corruption(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    conn = sqlite3.connect(path)
    conn.execute("pragma page_size=4096")
    conn.execute("create table records (seq integer primary key, payload blob)")
    conn.execute("create index by_payload on records(payload)")
    conn.executemany("insert into records (payload) values (?)", [(os.urandom(200),) for _ in range(2000)])
    conn.commit()
    conn.close()
    data = bytearray(path.read_bytes())
    # Scribble over pages in the middle of the file, leaving the header intact.
    for offset in range(8 * 4096, 40 * 4096, 4096):
        data[offset + 100 : offset + 600] = b"\xff" * 500
    path.write_bytes(bytes(data))
    check = check_buffer_file(str(path))
    assert not check.ok, check


def test_clock_check_uses_the_probe() -> None:
    assert check_clock(lambda: ClockStatus(True, "adjtimex", maxerror_us=5000)).ok
    bad = check_clock(lambda: ClockStatus(False, "adjtimex"))
    assert not bad.ok and "timedatectl" in bad.hint
    unknown = check_clock(lambda: ClockStatus(False, "unavailable: no libc"))
    assert not unknown.ok and "no libc" in unknown.detail


def test_mqtt_urls_and_kafka_servers_parse() -> None:
    ep = parse_mqtt_url("mqtts://broker.example:8884")
    assert (ep.host, ep.port, ep.tls) == ("broker.example", 8884, True)
    assert parse_mqtt_url("mqtt://10.0.0.2").port == 1883
    assert parse_mqtt_url("ssl://b").port == 8883
    with pytest.raises(DiagnosticsError, match="scheme"):
        parse_mqtt_url("http://b:80")
    assert parse_host_port("kafka.example:9093") == ("kafka.example", 9093)
    assert parse_host_port("[::1]:9092") == ("::1", 9092)
    assert parse_host_port("kafka") == ("kafka", 9092)
    with pytest.raises(DiagnosticsError, match="not a number"):
        parse_host_port("kafka:x")


def test_render_shows_failures_with_hints_and_a_summary() -> None:
    text = render_checks([
        Check("clock", True, "synchronised", "never shown"),
        Check("mqtt b:1883 tcp", False, "connection refused", "check the port"),
    ])
    assert "ok    clock: synchronised" in text
    assert "FAIL  mqtt b:1883 tcp: connection refused\n      -> check the port" in text
    assert "never shown" not in text
    assert text.endswith("1 of 2 checks failed")
    assert render_checks([Check("a", True, "fine")]).endswith("all checks passed")
