"""gateway/statefile.py: small state files replaced atomically and durably (issue 19).
The power-loss proof for the bdSeq file is in tests/e2e/powerloss.py (LazyFS)."""

from __future__ import annotations

import os

import pytest

from gateway import statefile
from gateway.sparkplug.node import BdSeqStore


def test_write_atomic_replaces_content_and_syncs_file_and_directory(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "state"
    synced: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    statefile.write_atomic(target, "1\n")
    statefile.write_atomic(target, b"2\n")
    assert target.read_text() == "2\n"
    assert os.listdir(target.parent) == ["state"]          # no temporary file left
    # The data is synced before the rename, the directory after it (twice: two writes).
    assert synced.count(str(target.parent)) == 2
    assert any(".state.tmp-" in p for p in synced)


def test_a_failed_write_leaves_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "state"
    statefile.write_atomic(target, "old\n")

    def broken(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError):
        statefile.write_atomic(target, "new\n")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["state"]


def test_bdseq_store_uses_the_atomic_writer(tmp_path, monkeypatch):
    calls: list[tuple[str, str]] = []
    real = statefile.write_atomic
    monkeypatch.setattr("gateway.sparkplug.node.write_atomic",
                        lambda p, d: (calls.append((str(p), d)), real(p, d)))
    store = BdSeqStore(tmp_path)
    assert store.next() == 0 and store.next() == 1
    assert calls == [(str(tmp_path / "sparkplug-bdseq"), "0\n"),
                     (str(tmp_path / "sparkplug-bdseq"), "1\n")]
    assert BdSeqStore(tmp_path).last() == 1


def test_read_text_of_a_missing_file_is_none(tmp_path):
    assert statefile.read_text(tmp_path / "nope") is None
