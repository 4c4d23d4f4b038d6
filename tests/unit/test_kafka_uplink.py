"""Kafka uplink logic against a real buffer and a scripted in-memory producer.

The buffer is the real AsyncBuffer on a temporary file. The producer stand-in builds real
aiokafka record batches (so sizes and bytes are real) and lets each test decide whether a
batch is acknowledged, fails after reaching the log (ack lost), fails before it, or never
answers. Real-broker behaviour is covered by tests/integration/test_kafka_*.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, TopicAuthorizationFailedError
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from buffer import AsyncBuffer, BufferSettings, NewRecord
from gateway.uplinks.kafka.format import H_SEQ, H_STREAM
from gateway.uplinks.kafka.mappings import Mapping
from gateway.uplinks.kafka.uplink import CURSOR, KafkaSettings, KafkaUplink
from tests.harness.common import until
from tests.helpers import flat

# Outcomes a test can script per send_batch call.
OK, LOST_ACK, FAIL, HANG, TOO_LARGE = "ok", "lost_ack", "fail", "hang", "too_large"


class ScriptedProducer:
    """Stands in for AIOKafkaProducer: the calls the uplink makes, with scripted outcomes."""

    def __init__(self, world: World, **kwargs: Any) -> None:
        self.world = world
        self.kwargs = kwargs
        self.started = False
        self.stopped = False
        self.poisoned: str | None = None

    async def start(self) -> None:
        if self.world.refuse_connect:
            raise KafkaConnectionError("Unable to bootstrap from [('kafka.invalid', 9092)]")
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        if topic in self.world.unauthorized:
            raise TopicAuthorizationFailedError(topic)
        return set(range(self.world.partitions.get(topic, 1)))

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(self.kwargs["max_batch_size"], 0)

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int):
        # Like an idempotent aiokafka producer: once a batch failed or hangs, later batches
        # of this producer never land (one batch in flight per partition, sequence numbers).
        if topic in self.world.write_denied:  # describe allowed, write refused (produce level)
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(TopicAuthorizationFailedError(topic))
            return fut
        outcome = self.poisoned or (self.world.outcomes.pop(0) if self.world.outcomes else OK)
        fut = asyncio.get_running_loop().create_future()
        self.world.batch_sizes.append(batch.record_count())
        if outcome in (OK, LOST_ACK) and not self.poisoned:
            data = bytes(batch._build())
            for r in MemoryRecords(data).next_batch():
                self.world.log.append((topic, partition, r.key, r.value, dict(r.headers)))
        if outcome == OK:
            fut.set_result(None)
            return fut
        self.poisoned = FAIL if outcome != HANG else HANG
        if outcome in (LOST_ACK, FAIL):
            fut.set_exception(KafkaConnectionError("connection reset by peer"))
        elif outcome == TOO_LARGE:
            fut.set_exception(MessageSizeTooLargeError())
        return fut  # HANG: never resolved


class World:
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.log: list[tuple[str, int, bytes, bytes, dict[str, bytes]]] = []
        self.batch_sizes: list[int] = []
        self.partitions: dict[str, int] = {}
        self.refuse_connect = False
        self.producers: list[ScriptedProducer] = []
        self.unauthorized: set[str] = set()
        self.write_denied: set[str] = set()

    def factory(self, **kwargs: Any) -> ScriptedProducer:
        p = ScriptedProducer(self, **kwargs)
        self.producers.append(p)
        return p


@pytest.fixture
async def buf(tmp_path: Path):
    b = await AsyncBuffer.open(str(tmp_path / "buffer.db"), BufferSettings(100_000_000, 86400.0))
    yield b
    await b.close()


def _settings(**kw: Any) -> KafkaSettings:
    base: dict[str, Any] = {
        "bootstrap_servers": ("kafka.test:9092",),
        "linger_s": 0.0,
        "batch_max_records": 50,
        "request_timeout_s": 0.3,
        "reconnect_min_s": 0.01,
        "reconnect_max_s": 0.05,
    }
    return KafkaSettings(**{**base, **kw})


TELEMETRY = Mapping("telemetry", ("spBv1.0/+/DDATA/#",), "plant.telemetry")


def _ddata(device: str, i: int, size: int = 100) -> NewRecord:
    return NewRecord(
        stream=f"plant-7/pump-3/{device}",
        payload=f"{device}:{i}:".encode().ljust(size, b"x"),
        ts_ms=1_700_000_000_000 + i,
        headers={
            "topic": f"spBv1.0/plant-7/DDATA/pump-3/{device}",
            "type": "DDATA",
            "gateway": "plant-7/pump-3",
        },
    )


async def _run_until(uplink: KafkaUplink, cond: Callable[[], bool], limit_s: float = 10) -> None:
    task = asyncio.create_task(uplink.run(), name="kafka-uplink-test")
    try:
        async with asyncio.timeout(limit_s):
            while not cond():
                if task.done():
                    task.result()
                    raise AssertionError("uplink run() returned early")
                await asyncio.sleep(0.01)
    finally:
        await uplink.stop()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _dedup_in_order(log, topic: str = "plant.telemetry") -> dict[bytes, list[int]]:
    """What a consumer does with the headers: drop (stream, seq) already seen, per key."""
    seen: set[tuple[bytes, bytes]] = set()
    out: dict[bytes, list[int]] = {}
    for t, _p, key, _v, headers in log:
        if t != topic:
            continue
        ident = (headers[H_STREAM], headers[H_SEQ])
        if ident in seen:
            continue
        seen.add(ident)
        out.setdefault(key, []).append(int(headers[H_SEQ]))
    return out


async def test_forwards_every_record_in_order_and_acks_only_what_kafka_acked(buf) -> None:
    world = World()
    seqs = await buf.append([_ddata(f"m{i % 3}", i) for i in range(230)])
    uplink = KafkaUplink(_settings(), buf, [TELEMETRY], "plant-7/pump-3",
                         producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    assert len(world.log) == 230
    per_key = _dedup_in_order(world.log)
    assert set(per_key) == {b"plant-7/pump-3/m0", b"plant-7/pump-3/m1", b"plant-7/pump-3/m2"}
    for key, got in per_key.items():
        expected = [s for s, i in zip(seqs, range(230), strict=True) if f"m{i % 3}" in key.decode()]
        assert got == expected
    assert max(world.batch_sizes) <= 50  # window bounded by batch_max_records
    st = flat(uplink.state)
    assert st["delivered"] == 230 and st["messages"] == 230
    assert st["link"] == "stopped"
    assert (await buf.stats())["cursors"][CURSOR]["records"] == 0
    kw = world.producers[0].kwargs
    assert kw["acks"] == "all" and kw["enable_idempotence"] is True
    assert kw["compression_type"] == "zstd"


async def test_unmatched_records_are_counted_and_acked_past_and_fanout_goes_to_each(buf) -> None:
    world = World()
    all_sp = Mapping("all-json", ("spBv1.0/#",), "plant.all", format="raw", key="topic")
    recs = [_ddata("m1", 0), NewRecord("lab/t", b"21.5", 1, {"topic": "lab/t", "type": "bridged"})]
    recs.append(_ddata("m1", 2))
    seqs = await buf.append(recs)
    uplink = KafkaUplink(_settings(), buf, [TELEMETRY, all_sp], "g/e",
                         producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    topics = sorted((t, int(h[H_SEQ])) for t, _p, _k, _v, h in world.log)
    assert topics == sorted(
        [("plant.telemetry", seqs[0]), ("plant.all", seqs[0]),
         ("plant.telemetry", seqs[2]), ("plant.all", seqs[2])]
    )
    keys = {t: k for t, _p, k, _v, _h in world.log}
    assert keys["plant.all"] == b"spBv1.0/plant-7/DDATA/pump-3/m1"
    assert flat(uplink.state)["unmatched"] == 1
    assert flat(uplink.state)["delivered"] == 2  # the unmatched one is acked past, not delivered


@pytest.mark.parametrize("failure", [FAIL, LOST_ACK, HANG])
async def test_a_failed_window_is_resent_by_a_new_producer_without_loss_or_reorder(
    buf, failure: str
) -> None:
    world = World()
    world.outcomes = [OK, OK, failure, failure, OK]
    seqs = await buf.append([_ddata(f"m{i % 2}", i) for i in range(400)])
    uplink = KafkaUplink(_settings(), buf, [TELEMETRY], "g/e", producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    per_key = _dedup_in_order(world.log)
    assert per_key[b"plant-7/pump-3/m0"] == seqs[0::2]
    assert per_key[b"plant-7/pump-3/m1"] == seqs[1::2]
    duplicates = len(world.log) - 400
    if failure == LOST_ACK:
        # Each lost ack duplicates exactly the one window that was in flight.
        assert 0 < duplicates <= 2 * 50
    else:
        assert duplicates == 0
    assert len(world.producers) == 3  # recreated after each failed window
    assert all(p.stopped for p in world.producers)
    st = flat(uplink.state)
    assert st["resent"] == 2
    assert st["last_error"] is not None


async def test_connect_failure_backs_off_and_reports_the_link_down(buf) -> None:
    world = World()
    world.refuse_connect = True
    await buf.append([_ddata("m1", 0)])
    uplink = KafkaUplink(_settings(), buf, [TELEMETRY], "g/e", producer_factory=world.factory)
    await _run_until(uplink, lambda: len(world.producers) >= 3)
    st = flat(uplink.state)
    assert st["delivered"] == 0
    assert "Unable to bootstrap" in st["last_error"]
    assert (await buf.stats())["cursors"][CURSOR]["records"] == 1  # nothing acked
    world.refuse_connect = False
    await _run_until(uplink, lambda: flat(uplink.state)["delivered"] == 1)


async def test_batches_stay_under_batch_max_bytes_and_later_records_wait(buf) -> None:
    world = World()
    seqs = await buf.append([_ddata("m1", i, size=900) for i in range(60)])
    uplink = KafkaUplink(
        _settings(batch_max_bytes=8 * 1024, batch_max_records=1000),
        buf, [TELEMETRY], "g/e", producer_factory=world.factory,
    )
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    assert max(world.batch_sizes) <= 8  # ~1 KB each with headers
    assert _dedup_in_order(world.log)[b"plant-7/pump-3/m1"] == seqs
    assert len(world.log) == 60


async def test_broker_size_limit_shrinks_batches(buf) -> None:
    world = World()
    world.outcomes = [TOO_LARGE]
    seqs = await buf.append([_ddata("m1", i, size=1000) for i in range(100)])
    uplink = KafkaUplink(
        _settings(batch_max_bytes=64 * 1024, batch_max_records=1000),
        buf, [TELEMETRY], "g/e", producer_factory=world.factory,
    )
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    assert world.batch_sizes[0] > world.batch_sizes[1]
    assert len(world.log) == 100


async def test_format_errors_are_counted_and_skipped_not_blocking(buf) -> None:
    world = World()
    as_json = Mapping("lab-json", ("lab/#",), "lab.json", format="json")
    seqs = await buf.append(
        [NewRecord("lab/t", b"not protobuf {", 1, {"topic": "lab/t", "type": "bridged"}),
         _ddata("m1", 1)]
    )
    uplink = KafkaUplink(_settings(), buf, [as_json, TELEMETRY], "g/e",
                         producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    assert flat(uplink.state)["quarantined"] == 1
    assert [t for t, *_ in world.log] == ["plant.telemetry"]
    q = (await buf.stats())["quarantine"]["by_cursor_reason"]["kafka"]
    assert q == {"format_error:lab-json": 1}, q  # kept, visible, re-sendable: not skipped


async def test_key_partitioning_matches_the_java_default_partitioner(buf) -> None:
    world = World()
    world.partitions["plant.telemetry"] = 6
    await buf.append([_ddata(f"m{i}", i) for i in range(20)])
    uplink = KafkaUplink(_settings(), buf, [TELEMETRY], "g/e", producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["delivered"] == 20)
    from aiokafka.partitioner import DefaultPartitioner

    for _t, p, key, _v, _h in world.log:
        assert p == DefaultPartitioner()(key, list(range(6)), [])
    assert len({p for _t, p, *_ in world.log}) > 1


def test_settings_from_config_section() -> None:
    from gateway.config import parse_config

    cfg = parse_config(
        """
