"""One exception root for the buffer package."""


class BufferError(Exception):  # noqa: A001 - the package's own name for its errors
    retriable: bool = False


class BufferFull(BufferError):
    """The `block` policy is in force and the buffer is at its size or age limit."""

    retriable = True


class UnknownCursor(BufferError):
    pass
