"""Shared fixtures: the real services (lazily started, stopped at session end) and leak checks.

Fixtures (see tests/harness/README.md): `kafka`, `mosquitto`, `toxiproxy` (session scope,
each started the first time a test asks for it), `kafka_cluster` (three brokers, started on
first use and shared by the session, healed before and after each test), `pty_pair` (factory, pairs closed after the
test), `kcat`, `node_peers`. After every test the fault proxy is reset (toxics removed,
proxies enabled) and a broker a test stopped is started again, so one failing test does
not break the next. An autouse check fails a test that leaks asyncio tasks or threads
(OUTPOST_LEAK_CHECK=warn|off to soften it; @pytest.mark.allow_leaks to exempt one test).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import leaks
from tests.harness.common import kill_all_live, session_run_dir
from tests.harness.kafka import ExternalKafka, KafkaCluster, KafkaService, SecuredKafka
from tests.harness.mosquitto import MosquittoService
from tests.harness.pty import PtyPair
from tests.harness.stack import Stack
from tests.harness.tools import ensure_node_peers, kcat_path
from tests.harness.toxiproxy import ToxiproxyServer

_stack: Stack | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_leaks(reason): the test may leave tasks or threads running")


def pytest_unconfigure(config: pytest.Config) -> None:
    # Last resort if the session fixture's finalizer never ran (e.g. an internal error).
    kill_all_live()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    if fixturedef.scope == "function":
        return (yield)
    before = leaks.thread_snapshot()
    try:
        return (yield)
    finally:
        leaks.note_scoped_fixture_threads(before)


# -- services ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _outpost_stack() -> Iterator[Stack]:
    global _stack
    stack = Stack(session_run_dir())
    _stack = stack
    try:
        yield stack
    finally:
        _stack = None
        stack.close()


@pytest.fixture(scope="session")
def toxiproxy(_outpost_stack: Stack) -> ToxiproxyServer:
    return _outpost_stack.toxiproxy


@pytest.fixture(scope="session")
def mosquitto(_outpost_stack: Stack) -> MosquittoService:
    return _outpost_stack.mosquitto


@pytest.fixture(scope="session")
def kafka(_outpost_stack: Stack) -> KafkaService | ExternalKafka:
    return _outpost_stack.kafka


@pytest.fixture(scope="session")
def _outpost_kafka_cluster(_outpost_stack: Stack) -> Iterator[KafkaCluster]:
    # Started the first time a test asks for `kafka_cluster`, shared by every test of the
    # session (three brokers take ~10-30 s to start on a shared 2-core machine).
    # Four client listeners: the shortened fleet scenario gives each gateway its own link.
    cluster = KafkaCluster(_outpost_stack.run, _outpost_stack.toxiproxy,
                           client_listeners=4).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def secured_kafka(_outpost_stack: Stack) -> Iterator[SecuredKafka]:
    """A Kafka that says no (tests/harness/kafka.py SecuredKafka): SASL users admin and
    outpost, ACLs enforced, no topic auto-creation. Started the first time a test asks."""
    broker = SecuredKafka(_outpost_stack.run).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def kafka_cluster(request: pytest.FixtureRequest,
                  _outpost_kafka_cluster: KafkaCluster) -> Iterator[KafkaCluster]:
    """The three-broker cluster (tests/harness/kafka.py KafkaCluster), whole before and after.

    Before the test every node runs and every broker is registered; after it, nodes the test
    killed or stopped are started again (proxies are reset by the autouse heal), or, when the
    next test does not use the cluster, every node is stopped until a test asks again.
    """
    _outpost_kafka_cluster.heal()
    yield _outpost_kafka_cluster
    if _next_test_uses(request, "kafka_cluster"):
        _outpost_kafka_cluster.heal()
    else:
        # Five idle JVMs cost the rest of the run CPU and memory: stop them (data kept) and
        # let the next test that asks start them again.
        _outpost_kafka_cluster.stop()


def _next_test_uses(request: pytest.FixtureRequest, fixture: str) -> bool:
    items = request.session.items
    try:
        i = items.index(request.node)
    except ValueError:
        return True
    return i + 1 < len(items) and fixture in getattr(items[i + 1], "fixturenames", ())


@pytest.fixture
def pty_pair(_outpost_stack: Stack) -> Iterator[Callable[..., PtyPair]]:
    made: list[PtyPair] = []

    def make(name: str | None = None) -> PtyPair:
        pair = _outpost_stack.pty_pair(name)
        made.append(pair)
        return pair

    yield make
    for pair in made:
        pair.close()


@pytest.fixture(scope="session")
def kcat() -> str:
    return kcat_path()


@pytest.fixture(scope="session")
def node_peers() -> Path:
    return ensure_node_peers()


@pytest.fixture(autouse=True)
def _outpost_heal_services() -> Iterator[None]:
    yield
    if _stack is not None:
        _stack.heal()


# -- leak checks -------------------------------------------------------------------------------
def _runs_on_function_loop(item: pytest.Item) -> bool:
    if not inspect.iscoroutinefunction(getattr(item, "function", None)):
        return False
    marker = item.get_closest_marker("asyncio")
    scope = "function"
    if marker is not None:
        scope = marker.kwargs.get("loop_scope") or marker.kwargs.get("scope") or "function"
    return scope == "function"


@pytest.fixture
async def _outpost_task_leak_check() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    found = await leaks.leaked_tasks(before)
    if found:
        text = leaks.describe_tasks(found)
        for task in found:
            task.cancel()
        leaks.report(f"test left {len(found)} asyncio task(s) running: {text}")


@pytest.fixture(autouse=True)
def _outpost_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    if leaks.MODE == "off" or request.node.get_closest_marker("allow_leaks"):
        yield
        return
    before = leaks.thread_snapshot()
    if _runs_on_function_loop(request.node):
        request.getfixturevalue("_outpost_task_leak_check")
    yield
    found = leaks.leaked_threads(before)
    if found:
        leaks.report(f"test left {len(found)} thread(s) running: {leaks.describe_threads(found)}")