[gateway]
group_id = "plant-7"
edge_node_id = "pump-3"
data_dir = "/tmp/x"
[kafka]
bootstrap_servers = ["kafka.example:9093"]
security_protocol = "SASL_SSL"
sasl_mechanism = "SCRAM-SHA-512"
sasl_username = "edge"
sasl_password = "${KAFKA_PW}"
compression = "lz4"
linger = "250ms"
request_timeout = "20s"
[[kafka.mappings]]
mqtt_topic_filters = ["spBv1.0/+/DDATA/#"]
kafka_topic = "plant.telemetry"
""",
        "outpost.toml",
    )
    s = KafkaSettings.from_config(cfg.kafka, sasl_password="pw")
    assert s.bootstrap_servers == ("kafka.example:9093",)
    assert (s.compression, s.linger_s, s.request_timeout_s) == ("lz4", 0.25, 20.0)
    assert (s.sasl_mechanism, s.sasl_username, s.sasl_password) == ("SCRAM-SHA-512", "edge", "pw")


class KeepingProducer(ScriptedProducer):
    """Also keeps each sent batch's bytes, to check what the raw append path built."""

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int):
        self.world.sent.append((topic, partition, batch.record_count(), bytes(batch._build())))
        return await super().send_batch(batch, topic, partition=partition)


