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
  copy clusters for the whole copy + disk write.  The copy reads the old
  content of every not-yet-copied run (whole target clusters, one request
  per run, at most 4 MiB each) from ``disk`` and writes it into ``target``.
  If that fails (ENOSPC in the overlay's storage, EIO...) the error is
  raised and ``disk`` is NOT written: the snapshot stays intact.
* ``read`` (the disk itself) and ``snapshot.read`` hold the shared lock.
  So a snapshot read overlapping a copy in progress waits for it, then reads
  the copied old data: the view never shows new data before its copy.

``checkpoint()`` takes the exclusive lock on everything (waits for in-flight
writes) and empties ``target``: every cluster is re-armed, snapshot == disk.

``refuse_writes(err, reason)`` makes every later write (including those
already waiting for the lock) fail with ``BlockError(err, reason)``;
failover uses ESHUTDOWN.  ``drain()`` waits for the writes in flight.

Lock order across layers is active overlay -> CBW -> hidden overlay, never
the reverse, so the stack cannot deadlock.
"""

from __future__ import annotations

import errno

from replfs.block.base import BlockNode, Extent
from replfs.block.overlay import Overlay
from replfs.block.rangelock import RangeLock
from replfs.errors import BlockError

COPY_CHUNK = 4 * 1024 * 1024


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
        self.lock = RangeLock(self.name)
        self._refused: BlockError | None = None
        self._snapshot = _Snapshot(self)
        self.stats = {
            "writes": 0,
            "zero_ops": 0,
            "trims": 0,
            "bytes_written": 0,
            "clusters_copied": 0,
            "bytes_copied": 0,
            "copy_errors": 0,
            "refused": 0,
            "checkpoints": 0,
        }

    @property
    def snapshot(self) -> BlockNode:
        return self._snapshot

    def clusters(self, offset: int, length: int) -> tuple[int, int]:
        return offset >> self._shift, (offset + length + self.cluster_size - 1) >> self._shift

    # -- write gate -------------------------------------------------------------------
    def refuse_writes(self, err: int, reason: str) -> None:
        self._refused = BlockError(err, reason)

    def allow_writes(self) -> None:
        self._refused = None

    @property
    def writes_refused(self) -> bool:
        return self._refused is not None

    def _gate(self) -> None:
        if self._refused is not None:
            self.stats["refused"] += 1
            raise BlockError(self._refused.errno, str(self._refused))

    async def drain(self) -> None:
        """Wait until no write holds or waits for the lock."""
        async with self.lock.exclusive(0, max(self.nclusters, 1)):
            pass

    # -- the copy ----------------------------------------------------------------------
    async def _copy_old(self, c0: int, c1: int) -> None:
        """Copy every not-yet-copied target cluster inside copy clusters
        ``[c0, c1)`` from disk into target.  Caller holds the exclusive lock."""
        target = self.target
        tshift = target._shift
        a = c0 << self._shift
        b = min(c1 << self._shift, self.size)
        t0, t1 = a >> tshift, (b + target.cluster_size - 1) >> tshift
        bm = target.bitmap
        if bm.all_set(t0, t1):
            return
        try:
            for s, e, copied in bm.runs(t0, t1):
                if copied:
                    continue
                x, y = s << tshift, min(e << tshift, self.size)
                while x < y:
                    n = min(COPY_CHUNK, y - x)
                    await target.write(x, await self.disk.read(x, n))
                    x += n
                self.stats["clusters_copied"] += e - s
                self.stats["bytes_copied"] += y - (s << tshift)
        except BlockError:
            self.stats["copy_errors"] += 1
            raise

    async def _guarded(self, offset: int, length: int, apply) -> None:
        self._gate()
        self.check_write(offset, length)
        if not length:
            return
        c0, c1 = self.clusters(offset, length)
        async with self.lock.exclusive(c0, c1):
            self._gate()  # refused while we waited?
            await self._copy_old(c0, c1)
            await apply()

    # -- BlockNode ---------------------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        self.check_read(offset, length)
        if not length:
            return b""
        c0, c1 = self.clusters(offset, length)
        async with self.lock.shared(c0, c1):
            return await self.disk.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        mv = memoryview(data).cast("B")
        await self._guarded(offset, len(mv), lambda: self.disk.write(offset, mv, fua))
        self.stats["writes"] += 1
        self.stats["bytes_written"] += len(mv)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        await self._guarded(offset, length, lambda: self.disk.write_zeroes(offset, length, fua))
        self.stats["zero_ops"] += 1

    async def trim(self, offset: int, length: int) -> None:
        await self._guarded(offset, length, lambda: self.disk.trim(offset, length))
        self.stats["trims"] += 1

    async def flush(self) -> None:
        await self.disk.flush()

    def allocation(self, offset: int, length: int) -> list[Extent]:
        return self.disk.allocation(offset, length)

    # -- epochs ------------------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Re-arm every cluster: afterwards snapshot == disk."""
        async with self.lock.exclusive(0, max(self.nclusters, 1)):
            await self.target.make_empty()
        self.stats["checkpoints"] += 1

    def statistics(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "writes_refused": self.writes_refused,
            "clusters_held": self.target.bitmap.count,
            **self.stats,
        }


class _Snapshot(BlockNode):
    """Read-only: target-if-copied-else-disk, consistent with in-flight copies."""

    def __init__(self, cbw: CopyBeforeWrite):
        self._cbw = cbw
        self.size = cbw.size
        self.name = f"{cbw.name}.snapshot"

    def _ro(self) -> BlockError:
        return BlockError(errno.EPERM, f"{self.name}: the snapshot view is read-only")

    async def read(self, offset: int, length: int) -> bytes:
        self.check_read(offset, length)
        if not length:
            return b""
        cbw = self._cbw
        c0, c1 = cbw.clusters(offset, length)
        async with cbw.lock.shared(c0, c1):
            return await cbw.target.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        raise self._ro()

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        raise self._ro()

    async def trim(self, offset: int, length: int) -> None:
        raise self._ro()

    async def flush(self) -> None:
        pass
