"""Sparkplug B payload codec: Python values <-> the protobuf bytes every Sparkplug host reads.

Pure: no I/O. Value placement follows the Sparkplug 3.0.0 specification and Eclipse Tahu's
Java and JavaScript implementations, which is what hosts actually decode:

- Int8/Int16/Int32 go in `int_value` sign-extended to 32 bits (-1 is 0xFFFFFFFF), as Tahu
  writes them from a Java int and reads them back with a 32-bit signed view. On decode we
  also accept values that were not sign-extended (0xFF for an Int8 -1).
- UInt8/UInt16 in `int_value`; UInt32, UInt64, Int64 and DateTime in `long_value` (Tahu
  puts UInt32 there; we read it from either field). Negative Int64 is two's complement.
- Arrays are packed little-endian in `bytes_value`; BooleanArray is a 4-byte little-endian
  count followed by bits, most significant bit first; StringArray is NUL-terminated UTF-8.
- A value of None is sent as `is_null = true`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from drivers.base import Quality
from gateway.sparkplug import sparkplug_b_pb2 as pb
from gateway.sparkplug.errors import PayloadError

PbPayload = pb.Payload
PbMetric = pb.Payload.Metric


class DataType(enum.IntEnum):
    Unknown = 0
    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14
    UUID = 15
    DataSet = 16
    Bytes = 17
    File = 18
    Template = 19
    PropertySet = 20
    PropertySetList = 21
    Int8Array = 22
    Int16Array = 23
    Int32Array = 24
    Int64Array = 25
    UInt8Array = 26
    UInt16Array = 27
    UInt32Array = 28
    UInt64Array = 29
    FloatArray = 30
    DoubleArray = 31
    BooleanArray = 32
    StringArray = 33
    DateTimeArray = 34


# Driver point types (drivers.base.DATATYPES) -> Sparkplug datatypes.
DRIVER_DATATYPES: dict[str, DataType] = {
    "bool": DataType.Boolean,
    "int8": DataType.Int8,
    "int16": DataType.Int16,
    "int32": DataType.Int32,
    "int64": DataType.Int64,
    "uint8": DataType.UInt8,
    "uint16": DataType.UInt16,
    "uint32": DataType.UInt32,
    "uint64": DataType.UInt64,
    "float32": DataType.Float,
    "float64": DataType.Double,
    "string": DataType.String,
}


def driver_datatype(name: str) -> DataType:
    try:
        return DRIVER_DATATYPES[name]
    except KeyError:
        raise PayloadError(
            f"driver datatype {name!r} has no Sparkplug datatype; expected one of "
            f"{', '.join(DRIVER_DATATYPES)}"
        ) from None


# The Quality property (spec 6.4.6, "Quality"): Int32 0 bad, 192 good, 500 stale.
QUALITY_PROPERTY = "Quality"
QUALITY_CODES: dict[Quality, int] = {Quality.BAD: 0, Quality.GOOD: 192, Quality.STALE: 500}
QUALITY_BY_CODE: dict[int, Quality] = {v: k for k, v in QUALITY_CODES.items()}


# ----------------------------------------------------------------------------------------
# Plain Python model of a payload


@dataclass(slots=True)
class PropertyValue:
    type: DataType
    value: Any = None          # None = is_null; dict[str, PropertyValue] / list[dict] for sets


@dataclass(slots=True)
class MetaData:
    is_multi_part: bool | None = None
    content_type: str | None = None
    size: int | None = None
    seq: int | None = None
    file_name: str | None = None
    file_type: str | None = None
    md5: str | None = None
    description: str | None = None


@dataclass(slots=True)
class DataSet:
    columns: list[str]
    types: list[DataType]
    rows: list[list[Any]] = field(default_factory=list)


@dataclass(slots=True)
class Parameter:
    name: str
    type: DataType
    value: Any = None


@dataclass(slots=True)
class Template:
    metrics: list[Metric] = field(default_factory=list)
    parameters: list[Parameter] = field(default_factory=list)
    version: str | None = None
    template_ref: str | None = None      # the definition's name, in instances only
    is_definition: bool = False


@dataclass(slots=True)
class Metric:
    name: str | None = None
    datatype: DataType | None = None   # None: DATA/CMD metric whose type comes from the birth
    value: Any = None                  # None = is_null
    alias: int | None = None
    timestamp: int | None = None       # UTC ms
    is_historical: bool = False
    is_transient: bool = False
    properties: dict[str, PropertyValue] | None = None
    metadata: MetaData | None = None

    @property
    def quality(self) -> Quality:
        """The Quality property, GOOD when absent (the spec's default)."""
        prop = (self.properties or {}).get(QUALITY_PROPERTY)
        if prop is None or prop.value is None:
            return Quality.GOOD
        return QUALITY_BY_CODE.get(int(prop.value), Quality.BAD)


@dataclass(slots=True)
class Payload:
    metrics: list[Metric] = field(default_factory=list)
    timestamp: int | None = None
    seq: int | None = None
    uuid: str | None = None
    body: bytes | None = None


def quality_properties(quality: Quality) -> dict[str, PropertyValue]:
    return {QUALITY_PROPERTY: PropertyValue(DataType.Int32, QUALITY_CODES[quality])}


# ----------------------------------------------------------------------------------------
# Scalars


_INT_BITS = {DataType.Int8: 8, DataType.Int16: 16, DataType.Int32: 32, DataType.Int64: 64}
_UINT_BITS = {DataType.UInt8: 8, DataType.UInt16: 16, DataType.UInt32: 32, DataType.UInt64: 64}
_INT_VALUE_TYPES = frozenset(
    {DataType.Int8, DataType.Int16, DataType.Int32, DataType.UInt8, DataType.UInt16}
)
_LONG_VALUE_TYPES = frozenset(
    {DataType.Int64, DataType.UInt32, DataType.UInt64, DataType.DateTime}
)
_STRING_TYPES = frozenset({DataType.String, DataType.Text, DataType.UUID})

_ARRAY_FORMATS: dict[DataType, str] = {
    DataType.Int8Array: "b",
    DataType.Int16Array: "h",
    DataType.Int32Array: "i",
    DataType.Int64Array: "q",
    DataType.UInt8Array: "B",
    DataType.UInt16Array: "H",
    DataType.UInt32Array: "I",
    DataType.UInt64Array: "Q",
    DataType.FloatArray: "f",
    DataType.DoubleArray: "d",
    DataType.DateTimeArray: "q",
}
ARRAY_TYPES = frozenset(_ARRAY_FORMATS) | {DataType.BooleanArray, DataType.StringArray}


def _check_int(value: Any, datatype: DataType, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise PayloadError(f"{where}: {datatype.name} needs an integer, got {value!r}")
    if datatype in _INT_BITS:
        bits = _INT_BITS[datatype]
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    elif datatype in _UINT_BITS:
        lo, hi = 0, (1 << _UINT_BITS[datatype]) - 1
    else:  # DateTime: ms since the epoch, unsigned on the wire
        lo, hi = 0, (1 << 64) - 1
    if not lo <= value <= hi:
        raise PayloadError(f"{where}: {value} is out of range for {datatype.name} [{lo}, {hi}]")
    return value


def _signed(raw: int, bits: int) -> int:
    raw &= (1 << bits) - 1
    return raw - (1 << bits) if raw >> (bits - 1) else raw


def _set_scalar(msg: Any, datatype: DataType, value: Any, where: str) -> None:
    """Set the oneof value of a Metric, PropertyValue, Parameter or DataSetValue."""
    if datatype in _INT_VALUE_TYPES:
        msg.int_value = _check_int(value, datatype, where) & 0xFFFFFFFF
    elif datatype in _LONG_VALUE_TYPES:
        msg.long_value = _check_int(value, datatype, where) & 0xFFFFFFFFFFFFFFFF
    elif datatype is DataType.Float:
        msg.float_value = _check_float(value, datatype, where)
    elif datatype is DataType.Double:
        msg.double_value = _check_float(value, datatype, where)
    elif datatype is DataType.Boolean:
        if not isinstance(value, bool):
            raise PayloadError(f"{where}: Boolean needs True or False, got {value!r}")
        msg.boolean_value = value
    elif datatype in _STRING_TYPES:
        if not isinstance(value, str):
            raise PayloadError(f"{where}: {datatype.name} needs a str, got {value!r}")
        msg.string_value = value
    else:
        raise PayloadError(f"{where}: datatype {datatype.name} cannot be carried here")


def _check_float(value: Any, datatype: DataType, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PayloadError(f"{where}: {datatype.name} needs a number, got {value!r}")
    return float(value)


def _get_scalar(msg: Any, datatype: DataType, where: str) -> Any:
    kind = msg.WhichOneof("value")
    if datatype in _INT_BITS and datatype is not DataType.Int64:
        if kind not in ("int_value", "long_value"):
            raise PayloadError(f"{where}: {datatype.name} expects int_value, found {kind}")
        return _signed(getattr(msg, kind), _INT_BITS[datatype])
    if datatype in _UINT_BITS or datatype in (DataType.Int64, DataType.DateTime):
        if kind not in ("int_value", "long_value"):
            raise PayloadError(f"{where}: {datatype.name} expects long_value, found {kind}")
        raw = getattr(msg, kind)
        if datatype is DataType.Int64:
            return _signed(raw, 64)
        bits = _UINT_BITS.get(datatype, 64)
        return raw & ((1 << bits) - 1)
    if datatype in (DataType.Float, DataType.Double):
        if kind not in ("float_value", "double_value"):
            raise PayloadError(f"{where}: {datatype.name} expects a float, found {kind}")
        return getattr(msg, kind)
    if datatype is DataType.Boolean:
        if kind != "boolean_value":
            raise PayloadError(f"{where}: Boolean expects boolean_value, found {kind}")
        return msg.boolean_value
    if datatype in _STRING_TYPES:
        if kind != "string_value":
            raise PayloadError(f"{where}: {datatype.name} expects string_value, found {kind}")
        return msg.string_value
    raise PayloadError(f"{where}: datatype {int(datatype)} cannot be carried here")


# ----------------------------------------------------------------------------------------
# Arrays


def pack_array(datatype: DataType, values: list[Any], where: str = "array") -> bytes:
    if datatype is DataType.BooleanArray:
        out = bytearray(struct.pack("<I", len(values)))
        for i in range(0, len(values), 8):
            byte = 0
            for bit, v in enumerate(values[i : i + 8]):
                if v:
                    byte |= 0x80 >> bit
            out.append(byte)
        return bytes(out)
    if datatype is DataType.StringArray:
        parts = []
        for v in values:
            if not isinstance(v, str) or "\x00" in v:
                raise PayloadError(f"{where}: StringArray needs strs without NUL, got {v!r}")
            parts.append(v.encode("utf-8") + b"\x00")
        return b"".join(parts)
    fmt = _ARRAY_FORMATS.get(datatype)
    if fmt is None:
        raise PayloadError(f"{where}: {datatype.name} is not an array type")
    try:
        return struct.pack(f"<{len(values)}{fmt}", *values)
    except struct.error as exc:
        raise PayloadError(f"{where}: cannot pack {datatype.name}: {exc}") from None


def unpack_array(datatype: DataType, data: bytes, where: str = "array") -> list[Any]:
    if datatype is DataType.BooleanArray:
        if len(data) < 4:
            raise PayloadError(f"{where}: BooleanArray shorter than its 4-byte count")
        (count,) = struct.unpack_from("<I", data)
        if len(data) - 4 < (count + 7) // 8:
            raise PayloadError(f"{where}: BooleanArray announces {count} values, has fewer")
        return [bool(data[4 + i // 8] & (0x80 >> (i % 8))) for i in range(count)]
    if datatype is DataType.StringArray:
        if not data:
            return []
        if not data.endswith(b"\x00"):
            raise PayloadError(f"{where}: StringArray does not end with NUL")
        return [s.decode("utf-8", errors="replace") for s in data[:-1].split(b"\x00")]
    fmt = _ARRAY_FORMATS.get(datatype)
    if fmt is None:
        raise PayloadError(f"{where}: {datatype.name} is not an array type")
    size = struct.calcsize(fmt)
    if len(data) % size:
        raise PayloadError(f"{where}: {len(data)} bytes is not a whole number of {datatype.name}")
    return list(struct.unpack(f"<{len(data) // size}{fmt}", data))


# ----------------------------------------------------------------------------------------
# Metric values


def set_metric_value(m: Any, datatype: DataType, value: Any, where: str) -> None:
    """Fill a protobuf Metric (or template metric) with `value` of `datatype`."""
    if value is None:
        m.is_null = True
        return
    if datatype in ARRAY_TYPES:
        m.bytes_value = pack_array(datatype, list(value), where)
    elif datatype in (DataType.Bytes, DataType.File):
        if not isinstance(value, bytes | bytearray | memoryview):
            raise PayloadError(f"{where}: {datatype.name} needs bytes, got {type(value).__name__}")
        m.bytes_value = bytes(value)
    elif datatype is DataType.DataSet:
        _encode_dataset(m.dataset_value, value, where)
    elif datatype is DataType.Template:
        _encode_template(m.template_value, value, where)
    else:
        _set_scalar(m, datatype, value, where)


def get_metric_value(m: Any, datatype: DataType, where: str) -> Any:
    if m.is_null:
        return None
    if datatype in ARRAY_TYPES or datatype in (DataType.Bytes, DataType.File):
        if m.WhichOneof("value") != "bytes_value":
            raise PayloadError(f"{where}: {datatype.name} expects bytes_value")
        if datatype in ARRAY_TYPES:
            return unpack_array(datatype, m.bytes_value, where)
        return bytes(m.bytes_value)
    if datatype is DataType.DataSet:
        return _decode_dataset(m.dataset_value, where)
    if datatype is DataType.Template:
        return _decode_template(m.template_value, where)
    return _get_scalar(m, datatype, where)


def raw_metric_value(m: Any) -> Any:
    """The value as carried, for a metric whose datatype is unknown (no birth seen)."""
    if m.is_null:
        return None
    kind = m.WhichOneof("value")
    if kind is None or kind == "extension_value":
        return None
    value = getattr(m, kind)
    return bytes(value) if kind == "bytes_value" else value


# ----------------------------------------------------------------------------------------
# DataSet, Template, PropertySet


def _encode_dataset(msg: Any, ds: DataSet, where: str) -> None:
    if not isinstance(ds, DataSet):
        raise PayloadError(f"{where}: DataSet needs a DataSet, got {type(ds).__name__}")
    if len(ds.columns) != len(ds.types):
        raise PayloadError(f"{where}: DataSet has {len(ds.columns)} columns, {len(ds.types)} types")
    msg.num_of_columns = len(ds.columns)
    msg.columns.extend(ds.columns)
    msg.types.extend(int(t) for t in ds.types)
    for r, row in enumerate(ds.rows):
        if len(row) != len(ds.columns):
            raise PayloadError(f"{where}: DataSet row {r} has {len(row)} values, not {len(ds.columns)}")
        prow = msg.rows.add()
        for c, (t, v) in enumerate(zip(ds.types, row, strict=True)):
            elem = prow.elements.add()
            if v is not None:  # a null element is an element with no value set
                _set_scalar(elem, DataType(t), v, f"{where} row {r} column {ds.columns[c]!r}")


def _decode_dataset(msg: Any, where: str) -> DataSet:
    types = [DataType(t) for t in msg.types]
    rows = []
    for r, prow in enumerate(msg.rows):
        row = []
        for c, elem in enumerate(prow.elements):
            if c >= len(types):
                raise PayloadError(f"{where}: DataSet row {r} has more values than types")
            if elem.WhichOneof("value") is None:
                row.append(None)
            else:
                row.append(_get_scalar(elem, types[c], f"{where} row {r} column {c}"))
        rows.append(row)
    return DataSet(columns=list(msg.columns), types=types, rows=rows)


def _encode_template(msg: Any, t: Template, where: str) -> None:
    if not isinstance(t, Template):
        raise PayloadError(f"{where}: Template needs a Template, got {type(t).__name__}")
    if t.version is not None:
        msg.version = t.version
    if t.template_ref is not None:
        msg.template_ref = t.template_ref
    msg.is_definition = t.is_definition
    for m in t.metrics:
        _encode_metric(msg.metrics.add(), m, f"{where}/{m.name}")
    for p in t.parameters:
        pp = msg.parameters.add()
        pp.name = p.name
        pp.type = int(p.type)
        if p.value is not None:
            _set_scalar(pp, p.type, p.value, f"{where} parameter {p.name!r}")


def _decode_template(msg: Any, where: str) -> Template:
    params = []
    for pp in msg.parameters:
        t = DataType(pp.type)
        value = None
        if pp.WhichOneof("value") is not None:
            value = _get_scalar(pp, t, f"{where} parameter {pp.name!r}")
        params.append(Parameter(pp.name, t, value))
    return Template(
        metrics=[_decode_metric(m, None, f"{where}/{m.name}") for m in msg.metrics],
        parameters=params,
        version=msg.version if msg.HasField("version") else None,
        template_ref=msg.template_ref if msg.HasField("template_ref") else None,
        is_definition=msg.is_definition,
    )


def _encode_propertyset(msg: Any, props: Mapping[str, PropertyValue], where: str) -> None:
    for key, pv in props.items():
        msg.keys.append(key)
        pval = msg.values.add()
        pval.type = int(pv.type)
        w = f"{where} property {key!r}"
        if pv.value is None:
            pval.is_null = True
        elif pv.type is DataType.PropertySet:
            _encode_propertyset(pval.propertyset_value, pv.value, w)
        elif pv.type is DataType.PropertySetList:
            for ps in pv.value:
                _encode_propertyset(pval.propertysets_value.propertyset.add(), ps, w)
        else:
            _set_scalar(pval, pv.type, pv.value, w)


def _decode_propertyset(msg: Any, where: str) -> dict[str, PropertyValue]:
    if len(msg.keys) != len(msg.values):
        raise PayloadError(f"{where}: PropertySet has {len(msg.keys)} keys, {len(msg.values)} values")
    out: dict[str, PropertyValue] = {}
    for key, pval in zip(msg.keys, msg.values, strict=True):
        w = f"{where} property {key!r}"
        try:
            t = DataType(pval.type)
        except ValueError:
            raise PayloadError(f"{w}: unknown datatype {pval.type}") from None
        if pval.is_null:
            value: Any = None
        elif t is DataType.PropertySet:
            value = _decode_propertyset(pval.propertyset_value, w)
        elif t is DataType.PropertySetList:
            value = [_decode_propertyset(ps, w) for ps in pval.propertysets_value.propertyset]
        else:
            value = _get_scalar(pval, t, w)
        out[key] = PropertyValue(t, value)
    return out


# ----------------------------------------------------------------------------------------
# Metrics and payloads


def _encode_metric(pm: Any, m: Metric, where: str) -> None:
    if m.name is not None:
        pm.name = m.name
    if m.alias is not None:
        pm.alias = m.alias
    if m.timestamp is not None:
        pm.timestamp = m.timestamp
    if m.datatype is not None:
        pm.datatype = int(m.datatype)
    if m.is_historical:
        pm.is_historical = True
    if m.is_transient:
        pm.is_transient = True
    if m.metadata is not None:
        md = m.metadata
        for f in MetaData.__slots__:
            v = getattr(md, f)
            if v is not None:
                setattr(pm.metadata, f, v)
    if m.properties:
        _encode_propertyset(pm.properties, m.properties, where)
    if m.datatype is None:
        if m.value is None:
            pm.is_null = True
            return
        raise PayloadError(f"{where}: a metric with a value needs a datatype to be encoded")
    set_metric_value(pm, m.datatype, m.value, where)


def _metric_label(m: Metric) -> str:
    return f"metric {m.name!r}" if m.name is not None else f"metric alias {m.alias}"


def encode_payload(payload: Payload) -> bytes:
    """Serialize; raises PayloadError naming the metric when a value does not fit its type."""
    p = PbPayload()
    if payload.timestamp is not None:
        p.timestamp = payload.timestamp
    if payload.seq is not None:
        p.seq = payload.seq
    if payload.uuid is not None:
        p.uuid = payload.uuid
    if payload.body is not None:
        p.body = payload.body
    for m in payload.metrics:
        _encode_metric(p.metrics.add(), m, _metric_label(m))
    return p.SerializeToString()


DatatypeLookup = Callable[[str | None, int | None], DataType | None]


def _decode_metric(pm: Any, lookup: DatatypeLookup | None, where: str) -> Metric:
    name = pm.name if pm.HasField("name") else None
    alias = pm.alias if pm.HasField("alias") else None
    datatype: DataType | None = None
    if pm.HasField("datatype"):
        try:
            datatype = DataType(pm.datatype)
        except ValueError:
            raise PayloadError(f"{where}: unknown datatype {pm.datatype}") from None
    elif lookup is not None:
        datatype = lookup(name, alias)
    if datatype is not None:
        value = get_metric_value(pm, datatype, where)
    else:
        value = raw_metric_value(pm)
    md = None
    if pm.HasField("metadata"):
        md = MetaData(**{
            f: getattr(pm.metadata, f) for f in MetaData.__slots__ if pm.metadata.HasField(f)
        })
    return Metric(
        name=name,
        datatype=datatype,
        value=value,
        alias=alias,
        timestamp=pm.timestamp if pm.HasField("timestamp") else None,
        is_historical=pm.is_historical,
        is_transient=pm.is_transient,
        properties=_decode_propertyset(pm.properties, where) if pm.HasField("properties") else None,
        metadata=md,
    )


def decode_payload_each(data: bytes, datatype_of: DatatypeLookup | None = None
                        ) -> tuple[Payload, list[PayloadError]]:
    """As decode_payload, but a metric that cannot be decoded is left out and its error
    returned, so that one bad metric of a command never takes the others with it."""
    p = PbPayload()
    try:
        p.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise PayloadError(f"not a Sparkplug B payload ({len(data)} bytes): {exc}") from None
    metrics, errors = [], []
    for i, pm in enumerate(p.metrics):
        where = f"metric {pm.name!r}" if pm.HasField("name") else f"metric #{i} alias {pm.alias}"
        try:
            metrics.append(_decode_metric(pm, datatype_of, where))
        except PayloadError as exc:
            errors.append(exc)
        except (ValueError, TypeError, OverflowError) as exc:  # whatever a hostile metric holds
            errors.append(PayloadError(f"{where}: {type(exc).__name__}: {exc}"))
    return Payload(
        metrics=metrics,
        timestamp=p.timestamp if p.HasField("timestamp") else None,
        seq=p.seq if p.HasField("seq") else None,
        uuid=p.uuid if p.HasField("uuid") else None,
        body=bytes(p.body) if p.HasField("body") else None,
    ), errors


def decode_payload(data: bytes, datatype_of: DatatypeLookup | None = None) -> Payload:
    """Parse bytes; `datatype_of(name, alias)` supplies types that DATA/CMD metrics omit.

    Raises PayloadError for bytes that are not a Sparkplug B payload or values that do not
    match their datatype.
    """
    p = PbPayload()
    try:
        p.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise PayloadError(f"not a Sparkplug B payload ({len(data)} bytes): {exc}") from None
    metrics = []
    for i, pm in enumerate(p.metrics):
        where = f"metric {pm.name!r}" if pm.HasField("name") else f"metric #{i} alias {pm.alias}"
        metrics.append(_decode_metric(pm, datatype_of, where))
    return Payload(
        metrics=metrics,
        timestamp=p.timestamp if p.HasField("timestamp") else None,
        seq=p.seq if p.HasField("seq") else None,
        uuid=p.uuid if p.HasField("uuid") else None,
        body=bytes(p.body) if p.HasField("body") else None,
    )
