"""`outpost` commands run in-process through the CLI's entry point (gateway.cli.main):
exit codes, what goes to stdout and stderr, and the decisions of each command at its edges
(several files to check, export since a time, a missing buffer or socket, purges and drops
refused without a terminal). The process-level runs are in tests/component/."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from buffer import Buffer, BufferSettings, NewRecord
from buffer.diagnostics import stats_for_path
from gateway.cli import main

GOOD = """
[gateway]
group_id = "g"
edge_node_id = "e"
data_dir = "{data}"

[[devices]]
name = "sim1"
driver = "simulator"
interval = "1s"
  [[devices.points]]
  name = "ramp"
  waveform = "ramp"
"""
HOUR_MS = 3_600_000


@pytest.fixture
def good(tmp_path: Path) -> Path:
    f = tmp_path / "good.toml"
    f.write_text(GOOD.format(data=tmp_path / "data"))
    return f


def make_buffer(path: Path, ts: list[int]) -> None:
    s = BufferSettings(max_size_bytes=64 * 1024 * 1024, max_age_s=30 * 86400.0, reserve_bytes=0)
    with Buffer.open(path, s) as buf:
        buf.register_cursor("kafka")
        buf.append([NewRecord("g/e/d", b"%d" % i, t, {"type": "DDATA"}) for i, t in enumerate(ts)])


def test_check_reports_each_file_and_exits_with_the_worst(tmp_path: Path, good: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD.format(data=tmp_path / "data").replace('interval = "1s"', 'interval = "soon"'))
    assert main(["check", str(good)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{good}: ok - gateway ")
    assert "0 bus(es), 1 device(s), 1 point(s), uplinks: none (buffering only)" in out
    assert main(["check", str(good), str(bad)]) == 2
    cap = capsys.readouterr()
    assert f"{good}: ok" in cap.out and str(bad) not in cap.out
    assert str(bad) in cap.err and "devices[0].interval" in cap.err
    assert main(["check", str(bad), str(good)]) == 2      # the order does not hide it


def test_check_schema_prints_the_json_schema(capsys) -> None:
    assert main(["check", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "gateway" in schema["properties"] and "devices" in schema["properties"]


def test_export_since_a_duration_or_an_iso_time(tmp_path: Path, capsys) -> None:
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    path = tmp_path / "buffer.db"
    make_buffer(path, [now - 5 * HOUR_MS, now - 3 * HOUR_MS, now - HOUR_MS // 2, now])

    def exported(*args: str) -> list[int]:
        assert main(["buffer", "--file", str(path), "export", *args]) == 0
        cap = capsys.readouterr()
        lines = [json.loads(x) for x in cap.out.splitlines()]
        records = len({x["seq"] for x in lines})     # decoded: one row per metric of a record
        assert cap.err.strip() == f"exported {records} record(s), {len(lines)} row(s)"
        return [x["seq"] for x in lines]

    assert exported() == [1, 2, 3, 4]
    assert exported("--since", "2h") == [3, 4]
    assert exported("--since", "4h") == [2, 3, 4]
    at = dt.datetime.fromtimestamp((now - 4 * HOUR_MS) / 1000, dt.UTC)
    assert exported("--since", at.isoformat()) == [2, 3, 4]
    # A time without a zone is UTC (a gateway's clock and its logs are UTC).
    assert exported("--since", at.replace(tzinfo=None).isoformat()) == [2, 3, 4]
    at_plus2 = at.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert exported("--since", at_plus2.isoformat()) == [2, 3, 4]
    with pytest.raises(SystemExit, match="--since 'yesterday' is neither a duration"):
        main(["buffer", "--file", str(path), "export", "--since", "yesterday"])


def test_export_to_a_file_and_for_one_cursor(tmp_path: Path, capsys) -> None:
    path = tmp_path / "buffer.db"
    make_buffer(path, [1, 2, 3])
    with Buffer.open(path, BufferSettings(max_size_bytes=64 * 1024 * 1024, max_age_s=30 * 86400.0,
                                          reserve_bytes=0)) as buf:
        buf.ack("kafka", 2)
    out = tmp_path / "out.jsonl"
    assert main(["buffer", "--file", str(path), "export", "--cursor", "kafka", "-o", str(out)]) == 0
    assert [json.loads(x)["seq"] for x in out.read_text().splitlines()] == [3]
    assert capsys.readouterr().err.strip() == "exported 1 record(s), 1 row(s)"
    assert main(["buffer", "--file", str(path), "export", "--cursor", "nope"]) == 1
    assert "unknown cursor 'nope'" in capsys.readouterr().err


def test_buffer_commands_name_a_missing_file_and_a_bad_config(tmp_path: Path, good: Path, capsys) -> None:
    assert main(["buffer", "--file", str(tmp_path / "none.db"), "stats"]) == 1
    assert f"no buffer file at {tmp_path / 'none.db'}" in capsys.readouterr().err
    assert main(["buffer", "--config", str(good), "stats"]) == 1       # data_dir has no buffer yet
    assert f"no buffer file at {tmp_path / 'data' / 'buffer.db'}" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[gateway]\n")
    assert main(["buffer", "--config", str(broken), "stats"]) == 2
    assert "gateway.group_id" in capsys.readouterr().err


def test_stats_print_what_the_file_holds(tmp_path: Path, capsys) -> None:
    path = tmp_path / "buffer.db"
    make_buffer(path, [1, 2, 3])
    assert main(["buffer", "--file", str(path), "stats"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 3 and stats["cursors"]["kafka"]["records"] == 3


def test_purge_and_drop_refuse_without_yes_when_not_at_a_terminal(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    path = tmp_path / "buffer.db"
    make_buffer(path, [1, 2, 3])
    assert main(["buffer", "--file", str(path), "purge"]) == 2
    assert "refusing without --yes" in capsys.readouterr().err
    assert main(["buffer", "--file", str(path), "quarantine", "drop"]) == 2
    assert "refusing without --yes" in capsys.readouterr().err
    assert stats_for_path(str(path))["records"] == 3
    assert main(["buffer", "--file", str(path), "purge", "--cursor", "kafka", "--yes"]) == 0
    assert capsys.readouterr().out.strip() == "purged 3 record(s) (counted as dropped, reason=purged)"
    st = stats_for_path(str(path))
    assert st["cursors"]["kafka"]["records"] == 0 and st["dropped"]["purged"] == 3


def test_purge_at_a_terminal_asks_and_does_nothing_unless_told_purge(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    path = tmp_path / "buffer.db"
    make_buffer(path, [1, 2])
    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert main(["buffer", "--file", str(path), "purge"]) == 0
    assert capsys.readouterr().out.strip() == "nothing purged"
    assert stats_for_path(str(path))["records"] == 2
    monkeypatch.setattr("builtins.input", lambda prompt: " purge ")
    assert main(["buffer", "--file", str(path), "purge"]) == 0
    assert "purged 2 record(s)" in capsys.readouterr().out
    assert stats_for_path(str(path))["records"] == 0


def test_status_and_tail_without_a_gateway_exit_1_with_a_hint(tmp_path: Path, capsys) -> None:
    sock = str(tmp_path / "none.sock")
    for cmd in ("status", "tail"):
        assert main([cmd, "--socket", sock]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"outpost {cmd}: ") and sock in err
        assert "\nhint: " in err and "gateway running" in err
