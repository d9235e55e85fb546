"""Copy-before-write: keep a point-in-time view of a disk that keeps changing.

Design note
-----------
``CopyBeforeWrite(disk, target)`` is the node the NBD server exports on the
secondary: the primary's writes land in ``disk``, but before any write
reaches a cluster for the first time this epoch, the cluster's old content is
copied into ``target`` (the *hidden* overlay, whose ``backing`` must be
``disk``).  ``target``'s bitmap doubles as the "already copied" bitmap.

``snapshot`` is a read-only node showing ``target``-if-copied-else-``disk``,
i.e. exactly what ``target.read`` returns: the disk as it was at the last
checkpoint.  The secondary VM's active overlay sits on it.

Locking, in *copy clusters* (``cluster_size``, a multiple of the target's
cluster size, default equal):

* ``write``/``write_zeroes``/``trim`` hold the exclusive lock on the touched
  copy clusters for the whole copy + disk write.  The copy puts the old
  content of every not-yet-copied run (whole target clusters) into
  ``target`` with :meth:`Overlay.copy_in <replfs.block.overlay.Overlay.copy_in>`.
  If that fails (ENOSPC in the overlay's storage, EIO...) the error is
  raised and ``disk`` is NOT written: the snapshot stays intact.  The copy
  is needed even when the write covers whole clusters: hidden must hold
  what the write replaces.
* ``read`` (the disk itself) and ``snapshot.read`` hold the shared lock.
  So a snapshot read overlapping a copy in progress waits for it, then reads
  the copied old data: the view never shows new data before its copy.

``checkpoint()`` takes the exclusive lock on everything (waits for in-flight
writes) and empties ``target``: every cluster is re-armed, snapshot == disk.

The CBW neither refuses writes nor drains: the gated node in front of it
(:mod:`replfs.block.gated`, the one quiesce mechanism) does both.

Lock order across layers is active overlay -> CBW -> hidden overlay, never
the reverse, so the stack cannot deadlock.

The cost per request (issue 13; measured with ``scripts/bench_cbw.py``):
a 4 KiB write that copies its 64 KiB cluster took 38 us (median) of the
trio thread's time with everything in the page cache, three quarters of it
the copy; now 27 us, 70 % of it the ``copy_file_range`` syscall itself
(py-spy).  So: the copy is one ``copy_file_range`` from the disk's file to the
hidden file at the same offset when both are raw images (no 64 KiB bytes
object, no second pass through the overlay's write path); the already-
copied test is one bit test before anything else; the range locks are
taken with ``try_acquire`` (no guard object, no coroutine frames) and only
awaited when contended.  With a cold page cache the copy's cost is the
disk read of the old cluster (~60-130 us here), which no CPU saving
removes: QEMU's backup pays the same read.

Edges (QEMU's copy-before-write names them so): ``file`` is ``disk``,
``target`` the hidden overlay; the snapshot's ``file`` is the CBW.  The CBW
opens nothing itself, so ``close()`` has nothing to do.
"""

from __future__ import annotations

import errno

from replfs.block.base import BlockNode, Extent, nbytes
from replfs.block.overlay import Overlay
from replfs.core.counters import Counters
from replfs.core.rangelock import RangeLock
from replfs.errors import BlockError


class CbwStats(Counters):
    __slots__ = ("writes", "zero_ops", "trims", "bytes_written", "clusters_copied",
                 "bytes_copied", "copy_errors", "checkpoints")


