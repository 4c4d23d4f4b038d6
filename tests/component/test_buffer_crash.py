"""Crash test: a child process appends and acks in a loop and reports each commit; the
parent kill -9s it at random moments, hundreds of times, and checks after every kill that
every reported commit is present exactly once and in order, that no reported ack went
backwards, and that `PRAGMA integrity_check` is ok.

Children come from a multiprocessing fork server (a clean, single-threaded process that
has already imported the buffer), so forking stays cheap and never copies threads that
other tests may have left running in the pytest process.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sqlite3
import time

import buffer.core
from buffer import Buffer, BufferSettings, NewRecord

KILLS = 220
PAYLOAD_LEN = 150


def payload(run: int, idx: int) -> bytes:
    return f"{run}:{idx}:".encode().ljust(PAYLOAD_LEN, b"x")


def parse(p: bytes) -> tuple[int, int]:
    """(run, index) of a record written by `payload`; fails on torn or foreign bytes."""
    run, idx, rest = p.split(b":", 2)
    assert len(p) == PAYLOAD_LEN and rest == b"x" * len(rest), p
    return int(run), int(idx)


def child(path: str, run: int, report: str, seed: int) -> None:
    """Runs in the child: appends and acks until killed, reporting each commit after it
    returned. os.write on an O_APPEND file is in the kernel the moment it returns, so
    SIGKILL cannot lose a reported line (only tear the one being written)."""
    wfd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        # Exercise checkpoints and incremental vacuum often, not only at their defaults.
        buffer.core._VACUUM_INTERVAL_S = 0.02
        rng = random.Random(seed)
        settings = BufferSettings(max_size_bytes=1 << 30, max_age_s=86400.0,
                                  when_full="drop_oldest", checkpoint_wal_bytes=32 * 1024,
                                  vacuum_slack_bytes=16 * 1024)
        buf = Buffer.open(path, settings)
        buf.register_cursor("fast")
        buf.register_cursor("slow")
        # No retention drops here, so each cursor must see every seq after its ack point:
        # a record deleted too early shows up as a gap at once, not only after a kill.
        nxt = {c: v["acked_seq"] + 1 for c, v in buf.stats()["cursors"].items()}
        idx = 0
        ts = time.time_ns() // 1_000_000
        step = 0
        while True:
            n = rng.randint(1, 40)
            batch = [NewRecord(f"g/e/d{(idx + k) % 3}", payload(run, idx + k), ts,
                               {"run": str(run)}) for k in range(n)]
            seqs = buf.append(batch)
            os.write(wfd, f"C {seqs[0]} {seqs[-1]} {run} {idx}\n".encode())
            idx += n
            step += 1
            for cursor, every in (("fast", 1), ("slow", 3)):
                if step % every:
                    continue
                got = buf.read(cursor, rng.randint(1, 80))
                if got:
                    seqs = [g.seq for g in got]
                    if seqs != list(range(nxt[cursor], nxt[cursor] + len(got))):
                        raise AssertionError(f"cursor {cursor} expected seq {nxt[cursor]}, "
                                             f"read {seqs[:3]}...")
                    for g in got:
                        parse(g.payload)
                    nxt[cursor] = seqs[-1] + 1
                    buf.ack(cursor, got[-1].seq)
                    os.write(wfd, f"A {cursor} {got[-1].seq}\n".encode())
    except BaseException as e:
        os.write(wfd, f"E {type(e).__name__}: {e}\n".encode())
    finally:
        os._exit(3)


def verify(path: str, committed: dict[int, tuple[int, int]], acked: dict[str, int]) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema")}
        if "records" not in tables:     # killed before the first open created the schema
            assert not committed and not any(acked.values())
            return
        cursors = dict(conn.execute("SELECT name, acked_seq FROM cursors"))
        for name, seq in acked.items():
            assert cursors.get(name, 0) >= seq, f"cursor {name} went back: {cursors} < {seq}"
        rows = conn.execute("SELECT seq, payload FROM records ORDER BY seq").fetchall()
        last_seq = conn.execute("SELECT value FROM meta WHERE key='last_seq'").fetchone()[0]
    finally:
        conn.close()
    floor = min(cursors.values()) if cursors else 0
    seqs = [s for s, _ in rows]
    # Rows up to the slowest cursor are retired (an ack retires, `reclaim` deletes later):
    # contiguous with the live ones, which start right after it and end at last_seq.
    live = [s for s in seqs if s > floor]
    if seqs:
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "gap or duplicate seq"
    if live:
        assert live[0] == floor + 1, f"live records start at {live[0]}, the floor is {floor}"
        assert live[-1] == last_seq
    else:
        assert last_seq == floor
    if committed:
        assert last_seq >= max(committed), "a reported commit is missing at the end"
    ids = [parse(p) for _, p in rows]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "reordered or duplicated record"
    present = dict(zip(seqs, ids, strict=True))
    for seq, ident in committed.items():
        if seq > floor:
            assert present.get(seq) == ident, f"reported commit seq {seq} {ident} lost"


def test_kill_9_never_loses_a_committed_record(tmp_path):
    path = str(tmp_path / "crash.db")
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    committed: dict[int, tuple[int, int]] = {}
    acked = {"fast": 0, "slow": 0}
    total_commits = 0
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    for run in range(KILLS):
        report = str(tmp_path / f"report-{run}.txt")
        proc = ctx.Process(target=child, args=(path, run, report, rng.randrange(1 << 30)),
                           daemon=True)
        proc.start()
        time.sleep(rng.uniform(0.002, 0.2))
        proc.kill()                                # SIGKILL
        proc.join()
        proc.close()
        try:
            with open(report, "rb") as f:
                out = f.read()
            os.unlink(report)
        except FileNotFoundError:                  # killed before it opened its report
            out = b""
        lines = out.decode().split("\n")[:-1]     # a torn last line has no newline
        for line in lines:
            kind, *rest = line.split(" ")
            assert kind != "E", f"child failed: {line}"
            if kind == "C":
                first, last, crun, idx = map(int, rest)
                for k, seq in enumerate(range(first, last + 1)):
                    committed[seq] = (crun, idx + k)
                total_commits += 1
            elif kind == "A":
                acked[rest[0]] = max(acked[rest[0]], int(rest[1]))
        verify(path, committed, acked)
        # Forget what every cursor passed: it is deleted by design.
        floor = min(acked.values())
        committed = {s: v for s, v in committed.items() if s > floor}
    # The children did real work between kills, not just open and die.
    assert total_commits > KILLS
    with Buffer.open(path, BufferSettings(max_size_bytes=1 << 30, max_age_s=86400.0)) as buf:
        assert buf.moved_aside is None
        st = buf.stats()
        assert st["records"] == st["cursors"]["slow"]["records"]
