"""Pure batching for the Kafka uplink: buffered records into one window of record batches.

No I/O and no awaiting: the pump (gateway.uplinks.kafka.uplink) resolves where a stream's
records go (topic-partition, key, headers: a "route", which needs cluster metadata) and
hands records to a `Window` one by one; the window appends each to the batch of its
topic-partition and says when a record does not fit (it then opens the next window).

A window holds at most one batch per topic-partition, each bounded by `batch_max_bytes`
and `batch_max_records`. A record goes into the window whole (to every mapping it matches)
or not at all. Records are never lost here: a record that matches no mapping is counted as
unmatched, one larger than a whole batch or that cannot be put in its mapping's format is
counted as refused (`too_large`, `format_error`) with its seq, and the window moves past it.

Draining a backlog is CPU-bound on a small gateway, so the common case (one `sparkplug` or
`raw` mapping, a trusted clock) costs one seq header, one headers list and the batch's own
encoding per record; everything else about the stream is cached in its route.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping as Lookup
from dataclasses import dataclass, field
from typing import Any

from buffer import Record, Row
from gateway.records import H_CLOCK, clock_fix
from gateway.uplinks.kafka.format import H_SEQ, KafkaFormatError, KafkaMessage, MessageFactory
from gateway.uplinks.kafka.mappings import Mapping

BATCH_OVERHEAD = 61  # Kafka record-batch v2 header bytes

# A route: one entry per matching mapping. A `sparkplug`/`raw` mapping gives
# (topic-partition, key, gateway/stream/topic/type headers, fixed size, mapping); a `json`
# mapping gives (None, mapping, topic-partition): its value is made per record; a mapping
# whose Kafka topic is held (refused by the cluster) gives (HELD, kafka topic, mapping).
Route = tuple[tuple[Any, ...], ...]
TopicPartition = tuple[str, int]
# A route cached for Window.fill (see `cached`): (common-path entry or None, route).
Cached = tuple[tuple[Any, ...] | None, Route]
HELD = "held"
# Outcomes of Window.fill.
DONE, FULL, MISS = 0, 1, 2


@dataclass(slots=True)
class Refused:
    """A record this window steps past without sending: why, for the uplink's counters."""

    seq: int
    stream: str
    mapping: str
    reason: str  # too_large | format_error
    detail: str