class CopyBeforeWrite(BlockNode):
    def __init__(
        self,
        disk: BlockNode,
        target: Overlay,
        *,
        cluster_size: int | None = None,
        name: str | None = None,
    ):
        if target.backing is not disk:
            raise ValueError("the target overlay's backing must be the CBW's disk")
        cs = target.cluster_size if cluster_size is None else cluster_size
        if cs < target.cluster_size or cs % target.cluster_size or cs & (cs - 1):
            raise ValueError(
                f"cluster_size {cs} must be a power-of-two multiple of the target's "
                f"({target.cluster_size})"
            )
        self.disk = disk
        self.target = target
        self.size = disk.size
        self.name = name or f"cbw({disk.name})"
        self.cluster_size = cs
        self._shift = cs.bit_length() - 1
        self.nclusters = (self.size + cs - 1) >> self._shift
        #: copy cluster c covers target clusters [c << _tk, (c + 1) << _tk)
        self._tk = self._shift - target._shift
        self.lock = RangeLock(self.name)
        self._snapshot = _Snapshot(self)
        self.stats = CbwStats()

    @property
    def snapshot(self) -> BlockNode:
        return self._snapshot

    def clusters(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self._shift, (offset + length + self.cluster_size - 1) >> self._shift

    # -- the copy ----------------------------------------------------------------------
    async def _copy_old(self, c0: int, c1: int) -> None:
        """Copy every not-yet-copied target cluster inside copy clusters
        ``[c0, c1)`` from disk into target.  Caller holds the exclusive lock."""
        target = self.target
        t0, t1 = c0 << self._tk, min(c1 << self._tk, target.nclusters)
        bm, ts = target.bitmap, target.stats
        held, copied = bm.count, ts.bytes_copied
        try:
            await target.copy_in(t0, t1)
        except BlockError:
            self.stats.copy_errors += 1
            raise
        finally:  # what was copied, also when a later run failed
            self.stats.clusters_copied += bm.count - held
            self.stats.bytes_copied += ts.bytes_copied - copied

    def _copied(self, c0: int, c1: int) -> bool:
        """Does target hold every cluster of copy clusters ``[c0, c1)``?"""
        tk, bm = self._tk, self.target.bitmap
        if c1 - c0 == 1 and not tk:
            return bm.test(c0)
        return bm.all_set(c0 << tk, min(c1 << tk, self.target.nclusters))

    async def _modify(self, op, offset: int, length: int, *args) -> None:
        """Under the exclusive lock on the clusters of ``[offset,
        offset+length)``: copy their old content, then ``op(offset, *args)``
        (the disk's write, write_zeroes or trim)."""
        shift = self._shift
        c0, c1 = offset >> shift, (offset + length + self.cluster_size - 1) >> shift
        lock = self.lock
        req = lock.try_acquire(c0, c1, True) or await lock.acquire(c0, c1, True)
        try:
            if not self._copied(c0, c1):
                await self._copy_old(c0, c1)
            await op(offset, *args)
        finally:
            lock.release(req)

    # -- BlockNode ---------------------------------------------------------------------
    async def _read(self, offset: int, length: int) -> bytes:
        c0, c1 = self.clusters(offset, length)
        lock = self.lock
        req = lock.try_acquire(c0, c1, False) or await lock.acquire(c0, c1, False)
        try:
            return await self.disk.read(offset, length)
        finally:
            lock.release(req)

    async def _write(self, offset: int, data, fua: bool) -> None:
        length = nbytes(data)
        await self._modify(self.disk.write, offset, length, data, fua)
        self.stats.writes += 1
        self.stats.bytes_written += length

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._modify(self.disk.write_zeroes, offset, length, length, fua)
        self.stats.zero_ops += 1

    async def _trim(self, offset: int, length: int) -> None:
        await self._modify(self.disk.trim, offset, length, length)
        self.stats.trims += 1

    async def flush(self) -> None:
        await self.disk.flush()

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        return self.disk.allocation(offset, length)

    def children(self) -> dict[str, BlockNode]:
        return {"file": self.disk, "target": self.target}

    # -- epochs ------------------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Re-arm every cluster: afterwards snapshot == disk."""
        async with self.lock.exclusive(0, max(self.nclusters, 1)):
            await self.target.make_empty()
        self.stats.checkpoints += 1

    def statistics(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "clusters_held": self.target.bitmap.count,
            **self.stats.as_dict(),
        }


class _Snapshot(BlockNode):
    """Read-only: target-if-copied-else-disk, consistent with in-flight copies."""

    def __init__(self, cbw: CopyBeforeWrite):
        self._cbw = cbw
        self.size = cbw.size
        self.name = f"{cbw.name}.snapshot"

    def _ro(self) -> BlockError:
        return BlockError(errno.EPERM, f"{self.name}: the snapshot view is read-only")

    async def _read(self, offset: int, length: int) -> bytes:
        cbw = self._cbw
        c0, c1 = cbw.clusters(offset, length)
        lock = cbw.lock
        req = lock.try_acquire(c0, c1, False) or await lock.acquire(c0, c1, False)
        try:
            return await cbw.target.read(offset, length)
        finally:
            lock.release(req)

    def read_now(self, offset: int, length: int) -> bytes | None:
        cbw = self._cbw
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        c0, c1 = cbw.clusters(offset, length)
        lock = cbw.lock
        req = lock.try_acquire(c0, c1, False)
        if req is None:  # a copy-before-write is in progress there
            return None
        try:
            return cbw.target.read_now(offset, length)
        finally:
            lock.release(req)

    async def _write(self, offset: int, data, fua: bool) -> None:
        raise self._ro()

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        raise self._ro()

    async def _trim(self, offset: int, length: int) -> None:
        raise self._ro()

    async def flush(self) -> None:
        pass

    def children(self) -> dict[str, BlockNode]:
        return {"file": self._cbw}
