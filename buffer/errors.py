"""One exception root for the buffer package.

Every error says what failed and where (the buffer file path). `retriable` tells the
caller whether trying the same call again later can succeed; retry logic reads only that.
"""

from __future__ import annotations


class BufferError(Exception):
    retriable: bool = False

    def __init__(self, message: str, *, retriable: bool | None = None) -> None:
        super().__init__(message)
        if retriable is not None:
            self.retriable = retriable


class BufferFull(BufferError):
    """The `block` policy is in force and the buffer is at its size, age or disk limit.

    `reason` is "size", "age" or "disk_full". Retriable: space comes back when the
    uplinks acknowledge what they hold.
    """

    retriable = True

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class UnknownCursor(BufferError):
    """A read or ack named a cursor that was never registered."""


class BufferCorrupt(BufferError):
    """SQLite reported a corrupt file while running. Reopening the buffer moves it aside.

    From AsyncBuffer the file was already moved aside and salvaged (`recovered` True,
    `retriable` True): the same call made again works on the fresh file.
    """

    recovered: bool = False


class BufferLocked(BufferError):
    """Another process holds the buffer file open for writing (a running gateway)."""

    retriable = True


class BufferSchemaError(BufferError):
    """The file was written by a newer Outpost whose schema this version does not know."""


class BufferIOError(BufferError):
    """SQLite or the operating system failed an operation (I/O error, disk full, busy)."""

    retriable = True


class BufferClosed(BufferError):
    """The buffer was used after close()."""
