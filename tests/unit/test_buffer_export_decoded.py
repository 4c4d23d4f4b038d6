"""`outpost buffer export` decoded: records written by the real pipeline encoder, read back
as JSON lines and CSV with names, values, quality and times, odd values kept apart."""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import tracemalloc
from pathlib import Path

import pytest

from buffer import Buffer, BufferSettings, NewRecord, diagnostics
from drivers.base import PointInfo, Quality, Sample
from gateway.cli import export as ex
from gateway.cli import main
from gateway.pipeline.report import ReportByException
from gateway.sparkplug.edge import NodeIdentity

T0 = 1_764_693_600_123          # 2025-12-02T16:40:00.123Z
POINTS = [PointInfo("voltage", "float32", "V"), PointInfo("ratio", "float64"),
          PointInfo("label", "string"), PointInfo("running", "bool"),
          PointInfo("count", "int32"), PointInfo("big", "uint64")]


def settings() -> BufferSettings:
    return BufferSettings(max_size_bytes=100_000_000, max_age_s=1e9, check_on_open="none")


def odd_samples() -> list[Sample]:
    return [
        Sample("meter,1", "voltage", 230.1, T0),
        Sample("meter,1", "ratio", float("nan"), T0 + 1),
        Sample("meter,1", "label", 'a,b "quoted"\nnext line', T0 + 2),
        Sample("meter,1", "running", True, T0 + 3),
        Sample("meter,1", "count", None, T0 + 4, Quality.BAD, "timeout"),
        Sample("meter,1", "big", 2**64 - 1, T0 + 5),
    ]


def write_buffer(path: Path, samples: list[Sample], extra: list[NewRecord] = ()) -> None:
    rbe = ReportByException(NodeIdentity("plant", "gw"), {"meter,1": POINTS, "m2": POINTS})
    for s in samples:
        rbe.offer(s)
    with Buffer.open(path, settings()) as buf:
        buf.append(rbe.drain())
        if extra:
            buf.append(list(extra))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "buffer.db"
    extra = [
        NewRecord("plant/gw/other", b"temperature,21.5", T0 + 10,
                  {"type": "bridged", "topic": "site/temp"}),
        NewRecord("plant/gw/other", b"\xff\x00\xfe", T0 + 11, {"type": "bridged", "topic": "site/bin"}),
        NewRecord("plant/gw/meter,1", b"\x0a\xff\xff garbage", T0 + 12,
                  {"type": "DDATA", "topic": "spBv1.0/plant/DDATA/gw/meter,1"}),
    ]
    write_buffer(p, odd_samples(), extra)
    return p


def test_jsonl_names_values_quality_and_times(path: Path, capsys) -> None:
    assert main(["buffer", "--file", str(path), "export"]) == 0
    out, err = capsys.readouterr()
    # Strict JSON: a bare NaN would make this raise.
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
            for line in out.splitlines()]
    assert "exported 4 record(s), 9 row(s)" in err
    by = {r["metric"]: r for r in rows}
    v = by["voltage"]
    assert (v["seq"], v["device"], v["datatype"], v["value"], v["quality"]) == (1, "meter,1", "Float", 230.1, "GOOD")
    assert (v["ts_ms"], v["time"], v["type"], v["stream"]) == \
        (T0, "2025-12-02T16:40:00.123Z", "DDATA", "plant/gw/meter,1")
    assert "clock" not in v and "error" not in v
    assert by["ratio"]["value"] == "NaN" and by["ratio"]["datatype"] == "Double"
    assert by["label"]["value"] == 'a,b "quoted"\nnext line'
    assert by["running"]["value"] is True
    assert by["count"]["value"] is None and by["count"]["quality"] == "BAD"
    assert by["big"]["value"] == 2**64 - 1 and by["big"]["datatype"] == "UInt64"
    assert by["site/temp"] == {**by["site/temp"], "type": "bridged", "datatype": "String",
                               "value": "temperature,21.5", "device": None}
    assert by["site/bin"]["datatype"] == "Bytes" and by["site/bin"]["value"] == "/wD+"
    bad = [r for r in rows if r.get("error")]
    assert len(bad) == 1 and bad[0]["seq"] == 4 and "not a Sparkplug B payload" in bad[0]["error"]


