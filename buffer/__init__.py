"""Outpost's durable store-and-forward buffer: opaque records in one SQLite file.

The buffer knows nothing of Sparkplug, MQTT or Kafka. See buffer/README.md for the
guarantees, the on-disk layout and the retention policies.
"""

from buffer.asyncbuf import AsyncBuffer
from buffer.core import Buffer, BufferSettings, NewRecord, Record, Row
from buffer.errors import (
    BufferClosed,
    BufferCorrupt,
    BufferError,
    BufferFull,
    BufferIOError,
    BufferLocked,
    BufferSchemaError,
    UnknownCursor,
)

__all__ = [
    "AsyncBuffer",
    "Buffer",
    "BufferClosed",
    "BufferCorrupt",
    "BufferError",
    "BufferFull",
    "BufferIOError",
    "BufferLocked",
    "BufferSchemaError",
    "BufferSettings",
    "NewRecord",
    "Record",
    "Row",
    "UnknownCursor",
]
