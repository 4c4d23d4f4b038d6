"""Sparkplug B payload codec and topics: exact bytes, round trips, ranges and errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.base import DATATYPES, Quality
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.errors import PayloadError, TopicError
from gateway.sparkplug.payload import (
    DRIVER_DATATYPES,
    DataSet,
    DataType,
    MetaData,
    Metric,
    Parameter,
    Payload,
    PropertyValue,
    Template,
    decode_payload,
    driver_datatype,
    encode_payload,
    pack_array,
    quality_properties,
    unpack_array,
)
from gateway.sparkplug.topics import (
    MessageType,
    Topic,
    device_topic,
    node_topic,
    parse_topic,
    state_topic,
)


def one(datatype: DataType, value) -> pb.Payload.Metric:
    p = pb.Payload()
    p.ParseFromString(encode_payload(Payload(metrics=[Metric("m", datatype, value)])))
    return p.metrics[0]


def roundtrip(datatype: DataType, value):
    data = encode_payload(Payload(metrics=[Metric("m", datatype, value)]))
    return decode_payload(data).metrics[0].value


def test_small_signed_ints_are_sign_extended_to_32_bits() -> None:
    assert one(DataType.Int8, -1).int_value == 0xFFFFFFFF
    assert one(DataType.Int16, -2).int_value == 0xFFFFFFFE
    assert one(DataType.Int32, -(2**31)).int_value == 0x80000000
    assert one(DataType.Int8, 5).int_value == 5


def test_64_bit_and_uint32_go_in_long_value_twos_complement() -> None:
    assert one(DataType.Int64, -1).long_value == 2**64 - 1
    m = one(DataType.UInt32, 2**32 - 1)
    assert m.WhichOneof("value") == "long_value" and m.long_value == 2**32 - 1
    assert one(DataType.DateTime, 1_700_000_000_000).long_value == 1_700_000_000_000


def test_decoder_accepts_small_ints_that_were_not_sign_extended() -> None:
    p = pb.Payload()
    m = p.metrics.add()
    m.name, m.datatype, m.int_value = "x", DataType.Int8, 0xFF
    assert decode_payload(p.SerializeToString()).metrics[0].value == -1


@pytest.mark.parametrize("datatype,bits,signed", [
    (DataType.Int8, 8, True), (DataType.Int16, 16, True), (DataType.Int32, 32, True),
    (DataType.Int64, 64, True), (DataType.UInt8, 8, False), (DataType.UInt16, 16, False),
    (DataType.UInt32, 32, False), (DataType.UInt64, 64, False)])
def test_integer_limits_round_trip_and_overflow_is_refused(datatype, bits, signed) -> None:
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    assert roundtrip(datatype, lo) == lo
    assert roundtrip(datatype, hi) == hi
    with pytest.raises(PayloadError, match=f"out of range for {datatype.name}"):
        encode_payload(Payload(metrics=[Metric("m", datatype, hi + 1)]))
    with pytest.raises(PayloadError, match="'m'"):
        encode_payload(Payload(metrics=[Metric("m", datatype, lo - 1)]))


@given(st.integers(-(2**63), 2**63 - 1))
def test_int64_round_trip(v: int) -> None:
    assert roundtrip(DataType.Int64, v) == v


@given(st.integers(-(2**15), 2**15 - 1))
def test_int16_round_trip(v: int) -> None:
    assert roundtrip(DataType.Int16, v) == v


def test_scalar_types_round_trip() -> None:
    assert roundtrip(DataType.Float, 1.5) == 1.5
    assert roundtrip(DataType.Double, 0.1) == 0.1
    assert roundtrip(DataType.Boolean, False) is False
    for t in (DataType.String, DataType.Text, DataType.UUID):
        assert roundtrip(t, "ü") == "ü"
    assert roundtrip(DataType.Bytes, b"\x00\x01") == b"\x00\x01"
    assert roundtrip(DataType.File, b"abc") == b"abc"
    assert roundtrip(DataType.Float, None) is None


def test_wrong_python_type_is_refused_with_the_metric_name() -> None:
    with pytest.raises(PayloadError, match=r"'speed'.*needs a number"):
        encode_payload(Payload(metrics=[Metric("speed", DataType.Float, "fast")]))
    with pytest.raises(PayloadError, match="Boolean"):
        encode_payload(Payload(metrics=[Metric("b", DataType.Boolean, 1)]))


def test_arrays_are_little_endian_packed() -> None:
    assert pack_array(DataType.Int16Array, [-2, 1]) == b"\xfe\xff\x01\x00"
    assert pack_array(DataType.FloatArray, [1.0]) == struct.pack("<f", 1.0)
    # BooleanArray: 4-byte count, then bits most significant first.
    assert pack_array(DataType.BooleanArray, [True, False, True]) == b"\x03\x00\x00\x00\xa0"
    assert pack_array(DataType.StringArray, ["ab", "c"]) == b"ab\x00c\x00"
    for t, v in [(DataType.Int8Array, [-128, 127]), (DataType.UInt64Array, [2**64 - 1]),
                 (DataType.DateTimeArray, [1, 2]), (DataType.BooleanArray, [True] * 9),
                 (DataType.StringArray, []), (DataType.DoubleArray, [0.5, -1e10])]:
        assert unpack_array(t, pack_array(t, v)) == v
        assert roundtrip(t, v) == v
    with pytest.raises(PayloadError, match="whole number"):
        unpack_array(DataType.Int32Array, b"\x00\x00\x00")
    with pytest.raises(PayloadError, match="cannot pack"):
        pack_array(DataType.UInt8Array, [256])


def test_dataset_template_and_property_sets_round_trip() -> None:
    ds = DataSet(["a", "b"], [DataType.Int32, DataType.String], [[-1, "x"], [None, "y"]])
    assert roundtrip(DataType.DataSet, ds) == ds
    tpl = Template(metrics=[Metric("inner", DataType.Int8, -3)],
                   parameters=[Parameter("p", DataType.Int64, -9)], version="3",
                   template_ref="Motor")
    got = roundtrip(DataType.Template, tpl)
    assert got.template_ref == "Motor" and got.version == "3" and not got.is_definition
    assert got.metrics[0].value == -3 and got.parameters == tpl.parameters
    props = {"nested": PropertyValue(DataType.PropertySet, {"k": PropertyValue(DataType.Int16, -4)}),
             "list": PropertyValue(DataType.PropertySetList, [{"a": PropertyValue(DataType.Boolean, True)}]),
             "none": PropertyValue(DataType.String, None)}
    data = encode_payload(Payload(metrics=[Metric("m", DataType.Int32, 1, properties=props)]))
    assert decode_payload(data).metrics[0].properties == props
    with pytest.raises(PayloadError, match="row 0 has 1 values"):
        encode_payload(Payload(metrics=[Metric("d", DataType.DataSet,
                                               DataSet(["a", "b"], [DataType.Int32] * 2, [[1]]))]))


def test_quality_property_codes() -> None:
    for q, code in ((Quality.BAD, 0), (Quality.GOOD, 192), (Quality.STALE, 500)):
        m = Metric("m", DataType.Float, None, properties=quality_properties(q))
        decoded = decode_payload(encode_payload(Payload(metrics=[m]))).metrics[0]
        assert decoded.properties["Quality"] == PropertyValue(DataType.Int32, code)
        assert decoded.quality is q
    assert Metric("m", DataType.Float, 1.0).quality is Quality.GOOD


def test_every_driver_datatype_has_a_sparkplug_type() -> None:
    assert set(DRIVER_DATATYPES) == set(DATATYPES)
    assert driver_datatype("float32") is DataType.Float
    with pytest.raises(PayloadError, match="'decimal'"):
        driver_datatype("decimal")


def test_data_metrics_without_datatype_use_the_lookup() -> None:
    p = pb.Payload()
    m = p.metrics.add()
    m.alias, m.int_value = 7, 0xFFFFFFFE
    data = p.SerializeToString()
    assert decode_payload(data).metrics[0].value == 0xFFFFFFFE  # raw without a birth
    types = {7: DataType.Int16}
    assert decode_payload(data, lambda n, a: types.get(a)).metrics[0].value == -2


def test_garbage_and_mismatched_values_raise_payload_error() -> None:
    with pytest.raises(PayloadError, match="not a Sparkplug B payload"):
        decode_payload(b"\xff\xff\xff")
    p = pb.Payload()
    m = p.metrics.add()
    m.name, m.datatype, m.string_value = "x", DataType.Int32, "nope"
    with pytest.raises(PayloadError, match=r"'x'.*expects int_value"):
        decode_payload(p.SerializeToString())


def test_payload_fields_round_trip() -> None:
    p = Payload(metrics=[], timestamp=5, seq=255, uuid="u", body=b"b")
    assert decode_payload(encode_payload(p)) == p


def test_topics() -> None:
    assert node_topic("g", MessageType.NBIRTH, "e") == "spBv1.0/g/NBIRTH/e"
    assert device_topic("g", MessageType.DDATA, "e", "d") == "spBv1.0/g/DDATA/e/d"
    assert state_topic("scada") == "spBv1.0/STATE/scada"
    assert parse_topic("spBv1.0/g/DCMD/e/d") == Topic(MessageType.DCMD, "g", "e", "d")
    assert parse_topic("spBv1.0/STATE/h") == Topic(MessageType.STATE, host_id="h")
    assert str(parse_topic("spBv1.0/g/NCMD/e")) == "spBv1.0/g/NCMD/e"
    for bad in ("spAv1.0/g/NBIRTH/e", "spBv1.0/g/NBIRTH/e/d", "spBv1.0/g/DDATA/e",
                "spBv1.0/g/XDATA/e", "spBv1.0/g/DDATA/e/d/x", "spBv1.0//NBIRTH/e"):
        with pytest.raises(TopicError):
            parse_topic(bad)
    with pytest.raises(TopicError):
        node_topic("g", MessageType.DDATA, "e")
    with pytest.raises(TopicError):
        state_topic("a/b")


# -- every field of a metric, every array type -------------------------------------------------------
def test_every_metric_field_round_trips() -> None:
    md = MetaData(is_multi_part=True, content_type="text/csv", size=1234, seq=2, file_name="a.csv",
                  file_type="csv", md5="0f343b0931126a20f133d67c2b018a3b", description="export")
    m = Metric("m", DataType.Int32, 7, alias=42, timestamp=1_700_000_000_123, is_historical=True,
               is_transient=True, properties=quality_properties(Quality.STALE), metadata=md)
    data = encode_payload(Payload(metrics=[m]))
    assert decode_payload(data).metrics == [m]
    pm = pb.Payload.FromString(data).metrics[0]
    assert (pm.alias, pm.timestamp, pm.is_historical, pm.is_transient) == (42, 1_700_000_000_123, True, True)
    assert pm.metadata.md5 == md.md5 and pm.metadata.size == 1234 and pm.metadata.is_multi_part


def test_unset_metric_fields_stay_unset_on_the_wire_and_decode_as_none() -> None:
    data = encode_payload(Payload(metrics=[Metric("m", DataType.Int32, 7)]))
    pm = pb.Payload.FromString(data).metrics[0]
    for f in ("alias", "timestamp", "is_historical", "is_transient", "metadata", "properties", "is_null"):
        assert not pm.HasField(f), f
    got = decode_payload(data).metrics[0]
    assert (got.alias, got.timestamp, got.properties, got.metadata) == (None, None, None, None)
    assert got.is_historical is False and got.is_transient is False
    # zero is a value, not an absence
    m0 = Metric("m", DataType.Int32, 0, alias=0, timestamp=0)
    got0 = decode_payload(encode_payload(Payload(metrics=[m0]))).metrics[0]
    assert (got0.alias, got0.timestamp, got0.value) == (0, 0, 0)
    md = MetaData(size=0, is_multi_part=False)
    got_md = decode_payload(encode_payload(Payload(metrics=[Metric("m", DataType.Int8, 1, metadata=md)])))
    assert got_md.metrics[0].metadata == md


def test_missing_payload_timestamp_and_seq_decode_as_none_not_zero() -> None:
    empty = decode_payload(b"")
    assert (empty.timestamp, empty.seq, empty.uuid, empty.body, empty.metrics) == (None, None, None, None, [])
    zero = decode_payload(encode_payload(Payload(timestamp=0, seq=0, uuid="", body=b"")))
    assert (zero.timestamp, zero.seq, zero.uuid, zero.body) == (0, 0, "", b"")
    wire = pb.Payload.FromString(encode_payload(Payload(timestamp=9)))
    assert wire.HasField("timestamp") and not wire.HasField("seq") and not wire.HasField("uuid")


def test_a_metric_known_only_by_alias() -> None:
    m = Metric(None, DataType.Float, 2.5, alias=3)
    data = encode_payload(Payload(metrics=[m]))
    assert not pb.Payload.FromString(data).metrics[0].HasField("name")
    assert decode_payload(data).metrics == [m]
    with pytest.raises(PayloadError, match="metric alias 3"):
        encode_payload(Payload(metrics=[Metric(None, DataType.Int8, 300, alias=3)]))
    p = pb.Payload()
    pm = p.metrics.add()
    pm.alias, pm.datatype, pm.string_value = 9, DataType.Int8, "x"
    with pytest.raises(PayloadError, match="metric #0 alias 9"):
        decode_payload(p.SerializeToString())


def test_a_metric_without_datatype() -> None:
    data = encode_payload(Payload(metrics=[Metric("cmd", None, None)]))
    pm = pb.Payload.FromString(data).metrics[0]
    assert pm.is_null and not pm.HasField("datatype")
    assert decode_payload(data).metrics[0] == Metric("cmd", None, None)
    with pytest.raises(PayloadError, match=r"'cmd'.*needs a datatype"):
        encode_payload(Payload(metrics=[Metric("cmd", None, 5)]))


def test_raw_values_of_metrics_without_a_known_type() -> None:
    p = pb.Payload()
    for name, field_name, value in (("i", "int_value", 7), ("l", "long_value", 2**40), ("f", "float_value", 0.5),
                                    ("d", "double_value", 0.25), ("b", "boolean_value", True),
                                    ("s", "string_value", "x"), ("y", "bytes_value", b"\x01")):
        pm = p.metrics.add()
        pm.name = name
        setattr(pm, field_name, value)
    p.metrics.add().name = "none"
    nul = p.metrics.add()
    nul.name, nul.is_null = "null", True
    got = {m.name: m.value for m in decode_payload(p.SerializeToString()).metrics}
    assert got == {"i": 7, "l": 2**40, "f": 0.5, "d": 0.25, "b": True, "s": "x", "y": b"\x01",
                   "none": None, "null": None}
    assert type(got["y"]) is bytes


def test_string_and_boolean_arrays_decode_exactly() -> None:
    assert unpack_array(DataType.StringArray, b"ab\x00\x00\xc3\xbc\x00") == ["ab", "", "ü"]
    assert unpack_array(DataType.StringArray, b"") == []
    assert roundtrip(DataType.StringArray, ["ab", "", "ü", "x y"]) == ["ab", "", "ü", "x y"]
    with pytest.raises(PayloadError, match="does not end with NUL"):
        unpack_array(DataType.StringArray, b"ab")
    with pytest.raises(PayloadError, match="without NUL"):
        pack_array(DataType.StringArray, ["a\x00b"])
    with pytest.raises(PayloadError, match="without NUL"):
        pack_array(DataType.StringArray, [1])
    mixed = [True, False, False, True, True, False, True, False, False, True]
    packed = pack_array(DataType.BooleanArray, mixed)
    assert packed == b"\x0a\x00\x00\x00" + bytes([0b10011010, 0b01000000])
    assert unpack_array(DataType.BooleanArray, packed) == mixed
    assert roundtrip(DataType.BooleanArray, mixed) == mixed
    assert unpack_array(DataType.BooleanArray, b"\x08\x00\x00\x00\x81") == [True] + [False] * 6 + [True]
    assert pack_array(DataType.BooleanArray, []) == b"\x00\x00\x00\x00"
    assert unpack_array(DataType.BooleanArray, b"\x00\x00\x00\x00") == []      # just the count
    # bit 0 of a byte is the 8th value, never the 1st
    assert unpack_array(DataType.BooleanArray, b"\x01\x00\x00\x00\x01") == [False]
    assert unpack_array(DataType.BooleanArray, b"\x08\x00\x00\x00\x01") == [False] * 7 + [True]
    with pytest.raises(PayloadError, match="shorter than its 4-byte count"):
        unpack_array(DataType.BooleanArray, b"\x01\x00\x00")
    with pytest.raises(PayloadError, match="announces 9 values"):
        unpack_array(DataType.BooleanArray, b"\x09\x00\x00\x00\xff")
    assert unpack_array(DataType.BooleanArray, b"\x09\x00\x00\x00\xff\x80") == [True] * 9


@pytest.mark.parametrize("datatype,fmt,values", [
    (DataType.Int8Array, "b", [-128, 0, 127]), (DataType.Int16Array, "h", [-32768, 32767]),
    (DataType.Int32Array, "i", [-(2**31), 2**31 - 1]), (DataType.Int64Array, "q", [-(2**63), 2**63 - 1]),
    (DataType.UInt8Array, "B", [0, 255]), (DataType.UInt16Array, "H", [65535]),
    (DataType.UInt32Array, "I", [2**32 - 1]), (DataType.UInt64Array, "Q", [2**64 - 1, 0]),
    (DataType.FloatArray, "f", [1.5, -2.0]), (DataType.DoubleArray, "d", [0.1]),
    (DataType.DateTimeArray, "q", [1_700_000_000_000])])
def test_numeric_arrays_have_their_exact_layout(datatype, fmt, values) -> None:
    packed = struct.pack(f"<{len(values)}{fmt}", *values)
    assert pack_array(datatype, values) == packed
    assert unpack_array(datatype, packed) == values
    assert roundtrip(datatype, values) == values
    assert one(datatype, values).bytes_value == packed


def test_array_and_bytes_errors() -> None:
    with pytest.raises(PayloadError, match="Int32 is not an array type"):
        pack_array(DataType.Int32, [1])
    with pytest.raises(PayloadError, match="Int32 is not an array type"):
        unpack_array(DataType.Int32, b"")
    with pytest.raises(PayloadError, match=r"'m'.*Bytes needs bytes, got str"):
        encode_payload(Payload(metrics=[Metric("m", DataType.Bytes, "abc")]))
    assert roundtrip(DataType.Bytes, bytearray(b"ab")) == b"ab"
    assert roundtrip(DataType.File, memoryview(b"cd")) == b"cd"
    p = pb.Payload()
    pm = p.metrics.add()
    pm.name, pm.datatype, pm.int_value = "a", DataType.Int8Array, 1
    with pytest.raises(PayloadError, match=r"'a'.*Int8Array expects bytes_value"):
        decode_payload(p.SerializeToString())
    pm.datatype = 99
    with pytest.raises(PayloadError, match="unknown datatype 99"):
        decode_payload(p.SerializeToString())


# -- scalars: placement, sign, acceptance ---------------------------------------------------------
def test_scalars_are_read_from_either_field_and_masked() -> None:
    def decoded(datatype: DataType, field_name: str, raw):
        p = pb.Payload()
        pm = p.metrics.add()
        pm.name, pm.datatype = "x", datatype
        setattr(pm, field_name, raw)
        return decode_payload(p.SerializeToString()).metrics[0].value

    assert decoded(DataType.Int8, "int_value", 0x80) == -128
    assert decoded(DataType.Int8, "int_value", 0x7F) == 127
    assert decoded(DataType.Int16, "long_value", 0xFFFF8000) == -32768
    assert decoded(DataType.Int32, "int_value", 0xFFFFFFFF) == -1
    assert decoded(DataType.UInt32, "int_value", 0xFFFFFFFF) == 2**32 - 1
    assert decoded(DataType.UInt8, "int_value", 0x1FF) == 0xFF
    assert decoded(DataType.UInt16, "long_value", 0x1FFFF) == 0xFFFF
    assert decoded(DataType.Int64, "long_value", 2**63) == -(2**63)
    assert decoded(DataType.UInt64, "long_value", 2**64 - 1) == 2**64 - 1
    assert decoded(DataType.DateTime, "long_value", 2**64 - 1) == 2**64 - 1
    assert decoded(DataType.Float, "double_value", 0.1) == 0.1
    assert decoded(DataType.Double, "float_value", 0.5) == 0.5
    for datatype, field_name, raw, expects in (
            (DataType.UInt16, "string_value", "1", "expects long_value"),
            (DataType.Double, "int_value", 1, "expects a float"),
            (DataType.Boolean, "int_value", 1, "Boolean expects boolean_value"),
            (DataType.String, "int_value", 1, "String expects string_value"),
            (DataType.PropertySet, "int_value", 1, "cannot be carried here")):
        with pytest.raises(PayloadError, match=expects):
            decoded(datatype, field_name, raw)


def test_scalar_values_are_placed_in_their_field() -> None:
    for datatype in (DataType.Int8, DataType.Int16, DataType.Int32, DataType.UInt8, DataType.UInt16):
        assert one(datatype, 1).WhichOneof("value") == "int_value", datatype
    for datatype in (DataType.Int64, DataType.UInt32, DataType.UInt64, DataType.DateTime):
        assert one(datatype, 1).WhichOneof("value") == "long_value", datatype
    assert one(DataType.Float, 1).WhichOneof("value") == "float_value"
    assert one(DataType.Double, 1).WhichOneof("value") == "double_value"
    assert one(DataType.Boolean, True).boolean_value is True
    assert one(DataType.Text, "t").string_value == "t"
    assert one(DataType.UInt16, 2**16 - 1).int_value == 2**16 - 1
    assert one(DataType.Int64, -(2**63)).long_value == 2**63


def test_integral_floats_are_accepted_other_values_refused() -> None:
    assert roundtrip(DataType.Int16, 5.0) == 5
    assert roundtrip(DataType.DateTime, 0) == 0
    for datatype, bad, message in (
            (DataType.Int16, 5.5, "Int16 needs an integer, got 5.5"),
            (DataType.UInt8, True, "UInt8 needs an integer"),
            (DataType.Int32, "1", "Int32 needs an integer"),
            (DataType.DateTime, -1, r"out of range for DateTime \[0, 18446744073709551615\]"),
            (DataType.DateTime, 2**64, "out of range for DateTime"),
            (DataType.Double, True, "Double needs a number"),
            (DataType.String, 1, "String needs a str"),
            (DataType.Boolean, 0, "Boolean needs True or False"),
            (DataType.PropertySet, 1, "PropertySet cannot be carried here")):
        with pytest.raises(PayloadError, match=message):
            encode_payload(Payload(metrics=[Metric("m", datatype, bad)]))
    assert one(DataType.Float, 3).float_value == 3.0


# -- DataSet, Template, PropertySet edges ------------------------------------------------------------
def test_dataset_wire_shape_and_errors() -> None:
    ds = DataSet(["a", "b"], [DataType.Int8, DataType.Boolean], [[-1, None]])
    pm = one(DataType.DataSet, ds)
    assert pm.dataset_value.num_of_columns == 2
    assert list(pm.dataset_value.types) == [DataType.Int8, DataType.Boolean]
    assert pm.dataset_value.rows[0].elements[0].int_value == 0xFFFFFFFF
    assert pm.dataset_value.rows[0].elements[1].WhichOneof("value") is None
    assert roundtrip(DataType.DataSet, DataSet(["a"], [DataType.Int8])) == DataSet(["a"], [DataType.Int8], [])
    with pytest.raises(PayloadError, match="DataSet has 2 columns, 1 types"):
        encode_payload(Payload(metrics=[Metric("d", DataType.DataSet, DataSet(["a", "b"], [DataType.Int8]))]))
    with pytest.raises(PayloadError, match="DataSet needs a DataSet, got list"):
        encode_payload(Payload(metrics=[Metric("d", DataType.DataSet, [[1]])]))
    with pytest.raises(PayloadError, match="row 0 column 'a'"):
        encode_payload(Payload(metrics=[Metric("d", DataType.DataSet, DataSet(["a"], [DataType.Int8], [["x"]]))]))
    p = pb.Payload()
    m = p.metrics.add()
    m.name, m.datatype = "d", DataType.DataSet
    m.dataset_value.types.append(DataType.Int8)
    row = m.dataset_value.rows.add()
    row.elements.add().int_value = 1
    row.elements.add().int_value = 2
    with pytest.raises(PayloadError, match="row 0 has more values than types"):
        decode_payload(p.SerializeToString())


def test_template_definition_and_null_parameters() -> None:
    tpl = Template(metrics=[Metric("speed", DataType.Float, None)],
                   parameters=[Parameter("unit", DataType.String, None), Parameter("n", DataType.UInt8, 3)],
                   is_definition=True)
    got = roundtrip(DataType.Template, tpl)
    assert got == tpl
    pm = one(DataType.Template, tpl)
    assert not pm.template_value.HasField("version") and not pm.template_value.HasField("template_ref")
    assert pm.template_value.parameters[0].type == DataType.String
    assert pm.template_value.parameters[0].WhichOneof("value") is None
    with pytest.raises(PayloadError, match="Template needs a Template, got dict"):
        encode_payload(Payload(metrics=[Metric("t", DataType.Template, {})]))
    with pytest.raises(PayloadError, match="'t'/inner"):
        encode_payload(Payload(metrics=[Metric("t", DataType.Template,
                                               Template(metrics=[Metric("inner", DataType.Int8, 999)]))]))
    with pytest.raises(PayloadError, match="parameter 'p'"):
        encode_payload(Payload(metrics=[Metric("t", DataType.Template,
                                               Template(parameters=[Parameter("p", DataType.Int8, 999)]))]))


def test_property_set_wire_shape_and_errors() -> None:
    props = {"a": PropertyValue(DataType.Int16, -4), "b": PropertyValue(DataType.String, None)}
    pm = one(DataType.Int8, 1)
    p = pb.Payload()
    p.ParseFromString(encode_payload(Payload(metrics=[Metric("m", DataType.Int8, 1, properties=props)])))
    ps = p.metrics[0].properties
    assert list(ps.keys) == ["a", "b"]
    assert ps.values[0].type == DataType.Int16 and ps.values[0].int_value == 0xFFFFFFFC
    assert ps.values[1].is_null
    assert not pm.HasField("properties")
    with pytest.raises(PayloadError, match="property 'a'"):
        encode_payload(Payload(metrics=[Metric("m", DataType.Int8, 1,
                                               properties={"a": PropertyValue(DataType.Int8, 999)})]))
    bad = pb.Payload()
    bm = bad.metrics.add()
    bm.name, bm.datatype, bm.int_value = "m", DataType.Int8, 1
    bm.properties.keys.extend(["a", "b"])
    bm.properties.values.add().type = DataType.Int8
    with pytest.raises(PayloadError, match="PropertySet has 2 keys, 1 values"):
        decode_payload(bad.SerializeToString())


def test_quality_of_unknown_and_null_codes() -> None:
    assert Metric("m", DataType.Int8, 1, properties={"Quality": PropertyValue(DataType.Int32, 77)}).quality \
        is Quality.BAD
    assert Metric("m", DataType.Int8, 1, properties={"Quality": PropertyValue(DataType.Int32, None)}).quality \
        is Quality.GOOD
    assert Metric("m", DataType.Int8, 1, properties={"other": PropertyValue(DataType.Int32, 0)}).quality \
        is Quality.GOOD
    assert quality_properties(Quality.GOOD) == {"Quality": PropertyValue(DataType.Int32, 192)}
