"""The dirty record of a primary disk: which clusters may differ from the peer.

Design note
-----------
DRBD keeps an out-of-sync bitmap in RAM, writes it lazily, and makes it
crash-safe with an *activity log* of hot extents (research notes §1.1-1.2).
replfs does the same per disk:

* ``bits``: clusters known to differ from the peer (a write made while there
  was no peer, or whose copy to the peer failed).  Set rounding *outward* (a
  partly written cluster is dirty), cleared rounding *inward* (only a
  cluster a mirrored write or a resync copy covered whole is clean again).
* ``suspect``: clusters that *may* differ - after a crash, every cluster of
  the activity log's extents.  A resync compares their digests with the
  peer's and copies only those that differ (DRBD's csums), so a crash costs
  the bytes that really diverged, not the activity log's size.
* :class:`ActivityLog`: before a write lands in an extent (4 MiB) that is
  not hot, the set of hot extents is written to the metadata file and
  synced.  Writes into hot extents cost nothing extra; concurrent writes
  into cold extents share one transaction (group commit).  Up to
  ``capacity`` extents stay hot (default 896 = 3.5 GiB); the least recently
  used one without a write in flight (or waiting for it) is evicted, after
  the bitmap was persisted if it changed (an evicted extent is no longer
  covered by the log, so its bits must be on disk).  The set exceeds
  ``capacity`` only while every extent in it is busy, until the next
  transaction.
* persistence of the bits themselves is the controller's: at checkpoints,
  disconnects, evictions and clean exits (``persist``).  After a crash the
  persisted bits plus the log's extents (as suspects) cover every write that
  may not have reached the peer: each was either in a hot extent, or made
  before the bits were last persisted.

Costs: a write into a hot extent pays a dict lookup; into a cold one, one
4 KiB write + fdatasync of the metadata file (about 1 ms here), shared by
the writes that wait for the same transaction.  Memory: two bitmaps (2 MiB
each at 1 TiB and 64 KiB clusters) and the hot set.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import trio

from replfs.core import iothreads
from replfs.core.bitmap import ClusterBitmap

EXTENT_SIZE = 4 * 1024 * 1024
AL_CAPACITY = 896  # one 4 KiB log record holds about 1000 extents


class DirtyRecord:
    """Out-of-sync clusters of one disk (known and suspect)."""

    def __init__(self, size: int, cluster_size: int, bits: bytes | None = None) -> None:
        if cluster_size < 512 or cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster_size {cluster_size} is not a power of two >= 512")
        self.size = size
        self.cluster_size = cluster_size
        self._shift = cluster_size.bit_length() - 1
        self.nclusters = (size + cluster_size - 1) >> self._shift
        self.bits = (ClusterBitmap.from_bytes(self.nclusters, bits) if bits
                     else ClusterBitmap(self.nclusters))
        self.suspect = ClusterBitmap(self.nclusters)
        #: The bits changed since they were last persisted.
        self.changed = False
        #: Some cluster is dirty or suspect (a plain attribute: the mirror
        #: reads it on every write).
        self.nonempty = self.bits.count > 0
        #: Bumped by every mark: a resync clears what it copied only if no
        #: mark came between the copy and the peer's flush.
        self.marks = 0

    # -- ranges -------------------------------------------------------------------
    def outward(self, offset: int, length: int) -> tuple[int, int]:
        """Clusters that a byte range touches."""
        return offset >> self._shift, (offset + length + self.cluster_size - 1) >> self._shift

    def inward(self, offset: int, length: int) -> tuple[int, int]:
        """Clusters that a byte range covers whole (the last, short cluster of
        the disk counts as covered when the range reaches the end)."""
        c0 = (offset + self.cluster_size - 1) >> self._shift
        end = offset + length
        c1 = self.nclusters if end >= self.size else end >> self._shift
        return c0, max(c0, c1)

    def span(self, c0: int, c1: int) -> tuple[int, int]:
        """The byte range ``(offset, length)`` of clusters ``[c0, c1)``."""
        a = c0 << self._shift
        return a, min(c1 << self._shift, self.size) - a

    # -- marking ------------------------------------------------------------------
    def mark(self, offset: int, length: int) -> None:
        if length:
            c0, c1 = self.outward(offset, length)
            self.bits.set_range(c0, c1)
            self.changed = self.nonempty = True
            self.marks += 1

    def mark_all(self) -> None:
        self.bits.set_range(0, self.nclusters)
        self.changed = self.nonempty = True
        self.marks += 1

    def suspect_extents(self, extents, extent_size: int = EXTENT_SIZE) -> None:
        """After a crash: every cluster of these extents may differ."""
        for e in extents:
            a = e * extent_size
            if a < self.size:
                c0, c1 = self.outward(a, min(extent_size, self.size - a))
                self.suspect.set_range(c0, c1)
                self.nonempty = True

    def clear(self, c0: int, c1: int) -> None:
        """Clusters ``[c0, c1)`` are equal on both sides now."""
        if c1 > c0:
            self.bits.clear_range(c0, c1)
            self.suspect.clear_range(c0, c1)
            self.changed = True
            self.nonempty = bool(self.bits.count or self.suspect.count)

    def clear_covered(self, offset: int, length: int) -> None:
        """A write covering these bytes reached both sides."""
        c0, c1 = self.inward(offset, length)
        if c1 > c0 and (self.bits.any_set(c0, c1) or self.suspect.any_set(c0, c1)):
            self.clear(c0, c1)

    # -- questions ----------------------------------------------------------------
    @property
    def dirty_clusters(self) -> int:
        return self.bits.count

    @property
    def suspect_clusters(self) -> int:
        """Suspects that are not known dirty anyway."""
        if not self.suspect.count:
            return 0
        n = 0
        for s, e in self.suspect.set_runs():
            n += (e - s) - self.bits.count_range(s, e)
        return n

    @property
    def out_of_sync_bytes(self) -> int:
        """Bytes of the dirty and suspect clusters (the disk's short last
        cluster counts its real length)."""
        n = (self.dirty_clusters + self.suspect_clusters) * self.cluster_size
        short = (self.nclusters << self._shift) - self.size
        if n and short:
            last = self.nclusters - 1
            if self.bits.test(last) or self.suspect.test(last):
                n -= short
        return n

    def to_bytes(self) -> bytes:
        return self.bits.to_bytes()


class ActivityLog:
    """The hot extents of one disk, persisted before a write goes cold -> hot.

    ``write_al(extents)`` persists the hot set (the metadata file's call, run
    in an I/O thread); ``before_evict()`` is awaited before an extent leaves
    the set (the controller persists the bits there)."""

    def __init__(self, write_al, *, before_evict=None, extent_size: int = EXTENT_SIZE,
                 capacity: int = AL_CAPACITY, hot=()) -> None:
        self._write_al = write_al
        self._before_evict = before_evict
        self.extent_size = extent_size
        self._shift = extent_size.bit_length() - 1
        self.capacity = capacity
        self.hot: OrderedDict[int, int] = OrderedDict((e, 0) for e in hot)  # -> in flight
        self._committing: trio.Event | None = None
        self._waiting: Counter[int] = Counter()  # extents writers in begin() wait for
        self.transactions = 0
        self.evictions = 0

    def extents(self, offset: int, length: int) -> range:
        return range(offset >> self._shift, (offset + max(length, 1) - 1 >> self._shift) + 1)

    def try_begin(self, offset: int, length: int) -> bool:
        """The fast path of :meth:`begin`, without a coroutine: True (and the
        write counted) if every extent it touches is hot already."""
        e = offset >> self._shift
        if (offset + max(length, 1) - 1) >> self._shift == e:  # one extent: most writes
            hot = self.hot
            if e in hot:
                hot[e] += 1
                hot.move_to_end(e)
                return True
            return False
        return self._take(self.extents(offset, length))

    async def begin(self, offset: int, length: int) -> None:
        """Before a write of ``[offset, offset+length)`` reaches the image:
        returns once every extent it touches is durably in the log."""
        want = self.extents(offset, length)
        if self._take(want):
            return
        # Until it returns, the next transaction adds these extents (group
        # commit) and evicts none of them.
        waiting = self._waiting
        waiting.update(want)
        try:
            while not self._take(want):
                if self._committing is not None:
                    await self._committing.wait()
                else:
                    await self._commit()
        finally:
            waiting.subtract(want)
            for e in want:
                if not waiting[e]:
                    del waiting[e]

    def _take(self, want: range) -> bool:
        """Count a write into ``want`` if every extent of it is hot."""
        hot = self.hot
        if not all(e in hot for e in want):
            return False
        for e in want:
            hot[e] += 1
            hot.move_to_end(e)
        return True

    def end(self, offset: int, length: int) -> None:
        e = offset >> self._shift
        last = (offset + max(length, 1) - 1) >> self._shift
        if last == e:  # one extent: most writes
            self.hot[e] -= 1
            return
        for e in range(e, last + 1):
            self.hot[e] -= 1

    async def _commit(self) -> None:
        """One transaction: the hot set plus every extent waiting to go hot.
        ``hot`` holds only extents that are durably logged: an extent joins
        it after the write, and an evicted one leaves it before (so a writer
        into it waits for this transaction).  Never evicted: extents with
        writes in flight, and those a waiting writer wants (evicting one
        would only send that writer round again - for ever, if its write
        spans more extents than ``capacity``)."""
        done = self._committing = trio.Event()
        wanted = set(self._waiting)
        adding = {e for e in wanted if e not in self.hot}  # a hot one keeps its count
        try:
            over = len(self.hot) + len(adding) - self.capacity
            if over > 0:
                evict = [e for e, n in self.hot.items() if n == 0 and e not in wanted][:over]
                for e in evict:
                    del self.hot[e]
                    self.evictions += 1
                if evict and self._before_evict is not None:
                    await self._before_evict()  # the bits of the evicted, on disk first
            await iothreads.run(self._write_al, [*self.hot, *sorted(adding)])
            for e in sorted(adding):
                self.hot[e] = 0
            self.transactions += 1
        finally:
            self._committing = None
            done.set()

    async def clear(self) -> None:
        """Forget every extent without a write in flight (a clean exit, or
        all in sync and persisted).  A transaction like the others: it waits
        for the one under way (whose log it would otherwise race, dropping
        an extent just added), and writers into what it drops wait for it."""
        while self._committing is not None:
            await self._committing.wait()
        done = self._committing = trio.Event()
        try:
            for e in [e for e, n in self.hot.items() if n == 0]:
                del self.hot[e]
            await iothreads.run(self._write_al, list(self.hot))
        finally:
            self._committing = None
            done.set()

    def statistics(self) -> dict:
        return {"hot_extents": len(self.hot), "transactions": self.transactions,
                "evictions": self.evictions}
