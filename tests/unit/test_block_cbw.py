"""CopyBeforeWrite and the secondary stack: copies, the snapshot view,
in-flight copies, ENOSPC in the hidden overlay, edges, checkpoint, failover.
(Write refusal and draining are the gated node's: replfs/block/gated.py.)"""

import errno
import os
import tempfile

import pytest
import trio
import trio.testing

from replfs.block.base import close_graph, walk
from replfs.block.cbw import CopyBeforeWrite
from replfs.block.fault import FaultLayer
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage
from replfs.errors import BlockError

CL = 4096


def mock_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def make(tmp_path, content: bytes, disk_rules: str | None = None, **kw):
    p = tmp_path / "disk.img"
    p.write_bytes(content)
    raw = RawImage(p)
    disk = FaultLayer(raw, disk_rules) if disk_rules is not None else raw
    hidden = Overlay(tmp_path / "hidden", disk, cluster_size=CL)
    cbw = CopyBeforeWrite(disk, hidden, **kw)
    return raw, disk, hidden, cbw


def test_copies_once_per_epoch(tmp_path):
    raw, disk, hidden, cbw = make(tmp_path, b"o" * 16 * CL)

    async def main():
        await cbw.write(CL + 10, b"n" * 20)
        assert cbw.stats.clusters_copied == 1 and hidden.bitmap.count == 1
        await cbw.write(CL + 100, b"N" * 20)  # same cluster: no second copy
        assert cbw.stats.clusters_copied == 1
        await cbw.write_zeroes(3 * CL - 1, CL + 2)  # clusters 2, 3 and 4
        await cbw.trim(10 * CL, 2 * CL)
        assert cbw.stats.clusters_copied == 6
        assert await cbw.snapshot.read(0, 16 * CL) == b"o" * 16 * CL
        disk_now = await cbw.read(0, 16 * CL)
        assert disk_now[CL + 10 : CL + 30] == b"n" * 20
        assert disk_now[3 * CL - 1 : 4 * CL + 1] == bytes(CL + 2)
        assert cbw.statistics()["bytes_written"] == 40
        await cbw.checkpoint()
        assert hidden.bitmap.count == 0
        assert await cbw.snapshot.read(0, 16 * CL) == disk_now
        await cbw.write(CL + 10, b"z")
        assert cbw.stats.clusters_copied == 7  # re-armed

    trio.run(main)
    hidden.close()
    raw.close()


def test_bigger_copy_clusters(tmp_path):
    raw, disk, hidden, cbw = make(tmp_path, b"o" * 32 * CL, cluster_size=4 * CL)

    async def main():
        await cbw.write(5 * CL, b"n")  # copy cluster 1 = target clusters 4..7
        assert hidden.bitmap.count == 4
        await cbw.write(6 * CL, b"m")  # already copied
        assert hidden.bitmap.count == 4
        assert await cbw.snapshot.read(0, 32 * CL) == b"o" * 32 * CL

    trio.run(main)
    with pytest.raises(ValueError):
        CopyBeforeWrite(disk, hidden, cluster_size=CL // 2)
    with pytest.raises(ValueError):
        CopyBeforeWrite(disk, hidden, cluster_size=3 * CL)
    with pytest.raises(ValueError):  # target must sit on the disk
        CopyBeforeWrite(raw if disk is not raw else FaultLayer(raw), hidden)
    hidden.close()
    raw.close()


def test_snapshot_is_read_only(tmp_path):
    raw, disk, hidden, cbw = make(tmp_path, b"o" * 4 * CL)

    async def main():
        snap = cbw.snapshot
        assert snap.size == 4 * CL
        for fn, args in [(snap.write, (0, b"x")), (snap.write_zeroes, (0, 1)), (snap.trim, (0, 1))]:
            with pytest.raises(BlockError) as e:
                await fn(*args)
            assert e.value.errno == errno.EPERM
        await snap.flush()
        with pytest.raises(BlockError) as e:
            await snap.read(4 * CL, 1)
        assert e.value.errno == errno.EINVAL

    trio.run(main)
    hidden.close()
    raw.close()


def test_snapshot_read_waits_for_copy_in_progress(tmp_path):
    # Every disk request takes 1 s (mock clock).  The primary's write holds
    # the clusters while it copies (disk read) and then writes the disk.  A
    # snapshot read started during the copy must return the OLD data.
    raw, disk, hidden, cbw = make(tmp_path, b"o" * 8 * CL, disk_rules="delay=1")

    async def main():
        got = {}

        async def snap_read(key, off, n):
            got[key] = (await cbw.snapshot.read(off, n), trio.current_time())

        async with trio.open_nursery() as n:
            n.start_soon(cbw.write, 2 * CL + 7, b"N" * (CL + 1))  # clusters 2, 3
            await trio.sleep(0.5)  # the copy is in progress (disk read)
            assert cbw.lock.is_locked(2, 4)
            n.start_soon(snap_read, "during", 3 * CL, 16)
            n.start_soon(snap_read, "elsewhere", 6 * CL, 16)  # not blocked
        assert got["during"][0] == b"o" * 16
        assert got["during"][1] == 2.0  # waited for the copy (1 s) and the disk write (1 s)
        assert got["elsewhere"] == (b"o" * 16, 1.5)
        assert (await raw.read(3 * CL, 16)) == b"N" * 8 + b"o" * 8

    trio.run(main, clock=mock_clock())
    hidden.close()
    raw.close()


@pytest.mark.parametrize("copy_file_range", [True, False])
def test_hidden_enospc_leaves_disk_and_view_alone(tmp_path, monkeypatch, copy_file_range):
    # The copy goes through copy_file_range, or pread + pwrite where the
    # kernel refuses it: ENOSPC from either fails the write.
    raw, disk, hidden, cbw = make(tmp_path, b"o" * 8 * CL)
    hidden.data._copy_range_ok = copy_file_range
    real_pwrite, real_copy = os.pwrite, os.copy_file_range

    def pwrite(fd, data, off):
        if fd == hidden.data._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, off)

    def copy(src, dst, *args):
        if dst == hidden.data._fd:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *args)

    async def main():
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "copy_file_range", copy)
        for op in (
            lambda: cbw.write(CL, b"n" * 10),
            lambda: cbw.write_zeroes(2 * CL, 3 * CL),
            lambda: cbw.trim(0, 1),
        ):
            with pytest.raises(BlockError) as e:
                await op()
            assert e.value.errno == errno.ENOSPC
        assert cbw.stats.copy_errors == 3
        assert await raw.read(0, 8 * CL) == b"o" * 8 * CL
        assert await cbw.snapshot.read(0, 8 * CL) == b"o" * 8 * CL
        assert hidden.bitmap.count == 0
        monkeypatch.undo()
        await cbw.write(CL, b"n" * 10)
        assert await cbw.snapshot.read(0, 8 * CL) == b"o" * 8 * CL

    trio.run(main)
    hidden.close()
    raw.close()


