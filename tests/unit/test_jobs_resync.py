"""Resync (``replfs/jobs/resync.py``): the peer brought level with the
local image through the mirror's dirty record, while the VM writes.

Unit tests on a pair of small image files (a short last cluster, 4 KiB
clusters): what is sent (a counting pass-through peer), the suspects'
digest comparison, the flush before the bits are cleared, the rate and the
progress fields.  Then a model-based test (hypothesis stateful, in the style
of ``test_block_properties.py``) of dirty tracking and resync ordering at
the block layer: VM writes, peer detach/attach, crashes that leave suspects,
and resyncs that run while the VM writes, against a ``bytearray`` model.
"""

from __future__ import annotations

import errno
import random
from functools import partial

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from replfs.block.base import BlockNode
from replfs.block.dirty import DirtyRecord
from replfs.block.fault import FaultLayer
from replfs.block.mirror import Mirror
from replfs.block.raw import RawImage
from replfs.core.digest import cluster_digests
from replfs.errors import BlockError
from replfs.jobs import resync as resync_mod
from replfs.jobs.resync import SyncProgress, resync
from tests.unit.test_block_properties import (
    SETTINGS,
    _TmpMachine,
    blob,
    diff,
    draw_range,
    read_all,
    yielding,
)

CS = 4096
SIZE = 40 * CS + 100  # clusters 0..40, the last one 100 bytes
TIMEOUT = 10


def run(fn, *args, timeout: float = TIMEOUT, **kw):
    async def bounded():
        with trio.fail_after(timeout):
            return await fn(*args, **kw)

    return trio.run(bounded)


class Counting(BlockNode):
    """The peer, counting what reaches it; ``flush_gate`` (an Event) holds
    every flush until set, ``write_gate`` the next write; ``fail_writes``
    fails the writes with EIO.  Every request is a trio checkpoint, as an NBD client's
    is (so a resync that loops for ever can still be cancelled)."""

    def __init__(self, child: BlockNode) -> None:
        self.child = child
        self.size = child.size
        self.written = 0
        self.writes: list[tuple[int, int]] = []
        self.flushes = 0
        self.flush_started = trio.Event()
        self.flush_gate: trio.Event | None = None
        self.write_gate: trio.Event | None = None
        self.write_started = trio.Event()
        self.fail_writes = False

    async def _read(self, offset, length):
        return await self.child.read(offset, length)

    async def _write(self, offset, data, fua):
        await trio.lowlevel.checkpoint()
        if self.fail_writes:
            raise BlockError(errno.EIO, "injected: the peer failed a write")
        self.write_started.set()
        gate, self.write_gate = self.write_gate, None
        if gate is not None:
            await gate.wait()
        self.writes.append((offset, len(data)))
        self.written += len(data)
        await self.child.write(offset, data, fua)

    async def _write_zeroes(self, offset, length, fua):
        self.written += length
        await self.child.write_zeroes(offset, length, fua)

    async def _trim(self, offset, length):
        self.written += length
        await self.child.trim(offset, length)

    async def flush(self):
        await trio.lowlevel.checkpoint()
        self.flush_started.set()
        if self.flush_gate is not None:
            await self.flush_gate.wait()
        self.flushes += 1
        await self.child.flush()


class Setup:
    """Two images equal at first, a mirror over them, its record."""

    def __init__(self, tmp_path, size: int = SIZE, seed: int = 1) -> None:
        self.size = size
        content = random.Random(seed).randbytes(size)
        for name in ("local", "peer"):
            (tmp_path / f"{name}.img").write_bytes(content)
        self.local = RawImage(tmp_path / "local.img")
        self.peer_raw = RawImage(tmp_path / "peer.img")
        self.peer = Counting(self.peer_raw)
        self.record = DirtyRecord(size, CS)
        self.errors: list[str] = []
        self.mirror = Mirror("d", self.local, self.peer, record=self.record,
                             on_peer_error=lambda m, why: self.errors.append(why))

    def close(self) -> None:
        self.local.close()
        self.peer_raw.close()

    def diverge(self, offset: int, length: int, mark: bool = True) -> None:
        """The local image changes there (marked in the record, or not)."""
        run(self.local.write, offset, b"\x5a" * length)
        if mark:
            self.record.mark(offset, length)

    def peer_differs(self, offset: int, length: int) -> None:
        run(self.peer_raw.write, offset, b"\xa5" * length)

    async def digests(self, name: str, offset: int, length: int) -> list[int]:
        assert name == "d"
        return cluster_digests(await self.peer_raw.read(offset, length), CS)

    def images(self) -> tuple[bytes, bytes]:
        return run(self.local.read, 0, self.size), run(self.peer_raw.read, 0, self.size)

    async def resync(self, **kw) -> SyncProgress:
        return await resync([("d", self.mirror, self.record)], **kw)