@dataclass(slots=True)
class Window:
    """One window: at most one batch per topic-partition, filled in record order."""

    new_batch: Callable[[], list[Any]]  # a fresh slot: [batch, bytes, records, raw append]
    factory: MessageFactory
    limit: int                          # payload bytes a batch may carry
    max_records: int
    clock: Any = None                   # the gateway's ClockGuard (the clock rule)
    slots: dict[TopicPartition, list[Any]] = field(default_factory=dict)
    last_seq: int | None = None
    n_records: int = 0                  # buffered records consumed by this window
    n_messages: int = 0                 # Kafka messages appended
    unmatched: int = 0
    refused: list[Refused] = field(default_factory=list)
    held: list[tuple[int, str]] = field(default_factory=list)  # (seq, kafka topic) to hold

    def _slot(self, tp: TopicPartition) -> list[Any]:
        slot = self.slots[tp] = self.new_batch()
        slot.append([])  # slot[4]: the seqs in this batch, to hold them if the topic refuses
        return slot

    def add(self, rec: Any, route: Route) -> bool:
        """Append `rec` to its batches; False (nothing appended) when it opens the next window."""
        if not route:
            self.unmatched += 1
            self._consumed(rec)
            return True
        first = route[0][0]
        if len(route) == 1 and first is not None and first is not HELD and H_CLOCK not in rec.headers:
            return self._add_fast(rec, route[0])
        return self._add_general(rec, route)

    def fill(self, rows: list[Row], start: int, stop: int, routes: dict[int, Cached],
             streams: Lookup[int, str], header_sets: Lookup[int, Lookup[str, str]]) -> tuple[int, int]:
        """Add the buffer rows rows[start:stop] in order, as `add` would add their Records,
        in one loop: the per-record cost of a backlog drain is mostly object, call and
        attribute overhead, so the common case (the route cached, one `sparkplug`/`raw`
        mapping, a trusted clock) works on the row itself with the window's state in locals.

        Rows are (seq, stream_id, ts_ms, headers_id, payload) as `Buffer.read_with` hands
        them over, with its `streams` and `header_sets`. `routes` maps `route_key(stream_id,
        headers_id)` to `cached(route, headers)`, valid while those two maps are the same
        objects. Returns (index, outcome): FULL when rows[index] opens the next window,
        MISS when its route must be resolved first (then call again from it), DONE when
        every row up to `stop` went in.
        """
        limit = self.limit
        max_records = self.max_records
        slots = self.slots
        n_messages = self.n_messages
        n_records = self.n_records
        last_seq = self.last_seq
        i = start
        try:
            while i < stop:
                seq, sid, ts_ms, hid, payload = rows[i]
                cached = routes.get(hid << 32 | sid)
                if cached is None:
                    return i, MISS
                entry = cached[0]
                if entry is None:
                    # Not the common case: the general path, with the window's state saved.
                    self.n_messages, self.n_records, self.last_seq = n_messages, n_records, last_seq
                    if not self.add(Record(seq, streams[sid], ts_ms, header_sets[hid], payload), cached[1]):
                        return i, FULL
                    n_messages, n_records, last_seq = self.n_messages, self.n_records, self.last_seq
                    i += 1
                    continue
                tp, key, gw, st_h, tp_h, ty_h, fixed, m = entry
                seq_b = b"%d" % seq
                size = fixed + len(seq_b) + len(payload)
                if size > limit:
                    self._refuse(Record(seq, streams[sid], ts_ms, header_sets[hid], payload), m,
                                 "too_large", f"{size} bytes, more than batch_max_bytes")
                    last_seq = seq
                    n_records += 1
                    i += 1
                    continue
                slot = slots.get(tp)
                if slot is None:
                    slot = self._slot(tp)
                elif slot[1] + size > limit or slot[2] >= max_records:
                    return i, FULL
                raw = slot[3]
                headers = [gw, st_h, (H_SEQ, seq_b), tp_h, ty_h]
                if raw is not None:
                    done = raw(slot[2], ts_ms, key, payload, headers)
                else:
                    done = slot[0].append(timestamp=ts_ms, key=key, value=payload, headers=headers)
                if done is None:
                    raise AssertionError(f"batch for {tp} refused a record within its limit")
                slot[1] += size
                slot[2] += 1
                slot[4].append(seq)
                n_messages += 1
                last_seq = seq
                n_records += 1
                i += 1
            return i, DONE
        finally:
            self.n_messages, self.n_records, self.last_seq = n_messages, n_records, last_seq

    def _consumed(self, rec: Any) -> None:
        self.last_seq = rec.seq
        self.n_records += 1

    def _add_fast(self, rec: Any, entry: tuple[Any, ...]) -> bool:
        tp, key, gw, st_h, tp_h, ty_h, fixed, m = entry
        seq_b = b"%d" % rec.seq
        payload = rec.payload
        if type(payload) is not bytes:
            payload = bytes(payload)
        size = fixed + len(seq_b) + len(payload)
        if size > self.limit:
            self._refuse(rec, m, "too_large", f"{size} bytes, more than batch_max_bytes")
            self._consumed(rec)
            return True
        slot = self.slots.get(tp)
        if slot is None:
            slot = self._slot(tp)
        elif slot[1] + size > self.limit or slot[2] >= self.max_records:
            return False
        headers = [gw, st_h, (H_SEQ, seq_b), tp_h, ty_h]
        raw = slot[3]
        if raw is not None:
            done = raw(slot[2], rec.ts_ms, key, payload, headers)
        else:
            done = slot[0].append(timestamp=rec.ts_ms, key=key, value=payload, headers=headers)
        if done is None:
            raise AssertionError(f"batch for {tp} refused a record within its limit")
        slot[1] += size
        slot[2] += 1
        slot[4].append(rec.seq)
        self.n_messages += 1
        self._consumed(rec)
        return True

    def _add_general(self, rec: Any, route: Route) -> bool:
        """Messages of one record for several mappings (a json one, a clock fix): all or none."""
        fix = clock_fix(self.clock, rec.headers)
        placed: list[tuple[TopicPartition, KafkaMessage, int]] = []
        pending: dict[TopicPartition, list[int]] = {}  # bytes and records with `placed`
        held: list[tuple[int, str]] = []
        for entry in route:
            if entry[0] is HELD:
                held.append((rec.seq, entry[1]))
                continue
            if entry[0] is None:
                _, m, tp = entry
            else:
                tp, m = entry[0], entry[7]
            try:
                msg, size = self.factory.make(rec, m, fix)
            except KafkaFormatError as exc:
                self._refuse(rec, m, "format_error", str(exc))
                continue
            if size > self.limit:
                self._refuse(rec, m, "too_large", f"{size} bytes, more than batch_max_bytes")
                continue
            cur = pending.get(tp)
            if cur is None:
                slot = self.slots.get(tp)
                cur = pending[tp] = [0, 0] if slot is None else [slot[1], slot[2]]
            if cur[1] and (cur[0] + size > self.limit or cur[1] >= self.max_records):
                return False  # an empty batch takes any record within the limit
            cur[0] += size
            cur[1] += 1
            placed.append((tp, msg, size))
        self.held.extend(held)
        for tp, msg, size in placed:
            slot = self.slots.get(tp)
            if slot is None:
                slot = self._slot(tp)
            if slot[3] is not None:
                done = slot[3](slot[2], msg.timestamp_ms, msg.key, msg.value, msg.headers)
            else:
                done = slot[0].append(timestamp=msg.timestamp_ms, key=msg.key, value=msg.value,
                                      headers=msg.headers)
            if done is None:
                raise AssertionError(f"batch for {tp} refused a record within its limit")
            slot[1] += size
            slot[2] += 1
            slot[4].append(rec.seq)
            self.n_messages += 1
        self._consumed(rec)
        return True

    def _refuse(self, rec: Any, m: Mapping, reason: str, detail: str) -> None:
        self.refused.append(Refused(rec.seq, rec.stream, m.name, reason, detail))


def route_key(stream_id: int, headers_id: int) -> int:
    """The key of `Window.fill`'s route cache for a buffer row: (headers set, stream) ids."""
    return headers_id << 32 | stream_id


def cached(route: Route, headers: Lookup[str, str]) -> Cached:
    """A route as `Window.fill` caches it for the rows of one (stream, headers set): with
    its entry when the row can take the common path (one `sparkplug`/`raw` mapping that
    is not held, a trusted clock), else None and the route for `Window.add`."""
    fast = route[0] if (len(route) == 1 and route[0][0] is not None and route[0][0] is not HELD
                        and H_CLOCK not in headers) else None
    return (fast, route)


def route_entry(factory: MessageFactory, m: Mapping, stream: str, topic: str, msg_type: str,
                tp: TopicPartition) -> tuple[Any, ...]:
    """One mapping's entry of a route (see `Route`)."""
    if m.format == "json":
        return (None, m, tp)
    _kafka_topic, key, gw, st_h, tp_h, ty_h, fixed = factory.parts(m, stream, topic, msg_type)
    return (tp, key, gw, st_h, tp_h, ty_h, fixed, m)
