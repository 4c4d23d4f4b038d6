"""The buffer's quarantine (issue 11): records one uplink cannot deliver are kept aside with
a reason, counted, listed, exported, re-sent or dropped, under the retention rules."""

from __future__ import annotations

import io
import json
import time

import pytest

from buffer import AsyncBuffer, Buffer, BufferError, BufferLocked, BufferSettings, NewRecord, diagnostics

NOW = time.time_ns() // 1_000_000


def settings(**kw) -> BufferSettings:
    base = dict(max_size_bytes=64 * 1024 * 1024, max_age_s=86400.0)
    base.update(kw)
    return BufferSettings(**base)


def recs(n: int, start: int = 0, size: int = 100, ts: int | None = None) -> list[NewRecord]:
    return [NewRecord("g/n/d1", (b"%06d" % (start + i)).ljust(size, b"."),
                      NOW if ts is None else ts, {"topic": "t/d1"}) for i in range(n)]


def test_quarantine_keeps_a_copy_counted_per_reason_and_lets_the_rest_flow(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(10))
        assert buf.quarantine("mqtt", 4, "too_large") is True
        assert buf.quarantine("mqtt", 4, "too_large") is False      # idempotent, counted once
        assert buf.quarantine("mqtt", 7, "not_encodable") is True
        buf.ack("mqtt", 10)             # the uplink acks past the poison records
        buf.ack("kafka", 10)
        st = buf.stats()
        assert st["records"] == 0
        q = st["quarantine"]
        assert q["records"] == 2
        assert q["by_reason"] == {"too_large": 1, "not_encodable": 1}
        assert q["by_cursor"] == {"mqtt": 2}
        assert q["total_by_reason"] == {"too_large": 1, "not_encodable": 1}
        listed = buf.quarantine_list()
        assert [(r.cursor, r.seq, r.reason) for r in listed] == [
            ("mqtt", 4, "too_large"), ("mqtt", 7, "not_encodable")]
        assert listed[0].payload.startswith(b"000003")
        assert dict(listed[0].headers) == {"topic": "t/d1"}
    # Kept across a restart.
    with Buffer.open(path, settings()) as buf:
        assert buf.stats()["quarantine"]["records"] == 2


def test_quarantine_refuses_unknown_cursor_seq_and_reason(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(3))
        with pytest.raises(BufferError, match="seq 9"):
            buf.quarantine("mqtt", 9, "too_large")
        with pytest.raises(BufferError, match="reason"):
            buf.quarantine("mqtt", 1, "")
        with pytest.raises(BufferError, match="nope"):
            buf.quarantine("nope", 1, "too_large")


def test_retry_resends_in_order_to_its_own_uplink_only(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(10))
        for seq in (8, 3, 5):
            buf.quarantine("mqtt", seq, "too_large")
        buf.quarantine("kafka", 6, "unknown_topic")
        buf.ack("mqtt", 10)
        buf.ack("kafka", 10)
        assert buf.quarantine_retry(cursor="mqtt") == 3
        assert buf.stats()["quarantine"]["by_cursor"] == {"kafka": 1}
        # mqtt gets them again, in their original order, with new seqs after the rest.
        got = buf.read("mqtt", 100)
        assert [r.seq for r in got] == [11, 12, 13]
        assert [r.payload[:6] for r in got] == [b"000002", b"000004", b"000007"]
        assert all(dict(r.headers) == {"topic": "t/d1"} for r in got)
        assert all(r.ts_ms == NOW for r in got)
        # kafka delivered them already: it does not see them.
        assert buf.read("kafka", 100) == []
        assert buf.has_records("kafka") is False
        assert buf.has_records("mqtt") is True
        buf.append(recs(2, start=100))
        assert [r.seq for r in buf.read("kafka", 100)] == [14, 15]
        buf.ack("mqtt", 15)
        buf.ack("kafka", 15)
        assert buf.stats()["records"] == 0
    # After a restart the marks are still understood.
    with Buffer.open(path, settings()) as buf:
        assert buf.quarantine_retry() == 1
        assert [r.seq for r in buf.read("kafka", 10)] == [16]
        assert buf.read("mqtt", 10) == []


def test_a_read_window_full_of_other_cursors_records_looks_further(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.register_cursor("kafka")
        buf.append(recs(50))
        for seq in range(1, 51):
            buf.quarantine("mqtt", seq, "too_large")
        buf.ack("mqtt", 50)
        buf.ack("kafka", 50)
        buf.quarantine_retry()
        buf.append(recs(1, start=999))
        got = buf.read("kafka", limit=10)
        assert [r.payload[:6] for r in got] == [b"000999"]


def test_drop_is_counted_and_purge_takes_quarantine_too(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(6))
        for seq in (1, 2, 3):
            buf.quarantine("mqtt", seq, "too_large")
        buf.quarantine("mqtt", 4, "not_encodable")
        assert buf.quarantine_drop(reason="not_encodable") == 1
        assert buf.quarantine_drop(seqs=[2]) == 1
        st = buf.stats()
        assert st["dropped"]["quarantine_dropped"] == 2
        assert st["quarantine"]["records"] == 2
        assert buf.purge() == 6 + 2
        st = buf.stats()
        assert st["quarantine"]["records"] == 0 and st["dropped"]["purged"] == 8


def test_quarantine_obeys_max_age(path):
    old = NOW - 3 * 86400 * 1000
    with Buffer.open(path, settings(max_age_s=86400.0)) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(5, ts=old))
        buf.quarantine("mqtt", 2, "too_large")
        buf.ack("mqtt", 1)
        buf._next_age_check = 0
        buf.append(recs(1, start=50))
        st = buf.stats()
        assert st["quarantine"]["records"] == 0
        assert st["dropped"]["age"] == 4 + 1


