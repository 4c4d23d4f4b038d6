"""Reference consumer for Outpost's Kafka topics: every reading once, with bounded memory.

Outpost delivers to Kafka at least once. After a link failure, a broker failover or a
`kill -9` of the gateway, the records of the batches that were in flight are sent again,
so a downstream job sees a few of them twice. Every message carries three headers that
name it uniquely:

  outpost-gateway  "<group_id>/<edge_node_id>" of the gateway that produced it
  outpost-stream   "<group_id>/<edge_node_id>/<device>" (or the MQTT topic of a bridged record)
  outpost-seq      the record's number in that gateway's buffer: 1, 2, 3, ... one per record,
                   gateway-wide (all devices share the counter), never reused

and its key is the stream (mapping `key = "device"`, the default) or the stream's MQTT
topic, so all records of one device land in one partition, in the order they were read.

What a consumer must keep to drop the duplicates, and what this module keeps:

- Per (gateway, stream): the highest seq delivered (`hwm`) and a small window of the most
  recent seqs delivered. Within a partition Kafka keeps the producer's order, and Outpost's
  idempotent producer never lets a later batch land before an earlier one, so a record
  whose seq is above `hwm` is new and one at or below it is a resend. The window tells a
  resend (seq in the window) from a record that arrived out of order (not in it), which
  Outpost must never produce and which is therefore counted apart (`out_of_order`).
- Per gateway: seqs are contiguous across the gateway's streams, which are spread over
  partitions and so arrive interleaved in any order. The ledger keeps the highest seq below
  which every seq was seen (`floor`) and the set of seqs seen above it, bounded by
  `gap_window`; when that set is full, the lowest missing seqs are counted as lost and the
  floor moves past them (a record that turns up later is taken back off the lost count).
  At the end, every seq missing up to the highest one seen (and up to the last seq the
  gateway produced, when that is known) is lost.

Memory is therefore O(streams x stream_window + gateways x gap_window), never a set of
every seq seen. Gap counting assumes the topics consumed receive every record of each
gateway (one mapping that covers all its streams, e.g. `spBv1.0/+/DDATA/#`) and that the
gateway's first record is seq `first_seq` (1 for a new gateway; pass a higher value when
retention has already deleted the start). With overlapping mappings, consume one topic per
run: a record copied to two topics is two deliveries by design.

Command line (a downstream user's check of a topic; prints one JSON report)::

    python -m tools.outpost_consumer --bootstrap kafka1:9092,kafka2:9092 \\
        --topic plant.telemetry --json

reads every partition from the beginning (no consumer group, nothing committed) up to the
end offsets found at start, or keeps following with `--follow`. As a library::

    dedup = Deduplicator()
    for gateway, stream, seq in messages:
        if dedup.offer(gateway, stream, seq) == NEW:
            process(...)
    report = dedup.report(produced={"plant-7/pump-3": 123456})

Needs only aiokafka (and Python 3.11), not Outpost itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

H_GATEWAY = "outpost-gateway"
H_STREAM = "outpost-stream"
H_SEQ = "outpost-seq"

NEW = "new"
DUPLICATE = "duplicate"
OUT_OF_ORDER = "out_of_order"  # delivered, but below a later seq of its stream
MALFORMED = "malformed"  # no or unreadable Outpost headers

DEFAULT_STREAM_WINDOW = 256
DEFAULT_GAP_WINDOW = 200_000


class _Stream:
    """De-duplication state of one (gateway, stream): highest seq and a recent window."""

    __slots__ = ("hwm", "recent", "recent_set")

    def __init__(self, window: int) -> None:
        self.hwm = 0
        self.recent: deque[int] = deque(maxlen=window)
        self.recent_set: set[int] = set()

    def offer(self, seq: int) -> str:
        if seq > self.hwm:
            self.hwm = seq
            self._remember(seq)
            return NEW
        if seq in self.recent_set:
            return DUPLICATE
        if self.recent and seq > self.recent[0]:
            # Not seen, yet older than the newest one seen: order broken within the stream.
            self._remember(seq)
            return OUT_OF_ORDER
        # Older than the window: a resend of a long run (window too small) or an old
        # record out of order; this consumer cannot tell and drops it as a duplicate.
        return DUPLICATE

    def _remember(self, seq: int) -> None:
        if len(self.recent) == self.recent.maxlen:
            self.recent_set.discard(self.recent[0])
        self.recent.append(seq)
        self.recent_set.add(seq)


@dataclass
class GatewayLedger:
    """Counts of one gateway and its gap ledger (see the module docstring)."""

    first_seq: int = 1
    gap_window: int = DEFAULT_GAP_WINDOW
    delivered_once: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    samples: int = 0  # metrics in `json`-format values, when the values are read
    streams: int = 0
    lowest_seq: int | None = None
    highest_seq: int = 0
    floor: int = 0  # every seq <= floor is accounted for (seen, or counted in `missing`)
    missing: int = 0  # seqs below the floor never seen (window overflow)
    late: int = 0  # seqs first counted missing that turned up after all
    above: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.floor = self.first_seq - 1

    def delivered(self, seq: int) -> None:
        self.delivered_once += 1
        if self.lowest_seq is None or seq < self.lowest_seq:
            self.lowest_seq = seq
        self.highest_seq = max(self.highest_seq, seq)
        if seq <= self.floor:
            if seq >= self.first_seq:
                self.missing -= 1  # declared missing when the window overflowed
                self.late += 1
            return
        self.above.add(seq)
        self._advance()
        while len(self.above) > self.gap_window:
            lowest = min(self.above)
            self.missing += lowest - 1 - self.floor
            self.floor = lowest - 1
            self._advance()

    def _advance(self) -> None:
        above = self.above
        floor = self.floor
        while floor + 1 in above:
            floor += 1
            above.discard(floor)
        self.floor = floor

    def lost(self, produced_last_seq: int | None = None) -> int:
        """Seqs never delivered: below the floor, in the holes above it, and after the
        highest seen up to `produced_last_seq` (the gateway's last record) when known."""
        top = self.highest_seq
        if produced_last_seq is not None:
            top = max(top, produced_last_seq)
        holes = (top - self.floor) - len(self.above)
        return self.missing + max(0, holes)

    def figures(self, produced_last_seq: int | None = None) -> dict[str, Any]:
        produced = None
        if produced_last_seq is not None:
            produced = produced_last_seq - self.first_seq + 1
        return {
            "produced": produced,
            "delivered_once": self.delivered_once,
            "duplicates": self.duplicates,
            "lost": self.lost(produced_last_seq),
            "out_of_order": self.out_of_order,
            "late": self.late,
            "streams": self.streams,
            "lowest_seq": self.lowest_seq,
            "highest_seq": self.highest_seq,
            "samples": self.samples,
        }


class Deduplicator:
    """Decides for each (gateway, stream, seq) whether it is new; keeps the per-gateway counts."""

    def __init__(self, *, stream_window: int = DEFAULT_STREAM_WINDOW,
                 gap_window: int = DEFAULT_GAP_WINDOW, first_seq: int = 1) -> None:
        if stream_window < 1 or gap_window < 1 or first_seq < 1:
            raise ValueError("stream_window, gap_window and first_seq must be at least 1")
        self.stream_window = stream_window
        self.gap_window = gap_window
        self.first_seq = first_seq
        self._streams: dict[tuple[str, str], _Stream] = {}
        self.gateways: dict[str, GatewayLedger] = {}
        self.malformed = 0
        self.messages = 0

    def offer(self, gateway: str, stream: str, seq: int) -> str:
        """NEW, DUPLICATE or OUT_OF_ORDER (new, but after a later seq of the same stream)."""
        self.messages += 1
        ledger = self.gateways.get(gateway)
        if ledger is None:
            ledger = self.gateways[gateway] = GatewayLedger(self.first_seq, self.gap_window)
        key = (gateway, stream)
        st = self._streams.get(key)
        if st is None:
            st = self._streams[key] = _Stream(self.stream_window)
            ledger.streams += 1
        verdict = st.offer(seq)
        if verdict == DUPLICATE:
            ledger.duplicates += 1
        else:
            if verdict == OUT_OF_ORDER:
                ledger.out_of_order += 1
            ledger.delivered(seq)
        return verdict

    def offer_headers(self, headers: Iterable[tuple[str, bytes | str | None]]) -> tuple[str, str | None]:
        """`offer` from a Kafka message's headers; (verdict, gateway). MALFORMED if absent."""
        gw = stream = seq_text = None
        for k, v in headers:
            if k == H_GATEWAY:
                gw = v
            elif k == H_STREAM:
                stream = v
            elif k == H_SEQ:
                seq_text = v
        try:
            if gw is None or stream is None or seq_text is None:
                raise ValueError("missing header")
            gateway = gw.decode() if isinstance(gw, bytes) else gw
            stream_s = stream.decode() if isinstance(stream, bytes) else stream
            seq = int(seq_text)
            if seq < 1:
                raise ValueError("seq below 1")
        except (ValueError, UnicodeDecodeError):
            self.malformed += 1
            return MALFORMED, None
        return self.offer(gateway, stream_s, seq), gateway

    def report(self, produced: dict[str, int] | None = None) -> dict[str, Any]:
        """Per gateway figures and totals; `produced` maps gateway -> its last seq."""
        produced = produced or {}
        per = {}
        for gw in sorted(set(self.gateways) | set(produced)):
            ledger = self.gateways.get(gw) or GatewayLedger(self.first_seq, self.gap_window)
            per[gw] = ledger.figures(produced.get(gw))
        delivered = sum(g["delivered_once"] for g in per.values())
        dups = sum(g["duplicates"] for g in per.values())
        return {
            "gateways": per,
            "messages": self.messages,
            "malformed": self.malformed,
            "delivered_once": delivered,
            "duplicates": dups,
            "lost": sum(g["lost"] for g in per.values()),
            "out_of_order": sum(g["out_of_order"] for g in per.values()),
            "duplicate_rate": round(dups / delivered, 6) if delivered else 0.0,
        }


def count_samples(value: bytes | None) -> int:
    """Metrics in one `json`-format value (0 for other formats)."""
    if not value or value[:1] != b"{":
        return 0
    try:
        doc = json.loads(value)
    except ValueError:
        return 0
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    return len(metrics) if isinstance(metrics, list) else 0


async def consume(
    bootstrap: str,
    topics: list[str],
    dedup: Deduplicator,
    *,
    follow: bool = False,
    count_values: bool = False,
    on_new: Any = None,
    idle_report_s: float = 0.0,
    consumer_options: dict[str, Any] | None = None,
) -> Deduplicator:
    """Read `topics` from the beginning into `dedup`.

    Without `follow`, stops once every partition reached the end offset it had when the
    read began (a snapshot of the topic). `on_new(record)` is called for each new record
    (a de-duplicated stream for a downstream job). No consumer group, nothing committed.
    """
    from aiokafka import AIOKafkaConsumer

    # Subscribed without a group: the consumer takes every partition of the topics itself.
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        auto_offset_reset="earliest", **(consumer_options or {}),
    )
    await consumer.start()
    try:
        parts: list[Any] = []
        for _ in range(200):  # metadata for the topics may take a moment
            parts = sorted(consumer.assignment())
            counts = {t: len(consumer.partitions_for_topic(t) or ()) for t in topics}
            got = {t: sum(1 for tp in parts if tp.topic == t) for t in topics}
            if all(counts[t] and got[t] == counts[t] for t in topics):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"kafka {bootstrap}: no partitions assigned for {topics} "
                               f"(does every topic exist?)")
        await consumer.seek_to_beginning(*parts)
        end = await consumer.end_offsets(parts)
        pending = {tp for tp in parts if end[tp] > 0}
        last_report = time.monotonic()
        while follow or pending:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batches.items():
                for rec in records:
                    verdict, gw = dedup.offer_headers(rec.headers)
                    if verdict in (NEW, OUT_OF_ORDER):
                        if count_values and gw is not None:
                            dedup.gateways[gw].samples += count_samples(rec.value)
                        if on_new is not None:
                            on_new(rec)
                if tp in pending and records and records[-1].offset + 1 >= end[tp]:
                    pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= end[tp]:
                    pending.discard(tp)
            if idle_report_s and time.monotonic() - last_report > idle_report_s:
                last_report = time.monotonic()
                print(json.dumps(dedup.report()), file=sys.stderr, flush=True)
    finally:
        await consumer.stop()
    return dedup


