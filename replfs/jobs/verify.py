"""Online verify: compare every cluster of each disk with the peer while the
VM runs, and optionally repair what differs.

Design note
-----------
The job walks each disk in windows of ``WINDOW`` bytes, a few windows at a
time (``WORKERS``), and compares per-cluster digests
(:mod:`replfs.core.digest`, xxh3, in the cluster size of the disk's dirty
record):

* the local digests are computed from the local image, the remote ones by
  the secondary itself (``digests``: the control channel's ``digests`` op),
  so the data does not cross the link.  Against a plain NBD peer (qemu-nbd,
  nbdkit: no control channel) the window is read through the mirror's peer
  NBD client and hashed here.  Both halves of a window run at once, and the
  hashing runs in the I/O threads, off the FUSE loop;
* the first pass takes no lock: the VM's writes never wait for it.  So a
  write in flight (on the local image, not yet on the peer) can make a
  cluster look different.  Before a cluster is reported it is compared again
  under the mirror's range lock (``Mirror.order``, exclusive on those
  clusters: the lock every VM write holds on its range until both sides
  have it), where no write to it is in flight - only what still differs
  then is a difference.  Differences are rare, so the re-check costs
  nothing in the common case;
* with ``repair``, a difference is copied while that lock is still held,
  from the local data read under it (so a copy never overwrites a newer
  write: DRBD's resync rule, as in :mod:`replfs.jobs.resync`).  The
  clusters are marked in the dirty record first and cleared only after a
  FLUSH of the peer covered the copies: a repair that fails half way leaves
  them to the resync that follows the reconnect;
* ``rate`` (bytes/s of the disk compared) is a token bucket taken before
  each window;
* ``check()`` (the controller's) raises when the pair is no longer
  replicating with the same secondary; it is asked before every window and
  under every re-check's lock.  A failure of the secondary itself (a read,
  a write, a flush or a digest request that failed or took longer than
  ``timeout``) is raised as :class:`SecondaryFailed`, so the controller can
  treat it as it treats a failed write.

Progress (:class:`VerifyProgress`, a :class:`~replfs.jobs.resync.SyncProgress`
whose ``done`` is the bytes compared) is readable while the job runs and
stays afterwards: total and checked bytes, rate, ETA, and the differing
ranges, coalesced at cluster granularity (the first :data:`MAX_LISTED` in
the status, with a count).
"""

from __future__ import annotations

import bisect
import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from replfs.block.mirror import Mirror
from replfs.core import iothreads
from replfs.core.digest import cluster_digests
from replfs.errors import BlockError, ReplfsError
from replfs.jobs.resync import DigestFn, SyncProgress, TokenBucket, _runs

#: Bytes compared per request.  Large enough that a digest request's round
#: trip is small next to reading the window on each side, small enough that
#: a few in flight stay cheap in memory (each side holds one window per
#: worker).
WINDOW = 8 * 1024 * 1024
#: Windows in flight.  The control channel answers one request at a time, so
#: more than a few only queue; two or three keep both sides' disks busy.
WORKERS = 3
#: Differing ranges listed in the status (the count is always complete).
MAX_LISTED = 1000
#: Below this many bytes a window is hashed inline (a thread hop costs more).
INLINE_HASH = 256 * 1024
#: Seconds between two ``verify`` progress events.
EVENT_INTERVAL = 1.0


class SecondaryFailed(BlockError):
    """The secondary failed a read, write, flush or digest request."""


