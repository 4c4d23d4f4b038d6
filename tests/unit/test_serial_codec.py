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


# -- framing edges ------------------------------------------------------------------------------
def test_terminator_overflow_keeps_a_partial_terminator_and_counts_once():
    f = Framer(cfg(terminator="\\r\\n", max_line_length=4))
    assert f.feed(b"abcdefg\r") == []               # overlong; the \r may start the terminator
    assert f.overflows == 1
    assert f.feed(b"\nok\r\n") == [b"ok"]            # ... and it did: the overlong line ended there
    assert f.feed(b"abcdefg") == [] and f.feed(b"hijkl") == []
    assert f.overflows == 2                            # one overlong line, counted once
    assert f.feed(b"\r\nok\r\n") == [b"ok"]
    assert f.feed(b"12345\r\n") == [] and f.overflows == 3   # found whole but too long
    assert f.feed(b"1234\r\n") == [b"1234"]          # exactly the maximum is fine
    f = Framer(cfg(terminator="\\r\\n", max_line_length=4))
    assert f.feed(b"abcde") == [] and f.feed(b"\r\nxy\r\n") == [b"xy"]
    assert f.feed(b"\r\n") == [b""]                  # an empty line is a frame (the parser refuses it)


def test_start_framing_edges():
    f = Framer(cfg(framing="start", start="$", parser="csv", max_line_length=6))
    assert f.feed(b"noise only") == [] and f.flush() == []
    assert f.feed(b"$A,1\n$B,2\r\n$C") == [b"$A,1", b"$B,2"]
    assert f.feed(b",3$D") == [b"$C,3"]
    assert f.feed(b"1234567") == [] and f.overflows == 1   # no next start and over the maximum
    assert f.flush() == []
    assert f.feed(b"$1234567$E") == [] and f.overflows == 2  # a whole frame over the maximum
    assert f.flush() == [b"$E"]
    f = Framer(cfg(framing="start", start="$$", parser="csv"))
    assert f.feed(b"x$$a$$b") == [b"$$a"] and f.flush() == [b"$$b"]


def test_start_framing_flush_needs_a_started_frame():
    f = Framer(cfg(framing="start", start="$", parser="csv"))
    f._buf += b"junk"
    assert f.flush() == [] and bytes(f._buf) == b"junk"
    f = Framer(cfg(framing="terminator", terminator="\\n"))
    assert f.feed(b"partial") == [] and f.flush() == []


def test_fixed_and_idle_framing_edges():
    f = Framer(cfg(framing="fixed", frame_length=3))
    assert f.feed(b"ab") == [] and f.feed(b"c") == [b"abc"] and f.feed(b"") == []
    assert f.flush() == []
    f = Framer(cfg(framing="idle", max_line_length=4))
    assert f.feed(b"abcd") == [] and f.overflows == 0     # exactly the maximum
    assert f.flush() == [b"abcd"] and f.flush() == []
    f.feed(b"abcde")
    assert f.overflows == 1 and f.flush() == []
    assert f.feed(b"ok") == [] and f.flush() == [b"ok"]   # the next frame after a discarded one


# -- checksums ----------------------------------------------------------------------------------
def test_checksum_algorithms_on_known_vectors():
    from drivers.serial_line.codec import lrc, nmea_checksum, sum8

    assert crc16_modbus(b"123456789") == 0x4B37            # the CRC-16/MODBUS check value
    assert crc16_modbus(b"") == 0xFFFF
    assert sum8(b"\xff\x02") == 0x01 and sum8(b"") == 0
    assert lrc(b"\x01\x03\x00\x00\x00\x01") == 0xFB and lrc(b"") == 0
    assert nmea_checksum("GPGGA") == 0x47 ^ 0x50 ^ 0x47 ^ 0x47 ^ 0x41
    assert checksum_text("crc16", "123456789") == "4B37"
    assert checksum_text("sum8", "\x01") == "01" and checksum_text("lrc", "\x01") == "FF"
    assert checksum_text("nmea", "$GPGGA") == checksum_text("nmea", "GPGGA") == "56"
    assert checksum_text("nmea", "!AIVDM") == checksum_text("nmea", "AIVDM")
    with pytest.raises(BadLine, match="unknown checksum 'md5'"):
        checksum_text("md5", "x")


