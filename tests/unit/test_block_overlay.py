"""Overlay specifics: bitmap bookkeeping, make_empty, the commit job
(replfs/jobs/commit.py), ENOSPC, concurrency, and the 1 TiB cost claims."""

import errno
import os
import time
import tracemalloc

import pytest
import trio
import trio.testing

from replfs.block.base import BlockNode, Extent, close_graph
from replfs.block.fault import FaultLayer
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage
from replfs.errors import BlockError
from replfs.jobs.commit import COMMIT_CHUNK, Progress, commit

CL = 4096


def raw(tmp_path, content: bytes, name="backing.img") -> RawImage:
    p = tmp_path / name
    p.write_bytes(content)
    return RawImage(p)


class Spy(BlockNode):
    """Records the writes, writeback hints and flushes that reach it."""

    def __init__(self, child):
        self.child, self.size, self.name = child, child.size, "spy"
        self.log = []

    async def _read(self, off, n):
        return await self.child.read(off, n)

    async def _write(self, off, data, fua):
        self.log.append(("write", off, len(data)))
        await self.child.write(off, data, fua)

    async def start_writeback(self, off, n):
        self.log.append(("writeback", off, n))

    async def flush(self):
        self.log.append(("flush",))
        await self.child.flush()

    def children(self):
        return {"file": self.child}


def test_writes_stay_in_the_overlay(tmp_path):
    size = 10 * CL + 100  # short last cluster
    back = raw(tmp_path, b"b" * size)
    ov = Overlay(tmp_path / "ov", back, cluster_size=CL)

    async def main():
        await ov.write(CL + 10, b"x" * 20)  # fills cluster 1 from backing
        await ov.write(10 * CL + 50, b"y")  # the short last cluster
        await ov.write_zeroes(3 * CL, 2 * CL)  # two whole clusters
        assert await back.read(0, size) == b"b" * size  # backing untouched
        view = bytearray(b"b" * size)
        view[CL + 10 : CL + 30] = b"x" * 20
        view[10 * CL + 50] = ord("y")
        view[3 * CL : 5 * CL] = bytes(2 * CL)
        assert await ov.read(0, size) == view
        assert ov.allocation(0, size) == [
            Extent(0, CL, False),
            Extent(CL, CL, True),
            Extent(2 * CL, CL, False),
            Extent(3 * CL, 2 * CL, True),
            Extent(5 * CL, 5 * CL, False),
            Extent(10 * CL, 100, True),
        ]
        assert ov.allocation(CL + 5, 10) == [Extent(CL + 5, 10, True)]
        assert ov.allocated_bytes == 3 * CL + 100
        s = ov.statistics()
        assert s["clusters_allocated"] == 4 and s["allocated_bytes"] == 3 * CL + 100
        assert ov.is_allocated(3 * CL, 2 * CL) and not ov.is_allocated(2 * CL, 2 * CL)

    trio.run(main)
    ov.close()
    back.close()


def test_bad_cluster_size(tmp_path):
    back = raw(tmp_path, bytes(100))
    for cs in (0, 256, 3000, 65537):
        with pytest.raises(ValueError):
            Overlay(tmp_path / "ov", back, cluster_size=cs)
    back.close()