def test_csv_quotes_what_needs_it_and_keeps_null_apart_from_empty(tmp_path: Path) -> None:
    p = tmp_path / "buffer.db"
    write_buffer(p, [*odd_samples(), Sample("m2", "label", "", T0 + 6),
                     Sample("m2", "ratio", float("-inf"), T0 + 7),
                     Sample("m2", "voltage", float("inf"), T0 + 8),
                     Sample("m2", "count", -5, T0 + 9)])
    out_file = tmp_path / "out.csv"
    assert main(["buffer", "--file", str(p), "export", "--format", "csv", "-o", str(out_file)]) == 0
    raw = out_file.read_bytes().decode("utf-8")
    assert raw.startswith("seq,time,ts_ms,type,device,metric,datatype,value,quality,clock,stream,error\r\n")
    rows = list(csv.DictReader(io.StringIO(raw, newline="")))
    by = {(r["device"], r["metric"]): r for r in rows}
    assert by["meter,1", "label"]["value"] == 'a,b "quoted"\nnext line'
    assert by["meter,1", "voltage"]["value"] == "230.1"
    assert by["meter,1", "ratio"]["value"] == "NaN"
    assert by["m2", "ratio"]["value"] == "-Infinity" and by["m2", "voltage"]["value"] == "Infinity"
    assert by["meter,1", "running"]["value"] == "true"
    assert by["m2", "count"]["value"] == "-5"
    assert by["meter,1", "big"]["value"] == str(2**64 - 1)
    assert by["meter,1", "voltage"]["stream"] == "plant/gw/meter,1"
    # Null and empty string read the same through csv.DictReader; the bytes differ.
    lines = raw.split("\r\n")
    null_line = next(line for line in lines if ",count,Int32," in line and "meter" in line)
    empty_line = next(line for line in lines if ",label,String," in line and "m2" in line)
    assert ",Int32,,BAD," in null_line
    assert ',String,"",GOOD,' in empty_line
    assert '"a,b ""quoted""\nnext line"' in raw


def test_csv_field_rules() -> None:
    f = ex.csv_field
    assert [f(None), f(""), f(" x"), f("x"), f("a,b"), f('q"q'), f("l\r\n")] == \
        ["", '""', '" x"', "x", '"a,b"', '"q""q"', '"l\r\n"']
    assert [f(True), f(False), f(0), f(1.5), f(float("nan"))] == ["true", "false", "0", "1.5", "NaN"]
    assert f({"rows": [[1, "a,b"]]}) == '"{""rows"":[[1,""a,b""]]}"'


def test_float32_written_with_the_digits_it_has() -> None:
    import struct

    for v in (230.1, 0.1, 1e-7, 3.4e38, -0.0, 16777217.0, 49.99):
        f32 = struct.unpack("<f", struct.pack("<f", v))[0]
        short = ex.shortest_float32(f32)
        assert struct.pack("<f", short) == struct.pack("<f", f32)
        assert len(repr(short)) <= len(repr(f32))
    assert ex.shortest_float32(struct.unpack("<f", struct.pack("<f", 230.1))[0]) == 230.1
    assert math.isnan(ex.shortest_float32(float("nan")))


def test_iso_time_of_odd_timestamps() -> None:
    assert ex.iso_time(0) == "1970-01-01T00:00:00.000Z"
    assert ex.iso_time(-1) == "1969-12-31T23:59:59.999Z"
    assert ex.iso_time(2**63 - 1) == ""        # no calendar holds it; ts_ms still does


