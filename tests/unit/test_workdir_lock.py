"""The workdir lock (replfs/block/graph.py): one daemon per disk name and
workdir, the holder named; taken before any overlay is created or truncated."""

from __future__ import annotations

import os

import pytest

from replfs.block.graph import WorkdirLocked, lock_workdir, unlock_workdir
from replfs.daemon import fuse_options, user_allow_other


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    fd = lock_workdir(str(tmp_path), "disk0")
    try:
        with pytest.raises(WorkdirLocked) as err:
            lock_workdir(str(tmp_path), "disk0")
        assert f"pid {os.getpid()}" in str(err.value)
        assert "disk0" in str(err.value) and "--workdir" in str(err.value)
        other = lock_workdir(str(tmp_path), "disk1")  # another disk name is fine
        unlock_workdir(str(tmp_path), "disk1", other)
    finally:
        unlock_workdir(str(tmp_path), "disk0", fd)
    assert not (tmp_path / "disk0.lock").exists()
    fd = lock_workdir(str(tmp_path), "disk0")  # free again
    unlock_workdir(str(tmp_path), "disk0", fd)


def test_a_lock_file_left_by_a_dead_daemon_is_taken_over(tmp_path):
    (tmp_path / "disk0.lock").write_text("replfs daemon pid 999999\n")
    fd = lock_workdir(str(tmp_path), "disk0")
    try:
        assert (tmp_path / "disk0.lock").read_text() == f"replfs daemon pid {os.getpid()}\n"
    finally:
        unlock_workdir(str(tmp_path), "disk0", fd)


def test_allow_other_only_where_fusermount_allows_it(tmp_path):
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\nmount_max = 1000\n")
    assert not user_allow_other(str(conf))
    assert "allow_other" in fuse_options("primary", uid=0, conf=str(conf))
    assert "allow_other" not in fuse_options("primary", uid=1000, conf=str(conf))
    conf.write_text("user_allow_other\n")
    assert user_allow_other(str(conf))
    assert "allow_other" in fuse_options("secondary", uid=1000, conf=str(conf))
    assert not user_allow_other(str(tmp_path / "missing.conf"))
