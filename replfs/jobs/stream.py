"""The checkpoint protocol's streamer: a continuous resync of the dirty record.

Design note
-----------
Under COLO semantics the secondary needs the primary's writes by the next
checkpoint, not before each write completes (a failover throws away every
primary write since the last checkpoint anyway).  So in the *checkpoint*
protocol (``replfs primary --protocol checkpoint``) a VM write completes
when the local image has it (:meth:`replfs.block.mirror.Mirror._queued`):
it marks its clusters in the disk's dirty record, exactly as a degraded
primary's write does, and wakes this streamer.  The queue *is* the dirty
record: cluster bits, no payload; memory is flat (2 MiB per TiB at 64 KiB
clusters) plus, for clusters queued while replicating, which 4 KiB blocks
of them were written (a dict bounded by the lag), so that a 4 KiB write
sends 4 KiB, not its 64 KiB cluster.

The streamer works in *rounds*, as :mod:`replfs.jobs.resync` does: windows
of adjacent dirty clusters (``WINDOW``), several workers (several NBD writes
in flight on the pipelined client), the data read back from the local
image, sent in batches; a batch's clusters are cleared once the peer
acknowledged it.  What differs from the resync job, and why:

* *which copies may be cleared*.  The resync job keeps a copy's bits when
  the record was marked at all since the copy (``record.marks``), which is
  rare there (a failed mirrored write) but here every VM write marks: it
  would never clear anything under load.  So the streamer notes, while a
  round runs, which clusters were marked (``remarked``); once a batch is
  acknowledged it clears the batch's clusters that are not among them;
* *no FLUSH per round*: a write the peer acknowledged is in its page cache,
  as a sync-protocol write is when it completes, and the same activity log
  covers a secondary that crashes and loses it (its hot extents are compared
  at the reconnect).  The checkpoint's drain sends the one FLUSH that makes
  the checkpoint durable.  (A FLUSH per round cost an ``fdatasync`` on the
  secondary every 10 ms, and held writers at max-lag until it returned);
* *no range lock for the reads*.  Only the streamer sends to the peer in
  this protocol, and a round's windows are disjoint, so there is no
  ordering to keep between two sends of one cluster in a round, and rounds
  follow each other (a round ends when all its batches are acknowledged).
  A VM write that races a copy's read marks its clusters after its local
  write returned, i.e. after the round began:
  it is in ``remarked``, so the possibly torn copy is sent but not cleared,
  and the next round sends the cluster again.  That is also what lets a
  checkpoint hold every disk's whole range lock (:meth:`Mirror.barrier`:
  no VM write in flight, new ones wait) while it drains;
* *back-pressure*: while the lag (the bytes queued: the 4 KiB blocks
  written, a cluster marked some other way whole) exceeds ``max_lag``, VM
  writes wait before taking their range lock (:meth:`room`), and are woken
  when a batch clears bits (or the streamer stops: the pair degraded,
  writes just mark).

A failure of the peer (an error, or the controller's watchdog: the sends go
through :meth:`Mirror.send`, so a request that waits longer than the
timeout fails the secondary) is handed to ``on_error(mirror, reason)``, the
controller's ``peer_failed``: the pair degrades as today, the record keeps
every cluster not yet acknowledged, and the resync after the reconnect is
the ordinary resync job.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

import trio

from replfs.block.mirror import Mirror
from replfs.core.bitmap import ClusterBitmap
from replfs.errors import BlockError
from replfs.jobs.resync import WINDOW, _runs, next_window

log = logging.getLogger("replfs.stream")

#: Concurrent windows of a round (NBD writes in flight).
WORKERS = 4
#: Largest NBD write a worker sends (and buffer it reads): WORKERS x CHUNK
#: bytes in flight at most, so the daemon's memory does not grow with the
#: lag (measured: 2 MiB windows x 16 workers peaked at 212 MiB RSS).
CHUNK = 256 * 1024
#: A worker's batch: at most this many NBD writes, or bytes, in one send.
BATCH_REQUESTS = 64
BATCH_BYTES = 1024 * 1024
#: Sub-cluster precision of the queue: 4 KiB blocks (the VM's page).
BLOCK = 4096
#: A round ends once it sent this much (the walk starts over from the first
#: cluster, with a fresh ``remarked``), so that writes held
#: at max-lag are woken in steps rather than after the whole record.
ROUND_MIN = 1024 * 1024
ROUND_MAX = 64 * 1024 * 1024
#: Seconds a round waits for more writes to batch, unless the lag is near
#: max-lag or a checkpoint drains.  Design note: the streamer shares the
#: daemon's one thread with the VM's requests; a round per 4 KiB write (a
#: read, an NBD write and its reply) cost about as much as the sync
#: protocol's round trip, so the rounds batch instead (the writes of a few
#: milliseconds sent together).
BATCH_DELAY = 0.01


class _Queue:
    """One disk's queue: its mirror and record, which blocks of which
    clusters were written, and what a round copied."""

    def __init__(self, mirror: Mirror) -> None:
        rec = mirror.record
        if rec is None:
            raise ValueError(f"{mirror.name}: the checkpoint protocol needs a dirty record")
        self.mirror = mirror
        self.record = rec
        self.cs = rec.cluster_size
        self.bs = min(BLOCK, self.cs)
        self.bshift = self.bs.bit_length() - 1
        self.per_cluster = self.cs // self.bs
        self.full = (1 << self.per_cluster) - 1
        #: cluster -> bit mask of the blocks written since it was queued
        #: (no entry: the whole cluster, e.g. marked while degraded).
        self.blocks: dict[int, int] = {}
        #: blocks in ``blocks``' masks (the lag counts them, not clusters)
        self.masked = 0
        #: clusters (and their blocks) the round under way took off ``blocks``
        self.sending_clusters = 0
        self.sending = 0
        #: clusters dirty before the streamer started (sent whole, so a
        #: later 4 KiB write into one must not narrow it); None: none
        self.whole: ClusterBitmap | None = None
        #: clusters marked while a round runs (None: no round).
        self.remarked: set[int] | None = None
        self.next = 0
        self.window = max(1, WINDOW // self.cs)
        self.unflushed = False  # the peer acknowledged writes not flushed since
        self.peer = None

    def note(self, offset: int, length: int) -> None:
        """A write of ``[offset, offset+length)`` reached the local image."""
        rec = self.record
        rec.mark(offset, length)
        c0, c1 = rec.outward(offset, length)
        if self.remarked is not None:
            self.remarked.update(range(c0, c1))
        b0 = offset >> self.bshift
        b1 = (offset + length + self.bs - 1) >> self.bshift
        blocks, per, whole = self.blocks, self.per_cluster, self.whole
        for c in range(c0, c1):
            if whole is not None and whole.test(c):
                continue
            lo = max(b0 - c * per, 0)
            hi = min(b1 - c * per, per)
            old = blocks.get(c, 0)
            new = old | (((1 << (hi - lo)) - 1) << lo)
            blocks[c] = new
            self.masked += new.bit_count() - old.bit_count()

    @property
    def lag_bytes(self) -> int:
        """What is queued: the written blocks of the clusters with a mask,
        the clusters without one whole.  Design note: counting dirty
        clusters instead made 4 KiB random writes count 64 KiB each, and
        the default max-lag held writers at about 1000 writes queued (QD16
        ran slower than QD1)."""
        whole = self.record.dirty_clusters - len(self.blocks) - self.sending_clusters
        return max(0, whole) * self.cs + (self.masked + self.sending) * self.bs

    def begin(self) -> None:
        """The streamer starts: what the record holds already is sent whole."""
        self.blocks.clear()
        self.masked = 0
        bits = self.record.bits
        self.whole = ClusterBitmap.from_bytes(len(bits), bits.to_bytes()) if bits.count else None

    def take_window(self) -> tuple[int, int] | None:
        rec = self.record
        w = next_window(self.next, rec.nclusters, self.window, rec.bits)
        self.next = w[1] if w is not None else rec.nclusters
        return w

    def ranges(self, runs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int, int]:
        """The byte ranges to send for the dirty cluster ``runs`` (their
        written blocks), adjacent ones merged; their masks are taken (and
        counted as being sent: how many clusters had one, how many blocks
        they held, returned with the ranges for :meth:`sent`)."""
        out: list[tuple[int, int]] = []
        nc = nb = 0
        size, cs, bshift, full = self.record.size, self.cs, self.bshift, self.full
        whole, pop = self.whole, self.blocks.pop
        for s, e in runs:
            for c in range(s, e):
                mask = pop(c, None)
                if mask is None:
                    mask = full
                else:
                    n = mask.bit_count()
                    nc += 1
                    nb += n
                if whole is not None and whole.test(c):
                    whole.clear_range(c, c + 1)
                    mask = full
                base = c * cs
                while mask:  # each run of set bits: one span (bit arithmetic)
                    low = (mask & -mask).bit_length() - 1
                    m = mask >> low
                    ones = (m ^ (m + 1)).bit_length() - 1
                    mask ^= ((1 << ones) - 1) << low
                    a = base + (low << bshift)
                    b = min(a + (ones << bshift), size)
                    if a >= b:
                        continue
                    if out and out[-1][1] == a:
                        out[-1] = (out[-1][0], b)
                    else:
                        out.append((a, b))
        self.masked -= nb
        self.sending_clusters += nc
        self.sending += nb
        return out, nc, nb

    def sent(self, done: list[tuple[list[tuple[int, int]], int, int]]) -> None:
        """The peer acknowledged everything :meth:`ranges` gave for ``done``:
        clear the clusters no write marked since the round began (those
        are sent again by the next round)."""
        rec, again = self.record, self.remarked
        for runs, nc, nb in done:
            self.sending_clusters -= nc
            self.sending -= nb
            if again is None:  # stopped meanwhile: the record keeps them
                continue
            for a, b in runs:
                if not again:
                    rec.clear(a, b)
                    continue
                for x, y in _runs([c for c in range(a, b) if c not in again]):
                    rec.clear(x, y)


class Streamer:
    """Streams the dirty records of a mount's mirrors to their peers."""

    def __init__(self, mirrors: list[Mirror], *, max_lag: int,
                 on_error: Callable[[Mirror, str], None], workers: int = WORKERS) -> None:
        self.queues = {m.name: _Queue(m) for m in mirrors}
        self._qlist = list(self.queues.values())
        self._by_mirror = {id(q.mirror): q for q in self.queues.values()}
        self.max_lag = max_lag
        self.on_error = on_error
        self.workers = workers
        self.active = False
        self.rounds = 0
        self.sent_bytes = 0
        self.flushes = 0
        self._work = trio.Event()
        self._room = trio.Event()
        self._round_done = trio.Event()
        self.failure: str | None = None
        self._stopping = False
        self._ended = trio.Event()
        self._hurry = trio.Event()

    # -- the VM's side (Mirror._queued) -------------------------------------------------
    @property
    def lag_bytes(self) -> int:
        """Bytes queued: the blocks written and not yet sent and cleared
        (a cluster marked some other way counts whole), every disk."""
        lag = 0
        for q in self._qlist:  # no generator: every write asks (``lagging``)
            lag += q.lag_bytes
        return lag

    @property
    def lagging(self) -> bool:
        return self.active and self.lag_bytes > self.max_lag

    async def room(self) -> None:
        """Wait until the lag is at most ``max_lag`` (or the streamer stops)."""
        self._hurry.set()
        while self.lagging:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    def queued(self, mirror: Mirror, offset: int, length: int) -> None:
        self._by_mirror[id(mirror)].note(offset, length)
        self._work.set()

    # -- attach / detach ---------------------------------------------------------------
    def start(self) -> None:
        """Put the streamer on the mirrors' write path."""
        self.active = True
        for q in self.queues.values():
            q.begin()
            q.mirror.stream = self

    def stop(self) -> None:
        """Take it off: writes go back to the mirror's own path; writers
        held at max-lag and drains waiting are woken.  The caller cancels
        :meth:`run` (the peer is dropped), or has waited for it to end
        (:meth:`finish`): a round's copy must not reach the peer after a
        write the mirror sends itself."""
        self.active = False
        for q in self.queues.values():
            if q.mirror.stream is self:
                q.mirror.stream = None
            q.blocks.clear()
            q.masked = q.sending = q.sending_clusters = 0
            q.whole = None
            q.remarked = None
        self._room.set()
        self._work.set()
        self._round_done.set()

    async def finish(self) -> None:
        """End after the round under way (its copies acknowledged); writes stay
        queued meanwhile.  Then :meth:`stop`."""
        self._stopping = True
        self._hurry.set()
        self._work.set()
        await self._ended.wait()

    # -- the background ----------------------------------------------------------------
    async def run(self) -> None:
        """Rounds while something is queued, until cancelled or stopped."""
        try:
            while self.active and not self._stopping:
                if not any(q.record.bits.count for q in self.queues.values()):
                    self._work = trio.Event()
                    if not any(q.record.bits.count for q in self.queues.values()) \
                            and not self._stopping:
                        await self._work.wait()
                    continue
                if self.lag_bytes < self.max_lag // 2 and not self._stopping:
                    if self._hurry.is_set() and not self.lagging:
                        self._hurry = trio.Event()  # the writers held are let go
                    with trio.move_on_after(BATCH_DELAY):
                        await self._hurry.wait()
                try:
                    await self._round()
                except Exception as exc:
                    self._fail(exc)
                    return
        finally:
            self._ended.set()
            self._round_done.set()
            self._room.set()

    def _fail(self, exc: Exception) -> None:
        while isinstance(exc, ExceptionGroup):  # a worker's, as itself
            exc = exc.exceptions[0]
        if isinstance(exc, BlockError):
            why = f"streaming to the secondary failed: {exc}"
        else:
            log.error("stream: unexpected error", exc_info=exc)
            why = f"streaming to the secondary failed: internal error {exc!r}"
        self.failure = why
        q = next(iter(self.queues.values()))
        if self.active:
            self.on_error(q.mirror, why)

    async def _round(self) -> None:
        qs = list(self.queues.values())
        budget = min(max(self.max_lag // 16, ROUND_MIN), ROUND_MAX)
        state = {"sent": 0}
        for q in qs:
            q.next, q.remarked = 0, set()
            q.peer = q.mirror.peer
            if q.peer is None and q.record.bits.count:
                raise BlockError(errno.ENOTCONN, f"{q.mirror.name}: no secondary")
        try:
            async with trio.open_nursery() as nursery:
                for _ in range(self.workers):
                    nursery.start_soon(self._worker, qs, state, budget)
        finally:
            for q in qs:
                q.remarked, q.peer = None, None
                q.sending = q.sending_clusters = 0
            self.rounds += 1
            self._round_done.set()
            self._round_done = trio.Event()
            self._room.set()

    async def _worker(self, qs: list[_Queue], state: dict, budget: int) -> None:
        """Take windows, and send what their dirty clusters hold in batches
        of up to ``BATCH_REQUESTS`` writes / ``BATCH_BYTES`` (a batch goes
        out in one send and its replies are awaited together: the per-write
        cost on the daemon's one thread is what limits this protocol)."""
        for q in qs:
            local = q.mirror.local
            items: list[tuple[int, bytes]] = []
            size = 0
            done: list = []  # windows whose every range is in ``items`` or sent
            while self.active and state["sent"] < budget and \
                    (w := q.take_window()) is not None:
                c0, c1 = w
                # the dirty runs only (a C-speed scan): random writes leave
                # one dirty cluster in a window, not thirty-two to test
                runs = list(q.record.bits.set_runs(c0, c1))
                ranges, nc, nb = q.ranges(runs)
                for a, b in ranges:
                    for x in range(a, b, CHUNK):  # bounded buffers: RSS stays flat
                        n = min(CHUNK, b - x)
                        data = local.read_now(x, n)  # plain call unless it must wait
                        if data is None:
                            data = await local.read(x, n)
                        items.append((x, data))
                        size += n
                        state["sent"] += n
                        if len(items) >= BATCH_REQUESTS or size >= BATCH_BYTES:
                            await self._send_items(q, items, size, done)
                            items, size, done = [], 0, []
                done.append((runs, nc, nb))
            await self._send_items(q, items, size, done)

    async def _send_items(self, q: _Queue, items: list, size: int, done: list) -> None:
        """Send ``items``; once the peer acknowledged them, the windows in
        ``done`` are cleared (writers held at max-lag go on, batch by batch)."""
        if items:
            batch = getattr(q.peer, "write_batch", None)
            if batch is not None:
                await self._send(q, lambda p: p.write_batch(items))
            else:  # any other block node (tests): one write each
                for x, data in items:
                    await self._send(q, lambda p, x=x, d=data: p.write(x, d))
            self.sent_bytes += size
            q.unflushed = True
        if done:
            q.sent(done)
            self._room.set()

    async def _send(self, q: _Queue, call) -> None:
        peer = q.mirror.peer
        if peer is None or peer is not q.peer:
            raise BlockError(errno.ENOTCONN, f"{q.mirror.name}: the secondary is gone")
        await q.mirror.send(peer, call)

    async def _flush(self, q: _Queue) -> None:
        peer = q.mirror.peer
        if peer is None:
            raise BlockError(errno.ENOTCONN, f"{q.mirror.name}: the secondary is gone")
        q.unflushed = False
        try:
            await q.mirror.send(peer, lambda p: p.flush())
        except BaseException:
            q.unflushed = True
            raise
        self.flushes += 1

    # -- a checkpoint's drain -------------------------------------------------------------
    async def drain(self) -> None:
        """Return once every disk's record is empty and flushed by the
        secondary.  The caller holds every mirror's barrier (no new writes)."""
        while True:
            if not self.active:
                raise BlockError(errno.ENOTCONN, self.failure or
                                 "checkpoint: the secondary is gone (nothing was drained)")
            if not any(q.record.bits.count for q in self.queues.values()):
                break
            done = self._round_done
            self._hurry.set()
            self._work.set()
            try:
                await done.wait()
            finally:
                self._hurry = trio.Event()
        # every write was acknowledged; one FLUSH makes them durable
        try:
            async with trio.open_nursery() as nursery:
                for q in self.queues.values():
                    if q.unflushed:
                        nursery.start_soon(self._flush, q)
        except Exception as exc:
            if self.active:
                self._fail(exc)
            raise BlockError(errno.ENOTCONN, self.failure or
                             "checkpoint: the secondary's flush failed") from None

    def statistics(self) -> dict:
        return {"rounds": self.rounds, "sent_bytes": self.sent_bytes,
                "flushes": self.flushes}