@pytest.mark.parametrize("reclaim", [True, False])
def test_make_empty_forgets_everything(tmp_path, reclaim):
    """With reclaim the blocks are freed; without, they are kept but their
    stale content never shows (a new allocation fills its whole cluster)."""
    size = 64 * CL
    back = raw(tmp_path, b"b" * size)
    ov = Overlay(tmp_path / "ov", back, cluster_size=CL, reclaim=reclaim)

    async def main():
        await ov.write(0, os.urandom(size))
        assert os.stat(ov.path).st_blocks >= size // 512
        await ov.make_empty()
        assert ov.bitmap.count == 0 and ov.allocated_bytes == 0
        blocks = os.stat(ov.path).st_blocks
        assert (blocks == 0) if reclaim else (blocks >= size // 512)
        assert os.stat(ov.path).st_size == size
        assert await ov.read(0, size) == b"b" * size
        await ov.write(5, b"again")  # still usable
        assert await ov.read(0, 12) == b"bbbbbagainbb"
        await ov.make_empty()
        await ov.make_empty()  # empty already: no-op

    trio.run(main)
    ov.close()
    back.close()


def test_commit_in_order_in_chunks_then_empty(tmp_path):
    size = 3 * COMMIT_CHUNK + 5 * CL + 123
    back = raw(tmp_path, bytes(size))
    spy = Spy(back)
    ov = Overlay(tmp_path / "ov", spy, cluster_size=CL)

    async def main():
        await ov.write(CL, b"\x01" * (2 * COMMIT_CHUNK + 10))  # one long run
        await ov.write(size - 200, b"\x02" * 200)  # the short last cluster
        await ov.write(0, b"\x03")
        view = await ov.read(0, size)
        progress = await commit(ov)
        writes = [e for e in spy.log if e[0] == "write"]
        assert all(n <= COMMIT_CHUNK for _, _, n in writes)
        offsets = [off for _, off, _ in writes]
        assert offsets == sorted(offsets)
        assert spy.log[-1] == ("flush",)
        assert not [e for e in spy.log if e[0] == "writeback"]  # not can_writeback
        assert ov.bitmap.count == 0
        assert await back.read(0, size) == view
        assert await ov.read(0, size) == view
        total = (2 * COMMIT_CHUNK + 2 * CL) + (CL + 123)  # the run from 0; the last two clusters
        assert (progress.done, progress.total) == (total, total)
        assert sum(n for _, _, n in writes) == total == ov.stats.bytes_committed

    trio.run(main)
    close_graph([ov])


def test_commit_starts_writeback_per_chunk_through_a_fault_layer(tmp_path):
    """Pass-through layers forward ``can_writeback`` and ``start_writeback``:
    hints stay on under fault injection."""
    size = 2 * COMMIT_CHUNK + 4 * CL
    back = raw(tmp_path, bytes(size))
    hints = []
    real = back.start_writeback

    async def start_writeback(off, n):
        hints.append((off, n))
        await real(off, n)

    back.start_writeback = start_writeback
    faulty = FaultLayer(back, "delay=0")
    assert faulty.can_writeback and not FaultLayer(Spy(back)).can_writeback
    ov = Overlay(tmp_path / "ov", faulty, cluster_size=CL)

    async def main():
        await ov.write(CL, b"\x01" * (2 * COMMIT_CHUNK))
        await commit(ov)
        assert hints == [(CL, COMMIT_CHUNK), (CL + COMMIT_CHUNK, COMMIT_CHUNK)]
        assert await back.read(CL, 2 * COMMIT_CHUNK) == b"\x01" * (2 * COMMIT_CHUNK)

    trio.run(main)
    close_graph([ov])


def test_commit_progress_is_readable_while_it_runs(tmp_path):
    back = raw(tmp_path, bytes(3 * COMMIT_CHUNK))
    progress = Progress()
    seen = []

    class Watch(Spy):
        async def _write(self, off, data, fua):
            seen.append((progress.done, progress.total))  # as the commit goes
            await super()._write(off, data, fua)

    ov = Overlay(tmp_path / "ov", Watch(back), cluster_size=CL)

    async def main():
        await ov.write(0, b"c" * (2 * COMMIT_CHUNK + CL))
        assert await commit(ov, progress=progress) is progress
        total = 2 * COMMIT_CHUNK + CL
        assert seen == [(0, total), (COMMIT_CHUNK, total), (2 * COMMIT_CHUNK, total)]
        assert (progress.done, progress.total) == (total, total)
        await commit(ov, progress=progress)  # nothing left: a retry starts from 0
        assert (progress.done, progress.total) == (0, 0)

    trio.run(main)
    close_graph([ov])


def test_commit_into_another_node_and_retry_after_failure(tmp_path):
    size = 16 * CL
    back = raw(tmp_path, b"b" * size)
    other = raw(tmp_path, b"o" * size, name="other.img")
    faulty = FaultLayer(other, "write:EIO:skip=1:count=1")
    ov = Overlay(tmp_path / "ov", back, cluster_size=CL)

    async def main():
        await ov.write(0, b"1" * CL)
        await ov.write(5 * CL, b"2" * CL)
        with pytest.raises(BlockError) as e:
            await commit(ov, into=faulty)  # second run fails
        assert e.value.errno == errno.EIO
        assert ov.bitmap.count == 2  # nothing emptied
        await commit(ov, into=faulty)  # retry succeeds
        assert ov.bitmap.count == 0
        want = bytearray(b"o" * size)
        want[0:CL] = b"1" * CL
        want[5 * CL : 6 * CL] = b"2" * CL
        assert await other.read(0, size) == want
        assert await back.read(0, size) == b"b" * size
        small = RawImage.create(tmp_path / "small", 10)
        with pytest.raises(BlockError) as e:
            await commit(ov, into=small)
        assert e.value.errno == errno.EINVAL
        small.close()

    trio.run(main)
    for n in (ov, back, other):
        n.close()


def test_enospc_leaves_bitmap_and_view_unchanged(tmp_path, monkeypatch):
    size = 8 * CL
    back = raw(tmp_path, b"b" * size)
    ov = Overlay(tmp_path / "ov", back, cluster_size=CL)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main():
        await ov.write(2 * CL, b"a" * CL)
        view = await ov.read(0, size)
        monkeypatch.setattr(os, "pwrite", full)
        monkeypatch.setattr(os, "pwritev", full)
        for op in (
            lambda: ov.write(CL + 5, b"x" * 10),  # partial: fill
            lambda: ov.write(4 * CL, b"x" * CL),  # whole cluster
            lambda: ov.write(CL + 5, b"x" * 3 * CL),  # across an allocated one
            lambda: ov.write_zeroes(5 * CL + 1, 10),  # partial zero: fill
        ):
            with pytest.raises(BlockError) as e:
                await op()
            assert e.value.errno == errno.ENOSPC
            assert ov.bitmap.count == 1
            assert await ov.read(0, size) == view
        monkeypatch.undo()
        await ov.write(CL + 5, b"x" * 10)
        assert ov.bitmap.count == 2

    trio.run(main)
    ov.close()
    back.close()


def test_concurrent_partial_writes_to_one_cluster(tmp_path):
    back = raw(tmp_path, b"b" * 4 * CL)
    slow = FaultLayer(back, "read:delay=0.01")  # fills take a while
    ov = Overlay(tmp_path / "ov", slow, cluster_size=CL)

    async def main():
        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(ov.write, CL + i * 100, bytes([65 + i]) * 50)
        want = bytearray(b"b" * CL)
        for i in range(8):
            want[i * 100 : i * 100 + 50] = bytes([65 + i]) * 50
        assert await ov.read(CL, CL) == want
        assert ov.stats.fills == 1  # the first filled, the others saw it allocated

    trio.run(main)
    ov.close()
    back.close()


def test_read_is_not_torn_by_make_empty(tmp_path):
    back = raw(tmp_path, b"b" * 4 * CL)
    slow = FaultLayer(back, "read:delay=0.05")
    ov = Overlay(tmp_path / "ov", slow, cluster_size=CL)

    async def main():
        await ov.write(CL, b"a" * CL)
        view = b"b" * CL + b"a" * CL
        got = []

        async def reader():
            got.append(await ov.read(0, 2 * CL))  # backing part is slow

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(ov.make_empty)
        assert got == [view]  # old view, not half old and half emptied
        assert await ov.read(0, 2 * CL) == b"b" * 2 * CL

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    ov.close()
    back.close()


def test_flush_and_fua_only_with_sync_data(tmp_path):
    back = raw(tmp_path, bytes(4 * CL))
    calls = []
    for sync in (False, True):
        ov = Overlay(tmp_path / f"ov{sync}", back, cluster_size=CL, sync_data=sync)
        real = ov.data.flush

        async def counting():
            calls.append(sync)
            await real()

        ov.data.flush = counting
        trio.run(ov.flush)
        trio.run(ov.write_zeroes, 0, 10, True)
        ov.close()
    assert calls == [True, True]
    back.close()


def test_one_tib_disk(tmp_path):
    """A 1 TiB sparse disk and overlay: creating them, a few I/Os, and
    make_empty take milliseconds and only the bitmap's memory (2 MiB)."""
    size = 1 << 40
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(size)
    tracemalloc.start()
    try:
        t = time.perf_counter()
        back = RawImage(path)
        ov = Overlay(tmp_path / "big.ovl", back)  # 64 KiB clusters: 16 Mi bits
        created = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert created < 0.5, created
    assert peak < 4 * 1024 * 1024, peak
    assert ov.bitmap.nbytes <= 2 * 1024 * 1024 + 1024

    async def main():
        t = time.perf_counter()
        await ov.write(size - 3, b"end")
        await ov.write(12345, b"start")
        await ov.write_zeroes(size // 2, 10 * 65536)
        assert await ov.read(size - 5, 5) == b"\0\0end"
        assert await ov.read(12340, 10) == b"\0" * 5 + b"start"
        assert ov.allocated_bytes == 12 * 65536
        ext = ov.allocation(0, size)
        assert [e.allocated for e in ext] == [True, False, True, False, True]
        await commit(ov)
        assert await back.read(size - 3, 3) == b"end"
        await ov.write(size // 3, b"x")
        await ov.make_empty()
        assert ov.bitmap.count == 0
        assert time.perf_counter() - t < 1.0

    trio.run(main)
    ov.close()
    back.close()


# -- copy_in: the copy-before-write's primitive ----------------------------------------
@pytest.mark.parametrize("through_nodes", [False, True])
def test_copy_in_copies_what_is_not_held(tmp_path, through_nodes):
    # A raw backing is copied with copy_file_range; any other node (here a
    # fault layer with no rules) through read + write.  Same result.
    size = 10 * CL + 100  # a short last cluster
    content = os.urandom(size)
    b = raw(tmp_path, content)
    backing = FaultLayer(b, "") if through_nodes else b
    ov = Overlay(tmp_path / "ov", backing, cluster_size=CL)
    assert ov._raw_backing is not through_nodes

    async def main():
        with trio.fail_after(10):
            await ov.write(2 * CL + 5, b"mine")  # cluster 2 is the overlay's own
            assert await ov.copy_in(1, 4) == 2 * CL  # clusters 1 and 3, not 2
            assert await ov.copy_in(1, 4) == 0
            assert await ov.copy_in(3, 4) == 0  # one cluster, held
            assert await ov.copy_in(10, 11) == 100  # the short last one
            await b.write(0, b"X" * size)  # the backing changes afterwards
            got = await ov.read(0, size)
        want = bytearray(b"X" * size)
        want[CL : 4 * CL] = content[CL : 4 * CL]
        want[2 * CL + 5 : 2 * CL + 9] = b"mine"
        want[10 * CL :] = content[10 * CL :]
        assert got == want
        assert [(s, e) for s, e in ov.bitmap.set_runs()] == [(1, 4), (10, 11)]
        assert ov.stats.copies == 3 and ov.stats.bytes_copied == 2 * CL + 100

    trio.run(main)
    close_graph([ov, backing])


def test_copy_in_failure_leaves_the_rest_unheld(tmp_path):
    # The backing fails on its second read: the first run is held, the
    # clusters of the run that failed are not (they still read through).
    content = b"b" * 8 * CL
    b = raw(tmp_path, content)
    backing = FaultLayer(b, "read:EIO:skip=1:count=1")
    ov = Overlay(tmp_path / "ov", backing, cluster_size=CL)

    async def main():
        with trio.fail_after(10):
            await ov.write(2 * CL, b"m" * CL)  # split: runs [0, 2) and [3, 6)
            with pytest.raises(BlockError) as e:
                await ov.copy_in(0, 6)
            assert e.value.errno == errno.EIO
            assert [(s, e) for s, e in ov.bitmap.set_runs()] == [(0, 3)]
            await ov.copy_in(0, 6)  # the retry copies the rest
            assert [(s, e) for s, e in ov.bitmap.set_runs()] == [(0, 6)]

    trio.run(main)
    close_graph([ov, backing])


def test_copy_in_waits_for_a_write_on_its_clusters(tmp_path):
    # copy_in takes the exclusive lock: it waits for a write in progress
    # there and then leaves that write's cluster alone (already held).
    b = raw(tmp_path, b"b" * 4 * CL)
    backing = FaultLayer(b, "delay=1")  # every backing request takes 1 s
    ov = Overlay(tmp_path / "ov", backing, cluster_size=CL)

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(ov.write, CL + 1, b"w")  # reads the head: 1 s
                await trio.sleep(0.5)
                assert await ov.copy_in(0, 2) == CL  # cluster 0 only, after the write
                assert trio.current_time() == 2.0  # 1 s wait, then 1 s copy
            assert await ov.read(CL, 2) == b"bw"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    close_graph([ov, backing])