@dataclass
class VerifyProgress(SyncProgress):
    """One verify's progress and result (``done_bytes``: bytes compared;
    ``sent_bytes``: bytes a repair copied)."""

    state: str = "running"
    method: str = "digests"
    repair: bool = False
    repaired: bool = False
    rate_limit: float | None = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    #: Bytes that looked different at first and were compared again under
    #: the range lock (mostly writes that were in flight).
    rechecked_bytes: int = 0
    #: Disk -> sorted, coalesced ``[start, end)`` byte ranges that differ.
    _runs: dict[str, list[list[int]]] = field(default_factory=dict)
    _starts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, disk: str, start: int, end: int) -> None:
        """Note that ``[start, end)`` of ``disk`` differs (merged with the
        ranges it touches or overlaps)."""
        runs = self._runs.setdefault(disk, [])
        starts = self._starts.setdefault(disk, [])
        i = bisect.bisect_left(starts, start)
        if i > 0 and runs[i - 1][1] >= start:
            i -= 1
            start = runs[i][0]
        j = i
        while j < len(runs) and runs[j][0] <= end:
            end = max(end, runs[j][1])
            j += 1
        runs[i:j] = [[start, end]]
        starts[i:j] = [start]

    @property
    def difference_count(self) -> int:
        return sum(len(r) for r in self._runs.values())

    @property
    def difference_bytes(self) -> int:
        return sum(e - s for r in self._runs.values() for s, e in r)

    def differences(self, limit: int | None = MAX_LISTED) -> list[list]:
        """``[[disk, start, length], ...]``, disk by disk, by offset."""
        out: list[list] = []
        for disk, runs in self._runs.items():
            for s, e in runs:
                if limit is not None and len(out) >= limit:
                    return out
                out.append([disk, s, e - s])
        return out

    def finish(self, state: str, error: str | None = None) -> None:
        self.state = state
        self.error = error
        self.finished_at = time.time()

    def status(self, now: float) -> dict:
        running = self.state == "running"
        rate = self.rate(now) if running else None
        left = max(0, self.total_bytes - self.done_bytes)
        listed = self.differences()
        return {
            "state": self.state,
            "method": self.method,
            "repair": self.repair,
            "repaired": self.repaired,
            "total_bytes": self.total_bytes,
            "checked_bytes": self.done_bytes,
            "rate_bytes_per_s": round(rate) if rate is not None else None,
            "eta_s": round(left / rate, 1) if rate else None,
            "rate_limit": self.rate_limit,
            "differences": listed,
            "differences_count": self.difference_count,
            "differences_truncated": self.difference_count > len(listed),
            "difference_bytes": self.difference_bytes,
            "repaired_bytes": self.sent_bytes,
            "rechecked_bytes": self.rechecked_bytes,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "error": self.error,
        }

    def event_fields(self, now: float) -> dict:
        """A ``verify`` event: the status without the ranges' list."""
        st = self.status(now)
        del st["differences"], st["differences_truncated"]
        return st


