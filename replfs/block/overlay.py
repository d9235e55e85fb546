"""A copy-on-write overlay: a sparse data file plus an in-memory bitmap.

Design note
-----------
The overlay is the size of its ``backing``.  Cluster ``i`` lives at offset
``i * cluster_size`` of the data file (identity mapping: no L1/L2 tables, and
the file stays sparse).  The bitmap (:class:`ClusterBitmap`) says which
clusters the overlay holds; the rest reads through to ``backing``.  The last
cluster is short when the size is not a cluster multiple.

Overlays are volatile by design (the bitmap lives in memory; after a crash
the content is gone anyway), so ``flush``/FUA do not fdatasync the data file
unless ``sync_data=True``.  The commit job (:mod:`replfs.jobs.commit`) does
flush the node it commits into.

Edges and ownership: ``children()`` is ``{"backing": backing}``.  The data
file is the overlay's own (it creates it from ``path``, truncating), not a
graph node, so ``close()`` closes it and nothing else.

Reads
  take the shared range lock on the touched clusters, then read each run of
  the bitmap from the data file or from ``backing`` (one request per run).

Writes (``write``, ``write_zeroes``, ``trim``)
  take the *exclusive* range lock on the touched clusters.  That is what keeps
  two concurrent partial writes to one unallocated cluster from losing each
  other's bytes (each would otherwise fill the rest of the cluster from
  ``backing``, over the other's data), and what keeps reads from seeing a
  half-filled cluster.  The lock is cheap when uncontended, and small I/O to
  the page cache never really suspends anyway.

  A request falls into three cases (nbdkit's cow filter names them so):

  * *unaligned head*: it starts inside a cluster the overlay does not hold;
    that cluster's bytes before the request come from ``backing``;
  * *aligned body*: whole clusters, and clusters the overlay already holds;
    nothing to read;
  * *unaligned tail*: it ends inside a cluster the overlay does not hold;
    that cluster's bytes after the request come from ``backing``.

  ``_span`` finds the head and tail (sync, no I/O), ``_backing_around``
  reads them (one read when both sit in one cluster).  ``write`` then does
  it all in one ``pwritev``: backing head + data + backing tail.
  ``write_zeroes``/``trim`` must read as zeroes, never revealing
  ``backing``: the head and tail clusters are written whole (backing +
  zeroes), the body is punched in the data file, and all of it is marked
  allocated.  Bits are set only after every byte is in the data file, so a
  failed write (ENOSPC on the overlay's storage) leaves the bitmap, hence
  the view of unallocated clusters, unchanged.

``copy_in(c0, c1)``
  the copy-before-write's primitive (:mod:`replfs.block.cbw`): every
  cluster in ``[c0, c1)`` not held yet gets ``backing``'s current content
  and its bit.  When both the backing and the data file are raw images it
  is one :meth:`RawImage.copy_from <replfs.block.raw.RawImage.copy_from>`
  per run of clusters (``copy_file_range``: no bytes through Python, no
  ``_span`` since whole clusters have no head or tail); otherwise read +
  write per run, at most ``COPY_CHUNK`` at a time.  A run's bits are set
  once its bytes are in, so a failure leaves the clusters it did not copy
  unheld.  Design note: the CBW used to call ``backing.read`` and then
  ``write`` per run (a 64 KiB bytes object, two lock round trips, the
  write's head/tail logic for an aligned request); this is one call.

``make_empty()``
  (``whole()``: exclusive on the whole disk) clears the bitmap (cost ~ dirty
  part of the bitmap).  Never proportional to the disk size.  The data file
  keeps its blocks (stale content nobody reads: every allocation writes its
  whole cluster), so the next epoch's copies overwrite allocated blocks
  instead of allocating new ones -- on ext4 here a fresh 1 MiB costs 2.4 ms,
  a rewrite 0.33 ms.  The file's space is the high-water mark of clusters
  ever held, as with QEMU's qcow2 overlays.  ``reclaim=True`` drops the
  blocks too (``ftruncate(0)`` and back, cost ~ what was allocated).

Whole-overlay jobs
  such as the commit (:mod:`replfs.jobs.commit`) hold ``whole()``, read what
  the overlay holds with ``allocated_ranges()`` and ``data``, and empty it
  with ``make_empty_held()`` before they let go: no request runs meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from replfs.block.base import BlockNode, Extent
from replfs.block.raw import RawImage
from replfs.core.bitmap import ClusterBitmap
from replfs.core.counters import Counters
from replfs.core.rangelock import RangeLock


#: ``copy_in`` through read + write moves at most this much at a time.
COPY_CHUNK = 4 * 1024 * 1024


class OverlayStats(Counters):
    # The commit job counts ``commits`` and ``bytes_committed``.
    __slots__ = ("reads", "writes", "zero_ops", "trims", "fills", "bytes_written",
                 "commits", "bytes_committed", "resets", "copies", "bytes_copied")


class Overlay(BlockNode):
    def __init__(
        self,
        path: str | os.PathLike,
        backing: BlockNode,
        *,
        cluster_size: int = 65536,
        name: str | None = None,
        sync_data: bool = False,
        reclaim: bool = False,
        bitmap: bytes | None = None,
    ):
        """``bitmap``: reopen an existing overlay (its data file as it is and
        the bits :meth:`save` wrote) instead of creating an empty one."""
        if cluster_size < 512 or cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster_size {cluster_size} is not a power of two >= 512")
        self.path = os.fspath(path)
        self.name = name or os.path.basename(self.path) or "overlay"
        self.backing = backing
        self.size = backing.size
        self.cluster_size = cluster_size
        self._shift = cluster_size.bit_length() - 1
        self.nclusters = (self.size + cluster_size - 1) >> self._shift
        self.sync_data = sync_data
        self.reclaim = reclaim
        if bitmap is None:
            self.data = RawImage.create(self.path, self.size, name=f"{self.name}.data")
            self.bitmap = ClusterBitmap(self.nclusters)
        else:
            self.data = RawImage(self.path, name=f"{self.name}.data")
            if self.data.size != self.size:
                self.data.close()
                raise ValueError(f"{self.path}: {self.data.size} bytes, expected {self.size}")
            self.bitmap = ClusterBitmap.from_bytes(self.nclusters, bitmap)
        self.lock = RangeLock(self.name)
        self.stats = OverlayStats()
        # copy_in: raw to raw (copy_file_range), or through the nodes.
        self._raw_backing = type(backing) is RawImage

    # -- geometry ---------------------------------------------------------------
    def clusters(self, offset: int, length: int) -> tuple[int, int]:
        """Clusters ``[c0, c1)`` touched by a byte range."""
        return offset >> self._shift, (offset + length + self.cluster_size - 1) >> self._shift

    def _cend(self, c: int) -> int:
        return min((c + 1) << self._shift, self.size)

    @property
    def allocated_bytes(self) -> int:
        n = self.bitmap.count << self._shift
        if self.nclusters and self.bitmap.test(self.nclusters - 1):
            n -= (self.nclusters << self._shift) - self.size
        return n

    def is_allocated(self, offset: int, length: int) -> bool:
        """Does the overlay hold every cluster touched by the range?"""
        c0, c1 = self.clusters(offset, length)
        return self.bitmap.all_set(c0, c1)

    def allocated_ranges(self) -> Iterator[tuple[int, int]]:
        """Byte ranges ``[a, b)`` the overlay holds, in order.  Hold
        ``whole()`` while iterating, or the bitmap may change under you."""
        shift, size = self._shift, self.size
        for s, e in self.bitmap.set_runs():
            yield s << shift, min(e << shift, size)

    # -- reads --------------------------------------------------------------------
    def _holder(self, c0: int, c1: int) -> BlockNode | None:
        """Who holds all of clusters ``[c0, c1)``: the backing (none is
        allocated), the data file (all are), or None (some are)."""
        bm = self.bitmap
        first_set = bm.next_set(c0, c1)
        if first_set == c1:
            return self.backing
        if first_set == c0 and bm.next_clear(c0, c1) == c1:
            return self.data
        return None

    async def _read(self, offset: int, length: int) -> bytes:
        c0, c1 = self.clusters(offset, length)
        lock = self.lock  # no context manager: every view read passes here twice
        req = lock.try_acquire(c0, c1, False) or await lock.acquire(c0, c1, False)
        try:
            node = self._holder(c0, c1)
            if node is not None:
                data = await node.read(offset, length)
            else:
                end = offset + length
                parts = []
                for s, e, allocated in self.bitmap.runs(c0, c1):
                    a = max(offset, s << self._shift)
                    b = min(end, e << self._shift)
                    node = self.data if allocated else self.backing
                    parts.append(await node.read(a, b - a))
                data = b"".join(parts)
        finally:
            lock.release(req)
        self.stats.reads += 1
        return data

    def read_now(self, offset: int, length: int) -> bytes | None:
        """:meth:`_read` without waiting: a range held wholly in the data
        file or wholly in the backing, the lock free; else None."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        c0, c1 = self.clusters(offset, length)
        lock = self.lock
        req = lock.try_acquire(c0, c1, False)
        if req is None:
            return None
        try:
            node = self._holder(c0, c1)
            if node is None:
                return None
            data = node.read_now(offset, length)
        finally:
            lock.release(req)
        if data is not None:
            self.stats.reads += 1
        return data

    # -- writes: unaligned head, aligned body, unaligned tail -------------------------
    def _span(self, offset: int, end: int, c0: int, c1: int) -> tuple[int, int]:
        """What a write of ``[offset, end)`` must put in the data file:
        ``[a, b)``, where ``a < offset`` if there is an unaligned head (cluster
        c0 not held: ``a`` is its start) and ``b > end`` if there is an
        unaligned tail (cluster c1-1 not held: ``b`` is its end)."""
        a = c0 << self._shift
        if a == offset or self.bitmap.test(c0):
            a = offset
        b = min(c1 << self._shift, self.size)
        if b == end or self.bitmap.test(c1 - 1):
            b = end
        return a, b

    async def _backing_around(self, a: int, offset: int, end: int, b: int) -> tuple[bytes, bytes]:
        """``backing``'s ``[a, offset)`` and ``[end, b)`` (head and tail, either
        may be empty); one read when both lie in one cluster."""
        if a < offset and end < b and b - a <= self.cluster_size:
            whole = await self.backing.read(a, b - a)
            return whole[: offset - a], whole[end - a :]
        head = await self.backing.read(a, offset - a) if a < offset else b""
        tail = await self.backing.read(end, b - end) if end < b else b""
        return head, tail

    async def _write(self, offset: int, data, fua: bool) -> None:
        mv = memoryview(data).cast("B")
        length = len(mv)
        end = offset + length
        c0, c1 = self.clusters(offset, length)
        lock = self.lock
        req = lock.try_acquire(c0, c1, True) or await lock.acquire(c0, c1, True)
        try:
            a, b = self._span(offset, end, c0, c1)
            if a == offset and b == end:  # aligned body only
                await self.data.write(offset, mv, fua and self.sync_data)
            else:  # and an unaligned head or tail: backing + data + backing
                head, tail = await self._backing_around(a, offset, end, b)
                self.stats.fills += 1
                bufs = [x for x in (head, mv, tail) if len(x)]
                await self.data.writev(a, bufs, fua and self.sync_data)
            self.bitmap.set_range(c0, c1)
        finally:
            lock.release(req)
        self.stats.writes += 1
        self.stats.bytes_written += length

    async def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        c0, c1 = self.clusters(offset, length)
        async with self.lock.exclusive(c0, c1):
            a, b = self._span(offset, end, c0, c1)
            zstart, zend = offset, end  # what is left to punch
            if a < offset or end < b:
                head, tail = await self._backing_around(a, offset, end, b)
                if head and tail and c1 - c0 == 1:
                    # Head and tail in one cluster: backing + zeroes + backing.
                    await self.data.writev(a, [head, bytes(length), tail])
                    zstart = zend
                    self.stats.fills += 1
                else:
                    if head:  # unaligned head: cluster c0 whole, backing + zeroes
                        zstart = self._cend(c0)
                        await self.data.writev(a, [head, bytes(zstart - offset)])
                        self.stats.fills += 1
                    if tail:  # unaligned tail: cluster c1-1 whole, zeroes + backing
                        zend = (c1 - 1) << self._shift
                        await self.data.writev(zend, [bytes(end - zend), tail])
                        self.stats.fills += 1
            if zstart < zend:  # aligned body, and partial clusters already held
                await self.data.write_zeroes(zstart, zend - zstart)
            self.bitmap.set_range(c0, c1)

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._zero(offset, length)
        if fua and self.sync_data:
            await self.data.flush()
        self.stats.zero_ops += 1

    async def _trim(self, offset: int, length: int) -> None:
        await self._zero(offset, length)
        self.stats.trims += 1

    # -- copy-before-write -------------------------------------------------------------
    async def copy_in(self, c0: int, c1: int) -> int:
        """Hold clusters ``[c0, c1)``: copy ``backing``'s content of each one
        not held yet (see the module's note).  Returns the bytes copied."""
        bm = self.bitmap
        if c1 - c0 == 1 and bm.test(c0):  # the common "already held"
            return 0
        lock = self.lock
        req = lock.try_acquire(c0, c1, True) or await lock.acquire(c0, c1, True)
        try:
            copied = 0
            shift, size = self._shift, self.size
            # One cluster (the usual case) needs no run iterator.
            runs = ((c0, c1, bm.test(c0)),) if c1 - c0 == 1 else bm.runs(c0, c1)
            for s, e, held in runs:
                if held:
                    continue
                x, y = s << shift, min(e << shift, size)
                if self._raw_backing:
                    await self.data.copy_from(self.backing, x, y - x)
                else:
                    a = x
                    while a < y:
                        n = min(COPY_CHUNK, y - a)
                        await self.data.write(a, await self.backing.read(a, n))
                        a += n
                bm.set_range(s, e)
                copied += y - x
                self.stats.copies += 1
                self.stats.bytes_copied += y - x
            return copied
        finally:
            lock.release(req)

    async def flush(self) -> None:
        if self.sync_data:
            await self.data.flush()

    # -- metadata ------------------------------------------------------------------
    def _allocation(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        c0, c1 = self.clusters(offset, length)
        out = []
        for s, e, allocated in self.bitmap.runs(c0, c1):
            a = max(offset, s << self._shift)
            b = min(end, e << self._shift)
            out.append(Extent(a, b - a, allocated))
        return out

    # -- whole-overlay operations ----------------------------------------------------
    def whole(self):
        """The exclusive range lock on every cluster (``async with``): no
        request runs while it is held."""
        return self.lock.exclusive(0, max(self.nclusters, 1))

    async def make_empty(self) -> None:
        """Forget every cluster: the overlay reads as ``backing`` again."""
        async with self.whole():
            await self.make_empty_held()

    async def make_empty_held(self) -> None:
        """``make_empty`` for a caller that holds ``whole()`` already."""
        if not self.bitmap.count:
            return
        # Bits first: even if dropping the blocks fails, the view is right.
        self.bitmap.clear_all()
        self.stats.resets += 1
        if self.reclaim:
            await self.data.discard_all()

    async def save(self) -> bytes:
        """Make the data file durable and return the bits that describe it:
        with them the overlay can be reopened as it is now (``bitmap=``).
        The caller holds ``whole()`` or otherwise keeps writes out."""
        await self.data.flush()
        return self.bitmap.to_bytes()

    # -- graph -----------------------------------------------------------------------
    def children(self) -> dict[str, BlockNode]:
        return {"backing": self.backing}

    def close(self) -> None:
        self.data.close()

    def statistics(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "cluster_size": self.cluster_size,
            "clusters_allocated": self.bitmap.count,
            "allocated_bytes": self.allocated_bytes,
            **self.stats.as_dict(),
        }
