"""Model-based test: random appends, reads, acks from several cursors, reopen and size-cap
hits, checked step by step against a plain in-memory model of the buffer."""

from __future__ import annotations

import shutil
import tempfile
import time

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from buffer import Buffer, BufferFull, BufferSettings, NewRecord

CAP = 128 * 1024        # small (the empty schema takes ~40 KiB), so the cap is hit often
RECORD_COST_MAX = 48    # row header, rowid, stream/ts/headers ids and cell pointer (~30-35 B)
FILL_MIN_PERCENT = 80   # leaf pages of rows appended in seq order are nearly full
SLACK_PAGES = 3         # pages a batch in flight may hold beyond its rows (index, meta)

NOW = time.time_ns() // 1_000_000
CURSORS = ("mqtt", "kafka", "late")
STREAMS = ("g/e", "g/e/d1", "g/e/d2", "spBv1.0/x/y")
HEADERS = ({}, {"type": "DDATA", "topic": "t1"}, {"type": "bridged", "topic": "a/b"})

new_record = st.builds(
    NewRecord,
    stream=st.sampled_from(STREAMS),
    payload=st.binary(min_size=0, max_size=800),
    ts_ms=st.integers(NOW - 1000, NOW + 1000),
    headers=st.sampled_from(HEADERS).map(dict),
)


class BufferModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="outpost-buffer-model-")
        self.path = f"{self.dir}/b.db"
        self.buf: Buffer | None = None
        self.records: list[tuple[int, NewRecord]] = []   # what the buffer must hold, in order
        self.cursors: dict[str, int] = {}
        self.last_seq = 0
        self.dropped = 0

    @initialize(policy=st.sampled_from(["drop_oldest", "block"]))
    def open(self, policy: str) -> None:
        self.settings = BufferSettings(max_size_bytes=CAP, max_age_s=86400.0, when_full=policy)
        self.buf = Buffer.open(self.path, self.settings)
        # The file an empty buffer needs (schema pages): the model's fixed cost.
        self.page_size = self.buf.stats()["page_size"]
        self.empty_bytes = self.buf.stats()["used_bytes"]

    def _must_drop(self, batch: list[NewRecord]) -> tuple[int, int]:
        """The model's own count of the oldest records the size cap forces out to make room
        for `batch`, bracketed: (fewest that can be enough, most that can be needed).

        Each record costs its payload plus a row overhead on disk; leaf pages of rows
        appended in seq order fill almost completely. The low count charges the bare
        payloads; the high count charges RECORD_COST_MAX per row, a fill factor, the
        pages of the batch in flight and the buffer's deliberate slack (about one page of
        records more per trim, so that the next append does not trim again).
        """
        def count(cost, budget: int) -> int:
            total = sum(cost(r) for _, r in self.records) + sum(cost(r) for r in batch)
            k = 0
            while total > budget and k < len(self.records):
                total -= cost(self.records[k][1])
                k += 1
            return k

        low = count(lambda r: len(r.payload), CAP - self.empty_bytes)
        high = count(lambda r: (len(r.payload) + RECORD_COST_MAX) * 100 // FILL_MIN_PERCENT,
                     CAP - self.empty_bytes - SLACK_PAGES * self.page_size)
        rows = [r for _, r in self.records] + batch
        average = sum(len(r.payload) + RECORD_COST_MAX for r in rows) // len(rows)
        return low, high + 3 * (self.page_size // average + 1)

    def teardown(self) -> None:
        if self.buf is not None:
            self.buf.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _first_seq(self) -> int:
        return self.records[0][0] if self.records else self.last_seq + 1

    def _delete_passed(self) -> None:
        if self.cursors:
            floor = min(self.cursors.values())
            self.records = [(s, r) for s, r in self.records if s > floor]

    @rule(name=st.sampled_from(CURSORS))
    def register(self, name: str) -> None:
        self.buf.register_cursor(name)
        self.cursors.setdefault(name, self._first_seq() - 1)

    @rule(batch=st.lists(new_record, min_size=1, max_size=60))
    def append(self, batch: list[NewRecord]) -> None:
        before = self.buf.stats()["dropped"]["size"]
        bounds = self._must_drop(batch)
        try:
            seqs = self.buf.append(batch)
        except BufferFull as e:
            assert self.settings.when_full == "block" and e.retriable
            assert self.buf.stats()["last_seq"] == self.last_seq
            event("refused by block policy")
            return
        assert seqs == list(range(self.last_seq + 1, self.last_seq + 1 + len(batch)))
        dropped = self.buf.stats()["dropped"]["size"] - before
        if self.settings.when_full == "block":
            assert dropped == 0
        else:
            # Drops take the oldest records only, as many as the cap forces out, not more.
            low, high = bounds
            assert low <= dropped <= high, (dropped, bounds, len(self.records))
        self.records = self.records[dropped:]
        self.dropped += dropped
        event("size-cap hit" if dropped else "appended without drop")
        self.records.extend(zip(seqs, batch, strict=True))
        self.last_seq = seqs[-1]

    @rule(n=st.integers(5, 30), size=st.integers(500, 1500), stream=st.sampled_from(STREAMS))
    def fill(self, n: int, size: int, stream: str) -> None:
        """Large batches so that the size cap is hit within a few steps."""
        self.append([NewRecord(stream, bytes([i % 256]) * size, NOW, {"type": "DDATA"})
                     for i in range(n)])

    @precondition(lambda self: self.cursors)
    @rule(data=st.data(), limit=st.integers(1, 60),
          max_bytes=st.none() | st.integers(0, 4000))
    def read(self, data, limit: int, max_bytes: int | None) -> None:
        name = data.draw(st.sampled_from(sorted(self.cursors)))
        got = self.buf.read(name, limit, max_bytes)
        pending = [(s, r) for s, r in self.records if s > self.cursors[name]][:limit]
        expected = []
        total = 0
        for s, r in pending:
            if max_bytes is not None and expected and total + len(r.payload) > max_bytes:
                break
            total += len(r.payload)
            expected.append((s, r))
        assert [g.seq for g in got] == [s for s, _ in expected]
        for g, (_, r) in zip(got, expected, strict=True):
            assert (g.stream, g.ts_ms, g.headers, g.payload) == (
                r.stream, r.ts_ms, r.headers, r.payload)

    @precondition(lambda self: self.cursors)
    @rule(data=st.data())
    def ack(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(self.cursors)))
        upto = data.draw(st.integers(self.cursors[name], self.last_seq))
        self.buf.ack(name, upto)
        self.cursors[name] = max(self.cursors[name], upto)
        self._delete_passed()

    @rule()
    def reopen(self) -> None:
        self.buf.close()
        self.buf = Buffer.open(self.path, self.settings)

    @invariant()
    def stats_agree_with_model(self) -> None:
        if self.buf is None:
            return
        s = self.buf.stats()
        assert s["records"] == len(self.records)
        assert s["last_seq"] == self.last_seq
        assert s["bytes"] == sum(len(r.payload) for _, r in self.records)
        assert s["dropped"]["size"] == self.dropped
        assert set(s["cursors"]) == set(self.cursors)
        for name, acked in self.cursors.items():
            mine = [r for q, r in self.records if q > acked]
            assert s["cursors"][name]["records"] == len(mine), name
            assert s["cursors"][name]["bytes"] == sum(len(r.payload) for r in mine), name
        assert s["used_bytes"] <= CAP


TestBufferModel = BufferModel.TestCase
TestBufferModel.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
