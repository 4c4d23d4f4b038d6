"""`outpost buffer stats|export|purge` against real buffer files: read-only figures that agree
with the buffer's own, exact export lines, filters, a writer during the export, bad files."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time

import pytest

from buffer import Buffer, BufferError, BufferSettings, NewRecord, UnknownCursor, diagnostics

NOW = time.time_ns() // 1_000_000


def settings() -> BufferSettings:
    return BufferSettings(max_size_bytes=64 * 1024 * 1024, max_age_s=86400.0, reserve_bytes=0)


def rec(i: int, stream: str = "g/e/d1", ts: int = NOW, headers=None) -> NewRecord:
    return NewRecord(stream, b"p%d" % i, ts, {"type": "DDATA"} if headers is None else headers)


def test_stats_for_path_agree_with_the_open_buffer(path) -> None:
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("kafka")
        buf.register_cursor("mqtt")
        buf.append([rec(i, ts=NOW - 5000 + i) for i in range(6)])
        buf.ack("mqtt", 6)
        buf.ack("kafka", 2)
        mine = buf.stats()
        theirs = diagnostics.stats_for_path(path)       # read-only, while the buffer is open
    for key in ("records", "bytes", "first_seq", "last_seq", "oldest_ts_ms", "cursors", "dropped",
                "used_bytes", "page_size"):
        assert theirs[key] == mine[key], key
    assert theirs["records"] == 4 and theirs["first_seq"] == 3 and theirs["oldest_ts_ms"] == NOW - 4998
    assert theirs["cursors"]["kafka"] == {"acked_seq": 2, "records": 4, "bytes": 8}
    assert theirs["cursors"]["mqtt"] == {"acked_seq": 6, "records": 0, "bytes": 0}
    assert theirs["schema_version"] >= 1 and theirs["oldest_age_s"] >= 4.0
    assert set(theirs["dropped"]) >= {"age", "size", "disk_full", "purged", "uplink_removed", "corrupt"}
    after = diagnostics.stats_for_path(path)           # and after it closed
    assert after["records"] == 4 and after["last_seq"] == 6 and after["wal_size_bytes"] >= 0


def test_stats_of_an_empty_buffer(path) -> None:
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("c")
        buf.append([rec(1)])
        buf.ack("c", 1)
    st = diagnostics.stats_for_path(path)
    assert (st["records"], st["first_seq"], st["last_seq"], st["oldest_ts_ms"], st["oldest_age_s"]) == (
        0, None, 1, None, None)
    assert st["cursors"]["c"]["records"] == 0


def test_export_lines_are_exact_and_filtered(path) -> None:
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("k")
        buf.register_cursor("slow")           # holds every record
        buf.append([rec(1, ts=NOW - 10), rec(2, stream="g/e/d2", headers={"topic": "t", "type": "x"}),
                    rec(3, ts=NOW + 10)])
        buf.ack("k", 1)
    out = io.StringIO()
    assert diagnostics.export_jsonl(path, out, batch=2) == 3
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines[1] == {"seq": 2, "stream": "g/e/d2", "ts_ms": NOW, "headers": {"topic": "t", "type": "x"},
                        "payload_b64": base64.b64encode(b"p2").decode()}
    assert [x["seq"] for x in lines] == [1, 2, 3]
    assert out.getvalue().count("\n") == 3 and " " not in out.getvalue()
    out = io.StringIO()
    assert diagnostics.export_jsonl(path, out, since_ts_ms=NOW) == 2
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [2, 3]
    out = io.StringIO()
    assert diagnostics.export_jsonl(path, out, cursor="k", batch=1) == 2
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [2, 3]
    out = io.StringIO()
    assert diagnostics.export_jsonl(path, out, since_ts_ms=NOW + 10, cursor="k") == 1
    with pytest.raises(UnknownCursor, match=r"unknown cursor 'nope' \(registered: \['k', 'slow'\]\)"):
        diagnostics.export_jsonl(path, io.StringIO(), cursor="nope")


def test_export_sees_streams_written_during_the_export(path) -> None:
    buf = Buffer.open(path, settings())
    try:
        buf.append([rec(i) for i in range(3)])

        class WriterDuringExport(io.StringIO):
            def write(self, s: str) -> int:
                if self.tell() == 0:    # after the first line: the gateway appends a new stream
                    buf.append([rec(9, stream="g/e/new", headers={"type": "NDATA"})])
                return super().write(s)

        out = WriterDuringExport()
        assert diagnostics.export_jsonl(path, out, batch=2) == 4
        last = json.loads(out.getvalue().splitlines()[-1])
        assert (last["seq"], last["stream"], last["headers"]) == (4, "g/e/new", {"type": "NDATA"})
    finally:
        buf.close()


def test_purge_per_cursor_and_all(path) -> None:
    with Buffer.open(path, settings()) as buf:
        buf.register_cursor("a")
        buf.register_cursor("b")
        buf.append([rec(i) for i in range(5)])
        buf.ack("a", 5)
        buf.ack("b", 2)
    assert diagnostics.purge(path, "b") == 3
    st = diagnostics.stats_for_path(path)
    assert st["records"] == 0 and st["dropped"]["purged"] == 3 and st["last_seq"] == 5


def test_what_is_not_a_buffer_is_named(path, tmp_path) -> None:
    with pytest.raises(BufferError, match="no buffer file there"):
        diagnostics.stats_for_path(path)
    with pytest.raises(BufferError, match="no buffer file there"):
        diagnostics.purge(path)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE x (y)")
    with pytest.raises(BufferError, match=r"not an Outpost buffer \(.*tables \['x'\]\); nothing was changed"):
        diagnostics.stats_for_path(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(BufferError, match=r"not an Outpost buffer \(not an SQLite database file\)"):
        diagnostics.export_jsonl(garbage, io.StringIO())
    assert garbage.read_bytes() == b"not sqlite at all" * 100  # left untouched
