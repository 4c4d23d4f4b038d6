"""Serial-line framing, checksums and parsers, without a port."""

import pytest
from pydantic import ValidationError

from drivers.serial_line.codec import (
    BadLine,
    Framer,
    LineParser,
    SkipLine,
    checksum_text,
    crc16_modbus,
    verify_checksum,
)
from drivers.serial_line.config import SerialLineDeviceConfig


def cfg(**kw):
    base = {"driver": "serial_line", "name": "s", "port": "/dev/null",
            "points": [{"name": "a", "source": 0}]}
    base.update(kw)
    return SerialLineDeviceConfig.model_validate(base)


def test_terminator_framing_across_chunks_and_resync_after_overflow():
    f = Framer(cfg(terminator="\\r\\n", max_line_length=10))
    assert f.feed(b"12,3") == []
    assert f.feed(b"\r\n4,5\r") == [b"12,3"]
    assert f.feed(b"\n" + b"x" * 25) == [b"4,5"]
    assert f.feed(b"y" * 10 + b"\r\nok\r\n") == [b"ok"]     # the overlong line is dropped whole
    assert f.overflows == 1


def test_start_fixed_and_idle_framing():
    f = Framer(cfg(framing="start", start="$", parser="csv"))
    assert f.feed(b"junk$A,1\r\n$B,2") == [b"$A,1"]
    assert f.flush() == [b"$B,2"]
    f = Framer(cfg(framing="fixed", frame_length=4))
    assert f.feed(b"abcdefghij") == [b"abcd", b"efgh"]
    assert f.feed(b"kl") == [b"ijkl"]
    f = Framer(cfg(framing="idle", max_line_length=8))
    assert f.feed(b"abc") == [] and f.feed(b"de") == []
    assert f.flush() == [b"abcde"]
    f.feed(b"z" * 9)
    assert f.overflows == 1 and f.flush() == []


def test_checksums():
    assert crc16_modbus(b"\x01\x03\x00\x00\x00\x01") == 0x0A84  # wire order 84 0A
    line = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
    assert verify_checksum(line, "nmea").endswith(",M,,")
    with pytest.raises(BadLine, match="mismatch"):
        verify_checksum(line[:-2] + "48", "nmea")
    for kind in ("crc16", "sum8", "lrc"):
        payload = "T=21.5,H=40"
        assert verify_checksum(f"{payload}*{checksum_text(kind, payload)}", kind) == payload
        with pytest.raises(BadLine):
            verify_checksum(f"T=21.6,H=40*{checksum_text(kind, payload)}", kind)
    with pytest.raises(BadLine, match="missing"):
        verify_checksum("T=1", "sum8")


def test_csv_parser_types_and_scale():
    p = LineParser(cfg(parser="csv", points=[
        {"name": "t", "source": 1, "scale": 0.1},
        {"name": "n", "source": 2, "type": "int32"},
        {"name": "on", "source": 3, "type": "bool"},
        {"name": "id", "source": 0, "type": "string"},
    ]))
    assert p.parse(b"S1,215,-3,on\r") == {"t": pytest.approx(21.5), "n": -3, "on": True, "id": "S1"}
    with pytest.raises(BadLine, match="not a number"):
        p.parse(b"S1,abc,-3,on")
    with pytest.raises(BadLine, match="missing"):
        p.parse(b"S1,1")
    with pytest.raises(BadLine, match="out of range"):
        LineParser(cfg(points=[{"name": "x", "source": 0, "type": "uint8"}])).parse(b"300")


def test_regex_and_kv_parsers():
    p = LineParser(cfg(parser="regex", pattern=r"T=(?P<temp>-?[\d.]+)C RH=(?P<rh>\d+)",
                       points=[{"name": "temp"}, {"name": "humidity", "source": "rh", "type": "uint8"}]))
    assert p.parse(b"T=-4.5C RH=77") == {"temp": -4.5, "humidity": 77}
    with pytest.raises(BadLine, match="does not match"):
        p.parse(b"garbage")
    kv = LineParser(cfg(parser="kv", points=[{"name": "v", "source": "V"}, {"name": "i", "source": "I"}]))
    assert kv.parse(b"V=230.1 I=2.5 X=1") == {"v": 230.1, "i": 2.5}


def test_nmea_parser_filters_sentences():
    p = LineParser(cfg(parser="nmea", checksum="nmea", sentence="GPGGA", points=[
        {"name": "lat", "source": 2}, {"name": "alt", "source": 9}, {"name": "sats", "source": 7, "type": "uint8"},
    ]))
    line = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n"
    assert p.parse(line) == {"lat": 4807.038, "alt": 545.4, "sats": 8}
    rmc = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W"
    with pytest.raises(SkipLine):
        p.parse(f"{rmc}*{checksum_text('nmea', rmc)}".encode())


def test_config_rejects_inconsistent_settings():
    with pytest.raises(ValidationError, match="needs pattern"):
        cfg(parser="regex")
    with pytest.raises(ValidationError, match="no group named"):
        cfg(parser="regex", pattern=r"(?P<x>\d+)", points=[{"name": "y"}])
    with pytest.raises(ValidationError, match="frame_length"):
        cfg(framing="fixed")
    with pytest.raises(ValidationError, match="both poll_command and poll_interval"):
        cfg(poll_command="R\\r")
    with pytest.raises(ValidationError, match="0-based field index"):
        cfg(points=[{"name": "a"}])
