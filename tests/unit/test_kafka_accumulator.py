"""The Kafka uplink's pure batching (gateway/uplinks/kafka/accumulator.py), without a pump.

Batches are aiokafka's own BatchBuilder, filled through the C builder's raw append (the
uplink's fast path) or through the public append; what they hold is read back with
aiokafka's MemoryRecords, as a broker would read it.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.memory_records import MemoryRecords

from buffer import Record
from gateway.records import H_CLOCK, H_TOPIC, H_TYPE, clock_fix
from gateway.sparkplug.payload import DataType, Metric, Payload, encode_payload
from gateway.uplinks.kafka import adapter
from gateway.uplinks.kafka.accumulator import BATCH_OVERHEAD, HELD, Window, route_entry
from gateway.uplinks.kafka.format import H_CLOCK as K_CLOCK
from gateway.uplinks.kafka.format import H_GATEWAY, H_SEQ, H_STREAM, MessageFactory
from gateway.uplinks.kafka.mappings import Mapping

GW = "gw-1"
STREAM = "plant/edge/pump-3"
TOPIC = "spBv1.0/plant/DDATA/edge/pump-3"
TELEMETRY = Mapping("telemetry", ("spBv1.0/#",), "plant.telemetry")
ARCHIVE = Mapping("archive", ("spBv1.0/#",), "plant.archive")
AS_JSON = Mapping("json", ("spBv1.0/#",), "plant.json", format="json")
TP = ("plant.telemetry", 0)
TP2 = ("plant.archive", 1)
BIG = 1 << 20  # a BatchBuilder's own limit, far above the windows' limits here


def _raw_slot() -> list[Any]:
    return adapter.fast_slot(BatchBuilder(BIG, 0))


def _public_slot() -> list[Any]:
    return [BatchBuilder(BIG, 0), 0, 0, None]


@pytest.fixture(params=["raw", "public"])
def new_batch(request):
    return _raw_slot if request.param == "raw" else _public_slot


def rec(seq: int, payload: bytes = b"v", *, stream: str = STREAM, **headers: str) -> Record:
    h = {H_TOPIC: TOPIC, H_TYPE: "DDATA", **headers}
    return Record(seq, stream, 1_700_000_000_000 + seq, h, payload)


def window(new_batch, factory: MessageFactory, limit: int = 10_000, max_records: int = 100,
           clock: Any = None) -> Window:
    return Window(new_batch, factory, limit, max_records, clock)


def entry(factory: MessageFactory, m: Mapping = TELEMETRY, tp=TP, stream: str = STREAM):
    return route_entry(factory, m, stream, TOPIC, "DDATA", tp)


def size_of(factory: MessageFactory, seq: int, payload_len: int, m: Mapping = TELEMETRY) -> int:
    return entry(factory, m)[6] + len(str(seq)) + payload_len


def sent(w: Window, tp=TP) -> list[tuple[bytes, bytes, dict[str, bytes], int]]:
    """What the batch of `tp` holds, as a broker reads it: (key, value, headers, timestamp)."""
    batch = adapter.finish_slot(w.slots[tp])
    batch.close()
    out = []
    for r in MemoryRecords(bytes(batch._build())).next_batch():
        out.append((r.key, r.value, dict(r.headers), r.timestamp))
    assert [r.offset for r in MemoryRecords(bytes(batch._build())).next_batch()] == list(range(len(out)))
    return out


def sparkplug_bytes(value: float = 1.5) -> bytes:
    return encode_payload(Payload(timestamp=1_700_000_000_000,
                                  metrics=[Metric(name="t", datatype=DataType.Double, value=value)]))


def test_route_entries_carry_what_every_message_of_a_stream_shares() -> None:
    f = MessageFactory(GW)
    e = entry(f)
    parts = f.parts(TELEMETRY, STREAM, TOPIC, "DDATA")
    assert e == (TP, *parts[1:], TELEMETRY)
    assert route_entry(f, AS_JSON, STREAM, TOPIC, "DDATA", ("plant.json", 2)) == (None, AS_JSON, ("plant.json", 2))


def test_records_go_to_their_batch_in_order_with_their_seq_header(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f)
    route = (entry(f),)
    payloads = [b"a", bytearray(b"bb"), memoryview(b"ccc")]
    for i, p in enumerate(payloads, start=7):
        assert w.add(rec(i, p), route)
    assert (w.n_records, w.n_messages, w.last_seq, w.unmatched) == (3, 3, 9, 0)
    assert w.refused == [] and w.held == []
    slot = w.slots[TP]
    assert slot[1] == sum(size_of(f, i, len(p)) for i, p in enumerate(payloads, start=7))
    assert slot[2] == 3 and slot[4] == [7, 8, 9]
    got = sent(w)
    assert [(k, v, h[H_SEQ], h[H_STREAM], h[H_GATEWAY], ts) for k, v, h, ts in got] == [
        (STREAM.encode(), b"a", b"7", STREAM.encode(), GW.encode(), 1_700_000_000_007),
        (STREAM.encode(), b"bb", b"8", STREAM.encode(), GW.encode(), 1_700_000_000_008),
        (STREAM.encode(), b"ccc", b"9", STREAM.encode(), GW.encode(), 1_700_000_000_009),
    ]
    # The same message the general path (and format_record) makes: the fast path is a shortcut.
    expect, _ = f.make(rec(7, b"a"), TELEMETRY)
    assert list(got[0][2].items()) == expect.headers


def test_a_record_exactly_at_the_batch_limit_fits_one_byte_more_is_refused(new_batch) -> None:
    f = MessageFactory(GW)
    limit = size_of(f, 5, 100)
    w = window(new_batch, f, limit=limit)
    route = (entry(f),)
    assert w.add(rec(5, b"x" * 100), route)
    assert w.slots[TP][1] == limit and w.refused == []
    w2 = window(new_batch, f, limit=limit)
    assert w2.add(rec(5, b"x" * 101), route)          # stepped past, not a new window
    assert TP not in w2.slots and w2.n_messages == 0
    assert (w2.n_records, w2.last_seq) == (1, 5)
    (r,) = w2.refused
    assert (r.seq, r.stream, r.mapping, r.reason) == (5, STREAM, "telemetry", "too_large")
    assert str(limit + 1) in r.detail


def test_a_full_batch_opens_the_next_window_and_consumes_nothing(new_batch) -> None:
    f = MessageFactory(GW)
    one = size_of(f, 1, 10)
    w = window(new_batch, f, limit=2 * one)
    route = (entry(f),)
    assert w.add(rec(1, b"x" * 10), route)
    assert w.add(rec(2, b"x" * 10), route)            # fills the limit exactly
    assert not w.add(rec(3, b"x"), route)
    assert (w.n_records, w.n_messages, w.last_seq, w.slots[TP][2]) == (2, 2, 2, 2)
    assert w.slots[TP][1] == 2 * one and w.refused == []


def test_batch_max_records_bounds_each_batch_exactly(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f, max_records=3)
    route = (entry(f),)
    assert all(w.add(rec(i), route) for i in range(1, 4))
    assert not w.add(rec(4), route)
    assert w.slots[TP][2] == 3 and w.n_records == 3
    # Another topic-partition has its own batch and its own count.
    assert w.add(rec(4), (entry(f, ARCHIVE, TP2),))
    assert w.slots[TP2][2] == 1 and w.slots[TP2][4] == [4]


def test_a_record_no_mapping_matches_is_counted_and_stepped_past(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f)
    assert w.add(rec(3), ())
    assert w.add(rec(4), ())
    assert (w.unmatched, w.n_records, w.last_seq, w.n_messages, w.slots) == (2, 2, 4, 0, {})


def test_a_record_for_two_mappings_goes_to_both(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f)
    route = (entry(f), entry(f, ARCHIVE, TP2))
    assert w.add(rec(1, b"p"), route)
    assert (w.n_records, w.n_messages, w.last_seq) == (1, 2, 1)
    assert w.slots[TP][4] == [1] and w.slots[TP2][4] == [1]
    assert w.slots[TP][1] == size_of(f, 1, 1) and w.slots[TP2][1] == size_of(f, 1, 1, ARCHIVE)
    assert [v for _, v, _, _ in sent(w, TP)] == [b"p"] and [v for _, v, _, _ in sent(w, TP2)] == [b"p"]


def test_a_record_for_two_mappings_waits_whole_when_one_batch_is_full(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f, max_records=2)
    assert w.add(rec(1), (entry(f),))
    assert w.add(rec(2), (entry(f),))                  # TP is full by count
    route = (entry(f, ARCHIVE, TP2), entry(f))
    assert not w.add(rec(3), route)
    assert TP2 not in w.slots                          # nothing of it was appended
    assert (w.n_records, w.n_messages, w.last_seq) == (2, 2, 2)


def test_two_messages_of_one_record_for_one_batch_are_counted_together(new_batch) -> None:
    # Two mappings to the same Kafka topic-partition: the record needs room for both.
    f = MessageFactory(GW)
    same = Mapping("same", ("spBv1.0/#",), "plant.telemetry")
    route = (entry(f), entry(f, same, TP))
    full = window(new_batch, f, max_records=3)
    assert full.add(rec(1), (entry(f),))
    assert full.add(rec(2), (entry(f),))
    assert not full.add(rec(3), route)                 # 2 + 2 > 3
    assert full.slots[TP][2] == 2
    one = size_of(f, 3, 1)
    by_bytes = window(new_batch, f, limit=3 * one - 1)
    assert by_bytes.add(rec(3), (entry(f),))
    assert not by_bytes.add(rec(3), route)             # 3 * one: one byte over the limit
    assert by_bytes.slots[TP][2] == 1
    exact = window(new_batch, f, limit=3 * one, max_records=3)
    assert exact.add(rec(3), (entry(f),))
    assert exact.add(rec(3), route)                    # 3 * one: exactly the limit
    assert exact.slots[TP][2] == 3 and exact.slots[TP][4] == [3, 3, 3]
    assert exact.slots[TP][1] == 3 * one


def test_a_new_batch_counts_a_records_messages_from_zero(new_batch) -> None:
    f = MessageFactory(GW)
    same = Mapping("same", ("spBv1.0/#",), "plant.telemetry")
    route = (entry(f), entry(f, same, TP))
    one = size_of(f, 1, 1)
    w = window(new_batch, f, limit=2 * one, max_records=2)
    assert w.add(rec(1), route)                        # two messages: exactly both limits
    assert (w.slots[TP][1], w.slots[TP][2], w.n_messages) == (2 * one, 2, 2)


def test_an_empty_batch_takes_any_record_within_the_limit_on_the_general_path(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f, max_records=1)
    route = (entry(f), entry(f, ARCHIVE, TP2))
    assert w.add(rec(1), route)
    assert not w.add(rec(2), route)                    # now each batch holds its one record
    assert w.slots[TP][2] == 1 and w.slots[TP2][2] == 1


def test_the_general_path_refuses_a_message_over_the_limit_and_takes_one_at_it(new_batch) -> None:
    f = MessageFactory(GW)
    unsynced = rec(1, sparkplug_bytes(), **{H_CLOCK: "unsynced"})
    _, size = f.make(unsynced, TELEMETRY, clock_fix(None, unsynced.headers))
    route = (entry(f), entry(f, ARCHIVE, TP2))
    over = window(new_batch, f, limit=size - 1)
    assert over.add(unsynced, route)
    assert [(r.seq, r.mapping, r.reason) for r in over.refused] == [
        (1, "telemetry", "too_large"), (1, "archive", "too_large")]
    assert str(size) in over.refused[0].detail
    assert (over.n_records, over.n_messages, over.last_seq, over.slots) == (1, 0, 1, {})
    at = window(new_batch, f, limit=size)
    assert at.add(unsynced, route)
    assert at.refused == [] and at.n_messages == 2
    assert at.slots[TP][1] == size and at.slots[TP2][1] == size


def test_a_json_mapping_that_cannot_format_refuses_the_record_for_it_only(new_batch) -> None:
    f = MessageFactory(GW)
    route = ((None, AS_JSON, ("plant.json", 0)), entry(f))
    w = window(new_batch, f)
    assert w.add(rec(4, b"not sparkplug"), route)
    ((r),) = w.refused
    assert (r.seq, r.mapping, r.reason) == (4, "json", "format_error")
    assert r.detail
    assert w.slots[TP][4] == [4] and ("plant.json", 0) not in w.slots
    assert (w.n_records, w.n_messages, w.last_seq) == (1, 1, 4)


def test_a_json_mapping_alone_takes_the_general_path(new_batch) -> None:
    f = MessageFactory(GW)
    tp = ("plant.json", 0)
    w = window(new_batch, f)
    assert w.add(rec(2, sparkplug_bytes()), ((None, AS_JSON, tp),))
    ((key, value, headers, ts),) = sent(w, tp)
    assert value.startswith(b"{") and b'"t"' in value
    msg, size = f.make(rec(2, sparkplug_bytes()), AS_JSON)
    assert (key, value, list(headers.items()), ts) == (msg.key, msg.value, msg.headers, msg.timestamp_ms)
    assert w.slots[tp][1] == size


def test_an_unsynced_reading_is_flagged_even_on_a_single_mapping(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f)
    assert w.add(rec(1, sparkplug_bytes(), **{H_CLOCK: "unsynced"}), (entry(f),))
    assert w.add(rec(2, sparkplug_bytes()), (entry(f),))
    (_, v1, h1, _), (_, v2, h2, _) = sent(w)
    assert h1[K_CLOCK] == b"unsynced" and K_CLOCK not in h2
    assert v1 != v2 and v2 == sparkplug_bytes()  # the payload carries the flag too


def test_held_topics_set_their_records_aside_and_the_others_flow(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f)
    assert w.add(rec(1), ((HELD, "plant.archive", ARCHIVE),))
    assert w.add(rec(2), ((HELD, "plant.archive", ARCHIVE), entry(f)))
    assert w.held == [(1, "plant.archive"), (2, "plant.archive")]
    assert w.slots[TP][4] == [2]
    assert (w.n_records, w.n_messages, w.last_seq) == (2, 1, 2)


def test_a_held_entry_is_not_recorded_when_the_record_waits_for_the_next_window(new_batch) -> None:
    f = MessageFactory(GW)
    w = window(new_batch, f, max_records=1)
    assert w.add(rec(1), (entry(f),))
    assert not w.add(rec(2), ((HELD, "plant.archive", ARCHIVE), entry(f)))
    assert w.held == [] and w.n_records == 1


class _CountingFactory(MessageFactory):
    __slots__ = ("made",)

    def __init__(self, gateway_id: str) -> None:
        super().__init__(gateway_id)
        self.made = 0

    def make(self, *a: Any, **kw: Any):
        self.made += 1
        return super().make(*a, **kw)


def test_the_common_case_costs_no_per_record_formatting(new_batch) -> None:
    # The module's promise for a backlog drain (one sparkplug/raw mapping, trusted clock):
    # a record costs its seq header and the batch's own encoding, nothing formatted anew.
    f = _CountingFactory(GW)
    w = window(new_batch, f)
    for i in range(1, 6):
        assert w.add(rec(i), (entry(f),))
    assert f.made == 0 and w.slots[TP][2] == 5
    assert w.add(rec(6, sparkplug_bytes(), **{H_CLOCK: "unsynced"}), (entry(f),))
    assert w.add(rec(7), ((None, AS_JSON, ("plant.json", 0)),))
    assert w.add(rec(8), (entry(f), entry(f, ARCHIVE, TP2)))
    assert f.made == 1 + 1 + 2


def test_a_reading_on_an_unsynced_clock_is_corrected_once_the_clock_is_synced(new_batch) -> None:
    from tests.unit.test_clock_guard import REAL_NOW_NS, S, stamped_then_synced

    guard, headers, stamped_ms = stamped_then_synced(10)
    f = MessageFactory(GW)
    w = window(new_batch, f, clock=guard)
    r = Record(1, STREAM, stamped_ms, {H_TOPIC: TOPIC, H_TYPE: "DDATA", **headers}, sparkplug_bytes())
    assert w.add(r, (entry(f),))
    ((_, _, h, ts),) = sent(w)
    assert h[K_CLOCK] == b"corrected"
    assert ts == (REAL_NOW_NS - 10 * S) // 1_000_000


class _RefusingBatch:
    def append(self, **_kw: Any) -> None:
        return None


def test_a_batch_that_refuses_a_record_within_its_limit_is_a_bug_not_a_loss() -> None:
    f = MessageFactory(GW)
    w = Window(lambda: [_RefusingBatch(), 0, 0, None], f, 10_000, 100)
    with pytest.raises(AssertionError, match=r"plant\.telemetry"):
        w.add(rec(1), (entry(f),))
    w = Window(lambda: [_RefusingBatch(), 0, 0, None], f, 10_000, 100)
    with pytest.raises(AssertionError, match=r"plant\.archive"):
        w.add(rec(1), (entry(f, ARCHIVE, TP2), entry(f)))


def test_the_batch_overhead_is_kafkas_record_batch_header() -> None:
    # Kafka's v2 RecordBatch header: baseOffset 8, length 4, leaderEpoch 4, magic 1, crc 4,
    # attributes 2, lastOffsetDelta 4, first/max timestamp 8+8, producerId 8, epoch 2,
    # baseSequence 4, record count 4.
    assert BATCH_OVERHEAD == 8 + 4 + 4 + 1 + 4 + 2 + 4 + 8 + 8 + 8 + 2 + 4 + 4