def test_verify_checksum_edges():
    assert verify_checksum("anything*ZZ", "none") == "anything*ZZ"
    assert verify_checksum("a*b*" + checksum_text("sum8", "a*b"), "sum8") == "a*b"   # the last separator
    assert verify_checksum("T=1;" + checksum_text("sum8", "T=1").lower(), "sum8", ";") == "T=1"
    assert verify_checksum("T=1##" + checksum_text("lrc", "T=1") + " ", "lrc", "##") == "T=1"
    # NMEA always uses '*', whatever the configured separator
    assert verify_checksum("$GPX*" + checksum_text("nmea", "$GPX"), "nmea", ";") == "$GPX"
    with pytest.raises(BadLine, match=r"no crc16 checksum \(missing ';'\)"):
        verify_checksum("T=1*00", "crc16", ";")
    with pytest.raises(BadLine, match="line says '00', computed"):
        verify_checksum("T=1*00", "sum8")


# -- conversion ---------------------------------------------------------------------------------
def _point(**kw):
    return cfg(points=[{"name": "p", "source": 0, **kw}]).points[0]


def test_convert_integers_in_every_notation_and_range():
    from drivers.serial_line.codec import convert

    assert convert(_point(type="int16"), " 42 ") == 42
    assert convert(_point(type="int16"), "0x1F") == 31 and convert(_point(type="int16"), "-0x1F") == -31
    assert convert(_point(type="int16"), "0X10") == 16
    assert convert(_point(type="int16"), "1e3") == 1000              # integral in float notation
    assert convert(_point(type="int16"), "010") == 10                # decimal, not octal
    got = convert(_point(type="uint8"), "255.0")
    assert got == 255 and type(got) is int
    for t, lo, hi in (("int8", -128, 127), ("uint16", 0, 65535), ("int64", -(2**63), 2**63 - 1),
                      ("uint64", 0, 2**64 - 1), ("int32", -(2**31), 2**31 - 1), ("uint32", 0, 2**32 - 1)):
        assert convert(_point(type=t), str(lo)) == lo and convert(_point(type=t), str(hi)) == hi
        for bad in (lo - 1, hi + 1):
            with pytest.raises(BadLine, match=f"point 'p': {bad} out of range for {t}"):
                convert(_point(type=t), str(bad))
    with pytest.raises(BadLine, match=r"'2\.5' is not an integer"):
        convert(_point(type="int16"), "2.5")
    with pytest.raises(BadLine, match="'x1' is not a number"):
        convert(_point(type="int16"), "x1")


def test_convert_floats_bools_strings_and_scaling():
    from drivers.serial_line.codec import convert

    assert convert(_point(), "2.5") == 2.5
    with pytest.raises(BadLine, match="'abc' is not a number"):
        convert(_point(), "abc")
    for word in ("1", "TRUE", "On", "yes", "t", "Y"):
        assert convert(_point(type="bool"), word) is True
    for word in ("0", "false", "OFF", "No", "f", "n"):
        assert convert(_point(type="bool"), word) is False
    with pytest.raises(BadLine, match="'maybe' is not a boolean"):
        convert(_point(type="bool"), "maybe")
    assert convert(_point(type="string"), "  hi there ") == "hi there"
    assert convert(_point(scale=2.0), "1.5") == 3.0
    assert convert(_point(offset=-1.0), "1.5") == 0.5
    assert convert(_point(type="int16", scale=1.0, offset=0.0), "7") == 7
    raw = convert(_point(type="uint64"), str(2**64 - 1))
    assert raw == 2**64 - 1 and type(raw) is int      # unscaled integers stay exact


# -- parsers ------------------------------------------------------------------------------------
def test_line_cleanup_encoding_and_empty_lines():
    p = LineParser(cfg(parser="csv", points=[{"name": "a", "source": 0, "type": "string"}]))
    assert p.parse(b"\x00 x \r\n") == {"a": "x"}
    with pytest.raises(BadLine, match="empty line"):
        p.parse(b"\r\n\x00 ")
    with pytest.raises(BadLine, match="not ascii text"):
        p.parse(b"\xff")
    latin = LineParser(cfg(parser="csv", encoding="latin-1", points=[{"name": "a", "source": 0, "type": "string"}]))
    assert latin.parse(b"\xe9") == {"a": "é"}


def test_csv_with_checksum_and_other_delimiter():
    p = LineParser(cfg(parser="csv", delimiter=";", checksum="sum8",
                       points=[{"name": "a", "source": 0}, {"name": "b", "source": 1}]))
    body = "1.5;2"
    assert p.parse(f"{body}*{checksum_text('sum8', body)}".encode()) == {"a": 1.5, "b": 2.0}
    with pytest.raises(BadLine, match="field 1 missing in line"):
        p.parse(f"1.5*{checksum_text('sum8', '1.5')}".encode())