@pytest.fixture
def s(tmp_path):
    setup = Setup(tmp_path)
    yield setup
    setup.close()


def clusters_differing(a: bytes, b: bytes) -> set[int]:
    return {i // CS for i in range(0, len(a), CS) if a[i:i + CS] != b[i:i + CS]}


# ---------------------------------------------------------------------------


def test_resync_makes_the_peer_equal_and_the_record_empty(s):
    s.diverge(5000, 100)  # cluster 1
    s.diverge(10 * CS - 1, 2)  # clusters 9 and 10
    s.diverge(12 * CS, 6 * CS)  # 12..17: one run
    s.diverge(SIZE - 1, 1)  # the short last cluster
    assert s.record.out_of_sync_bytes == 9 * CS + 100
    progress = run(s.resync)
    local, peer = s.images()
    assert peer == local, diff(peer, local)
    assert s.record.dirty_clusters == 0 and s.record.out_of_sync_bytes == 0
    assert s.peer.written == 9 * CS + 100 and s.peer.flushes == 1
    assert progress.total_bytes == progress.done_bytes == progress.sent_bytes == 9 * CS + 100
    assert s.errors == []


def test_only_dirty_clusters_are_sent(s):
    s.diverge(3 * CS + 1, 10)
    s.diverge(20 * CS, CS)
    s.diverge(30 * CS, 10, mark=False)  # differs, but the record does not say so
    run(s.resync)
    assert sorted(s.peer.writes) == [(3 * CS, CS), (20 * CS, CS)]
    assert s.peer.written == 2 * CS
    local, peer = s.images()
    assert clusters_differing(local, peer) == {30}  # left alone


def test_suspects_with_equal_digests_are_not_sent(s):
    s.diverge(3 * CS, 10, mark=False)  # a lost write: differs, only suspected
    s.diverge(7 * CS + 4000, 200, mark=False)  # clusters 7 and 8
    s.diverge(20 * CS, 10)  # known dirty: sent whatever the digests say
    s.record.suspect_extents([0, 1], 8 * CS)  # clusters 0..15
    assert s.record.out_of_sync_bytes == 17 * CS
    progress = run(s.resync, digests=s.digests)
    assert sorted(s.peer.writes) == [(3 * CS, CS), (7 * CS, 2 * CS), (20 * CS, CS)]
    local, peer = s.images()
    assert peer == local, diff(peer, local)
    assert s.record.out_of_sync_bytes == 0 and s.record.suspect.count == 0
    assert progress.sent_bytes == 4 * CS and progress.equal_bytes == 13 * CS
    assert progress.done_bytes == progress.total_bytes == 17 * CS


def test_suspects_without_digests_are_copied(s):
    s.diverge(3 * CS, 10, mark=False)
    s.record.suspect_extents([0, 1], 8 * CS)
    s.record.suspect_extents([5], 8 * CS)  # clusters 40 (short) and beyond the end
    progress = run(s.resync)
    assert s.peer.written == 16 * CS + 100
    assert progress.sent_bytes == progress.done_bytes == progress.total_bytes == 16 * CS + 100
    local, peer = s.images()
    assert peer == local and s.record.suspect.count == 0


def test_bits_are_cleared_only_after_the_peer_flushed(s):
    s.diverge(CS, 3 * CS)
    s.peer.flush_gate = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.resync)
            await s.peer.flush_started.wait()
            assert s.peer.written == 3 * CS  # every copy is out ...
            await trio.sleep(0.05)
            assert s.record.dirty_clusters == 3  # ... and still dirty
            s.peer.flush_gate.set()
        assert s.record.dirty_clusters == 0

    run(main)
    assert s.peer.flushes == 1


