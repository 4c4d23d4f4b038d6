"""The process under test in the power-loss suite (tests/e2e/powerloss.py starts it).

It uses the buffer exactly as the gateway does (AsyncBuffer, one uplink cursor) on a
LazyFS mount, plus the Sparkplug bdSeq file (gateway.sparkplug.node.BdSeqStore), and
reports to its parent, one line on stdout per fact, flushed at once, *after* the call
returned, so that the parent knows what was reported committed before the cut:

    READY <last_seq>                   buffer open (a restart worked)
    C <first_seq> <last_seq> <id0>     append committed; record ids id0.. at those seqs
    AB <seq> / A <seq>                 ack of the cursor up to seq: about to call / returned
    QB <seq> / Q <seq>                 quarantine of seq: about to call / returned
    KB / K                             explicit checkpoint: about to call / returned
    B <value>                          bdSeq persisted
    RB / R <moved_to>                  corrupt-file recovery: about to open / done
    DROPPED <n>                        retention dropped records in the last append
    ERR <text>                         the last call failed (the mount died: torn write)

Each record's payload starts with its id (a counter the parent hands over, continued from
cycle to cycle), so the parent can check contents, not only counts.

Scenarios (--scenario): random, checkpoint, trim, ack, recovery, torn, slow (5 records
every 200 ms, the gateway's pace). They only change what the loop stresses; the parent
decides when to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import sys
import time

from buffer import AsyncBuffer, BufferSettings, NewRecord
from gateway.sparkplug.node import BdSeqStore

CURSOR = "up"
PAYLOAD = 200


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def settings(mode: str, scenario: str) -> BufferSettings:
    return BufferSettings(
        max_size_bytes=(3 * 1024 * 1024 if scenario == "trim" else 512 * 1024 * 1024),
        # trim: records are stamped ~max_age old, so age drops run too.
        max_age_s=(30.0 if scenario == "trim" else 7 * 86400.0),
        synchronous=mode,
        # Checkpoints every few hundred records; at the gateway's pace (slow) the default
        # 4 MiB, i.e. no checkpoint (no WAL sync by one) within a cycle.
        checkpoint_wal_bytes=(4 * 1024 * 1024 if scenario == "slow" else 256 * 1024),
        vacuum_slack_bytes=256 * 1024,
        reserve_bytes=0,
    )


def damage_index(path: str) -> None:
    """Garbage over one index page (quick_check fails, every record stays readable),
    fsynced: the corruption is on disk before the recovery starts."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root = conn.execute("SELECT rootpage FROM sqlite_schema "
                            "WHERE name = 'sqlite_autoindex_streams_1'").fetchone()[0]
        page = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xa5" * page, (root - 1) * page)
        os.fsync(fd)
    finally:
        os.close(fd)


async def run(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    path = os.path.join(args.dir, "buffer.db")
    s = settings(args.mode, args.scenario)
    if args.scenario == "recovery" and await asyncio.to_thread(os.path.exists, path):
        await asyncio.to_thread(damage_index, path)
        say("RB")
    buf = await AsyncBuffer.open(path, s)
    if buf._buf.moved_aside:
        say(f"R {buf._buf.moved_aside}")
    await buf.register_cursor(CURSOR)
    st = await buf.stats()
    say(f"READY {st['last_seq']}")
    bdseq = BdSeqStore(os.path.join(args.dir, "state"))
    next_id = args.next_id
    dropped = sum(st["dropped"].values())
    i = 0
    while True:
        i += 1
        n = 5 if args.scenario == "slow" else rng.randint(1, 40)
        if args.scenario == "trim":
            ts = time.time_ns() // 1_000_000 - int(s.max_age_s * 1000) + rng.randint(0, 3000)
        else:
            ts = time.time_ns() // 1_000_000
        batch = [NewRecord(f"g/n/d{rng.randint(1, 3)}",
                           (b"%010d" % (next_id + k)).ljust(PAYLOAD, b"."), ts,
                           {"topic": "t", "type": "DDATA"}) for k in range(n)]
        seqs = await buf.append(batch)
        say(f"C {seqs[0]} {seqs[-1]} {next_id}")
        next_id += n
        if args.scenario == "trim":
            st = await buf.stats()
            now_dropped = sum(st["dropped"].values())
            if now_dropped != dropped:
                say(f"DROPPED {now_dropped - dropped}")
                dropped = now_dropped
        if args.scenario != "recovery" and i % (2 if args.scenario == "ack" else 10) == 0:
            # The uplink delivered part of its backlog: ack a prefix (keep a backlog).
            st = await buf.stats()
            cur = st["cursors"][CURSOR]["acked_seq"]
            target = cur + (st["last_seq"] - cur) // 2
            if args.scenario == "ack" and target > cur and rng.random() < 0.5:
                q = rng.randint(max(cur + 1, st["first_seq"] or 1), target)
                say(f"QB {q}")
                await buf.quarantine(CURSOR, q, "too_large")
                say(f"Q {q}")
            if target > cur:
                say(f"AB {target}")
                await buf.ack(CURSOR, target)
                say(f"A {target}")
        if args.scenario == "checkpoint" and i % 3 == 0:
            say("KB")
            await buf.checkpoint()
            say("K")
        if i % 7 == 0:
            value = await asyncio.to_thread(bdseq.next)
            say(f"B {value}")
        await asyncio.sleep(0.2 if args.scenario == "slow" else rng.uniform(0.0, 0.01))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--mode", choices=("full", "normal"), required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--next-id", type=int, default=1)
    args = ap.parse_args(argv)
    try:
        asyncio.run(run(args))
    except Exception as e:      # the mount died under us (torn-write cycles)
        say(f"ERR {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