class _Disk:
    """One disk's walk: where it is, and what a repair copied."""

    def __init__(self, name: str, mirror: Mirror, cluster_size: int, window: int) -> None:
        self.name = name
        self.mirror = mirror
        self.cs = cluster_size
        self.window = max(cluster_size, window // cluster_size * cluster_size)
        self.target = mirror.peer  # the secondary the comparison is with
        #: Repaired runs ``(offset, length, foreign marks then)``, until a flush.
        self.copied: list[tuple[int, int, int]] = []
        #: Marks of the record made by this job's repairs (the others are
        #: writes the peer failed: a copy older than one is not cleared).
        self.own_marks = 0

    def foreign_marks(self) -> int:
        rec = self.mirror.record
        return rec.marks - self.own_marks if rec is not None else 0

    def windows(self):
        size = self.mirror.size
        for off in range(0, size, self.window):
            yield self, off, min(self.window, size - off)

    def peer(self):
        peer = self.mirror.peer
        if peer is None or peer is not self.target:
            raise BlockError(errno.ENOTCONN, f"verify: {self.name}: the secondary is gone")
        return peer


async def verify(disks: Sequence[tuple[str, Mirror, int]], *, digests: DigestFn | None,
                 repair: bool = False, rate: float | None = None,
                 progress: VerifyProgress | None = None,
                 check: Callable[[], None] | None = None, timeout: float = 30.0,
                 events=None, workers: int = WORKERS, window: int = WINDOW) -> VerifyProgress:
    """Compare every cluster of ``disks`` (``(name, mirror, cluster_size)``)
    with their mirrors' peers; with ``repair`` copy what differs.  Returns
    the progress, finished ("done"); a failure finishes it "failed" (or
    "cancelled") and is raised.  ``events``: an :class:`~replfs.events.EventHub`
    for ``verify`` lines (at the start, every :data:`EVENT_INTERVAL` s while
    somebody reads, at the end)."""
    progress = progress or VerifyProgress()
    progress.repair = repair
    progress.rate_limit = rate
    progress.method = "digests" if digests is not None else "read"
    progress.started = trio.current_time()
    walks = [_Disk(name, mirror, cs, window) for name, mirror, cs in disks]
    for d in walks:  # the differences are listed in the disks' order
        progress._runs.setdefault(d.name, [])
        progress._starts.setdefault(d.name, [])
    progress.total_bytes = sum(d.mirror.size for d in walks)
    job = _Job(walks, digests, repair, TokenBucket(rate), progress,
               check or (lambda: None), timeout)
    failure: Exception | None = None
    async with trio.open_nursery() as outer:
        if events is not None:
            outer.start_soon(_report, progress, events)
        try:
            await job.run(workers)
        except Exception as exc:  # noqa: BLE001 - raised below, as itself (not in a group)
            failure = exc
        except BaseException:  # cancelled (`verify cancel`, or the daemon is stopping)
            await job.settle()
            progress.finish("cancelled", "cancelled")
            _publish_end(progress, events)
            raise
        finally:
            outer.cancel_scope.cancel()
    if failure is not None:
        await job.settle()
        progress.finish("failed", str(failure) or repr(failure))
        _publish_end(progress, events)
        raise failure
    progress.note(trio.current_time())
    progress.finish("done")
    _publish_end(progress, events)
    return progress


async def _report(progress: VerifyProgress, events) -> None:
    events.publish("verify", **progress.event_fields(trio.current_time()))
    while True:
        await trio.sleep(EVENT_INTERVAL)
        if events.readers:
            events.publish("verify", **progress.event_fields(trio.current_time()))


def _publish_end(progress: VerifyProgress, events) -> None:
    if events is not None:
        events.publish("verify", **progress.event_fields(trio.current_time()), done=True)


class _Job:
    def __init__(self, walks: list[_Disk], digests: DigestFn | None, repair: bool,
                 bucket: TokenBucket, progress: VerifyProgress, check: Callable[[], None],
                 timeout: float) -> None:
        self.walks = walks
        self.digests = digests
        self.repair = repair
        self.bucket = bucket
        self.progress = progress
        self.check = check
        self.timeout = timeout
        self._todo = (w for d in walks for w in d.windows())

    async def run(self, workers: int) -> None:
        failures: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, workers)):
                nursery.start_soon(self._guarded, failures, nursery.cancel_scope)
        if failures:  # the first, as itself (not wrapped in an exception group)
            raise failures[0]
        if self.repair:
            for d in self.walks:
                await self._flush(d)
            self.progress.repaired = True

    async def settle(self) -> None:
        """After a cancel or a failure: flush what the repair copied so far
        and clear it in the record (shielded, within ``timeout``); what
        cannot be flushed stays marked for the next resync."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.timeout):
            for d in self.walks:
                try:
                    await self._flush(d)
                except BlockError:
                    pass

    async def _guarded(self, failures: list, scope: trio.CancelScope) -> None:
        try:
            while (w := next(self._todo, None)) is not None:
                await self._window(*w)
        except Exception as exc:  # noqa: BLE001 - the job raises the first one
            failures.append(exc)
            scope.cancel()

    # -- one window ------------------------------------------------------------------
    async def _window(self, d: _Disk, off: int, n: int) -> None:
        self.check()
        await self.bucket.take(n)
        self.check()  # the bucket may have made it wait
        d.peer()
        local, remote = await _both(self._local(d, off, n), self._remote(d, off, n))
        bad = [i for i, (a, b) in enumerate(zip(local, remote)) if a != b]
        first = off // d.cs
        for a, b in _runs(bad):
            await self._recheck(d, first + a, first + b)
        self.progress.done_bytes += n
        self.progress.note(trio.current_time())

    async def _recheck(self, d: _Disk, c0: int, c1: int) -> None:
        """Clusters ``[c0, c1)`` looked different: compare them again with no
        write to them in flight; report (and repair) what still differs."""
        mirror, cs = d.mirror, d.cs
        start, end = c0 * cs, min(c1 * cs, mirror.size)
        async with mirror.order.exclusive(start, end):
            self.progress.rechecked_bytes += end - start
            self.check()
            d.peer()
            data = await mirror.local.read(start, end - start)
            local = await _hash(data, cs)
            remote = await self._remote(d, start, end - start)
            still = [i for i, (a, b) in enumerate(zip(local, remote)) if a != b]
            for a, b in _runs(still):
                s, e = start + a * cs, min(start + b * cs, end)
                self.progress.add(d.name, s, e)
                if self.repair:
                    await self._copy(d, s, memoryview(data)[s - start:e - start])

    async def _copy(self, d: _Disk, offset: int, data) -> None:
        """A repair copy; the caller holds the range lock."""
        rec = d.mirror.record
        if rec is not None:
            rec.mark(offset, len(data))  # until a flush covered the copy
            d.own_marks += 1
        try:
            with trio.fail_after(self.timeout):
                await d.peer().write(offset, data)
        except trio.TooSlowError:
            raise SecondaryFailed(errno.ETIMEDOUT, f"verify: {d.name}: a repair write to the "
                                  f"secondary took longer than {self.timeout:g} s") from None
        except SecondaryFailed:
            raise
        except BlockError as exc:
            if exc.errno == errno.ENOTCONN and d.mirror.peer is not d.target:
                raise
            raise SecondaryFailed(exc.errno, f"verify: {d.name}: repair write to the "
                                  f"secondary failed: {exc}") from None
        d.copied.append((offset, len(data), d.foreign_marks()))
        self.progress.sent_bytes += len(data)

    async def _flush(self, d: _Disk) -> None:
        """FLUSH the peer, then clear the repaired clusters in the record
        (unless a mark came since: a write the peer failed meanwhile)."""
        if not d.copied:
            return
        done, d.copied = d.copied, []
        self.check()
        try:
            with trio.fail_after(self.timeout):
                await d.peer().flush()
        except trio.TooSlowError:
            raise SecondaryFailed(errno.ETIMEDOUT, f"verify: {d.name}: the secondary's "
                                  f"flush took longer than {self.timeout:g} s") from None
        except BlockError as exc:
            if d.mirror.peer is not d.target:
                raise
            raise SecondaryFailed(exc.errno, f"verify: {d.name}: flush of the repairs on "
                                  f"the secondary failed: {exc}") from None
        d.peer()
        rec = d.mirror.record
        if rec is None:
            return
        foreign = d.foreign_marks()
        for offset, length, marks in done:
            if marks == foreign:
                rec.clear(*rec.outward(offset, length))

    # -- the two sides' digests ---------------------------------------------------------
    async def _local(self, d: _Disk, off: int, n: int) -> list[int]:
        return await _hash(await d.mirror.local.read(off, n), d.cs)

    async def _remote(self, d: _Disk, off: int, n: int) -> list[int]:
        """The secondary's digests of ``[off, off + n)``: computed there
        (control channel) or from its data read over NBD."""
        try:
            with trio.fail_after(self.timeout):
                if self.digests is not None:
                    got = await self.digests(d.name, off, n)
                else:
                    got = await _hash(await d.peer().read(off, n), d.cs)
        except trio.TooSlowError:
            raise SecondaryFailed(errno.ETIMEDOUT, f"verify: {d.name}: the secondary did not "
                                  f"answer within {self.timeout:g} s") from None
        except BlockError as exc:
            if isinstance(exc, SecondaryFailed) or d.mirror.peer is not d.target:
                raise
            raise SecondaryFailed(exc.errno, f"verify: {d.name}: reading the secondary "
                                  f"failed: {exc}") from None
        except ReplfsError as exc:  # a refusal (ControlRefused): the link is fine
            raise BlockError(errno.EIO, f"verify: {d.name}: the secondary refused a digest "
                             f"request: {exc}") from None
        want = (n + d.cs - 1) // d.cs
        if len(got) != want:
            raise BlockError(errno.EPROTO, f"verify: {d.name}: the secondary sent "
                             f"{len(got)} digests for {want} clusters")
        return got


async def _hash(data, cluster_size: int) -> list[int]:
    if len(data) <= INLINE_HASH:
        return cluster_digests(data, cluster_size)
    return await iothreads.run(cluster_digests, data, cluster_size)


async def _both(a, b):
    """Await two coroutines at once; their results, or the first error as
    itself (not wrapped in an exception group)."""
    results: list = [None, None]

    async def one(i, coro):
        try:
            results[i] = (True, await coro)
        except Exception as exc:  # noqa: BLE001 - raised by the caller
            results[i] = (False, exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 0, a)
        nursery.start_soon(one, 1, b)
    for ok, value in results:
        if not ok:
            raise value
    return results[0][1], results[1][1]