def test_kv_parser_separators_and_missing_keys():
    kv = LineParser(cfg(parser="kv", points=[{"name": "v", "source": "V"}, {"name": "i", "source": "I"}]))
    assert kv.parse(b"V=1,I=2;;X=3 junk  ") == {"v": 1.0, "i": 2.0}
    assert kv.parse(b"V=1\tI=2") == {"v": 1.0, "i": 2.0}
    with pytest.raises(BadLine, match="field 'I' missing"):
        kv.parse(b"V=1")
    custom = LineParser(cfg(parser="kv", pair_separator="|", kv_separator=":",
                            points=[{"name": "v", "source": "V"}, {"name": "s", "source": "S", "type": "string"}]))
    assert custom.parse(b"V:1.5|S:a b|X:1") == {"v": 1.5, "s": "a b"}
    assert custom.parse(b"V:2|S:x:y") == {"v": 2.0, "s": "x:y"}     # only the first ':' splits


def test_regex_parser_by_group_number_and_empty_groups():
    p = LineParser(cfg(parser="regex", pattern=r"A=(\d+)(?: B=(?P<b>\d+))?",
                       points=[{"name": "a", "source": 1}, {"name": "whole", "source": 0, "type": "string"}]))
    assert p.parse(b"xx A=12 B=3") == {"a": 12.0, "whole": "A=12 B=3"}
    q = LineParser(cfg(parser="regex", pattern=r"A=(\d+)(?: B=(?P<b>\d+))?", points=[{"name": "b"}]))
    with pytest.raises(BadLine, match="field 'b' is empty"):
        q.parse(b"A=1")


def test_nmea_parser_edges():
    p = LineParser(cfg(parser="nmea", checksum="nmea", points=[{"name": "x", "source": 1}]))
    body = "$ANY,5"
    assert p.parse(f"{body}*{checksum_text('nmea', body)}".encode()) == {"x": 5.0}  # no sentence filter
    body = "!AIS,6"
    assert p.parse(f"{body}*{checksum_text('nmea', body)}".encode()) == {"x": 6.0}
    body = "$GP,,1"
    with pytest.raises(BadLine, match="field 1 is empty"):
        p.parse(f"{body}*{checksum_text('nmea', body)}".encode())
    body = "GP,1"
    with pytest.raises(BadLine, match="not an NMEA sentence"):
        p.parse(f"{body}*{checksum_text('nmea', body)}".encode())
    skip = LineParser(cfg(parser="nmea", checksum="nmea", sentence="GPGGA", points=[{"name": "x", "source": 1}]))
    body = "$GPRMC,1"
    with pytest.raises(SkipLine) as err:
        skip.parse(f"{body}*{checksum_text('nmea', body)}".encode())
    assert isinstance(err.value, BadLine) and "GPRMC" in str(err.value)


def test_more_framing_boundaries():
    f = Framer(cfg(terminator="\\n", max_line_length=4))
    assert f.feed(b"abcd") == [] and f.overflows == 0      # exactly the maximum, still waiting
    assert f.feed(b"\n") == [b"abcd"]
    f = Framer(cfg(framing="start", start="$", parser="csv", max_line_length=4))
    assert f.feed(b"$abc") == [] and f.overflows == 0      # exactly the maximum, no next start yet
    assert f.feed(b"$") == [b"$abc"]
    f = Framer(cfg(framing="start", start="$", parser="csv"))
    assert f.feed(b"$AX\r\n$B \t\r\n$C") == [b"$AX", b"$B \t"]   # only CR/LF are trimmed


def test_more_checksum_and_conversion_boundaries():
    from drivers.serial_line.codec import convert, nmea_checksum

    assert checksum_text("nmea", "$XA") == f"{nmea_checksum('XA'):02X}"   # only the $ or ! goes
    assert verify_checksum("*00", "sum8") == ""                           # separator at the start
    for t, lo, hi in (("int16", -(2**15), 2**15 - 1), ("uint8", 0, 255)):
        assert convert(_point(type=t), str(lo)) == lo and convert(_point(type=t), str(hi)) == hi
        for bad in (lo - 1, hi + 1):
            with pytest.raises(BadLine, match=f"out of range for {t}"):
                convert(_point(type=t), str(bad))


def test_more_parser_cleanup():
    p = LineParser(cfg(parser="csv", points=[{"name": "a", "source": 0, "type": "string"}]))
    assert p.parse(b"XaX\r\n") == {"a": "XaX"}
    kv = LineParser(cfg(parser="kv", points=[{"name": "v", "source": "V"}]))
    assert kv.parse(b";V=1") == {"v": 1.0}                # an empty item before the first pair
