"""`outpost buffer stats|export|quarantine|purge`: look into the store-and-forward buffer.

The commands run against the buffer file itself (buffer/diagnostics.py), not the running
gateway: the read-only ones are safe beside a running gateway, the writing ones need it
stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway.cli import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, _add_config, _default_config

# The parser is built for every `outpost` command: what the buffer commands need is imported
# when one runs, not here.


def add_parser(sub: Any) -> argparse.ArgumentParser:
    b = sub.add_parser("buffer", help="inspect the store-and-forward buffer")
    _add_config(b)
    b.add_argument("--file", help="buffer file (default: <data_dir>/buffer.db from the config)")
    bsub = b.add_subparsers(dest="buffer_cmd", required=True)
    bsub.add_parser("stats", help="records, bytes and drops per cursor")
    be = bsub.add_parser("export", help="write records decoded (JSON lines or CSV) or raw",
                         description="Write the buffer's records, oldest first. jsonl and csv decode "
                         "each Sparkplug record into one row per metric: seq, time (UTC), ts_ms, type, "
                         "device, metric, datatype, value, quality, clock, stream, error. Safe while "
                         "the gateway runs (read-only, short reads).")
    be.add_argument("--since", help='only records stamped at or after this: a duration ago ("2h") or an '
                    "ISO time (UTC unless it says otherwise)")
    be.add_argument("--cursor", help="only records this uplink (mqtt, kafka) has not yet delivered")
    be.add_argument("--output", "-o", help="file (default stdout)")
    be.add_argument("--format", choices=["jsonl", "csv", "raw"], default="jsonl",
                    help="jsonl (default): one JSON object per metric; csv: the same as RFC 4180 CSV "
                    "with a header; raw: one JSON object per record with its headers and the payload "
                    "in base64, as stored")
    bq = bsub.add_parser("quarantine", help="records an uplink could not deliver, kept aside with why")
    qsub = bq.add_subparsers(dest="quarantine_cmd", required=True)
    for name, text in (("list", "one line per quarantined record (no payload)"),
                       ("export", "quarantined records as JSON lines, payloads in base64"),
                       ("retry", "send them again: each goes back to its uplink (gateway stopped)"),
                       ("drop", "delete them, counted as dropped (gateway stopped; asks first)")):
        q = qsub.add_parser(name, help=text)
        q.add_argument("--cursor", help="only this uplink's (mqtt, kafka)")
        q.add_argument("--reason", help='only this reason, e.g. "too_large" or "held:plant.events"')
        if name in ("retry", "drop"):
            q.add_argument("--seq", type=int, action="append", help="only this record (repeatable)")
        if name == "drop":
            q.add_argument("--yes", action="store_true", help="do not ask")
        if name == "export":
            q.add_argument("--output", "-o", help="file (default stdout)")
    bp = bsub.add_parser("purge", help="delete records (asks for confirmation)")
    bp.add_argument("--cursor", help="only advance this uplink's cursor past everything")
    bp.add_argument("--yes", action="store_true", help="do not ask")
    b.set_defaults(func=cmd_buffer)
    return b


def _buffer_path(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    from gateway.config import load_config

    cfg = load_config(args.config or _default_config())
    return Path(cfg.gateway.data_dir) / "buffer.db"


def cmd_buffer(args: argparse.Namespace) -> int:
    from buffer import BufferError
    from gateway.errors import ConfigError

    try:
        path = _buffer_path(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_CONFIG
    if not path.exists():
        print(f"outpost buffer: no buffer file at {path}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        return _buffer_command(args, path)
    except BufferError as e:
        print(f"outpost buffer {args.buffer_cmd}: {e}", file=sys.stderr)
        return EXIT_FAILURE


def _buffer_command(args: argparse.Namespace, path: Path) -> int:
    from buffer import diagnostics as bd
    if args.buffer_cmd == "stats":
        stats = bd.stats_for_path(str(path))
        print(json.dumps(stats, indent=2, sort_keys=True, default=str))
        return EXIT_OK
    if args.buffer_cmd == "export":
        return _export(args, path)
    if args.buffer_cmd == "quarantine":
        return _quarantine_command(args, path)
    if args.buffer_cmd == "purge":
        what = f"cursor {args.cursor!r}" if args.cursor else "every record"
        if not args.yes:
            if not sys.stdin.isatty():
                print("outpost buffer purge: refusing without --yes when not at a terminal", file=sys.stderr)
                return EXIT_CONFIG
            answer = input(f"Purge {what} from {path}? Records not yet delivered are lost. Type 'purge': ")
            if answer.strip() != "purge":
                print("nothing purged")
                return EXIT_OK
        n = bd.purge(str(path), cursor=args.cursor)
        print(f"purged {n} record(s) (counted as dropped, reason=purged)")
        return EXIT_OK
    return EXIT_CONFIG


def _export(args: argparse.Namespace, path: Path) -> int:
    from buffer import diagnostics as bd

    since = _parse_since(args.since) if args.since else None
    to_file = args.output not in (None, "-")
    # newline="" so that CSV's CRLF line ends are written as they are.
    out = open(args.output, "w", encoding="utf-8", newline="") if to_file else sys.stdout
    try:
        if args.format == "raw":
            n = bd.export_jsonl(str(path), out, since_ts_ms=since, cursor=args.cursor)
            rows = None
        else:
            from gateway.cli import export as ex

            after, last = bd.export_span(str(path), args.cursor)
            progress = ex.Progress(last - after)
            try:
                n, rows = ex.write_decoded(bd.iter_records(str(path), since, args.cursor), out,
                                           args.format, progress, first_seq=after)
            finally:
                progress.clear()
    except BrokenPipeError:   # `outpost buffer export | head`: the reader had enough
        if not to_file:       # nothing more reaches the pipe, not even the flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        if to_file:
            out.close()
    print(f"exported {n} record(s)" + (f", {rows} row(s)" if rows is not None else ""),
          file=sys.stderr)
    return EXIT_OK


def _quarantine_command(args: argparse.Namespace, path: Path) -> int:
    from buffer import diagnostics as bd

    cmd, cursor, reason = args.quarantine_cmd, args.cursor, args.reason
    if cmd == "list":
        rows = bd.quarantine_list(str(path), cursor, reason)
        for r in rows:
            print(f"{r['cursor']:<6} seq {r['seq']:<10} {r['reason']:<28} {r['stream']}  "
                  f"{r['payload_bytes']} bytes")
        print(f"{len(rows)} quarantined record(s)", file=sys.stderr)
        return EXIT_OK
    if cmd == "export":
        out = sys.stdout if args.output in (None, "-") else open(args.output, "w", encoding="utf-8")
        try:
            n = bd.quarantine_export(str(path), out, cursor, reason)
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"exported {n} quarantined record(s)", file=sys.stderr)
        return EXIT_OK
    if cmd == "retry":
        n = bd.quarantine_retry(str(path), cursor, reason, seqs=args.seq)
        print(f"{n} record(s) go back to their uplink")
        return EXIT_OK
    if not args.yes:
        if not sys.stdin.isatty():
            print("outpost buffer quarantine drop: refusing without --yes when not at a terminal",
                  file=sys.stderr)
            return EXIT_CONFIG
        if input("Drop these quarantined records for good? Type 'drop': ").strip() != "drop":
            print("nothing dropped")
            return EXIT_OK
    n = bd.quarantine_drop(str(path), cursor, reason, seqs=args.seq)
    print(f"dropped {n} quarantined record(s) (counted as dropped, reason=quarantine_dropped)")
    return EXIT_OK


def _parse_since(value: str) -> int:
    """`--since` takes a duration ("2h": that long ago) or an ISO-8601 time."""
    import datetime as dt
    import time

    from drivers.units import parse_duration

    try:
        return int((time.time() - parse_duration(value)) * 1000)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(
            f'outpost buffer export: --since {value!r} is neither a duration ("2h") nor an ISO time'
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)
