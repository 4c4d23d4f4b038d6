"""Turn one buffered record into the Kafka message a mapping asks for (pure, no I/O).

Formats (`[[kafka.mappings]] format`):
- `sparkplug`: the Sparkplug B protobuf bytes exactly as buffered (no `seq`, no aliases:
  Kafka consumers never see births, so names stay in the payload);
- `json`: the Sparkplug payload decoded to UTF-8 JSON with metric names, Sparkplug
  datatype names, UTC ms timestamps, quality and the historical flag;
- `raw`: the buffered bytes untouched (bridged payloads of other MQTT clients).

Key (`key`): `device` = the record's stream (Sparkplug device path
"group/edge/device", or the MQTT topic for bridged records), `topic` = the source MQTT
topic. Every message carries headers so that a consumer can de-duplicate after a resend:
`outpost-gateway`, `outpost-stream`, `outpost-seq` (buffer seq, gateway-wide monotonic),
plus `outpost-topic` (source MQTT topic) and `outpost-type` (DDATA, NDATA, bridged...).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any, NamedTuple, Protocol

from gateway.errors import UplinkError
from gateway.records import H_TOPIC as R_TOPIC
from gateway.records import H_TYPE as R_TYPE
from gateway.records import NO_FIX, SPARKPLUG_DATA_TYPES, ClockFix
from gateway.sparkplug.edge import correct_timestamps
from gateway.sparkplug.errors import PayloadError
from gateway.uplinks.kafka.mappings import Mapping

H_GATEWAY = "outpost-gateway"
H_STREAM = "outpost-stream"
H_SEQ = "outpost-seq"
H_TOPIC = "outpost-topic"
H_TYPE = "outpost-type"
H_CLOCK = "outpost-clock"  # "corrected" or "unsynced"; absent for a trusted clock


class KafkaFormatError(UplinkError):
    """A record cannot be put in the mapping's format (e.g. `json` of a non-Sparkplug payload).

    Not retriable: the same bytes will fail again, so the uplink counts and skips the record.
    """

    retriable = False


class RecordLike(Protocol):
    seq: int
    stream: str
    ts_ms: int
    headers: dict[str, str]
    payload: bytes


class KafkaMessage(NamedTuple):
    # A NamedTuple rather than a frozen dataclass: one is made per record and message, and
    # a tuple is several times cheaper to create.
    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    timestamp_ms: int


def format_record(record: RecordLike, mapping: Mapping, gateway_id: str,
                  fix: ClockFix = NO_FIX) -> KafkaMessage:
    """The Kafka message for `record` under `mapping`; raises KafkaFormatError.

    `fix` is the clock rule's answer for this record (gateway.records.clock_fix): its
    timestamps are corrected, or flagged with the `outpost-clock: unsynced` header (and the
    `clock_unsynced` metric property in Sparkplug bytes, `"clock": "unsynced"` in JSON).
    """
    source_topic = record.headers.get(R_TOPIC, record.stream)
    msg_type = record.headers.get(R_TYPE, "")
    key = (record.stream if mapping.key == "device" else source_topic).encode()
    if mapping.format == "json":
        # The JSON document carries the clock word once, not the per-metric property that
        # apply_clock would add only for the decoder to drop: shift timestamps while decoding.
        correction_ms = fix.correction_ms if msg_type in SPARKPLUG_DATA_TYPES else 0
        ts_ms = record.ts_ms + correction_ms
        value = sparkplug_to_json(
            record.payload if type(record.payload) is bytes else bytes(record.payload),
            topic=source_topic,
            msg_type=msg_type,
            gateway_id=gateway_id,
            stream=record.stream,
            seq=record.seq,
            clock=clock_word(fix),
            correction_ms=correction_ms,
        )
    else:
        payload, ts_ms = apply_clock(record, fix)
        value = bytes(payload)
    headers = [
        (H_GATEWAY, gateway_id.encode()),
        (H_STREAM, record.stream.encode()),
        (H_SEQ, str(record.seq).encode()),
        (H_TOPIC, source_topic.encode()),
        (H_TYPE, msg_type.encode()),
    ]
    if fix.changes_anything:
        headers.append((H_CLOCK, clock_word(fix).encode()))
    return KafkaMessage(mapping.kafka_topic, key, value, headers, ts_ms)


def clock_word(fix: ClockFix) -> str:
    """`unsynced`, `corrected` or "" (a trusted clock): the value of the `outpost-clock` header."""
    if fix.unsynced:
        return "unsynced"
    return "corrected" if fix.correction_ms else ""


def apply_clock(record: RecordLike, fix: ClockFix) -> tuple[bytes, int]:
    """(payload, timestamp ms) of `record` with the clock rule applied (Sparkplug data only)."""
    payload = record.payload if type(record.payload) is bytes else bytes(record.payload)
    if not fix.changes_anything or record.headers.get(R_TYPE) not in SPARKPLUG_DATA_TYPES:
        return payload, record.ts_ms
    try:
        payload = correct_timestamps(payload, correction_ms=fix.correction_ms,
                                     clock_unsynced=fix.unsynced)
    except PayloadError as exc:
        raise KafkaFormatError(f"record seq {record.seq}: {exc}") from None
    return payload, record.ts_ms + fix.correction_ms


def estimate_size(msg: KafkaMessage) -> int:
    """Upper bound of one message's bytes inside a Kafka v2 record batch (before compression)."""
    return (
        _RECORD_OVERHEAD + len(msg.key) + len(msg.value)
        + sum(_HEADER_OVERHEAD + len(k) + len(v) for k, v in msg.headers)
    )


