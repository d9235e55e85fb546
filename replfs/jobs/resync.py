"""Resync: bring the peer level with the local image, while the VM writes.

Design note
-----------
The job walks each disk's dirty record (:mod:`replfs.block.dirty`) in
windows of up to ``WINDOW`` bytes of clusters, a few windows at a time:

* a window is copied under the mirror's range lock (``Mirror.order``), the
  lock every VM write holds on its range while it goes to both sides.  So a
  copy and a write to the same bytes are never in flight together, and a
  copy never overwrites a newer write: either the write came first (the copy
  reads its data) or it waits and goes to the peer after the copy (DRBD
  orders resync and application I/O per region the same way);
* *known dirty* clusters are read from the local image and written to the
  peer; *suspect* clusters (after a crash) are compared first: local and
  remote digests (``digests``, the peer's answer over the control channel),
  and only those that differ are sent.  Without ``digests`` (a plain NBD
  peer) suspects are copied;
* bits are cleared only after a FLUSH of the peer covered the copies (every
  ``FLUSH_EVERY`` bytes and at the end), so a peer that loses its page cache
  cannot leave a cluster marked clean that it does not hold.  Nor are they
  if the record was marked since the copy (a VM write into the cluster
  that the peer failed: the copy is older than the local data), or if the
  mirror's peer is no longer the one the copies went to;
* new writes keep mirroring meanwhile; one that covers a dirty cluster whole
  clears it (the mirror does that), so the job skips it;
* ``rate`` (bytes/s) caps what is sent, a token bucket; without it the job
  runs as fast as the peer takes it.  A window's tokens are taken before its
  range lock (for what the record holds there then; the difference with
  what was sent is settled after), so a VM write never waits for the
  bucket.  The VM's writes compete for the same range locks window by
  window, and the lock is fair, so neither starves.

Progress (``SyncProgress``) is readable while the job runs: total, done
(clusters handled, sent or found equal), sent, rate and ETA.
"""

from __future__ import annotations

import errno
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from replfs.block.dirty import DirtyRecord
from replfs.block.mirror import Mirror
from replfs.core.digest import cluster_digests
from replfs.errors import BlockError

#: Larger windows mean fewer, larger NBD writes: per request the secondary
#: pays Python and copy-before-write overhead.  Measured on 1 GiB here
#: (scripts/bench_resync.py): 1 MiB x 4 workers 0.7x nbdcopy's rate into the
#: same server, 512 KiB x 16 0.7-0.8x, 2 MiB x 8 1.0x.  A VM write into a
#: window being copied waits for that one copy (a few ms).
WINDOW = 2 * 1024 * 1024
FLUSH_EVERY = 256 * 1024 * 1024
WORKERS = 8

#: ``digests(disk_name, offset, length)``: the peer's cluster digests.
DigestFn = Callable[[str, int, int], Awaitable[list[int]]]


@dataclass
class SyncProgress:
    total_bytes: int = 0
    done_bytes: int = 0
    sent_bytes: int = 0
    equal_bytes: int = 0
    started: float = 0.0
    _samples: list = field(default_factory=list)  # (time, done) for the rate

    def note(self, now: float) -> None:
        self._samples.append((now, self.done_bytes))
        while len(self._samples) > 2 and now - self._samples[0][0] > 10.0:
            del self._samples[0]

    def rate(self, now: float) -> float:
        """Bytes per second over the last 10 s (since the start before that)."""
        if not self._samples:
            return 0.0
        t0, d0 = self._samples[0] if len(self._samples) > 1 else (self.started, 0)
        return (self.done_bytes - d0) / (now - t0) if now > t0 else 0.0

    def status(self, now: float) -> dict:
        rate = self.rate(now)
        left = max(0, self.total_bytes - self.done_bytes)
        return {
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "sent_bytes": self.sent_bytes,
            "rate_bytes_per_s": round(rate),
            "eta_s": round(left / rate, 1) if rate > 0 else None,
        }


