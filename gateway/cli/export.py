"""`outpost buffer export` in words people read: each stored Sparkplug record decoded into
one row per metric (device, metric, value, datatype, quality, time), as JSON lines or CSV.

Streaming: records come from buffer.diagnostics.iter_records a batch at a time and every row
is written as soon as it is decoded, so memory stays flat however large the buffer is.

Odd values keep their meaning: JSON has no NaN or infinity, so they are written as the
strings "NaN", "Infinity" and "-Infinity" (protobuf's JSON mapping does the same); a null
(Sparkplug `is_null`) is JSON null, and in CSV an empty field, while an empty string is `""`.
float32 values are written with the fewest digits that give back the same float32 (230.1,
not 230.10000610351562). A record that does not decode becomes one row with an `error`.
Records of bridged MQTT topics (not Sparkplug) become one row with the topic as the metric
and the payload as text (or base64 with datatype Bytes when it is not UTF-8).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from buffer.diagnostics import StoredRecord
from gateway.records import H_CLOCK, H_TOPIC, H_TYPE, SPARKPLUG_DATA_TYPES, TYPE_BRIDGED
from gateway.sparkplug.errors import PayloadError
from gateway.sparkplug.payload import DataType, Metric, decode_payload_each
from gateway.uplinks.kafka.format import shortest_float32  # one float32 rule for every JSON the gateway writes

COLUMNS = ("seq", "time", "ts_ms", "type", "device", "metric", "datatype", "value", "quality",
           "clock", "stream", "error")


def decode_record(rec: StoredRecord) -> Iterator[dict[str, Any]]:
    """The rows of one stored record: one per metric (or one for a bridged message)."""
    kind = rec.headers.get(H_TYPE, "")
    base = {"seq": rec.seq, "type": kind, "device": _device(rec), "stream": rec.stream,
            "clock": rec.headers.get(H_CLOCK)}
    if kind == TYPE_BRIDGED or (kind not in SPARKPLUG_DATA_TYPES):
        yield _row(base, rec.ts_ms, metric=rec.headers.get(H_TOPIC), **_opaque(rec.payload))
        return
    try:
        payload, errors = decode_payload_each(rec.payload)
    except PayloadError as exc:
        yield _row(base, rec.ts_ms, error=str(exc))
        return
    default_ts = payload.timestamp if payload.timestamp is not None else rec.ts_ms
    for m in payload.metrics:
        yield _row(base, m.timestamp if m.timestamp is not None else default_ts,
                   metric=m.name if m.name is not None else f"alias:{m.alias}",
                   datatype=m.datatype.name if m.datatype is not None else None,
                   value=_value(m), quality=m.quality.name)
    for exc in errors:
        yield _row(base, default_ts, error=str(exc))


def _row(base: dict[str, Any], ts_ms: int, **fields: Any) -> dict[str, Any]:
    row = {"seq": base["seq"], "time": iso_time(ts_ms), "ts_ms": ts_ms, "type": base["type"],
           "device": base["device"], "metric": None, "datatype": None, "value": None,
           "quality": None, "clock": base["clock"], "stream": base["stream"], "error": None}
    row.update(fields)
    return row


def _device(rec: StoredRecord) -> str | None:
    # spBv1.0/<group>/DDATA/<edge node>/<device>; NDATA has no device (the node itself).
    parts = rec.headers.get(H_TOPIC, "").split("/")
    return parts[4] if len(parts) >= 5 and parts[0].startswith("spB") else None


def _opaque(payload: bytes) -> dict[str, Any]:
    try:
        return {"datatype": "String", "value": payload.decode("utf-8")}
    except UnicodeDecodeError:
        return {"datatype": "Bytes", "value": base64.b64encode(payload).decode("ascii")}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_last_time: tuple[int, str] = (0, "1970-01-01T00:00:00.000Z")


def iso_time(ts_ms: int) -> str:
    """UTC, millisecond precision, `Z`: 2026-12-02T16:40:00.123Z."""
    global _last_time
    if ts_ms == _last_time[0]:   # the metrics of one record mostly share their time
        return _last_time[1]
    try:
        t = _EPOCH + dt.timedelta(milliseconds=ts_ms)   # exact, unlike ts_ms / 1000
    except (OverflowError, ValueError):
        return ""   # a timestamp no calendar holds; ts_ms still says what was stored
    text = f"{t:%Y-%m-%dT%H:%M:%S}.{ts_ms % 1000:03d}Z"
    _last_time = (ts_ms, text)
    return text


def _value(m: Metric) -> Any:
    v = m.value
    if m.datatype == DataType.Float and isinstance(v, float):
        return shortest_float32(v)
    return _plain(v)


def _plain(v: Any) -> Any:
    """A decoded value as JSON-able data (DataSet/Template dataclasses, bytes, enums)."""
    if isinstance(v, bytes):
        return base64.b64encode(v).decode("ascii")
    if isinstance(v, DataType):
        return v.name
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    return v


def jsonl_line(row: dict[str, Any]) -> str:
    """One JSON object per line; keys that are null and say nothing (clock, error) left out."""
    out = {k: v for k, v in row.items() if v is not None or k not in ("clock", "error")}
    v = out["value"]
    if isinstance(v, float | dict | list):   # only a value can hold a float that JSON cannot
        out["value"] = _json_safe(v)
    return json.dumps(out, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"


def csv_header() -> str:
    return ",".join(COLUMNS) + "\r\n"


def csv_line(row: dict[str, Any]) -> str:
    """RFC 4180: CRLF line ends, fields quoted when they hold a comma, quote, CR or LF (or
    edge spaces), quotes doubled; null is an empty field, an empty string is `""`."""
    return ",".join(csv_field(row.get(c)) for c in COLUMNS) + "\r\n"


def csv_field(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "Infinity" if v > 0 else "-Infinity"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    text = v if isinstance(v, str) else json.dumps(_json_safe(v), separators=(",", ":"),
                                                    ensure_ascii=False, allow_nan=False)
    if text == "" or any(c in text for c in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


class Progress:
    """`exporting: 120000/500000 records (24%)` on stderr, rewritten in place: only at a
    terminal, only once an export has run for a second (small exports print nothing), and
    at most four times a second."""

    def __init__(self, total: int, stream: TextIO | None = None, *, delay_s: float = 1.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.total = total
        self.start = time.monotonic()
        self.next_at = self.start + delay_s
        self.shown = False

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + 0.25
        pct = f" ({min(100, done * 100 // self.total)}%)" if self.total else ""
        self.stream.write(f"\r\033[Kexporting: {done}/{max(done, self.total)} records{pct}")
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def write_decoded(records: Iterable[StoredRecord], out: TextIO, fmt: str,
                  progress: Progress | None = None, first_seq: int = 0) -> tuple[int, int]:
    """Write the rows of `records` as `fmt` ("jsonl" or "csv"); (records, rows) written."""
    line = jsonl_line if fmt == "jsonl" else csv_line
    if fmt == "csv":
        out.write(csv_header())
    n_records = n_rows = 0
    for rec in records:
        n_records += 1
        for row in decode_record(rec):
            out.write(line(row))
            n_rows += 1
        if progress is not None:
            progress.update(rec.seq - first_seq)
    return n_records, n_rows
