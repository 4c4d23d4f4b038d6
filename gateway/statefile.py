"""Small state files written crash-consistently: after a power cut a file holds either its
old or its new content, never a mix, an empty file or nothing.

`write_atomic` writes a temporary file next to the target, fsyncs it, renames it over the
target and fsyncs the directory (so the rename itself survives the cut). Use it for every
file the gateway keeps besides the buffer (the Sparkplug bdSeq, ...). Blocking: call it
from a thread in asyncio code.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` durably and atomically (write temp, fsync, rename, fsync dir)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so that names created, renamed or removed in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike[str]) -> str | None:
    """The file's text, or None when it does not exist. Leftover temporary files of an
    interrupted write are ignored (the target still holds the previous content)."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return None