_RECORD_OVERHEAD = 21  # length, attributes, timestamp/offset deltas, key/value lengths
_HEADER_OVERHEAD = 10  # varint lengths of a header's key and value


class MessageFactory:
    """`format_record` for a stream of records, with the per-stream parts computed once.

    The uplink formats every buffered record for every matching mapping; key and four of
    the five headers only depend on (mapping, stream, topic, type), so they are cached
    (bounded) and only the seq header, value and timestamp are made per record. Returns
    the same messages as `format_record` (the unit tests compare them).
    """

    __slots__ = ("_cache", "_gateway_id", "_gw_header")

    _CACHE_MAX = 4096

    def __init__(self, gateway_id: str) -> None:
        self._gateway_id = gateway_id
        self._gw_header = (H_GATEWAY, gateway_id.encode())
        self._cache: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}

    def make(self, record: RecordLike, mapping: Mapping,
             fix: ClockFix = NO_FIX) -> tuple[KafkaMessage, int]:
        """The message and its `estimate_size`; raises KafkaFormatError like format_record."""
        if mapping.format == "json" or fix.changes_anything:
            msg = format_record(record, mapping, self._gateway_id, fix)
            return msg, estimate_size(msg)
        headers_in = record.headers
        topic = headers_in.get(R_TOPIC, record.stream)
        msg_type = headers_in.get(R_TYPE, "")
        kafka_topic, key, gw_h, stream_h, topic_h, type_h, fixed = self.parts(
            mapping, record.stream, topic, msg_type
        )
        seq_b = b"%d" % record.seq
        value = record.payload if type(record.payload) is bytes else bytes(record.payload)
        msg = KafkaMessage(
            kafka_topic, key, value, [gw_h, stream_h, (H_SEQ, seq_b), topic_h, type_h],
            record.ts_ms,
        )
        return msg, fixed + len(seq_b) + len(value)

    def parts(
        self, mapping: Mapping, stream: str, topic: str, msg_type: str
    ) -> tuple[str, bytes, tuple[str, bytes], tuple[str, bytes], tuple[str, bytes],
               tuple[str, bytes], int]:
        """What every `sparkplug`/`raw` message of one (mapping, stream, topic, type) shares.

        (kafka topic, key, gateway/stream/topic/type headers, estimate_size without the
        value and the seq header's value). The uplink's batching loop uses these directly,
        so a record costs only its seq header, value and timestamp.
        """
        ck = (mapping.name, stream, topic, msg_type)
        parts = self._cache.get(ck)
        if parts is None:
            if len(self._cache) >= self._CACHE_MAX:
                self._cache.clear()
            key = (stream if mapping.key == "device" else topic).encode()
            stream_h = (H_STREAM, stream.encode())
            topic_h = (H_TOPIC, topic.encode())
            type_h = (H_TYPE, msg_type.encode())
            fixed = (
                _RECORD_OVERHEAD + len(key)
                + sum(_HEADER_OVERHEAD + len(k) + len(v)
                      for k, v in (self._gw_header, stream_h, topic_h, type_h))
                + _HEADER_OVERHEAD + len(H_SEQ)
            )
            parts = self._cache[ck] = (
                mapping.kafka_topic, key, self._gw_header, stream_h, topic_h, type_h, fixed
            )
        return parts


# --- Sparkplug B -> JSON ---------------------------------------------------------------

_FLOAT32_TYPES = {"Float", "FloatArray"}


