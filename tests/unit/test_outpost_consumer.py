"""The reference consumer's de-duplication and gap ledger (tools/outpost_consumer.py), pure.

Deliveries are simulated the way Kafka hands them over: each stream's records in seq order
within its partition, partitions interleaved arbitrarily, and resends that repeat a run of
records already delivered.
"""

from __future__ import annotations

import random
import zlib

import pytest

from gateway.uplinks.kafka.format import H_GATEWAY, H_SEQ, H_STREAM
from tools.outpost_consumer import (
    DUPLICATE,
    MALFORMED,
    NEW,
    OUT_OF_ORDER,
    Deduplicator,
    GatewayLedger,
    count_samples,
)


def test_header_names_match_what_the_gateway_writes() -> None:
    # The tool must not import the gateway (users run it without Outpost installed).
    import tools.outpost_consumer as c

    assert (c.H_GATEWAY, c.H_STREAM, c.H_SEQ) == (H_GATEWAY, H_STREAM, H_SEQ)


def _fleet_delivery(rng: random.Random, gateways: int, streams: int, records: int,
                    resends: int, drop: set[tuple[str, int]] | None = None):
    """(gateway, stream, seq) in a plausible Kafka delivery order, with resent runs."""
    partitions: dict[int, list[tuple[str, str, int]]] = {p: [] for p in range(4)}
    for g in range(gateways):
        gw = f"g/e{g}"
        for seq in range(1, records + 1):
            stream = f"{gw}/d{rng.randrange(streams)}"
            if drop and (gw, seq) in drop:
                continue
            partitions[zlib.crc32(stream.encode()) % 4].append((gw, stream, seq))
    for p, msgs in partitions.items():
        for _ in range(resends):  # a resend repeats a run of already written messages
            if len(msgs) < 10:
                continue
            at = rng.randrange(5, len(msgs))
            run = msgs[max(0, at - rng.randrange(1, 50)):at]
            partitions[p] = msgs = msgs[:at] + run + msgs[at:]
    out = []
    cursors = dict.fromkeys(partitions, 0)
    while any(cursors[p] < len(partitions[p]) for p in partitions):
        p = rng.choice([p for p in partitions if cursors[p] < len(partitions[p])])
        n = rng.randrange(1, 200)
        out += partitions[p][cursors[p]:cursors[p] + n]
        cursors[p] += n
    return out


def test_resends_are_dropped_and_nothing_is_counted_lost() -> None:
    rng = random.Random(7)
    msgs = _fleet_delivery(rng, gateways=5, streams=6, records=3000, resends=6)
    d = Deduplicator(gap_window=20_000)
    new = [m for m in msgs if d.offer(*m) == NEW]
    assert sorted((g, s) for g, _, s in new) == sorted(
        (f"g/e{g}", s) for g in range(5) for s in range(1, 3001))
    rep = d.report(produced={f"g/e{g}": 3000 for g in range(5)})
    assert rep["lost"] == 0 and rep["out_of_order"] == 0
    assert rep["duplicates"] == len(msgs) - 15000 > 0
    for g in rep["gateways"].values():
        assert g["produced"] == g["delivered_once"] == 3000


def test_gaps_are_counted_as_lost_also_when_the_window_overflows() -> None:
    rng = random.Random(3)
    dropped = {("g/e0", 17), ("g/e0", 1800), ("g/e1", 2999), ("g/e1", 3000)}
    msgs = _fleet_delivery(rng, gateways=2, streams=4, records=3000, resends=2, drop=dropped)
    for window in (10, 100_000):  # 10: the ledger must give up on holes, yet count them
        d = Deduplicator(gap_window=window)
        for m in msgs:
            d.offer(*m)
        rep = d.report(produced={"g/e0": 3000, "g/e1": 3000})
        assert rep["gateways"]["g/e0"]["lost"] == 2, window
        # The last two were never sent: only the produced figure reveals them.
        assert rep["gateways"]["g/e1"]["lost"] == 2, window
        assert d.report()["gateways"]["g/e1"]["lost"] == 0  # unknown production: no tail
        assert len(d.gateways["g/e0"].above) <= window


def test_a_late_record_taken_for_lost_is_taken_back() -> None:
    ledger = GatewayLedger(first_seq=1, gap_window=3)
    for seq in (2, 3, 4, 5, 6):
        ledger.delivered(seq)
    assert ledger.missing == 1 and ledger.lost() == 1  # seq 1 given up on
    ledger.delivered(1)
    assert ledger.lost() == 0 and ledger.late == 1


def test_memory_is_bounded_by_the_windows() -> None:
    d = Deduplicator(stream_window=8, gap_window=50)
    for seq in range(1, 100_001):
        d.offer("g/e", f"g/e/d{seq % 3}", seq)
    ledger = d.gateways["g/e"]
    assert ledger.above == set() and ledger.floor == 100_000
    assert all(len(s.recent) <= 8 and len(s.recent_set) <= 8 for s in d._streams.values())


def test_out_of_order_within_a_stream_is_reported_not_hidden() -> None:
    d = Deduplicator()
    assert d.offer("g/e", "g/e/a", 1) == NEW
    assert d.offer("g/e", "g/e/a", 3) == NEW
    assert d.offer("g/e", "g/e/a", 2) == OUT_OF_ORDER  # delivered, and flagged
    assert d.offer("g/e", "g/e/a", 2) == DUPLICATE
    rep = d.report()
    assert rep["out_of_order"] == 1 and rep["gateways"]["g/e"]["delivered_once"] == 3
    assert rep["lost"] == 0


def test_headers_as_kafka_clients_give_them() -> None:
    d = Deduplicator()
    hdrs = [(H_GATEWAY, b"g/e"), (H_STREAM, b"g/e/a"), (H_SEQ, b"1"), ("outpost-type", b"DDATA")]
    assert d.offer_headers(hdrs) == (NEW, "g/e")
    assert d.offer_headers(hdrs) == (DUPLICATE, "g/e")
    assert d.offer_headers([(H_GATEWAY, b"g/e"), (H_SEQ, b"2")])[0] == MALFORMED
    assert d.offer_headers([(H_GATEWAY, b"g/e"), (H_STREAM, b"s"), (H_SEQ, b"x")])[0] == MALFORMED
    assert d.malformed == 2


def test_samples_are_counted_in_json_values_only() -> None:
    assert count_samples(b'{"metrics":[{"name":"a"},{"name":"b"}]}') == 2
    assert count_samples(b"\x08\x01") == 0
    assert count_samples(None) == 0


def test_bad_windows_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Deduplicator(gap_window=0)