def test_flush_every_bounds_what_waits_for_a_flush(s, monkeypatch):
    monkeypatch.setattr(resync_mod, "WINDOW", 2 * CS)
    monkeypatch.setattr(resync_mod, "FLUSH_EVERY", 4 * CS)
    s.diverge(0, 24 * CS)
    run(s.resync, workers=1)
    assert s.peer.flushes == 6 and s.record.dirty_clusters == 0


def test_no_peer_is_enotconn_and_nothing_is_cleared(s):
    s.diverge(CS, 10)
    s.mirror.drop_peer()
    with pytest.raises(BlockError) as e:
        run(s.resync)
    assert e.value.errno == errno.ENOTCONN
    assert s.record.dirty_clusters == 1


def test_a_cluster_marked_again_before_the_flush_stays_dirty(s):
    # The copy of cluster 2 is out and its flush in flight when a VM write
    # into it fails at the peer (the mirror marks it; the controller drops
    # the peer).  The flush then succeeds: cluster 2 must stay dirty, the
    # peer lacks that write.
    s.diverge(2 * CS, 10)
    s.peer.flush_gate = trio.Event()

    def dropped(m, why):
        s.errors.append(why)
        m.drop_peer()

    s.mirror._on_peer_error = dropped

    async def main():
        async with trio.open_nursery() as nursery:
            async def job():
                with pytest.raises(BlockError):  # the peer is gone: not done
                    await s.resync()
            nursery.start_soon(job)
            await s.peer.flush_started.wait()
            s.peer.fail_writes = True
            await s.mirror.write(2 * CS + 100, b"\x77" * 10)
            s.peer.flush_gate.set()

    run(main)
    assert s.errors
    local, peer = s.images()
    assert clusters_differing(local, peer) == {2}
    assert s.record.bits.test(2)


def test_a_cluster_marked_again_is_copied_again(s):
    # The same with a peer that stays attached after the failed write: the
    # resync copies cluster 2 again and ends with the images equal.
    s.diverge(2 * CS, 10)
    s.peer.flush_gate = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.resync)
            await s.peer.flush_started.wait()
            s.peer.fail_writes = True
            await s.mirror.write(2 * CS + 100, b"\x77" * 10)
            s.peer.fail_writes = False
            s.peer.flush_gate.set()

    run(main)
    local, peer = s.images()
    assert peer == local, diff(peer, local)
    assert s.record.dirty_clusters == 0


def test_a_peer_replaced_before_the_flush_clears_nothing(s, tmp_path):
    # The copies went to one peer; another is attached before the flush: a
    # flush of the new one says nothing about them.
    s.diverge(2 * CS, 10)
    s.peer.flush_gate = trio.Event()
    (tmp_path / "other.img").write_bytes(run(s.peer_raw.read, 0, SIZE))
    other = RawImage(tmp_path / "other.img")

    async def main():
        async with trio.open_nursery() as nursery:
            async def job():
                with pytest.raises(BlockError) as e:
                    await s.resync()
                assert e.value.errno == errno.ENOTCONN

            nursery.start_soon(job)
            await s.peer.flush_started.wait()
            s.mirror.drop_peer()
            s.mirror.attach_peer(other)
            s.peer.flush_gate.set()

    try:
        run(main)
        assert s.record.bits.test(2)
    finally:
        other.close()


def test_a_vm_write_waits_for_the_copy_of_its_window(s):
    # The copy of cluster 2 read the old data and is on its way to the peer:
    # a VM write into cluster 2 must not reach the peer before it (or the
    # old data would land last).
    s.diverge(2 * CS, 10)
    s.peer.write_gate = gate = trio.Event()
    order = []

    async def vm():
        await s.mirror.write(2 * CS + 100, b"\x77" * 10)
        order.append("vm")

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.resync)
            await s.peer.write_started.wait()
            nursery.start_soon(vm)
            await trio.sleep(0.05)
            order.append("copy")
            gate.set()

    run(main)
    assert order == ["copy", "vm"]
    local, peer = s.images()
    assert peer == local, diff(peer, local)
    assert s.record.dirty_clusters == 0


