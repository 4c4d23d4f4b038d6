"""Everything this project knows about aiokafka, fenced in one module.

The uplink and the inbound consumers talk to Kafka only through these functions: client
arguments from settings, producer and consumer factories, the Java client's partitioner,
outcome classification of aiokafka's errors, the fast record-append path of aiokafka's
batch builder, and closing a producer without waiting on a dead link. The last two rely on
aiokafka 0.12-0.14 internals; each is guarded and falls back to the public API.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from common.logs import fields
from gateway.errors import UplinkError
from gateway.uplinks.kafka.settings import KafkaSettings

log = logging.getLogger("outpost.kafka")


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


def new_producer(**kwargs: Any) -> Any:
    from aiokafka import AIOKafkaProducer

    return AIOKafkaProducer(**kwargs)


def new_consumer(*topics: str, **kwargs: Any) -> Any:
    from aiokafka import AIOKafkaConsumer

    return AIOKafkaConsumer(*topics, **kwargs)


def murmur2_partition(key: bytes, partitions: list[int]) -> int:
    """The Java client's default partitioner, so other producers agree on placement."""
    from aiokafka.partitioner import murmur2

    return partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]


class DestinationRefused(UplinkError):
    """The cluster answers but refuses a topic (not authorised, unknown with auto-create off,
    policy): its records are held and the topic probed, while the others keep flowing."""

    retriable = True

    def __init__(self, topic: str, reason: str) -> None:
        self.topic = topic
        self.reason = reason
        super().__init__(f"kafka topic {topic!r} refused: {reason}")


async def topic_partitions(producer: Any, topic: str, wait_s: float) -> list[int]:
    """The partitions of `topic`, from cluster metadata; DestinationRefused if the cluster
    refuses or does not know it within `wait_s` (aiokafka's own wait would block the whole
    pump for request_timeout on a topic that does not exist). Link errors propagate."""
    from aiokafka.errors import TopicAuthorizationFailedError, UnknownTopicOrPartitionError

    client = getattr(producer, "client", None)
    if getattr(client, "cluster", None) is None:  # not aiokafka's producer: the public call
        try:
            return sorted(await producer.partitions_for(topic))
        except TopicAuthorizationFailedError:
            raise DestinationRefused(topic, "not authorised (TopicAuthorizationFailed)") from None
        except UnknownTopicOrPartitionError:
            raise DestinationRefused(topic, "unknown topic (UnknownTopicOrPartition)") from None
    parts = client.cluster.partitions_for_topic(topic)
    if parts:
        return sorted(parts)
    client.add_topic(topic)
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            await client.force_metadata_update()
        except TopicAuthorizationFailedError:
            raise DestinationRefused(topic, "not authorised (TopicAuthorizationFailed)") from None
        parts = client.cluster.partitions_for_topic(topic)
        if parts:
            return sorted(parts)
        if topic in client.cluster.unauthorized_topics:
            raise DestinationRefused(topic, "not authorised (TopicAuthorizationFailed)")
        if asyncio.get_running_loop().time() >= deadline:
            raise DestinationRefused(topic, "unknown topic (UnknownTopicOrPartition: not created, "
                                            "and the brokers do not create topics)")
        await asyncio.sleep(0.25)


def refuses_destination(exc: BaseException) -> bool:
    """A produce error that refuses the topic itself (DESIGN rule 6), not the link."""
    from aiokafka import errors as e

    return isinstance(exc, DestinationRefused | e.TopicAuthorizationFailedError
                      | e.ClusterAuthorizationFailedError | e.UnknownTopicOrPartitionError
                      | e.PolicyViolationError)


def is_link_error(exc: BaseException) -> bool:
    """True when `exc` is a failure of the link or the cluster, retried with backoff."""
    from aiokafka.errors import KafkaError

    if isinstance(exc, UplinkError):
        return exc.retriable
    return isinstance(exc, KafkaError | OSError | TimeoutError | ConnectionError)


def is_too_large(exc: BaseException) -> bool:
    from aiokafka.errors import MessageSizeTooLargeError, RecordListTooLargeError

    return isinstance(exc, MessageSizeTooLargeError | RecordListTooLargeError)


