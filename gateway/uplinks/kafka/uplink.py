"""Kafka uplink: the one I/O task that forwards buffered records to Apache Kafka.

Reads the buffer through its own cursor ("kafka") in bounded windows, has the pure
accumulator (gateway.uplinks.kafka.accumulator) turn each record into one Kafka message per
matching `[[kafka.mappings]]` entry, hands each window to an idempotent producer (acks=all)
as at most one record batch per topic-partition, and acknowledges the buffer only after
Kafka acknowledged every batch of the window, windows in order. At most two windows are in
flight, so reading and formatting overlap the round trip; memory is bounded by them, never
by the backlog. A window is read and formatted on the buffer's thread in one call
(`AsyncBuffer.read_with`: rows, not a Record each); its batches are encoded and compressed
on a worker thread (the compressor releases the GIL) while the next window is formatted, and
reach the producer in window order. aiokafka is reached only through
gateway.uplinks.kafka.adapter.

Order and duplicates: aiokafka sends one batch per partition at a time and, idempotent,
never lets a later batch of a partition land after an earlier one failed. On any failure
(timeout, broker restart, link cut or blackholed) the producer is thrown away and a new
one sends again from the buffer cursor: every record arrives, in order per key, and only
a batch the broker had appended without the ack reaching us is repeated (at most one
per partition). The `outpost-gateway`/`outpost-stream`/`outpost-seq` headers let a
consumer drop those duplicates.

A stuck link (blackhole: no RST, nothing answers) is detected by a delivery deadline of
twice `request_timeout`; reconnects follow the one backoff (common.backoff). The clock rule
(gateway.records) is applied to every record stamped on an unsynchronised clock. Outcomes
are counted through the uplink contract (gateway.uplinks.core): `delivered` (records Kafka
acknowledged), `messages`, `bytes`, `unmatched` (no mapping names the record's topic,
acknowledged past as a broker's MQTT-to-Kafka extension ignores such topics), `refused`
(larger than a batch or not encodable in its mapping's format), `resent` (windows sent
again after a failure).
"""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from buffer import Record, Row
from common.backoff import Backoff
from common.logs import fields
from gateway.errors import UplinkError
from gateway.records import H_TOPIC, H_TYPE
from gateway.uplinks.core import HeldDestination, UplinkState, held_key, held_topics
from gateway.uplinks.kafka import adapter
from gateway.uplinks.kafka.accumulator import (
    BATCH_OVERHEAD,
    DONE,
    FULL,
    HELD,
    MISS,
    Cached,
    Route,
    Window,
    cached,
    route_entry,
    route_key,
)
from gateway.uplinks.kafka.format import MessageFactory
from gateway.uplinks.kafka.mappings import Mapping, MappingTable
from gateway.uplinks.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

CURSOR = "kafka"
_MIN_BATCH_BYTES = 16 * 1024
_YIELD_EVERY = 256  # records formatted between yields to the event loop
# Windows handed to the producer before the oldest is acknowledged. aiokafka sends one
# batch per partition at a time and, being idempotent, never lets a later batch of a
# partition land after an earlier one failed, so this overlaps reading and formatting with
# the round trip without risking order; a resend repeats at most the unacknowledged ones.
_PIPELINE_DEPTH = 2
_LAG_EVERY_S = 5.0
_PAYLOAD = operator.itemgetter(4)  # a buffer row's payload
# A window reads enough records to fill the batches of this many partitions (see
# _window_limits); it bounds the memory a window takes to this many batches.
_MAX_FANOUT = 4
_ROUTES_MAX = 4096
COUNTERS = ("delivered", "messages", "bytes", "unmatched", "held", "quarantined", "resent")



class _RenewProducer(Exception):
    """A partition refused a batch: take a fresh idempotent producer (no link outage)."""


@dataclass(slots=True)
class _InFlight:
    """Batches of one window of buffered records: built off the event loop, then handed to
    the producer (`queued` gives their delivery futures, in window order)."""

    queued: asyncio.Task[list[Any]]
    batches: dict[tuple[str, int], Any]
    last_seq: int
    n_records: int
    n_messages: int
    n_delivered: int  # records sent (n_records less the unmatched and refused ones)
    seqs: dict[tuple[str, int], list[int]]  # seqs per topic-partition batch