def test_concurrent_vm_writes_are_never_overwritten_by_a_copy(s, monkeypatch):
    monkeypatch.setattr(resync_mod, "WINDOW", 2 * CS)
    s.diverge(0, SIZE)
    s.peer.child = yielding(s.peer_raw, 3)

    async def vm():
        rnd = random.Random(5)
        for i in range(60):
            off = rnd.randrange(SIZE - 5000)
            await s.mirror.write(off, blob(rnd.randrange(1, 5000), i))

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.resync)
            nursery.start_soon(vm)

    run(main)
    local, peer = s.images()
    assert peer == local, diff(peer, local)
    assert s.record.out_of_sync_bytes == 0


def test_rate_limits_what_is_sent(s, monkeypatch):
    monkeypatch.setattr(resync_mod, "WINDOW", 4 * CS)
    s.diverge(0, 24 * CS)  # 96 KiB at 64 KiB/s: one second's burst, then 0.5 s
    rate = 16 * CS
    seen = []

    async def watch(progress):
        while True:
            await trio.sleep(0.1)
            now = trio.current_time()
            st = progress.status(now)
            seen.append(st)
            assert st["total_bytes"] == 24 * CS
            assert 0 <= st["sent_bytes"] <= st["done_bytes"] <= st["total_bytes"]
            if st["done_bytes"] and now - progress.started > 0.15:
                assert st["rate_bytes_per_s"] > 0
                left = st["total_bytes"] - st["done_bytes"]
                assert st["eta_s"] == round(left / progress.rate(now), 1)

    async def main():
        progress = SyncProgress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, progress)
            t0 = trio.current_time()
            await s.resync(rate=rate, progress=progress)
            elapsed = trio.current_time() - t0
            nursery.cancel_scope.cancel()
        return elapsed, progress.status(trio.current_time())

    elapsed, end = run(main)
    assert 0.45 <= elapsed <= 1.5, elapsed
    assert any(0 < st["done_bytes"] < 24 * CS for st in seen)  # watched it mid-way
    assert end["done_bytes"] == end["sent_bytes"] == end["total_bytes"] == 24 * CS
    assert end["eta_s"] == 0.0 and end["rate_bytes_per_s"] > 0
    assert s.record.dirty_clusters == 0


def test_a_rate_limited_resync_does_not_hold_up_vm_writes(s, monkeypatch):
    # The bucket's wait happens outside the window's range lock: a VM write
    # into the window about to be copied goes through at once.
    monkeypatch.setattr(resync_mod, "WINDOW", 8 * CS)
    s.diverge(0, 16 * CS)  # two windows; the rate's burst covers one
    rate = 16 * CS / 1.3  # the second waits 0.3 s

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(s.resync, rate=rate))
            await trio.sleep(0.05)
            t0 = trio.current_time()
            await s.mirror.write(8 * CS + 5, b"\x77" * 10)
            latency = trio.current_time() - t0
        return latency

    latency = run(main)
    assert latency < 0.15, latency
    local, peer = s.images()
    assert peer == local and s.record.dirty_clusters == 0


# ---------------------------------------------------------------------------
# The model: dirty tracking and resync ordering at the block layer
# ---------------------------------------------------------------------------

EXTENT = 4 * CS  # what a "crash" leaves as suspects


