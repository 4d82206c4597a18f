"""medres.io.batched_fsync: the atomic writes of a block share one flush and land in order."""

from __future__ import annotations

import errno
import os

import pytest

from medres import io as mio


def test_files_land_at_the_end_in_write_order(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")
    replaced: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(
        mio.os, "replace", lambda s, d: (replaced.append(os.path.basename(d)), real_replace(s, d))
    )
    with mio.batched_fsync():
        mio.atomic_write_text(tmp_path / "a.txt", "new a")
        mio.atomic_write_json(tmp_path / "b.json", {"x": 1})
        with mio.batched_fsync():  # nested: joins the outer block
            mio.atomic_write_text(tmp_path / "c.txt", "c")
        assert (tmp_path / "a.txt").read_text() == "old a"  # not in place yet
        assert not (tmp_path / "b.json").exists()
    assert replaced == ["a.txt", "b.json", "c.txt"]
    assert (tmp_path / "a.txt").read_text() == "new a"
    assert (tmp_path / "b.json").read_text() == '{\n  "x": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.json", "c.txt"]


def test_every_file_is_fsynced_before_it_is_replaced(tmp_path, monkeypatch):
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(mio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    with mio.batched_fsync():
        for i in range(4):
            mio.atomic_write_text(tmp_path / f"{i}.txt", str(i))
        assert synced == []  # deferred to the end of the block
    assert len(synced) == 4
    assert [(tmp_path / f"{i}.txt").read_text() for i in range(4)] == ["0", "1", "2", "3"]


def test_writes_before_an_error_still_land(tmp_path):
    with pytest.raises(RuntimeError), mio.batched_fsync():
        mio.atomic_write_text(tmp_path / "done.txt", "done")
        raise RuntimeError("later step failed")
    assert (tmp_path / "done.txt").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["done.txt"]


def test_a_failed_fsync_replaces_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("old a")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mio.os, "fsync", full)
    with pytest.raises(OSError) as info, mio.batched_fsync():
        mio.atomic_write_text(tmp_path / "a.txt", "new a")
        mio.atomic_write_text(tmp_path / "b.txt", "b")
    assert mio.is_disk_full(info.value)
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
