"""Buffer commands refuse a file that is not an Outpost buffer and leave it untouched
(issue 13 item 5): before, `outpost buffer --file X purge --yes` renamed X aside and
created an empty buffer in its place."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from buffer import Buffer, BufferError, BufferSettings, NewRecord, diagnostics


def make_text(path: str) -> None:
    with open(path, "w") as f:
        f.write("important notes, not a buffer\n" * 100)


def make_empty(path: str) -> None:
    open(path, "wb").close()


def make_foreign_sqlite(path: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE inventory (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO inventory(name) VALUES ('pump')")
    conn.commit()
    conn.close()


KINDS = {"text": make_text, "empty": make_empty, "foreign_sqlite": make_foreign_sqlite}


def snapshot(directory: str) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


COMMANDS = {
    "purge": lambda p: diagnostics.purge(p),
    "purge_cursor": lambda p: diagnostics.purge(p, cursor="mqtt"),
    "stats": lambda p: diagnostics.stats_for_path(p),
    "export": lambda p: diagnostics.export_jsonl(p, io.StringIO()),
    "quarantine_list": lambda p: diagnostics.quarantine_list(p),
    "quarantine_export": lambda p: diagnostics.quarantine_export(p, io.StringIO()),
    "quarantine_retry": lambda p: diagnostics.quarantine_retry(p),
    "quarantine_drop": lambda p: diagnostics.quarantine_drop(p),
    "uplink_removal_cost": lambda p: diagnostics.uplink_removal_cost(p, ["mqtt"]),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_refuses_a_file_that_is_not_a_buffer(tmp_path, kind, command):
    path = str(tmp_path / "notes.db")
    KINDS[kind](path)
    before = snapshot(str(tmp_path))
    with pytest.raises(BufferError, match="not an Outpost buffer"):
        COMMANDS[command](path)
    assert snapshot(str(tmp_path)) == before      # not renamed, not created, not changed


def test_a_corrupt_buffer_is_refused_by_purge_not_replaced(tmp_path):
    path = str(tmp_path / "buffer.db")
    s = BufferSettings(max_size_bytes=2**30, max_age_s=86400.0)
    with Buffer.open(path, s) as buf:
        buf.register_cursor("mqtt")
        buf.append([NewRecord("s", b"x" * 200, time.time_ns() // 1_000_000, {})
                    for _ in range(2000)])
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(b"\xff" * 4096)
    names = sorted(os.listdir(tmp_path))
    with pytest.raises(BufferError):
        diagnostics.purge(path)
    assert not [n for n in os.listdir(tmp_path) if ".corrupt-" in n]
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock")) == \
        [n for n in names if not n.endswith(".lock")]


def test_the_cli_purge_refuses_and_exits_nonzero(tmp_path):
    path = tmp_path / "notes.txt"
    make_text(str(path))
    before = path.read_bytes()
    r = subprocess.run([sys.executable, "-m", "gateway", "buffer", "--file", str(path), "purge",
                        "--yes"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "not an Outpost buffer" in r.stderr
    assert "purged" not in r.stdout
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