def fast_slot(batch: Any) -> list[Any]:
    """[batch, bytes used, records, raw append] for one topic-partition of a window.

    `raw append` is the C record builder's own `append(offset, timestamp, key, value,
    headers)` when `batch` is aiokafka's BatchBuilder without serializers (aiokafka
    0.12-0.14 internals, checked here): it skips a keyword-argument wrapper that costs
    about a tenth of the per-record CPU of a backlog drain. Otherwise None (public API).
    Such a batch also becomes one that `build_batches` can encode ahead of the sender.
    """
    from aiokafka.producer.message_accumulator import BatchBuilder

    raw = None
    if (
        type(batch) is BatchBuilder
        and getattr(batch, "_key_serializer", 0) is None
        and getattr(batch, "_value_serializer", 0) is None
        and getattr(batch, "_relative_offset", None) == 0
        and getattr(batch, "_buffer", 0) is None
        and not batch.closed()
    ):
        raw = getattr(getattr(batch, "_builder", None), "append", None)
        if raw is not None:
            batch.__class__ = _prebuildable_class()
    return [batch, 0, 0, raw]


def finish_slot(slot: list[Any]) -> Any:
    """The batch of a slot, with the record count the raw append path bypassed."""
    if slot[3] is not None:
        slot[0]._relative_offset = slot[2]  # what BatchBuilder.append would count
    return slot[0]


# Kafka record batch v2 header (KIP-98): magic at 16, CRC-32C at 17 over everything from the
# attributes at 21 to the end, then producer id (int64), epoch (int16) and base sequence
# (int32) at 43. The sender sets those three just before it builds a batch; a batch built
# earlier gets them written into its bytes and its CRC computed again.
_MAGIC_OFFSET = 16
_CRC_OFFSET = 17
_ATTRIBUTES_OFFSET = 21
_PRODUCER_OFFSET = 43
_prebuildable: type | None = None


def _prebuildable_class() -> type:
    """aiokafka's BatchBuilder that may be built before the sender gives it its producer
    state (aiokafka 0.12-0.14 internals: the sender calls `_set_producer_state` once per
    batch, then `_build`, which returns a batch already built as it is)."""
    global _prebuildable
    if _prebuildable is None:
        import struct

        from aiokafka.producer.message_accumulator import BatchBuilder
        from aiokafka.record.util import calc_crc32c

        state = struct.Struct(">qhi")
        crc = struct.Struct(">I")

        class PrebuildableBatch(BatchBuilder):  # type: ignore[misc]
            def _set_producer_state(self, producer_id: int, producer_epoch: int,
                                    base_sequence: int) -> None:
                buf = self._buffer
                if buf is None:
                    super()._set_producer_state(producer_id, producer_epoch, base_sequence)
                    return
                if buf[_MAGIC_OFFSET] != 2:
                    raise AssertionError(f"record batch of magic {buf[_MAGIC_OFFSET]}, not 2")
                state.pack_into(buf, _PRODUCER_OFFSET, producer_id, producer_epoch, base_sequence)
                crc.pack_into(buf, _CRC_OFFSET, calc_crc32c(bytes(memoryview(buf)[_ATTRIBUTES_OFFSET:])))

        _prebuildable = PrebuildableBatch
    return _prebuildable


def build_batches(batches: list[Any]) -> None:
    """Encode and compress closed batches now: run in a worker thread, so that compression
    (which releases the GIL) overlaps the formatting of the next window on the event loop
    instead of running in the sender on it. Batches that cannot be built ahead are left
    to the sender."""
    cls = _prebuildable
    for b in batches:
        if cls is not None and type(b) is cls and b._buffer is None:
            b._build()


async def close_producer(producer: Any, where: str, limit_s: float, *, graceful: bool) -> None:
    """Close a producer; after a failure, without waiting on the dead link."""
    if not graceful:
        # stop() would flush, and with idempotence aiokafka retries a batch forever.
        # So stop the sender task (in-flight requests end within request_timeout) and
        # close the connections; the batches left are abandoned with the producer (the
        # buffer still holds their records). aiokafka internals (0.12-0.14), guarded.
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=limit_s)
        client = getattr(producer, "client", None)
        if client is not None and hasattr(producer, "_closed"):
            try:
                await asyncio.wait_for(client.close(), timeout=limit_s)
            except Exception as exc:
                log.warning("kafka producer did not close cleanly", extra=fields(where=where, reason=str(exc)))
            producer._closed = True  # closed by hand: no "unclosed producer" warning
            return
    try:
        await asyncio.wait_for(producer.stop(), timeout=limit_s)
    except Exception as exc:
        log.warning("kafka producer did not close cleanly", extra=fields(where=where, reason=str(exc)))
