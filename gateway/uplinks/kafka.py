"""Kafka uplink: forwards buffered records to Apache Kafka over an unreliable link.

Reads the buffer through its own cursor ("kafka") in bounded windows, turns each record
into one Kafka message per matching `[[kafka.mappings]]` entry, hands each window to an
idempotent producer (acks=all) as at most one record batch per topic-partition, and
acknowledges the buffer only after Kafka acknowledged every batch of the window, windows
in order. `batch_max_records` and `batch_max_bytes` bound each of those batches, and a
window reads enough to fill the batches of up to four partitions (a record that would
overfill one opens the next window). At most two windows are in flight, so reading and
formatting overlap the round trip; memory is bounded by them, never by the backlog.

Draining a backlog is CPU-bound on a small gateway, so the batching loop works from
per-stream "routes" (topic-partition, key, the four fixed headers, size estimate) cached
once per (stream, topic, type): per record it only makes the `outpost-seq` header and
appends to aiokafka's record builder.

Order and duplicates: aiokafka sends one batch per partition at a time and, idempotent,
never lets a later batch of a partition land after an earlier one failed. On any failure
(timeout, broker restart, link cut or blackholed) the producer is thrown away and a new
one sends again from the buffer cursor: every record arrives, in order per key, and only
a batch the broker had appended without the ack reaching us is repeated (at most one
per partition). The `outpost-gateway`/`outpost-stream`/`outpost-seq` headers let a
consumer drop those duplicates.

A stuck link (blackhole: no RST, nothing answers) is detected by a delivery deadline of
twice `request_timeout`; reconnects follow a capped, jittered exponential backoff. A
record that matches no mapping is counted (`unmatched`) and acknowledged past, as a
broker's MQTT-to-Kafka extension ignores topics no mapping names; one that cannot be put
in its mapping's format (e.g. `json` of a non-Sparkplug payload) is counted
(`format_errors`), logged once per mapping and skipped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.errors import UplinkError
from gateway.kafka_format import H_SEQ, KafkaFormatError, KafkaMessage, MessageFactory
from gateway.mappings import Mapping, MappingTable

log = logging.getLogger(__name__)

CURSOR = "kafka"
_BATCH_OVERHEAD = 61  # Kafka record-batch v2 header bytes
_MIN_BATCH_BYTES = 16 * 1024
_YIELD_EVERY = 256  # records formatted between yields to the event loop
# Windows handed to the producer before the oldest is acknowledged. aiokafka sends one
# batch per partition at a time and, being idempotent, never lets a later batch of a
# partition land after an earlier one failed, so this overlaps reading and formatting with
# the round trip without risking order; a resend repeats at most the unacknowledged ones.
_PIPELINE_DEPTH = 2
_LAG_EVERY_S = 5.0
# A window reads enough records to fill the batches of this many partitions (see
# _window_limits); it bounds the memory a window takes to this many batches.
_MAX_FANOUT = 4
_ROUTES_MAX = 4096


@dataclass(slots=True)
class _Window:
    """Batches handed to the producer for one window of buffered records."""

    futures: list[Any]
    batches: dict[tuple[str, int], Any]
    last_seq: int
    n_records: int
    n_messages: int


class KafkaUplinkError(UplinkError):
    """The Kafka link failed (connect, metadata, delivery deadline); retried with backoff."""

    retriable = True


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """Connection and batching settings; field names follow the `[kafka]` config section."""

    bootstrap_servers: tuple[str, ...]
    client_id: str = "outpost"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    compression: str = "zstd"  # zstd | lz4 | gzip | none
    linger_s: float = 0.1
    batch_max_bytes: int = 1_000_000
    batch_max_records: int = 1000
    request_timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    metadata_max_age_s: float = 60.0
    max_bytes_per_s: float | None = None  # pace the backlog drain; None = as fast as acked

    def __post_init__(self) -> None:
        if not self.bootstrap_servers:
            raise ValueError("kafka: bootstrap_servers is empty")
        if self.compression not in ("zstd", "lz4", "gzip", "none"):
            raise ValueError(f"kafka: compression {self.compression!r} is not zstd|lz4|gzip|none")
        if self.batch_max_records < 1 or self.batch_max_bytes < 1024:
            raise ValueError("kafka: batch_max_records >= 1 and batch_max_bytes >= 1024 required")

    @classmethod
    def from_config(
        cls, section: Any, *, sasl_password: str | None = None, **overrides: Any
    ) -> KafkaSettings:
        """From the lead's `KafkaSection` (gateway.config); the password comes resolved."""
        values = {
            "bootstrap_servers": tuple(section.bootstrap_servers),
            "client_id": section.client_id or "outpost",
            "security_protocol": section.security_protocol,
            "sasl_mechanism": section.sasl_mechanism,
            "sasl_username": section.sasl_username,
            "sasl_password": sasl_password if sasl_password is not None else None,
            "ca_file": section.ca_file,
            "cert_file": section.cert_file,
            "key_file": section.key_file,
            "compression": section.compression,
            "linger_s": section.linger,
            "batch_max_bytes": section.batch_max_bytes,
            "batch_max_records": section.batch_max_records,
            "request_timeout_s": section.request_timeout,
            "reconnect_min_s": section.reconnect_min,
            "reconnect_max_s": section.reconnect_max,
        }
        values.update(overrides)
        return cls(**values)

    @property
    def where(self) -> str:
        return ",".join(self.bootstrap_servers)


