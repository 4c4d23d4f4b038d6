"""Codec: every type and byte order against `struct`, scaling both ways, strings."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.modbus import codec

ORDERS = codec.BYTE_ORDERS
INT_RANGES = {
    "int16": (">h", -(2**15), 2**15 - 1), "uint16": (">H", 0, 2**16 - 1),
    "int32": (">i", -(2**31), 2**31 - 1), "uint32": (">I", 0, 2**32 - 1),
    "int64": (">q", -(2**63), 2**63 - 1), "uint64": (">Q", 0, 2**64 - 1),
}


def wire_registers(big_endian: bytes, order: str) -> list[int]:
    """Independent model of the byte orders: place bytes A B C D ... on the wire."""
    n = len(big_endian)
    if order == "ABCD":
        wire = big_endian
    elif order == "DCBA":
        wire = big_endian[::-1]
    elif order == "BADC":
        wire = b"".join(big_endian[i : i + 2][::-1] for i in range(0, n, 2))
    else:  # CDAB: registers reversed, bytes in each register kept
        words = [big_endian[i : i + 2] for i in range(0, n, 2)]
        wire = b"".join(reversed(words))
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, n, 2)]


def test_known_float32_vectors():
    # 0x41200000 = 10.0
    assert codec.decode("float32", [0x4120, 0x0000], "ABCD") == 10.0
    assert codec.decode("float32", [0x0000, 0x4120], "CDAB") == 10.0
    assert codec.decode("float32", [0x2041, 0x0000], "BADC") == 10.0
    assert codec.decode("float32", [0x0000, 0x2041], "DCBA") == 10.0


@pytest.mark.parametrize("value_type", sorted(INT_RANGES))
@pytest.mark.parametrize("order", ORDERS)
@given(data=st.data())
def test_ints_match_struct(value_type, order, data):
    fmt, lo, hi = INT_RANGES[value_type]
    value = data.draw(st.integers(lo, hi))
    regs = wire_registers(struct.pack(fmt, value), order)
    assert codec.decode(value_type, regs, order) == value
    assert codec.encode(value_type, value, order) == regs


@pytest.mark.parametrize("order", ORDERS)
@given(value=st.floats(allow_nan=False, width=32))
def test_float32_matches_struct(order, value):
    regs = wire_registers(struct.pack(">f", value), order)
    assert codec.decode("float32", regs, order) == value
    assert codec.encode("float32", value, order) == regs


@pytest.mark.parametrize("order", ORDERS)
@given(value=st.floats(allow_nan=False))
def test_float64_matches_struct(order, value):
    regs = wire_registers(struct.pack(">d", value), order)
    assert codec.decode("float64", regs, order) == value
    assert codec.encode("float64", value, order) == regs


@given(regs=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8), order=st.sampled_from(ORDERS))
def test_reordering_is_its_own_inverse(regs, order):
    assert codec.bytes_to_registers(codec.registers_to_bytes(regs, order), order) == regs


def test_bits_of_a_register():
    assert codec.decode("bool", [0b1000_0000_0000_0100], bit=2) is True
    assert codec.decode("bool", [0b1000_0000_0000_0100], bit=15) is True
    assert codec.decode("bool", [0b1000_0000_0000_0100], bit=0) is False


def test_strings_pad_and_strip():
    regs = codec.encode("string", "AB12", "ABCD", length=4)
    assert regs == [0x4142, 0x3132, 0, 0]
    assert codec.decode("string", regs, "ABCD") == "AB12"
    assert codec.decode("string", codec.encode("string", "xyz", "BADC", length=2), "BADC") == "xyz"
    with pytest.raises(codec.CodecError, match="does not fit"):
        codec.encode("string", "toolong", length=2)


def test_wrong_register_count_is_an_error():
    with pytest.raises(codec.CodecError, match="expects 2 registers"):
        codec.decode("float32", [1], "ABCD")


def test_encode_range_checks():
    with pytest.raises(codec.CodecError, match="out of range"):
        codec.encode("uint16", 70000)
    with pytest.raises(codec.CodecError, match="out of range"):
        codec.encode("int16", -40000)
    with pytest.raises(codec.CodecError, match="integer"):
        codec.encode("int32", 1.5)


def test_scale_and_reverse():
    assert codec.scale_value(123, 0.1, 0) == pytest.approx(12.3)
    assert codec.unscale_value(12.3, "int16", 0.1, 0) == 123
    assert codec.unscale_value(25.0, "int16", 0.5, -10) == 70
    assert codec.scale_value(70, 0.5, -10) == 25.0


def test_decode_all_offers_every_view():
    regs = [*codec.encode("float32", 1.5, "CDAB"), 0, 0]
    rows = codec.decode_all(regs)
    assert rows[0]["float32_CDAB"] == 1.5
    assert "float64_ABCD" in rows[0] and "float64_ABCD" not in rows[1]


# -- boundaries ---------------------------------------------------------------------------------
@pytest.mark.parametrize("value_type,count", [
    ("int16", 1), ("uint16", 1), ("int32", 2), ("uint32", 2), ("float32", 2),
    ("int64", 4), ("uint64", 4), ("float64", 4), ("bool", 1)])
def test_register_count_of_every_type(value_type, count):
    got = codec.register_count(value_type)
    assert got == count and type(got) is int


def test_register_count_of_strings_and_unknown_types():
    assert codec.register_count("string", 5) == 5
    for length in (None, 0):
        with pytest.raises(codec.CodecError, match="needs a length"):
            codec.register_count("string", length)
    with pytest.raises(codec.CodecError, match="unknown value type 'int8'"):
        codec.register_count("int8")


def test_a_string_exactly_filling_its_registers_is_accepted():
    assert codec.encode("string", "ABCD", "ABCD", length=2) == [0x4142, 0x4344]
    assert codec.encode("string", "ABCD", "DCBA", length=2) == [0x4443, 0x4241]
    with pytest.raises(codec.CodecError, match="5 bytes does not fit 2 registers"):
        codec.encode("string", "ABCDE", length=2)
    # the length counts encoded bytes, not characters
    with pytest.raises(codec.CodecError, match="does not fit"):
        codec.encode("string", "ééé", length=2, encoding="utf-8")
    assert codec.encode("string", "éé", length=2, encoding="utf-8") == [0xC3A9, 0xC3A9]


def test_strings_need_a_str_and_strip_only_padding():
    with pytest.raises(codec.CodecError, match="needs a str, got int"):
        codec.encode("string", 12, length=2)
    regs = [0x0020, 0x4142, 0x2000]  # NUL space A B space NUL
    assert codec.decode("string", regs) == "AB"
    assert codec.decode("string", regs, strip=False) == "\x00 AB \x00"
    assert codec.decode("string", [0x4120, 0x4200]) == "A B"
    assert codec.decode("string", [0xC3A9], encoding="utf-8") == "é"
    assert codec.decode("string", [0xFF41]) == "\ufffdA"  # undecodable bytes are replaced
    assert codec.decode("string", codec.encode("string", "XAX", length=2)) == "XAX"


@pytest.mark.parametrize("value_type", sorted(INT_RANGES))
def test_integer_range_limits_are_exact(value_type):
    fmt, lo, hi = INT_RANGES[value_type]
    for ok in (lo, hi):
        assert codec.encode(value_type, ok) == wire_registers(struct.pack(fmt, ok), "ABCD")
    for bad in (lo - 1, hi + 1):
        with pytest.raises(codec.CodecError, match=f"out of range for {value_type}"):
            codec.encode(value_type, bad)


@pytest.mark.parametrize("value_type", sorted(INT_RANGES))
def test_non_integers_are_refused_for_integer_types(value_type):
    assert codec.encode(value_type, 7.0) == codec.encode(value_type, 7)  # an integral float is fine
    for bad in (1.5, True, "7", None, float("nan")):
        with pytest.raises(codec.CodecError, match="needs an integer"):
            codec.encode(value_type, bad)


def test_float_encoding_checks():
    for bad in (True, "1.0", None):
        with pytest.raises(codec.CodecError, match="needs a number"):
            codec.encode("float32", bad)
    assert codec.encode("float32", 3) == [0x4040, 0x0000]  # ints are accepted as floats
    assert codec.encode("float32", 3.4028234663852886e38) == [0x7F7F, 0xFFFF]
    with pytest.raises(codec.CodecError, match="out of range for float32"):
        codec.encode("float32", 3.5e38)
    with pytest.raises(codec.CodecError, match="out of range for float32"):
        codec.encode("float32", -3.5e38)
    assert codec.encode("float32", float("inf")) == [0x7F80, 0x0000]
    assert codec.encode("float64", 3.5e38) == wire_registers(struct.pack(">d", 3.5e38), "ABCD")
    with pytest.raises(codec.CodecError, match="cannot encode type 'bool'"):
        codec.encode("bool", 1)


def test_decode_errors_name_what_is_wrong():
    with pytest.raises(codec.CodecError, match="needs a bit index"):
        codec.decode("bool", [1])
    with pytest.raises(codec.CodecError, match="bool expects 1 register, got 2"):
        codec.decode("bool", [1, 1], bit=0)
    with pytest.raises(codec.CodecError, match="unknown value type 'int8'"):
        codec.decode("int8", [1])
    with pytest.raises(codec.CodecError, match="int16 expects 1 registers, got 2"):
        codec.decode("int16", [1, 2])
    with pytest.raises(codec.CodecError, match="int64 expects 4 registers, got 3"):
        codec.decode("int64", [1, 2, 3])


def test_register_values_and_byte_orders_are_checked():
    assert codec.registers_to_bytes([0, 0xFFFF], "ABCD") == b"\x00\x00\xff\xff"
    for bad in (-1, 0x10000):
        with pytest.raises(codec.CodecError, match=f"register value {bad} is not 16-bit"):
            codec.registers_to_bytes([0, bad], "ABCD")
    with pytest.raises(codec.CodecError, match="unknown byte order 'ABDC'"):
        codec.registers_to_bytes([1], "ABDC")
    with pytest.raises(codec.CodecError, match="unknown byte order 'ABDC'"):
        codec.bytes_to_registers(b"\x00\x01", "ABDC")
    with pytest.raises(codec.CodecError, match="3 bytes do not fill whole registers"):
        codec.bytes_to_registers(b"abc", "ABCD")
    assert codec.bytes_to_registers(b"\x01\x02\x03\x04", "DCBA") == [0x0403, 0x0201]
    assert codec.bytes_to_registers(b"\x01\x02\x03\x04", "BADC") == [0x0201, 0x0403]
    assert codec.bytes_to_registers(b"\x01\x02\x03\x04", "CDAB") == [0x0304, 0x0102]


def test_bits_at_every_position():
    for bit in range(16):
        assert codec.decode("bool", [1 << bit], bit=bit) is True
        assert codec.decode("bool", [0xFFFF ^ (1 << bit)], bit=bit) is False


# -- scaling ------------------------------------------------------------------------------------
def test_integer_points_are_rounded_not_truncated():
    # 12.34 / 0.1 = 123.39999999999999 and 12.36 / 0.1 = 123.6: the nearest register value wins.
    assert codec.unscale_value(12.34, "int16", 0.1, 0) == 123
    got = codec.unscale_value(12.36, "int16", 0.1, 0)
    assert got == 124 and isinstance(got, int)
    assert codec.unscale_value(-12.36, "int32", 0.1, 0) == -124
    assert codec.unscale_value(7, "uint16", 1.0, 0.0) == 7
    # identity scaling keeps integers exact beyond a float's 53 bits
    assert codec.unscale_value(2**64 - 1, "uint64", 1.0, 0.0) == 2**64 - 1
    assert codec.unscale_value(2**63 - 1, "int64", 1.0, 0.0) == 2**63 - 1
    # floats are not rounded
    assert codec.unscale_value(12.36, "float32", 0.1, 0) == pytest.approx(123.6)
    assert codec.unscale_value(0.25, "float64", 1.0, 0.0) == 0.25


def test_unscale_applies_offset_alone_and_scale_alone():
    assert codec.unscale_value(25, "int16", 1.0, 5.0) == 20
    assert codec.unscale_value(25, "int16", 5.0, 0.0) == 5
    assert codec.unscale_value(25.0, "float32", 2.0, 1.0) == 12.0
    assert codec.scale_value(20, 1.0, 5.0) == 25
    assert codec.scale_value(5, 5.0, 0.0) == 25
    raw = codec.scale_value(7, 1.0, 0.0)
    assert raw == 7 and isinstance(raw, int)


def test_unscale_refuses_what_cannot_be_written():
    for bad in ("12", True, None):
        with pytest.raises(codec.CodecError, match="int16 point needs a number"):
            codec.unscale_value(bad, "int16", 1.0, 0.0)
    for bad in (float("inf"), float("nan")):
        with pytest.raises(codec.CodecError, match="is not a finite number"):
            codec.unscale_value(bad, "int16", 0.5, 0.0)
    assert codec.unscale_value(float("inf"), "float32", 0.5, 0.0) == float("inf")
    assert codec.unscale_value("on", "string", 2.0, 1.0) == "on"
    assert codec.unscale_value(True, "bool", 2.0, 1.0) is True


def test_decode_all_views_of_each_offset():
    regs = [0x8001, 0x4142, 0x0000, 0x0000, 0x0001]
    rows = codec.decode_all(regs)
    assert [r["offset"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["hex"] == "0x8001" and rows[0]["uint16"] == 0x8001 and rows[0]["int16"] == -32767
    assert rows[1]["int16"] == 0x4142 and rows[1]["ascii"] == "AB"
    assert rows[0]["ascii"] == ".." and codec.decode_all([0x1F7F])[0]["ascii"] == ".."
    assert codec.decode_all([0x207E])[0]["ascii"] == " ~"
    assert rows[0]["uint32_ABCD"] == 0x80014142 and rows[0]["int32_CDAB"] == 0x41428001
    assert rows[0]["uint64_ABCD"] == 0x8001414200000000
    # a view appears exactly where enough registers follow
    assert "int32_ABCD" in rows[3] and "int32_ABCD" not in rows[4]
    assert "int64_DCBA" in rows[1] and "int64_DCBA" not in rows[2]
    assert set(rows[4]) == {"offset", "hex", "uint16", "int16", "ascii"}
    assert rows[4]["int16"] == 1
    assert [r["int16"] for r in codec.decode_all([0x8000, 0x7FFF, 0xFFFF])] == [-32768, 32767, -1]
