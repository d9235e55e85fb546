"""The primary's disk: every write to the local image and to the peer.

Design note
-----------
QEMU builds the primary as ``quorum(vote-threshold=1)`` over the local disk
and a ``replication mode=primary`` node over an NBD client.  replfs keeps the
same contract in one layer, :class:`Mirror`, with two child edges: ``file``
(the local image) and ``peer`` (the secondary: an NBD client in the daemon,
any block node in tests):

* reads come from the local image only;
* a write goes to the peer and to the local image at once, as QEMU's
  quorum issues both children: the NBD request is sent first
  (``begin_write``), the local image is written while the peer works, then
  the reply is awaited (``end``).  The write completes when the peer has
  answered - or has been given up on.  If the local write fails the VM gets
  the error, and the peer, which may have the data, is sent what the local
  image holds there once it answered, so the two stay equal (the clusters
  the write covers only in part stay in the dirty record, as all of them
  do if that fails).  A peer that cannot send a request ahead (a block
  node in tests, a write larger than one NBD request) gets the write after
  the local one, and nothing if that failed;
* a failure of the peer (an error, a lost connection, or no answer in
  time: the primary controller's watchdog checks :meth:`oldest_request_age`)
  is *never* returned to the VM: it is handed to
  ``on_peer_error(mirror, reason)`` and the write completes.  That is QEMU's
  "replication error is recorded, not returned".  The controller then cuts
  the peer edge of every disk (``drop_peer``), so a stalled peer that wakes
  up later receives nothing more;
* two writes that overlap are never in flight to the peer at the same time
  (a range lock): the peer may serve concurrent requests in any order, and
  the two images must end up equal;
* ``flush()`` flushes both sides concurrently (NBD FLUSH sent first, then
  the local sync); only the local side's error reaches the caller;
* with a dirty record (``record``, :mod:`replfs.block.dirty`), a write the
  peer did not get (no peer, or it failed) marks its clusters, and a write
  the peer got clears the clusters it covers whole; with an activity log
  (``al``), the write's extents are logged durably before it reaches the
  local image.  A resync copy takes the same range lock (``order``) as the
  writes, so a copy and a write to the same bytes are never in flight
  together and a copy never overwrites a newer write (DRBD's rule);
* in the *checkpoint* protocol (``stream`` set, only while the pair is
  "replicating"; :mod:`replfs.jobs.stream`) a write goes to the local image
  only: it marks its clusters in the dirty record, as a degraded primary's
  write does, and wakes the streamer, which sends the record's clusters
  read back from the local image.  Before it takes its range lock, a write
  waits while the mount's lag (the records' dirty bytes) exceeds the
  streamer's ``max_lag`` (back-pressure: the queue is the record, its
  memory is flat).  Design note: the sync path pays one attribute test for
  this; no payload is ever queued;
* :meth:`barrier` holds the whole disk's range lock: every write in flight
  is done, new ones wait (a checkpoint's cut, atomic with the other disks'
  barriers held at the same time).  No per-write cost: the lock is the one
  every write takes anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import asynccontextmanager

import trio

from replfs.block.base import BlockNode, Extent, nbytes
from replfs.block.dirty import ActivityLog, DirtyRecord
from replfs.core.rangelock import RangeLock
from replfs.errors import BlockError

log = logging.getLogger("replfs.mirror")

#: ``on_peer_error(mirror, reason)``: the peer failed a request.
PeerErrorHook = Callable[["Mirror", str], None]


class Mirror(BlockNode):
    def __init__(self, name: str, local: BlockNode, peer: BlockNode | None,
                 *, on_peer_error: PeerErrorHook, record: DirtyRecord | None = None,
                 al: ActivityLog | None = None) -> None:
        if peer is not None and peer.size != local.size:
            raise ValueError(f"{name}: the peer's size differs from the local image's")
        self.name = name
        self.local = local
        self.peer = peer
        self.size = local.size
        self._on_peer_error = on_peer_error
        #: Held exclusively by every write (and by a resync copy) on its range.
        self.order = RangeLock(f"{name}.order")
        self.record = record
        self.al = al
        self._inflight: dict[int, float] = {}  # token -> start (trio clock)
        self._next_token = 0
        self.bytes_written = 0
        self.bytes_replicated = 0
        self.writes = 0
        #: The checkpoint protocol's streamer while it runs (None: every
        #: write goes to the peer as it completes, the sync protocol).
        self.stream = None

    # -- the peer edge ------------------------------------------------------------
    def drop_peer(self) -> BlockNode | None:
        """Cut the peer edge; the caller owns (and closes) what it returns."""
        peer, self.peer = self.peer, None
        return peer

    def oldest_request_age(self, now: float) -> float:
        """Seconds the oldest request to the peer has been waiting."""
        return now - min(self._inflight.values()) if self._inflight else 0.0

    def set_peer_error_hook(self, hook: PeerErrorHook) -> None:
        """Who hears of the peer's failures (a re-protect hands the mirror
        that recorded a failed-over secondary's writes to a primary)."""
        self._on_peer_error = hook

    def attach_peer(self, peer: BlockNode) -> None:
        if peer.size != self.size:
            raise ValueError(f"{self.name}: the peer's size differs from the local image's")
        self.peer = peer

    async def send(self, peer: BlockNode, call):
        """``call(peer)``, watched by the controller's watchdog (a request
        that waits longer than the timeout fails the peer); errors raise."""
        token = self._watch()
        try:
            return await call(peer)
        finally:
            del self._inflight[token]

    def _watch(self) -> int:
        """A request to the peer starts: the watchdog's token for it (the
        caller deletes ``_inflight[token]`` when it ends)."""
        token = self._next_token
        self._next_token = token + 1
        self._inflight[token] = trio.current_time()
        return token

    def _peer_failed(self, peer: BlockNode, what: str, exc: Exception) -> None:
        """Report ``exc`` unless ``peer`` was dropped meanwhile (never to the VM)."""
        if self.peer is peer:
            self._on_peer_error(self, _describe(what, exc))

    async def _to_peer(self, what: str, call) -> bool:
        """``call(peer)``; True if the peer has it."""
        peer = self.peer
        if peer is None:
            return False
        try:
            await self.send(peer, call)
        except Exception as exc:  # never fail the VM's I/O for the peer
            self._peer_failed(peer, what, exc)
            return False
        return True

    @asynccontextmanager
    async def barrier(self):
        """Hold every write of this disk: the ones in flight finish first."""
        async with self.order.exclusive(0, self.size):
            yield

    async def _begin(self, what: str, begin):
        """``begin(peer)``: a request sent to the peer now, its reply awaited
        by :meth:`_end`, watched by the watchdog meanwhile.  Returns
        ``(peer, token, handle)``; None when the peer cannot send ahead (then
        :meth:`_to_peer` after the local side); False when there is no peer
        or it failed (reported to ``on_peer_error``)."""
        peer = self.peer
        if peer is None:
            return False
        token = self._watch()
        try:
            handle = await begin(peer)
        except Exception as exc:
            del self._inflight[token]
            self._peer_failed(peer, what, exc)
            return False
        except BaseException:
            del self._inflight[token]
            raise
        if handle is None:
            del self._inflight[token]
            return None
        return peer, token, handle

    async def _end(self, what: str, started) -> bool:
        """Wait for what :meth:`_begin` sent; True if the peer has it."""
        peer, token, handle = started
        try:
            await peer.end(handle)
        except Exception as exc:  # never fail the VM's I/O for the peer
            self._peer_failed(peer, what, exc)
            return False
        finally:
            del self._inflight[token]
        return True

    async def _even_out(self, started, offset: int, length: int) -> None:
        """The local write failed after the peer was sent it: once the peer
        answered, send it what the local image holds there, so the two stay
        equal.  Only the write's own bytes (the range lock held is theirs):
        its clusters are marked in the dirty record, and those it covers
        whole are cleared again once the peer has the local content."""
        rec = self.record
        rec.mark(offset, length)
        if not await self._end("write", started):
            return
        try:
            data = await self.local.read(offset, length)
        except BlockError:
            return
        if await self._to_peer("write", lambda node: node.write(offset, data)):
            rec.clear_covered(offset, length)

    async def _mirrored(self, what: str, offset: int, length: int, call, begin=None) -> None:
        """Run ``call(node)`` on the local image and on the peer (sent ahead
        with ``begin(peer)`` when it can: module note); what the peer did
        not get goes into the dirty record."""
        stream = self.stream
        if stream is not None:
            await self._queued(stream, offset, length, call)
            return
        order, end = self.order, offset + length  # no context manager: every write
        req = order.try_acquire(offset, end, True) or await order.acquire(offset, end, True)
        try:
            al = self.al
            if al is not None and not al.try_begin(offset, length):
                await al.begin(offset, length)  # logged before it reaches the image
            try:
                rec = self.record
                started = None
                if begin is not None and rec is not None:
                    started = await self._begin(what, begin)
                try:
                    await call(self.local)
                except Exception:
                    if started:
                        await self._even_out(started, offset, length)
                    raise
                except BaseException:
                    if started:  # cancelled: the peer may have it, the resync evens it out
                        rec.mark(offset, length)
                        del self._inflight[started[1]]
                    raise
                self.writes += 1
                self.bytes_written += length
                if started is None:
                    ok = await self._to_peer(what, call)
                elif started is False:
                    ok = False
                else:
                    try:
                        ok = await self._end(what, started)
                    except BaseException:  # cancelled: the peer may lack it
                        rec.mark(offset, length)
                        raise
                if ok:
                    self.bytes_replicated += length
                    if rec is not None and rec.nonempty:
                        rec.clear_covered(offset, length)
                elif rec is not None:
                    rec.mark(offset, length)
            finally:
                if al is not None:
                    al.end(offset, length)
        finally:
            order.release(req)

    async def _queued(self, stream, offset: int, length: int, call) -> None:
        """The checkpoint protocol's write: local image, then the record."""
        if stream.lagging:
            await stream.room()  # back-pressure, before any lock is taken
        order, end = self.order, offset + length
        req = order.try_acquire(offset, end, True) or await order.acquire(offset, end, True)
        try:
            al = self.al
            if al is not None and not al.try_begin(offset, length):
                await al.begin(offset, length)
            try:
                await call(self.local)
                self.writes += 1
                self.bytes_written += length
                stream.queued(self, offset, length)
            finally:
                if al is not None:
                    al.end(offset, length)
        finally:
            order.release(req)

    # -- BlockNode ----------------------------------------------------------------
    async def _read(self, offset: int, length: int) -> bytes:
        return await self.local.read(offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        return self.local.read_now(offset, length)

    async def _write(self, offset: int, data, fua: bool) -> None:
        await self._mirrored("write", offset, nbytes(data),
                             lambda node: node.write(offset, data, fua),
                             lambda peer: peer.begin_write(offset, data, fua))

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._mirrored("write_zeroes", offset, length,
                             lambda node: node.write_zeroes(offset, length, fua))

    async def _trim(self, offset: int, length: int) -> None:
        await self._mirrored("trim", offset, length, lambda node: node.trim(offset, length))

    async def flush(self) -> None:
        """Both sides at once; only the local side's error reaches the caller
        (raised outside the nursery, so it is not wrapped in a group).  In
        the checkpoint protocol the local side only: an fsync is durable on
        this host; the secondary has the data at the next checkpoint."""
        if self.stream is not None:
            await self.local.flush()
            return
        started = await self._begin("flush", _begin_flush)
        if started is not None:  # sent (or no peer): the local sync overlaps it
            local_error = None
            try:
                await self.local.flush()
            except BlockError as exc:
                local_error = exc
            if started:
                await self._end("flush", started)
            if local_error is not None:
                raise local_error
            return
        local_error = None
        async with trio.open_nursery() as nursery:
            if self.peer is not None:
                nursery.start_soon(self._to_peer, "flush", lambda node: node.flush())
                # Let it send NBD FLUSH before the local sync, which may run
                # inline (blocking this thread): the two syncs then overlap.
                await trio.lowlevel.cancel_shielded_checkpoint()
            try:
                await self.local.flush()
            except BlockError as exc:
                local_error = exc
        if local_error is not None:
            raise local_error

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        return self.local.allocation(offset, length)

    def children(self) -> dict[str, BlockNode]:
        edges = {"file": self.local}
        if self.peer is not None:
            edges["peer"] = self.peer
        return edges

    def statistics(self) -> dict:
        return {
            "writes": self.writes,
            "bytes_written": self.bytes_written,
            "bytes_replicated": self.bytes_replicated,
            "replicating": self.peer is not None,
            "out_of_sync_bytes": self.record.out_of_sync_bytes if self.record else 0,
        }


def _begin_flush(peer: BlockNode):
    return peer.begin_flush()


def _describe(what: str, exc: Exception) -> str:
    """The reason in words; a bug (not a BlockError) says what it was."""
    if isinstance(exc, BlockError):
        return f"{what} on the secondary failed: {exc}"
    log.error("%s on the secondary: unexpected error", what, exc_info=exc)
    return f"{what} on the secondary failed: internal error {exc!r}"