def client_kwargs(s: KafkaSettings) -> dict[str, Any]:
    """Keyword arguments shared by aiokafka producers and consumers (address, security)."""
    kw: dict[str, Any] = {
        "bootstrap_servers": list(s.bootstrap_servers),
        "client_id": s.client_id,
        "security_protocol": s.security_protocol,
        "request_timeout_ms": int(s.request_timeout_s * 1000),
        "metadata_max_age_ms": int(s.metadata_max_age_s * 1000),
        "retry_backoff_ms": 250,
    }
    if s.security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        kw["ssl_context"] = create_ssl_context(
            cafile=s.ca_file, certfile=s.cert_file, keyfile=s.key_file
        )
    if s.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = s.sasl_mechanism or "PLAIN"
        kw["sasl_plain_username"] = s.sasl_username
        kw["sasl_plain_password"] = s.sasl_password
    return kw


def backoff_delay(
    attempt: int, min_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Capped exponential backoff with "equal jitter": half fixed, half random.

    The fixed half keeps a crowd of gateways from hammering a broker that just came back;
    the random half spreads them out.
    """
    cap = min(max_s, min_s * (2 ** min(attempt, 30)))
    return max(min_s, cap / 2 + rand() * cap / 2)


def _default_producer_factory(**kwargs: Any) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**kwargs)


def _is_link_error(exc: BaseException) -> bool:
    from aiokafka.errors import KafkaError

    if isinstance(exc, UplinkError):
        return exc.retriable
    return isinstance(exc, KafkaError | OSError | TimeoutError | ConnectionError)


def _too_large(exc: BaseException) -> bool:
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def _slot(batch: Any) -> list[Any]:
    """[batch, bytes used, records, raw append] for one topic-partition of a window.

    `raw append` is the C record builder's own `append(offset, timestamp, key, value,
    headers)` when `batch` is aiokafka's BatchBuilder without serializers (aiokafka
    0.12-0.14 internals, checked here): it skips a keyword-argument wrapper that costs
    about a tenth of the per-record CPU of a backlog drain. Otherwise None (public API).
    """
    from aiokafka.producer.message_accumulator import BatchBuilder

    raw = None
    if (
        type(batch) is BatchBuilder
        and getattr(batch, "_key_serializer", 0) is None
        and getattr(batch, "_value_serializer", 0) is None
        and getattr(batch, "_relative_offset", None) == 0
        and not batch.closed()
    ):
        raw = getattr(getattr(batch, "_builder", None), "append", None)
    return [batch, 0, 0, raw]


def _consume_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


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
    ) -> None:
        self._s = settings
        self._buffer = buffer  # an AsyncBuffer (contract 2)
        self._table = mappings if isinstance(mappings, MappingTable) else MappingTable(mappings)
        self._gateway_id = gateway_id
        self._producer_factory = producer_factory or _default_producer_factory
        self._batch_limit = settings.batch_max_bytes
        self._stopping = asyncio.Event()
        self._running = False
        self._done: asyncio.Event | None = None
        # key -> partition per topic, valid for one partition count
        self._partitions: dict[str, tuple[list[int], dict[bytes, int]]] = {}
        # status counters
        self._link = "down"
        self._since = time.time()
        self._last_error: str | None = None
        self._last_error_at: float | None = None
        self._records_acked = 0
        self._messages_sent = 0
        self._bytes_sent = 0
        self._unmatched = 0
        self._format_errors = 0
        self._rejected = 0
        self._windows_resent = 0
        self._acked_seq: int | None = None
        self._reconnects = 0
        self._logged_format_mappings: set[str] = set()
        self._factory = MessageFactory(gateway_id)
        # stream -> (topic header, type header, where its records go); see _route()
        self._routes: dict[str, tuple[str | None, str | None, tuple[tuple[Any, ...], ...]]] = {}
        self._ack_task: asyncio.Task[None] | None = None
        self._partitions_checked = 0.0
        self._lag: int | None = None
        self._lag_oldest_age_s: float | None = None
        self._lag_checked = 0.0

    # --- public ------------------------------------------------------------------------

    async def run(self) -> None:
        """Forward records until `stop()`; link errors are retried, anything else raises."""
        if self._running:
            raise RuntimeError("KafkaUplink.run() is already running")
        self._running = True
        self._done = asyncio.Event()
        self._stopping.clear()
        attempt = 0
        try:
            await self._buffer.register_cursor(CURSOR)
            if not self._table.mappings:
                log.warning("kafka uplink has no [[kafka.mappings]]: records are acknowledged "
                            "without being sent (counted as unmatched)")
            for a, b, example in self._table.overlaps():
                log.info(
                    "kafka mappings %r and %r overlap (e.g. topic %r): such records go to both",
                    a, b, example,
                )
            while not self._stopping.is_set():
                producer = None
                graceful = False
                try:
                    producer = await self._connect()
                    await self._pump(producer)
                    graceful = True
                except Exception as exc:
                    if not _is_link_error(exc):
                        raise
                    self._link_down(exc)
                    if self._pumped_ok:
                        attempt = 0  # the link worked for a while: start the backoff over
                    delay = backoff_delay(attempt, self._s.reconnect_min_s, self._s.reconnect_max_s)
                    attempt += 1
                    await self._sleep_unless_stopped(delay)
                finally:
                    if producer is not None:
                        await self._discard(producer, graceful=graceful)
        finally:
            self._running = False
            if self._link == "up":
                log.info("kafka uplink to %s stopped", self._s.where)
            self._set_link("stopped")
            self._done.set()

    async def stop(self) -> None:
        """Ask `run()` to finish after the window in flight; waits a bounded time for it."""
        self._stopping.set()
        if self._running and self._done is not None:
            try:
                await asyncio.wait_for(self._done.wait(), timeout=self._s.request_timeout_s * 2 + 5)
            except TimeoutError:
                log.warning("kafka uplink did not stop in time; its owner should cancel it")

    def state(self) -> dict[str, Any]:
        """For `outpost status`: link up/down since when, counters, last error, position."""
        return {
            "link": self._link,
            "since": self._since,
            "bootstrap_servers": list(self._s.bootstrap_servers),
            "records_sent": self._records_acked,  # buffer records Kafka acknowledged
            "records_acked": self._records_acked,  # the same, under the supervisor's name
            "messages_sent": self._messages_sent,
            "bytes_sent": self._bytes_sent,
            "unmatched": self._unmatched,
            "format_errors": self._format_errors,
            "rejected": self._rejected,
            "windows_resent": self._windows_resent,
            "reconnects": self._reconnects,
            "acked_seq": self._acked_seq,
            "lag_records": self._lag,  # records in the buffer not yet acknowledged by Kafka
            "oldest_buffered_age_s": self._lag_oldest_age_s,
            "last_error": self._last_error,
            "last_error_at": self._last_error_at,
        }

    # --- connection ----------------------------------------------------------------------

    async def _connect(self) -> Any:
        s = self._s
        kwargs = client_kwargs(s)
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
            await self._discard(producer)
            raise
        return producer

    async def _discard(self, producer: Any, *, graceful: bool = False) -> None:
        """Close a producer; after a failure, without waiting on the dead link."""
        limit = self._s.request_timeout_s + 5
        if not graceful:
            # stop() would flush, and with idempotence aiokafka retries a batch forever.
            # So stop the sender task (in-flight requests end within request_timeout) and
            # close the connections; the batches left are abandoned with the producer (the
            # buffer still holds their records). aiokafka internals (0.12-0.14), guarded.
            sender = getattr(producer, "_sender", None)
            task = getattr(sender, "sender_task", None)
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task], timeout=limit)
            client = getattr(producer, "client", None)
            if client is not None and hasattr(producer, "_closed"):
                try:
                    await asyncio.wait_for(client.close(), timeout=limit)
                except Exception as exc:
                    log.warning("kafka producer for %s did not close cleanly: %s",
                                self._s.where, exc)
                producer._closed = True  # closed by hand: no "unclosed producer" warning
                return
        try:
            await asyncio.wait_for(producer.stop(), timeout=limit)
        except Exception as exc:
            log.warning("kafka producer for %s did not close cleanly: %s", self._s.where, exc)

    # --- forwarding ----------------------------------------------------------------------

    _pumped_ok = False

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
        inflight: deque[_Window] = deque()
        after: int | None = None  # last seq put into a window: where the next read starts
        read_upto: int | None = None  # last seq read from the buffer (>= after)
        carry: list[Any] = []  # records read but left out of a window that filled a batch
        prefetch: asyncio.Task[list[Any]] | None = None

        def read(after_seq: int | None) -> Any:
            limit, max_bytes = self._window_limits()
            return self._buffer.read(CURSOR, limit=limit, max_bytes=max_bytes, after_seq=after_seq)

        self._pumped_ok = False
        try:
            while not self._stopping.is_set():
                records: list[Any] = []
                if len(inflight) < _PIPELINE_DEPTH:
                    if carry:
                        records, carry = carry, []
                        if prefetch is not None and len(records) < self._window_limits()[0]:
                            records += await prefetch
                            prefetch = None
                    elif prefetch is not None:
                        records, prefetch = await prefetch, None
                    else:
                        records = await read(after)
                        if (records and not inflight and s.linger_s > 0
                                and len(records) < self._window_limits()[0]):
                            # Live trickle, not a backlog: let a few more arrive so that one
                            # request carries them (fewer bytes on a link paid by the MB).
                            await self._sleep_unless_stopped(s.linger_s)
                            records = await read(after)
                if records:
                    if read_upto is None or records[-1].seq > read_upto:
                        read_upto = records[-1].seq
                    if prefetch is None and len(records) < 2 * self._window_limits()[0]:
                        # Read the next window on the buffer's thread while this one is
                        # formatted here (on a live trickle it just comes back empty).
                        # Bounded: records held stay below three windows' worth.
                        prefetch = asyncio.create_task(read(read_upto),
                                                       name="kafka-uplink-prefetch")
                    window = await self._send_window(producer, records)
                    inflight.append(window)
                    after = window.last_seq
                    if window.n_records < len(records):
                        # A batch filled: the rest opens the next window.
                        carry = records[window.n_records:]
                    continue
                if inflight:
                    await self._complete(inflight.popleft())
                    continue
                await self._refresh_lag()
                await self._buffer.wait_for_records(CURSOR, 0.5, after_seq=after)
            # Stopping: finish what is in flight, so a restart does not send it twice.
            while inflight:
                await self._complete(inflight.popleft())
        finally:
            if prefetch is not None:
                await _cancel(prefetch)
            await self._settle_ack()

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
            from aiokafka.partitioner import murmur2

            # The Java client's default partitioner, so other producers agree on placement.
            p = parts[(murmur2(key) & 0x7FFFFFFF) % len(parts)]
            by_key[key] = p
        return p

    async def _partitions_of(self, producer: Any, topic: str) -> list[int]:
        from aiokafka.errors import KafkaError

        try:
            return sorted(await producer.partitions_for(topic))
        except KafkaError as exc:
            # e.g. the topic does not exist and the brokers do not auto-create topics.
            raise KafkaUplinkError(
                f"kafka {self._s.where}: no metadata for topic {topic!r}: {exc}"
            ) from exc

    async def _send_window(self, producer: Any, records: list[Any]) -> _Window:
        """Format `records` (a prefix of them if a batch fills) and hand the batches over.

        A record goes into the window whole (to every mapping it matches) or not at all; the
        window ends before the first record that would push a topic-partition's batch past
        `batch_max_bytes` or `batch_max_records`.
        """
        now = time.monotonic()
        if now - self._partitions_checked > 5.0:
            # Partition counts may change (topic expanded): re-check now and then.
            self._partitions_checked = now
            for topic in list(self._partitions):
                parts = await self._partitions_of(producer, topic)
                if parts != self._partitions[topic][0]:
                    del self._partitions[topic]
                    self._routes.clear()
        # Per topic-partition: [batch, bytes used, records]; one batch each per window.
        slots: dict[tuple[str, int], list[Any]] = {}
        last_seq = records[0].seq
        n_records = n_messages = 0
        limit = self._batch_limit - _BATCH_OVERHEAD
        max_records = self._s.batch_max_records
        routes = self._routes
        if len(routes) >= _ROUTES_MAX:
            routes.clear()  # streams are few; a full cache means churn: start over
        for i, rec in enumerate(records):
            if i and i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            # Routes by stream, checked against the record's topic and type headers: no
            # per-record key tuple (the loop's allocations drive the cyclic GC).
            hdrs = rec.headers
            topic_h = hdrs.get("topic")
            type_h = hdrs.get("type")
            cached = routes.get(rec.stream)
            if cached is not None and cached[0] == topic_h and cached[1] == type_h:
                route = cached[2]
            else:
                route = await self._route(producer, rec)
                routes[rec.stream] = (topic_h, type_h, route)
            if not route:
                self._unmatched += 1
                last_seq = rec.seq
                n_records += 1
                continue
            seq_b = b"%d" % rec.seq
            payload = rec.payload
            if type(payload) is not bytes:
                payload = bytes(payload)
            if len(route) == 1 and route[0][0] is not None:
                # The common case (one sparkplug/raw mapping): no per-record allocation but
                # the seq header, the headers list and the batch's own encoding.
                tp, key, gw, st_h, tp_h, ty_h, fixed, m = route[0]
                size = fixed + len(seq_b) + len(payload)
                if size > limit:
                    self._reject(m, rec, size)
                    last_seq = rec.seq
                    n_records += 1
                    continue
                slot = slots.get(tp)
                if slot is None:
                    slot = slots[tp] = _slot(producer.create_batch())
                elif slot[1] + size > limit or slot[2] >= max_records:
                    break  # this record opens the next window
                headers = [gw, st_h, (H_SEQ, seq_b), tp_h, ty_h]
                raw = slot[3]
                if raw is not None:
                    done = raw(slot[2], rec.ts_ms, key, payload, headers)
                else:
                    done = slot[0].append(timestamp=rec.ts_ms, key=key, value=payload,
                                          headers=headers)
                if done is None:
                    raise AssertionError(f"batch for {tp} refused a record within its limit")
                slot[1] += size
                slot[2] += 1
                n_messages += 1
                last_seq = rec.seq
                n_records += 1
                continue
            placed = self._place_general(rec, route, slots, limit, max_records)
            if placed is None:
                break  # this record opens the next window (an empty batch takes any record)
            for tp, msg, size in placed:
                slot = slots.get(tp)
                if slot is None:
                    slot = slots[tp] = _slot(producer.create_batch())
                if slot[3] is not None:
                    done = slot[3](slot[2], msg.timestamp_ms, msg.key, msg.value, msg.headers)
                else:
                    done = slot[0].append(timestamp=msg.timestamp_ms, key=msg.key,
                                          value=msg.value, headers=msg.headers)
                if done is None:
                    raise AssertionError(f"batch for {tp} refused a record within its limit")
                slot[1] += size
                slot[2] += 1
                n_messages += 1
            last_seq = rec.seq
            n_records += 1
        batches = {}
        for tp, slot in slots.items():
            if slot[3] is not None:
                slot[0]._relative_offset = slot[2]  # what BatchBuilder.append would count
            batches[tp] = slot[0]
        futures = []
        deadline = self._s.request_timeout_s * 2
        try:
            async with asyncio.timeout(deadline):
                for (topic, partition), b in batches.items():
                    b.close()
                    futures.append(await producer.send_batch(b, topic, partition=partition))
        except TimeoutError:
            self._abandon(futures)
            raise KafkaUplinkError(
                f"kafka {self._s.where}: could not queue {n_messages} messages within "
                f"{deadline:g}s (no metadata?); recreating the producer"
            ) from None
        return _Window(futures, batches, last_seq, n_records, n_messages)

    async def _route(self, producer: Any, rec: Any) -> tuple[tuple[Any, ...], ...]:
        """Where records of `rec`'s (stream, topic, type) go: one entry per mapping.

        A `sparkplug`/`raw` mapping gives (topic-partition, key, the 4 fixed headers, fixed
        size, mapping); a `json` mapping gives (None, mapping, topic-partition): its value
        is made per record by the factory. Cached across windows in `_routes`, cleared
        whenever the partition cache changes.
        """
        topic = rec.headers.get("topic", rec.stream)
        msg_type = rec.headers.get("type", "")
        out: list[tuple[Any, ...]] = []
        for m in self._table.select(topic):
            kafka_topic, key, gw, st_h, tp_h, ty_h, fixed = self._factory.parts(
                m, rec.stream, topic, msg_type
            )
            tp = (kafka_topic, await self._partition_for(producer, kafka_topic, key))
            if m.format == "json":
                out.append((None, m, tp))
            else:
                out.append((tp, key, gw, st_h, tp_h, ty_h, fixed, m))
        return tuple(out)

    def _place_general(
        self,
        rec: Any,
        route: tuple[tuple[Any, ...], ...],
        slots: dict[tuple[str, int], list[Any]],
        limit: int,
        max_records: int,
    ) -> list[tuple[tuple[str, int], KafkaMessage, int]] | None:
        """Messages of one record for several mappings (or a json one), all or none.

        Returns the messages to append, or None if one of them does not fit its batch.
        """
        placed: list[tuple[tuple[str, int], KafkaMessage, int]] = []
        pending: dict[tuple[str, int], list[int]] = {}  # bytes and records with `placed`
        for entry in route:
            if entry[0] is None:
                _, m, tp = entry
                try:
                    msg, size = self._factory.make(rec, m)
                except KafkaFormatError as exc:
                    self._format_errors += 1
                    if m.name not in self._logged_format_mappings:
                        # Once per mapping: the counter in `outpost status` tells the rest.
                        self._logged_format_mappings.add(m.name)
                        log.error("kafka mapping %r: %s; record skipped", m.name, exc)
                    continue
            else:
                tp, key, gw, st_h, tp_h, ty_h, fixed, m = entry
                seq_b = b"%d" % rec.seq
                value = rec.payload if type(rec.payload) is bytes else bytes(rec.payload)
                msg = KafkaMessage(tp[0], key, value, [gw, st_h, (H_SEQ, seq_b), tp_h, ty_h],
                                   rec.ts_ms)
                size = fixed + len(seq_b) + len(value)
            if size > limit:
                self._reject(m, rec, size)
                continue
            cur = pending.get(tp)
            if cur is None:
                slot = slots.get(tp)
                cur = pending[tp] = [0, 0] if slot is None else [slot[1], slot[2]]
            if cur[1] and (cur[0] + size > limit or cur[1] >= max_records):
                return None  # an empty batch takes any record within the limit
            cur[0] += size
            cur[1] += 1
            placed.append((tp, msg, size))
        return placed

    def _reject(self, m: Mapping, rec: Any, size: int) -> None:
        self._rejected += 1
        log.error(
            "kafka mapping %r: record seq %d of %r is %d bytes, more than "
            "batch_max_bytes %d; record skipped",
            m.name, rec.seq, rec.stream, size, self._batch_limit,
        )

    def _abandon(self, futures: list[Any]) -> None:
        self._windows_resent += 1
        for f in futures:  # abandoned with the producer; their outcome no longer matters
            f.add_done_callback(_consume_outcome)

    async def _complete(self, w: _Window) -> None:
        """Wait for Kafka's ack of the oldest window in flight, then ack the buffer."""
        deadline = self._s.request_timeout_s * 2
        if w.futures:
            started = time.monotonic()
            done, _ = await asyncio.wait(w.futures, timeout=deadline)
            if len(done) < len(w.futures):
                self._abandon(w.futures)
                raise KafkaUplinkError(
                    f"kafka {self._s.where}: {w.n_messages} messages not acknowledged within "
                    f"{deadline:g}s (link stalled?); recreating the producer and sending them again"
                )
            errors = [f.exception() for f in w.futures if f.exception() is not None]
            if errors:
                self._windows_resent += 1
                exc = errors[0]
                if _too_large(exc) and self._batch_limit > _MIN_BATCH_BYTES:
                    # The broker's message.max.bytes is below our batch size: shrink, resend.
                    self._batch_limit = max(_MIN_BATCH_BYTES, self._batch_limit // 2)
                    log.warning(
                        "kafka %s rejected a %d-message batch as too large; batches now at "
                        "most %d bytes", self._s.where, w.n_messages, self._batch_limit,
                    )
                raise KafkaUplinkError(
                    f"kafka {self._s.where}: delivery of {w.n_messages} messages failed: {exc}"
                ) from exc
            elapsed = time.monotonic() - started
        else:
            elapsed = 0.0
        # Built batches report their compressed size: the bytes that went on the wire.
        wire = sum(b.size() for b in w.batches.values())
        await self._ack(w.last_seq, w.n_records)
        await self._refresh_lag()
        self._messages_sent += w.n_messages
        self._bytes_sent += wire
        self._pumped_ok = True
        self._set_link("up")
        if self._s.max_bytes_per_s:
            pause = wire / self._s.max_bytes_per_s - elapsed
            if pause > 0:
                await self._sleep_unless_stopped(pause)
        else:
            await asyncio.sleep(0)  # let live work (polling, MQTT) run between windows

    async def _refresh_lag(self) -> None:
        """Records behind the cursor, for `outpost status`; at most every few seconds."""
        now = time.monotonic()
        if now - self._lag_checked < _LAG_EVERY_S:
            return
        self._lag_checked = now
        stats = await self._buffer.stats()
        cursor = stats.get("cursors", {}).get(CURSOR, {})
        self._lag = cursor.get("records")
        self._lag_oldest_age_s = stats.get("oldest_age_s")

    async def _ack(self, seq: int, n_records: int) -> None:
        """Ack the buffer in the background: one ack at a time, in order, errors surface."""
        await self._settle_ack()
        self._ack_task = asyncio.create_task(
            self._ack_body(seq, n_records), name="kafka-uplink-buffer-ack"
        )

    async def _ack_body(self, seq: int, n_records: int) -> None:
        await self._buffer.ack(CURSOR, seq)
        self._acked_seq = seq
        self._records_acked += n_records

    async def _settle_ack(self) -> None:
        task, self._ack_task = self._ack_task, None
        if task is not None:
            await task

    # --- state ---------------------------------------------------------------------------

    def _set_link(self, link: str) -> None:
        if link != self._link:
            if link == "up":
                log.info("kafka uplink to %s is up", self._s.where)
            self._link = link
            self._since = time.time()

    def _link_down(self, exc: BaseException) -> None:
        text = str(exc) or type(exc).__name__
        if self._link == "up" or text != self._last_error:
            # Log the outage once and each new reason once, not every retry.
            log.warning("kafka uplink to %s is down: %s", self._s.where, text)
        if self._link == "up":
            self._reconnects += 1
        self._last_error = text
        self._last_error_at = time.time()
        self._set_link("down")
        # Partition cache may be stale after an outage (topic recreated, expanded).
        self._partitions.clear()
        self._routes.clear()

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