def test_edges_and_close_graph(tmp_path):
    raw, disk, hidden, cbw = make(tmp_path, b"o" * 4 * CL, disk_rules="")
    active = Overlay(tmp_path / "active", cbw.snapshot, cluster_size=CL)
    assert cbw.children() == {"file": disk, "target": hidden}
    assert cbw.snapshot.children() == {"file": cbw}
    assert disk.children() == {"file": raw} and hidden.children() == {"backing": disk}
    order = walk([active])
    pos = {id(n): i for i, n in enumerate(order)}
    assert len(order) == 6 and raw in order  # each node once, parents first
    assert all(pos[id(n)] < pos[id(c)] for n in order for c in n.children().values())
    close_graph([active])  # the fault layer no longer closes raw: the graph does
    assert raw._closed and hidden.data._closed and active.data._closed
    close_graph([active])  # idempotent


def test_whole_cluster_write_still_copies_the_old_data(tmp_path):
    # A write that covers its clusters whole replaces all of their bytes,
    # but hidden must still hold what it replaced: the snapshot shows it.
    old = os.urandom(8 * CL)
    raw, _, hidden, cbw = make(tmp_path, old)

    async def main():
        with trio.fail_after(10):
            await cbw.write(2 * CL, b"n" * 3 * CL)
            await cbw.write_zeroes(6 * CL, CL)
            assert cbw.stats.clusters_copied == 4 and cbw.stats.bytes_copied == 4 * CL
            assert await cbw.snapshot.read(0, 8 * CL) == old
            assert await raw.read(2 * CL, 3 * CL) == b"n" * 3 * CL
            assert await raw.read(6 * CL, CL) == bytes(CL)

    trio.run(main)
    hidden.close()
    raw.close()


def test_copy_across_file_systems_falls_back(tmp_path):
    # The disk on tmpfs, hidden under tmp_path: copy_file_range says EXDEV
    # and the copies go through pread + pwrite; the snapshot is the same.
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) \
            or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no writable /dev/shm on another file system than the test's tmp dir")
    old = os.urandom(16 * CL + 7)
    fd, path = tempfile.mkstemp(dir=shm, prefix="replfs-test-")
    try:
        os.write(fd, old)
        os.close(fd)
        raw = RawImage(path)
        hidden = Overlay(tmp_path / "hidden", raw, cluster_size=CL)
        cbw = CopyBeforeWrite(raw, hidden, cluster_size=2 * CL)

        async def main():
            with trio.fail_after(10):
                await cbw.write(3 * CL + 1, b"n" * 10)  # copy cluster 1 = 2, 3
                assert not hidden.data._copy_range_ok
                await cbw.write(16 * CL, b"e" * 7)  # the short last cluster
                assert hidden.bitmap.count == 3
                assert await cbw.snapshot.read(0, len(old)) == old
                await cbw.checkpoint()
                assert await cbw.snapshot.read(0, len(old)) == await raw.read(0, len(old))

        trio.run(main)
        hidden.close()
        raw.close()
    finally:
        os.unlink(path)
