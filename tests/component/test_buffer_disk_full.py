"""Full disk on a small real filesystem: the buffer keeps working under its policy.

The filesystem is a 2 MiB tmpfs mounted by the test (the CI runs as root); where tmpfs
cannot be mounted, a loop-mounted ext4 image is tried. Either way SQLite meets a real
ENOSPC from the kernel, not a simulated one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sqlite3
import subprocess
import time

import pytest

from buffer import Buffer, BufferError, BufferFull, BufferSettings, NewRecord

NOW = time.time_ns() // 1_000_000


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tried = []
    res = _run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(mnt))
    if res.returncode != 0:
        tried.append(f"tmpfs: {res.stderr.strip()}")
        img = tmp_path / "fs.img"
        with open(img, "wb") as f:
            f.truncate(4 * 1024 * 1024)
        res = _run("mkfs.ext4", "-q", "-F", str(img))
        if res.returncode == 0:
            res = _run("mount", "-o", "loop", str(img), str(mnt))
        if res.returncode != 0:
            tried.append(f"loop ext4: {res.stderr.strip()}")
            pytest.fail("cannot mount a small filesystem for the full-disk test "
                        f"(needs root or CAP_SYS_ADMIN): {tried}")
    try:
        yield str(mnt)
    finally:
        _run("umount", "-l", str(mnt))


def fill_disk(directory: str, leave_bytes: int) -> str:
    """Take all free space but `leave_bytes` with a filler file."""
    path = os.path.join(directory, "filler")
    vfs = os.statvfs(directory)
    free = vfs.f_bavail * vfs.f_frsize
    with open(path, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave_bytes))
    return path


def recs(n: int, start: int) -> list[NewRecord]:
    return [NewRecord("g/e/d1", (b"%08d" % (start + i)).ljust(200, b"."), NOW,
                      {"type": "DDATA"}) for i in range(n)]


def settings(policy: str) -> BufferSettings:
    # The size cap is far above the filesystem: only the disk limits the buffer.
    return BufferSettings(max_size_bytes=1 << 30, max_age_s=86400.0, when_full=policy,
                          checkpoint_wal_bytes=32 * 1024, vacuum_slack_bytes=32 * 1024,
                          reserve_bytes=128 * 1024)


def integrity_ok(path: str) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_disk_fills_up_drop_oldest_keeps_accepting(small_fs, caplog):
    path = os.path.join(small_fs, "buffer.db")
    buf = Buffer.open(path, settings("drop_oldest"))
    buf.register_cursor("mqtt")
    buf.append(recs(100, 0))
    # The disk fills behind the buffer's back (another process, logs): SQLite meets
    # ENOSPC before the periodic free-space check notices.
    fill_disk(small_fs, leave_bytes=96 * 1024)
    with pytest.raises(OSError) as exc:
        with open(os.path.join(small_fs, "probe"), "wb") as f:
            f.write(b"\0" * (1024 * 1024))
            f.flush()
            os.fsync(f.fileno())
    assert exc.value.errno == errno.ENOSPC
    os.unlink(os.path.join(small_fs, "probe"))
    stored = 100
    for _ in range(300):
        seqs = buf.append(recs(20, stored))
        assert seqs[-1] == stored + 20
        stored += 20
    st = buf.stats()
    assert st["dropped"]["disk_full"] > 0
    assert st["records"] + st["dropped"]["disk_full"] == stored
    assert st["limit_reason"] == "disk_full"
    # SQLite really met ENOSPC (not only the free-space look-ahead), logged once.
    full = [r for r in caplog.records if r.getMessage().startswith("buffer disk full")]
    assert len(full) == 1
    got = buf.read("mqtt", 100_000)
    assert got[-1].seq == stored and got[-1].payload.startswith(b"%08d" % (stored - 1))
    assert [r.seq for r in got] == list(range(got[0].seq, stored + 1))
    buf.ack("mqtt", stored)
    buf.close()
    assert integrity_ok(path)
    with Buffer.open(path, settings("drop_oldest")) as again:
        assert again.moved_aside is None
        assert again.stats()["last_seq"] == stored


def test_disk_fills_up_block_refuses_then_recovers_after_acks(small_fs):
    path = os.path.join(small_fs, "buffer.db")
    buf = Buffer.open(path, settings("block"))
    buf.register_cursor("kafka")
    buf.append(recs(100, 0))
    fill_disk(small_fs, leave_bytes=96 * 1024)
    stored = 100
    with pytest.raises(BufferFull) as exc:
        for _ in range(1000):
            buf.append(recs(20, stored))
            stored += 20
    assert exc.value.reason == "disk_full" and exc.value.retriable
    st = buf.stats()
    assert st["records"] == stored and st["dropped"]["disk_full"] == 0
    assert st["blocked"] == "disk_full"
    # Nothing stored was lost; the uplink drains and acks, freeing pages for reuse.
    got = buf.read("kafka", 100_000)
    assert [r.seq for r in got] == list(range(1, stored + 1))
    buf.ack("kafka", stored)
    seqs = buf.append(recs(20, stored))
    assert seqs[0] == stored + 1
    assert buf.stats()["blocked"] is None
    buf.close()
    assert integrity_ok(path)


def test_disk_short_of_space_at_open_limits_the_buffer_up_front(small_fs):
    fill_disk(small_fs, leave_bytes=512 * 1024)
    path = os.path.join(small_fs, "buffer.db")
    with Buffer.open(path, settings("drop_oldest")) as buf:
        buf.register_cursor("c")
        for i in range(200):
            buf.append(recs(20, i * 20))
        st = buf.stats()
        assert st["limit_reason"] == "disk_full" and st["limit_bytes"] < 512 * 1024
        assert st["dropped"]["disk_full"] > 0
        assert st["last_seq"] == 4000
    assert integrity_ok(path)


def _free(directory: str) -> int:
    vfs = os.statvfs(directory)
    return vfs.f_bavail * vfs.f_frsize


def test_free_space_becomes_the_limit_to_the_byte(small_fs):
    # The look-ahead: what is used plus what the filesystem has free, less room for the
    # WAL to grow and checkpoint (two checkpoints' worth and 16 pages).
    path = os.path.join(small_fs, "buffer.db")
    s = settings("drop_oldest")
    with Buffer.open(path, s) as buf:
        buf.register_cursor("c")
        buf.append(recs(10, 0))
    fill_disk(small_fs, leave_bytes=700 * 1024)
    with Buffer.open(path, s) as buf:      # a new process: it looks again at its first append
        st = buf.stats()
        used, page = st["used_bytes"], st["page_size"]
        free = _free(small_fs)
        buf.append(recs(1, 10))
        st = buf.stats()
        assert st["limit_reason"] == "disk_full"
        assert st["limit_bytes"] == used + free - (2 * s.checkpoint_wal_bytes + 16 * page)
        assert os.path.getsize(path + ".reserve") == s.reserve_bytes


def test_a_released_reserve_is_taken_again_once_the_disk_has_room(small_fs):
    path = os.path.join(small_fs, "buffer.db")
    s = settings("drop_oldest")
    filler = fill_disk(small_fs, leave_bytes=180 * 1024)
    with Buffer.open(path, s) as buf:      # no room for the 128 kB reserve now
        assert not os.path.exists(path + ".reserve")
        buf.register_cursor("c")
        os.unlink(filler)                    # the disk has room again
        st = buf.stats()
        used, page = st["used_bytes"], st["page_size"]
        free = _free(small_fs)
        wal_room = 2 * s.checkpoint_wal_bytes + 16 * page
        assert free > 2 * s.reserve_bytes + wal_room
        buf.append(recs(1, 0))
        assert os.path.getsize(path + ".reserve") == s.reserve_bytes
        st = buf.stats()
        assert st["limit_reason"] == "disk_full"   # a 2 MiB filesystem under a 1 GiB cap
        assert st["limit_bytes"] == used + free - s.reserve_bytes - wal_room


def test_a_disk_with_room_for_the_cap_sets_no_disk_limit(small_fs):
    # A cap of exactly the room the disk gives: the cap rules. One byte less room: the disk.
    path = os.path.join(small_fs, "buffer.db")
    s = settings("drop_oldest")
    for extra, reason in ((0, "size"), (1, "disk_full")):
        with Buffer.open(path, s) as buf:  # each open looks at the disk at its first append
            buf.register_cursor("c")
            st = buf.stats()
            room = st["used_bytes"] + _free(small_fs) - (2 * s.checkpoint_wal_bytes + 16 * st["page_size"])
            buf.settings = dataclasses.replace(s, max_size_bytes=room + extra)
            buf.append(recs(1, 0))
            st = buf.stats()
            assert (st["limit_reason"], st["limit_bytes"]) == (reason, room)


@pytest.mark.parametrize(("above", "taken"), [(0, False), (4096, True)])
def test_the_reserve_is_taken_again_only_with_twice_its_size_to_spare(small_fs, above, taken):
    path = os.path.join(small_fs, "buffer.db")
    s = settings("drop_oldest")
    filler = fill_disk(small_fs, leave_bytes=180 * 1024)
    with Buffer.open(path, s) as buf:      # no room for the reserve at the start
        assert not os.path.exists(path + ".reserve")
        buf.register_cursor("c")
        page = buf.stats()["page_size"]
        os.unlink(filler)
        threshold = 2 * s.reserve_bytes + 2 * s.checkpoint_wal_bytes + 16 * page
        fill_disk(small_fs, leave_bytes=threshold + above)
        assert _free(small_fs) == threshold + above
        buf.append(recs(1, 0))
        assert os.path.exists(path + ".reserve") is taken


def test_a_disk_with_no_room_left_refuses_appends_as_a_retriable_error(small_fs):
    path = os.path.join(small_fs, "buffer.db")
    s = settings("drop_oldest")
    with Buffer.open(path, s) as buf:
        buf.register_cursor("c")
    fill_disk(small_fs, leave_bytes=100 * 1024)     # less than the WAL's room
    with Buffer.open(path, s) as buf:
        st = buf.stats()
        assert st["used_bytes"] + _free(small_fs) < 2 * s.checkpoint_wal_bytes + 16 * st["page_size"]
        with pytest.raises(BufferError, match="does not fit under the limit") as exc:
            buf.append(recs(1, 0))
        assert exc.value.retriable          # the disk may have room again later
        st = buf.stats()
        # The limit never goes below eight pages (less than an empty buffer's own tables).
        assert (st["limit_reason"], st["limit_bytes"]) == ("disk_full", 8 * st["page_size"])
        assert st["records"] == 0 and st["last_seq"] == 0
