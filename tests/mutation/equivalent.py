"""Mutants reviewed one by one and found to change nothing a test could observe.

They are not run and not scored: the report counts them apart ("equivalent") and lists each
with why, as it does message-only mutants. Five kinds, and no other:

- `equivalent`: the program does the same (a branch that cannot be taken, a value that is
  only compared with None, a check that a later check repeats);
- `performance`: a cache, a batch size or a bound on work; the results are the same;
- `timing`: how often housekeeping looks at something; only a timed test could tell, and
  timings belong in benchmarks, not in test assertions;
- `log`: decides only whether or what a log line says (the issue lets log text go);
- `text`: a value used only in an error message the runner could not see as one.

An entry names the function (qualified, "<module>" outside any), the source line as it
reads (stripped), the mutation as the report prints it, and the column where one line has
twins. When the code changes, the entry no longer matches: the mutant is scored again and
the report lists the entry as stale, to be reviewed anew. Never add a mutant a test could
kill: write the test.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Equivalent:
    function: str
    code: str
    mutation: str
    kind: str  # equivalent | performance | timing | log | text
    why: str
    col: int | None = None


_DEAD_EMPTY = ("min_seq is never above the first new seq: an empty buffer has min_seq = "
               "last_seq + 1 = first, and drops never pass last_seq")
_TRIM_REPEATS = ("_trim_after_insert raises the same BufferError, with the same message and "
                 "nothing stored, for a batch that cannot fit")

EQUIVALENT: dict[str, list[Equivalent]] = {
    "buffer/core.py": [
        Equivalent("<module>", "_VACUUM_INTERVAL_S = 5.0", "5.0 -> 6.0", "timing",
                   "how often free pages are handed back"),
        Equivalent("_errcode", "return (code or 0) & 0xFF", "0 -> 1", "equivalent",
                   "the code is only compared with CORRUPT, NOTADB, FULL, IOERR, BUSY, LOCKED; "
                   "none is 1"),
        Equivalent("Buffer._attach", "self._targeted_max_seq = 0", "self._targeted_max_seq = 0 -> "
                   "self._targeted_max_seq = None", "equivalent",
                   "read only once a header set with targets exists, which sets it first"),
        Equivalent("Buffer._append_once", "hid = by_obj.get(id(h))",
                   "hid = by_obj.get(id(h)) -> hid = None", "performance",
                   "a cache for this call; the header dictionaries give the same id"),
        Equivalent("Buffer._append_once", "if st.min_seq > first:",
                   "st.min_seq > first -> st.min_seq >= first", "equivalent", _DEAD_EMPTY),
        Equivalent("Buffer._append_once", "st.min_seq = first",
                   "st.min_seq = first -> st.min_seq = None", "equivalent", _DEAD_EMPTY),
        Equivalent("Buffer._enforce_retention", "if used + need_est <= cap:",
                   "used + need_est <= cap -> used + need_est < cap", "equivalent",
                   "at equality _drop_until makes the same check first and drops nothing"),
        Equivalent("Buffer._enforce_retention", "if used + need_est > cap:",
                   "used + need_est -> used - need_est", "equivalent", _TRIM_REPEATS),
        Equivalent("Buffer._enforce_retention", "if st.count == 0:",
                   "st.count == 0 -> st.count != 0", "equivalent",
                   _TRIM_REPEATS + "; and _drop_until leaves either room or an empty buffer"),
        Equivalent("Buffer._expired_upto", "none = st.min_seq - 1", "1 -> 2", "equivalent",
                   "callers only test upto >= min_seq, and the scan reads seqs above it, "
                   "the first present being min_seq either way"),
        Equivalent("Buffer._expire_quarantine",
                   "if deltas.get(hid, 0) is not None and ts_ms + (deltas.get(hid) or 0) < cutoff]",
                   "0 -> 1", "equivalent", "the default is only compared with None", col=34),
        Equivalent("Buffer._drop_until", "break", "break -> continue", "equivalent",
                   "the loop's next turns re-check the same condition and do nothing else"),
        Equivalent("Buffer._delete_prefix", "return 0", "0 -> 1", "equivalent",
                   "the one caller that uses the count (unregister_cursor) calls only when "
                   "upto >= min_seq"),
        Equivalent("Buffer._on_disk_full.drop", "self._drop_until(conn, st, cap, 0, 'disk_full')", "0 -> 1",
                   "equivalent", "one byte more of room under a limit set in pages"),
        Equivalent("Buffer._on_disk_full",
                   "if 'disk_full' not in self._dropping and self._blocked != 'disk_full':",
                   "'disk_full' not in self._dropping and self._blocked != 'disk_full' -> "
                   "'disk_full' not in self._dropping or self._blocked != 'disk_full'", "log",
                   "decides only whether the 'buffer disk full' line is written again"),
        Equivalent("Buffer._delete_prefix", "self._dropping[reason] = 0", "0 -> 1", "log",
                   "the count printed in the 'stopped dropping' line"),
        Equivalent("Buffer.purge.body", "self._drop_quarantine(conn, st, '1', (), 'purged')",
                   "self._drop_quarantine(conn, st, '1', (), 'purged') -> "
                   "self._drop_quarantine(conn, st, '1', (), None)", "equivalent",
                   "_delete_prefix(reason='purged') just before took every quarantined copy "
                   "(their seqs are <= last_seq): this finds none"),
        Equivalent("Buffer.purge.body", "if floor is not None and floor >= st.min_seq:",
                   "floor is not None and floor >= st.min_seq -> floor is not None or "
                   "floor >= st.min_seq", "equivalent",
                   "the purged cursor exists, so floor is never None; below min_seq "
                   "_delete_prefix deletes nothing"),
        Equivalent("Buffer.quarantine_retry",
                   "batch = self.quarantine_list(cursor, reason, seqs=seqs, limit=_SALVAGE_BATCH)",
                   "self.quarantine_list(cursor, reason, seqs=seqs, limit=_SALVAGE_BATCH) -> "
                   "self.quarantine_list(cursor, reason, seqs=seqs)", "performance",
                   "a bound on memory: the same records in the same order, in fewer appends"),
        Equivalent("Buffer._try_sync", "self._sync_failing = True", "True -> False", "log",
                   "decides only the 'sync works again' line"),
        Equivalent("Buffer._try_sync", "self._sync_failing = False", "False -> True", "log",
                   "decides only the 'sync works again' line"),
        Equivalent("Buffer._maintain", "if not wal_big and now >= self._next_wal_look:",
                   "not wal_big and now >= self._next_wal_look -> not wal_big or now >= "
                   "self._next_wal_look", "performance", "the WAL file's size is looked at more often"),
        Equivalent("Buffer._maintain", "self._next_wal_look = now + 1.0", "1.0 -> 2.0", "timing",
                   "how often the WAL file's size is looked at"),
        Equivalent("Buffer._maintain", "self._next_wal_look = now + 1.0", "now + 1.0 -> now - 1.0",
                   "performance", "the WAL file's size is looked at on every write"),
        Equivalent("Buffer._maintain", "wal_big = _size(self.path + '-wal') >= s.checkpoint_wal_bytes",
                   "_size(self.path + '-wal') >= s.checkpoint_wal_bytes -> "
                   "_size(self.path + '-wal') > s.checkpoint_wal_bytes", "timing",
                   "at exactly the threshold the checkpoint comes one write later"),
        Equivalent("Buffer.checkpoint", "self._checkpoint_failing = True", "True -> False", "log",
                   "decides only the 'checkpoint works again' line"),
        Equivalent("Buffer.checkpoint", "self._pin_warned = True", "self._pin_warned = True -> "
                   "self._pin_warned = None", "log", "decides only the 'no longer pinned' line"),
        Equivalent("Buffer.stats", "now_ms = time.time_ns() // 1_000_000",
                   "time.time_ns() // 1000000 -> time.time_ns() / 1000000", "equivalent",
                   "oldest_age_s is float seconds: a fraction of a millisecond is below its precision"),
        Equivalent("Buffer._salvage", "if found.hi is None or found.hi < hi:", "found.hi < hi -> found.hi <= hi",
                   "equivalent", "at equality the same value is assigned"),
        Equivalent("Buffer._salvage", "if self._st.count == 0 and self._st.last_seq < found.hi:",
                   "self._st.last_seq < found.hi -> self._st.last_seq <= found.hi", "equivalent",
                   "at equality the bump writes the values already there"),
        Equivalent("Buffer._salvage",
                   "after = max(found.lo - 1, resume_after if resume_after is not None else -1)",
                   "1 -> 2", "equivalent", "max() with found.lo - 1, which is >= 0", col=89),
        Equivalent("Buffer._write", "for attempt in (1, 2):", "2 -> 3", "equivalent",
                   "only attempt == 1 is tested"),
        Equivalent("<module>", "_AGE_CHECK_INTERVAL_S = 1.0", "1.0 -> 2.0", "timing",
                   "how often max_age is checked (at most every max_age/10 as well)"),
        Equivalent("<module>", "_PIN_RECHECK_S = 1.0", "1.0 -> 2.0", "timing",
                   "how often a pinned WAL is checked again"),
        Equivalent("Buffer._maintain", "if now >= self._next_vacuum:",
                   "now >= self._next_vacuum -> now > self._next_vacuum", "timing",
                   "at exactly the due time the vacuum step comes one write later"),
        Equivalent("Buffer.checkpoint", "self._wal_bytes_est = 0", "0 -> 1", "timing",
                   "a WAL estimate one byte larger: the next checkpoint one byte sooner"),
        Equivalent("Buffer._load_state", "last_seq = max(meta.get('last_seq', 0), hi or 0)", "0 -> 1",
                   "equivalent", "meta always holds last_seq (written when the file is created)", col=44),
        Equivalent("Buffer._load_state", "meta.get('live_bytes', 0), cursors, dropped, counters, quarantined)",
                   "0 -> 1", "equivalent", "meta always holds live_bytes (written when the file is created)"),
        Equivalent("Buffer._expired_upto", "if oldest_ts >= cutoff:", "oldest_ts >= cutoff -> oldest_ts > cutoff",
                   "equivalent", "at equality the query that follows finds the oldest record young "
                   "and returns the same 'none'"),
        Equivalent("Buffer._delete_prefix", "if c.acked_seq >= upto:", "c.acked_seq >= upto -> c.acked_seq > upto",
                   "equivalent", "at equality the cursor's share of the range is empty: 0 bytes"),
        Equivalent("Buffer._delete_prefix", "st.dropped[reason] = st.dropped.get(reason, 0) + n",
                   "st.dropped.get(reason, 0) -> st.dropped.get(reason, None)", "equivalent",
                   "every drop reason is in st.dropped from the start (DROP_REASONS)"),
        Equivalent("Buffer._housekeeping_checks", "if room >= self.settings.max_size_bytes:",
                   "room >= self.settings.max_size_bytes -> room > self.settings.max_size_bytes", "equivalent",
                   "at equality a disk limit equal to the cap gives the same limit"),
        Equivalent("Buffer._skipped_hids", "if not self._targets or start >= self._targeted_max_seq:",
                   "start >= self._targeted_max_seq -> start > self._targeted_max_seq", "performance",
                   "at equality no targeted record lies after start: the skip set skips nothing"),
        Equivalent("Buffer._append_once", "if self._targets and any(row[3] in self._targets for row in rows):",
                   "self._targets and any((row[3] in self._targets for row in rows)) -> self._targets or "
                   "any((row[3] in self._targets for row in rows))", "performance",
                   "a higher targeted_max_seq only makes reads compute a skip set that skips nothing more"),
        Equivalent("Buffer._append_once", "self._trim_after_insert(conn, st, first, n, batch_bytes)",
                   "self._trim_after_insert(conn, st, first, n, batch_bytes) -> "
                   "self._trim_after_insert(conn, st, first, n, None)", "text",
                   "batch_bytes is used only in the text of the 'does not fit' error"),
        Equivalent("Buffer.quarantine_drop", "n = [0]", "0 -> 1", "equivalent",
                   "the transaction's body always sets it before it is read"),
        Equivalent("Buffer.quarantine_list", "self._header_sets.get(hid, MappingProxyType({})), payload)",
                   "self._header_sets.get(hid, MappingProxyType({})) -> self._header_sets.get(hid, None)",
                   "equivalent", "every header set is loaded at open and after each append: the default "
                   "is never used"),
        Equivalent("Buffer._on_disk_full",
                   "if 'disk_full' not in self._dropping and self._blocked != 'disk_full':",
                   "'disk_full' -> 'XXdisk_fullXX'", "log",
                   "decides only whether the 'buffer disk full' line is written again"),
        Equivalent("Buffer.checkpoint", "if not self._checkpoint_failing:",
                   "not self._checkpoint_failing -> self._checkpoint_failing", "log",
                   "decides only whether the 'checkpoint failing' line is written"),
        Equivalent("Buffer._salvage", "lost += q_lost", "lost += q_lost -> lost -= q_lost", "log",
                   "the total printed in the 'salvage done' line; the counted loss is committed "
                   "by _salvage_commit"),
        Equivalent("_acquire_lock", "holder = ''", "holder = '' -> holder = None", "equivalent",
                   "both are false: the message says no pid either way"),
        Equivalent("_acquire_lock", "os.ftruncate(fd, 0)", "0 -> 1", "equivalent",
                   "the pid and newline written next are longer than one byte"),
        Equivalent("_SalvageSource.open",
                   "conn = sqlite3.connect(f'file:{src}?mode=ro', uri=True, isolation_level=None,",
                   "sqlite3.connect(f'file:{src}?mode=ro', uri=True, isolation_level=None, timeout=1.0) -> "
                   "sqlite3.connect(f'file:{src}?mode=ro', uri=True, isolation_level=None)", "timing",
                   "the busy timeout of a read-only copy nothing else writes"),
        Equivalent("dropped_by_cursor_change", "first = stats.get('first_seq') or last_seq + 1", "1 -> 2",
                   "equivalent", "with no record present the result is clamped to 0 either way"),
        Equivalent("_connect", "cached_statements=64)", "64 -> 65", "performance",
                   "the size of SQLite's statement cache"),
        Equivalent("_prepare", "if not schema.OUR_TABLES <= tables:",
                   "schema.OUR_TABLES <= tables -> schema.OUR_TABLES < tables", "equivalent",
                   "a buffer file always has tables beyond OUR_TABLES (quarantine, salvaged)"),
        Equivalent("_move_aside", "for suffix in ('-wal', '-shm'):", "'-shm' -> 'XX-shmXX'", "equivalent",
                   "a -shm left behind is rebuilt by SQLite (tests/unit/test_buffer_core.py, "
                   "test_garbage_shm_is_rebuilt)"),
        Equivalent("_SalvageSource.open",
                   "conn = sqlite3.connect(f'file:{src}?mode=ro', uri=True, isolation_level=None,",
                   "sqlite3.connect(f'file:{src}?mode=ro', uri=True, isolation_level=None, timeout=1.0) -> "
                   "sqlite3.connect(f'file:{src}?mode=ro', uri=True, timeout=1.0)", "equivalent",
                   "a read-only connection that only runs SELECTs: no transaction is opened"),
        Equivalent("_SalvageSource.close", "with contextlib.suppress(sqlite3.Error):",
                   "contextlib.suppress(sqlite3.Error) -> contextlib.suppress(None)", "equivalent",
                   "closing a read-only connection raises nothing"),
    ],
    "gateway/sparkplug/edge.py": [
        Equivalent("fill_metric", "set_metric_value(m, datatype, value, f'point {name!r}')", "'point ' -> 'XXpoint XX'",
                   "text", "`where` of payload.set_metric_value: the label of its error message"),
        Equivalent("fill_metric", "set_metric_value(m, datatype, value, f'point {name!r}')",
                   "set_metric_value(m, datatype, value, f'point {name!r}') -> "
                   "set_metric_value(m, datatype, value, None)",
                   "text", "`where` of payload.set_metric_value: the label of its error message"),
        Equivalent("_node_control", "set_metric_value(m, datatype, value, name)",
                   "set_metric_value(m, datatype, value, name) -> set_metric_value(m, datatype, value, None)",
                   "text", "`where` of payload.set_metric_value: the label of its error message"),
        Equivalent("_add_property", "set_metric_value(pv, datatype, value, f'property {key!r}')",
                   "'property ' -> 'XXproperty XX'",
                   "text", "`where` of payload.set_metric_value: the label of its error message"),
        Equivalent("_add_property", "set_metric_value(pv, datatype, value, f'property {key!r}')",
                   "set_metric_value(pv, datatype, value, f'property {key!r}') -> "
                   "set_metric_value(pv, datatype, value, None)",
                   "text", "`where` of payload.set_metric_value: the label of its error message"),
    ],
    "gateway/uplinks/kafka/accumulator.py": [
        Equivalent("<module>", "HELD = 'held'", "'held' -> 'XXheldXX'", "equivalent",
                   "a sentinel compared by identity"),
        Equivalent("Window._add_fast", "if type(payload) is not bytes:", "type(payload) -> type(None)",
                   "equivalent", "aiokafka's builders take any bytes-like value and copy it"),
        Equivalent("Window._add_fast", "if type(payload) is not bytes:",
                   "type(payload) is not bytes -> type(payload) is bytes", "equivalent",
                   "aiokafka's builders take any bytes-like value and copy it"),
    ],
    "gateway/uplinks/core.py": [
        Equivalent("UplinkState.link_up", "if self.link != 'up':", "'up' -> 'XXupXX'", "equivalent",
                   "_set_link('up') does nothing when the link is already up"),
        Equivalent("UplinkState.error", "f'error:{key}', message, uplink=self.name, **kv)",
                   "'error:' -> 'XXerror:XX'", "equivalent",
                   "a prefix that keeps these keys apart from 'link' and 'refused:' keys; any "
                   "other prefix does too"),
    ],
}


def index(module: str) -> dict[tuple[str, str, str], list[Equivalent]]:
    out: dict[tuple[str, str, str], list[Equivalent]] = {}
    for e in EQUIVALENT.get(module, []):
        out.setdefault((e.function, e.code, e.mutation), []).append(e)
    return out