class TokenBucket:
    """``rate`` bytes per second, bursts up to one second's worth."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._level = rate or 0.0
        self._last = trio.current_time()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        now = trio.current_time()
        self._level = min(self.rate, self._level + (now - self._last) * self.rate)
        self._last = now
        self._level -= n
        if self._level < 0:
            await trio.sleep(-self._level / self.rate)

    def settle(self, n: int) -> None:
        """Charge ``n`` more bytes (give ``-n`` back) without waiting."""
        if self.rate:
            self._level = min(self.rate, self._level - n)


class _Disk:
    """One disk's walk: windows to do, copies waiting for a flush."""

    def __init__(self, name: str, mirror: Mirror, record: DirtyRecord) -> None:
        self.name = name
        self.mirror = mirror
        self.record = record
        self.window = max(1, WINDOW // record.cluster_size)
        self.next = 0
        self.target = mirror.peer  # where the copies go
        #: Copied runs ``(c0, c1, record.marks then)``, until a flush.
        self.unflushed: list[tuple[int, int, int]] = []
        self.unflushed_bytes = 0

    def take_window(self) -> tuple[int, int] | None:
        """The next window holding a dirty or suspect cluster, or None."""
        rec = self.record
        w = next_window(self.next, rec.nclusters, self.window, rec.bits, rec.suspect)
        self.next = w[1] if w is not None else rec.nclusters
        return w

    def peer(self):
        peer = self.mirror.peer
        if peer is None or peer is not self.target:
            raise BlockError(errno.ENOTCONN, f"{self.name}: the secondary is gone")
        return peer


async def resync(disks: Sequence[tuple[str, Mirror, DirtyRecord]], *,
                 digests: DigestFn | None = None, rate: float | None = None,
                 progress: SyncProgress | None = None, workers: int = WORKERS) -> SyncProgress:
    """Copy every dirty (and differing suspect) cluster of ``disks`` to their
    mirrors' peers; return when every record is empty."""
    progress = progress or SyncProgress()
    progress.started = trio.current_time()
    progress.total_bytes = sum(rec.out_of_sync_bytes for _, _, rec in disks)
    bucket = TokenBucket(rate)
    for name, mirror, rec in disks:
        while rec.bits.count or rec.suspect.count:  # until nothing is left
            d = _Disk(name, mirror, rec)
            failures: list[Exception] = []
            async with trio.open_nursery() as nursery:
                for _ in range(workers):
                    nursery.start_soon(_guarded, d, digests, bucket, progress, failures,
                                       nursery.cancel_scope)
            if failures:  # the first, as itself (not wrapped in an exception group)
                raise failures[0]
            await _flush(d)
    progress.note(trio.current_time())
    return progress


async def _guarded(d: _Disk, digests, bucket, progress, failures: list,
                   scope: trio.CancelScope) -> None:
    try:
        await _worker(d, digests, bucket, progress)
    except Exception as exc:
        failures.append(exc)
        scope.cancel()


async def _worker(d: _Disk, digests: DigestFn | None, bucket: TokenBucket,
                  progress: SyncProgress) -> None:
    while (w := d.take_window()) is not None:
        await _window(d, *w, digests, bucket, progress)
        if d.unflushed_bytes >= FLUSH_EVERY:
            await _flush(d)


async def _window(d: _Disk, c0: int, c1: int, digests: DigestFn | None,
                  bucket: TokenBucket, progress: SyncProgress) -> None:
    rec, mirror = d.record, d.mirror
    offset, length = rec.span(c0, c1)
    guess = min(length, rec.cluster_size * (rec.bits.count_range(c0, c1)
                                            + rec.suspect.count_range(c0, c1)))
    await bucket.take(guess)  # outside the lock: VM writes never wait for it
    sent = 0
    async with mirror.order.exclusive(offset, offset + length):
        marks = rec.marks  # no VM write into the window until the lock is let go
        todo = [c for c in range(c0, c1) if rec.bits.test(c)]
        suspects = [c for c in range(c0, c1) if rec.suspect.test(c) and not rec.bits.test(c)]
        handled = _nbytes(rec, todo) + _nbytes(rec, suspects)
        if suspects and digests is not None:
            local = cluster_digests(await mirror.local.read(offset, length), rec.cluster_size)
            remote = await digests(d.name, offset, length)
            for c in suspects:
                if local[c - c0] == remote[c - c0]:
                    rec.clear(c, c + 1)  # equal: nothing to flush for it
                    progress.equal_bytes += rec.span(c, c + 1)[1]
                else:
                    todo.append(c)
            todo.sort()
        else:
            todo = sorted(todo + suspects)
        for a, b in _runs(todo):
            off, n = rec.span(a, b)
            data = await mirror.local.read(off, n)
            await d.peer().write(off, data)
            sent += n
            progress.sent_bytes += n
            d.unflushed.append((a, b, marks))
            d.unflushed_bytes += n
    bucket.settle(sent - guess)
    progress.done_bytes += handled
    progress.note(trio.current_time())


async def _flush(d: _Disk) -> None:
    """FLUSH the peer, then mark what it now holds as in sync: the copies
    after which no mark came (a later round copies the others again)."""
    if not d.unflushed:
        return
    done, d.unflushed, d.unflushed_bytes = d.unflushed, [], 0
    await d.peer().flush()
    d.peer()  # still the peer that took the copies and the flush
    marks = d.record.marks
    for a, b, copied_at in done:
        if copied_at == marks:
            d.record.clear(a, b)


def _nbytes(rec: DirtyRecord, clusters: list[int]) -> int:
    """Bytes of these (sorted) clusters; the disk's last one may be short."""
    return sum(rec.span(a, b)[1] for a, b in _runs(clusters))


def next_window(start: int, n: int, window: int, *bitmaps) -> tuple[int, int] | None:
    """``window`` clusters (fewer at the end) from the first bit at or after
    ``start`` set in any of ``bitmaps``; None if none is set below ``n``."""
    if start >= n:
        return None
    a = min(bm.next_set(start, n) for bm in bitmaps)
    return (a, min(a + window, n)) if a < n else None


def _runs(clusters: list[int]):
    """Sorted cluster numbers as ``(start, end)`` runs."""
    start = prev = None
    for c in clusters:
        if start is None:
            start = prev = c
        elif c == prev + 1:
            prev = c
        else:
            yield start, prev + 1
            start = prev = c
    if start is not None:
        yield start, prev + 1
