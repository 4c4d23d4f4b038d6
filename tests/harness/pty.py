"""Linked pseudo-terminal pairs made by socat: stand-ins for an RS-485 line or a USB adapter.

`PtyPair` unpacks as `a, b = pair` (paths to give pyserial); `close()` stops socat so the
paths vanish like an unplugged adapter, `recreate()` brings the same paths back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .common import ManagedProcess, log_tail, require_binary, wait_until

INSTALL_HINT = "install the Debian package `socat` (apt-get install -y socat)"


class PtyPair:
    def __init__(self, a: Path, b: Path, log_path: Path, *, detached: bool = False) -> None:
        self.a = str(a)
        self.b = str(b)
        self.log_path = log_path
        self._detached = detached
        self.process: ManagedProcess | None = None

    def __iter__(self) -> Iterator[str]:
        return iter((self.a, self.b))

    def __repr__(self) -> str:
        return f"PtyPair({self.a} <-> {self.b}, open={self.is_open})"

    @property
    def is_open(self) -> bool:
        return self.process is not None and self.process.alive()

    def open(self) -> PtyPair:
        socat = require_binary("socat", INSTALL_HINT)
        for link in (self.a, self.b):
            Path(link).parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)  # a stale link from a killed socat
        self.process = ManagedProcess(
            "socat",
            [socat, "-d", "-d", f"pty,raw,echo=0,link={self.a}",
             f"pty,raw,echo=0,link={self.b}"],
            self.log_path, detached=self._detached).start()

        def linked() -> bool:
            assert self.process is not None
            self.process.check_alive()
            return all(os.path.exists(p) for p in (self.a, self.b))

        try:
            wait_until(linked, 10, f"socat pty pair {self.a} <-> {self.b}",
                       interval_s=0.02, on_timeout=lambda: log_tail(self.log_path))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop socat: both pty devices disappear, open file handles see EOF/EIO."""
        if self.process is not None:
            self.process.stop(5)
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)

    def recreate(self) -> PtyPair:
        """Close (if open) and open again with the same link paths."""
        self.close()
        return self.open()