def test_raw_format_keeps_the_stored_bytes(path: Path, capsys) -> None:
    assert main(["buffer", "--file", str(path), "export", "--format", "raw"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [sorted(r) for r in rows] == [["headers", "payload_b64", "seq", "stream", "ts_ms"]] * 4
    assert rows[1]["payload_b64"] == "dGVtcGVyYXR1cmUsMjEuNQ=="


def test_unsynced_clock_is_flagged(tmp_path: Path, capsys) -> None:
    p = tmp_path / "buffer.db"
    rbe = ReportByException(NodeIdentity("plant", "gw"), {"m": POINTS})
    rbe.offer(Sample("m", "count", 7, T0))
    with Buffer.open(p, settings()) as buf:
        buf.append(rbe.drain({"clock": "unsynced", "clock_offset_ns": "0", "boot_id": "b"}))
    assert main(["buffer", "--file", str(p), "export"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["clock"] == "unsynced" and row["value"] == 7


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_at_a_terminal(path: Path) -> None:
    after, last = diagnostics.export_span(path)
    assert (after, last) == (0, 4)
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        progress = ex.Progress(last - after, stream, delay_s=0.0)
        ex.write_decoded(diagnostics.iter_records(path), io.StringIO(), "jsonl", progress, after)
        progress.clear()
    assert "exporting: 1/4 records (25%)" in tty.getvalue()
    assert tty.getvalue().endswith("\r\033[K")       # the line is cleared at the end
    assert pipe.getvalue() == ""


def test_progress_waits_a_second_before_showing(path: Path) -> None:
    tty = _Tty()
    ex.write_decoded(diagnostics.iter_records(path), io.StringIO(), "csv", ex.Progress(4, tty))
    assert tty.getvalue() == ""                  # a small export prints no progress


class _Sink(io.TextIOBase):
    def __init__(self) -> None:
        self.lines = 0

    def write(self, s: str) -> int:
        self.lines += s.count("\n")
        return len(s)


def test_a_large_export_streams_in_bounded_memory(tmp_path: Path) -> None:
    p = tmp_path / "buffer.db"
    rbe = ReportByException(NodeIdentity("plant", "gw"), {"m": POINTS})
    n = 6_000
    with Buffer.open(p, settings()) as buf:
        batch: list[NewRecord] = []
        for i in range(n):
            rbe.offer(Sample("m", "count", i, T0 + i))
            rbe.offer(Sample("m", "label", f"reading number {i} " * 8, T0 + i))
            batch += rbe.drain()
            if len(batch) == 1000:
                buf.append(batch)
                batch = []
    stored = diagnostics.stats_for_path(p)["bytes"]
    sink = _Sink()
    tracemalloc.start()
    try:
        records, rows = ex.write_decoded(diagnostics.iter_records(p, batch=200), sink, "jsonl")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (records, rows, sink.lines) == (n, 2 * n, 2 * n)
    # Everything at once would hold every payload (and far more once decoded); a stream
    # holds one batch of 200.
    assert stored > 1_000_000
    assert peak < stored / 4, (peak, stored)


def test_reading_between_batches_does_not_pin_the_wal(tmp_path: Path) -> None:
    p = tmp_path / "buffer.db"
    with Buffer.open(p, settings()) as buf:
        buf.append([NewRecord("g/e/d", b"x" * 100, T0 + i, {"type": "bridged", "topic": "t"})
                    for i in range(1000)])
    writer = sqlite3.connect(p, isolation_level=None, timeout=0.1)
    try:
        def write_and_checkpoint() -> int:
            writer.execute("INSERT INTO meta (key, value) VALUES ('test.scratch', 1) "
                           "ON CONFLICT (key) DO UPDATE SET value = value + 1")
            return writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]  # 1 = busy

        records = diagnostics.iter_records(p, batch=100)
        next(records)                            # the export is under way, the consumer slow
        assert write_and_checkpoint() == 0       # a checkpoint still completes
        assert sum(1 for _ in records) == 999
        # The contrast: one statement walked row by row (sqlite-utils' rows_where does this)
        # holds its read transaction open, and the checkpoint cannot complete.
        ro = sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None)
        cur = ro.execute("SELECT seq FROM records ORDER BY seq")
        cur.fetchone()
        assert write_and_checkpoint() == 1
        ro.close()
    finally:
        writer.close()
