"""Leak checks for tests/conftest.py: a test must not leave asyncio tasks or threads running.

Modelled on pymodbus' test/conftest.py system-health fixture. Lenient where it must be:
threads get a grace period to finish (aiokafka and executors join shortly after close),
threads started while a session/module-scoped fixture was being set up belong to that
fixture, and default-executor threads of longer-lived loops ("asyncio_N") are allowed.
OUTPOST_LEAK_CHECK=fail (default) | warn | off chooses what a leak does.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable

import pytest

MODE = os.environ.get("OUTPOST_LEAK_CHECK", "fail").strip().lower()
THREAD_GRACE_S = 2.0
TASK_GRACE_S = 1.0

# Threads that are owned by something longer-lived than one test.
ALLOWED_THREAD_NAMES = re.compile(r"^(asyncio_\d+|outpost-harness-.*|pydevd\..*|Dummy-\d+)$")

# Threads born during the setup of a fixture wider than function scope belong to it.
_scoped_threads: set[threading.Thread] = set()
# Leaks already reported, so that one leak fails one test, not every test after it.
_reported: set[object] = set()


class LeakWarning(UserWarning):
    pass


def report(what: str) -> None:
    if MODE == "warn":
        warnings.warn(what, LeakWarning, stacklevel=2)
    elif MODE != "off":
        pytest.fail(what, pytrace=False)


def thread_snapshot() -> set[threading.Thread]:
    return set(threading.enumerate())


def note_scoped_fixture_threads(before: set[threading.Thread]) -> None:
    _scoped_threads.update(thread_snapshot() - before)


def leaked_threads(before: Iterable[threading.Thread]) -> list[threading.Thread]:
    """Threads started since `before` that are still alive after the grace period."""
    known = set(before)

    def suspects() -> list[threading.Thread]:
        return [t for t in threading.enumerate()
                if t not in known and t not in _scoped_threads and t not in _reported
                and t.is_alive() and not ALLOWED_THREAD_NAMES.match(t.name)]

    deadline = time.monotonic() + THREAD_GRACE_S
    found = suspects()
    while found and time.monotonic() < deadline:
        time.sleep(0.05)
        found = suspects()
    _reported.update(found)
    return found


async def leaked_tasks(before: set[asyncio.Task]) -> list[asyncio.Task]:
    """Tasks of the running loop, other than the caller, still pending after the grace period."""
    me = asyncio.current_task()

    def suspects() -> list[asyncio.Task]:
        return [t for t in asyncio.all_tasks() if t is not me and t not in before
                and not t.done()]

    deadline = time.monotonic() + TASK_GRACE_S
    found = suspects()
    while found and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        found = suspects()
    return found


def describe_threads(threads: list[threading.Thread]) -> str:
    return ", ".join(f"{t.name!r} (target {getattr(t, '_target', None)!r})" for t in threads)


def describe_tasks(tasks: list[asyncio.Task]) -> str:
    return ", ".join(f"{t.get_name()!r} running {t.get_coro()!r}" for t in tasks)