def test_quarantine_obeys_the_size_cap(path):
    s = settings(max_size_bytes=600 * 1024, vacuum_slack_bytes=1)
    with Buffer.open(path, s) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(400, size=1000))
        for seq in range(1, 401):
            buf.quarantine("mqtt", seq, "too_large")
        buf.ack("mqtt", 400)           # only the quarantined copies hold space now
        for i in range(10):
            buf.append(recs(100, start=1000 + 100 * i, size=1000))
            buf.ack("mqtt", buf.stats()["last_seq"])
        st = buf.stats()
        assert st["used_bytes"] <= s.max_size_bytes
        assert st["quarantine"]["records"] < 400
        assert st["dropped"]["size"] == 400 - st["quarantine"]["records"]


def test_reserved_target_header_is_refused_from_callers(path):
    from buffer.core import TARGET_KEY

    with Buffer.open(path, settings()) as buf, pytest.raises(BufferError, match="reserved"):
        buf.append([NewRecord("s", b"x", NOW, {TARGET_KEY: '["mqtt"]'})])


def test_operator_commands_list_export_retry_drop(path):
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("mqtt")
        buf.append(recs(5))
        buf.quarantine("mqtt", 2, "too_large")
        buf.quarantine("mqtt", 3, "not_encodable")
        buf.ack("mqtt", 5)
        # Read-only commands work while the gateway holds the file...
        rows = diagnostics.quarantine_list(path)
        assert [(r["seq"], r["reason"], r["payload_bytes"]) for r in rows] == [
            (2, "too_large", 100), (3, "not_encodable", 100)]
        out = io.StringIO()
        assert diagnostics.quarantine_export(path, out, reason="too_large") == 1
        line = json.loads(out.getvalue())
        assert line["seq"] == 2 and line["headers"] == {"topic": "t/d1"} and line["payload_b64"]
        st = diagnostics.stats_for_path(path)
        assert st["quarantine"]["by_reason"] == {"too_large": 1, "not_encodable": 1}
        # ... writing ones need it stopped.
        with pytest.raises(BufferLocked):
            diagnostics.quarantine_retry(path)
    assert diagnostics.quarantine_retry(path, reason="too_large") == 1
    assert diagnostics.quarantine_drop(path) == 1
    with Buffer.open(path, settings()) as buf:
        got = buf.read("mqtt")
        assert [r.payload[:6] for r in got] == [b"000001"]
        st = buf.stats()
        assert st["quarantine"]["records"] == 0
        assert st["dropped"]["quarantine_dropped"] == 1


async def test_async_quarantine_roundtrip_wakes_the_uplink(path):
    async with await AsyncBuffer.open(path, settings()) as abuf:
        await abuf.register_cursor("mqtt")
        await abuf.append(recs(3))
        assert await abuf.quarantine("mqtt", 2, "too_large")
        await abuf.ack("mqtt", 3)
        assert not await abuf.wait_for_records("mqtt", 0.01)
        assert await abuf.quarantine_retry() == 1
        assert await abuf.wait_for_records("mqtt", 1.0)
        assert [r.payload[:6] for r in await abuf.read("mqtt")] == [b"000001"]
        assert [q.seq for q in await abuf.quarantine_list()] == []


def test_an_uplink_drains_its_held_records_itself(path):
    # A held destination (quarantine reason "held:<topic>") that accepts again: the uplink
    # lists them oldest first and reports what it delivered; they leave, not as drops.
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("kafka")
        buf.register_cursor("mqtt")
        buf.append(recs(6))
        for seq in (2, 4, 5):
            buf.quarantine("kafka", seq, "held:plant.events")
        buf.quarantine("mqtt", 4, "too_large")
        q = buf.stats()["quarantine"]["by_cursor_reason"]
        assert q == {"kafka": {"held:plant.events": 3}, "mqtt": {"too_large": 1}}
        held = buf.quarantine_list("kafka", "held:plant.events", limit=2)
        assert [r.seq for r in held] == [2, 4]
        assert buf.quarantine_delivered("kafka", [r.seq for r in held]) == 2
        assert buf.quarantine_delivered("kafka", [2]) == 0          # already gone
        st = buf.stats()
        assert st["quarantine"]["by_cursor_reason"] == {"kafka": {"held:plant.events": 1},
                                                        "mqtt": {"too_large": 1}}
        assert st["quarantine"]["delivered"] == 2
        assert st["dropped"]["quarantine_dropped"] == 0
    assert diagnostics.stats_for_path(path)["quarantine"]["delivered"] == 2
