"""The Kafka uplink's drain shortcuts give the same bytes as the plain paths.

- A batch encoded and compressed before the sender gives it its producer state (off the
  event loop, adapter.build_batches), then given that state, is byte for byte the batch
  aiokafka builds after it, with a valid CRC-32C.
- Window.fill (one loop over a window's buffer rows) puts the same records in the same
  batches, refuses, holds and steps past the same ones, and stops at the same record as
  Window.add called record by record with their Records.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch

from buffer.core import Record
from gateway.records import H_CLOCK, H_TOPIC, H_TYPE
from gateway.uplinks.kafka import adapter
from gateway.uplinks.kafka.accumulator import (
    BATCH_OVERHEAD,
    DONE,
    FULL,
    HELD,
    MISS,
    Window,
    cached,
    route_entry,
    route_key,
)
from gateway.uplinks.kafka.format import MessageFactory
from gateway.uplinks.kafka.mappings import Mapping

GW = "plant-7/pump-3"
ZSTD, GZIP, NONE = 4, 1, 0


def _fill(batch: BatchBuilder, n: int) -> BatchBuilder:
    slot = adapter.fast_slot(batch)
    assert slot[3] is not None
    for i in range(n):
        done = slot[3](slot[2], 1_700_000_000_000 + i, b"key%d" % (i % 7), b"value %d " % i * 10,
                       [("outpost-seq", b"%d" % i)])
        assert done is not None
        slot[2] += 1
    return adapter.finish_slot(slot)


@pytest.mark.parametrize("codec", [NONE, ZSTD, GZIP])
def test_a_batch_built_ahead_is_the_batch_aiokafka_builds(codec: int) -> None:
    plain = _fill(BatchBuilder(1_100_000, codec), 300)
    plain.close()
    plain._set_producer_state(424242, 7, 1234)
    expected = bytes(plain._build())

    ahead = _fill(BatchBuilder(1_100_000, codec), 300)
    ahead.close()
    adapter.build_batches([ahead])
    assert ahead._buffer is not None  # built before the sender saw it
    size_before = ahead.size()
    ahead._set_producer_state(424242, 7, 1234)
    got = bytes(ahead._build())

    assert got == expected
    assert ahead.size() == size_before == len(expected)
    batch = DefaultRecordBatch(got)
    assert batch.validate_crc()
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (424242, 7, 1234)
    assert ahead.record_count() == 300


def test_a_batch_with_serializers_is_left_to_the_sender() -> None:
    b = BatchBuilder(1_100_000, ZSTD, key_serializer=lambda k: k)
    slot = adapter.fast_slot(b)
    assert slot[3] is None and type(b) is BatchBuilder
    b.append(timestamp=None, key=b"k", value=b"v")
    b.close()
    adapter.build_batches([b])
    assert b._buffer is None


def _records() -> list[Record]:
    recs = []
    plain = {H_TOPIC: "spBv1.0/plant-7/DDATA/pump-3/meter{d}", H_TYPE: "DDATA"}
    for i in range(1, 400):
        d = i % 5
        h = {k: v.format(d=d) for k, v in plain.items()}
        payload = b"p%d" % i * (8000 if i % 50 == 3 else 3)  # some larger than a batch
        if i % 37 == 0:
            h[H_CLOCK] = "unsynced"  # the clock rule: the general path
        recs.append(Record(i, f"{GW}/meter{d}", 1_700_000_000_000 + i, h, payload))
    return recs


def _rows(recs: list[Record]) -> tuple[list[tuple], dict[int, str], dict[int, dict[str, str]]]:
    """The records as Buffer.read_with hands them over: rows, streams and header sets."""
    sids: dict[str, int] = {}
    hids: dict[tuple, int] = {}
    streams: dict[int, str] = {}
    hsets: dict[int, dict[str, str]] = {}
    rows = []
    for r in recs:
        sid = sids.setdefault(r.stream, len(sids) + 7)
        streams[sid] = r.stream
        key = tuple(r.headers.items())
        hid = hids.setdefault(key, len(hids) + 3)
        hsets[hid] = dict(r.headers)
        rows.append((r.seq, sid, r.ts_ms, hid, r.payload))
    return rows, streams, hsets


def _routes(factory: MessageFactory) -> dict[str, Any]:
    """Route by stream name (for Window.add)."""
    sp = Mapping("sp", ("spBv1.0/#",), "t.sp")
    js = Mapping("js", ("spBv1.0/#",), "t.js", format="json")
    routes = {}
    for d in range(5):
        stream, topic = f"{GW}/meter{d}", f"spBv1.0/plant-7/DDATA/pump-3/meter{d}"
        if d == 0:
            route: tuple = ()  # no mapping: unmatched
        elif d == 1:
            route = (route_entry(factory, sp, stream, topic, "DDATA", ("t.sp", 0)),
                     route_entry(factory, js, stream, topic, "DDATA", ("t.js", 0)))
        elif d == 2:
            route = ((HELD, "t.held", sp),)
        else:
            route = (route_entry(factory, sp, stream, topic, "DDATA", ("t.sp", d - 2)),)
        routes[stream] = route
    return routes


def _row_routes(factory: MessageFactory, rows: list[tuple], streams: dict[int, str],
                hsets: dict[int, dict[str, str]]) -> dict[int, Any]:
    """The same routes, cached as the uplink caches them for Window.fill."""
    by_stream = _routes(factory)
    return {route_key(sid, hid): cached(by_stream[streams[sid]], hsets[hid])
            for _, sid, _, hid, _ in rows}


def _window(factory: MessageFactory) -> Window:
    return Window(lambda: adapter.fast_slot(BatchBuilder(200_000, NONE)), factory,
                  20_000 - BATCH_OVERHEAD, 15)


def _state(w: Window) -> tuple:
    batches = {}
    for tp, slot in w.slots.items():
        b = adapter.finish_slot(slot)
        b.close()
        batches[tp] = (bytes(b._build()), slot[1], slot[2], list(slot[4]))
    return (batches, w.last_seq, w.n_records, w.n_messages, w.unmatched,
            [(r.seq, r.reason, r.mapping) for r in w.refused], list(w.held))


def test_fill_matches_add_record_by_record() -> None:
    factory = MessageFactory(GW)
    recs = _records()
    routes = _routes(factory)
    rows, streams, hsets = _rows(recs)
    cache = _row_routes(factory, rows, streams, hsets)
    windows_add, windows_fill = [], []

    i = 0
    while i < len(recs):
        w = _window(factory)
        while i < len(recs) and w.add(recs[i], routes[recs[i].stream]):
            i += 1
        windows_add.append((i, _state(w)))

    i = 0
    while i < len(recs):
        w = _window(factory)
        while True:
            i, outcome = w.fill(rows, i, min(len(recs), i + 64), cache, streams, hsets)
            assert outcome != MISS
            if outcome == FULL or i == len(recs):
                break
            assert outcome == DONE
        windows_fill.append((i, _state(w)))

    assert len(windows_add) > 3  # the limits did cut windows
    assert windows_fill == windows_add

    # Record by record, the window's counters move the same way.
    def trace(step: Any) -> list[tuple]:
        out, i = [], 0
        while i < len(recs):
            w = _window(factory)
            while i < len(recs):
                before = i
                i = step(w, i)
                out.append((before, i, w.last_seq, w.n_records, w.n_messages, w.unmatched,
                            len(w.refused), len(w.held)))
                if i == before:
                    break
        return out

    def by_add(w: Window, i: int) -> int:
        return i + 1 if w.add(recs[i], routes[recs[i].stream]) else i

    def by_fill(w: Window, i: int) -> int:
        return w.fill(rows, i, i + 1, cache, streams, hsets)[0]

    assert trace(by_fill) == trace(by_add)
    first = windows_add[0][1]
    assert first[4] > 0 and first[5] and first[6]  # unmatched, refused and held all happened


def test_fill_stops_at_a_row_whose_route_is_not_cached() -> None:
    factory = MessageFactory(GW)
    recs = _records()[:20]
    rows, streams, hsets = _rows(recs)
    cache = _row_routes(factory, rows, streams, hsets)
    del cache[route_key(rows[3][1], rows[3][3])]
    w = _window(factory)
    assert w.fill(rows, 0, len(rows), cache, streams, hsets) == (3, MISS)
    assert w.n_records == 3 and w.last_seq == rows[2][0]
    # Another headers set of a cached stream (its topic or type changed) is another key.
    cache = _row_routes(factory, rows, streams, hsets)
    seq, sid, ts, hid, payload = rows[0]
    other = max(hsets) + 1
    hsets[other] = {**hsets[hid], H_TOPIC: "another/topic"}
    rows[0] = (seq, sid, ts, other, payload)
    assert _window(factory).fill(rows, 0, len(rows), cache, streams, hsets) == (0, MISS)


def test_a_route_is_cached_for_the_common_path_only_when_it_is_one() -> None:
    factory = MessageFactory(GW)
    routes = _routes(factory)
    plain = {H_TOPIC: "t", H_TYPE: "DDATA"}
    one = routes[f"{GW}/meter3"]
    assert cached(one, plain) == (one[0], one)
    assert cached(one, {**plain, H_CLOCK: "unsynced"}) == (None, one)  # the clock rule
    for stream in (f"{GW}/meter0", f"{GW}/meter1", f"{GW}/meter2"):  # none, two, held
        assert cached(routes[stream], plain) == (None, routes[stream])
    js = Mapping("js", ("spBv1.0/#",), "t.js", format="json")
    json_only = (route_entry(factory, js, "s", "t", "DDATA", ("t.js", 0)),)
    assert cached(json_only, plain) == (None, json_only)
    assert route_key(5, 7) != route_key(7, 5)