def _produced_arg(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        gw, sep, seq = item.rpartition("=")
        if not sep or not gw or not seq.isdigit():
            raise argparse.ArgumentTypeError(f"--produced {item!r}: expected GATEWAY=LAST_SEQ")
        out[gw] = int(seq)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.outpost_consumer",
        description="Read Outpost's Kafka topics, drop at-least-once duplicates by "
                    "(outpost-gateway, outpost-stream, outpost-seq) with bounded memory, and "
                    "report per gateway: delivered once, duplicates, lost (gaps).",
        epilog="Reads from the beginning without a consumer group. Exit status 0 when "
               "nothing was lost, out of order or malformed, 1 otherwise.")
    ap.add_argument("--bootstrap", required=True, help="host:port[,host:port...]")
    ap.add_argument("--topic", action="append", required=True, help="a topic (repeatable)")
    ap.add_argument("--follow", action="store_true",
                    help="keep reading (Ctrl-C prints the report); default: stop at the end "
                         "offsets found at start")
    ap.add_argument("--produced", action="append", default=[], metavar="GATEWAY=LAST_SEQ",
                    help="the last seq a gateway produced (`outpost status --json`, buffer), "
                         "so records never sent at all count as lost (repeatable)")
    ap.add_argument("--first-seq", type=int, default=1,
                    help="the first seq of every gateway in the topic (default 1)")
    ap.add_argument("--stream-window", type=int, default=DEFAULT_STREAM_WINDOW,
                    help="recent seqs kept per stream (default %(default)s)")
    ap.add_argument("--gap-window", type=int, default=DEFAULT_GAP_WINDOW,
                    help="seqs kept per gateway above its contiguous floor (default %(default)s)")
    ap.add_argument("--samples", action="store_true",
                    help="count the metrics in `json`-format values (parses every value)")
    ap.add_argument("--json", action="store_true", help="one JSON object (default: a table)")
    args = ap.parse_args(argv)
    try:
        produced = _produced_arg(args.produced)
    except argparse.ArgumentTypeError as exc:
        ap.error(str(exc))
    dedup = Deduplicator(stream_window=args.stream_window, gap_window=args.gap_window,
                         first_seq=args.first_seq)
    started = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(consume(args.bootstrap, args.topic, dedup, follow=args.follow,
                            count_values=args.samples))
    report = dedup.report(produced)
    report["read_s"] = round(time.monotonic() - started, 2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'gateway':40s} {'produced':>10s} {'once':>10s} {'dups':>8s} {'lost':>8s}")
        for gw, g in report["gateways"].items():
            produced_text = "" if g["produced"] is None else str(g["produced"])
            print(f"{gw:40s} {produced_text:>10s} {g['delivered_once']:>10d} "
                  f"{g['duplicates']:>8d} {g['lost']:>8d}")
        print(f"duplicate rate {report['duplicate_rate']:.4%}, malformed {report['malformed']}, "
              f"out of order {report['out_of_order']}")
    bad = report["lost"] or report["out_of_order"] or report["malformed"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