def shortest_float32(v: float) -> float:
    """The shortest decimal that round-trips the float32 (21.3, not 21.299999237060547)."""
    if not math.isfinite(v):
        return v
    packed = struct.pack("<f", v)
    for digits in range(6, 10):
        short = float(f"{v:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return v


def _jsonable(value: Any, float32: bool = False) -> Any:
    """A decoded Sparkplug value as JSON: bytes as base64, NaN/inf as strings."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return shortest_float32(value) if float32 else value
    if isinstance(value, bytes | bytearray):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, float32) for v in value]
    from gateway.sparkplug.payload import DataSet

    if isinstance(value, DataSet):
        return {
            "columns": list(value.columns),
            "types": [t.name for t in value.types],
            "rows": [[_jsonable(c) for c in row] for row in value.rows],
        }
    # Templates are not produced by Outpost's drivers; name the kind rather than guess.
    return {"unsupported": type(value).__name__}


def sparkplug_to_json(
    payload: bytes,
    *,
    topic: str,
    msg_type: str,
    gateway_id: str,
    stream: str,
    seq: int,
    clock: str = "",
    correction_ms: int = 0,
) -> bytes:
    """Decode a Sparkplug B payload (with the project's codec) into the `json` document.

    `clock` ("unsynced" or "corrected") is added as the document's `clock` field when the
    timestamps were taken on an unsynchronised clock (see the README's clock rule);
    `correction_ms` is added to the payload's and every metric's timestamp.
    """
    from gateway.sparkplug import sparkplug_b_pb2 as pb

    p = pb.Payload()
    try:
        p.ParseFromString(payload)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise KafkaFormatError(
            f"record seq {seq} on {topic!r}: not a Sparkplug B payload ({len(payload)} bytes): {exc}"
        ) from None
    metrics = _scalar_metrics(p, correction_ms)
    if metrics is None:  # arrays, data sets, properties...: the full codec
        metrics = _decoded_metrics(payload, topic, seq, correction_ms)
    timestamp = p.timestamp if p.HasField("timestamp") else None
    if timestamp is not None:
        timestamp += correction_ms
    doc = {
        "gateway": gateway_id,
        "topic": topic,
        "type": msg_type,
        "stream": stream,
        "seq": seq,
        "timestamp": timestamp,
        "metrics": metrics,
    }
    if clock:
        doc["clock"] = clock
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _decoded_metrics(payload: bytes, topic: str, seq: int, correction_ms: int) -> list[dict[str, Any]]:
    from gateway.sparkplug.payload import decode_payload

    try:
        decoded = decode_payload(payload)
    except PayloadError as exc:
        raise KafkaFormatError(f"record seq {seq} on {topic!r}: {exc}") from None
    metrics = []
    for m in decoded.metrics:
        item: dict[str, Any] = {}
        if m.name is not None:
            item["name"] = m.name
        elif m.alias is not None:
            item["alias"] = m.alias
        dt = m.datatype.name if m.datatype is not None else None
        item["datatype"] = dt
        if m.timestamp is not None:
            item["timestamp"] = m.timestamp + correction_ms
        item["value"] = _jsonable(m.value, float32=dt in _FLOAT32_TYPES)
        item["quality"] = str(m.quality)
        item["is_historical"] = bool(m.is_historical)
        metrics.append(item)
    return metrics


# Sparkplug datatype number -> (name, the oneof fields its value may be read from, how to
# read it): the scalar types the drivers produce, read exactly as payload._get_scalar does.
_INTS = ("int_value", "long_value")
_FLOATS = ("float_value", "double_value")


def _signed_view(bits: int) -> Any:
    mask, top, span = (1 << bits) - 1, 1 << (bits - 1), 1 << bits
    return lambda raw: (raw & mask) - span if raw & mask & top else raw & mask


def _unsigned_view(bits: int) -> Any:
    mask = (1 << bits) - 1
    return lambda raw: raw & mask


def _float_view(v: float) -> Any:
    return v if math.isfinite(v) else str(v)


def _float32_view(v: float) -> Any:
    return shortest_float32(v) if math.isfinite(v) else str(v)


_SCALARS: dict[int, tuple[str, tuple[str, ...], Any]] = {
    1: ("Int8", _INTS, _signed_view(8)),
    2: ("Int16", _INTS, _signed_view(16)),
    3: ("Int32", _INTS, _signed_view(32)),
    4: ("Int64", _INTS, _signed_view(64)),
    5: ("UInt8", _INTS, _unsigned_view(8)),
    6: ("UInt16", _INTS, _unsigned_view(16)),
    7: ("UInt32", _INTS, _unsigned_view(32)),
    8: ("UInt64", _INTS, _unsigned_view(64)),
    9: ("Float", _FLOATS, _float32_view),
    10: ("Double", _FLOATS, _float_view),
    11: ("Boolean", ("boolean_value",), None),
    12: ("String", ("string_value",), None),
    13: ("DateTime", _INTS, _unsigned_view(64)),
    14: ("Text", ("string_value",), None),
    15: ("UUID", ("string_value",), None),
}


def _scalar_metrics(p: Any, correction_ms: int) -> list[dict[str, Any]] | None:
    """The `metrics` of the JSON document straight from the parsed protobuf, for payloads
    whose metrics are all named scalars without properties (what the pipeline writes:
    about 8x cheaper than the full codec). None when any metric needs the full codec,
    which then also gives the errors their exact wording."""
    out = []
    append = out.append
    scalars = _SCALARS
    for pm in p.metrics:
        spec = scalars.get(pm.datatype)
        if (spec is None or not pm.HasField("name") or pm.HasField("properties")
                or pm.HasField("metadata")):
            return None
        name, kinds, view = spec
        if pm.is_null:
            value = None
        else:
            kind = pm.WhichOneof("value")
            if kind not in kinds:
                return None
            value = getattr(pm, kind)
            if view is not None:
                value = view(value)
        item = {"name": pm.name, "datatype": name}
        if pm.HasField("timestamp"):
            item["timestamp"] = pm.timestamp + correction_ms
        item["value"] = value
        item["quality"] = "good"
        item["is_historical"] = pm.is_historical
        append(item)
    return out
