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