class KeepingWorld(World):
    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[str, int, int, bytes]] = []

    def factory(self, **kwargs: Any) -> ScriptedProducer:
        p = KeepingProducer(self, **kwargs)
        self.producers.append(p)
        return p


async def test_batch_max_records_bounds_each_partition_batch_and_windows_fill_them(buf) -> None:
    world = KeepingWorld()
    world.partitions["plant.telemetry"] = 3
    seqs = await buf.append([_ddata(f"m{i % 12}", i) for i in range(900)])
    uplink = KafkaUplink(_settings(batch_max_records=50), buf, [TELEMETRY], "g/e",
                         producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    sizes = [n for *_, n, _data in world.sent]
    assert max(sizes) <= 50 and sum(sizes) == 900 == len(world.log)
    # A window reads for up to 3 partitions and ends when one batch is full: the 12 keys
    # are spread unevenly (7/4/1 per partition), so the busiest partition's batches are
    # full. Windows of 50 records spread over 3 partitions would give 54 batches of <= 30.
    assert max(sizes) == 50 and len(sizes) <= 42, sizes
    per_key = _dedup_in_order(world.log)
    for d in range(12):
        assert per_key[f"plant-7/pump-3/m{d}".encode()] == seqs[d::12]
    # The batches are well-formed: relative offsets 0..n-1, record_count() matches, the
    # seq header and timestamp per record.
    for topic, partition, count, data in world.sent:
        batch = MemoryRecords(data).next_batch()
        recs = list(batch)
        assert [r.offset for r in recs] == list(range(count)), (topic, partition)
        for r in recs:
            seq = int(dict(r.headers)[H_SEQ])
            i = seqs.index(seq)
            assert r.timestamp == 1_700_000_000_000 + i
            assert r.key == f"plant-7/pump-3/m{i % 12}".encode()


async def test_a_record_for_two_mappings_goes_to_both_or_waits_for_the_next_window(buf) -> None:
    world = KeepingWorld()
    copy = Mapping("copy", ("spBv1.0/#",), "plant.copy", key="topic")
    seqs = await buf.append([_ddata("m1", i) for i in range(120)])
    uplink = KafkaUplink(_settings(batch_max_records=50), buf, [TELEMETRY, copy], "g/e",
                         producer_factory=world.factory)
    await _run_until(uplink, lambda: flat(uplink.state)["acked_seq"] == seqs[-1])
    assert max(n for *_, n, _d in world.sent) <= 50
    assert _dedup_in_order(world.log) == {b"plant-7/pump-3/m1": seqs}
    assert _dedup_in_order(world.log, "plant.copy") == {b"spBv1.0/plant-7/DDATA/pump-3/m1": seqs}
    assert flat(uplink.state)["messages"] == 240


EVENTS = Mapping("events", ("spBv1.0/+/DDATA/pump-3/valve",), "plant.events")


@pytest.mark.parametrize("level", ["metadata", "produce"])
async def test_a_refused_topic_is_held_in_order_while_the_others_flow(buf, level) -> None:
    world = World()
    (world.unauthorized if level == "metadata" else world.write_denied).add("plant.events")
    uplink = KafkaUplink(_settings(), buf, [TELEMETRY, EVENTS], "g/e", producer_factory=world.factory)
    # Stamped now: the quarantine keeps them under the same max_age as the buffer.
    fresh = lambda dev, i: dataclasses.replace(_ddata(dev, i), ts_ms=int(time.time() * 1000))  # noqa: E731
    seqs = await buf.append([fresh("valve" if i % 3 == 0 else "m1", i) for i in range(30)])
    task = asyncio.create_task(uplink.run())
    try:
        await until(lambda: (uplink.state.extra["acked_seq"] or 0) >= seqs[-1] and uplink.state.up, 10,
                    "all acked, link up", interval_s=0.01)
        # The healthy mapping got everything; the refused topic got nothing; the link is up.
        events = [v for t, _p, _k, v, _h in world.log if t == "plant.events"]
        assert events == []
        assert len([1 for t, *_ in world.log if t == "plant.telemetry"]) == 30
        st = uplink.state.as_dict()
        assert st["up"] and "plant.events" in st["refused"], st
        assert "Authorization" in st["refused"]["plant.events"]["reason"], st
        held = (await buf.stats())["quarantine"]["by_cursor_reason"]["kafka"]["held:plant.events"]
        assert held == 10
        assert len(world.producers) <= 3, "no producer storm"
        # The refusal is lifted: the held records go, oldest first, and the topic flows again.
        world.unauthorized.clear()
        world.write_denied.clear()
        await buf.append([fresh("valve", 99)])
        await until(lambda: len([1 for t, *_ in world.log if t == "plant.events"]) >= 11, 10,
                    "held records delivered", interval_s=0.01)
        events = [v for t, _p, _k, v, _h in world.log if t == "plant.events"]
        assert [int(v.split(b":")[1]) for v in events] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 99]
        await until(lambda: not uplink.state.refused, 10, "topic accepted again", interval_s=0.01)
        assert (await buf.stats())["quarantine"]["records"] == 0
    finally:
        await uplink.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