@dataclass(slots=True)
class _Read:
    """A window as `_read_ahead` filled it on the buffer's thread (see `_finish_fill`)."""

    window: Window
    rows: list[Row]
    index: int  # rows[index:] are not in the window yet
    outcome: int  # Window.fill's
    streams: Any
    hsets: Any
    upto: int | None  # the seq the next read starts after


class KafkaUplinkError(UplinkError):
    """The Kafka link failed (connect, metadata, delivery deadline); retried with backoff."""

    retriable = True


def _consume_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class KafkaUplink:
    """Forward buffered records to Kafka. One owner task runs `run()`; `stop()` ends it."""

    def __init__(
        self,
        settings: KafkaSettings,
        buffer: Any,
        mappings: MappingTable | Iterable[Mapping],
        gateway_id: str,
        *,
        producer_factory: Callable[..., Any] | None = None,
        clock: Any = None,
    ) -> None:
        self._s = settings
        self._buffer = buffer  # an AsyncBuffer (contract 2)
        self._table = mappings if isinstance(mappings, MappingTable) else MappingTable(mappings)
        self._gateway_id = gateway_id
        self._producer_factory = producer_factory or adapter.new_producer
        self._clock = clock  # gateway.clock.ClockGuard: the clock rule (gateway.records)
        self._batch_limit = settings.batch_max_bytes
        self._stopping = asyncio.Event()
        self._running = False
        self._done: asyncio.Event | None = None
        # key -> partition per topic, valid for one partition count
        self._partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        self.state = UplinkState("kafka", counters=COUNTERS, logger=log)
        self.state.server = settings.where
        self.state.extra.update({"acked_seq": None, "lag_records": None, "oldest_buffered_age_s": None})
        self._backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)
        self._factory = MessageFactory(gateway_id)
        # route_key(stream id, headers set id) -> cached route; see _fill() and _route()
        self._routes: dict[int, Cached] = {}
        self._route_sets: Any = None  # the buffer's header sets the route ids refer to
        self._ack_task: asyncio.Task[None] | None = None
        self._last_queued: asyncio.Task[list[Any]] | None = None  # the latest window's _queue
        self._partitions_checked = 0.0
        self._lag_checked = 0.0
        self._pumped_ok = False
        self._held: dict[str, HeldDestination] = {}
        self._build_thread: ThreadPoolExecutor | None = None  # see _builder()

    # --- public ------------------------------------------------------------------------

    async def run(self) -> None:
        """Forward records until `stop()`; link errors are retried, anything else raises."""
        if self._running:
            raise RuntimeError("KafkaUplink.run() is already running")
        self._running = True
        self._done = asyncio.Event()
        self._stopping.clear()
        try:
            await self._buffer.register_cursor(CURSOR)
            await self._load_held()
            if not self._table.mappings:
                log.warning("kafka uplink has no [[kafka.mappings]]: records are acknowledged "
                            "without being sent (counted as unmatched)")
            for a, b, example in self._table.overlaps():
                log.info("kafka mappings overlap: such records go to both",
                         extra=fields(mapping_a=a, mapping_b=b, example_topic=example))
            while not self._stopping.is_set():
                producer = None
                graceful = False
                try:
                    producer = await self._connect()
                    await self._pump(producer)
                    graceful = True
                except _RenewProducer:
                    pass
                except Exception as exc:
                    if not adapter.is_link_error(exc):
                        raise
                    self._link_down(exc)
                    if self._pumped_ok:
                        self._backoff.reset()  # the link worked for a while: start over
                    await self._sleep_unless_stopped(self._backoff.next())
                finally:
                    if producer is not None:
                        await adapter.close_producer(producer, self._s.where,
                                                     self._s.request_timeout_s + 5, graceful=graceful)
        finally:
            self._running = False
            if self._build_thread is not None:
                # At most one window's build is left to finish (milliseconds).
                self._build_thread.shutdown(wait=True)
                self._build_thread = None
            self.state.stopped()
            self._done.set()

    def _builder(self) -> ThreadPoolExecutor:
        """The one thread that encodes and compresses this uplink's batches. One, not
        asyncio's default pool: every thread that allocates gets its own malloc arena, and
        the pool's threads cost the gateway about 4 MB of resident memory at 10k samples/s
        (70.9 -> 67.1 MB peak in the gateway benchmark)."""
        if self._build_thread is None:
            self._build_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outpost-kafka-build")
        return self._build_thread

    async def stop(self) -> None:
        """Ask `run()` to finish after the window in flight; waits a bounded time for it."""
        self._stopping.set()
        if self._running and self._done is not None:
            try:
                await asyncio.wait_for(self._done.wait(), timeout=self._s.request_timeout_s * 2 + 5)
            except TimeoutError:
                log.warning("kafka uplink did not stop in time; its owner should cancel it")

    # --- connection ----------------------------------------------------------------------

    async def _connect(self) -> Any:
        s = self._s
        kwargs = adapter.client_kwargs(s)
        kwargs.update(
            acks="all",
            enable_idempotence=True,
            compression_type=None if s.compression == "none" else s.compression,
            linger_ms=0,  # the uplink builds its own batches and lingers on the buffer
            max_batch_size=self._batch_limit + 64 * 1024,
            max_request_size=max(self._batch_limit + 64 * 1024, 1_048_576),
        )
        producer = self._producer_factory(**kwargs)
        try:
            # start() bootstraps and fetches a producer id; on a blackholed link it would
            # wait for every request timeout in turn, so bound it as a whole.
            await asyncio.wait_for(producer.start(), timeout=s.request_timeout_s + 5)
        except BaseException:
            await adapter.close_producer(producer, s.where, s.request_timeout_s + 5, graceful=False)
            raise
        return producer

    # --- forwarding ----------------------------------------------------------------------

    def _window_limits(self) -> tuple[int, int]:
        """(records, payload bytes) read from the buffer for one window.

        `batch_max_records`/`batch_max_bytes` bound each Kafka record batch, and a window
        holds at most one batch per topic-partition; so a window reads enough to fill the
        batches of up to `_MAX_FANOUT` partitions. Fewer, fuller batches cost the broker and
        the link less per record than many thin ones (a local broker spent ~40% less CPU
        per record on 1000-record batches than on the 333-record batches of a 1000-record
        window over 3 partitions), and memory stays bounded by `_MAX_FANOUT` batches.
        """
        s = self._s
        known = sum(len(parts) for parts, _ in self._partitions.values())
        fan = min(_MAX_FANOUT, max(1, known))
        return s.batch_max_records * fan, s.batch_max_bytes * fan

    async def _pump(self, producer: Any) -> None:
        """Send windows until stopped; raises on any delivery failure (producer is dropped)."""
        s = self._s
        inflight: deque[_InFlight] = deque()
        after: int | None = None  # last seq put into a window
        read_upto: int | None = None  # last seq read from the buffer (>= after)
        carry: list[Row] = []  # rows read but left out of a window that filled a batch
        ahead: asyncio.Task[_Read] | None = None  # the next window, read while this one goes

        self._pumped_ok = False
        try:
            while not self._stopping.is_set():
                if len(inflight) < _PIPELINE_DEPTH:
                    if ahead is None:
                        ahead = self._read_ahead(producer, self._new_window(producer), carry, read_upto or after)
                    job, ahead = await ahead, None
                    window = job.window
                    carry, read_upto = await self._finish_fill(producer, job)
                    if (window.n_records and not inflight and s.linger_s > 0 and not carry
                            and window.n_records < self._window_limits()[0]):
                        # Live trickle, not a backlog: let a few more arrive so that one
                        # request carries them (fewer bytes on a link paid by the MB).
                        await self._sleep_unless_stopped(s.linger_s)
                        job = await self._read_ahead(producer, window, [], read_upto)
                        carry, read_upto = await self._finish_fill(producer, job)
                    # `carry`: rows left out because a batch filled; they open the next window.
                    if window.n_records:
                        if await self._partitions_changed(producer):
                            # Routes changed under this window (not handed over yet): format
                            # its records again.
                            carry, read_upto = [], after
                            continue
                        # The buffer's thread reads and formats the next window while this
                        # one is handed over and the loop waits for Kafka.
                        ahead = self._read_ahead(producer, self._new_window(producer), carry, read_upto)
                        w = await self._send_window(producer, window)
                        inflight.append(w)
                        after = w.last_seq
                        continue
                if inflight:
                    await self._complete(inflight.popleft())
                    continue
                if self._held and await self._serve_held(producer):
                    continue
                await self._refresh_lag()
                await self._buffer.wait_for_records(CURSOR, 0.5, after_seq=after)
            # Stopping: finish what is in flight, so a restart does not send it twice.
            while inflight:
                await self._complete(inflight.popleft())
        finally:
            if ahead is not None:
                await _cancel(ahead)
            for w in inflight:  # abandoned with the producer; the buffer still holds them
                await _cancel(w.queued)
                if not w.queued.cancelled() and w.queued.exception() is None:
                    for f in w.queued.result():
                        f.add_done_callback(_consume_outcome)
            self._last_queued = None
            await self._settle_ack()

    async def _partitions_changed(self, producer: Any) -> bool:
        """Partition counts may change (topic expanded): re-checked every few seconds while
        records flow. True when a topic's partitions changed or it is refused now."""
        now = time.monotonic()
        if now - self._partitions_checked <= 5.0:
            return False
        self._partitions_checked = now
        changed = False
        for topic in list(self._partitions):
            try:
                parts = await self._partitions_of(producer, topic)
            except adapter.DestinationRefused as exc:
                del self._partitions[topic]
                self._hold(topic, exc.reason)
                changed = True
                continue
            if parts != self._partitions[topic][0]:
                del self._partitions[topic]
                self._routes.clear()
                changed = True
        return changed

    def _new_window(self, producer: Any) -> Window:
        if len(self._routes) >= _ROUTES_MAX:
            self._routes.clear()  # streams are few; a full cache means churn: start over
        return Window(lambda: adapter.fast_slot(producer.create_batch()), self._factory,
                      self._batch_limit - BATCH_OVERHEAD, self._s.batch_max_records, self._clock)

    def _read_ahead(self, producer: Any, window: Window, carry: list[Row],
                    after_seq: int | None) -> asyncio.Task[_Read]:
        """Start filling `window` with `carry` and then the buffered rows after `after_seq`.

        The rows are read and formatted on the buffer's thread in one call: a backlog's
        rows then never wait for the event loop, nor it for them (SQLite hands rows over
        one step at a time, each giving up the GIL: read on one thread while another
        formatted, the two ran one row at a time, and the drain no faster than either
        alone). It stops at a row whose route is not cached (a new stream, the cache
        cleared); `_finish_fill` resolves it and fills the rest on the loop. Cached routes
        change only in the pump between windows, never while one is read ahead: what drops
        them then (a topic refused a window's batch, a failure) ends the pump, and the
        window read ahead with it; the next pump reads again from the cursor.
        """
        limit, max_bytes = self._window_limits()
        routes = self._routes
        if carry:
            limit -= len(carry)
            max_bytes -= sum(map(len, map(_PAYLOAD, carry)))
            if max_bytes <= 0:
                limit = 0  # the carried rows are a window's worth already

        def consume(rows: list[Row], streams: Any, hsets: Any) -> _Read:
            if hsets is not self._route_sets:
                # The buffer recovered (new file, new ids): cached ids mean other things.
                if self._route_sets is not None and carry:
                    raise KafkaUplinkError("the buffer recovered from corruption: reading again")
                routes.clear()
                self._route_sets = hsets
            upto = rows[-1][0] if rows else after_seq
            if carry:
                rows = carry + rows
            i, outcome = window.fill(rows, 0, len(rows), routes, streams, hsets)
            return _Read(window, rows, i, outcome, streams, hsets, upto)

        return asyncio.create_task(self._buffer.read_with(
            CURSOR, consume, limit=limit, max_bytes=max_bytes, after_seq=after_seq),
            name="kafka-uplink-read")

    async def _finish_fill(self, producer: Any, job: _Read) -> tuple[list[Row], int | None]:
        """Resolve the routes `_read_ahead` stopped at and fill the rest of its rows here.
        Returns (the rows left out because a batch filled, the seq the next read starts after)."""
        window, rows, i, outcome = job.window, job.rows, job.index, job.outcome
        streams, hsets, routes = job.streams, job.hsets, self._routes
        n = len(rows)
        while outcome == MISS:
            seq, sid, ts_ms, hid, payload = rows[i]
            rec = Record(seq, streams[sid], ts_ms, hsets[hid], payload)
            route = await self._route(producer, rec)
            routes[route_key(sid, hid)] = cached(route, rec.headers)
            if not window.add(rec, route):
                outcome = FULL
                break
            i += 1
            # The rest on the loop (rare: a new stream), yielding to live work now and then.
            while True:
                i, outcome = window.fill(rows, i, min(n, i + _YIELD_EVERY), routes, streams, hsets)
                if outcome != DONE or i >= n:
                    break
                await asyncio.sleep(0)
        return (rows[i:] if outcome == FULL else []), job.upto

    async def _partition_for(self, producer: Any, topic: str, key: bytes) -> int:
        cached = self._partitions.get(topic)
        if cached is None:
            parts = await self._partitions_of(producer, topic)
            if not parts:
                raise KafkaUplinkError(f"kafka topic {topic!r} has no partitions")
            cached = (parts, {})
            self._partitions[topic] = cached
        parts, by_key = cached
        p = by_key.get(key)
        if p is None:
            p = adapter.murmur2_partition(key, parts)
            by_key[key] = p
        return p

    async def _partitions_of(self, producer: Any, topic: str) -> list[int]:
        """Partitions from cluster metadata; DestinationRefused for a refused or unknown topic."""
        # Short: the pump waits for this, and every healthy mapping with it. A topic the
        # brokers create on first use has its leader within a second; one that does not
        # exist is held and probed again with backoff (each probe one metadata round trip).
        wait = 0.0 if topic in self._held else min(1.0, self._s.request_timeout_s)
        return await adapter.topic_partitions(producer, topic, wait)

    async def _send_window(self, producer: Any, window: Window) -> _InFlight:
        """Hand a filled window's batches over: built off the loop, queued in window order."""
        self._note_window(window)
        await self._set_aside(window)
        batches = {tp: adapter.finish_slot(slot) for tp, slot in window.slots.items()}
        for b in batches.values():
            b.close()
        # Encoding and compressing the batches (a third of a drain's CPU) runs on a worker
        # thread while this task formats the next window; the batches reach the producer
        # in window order, so per partition they are sent in buffer order as before.
        queued = asyncio.create_task(self._queue(producer, batches, window.n_messages, self._last_queued),
                                     name="kafka-uplink-queue")
        self._last_queued = queued
        assert window.last_seq is not None  # a window with records has a last one
        last_seq = window.last_seq
        aside = {r.seq for r in window.refused} | {seq for seq, _ in window.held}
        delivered = window.n_records - window.unmatched - len(aside)
        seqs = {tp: slot[4] for tp, slot in window.slots.items()}
        return _InFlight(queued, batches, last_seq, window.n_records, window.n_messages, delivered, seqs)

    async def _queue(self, producer: Any, batches: dict[tuple[str, int], Any], n_messages: int,
                     previous: asyncio.Task[list[Any]] | None) -> list[Any]:
        """Build `batches` off the event loop, then hand them to the producer after the
        previous window's; their delivery futures."""
        if batches:
            await asyncio.get_running_loop().run_in_executor(
                self._builder(), adapter.build_batches, list(batches.values()))
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        if previous is not None and (previous.cancelled() or previous.exception() is not None):
            raise KafkaUplinkError(f"kafka {self._s.where}: the window before this one was not queued")
        futures: list[Any] = []
        deadline = self._s.request_timeout_s * 2
        try:
            async with asyncio.timeout(deadline):
                for (topic, partition), b in batches.items():
                    futures.append(await producer.send_batch(b, topic, partition=partition))
        except TimeoutError:
            self._abandon(futures)
            raise KafkaUplinkError(
                f"kafka {self._s.where}: could not queue {n_messages} messages within "
                f"{deadline:g}s (no metadata?); recreating the producer"
            ) from None
        return futures

    def _note_window(self, window: Window) -> None:
        """Count what the accumulator stepped past: unmatched records."""
        self.state.count("unmatched", window.unmatched)

    async def _set_aside(self, window: Window) -> None:
        """Records the window does not send go to the buffer's quarantine before it is acked:
        refused for the record (larger than a batch, not encodable in its mapping's format),
        or held because their Kafka topic is refused. Nothing is skipped uncounted."""
        for r in window.refused:
            reason = f"{r.reason}:{r.mapping}"[:200]
            await self._buffer.quarantine(CURSOR, r.seq, reason)
            self.state.count("quarantined")
            self.state.error(f"{r.mapping}:{r.reason}", "kafka record quarantined",
                             mapping=r.mapping, seq=r.seq, stream=r.stream, reason=r.reason,
                             detail=r.detail)
        for seq, topic in window.held:
            await self._buffer.quarantine(CURSOR, seq, held_key(topic))
            self.state.count("held")

    async def _route(self, producer: Any, rec: Any, only: str | None = None) -> Route:
        """Where records of `rec`'s (stream, topic, type) go: one entry per mapping (`only`:
        just the mappings to that Kafka topic). A refused topic gives a HELD entry."""
        topic = rec.headers.get(H_TOPIC, rec.stream)
        msg_type = rec.headers.get(H_TYPE, "")
        out = []
        for m in self._table.select(topic):
            kafka_topic, key = self._factory.parts(m, rec.stream, topic, msg_type)[:2]
            if only is not None and kafka_topic != only:
                continue
            if only is None and kafka_topic in self._held:
                out.append((HELD, kafka_topic, m))
                continue
            try:
                tp = (kafka_topic, await self._partition_for(producer, kafka_topic, key))
            except adapter.DestinationRefused as exc:
                if only is not None:
                    raise
                self._hold(kafka_topic, exc.reason)
                out.append((HELD, kafka_topic, m))
                continue
            out.append(route_entry(self._factory, m, rec.stream, topic, msg_type, tp))
        return tuple(out)

    # --- held topics -------------------------------------------------------------------

    def _hold(self, topic: str, reason: str) -> None:
        held = self._held.get(topic)
        if held is None:
            held = self._held[topic] = HeldDestination(topic, Backoff(self._s.reconnect_min_s, self._s.reconnect_max_s))
            self._routes.clear()  # routes to it become HELD entries
        held.draining = False
        held.next_probe = time.monotonic() + held.backoff.next()
        self.state.refuse(topic, reason)

    async def _load_held(self) -> None:
        """After a restart: topics with records held in the buffer are probed first."""
        for topic in held_topics(await self._buffer.stats(), CURSOR):
            backoff = Backoff(self._s.reconnect_min_s, self._s.reconnect_max_s)
            self._held.setdefault(topic, HeldDestination(topic, backoff))

    async def _serve_held(self, producer: Any) -> bool:
        """Probe each held topic that is due; drain one window of a topic that accepts again.

        Records of a held topic read meanwhile go aside behind the older ones, so the drain
        delivers them oldest first, and the topic flows directly again only once nothing of
        it is held. Returns True when something was sent.
        """
        now = time.monotonic()
        for topic, held in list(self._held.items()):
            if not held.draining:
                if now < held.next_probe:
                    continue
                try:
                    self._partitions.pop(topic, None)
                    await self._partitions_of(producer, topic)
                except adapter.DestinationRefused as exc:
                    self._hold(topic, exc.reason)
                    continue
                held.draining = True
            batch = await self._buffer.quarantine_list(CURSOR, held.reason_key,
                                                       limit=self._s.batch_max_records)
            if not batch:
                del self._held[topic]
                self._routes.clear()
                held.backoff.reset()
                self.state.accept(topic)
                continue
            window = Window(lambda: adapter.fast_slot(producer.create_batch()), self._factory,
                            self._batch_limit - BATCH_OVERHEAD, self._s.batch_max_records, self._clock)
            try:
                for rec in batch:
                    if not window.add(rec, await self._route(producer, rec, only=topic)):
                        break
            except adapter.DestinationRefused as exc:
                self._hold(topic, exc.reason)
                continue
            sent = [rec.seq for rec in batch[: window.n_records]]
            futures = []
            for (t, partition), slot in window.slots.items():
                b = adapter.finish_slot(slot)
                b.close()
                futures.append(await producer.send_batch(b, t, partition=partition))
            if futures:
                done, _ = await asyncio.wait(futures, timeout=self._s.request_timeout_s * 2)
                errors = [f.exception() for f in done if f.exception() is not None]
                if len(done) < len(futures) or errors:
                    for f in futures:
                        f.add_done_callback(_consume_outcome)
                    if errors and all(adapter.refuses_destination(e) for e in errors):
                        self._hold(topic, f"{type(errors[0]).__name__}: {errors[0]}")
                        raise _RenewProducer
                    raise KafkaUplinkError(f"kafka {self._s.where}: held records for {topic!r} "
                                           f"not acknowledged: {errors[0] if errors else 'timeout'}")
            await self._buffer.quarantine_delivered(CURSOR, sent)
            self.state.count("delivered", len(sent))
            self.state.count("messages", window.n_messages)
            return True
        return False

    def _abandon(self, futures: list[Any]) -> None:
        self.state.count("resent")
        for f in futures:  # abandoned with the producer; their outcome no longer matters
            f.add_done_callback(_consume_outcome)

    async def _complete(self, w: _InFlight) -> None:
        """Wait for Kafka's ack of the oldest window in flight, then ack the buffer."""
        deadline = self._s.request_timeout_s * 2
        futures = await w.queued  # raises what queueing raised (a timeout: KafkaUplinkError)
        if futures:
            started = time.monotonic()
            done, _ = await asyncio.wait(futures, timeout=deadline)
            if len(done) < len(futures):
                self._abandon(futures)
                raise KafkaUplinkError(
                    f"kafka {self._s.where}: {w.n_messages} messages not acknowledged within "
                    f"{deadline:g}s (link stalled?); recreating the producer and sending them again"
                )
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors and all(adapter.refuses_destination(e) for e in errors):
                await self._hold_window_refusals(w, futures)
                raise _RenewProducer
            if errors:
                self.state.count("resent")
                exc = errors[0]
                if adapter.is_too_large(exc) and self._batch_limit > _MIN_BATCH_BYTES:
                    # The broker's message.max.bytes is below our batch size: shrink, resend.
                    self._batch_limit = max(_MIN_BATCH_BYTES, self._batch_limit // 2)
                    log.warning("kafka batch refused as too large: batches made smaller",
                                extra=fields(where=self._s.where, messages=w.n_messages,
                                             batch_max_bytes=self._batch_limit))
                raise KafkaUplinkError(
                    f"kafka {self._s.where}: delivery of {w.n_messages} messages failed: {exc}"
                ) from exc
            elapsed = time.monotonic() - started
        else:
            elapsed = 0.0
        # Built batches report their compressed size: the bytes that went on the wire.
        wire = sum(b.size() for b in w.batches.values())
        await self._ack(w.last_seq, w.n_delivered)
        await self._refresh_lag()
        self.state.count("messages", w.n_messages)
        self.state.count("bytes", wire)
        self._pumped_ok = True
        self.state.link_up(self._s.where)
        if self._s.max_bytes_per_s:
            pause = wire / self._s.max_bytes_per_s - elapsed
            if pause > 0:
                await self._sleep_unless_stopped(pause)
        else:
            await asyncio.sleep(0)  # let live work (polling, MQTT) run between windows

    async def _hold_window_refusals(self, w: _InFlight, futures: list[Any]) -> None:
        """The cluster refused some topics' batches of this window (produce-level: e.g. an ACL
        that allows describing the topic but not writing to it): those records are held, the
        rest of the window was acknowledged, and the window is done."""
        held: set[int] = set()
        for (topic, partition), fut in zip(w.batches, futures, strict=True):
            exc = fut.exception()
            if exc is None:
                continue
            self._hold(topic, f"{type(exc).__name__}: {exc}")
            for seq in w.seqs.get((topic, partition), []):
                await self._buffer.quarantine(CURSOR, seq, held_key(topic))
                self.state.count("held")
                held.add(seq)
        await self._ack(w.last_seq, max(0, w.n_delivered - len(held)))
        await self._settle_ack()
        self._pumped_ok = True
        self.state.link_up(self._s.where)  # the cluster answered: up, with a topic refused

    async def _refresh_lag(self) -> None:
        """Records behind the cursor, for `outpost status`; at most every few seconds."""
        now = time.monotonic()
        if now - self._lag_checked < _LAG_EVERY_S:
            return
        self._lag_checked = now
        stats = await self._buffer.stats()
        cursor = stats.get("cursors", {}).get(CURSOR, {})
        self.state.extra["lag_records"] = cursor.get("records")
        self.state.extra["oldest_buffered_age_s"] = stats.get("oldest_age_s")

    async def _ack(self, seq: int, n_records: int) -> None:
        """Ack the buffer in the background: one ack at a time, in order, errors surface."""
        await self._settle_ack()
        self._ack_task = asyncio.create_task(
            self._ack_body(seq, n_records), name="kafka-uplink-buffer-ack"
        )

    async def _ack_body(self, seq: int, n_records: int) -> None:
        await self._buffer.ack(CURSOR, seq)
        self.state.extra["acked_seq"] = seq
        self.state.count("delivered", n_records)

    async def _settle_ack(self) -> None:
        task, self._ack_task = self._ack_task, None
        if task is not None:
            await task

    # --- state ---------------------------------------------------------------------------

    def _link_down(self, exc: BaseException) -> None:
        self.state.link_down(str(exc) or type(exc).__name__, server=self._s.where)
        # Partition cache may be stale after an outage (topic recreated, expanded).
        self._partitions.clear()
        self._routes.clear()

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