class ResyncMachine(_TmpMachine):
    """A mirror over a local image and a peer image (requests yield, so they
    interleave), with a dirty record.  The model is the VM's view; the peer
    may differ from it only where the record says so."""

    @initialize(size=st.integers(48 * CS, 96 * CS), seed=st.integers(0, 1000))
    def init(self, size, seed):
        self.size, self.seed = size, seed
        self.model = bytearray(blob(size, seed))
        for name in ("local", "peer"):
            with open(self.path(f"{name}.img"), "wb") as f:
                f.write(self.model)
        self.local_raw = RawImage(self.path("local.img"))
        self.peer_raw = RawImage(self.path("peer.img"))
        self.closers += [self.local_raw, self.peer_raw]
        # The peer yields 0-4 times per request: copies and VM writes overlap.
        self.peer = FaultLayer(self.peer_raw, "delay=0:prob=0.5," * 4 + f"seed={seed}")
        self.record = DirtyRecord(size, CS)
        self.errors = []
        self.mirror = Mirror("d", yielding(self.local_raw, seed + 1), self.peer,
                             record=self.record,
                             on_peer_error=lambda m, why: self.errors.append(why))
        self.attached = True

    # -- the VM ---------------------------------------------------------------------
    def draw_io(self, data, seed):
        off, n = draw_range(data, self.size, CS)
        kind = data.draw(st.sampled_from(["write", "zero", "trim"]), label="kind")
        return off, (blob(n, seed) if kind == "write" else bytes(n)), kind

    async def io(self, off, buf, kind):
        if kind == "write":
            await self.mirror.write(off, buf)
        elif kind == "zero":
            await self.mirror.write_zeroes(off, len(buf))
        else:
            await self.mirror.trim(off, len(buf))
        self.model[off:off + len(buf)] = buf

    def draw_io_near_dirt(self, data, seed):
        """Often into (or across the edge of) a cluster the resync has to copy.

        The draws do not depend on the record: which clusters are dirty
        depends on how threads and tasks interleaved, and Hypothesis needs
        the same draws when it replays an example."""
        plain = self.draw_io(data, seed)
        near = data.draw(st.integers(0, 3), label="near dirt")
        pick = data.draw(st.integers(0, 1 << 16), label="cluster")
        delta = data.draw(st.integers(-64, CS), label="delta")
        n = data.draw(st.integers(1, 2 * CS), label="len")
        kind = data.draw(st.sampled_from(["write", "zero", "trim"]), label="kind")
        rec = self.record
        dirt = [c for bm in (rec.bits, rec.suspect) for a, b in bm.set_runs() for c in range(a, b)]
        if not dirt or not near:
            return plain
        off = min(max(0, dirt[pick % len(dirt)] * CS + delta), self.size - 1)
        n = min(n, self.size - off)
        return off, (blob(n, seed) if kind == "write" else bytes(n)), kind

    def disjoint(self, data, seeds, draw=None):
        ios, taken = [], []
        for seed in seeds:
            off, buf, kind = (draw or self.draw_io)(data, seed)
            if not any(off < b and a < off + len(buf) for a, b in taken):
                taken.append((off, off + len(buf)))
                ios.append((off, buf, kind))
        return ios

    @rule(data=st.data(), seed=st.integers(0, 1 << 16))
    def vm(self, data, seed):
        run(self.io, *self.draw_io(data, seed))

    @rule(data=st.data(), seeds=st.lists(st.integers(0, 1 << 16), min_size=2, max_size=5))
    def vm_concurrent(self, data, seeds):
        ios = self.disjoint(data, seeds)

        async def go():
            async with trio.open_nursery() as nursery:
                for io in ios:
                    nursery.start_soon(self.io, *io)

        run(go)

    # -- the peer -------------------------------------------------------------------
    @precondition(lambda self: self.attached)
    @rule()
    def detach(self):
        assert self.mirror.drop_peer() is self.peer
        self.attached = False

    @precondition(lambda self: not self.attached)
    @rule()
    def attach(self):
        self.mirror.attach_peer(self.peer)
        self.attached = True

    @precondition(lambda self: self.attached)
    @rule(data=st.data(), seeds=st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4))
    def outage(self, data, seeds):
        """The peer goes away, the VM writes, the peer comes back."""
        self.detach()
        for seed in seeds:
            run(self.io, *self.draw_io(data, seed))
        self.record_covers_every_difference()
        self.attach()

    @rule(data=st.data(), seed=st.integers(0, 1 << 16))
    def crash_loses_peer_writes(self, data, seed):
        """The peer lost writes of some hot extents (its page cache after a
        crash): those extents come back as suspects."""
        off, n = draw_range(data, min(self.size, 3 * EXTENT), CS)
        off += data.draw(st.integers(0, (self.size - off - n) // EXTENT), label="shift") * EXTENT
        old = run(self.peer_raw.read, off, n)
        run(self.peer_raw.write, off, blob(n, seed) if seed % 2 else bytes(n))
        if old != run(self.peer_raw.read, off, n):
            first, last = off // EXTENT, (off + n - 1) // EXTENT
            self.record.suspect_extents(range(first, last + 1), EXTENT)

    # -- resync ---------------------------------------------------------------------
    async def digests(self, name, offset, length):
        return cluster_digests(await self.peer_raw.read(offset, length), CS)

    @precondition(lambda self: self.attached)
    @rule(data=st.data(), seeds=st.lists(st.integers(0, 1 << 16), max_size=6),
          workers=st.integers(1, 4), compare=st.booleans())
    def resync_while_writes_run(self, data, seeds, workers, compare):
        ticks = [data.draw(st.integers(0, 12), label="ticks") for _ in seeds]
        ios = self.disjoint(data, seeds, self.draw_io_near_dirt)
        total = self.record.out_of_sync_bytes
        result = {}

        async def vm_after(io, ticks):
            for _ in range(ticks):
                await trio.lowlevel.checkpoint()
            await self.io(*io)

        async def job():
            result["p"] = await resync([("d", self.mirror, self.record)], workers=workers,
                                       digests=self.digests if compare else None)

        async def go():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(job)
                for io, n in zip(ios, ticks):
                    nursery.start_soon(vm_after, io, n)

        run(go)
        p = result["p"]
        # VM writes may clear clusters before the resync starts or gets there.
        assert p.sent_bytes + p.equal_bytes == p.done_bytes <= p.total_bytes <= total
        if not ios:
            assert p.done_bytes == p.total_bytes == total
        assert self.record.out_of_sync_bytes == 0
        assert self.record.bits.count == 0 and self.record.suspect.count == 0
        local = run(read_all, self.local_raw, self.size)
        peer = run(read_all, self.peer_raw, self.size)
        assert local == self.model, "local: " + diff(local, self.model)
        assert peer == local, "peer: " + diff(peer, local)

    @precondition(lambda self: self.attached)
    @rule(ticks=st.integers(0, 40), seed=st.integers(0, 1 << 16))
    def peer_lost_during_resync(self, ticks, seed):
        """The peer goes away while a resync and a VM write run."""
        rnd = random.Random(seed)

        async def job():
            try:
                await resync([("d", self.mirror, self.record)], workers=rnd.randint(1, 4))
            except BlockError as e:
                assert e.errno == errno.ENOTCONN

        async def go():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(job)
                off = rnd.randrange(self.size)
                nursery.start_soon(self.io, off, blob(min(3 * CS, self.size - off), seed), "write")
                for _ in range(ticks):
                    await trio.lowlevel.checkpoint()
                self.mirror.drop_peer()

        run(go)
        self.attached = False

    @invariant()
    def record_covers_every_difference(self):
        if not hasattr(self, "mirror"):
            return
        assert self.errors == []
        local = run(read_all, self.local_raw, self.size)
        assert local == self.model, "local: " + diff(local, self.model)
        peer = run(read_all, self.peer_raw, self.size)
        for c in range(self.record.nclusters):
            a, b = c * CS, min((c + 1) * CS, self.size)
            if local[a:b] != peer[a:b]:
                assert self.record.bits.test(c) or self.record.suspect.test(c), (
                    f"cluster {c} differs, the record does not say so")


def test_dirty_tracking_and_resync_model(monkeypatch):
    monkeypatch.setattr(resync_mod, "WINDOW", 4 * CS)  # several windows per disk
    monkeypatch.setattr(resync_mod, "FLUSH_EVERY", 8 * CS)  # and flushes along the way
    run_state_machine_as_test(
        ResyncMachine, settings=settings(max_examples=40, stateful_step_count=25, **SETTINGS))
