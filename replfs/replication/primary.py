"""The primary host's controller: the pair's state, and how it heals itself.

Design note
-----------
The primary's disks are :class:`~replfs.block.mirror.Mirror` nodes (the
write path, QEMU's quorum + ``replication mode=primary``), each with a dirty
record and an activity log (:mod:`replfs.block.dirty`) kept in the image's
metadata file (:mod:`replfs.replication.persist`).  This controller holds
the pair's state for the whole mount:

* a failure of the secondary on any disk (``peer_failed``, the mirrors'
  ``on_peer_error`` hook; or the watchdog: no answer within ``timeout``) is
  recorded in ``last_error`` and moves the stage to "degraded".  Entering a
  stage in which the table refuses ``REPLICATE`` cuts the peer edge of
  *every* disk, aborts the session at once (so a stalled secondary that wakes
  up later receives nothing more), stops a running resync, and starts a new
  data generation (persisted; DRBD does the same, so that a secondary that
  failed over meanwhile is seen as a split brain).  From then on every write
  marks the dirty record;
* while "degraded" (and not after ``disconnect``) a reconnect loop retries
  with backoff, 0.5 s doubling up to ``reconnect_interval``; a failed attempt
  goes to ``reconnect_error``, never over ``last_error``;
* a session (:class:`Session`: one NBD client per disk plus the control
  channel) is *established*: both sides' generations are compared
  (:func:`~replfs.replication.persist.decide`), a split brain is refused on
  both sides, and otherwise the peers are attached and the stage is
  "syncing" while :func:`replfs.jobs.resync.resync` copies the dirty record
  (all of it for a full sync) with the VM's writes mirrored meanwhile;
  when it is done the two sides share a generation again, the stage is
  "replicating" and ``last_error`` is cleared;
* against a plain NBD secondary (no control channel) the generation check
  is skipped (``generation_check`` says so) and the dirty record is resynced
  by copying;
* the write protocol (``protocol``): "sync" (the default) completes a VM
  write when both sides have it; "checkpoint" completes it when the local
  image has it and streams the dirty record to the secondary
  (:mod:`replfs.jobs.stream`) while the stage is "replicating": queued
  writes are lag (``lag_bytes``), not divergence, bounded by ``max_lag``
  (back-pressure).  While "syncing" the writes are mirrored as in sync mode,
  so that the resync converges under any write load;
* checkpoint is a flush barrier on both sides (refused while syncing); in
  checkpoint mode it holds every disk's write barrier
  (:meth:`Mirror.barrier`) while it *drains* the queue (the secondary
  acknowledged and flushed every write completed before it; the time is
  ``last_checkpoint_drain_s``).  ``checkpoint(pair=True)`` (``replfs
  checkpoint MOUNT --pair``, both modes) then runs the secondary's
  checkpoint over the control channel (``{"op": "checkpoint"}``) with the
  barrier still held, so both sides cut at the same point for all disks;
  a plain NBD secondary has no control channel: refused;
  failover drops the secondary on purpose; stop flushes both sides and
  disconnects cleanly (NBD DISC); connect, disconnect and resync are the
  operator's handles on the above;
* the event stream (:mod:`replfs.events`) gets, besides the base class's
  events, a ``resync`` line when a resync starts, then at most every
  :data:`SYNC_EVENT_INTERVAL` seconds while it runs (only while somebody
  reads the stream), and when it is done; and a ``failover`` line.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Protocol

import trio

from replfs.block.base import BlockNode
from replfs.block.mirror import Mirror
from replfs.core.bitmap import ClusterBitmap
from replfs.core.digest import decode, decode_bits
from replfs.errors import BlockError, PeerMismatch, PeerUnavailable, ReplfsError
from replfs.jobs.resync import SyncProgress, resync
from replfs.jobs.stream import Streamer
from replfs.jobs.verify import SecondaryFailed, VerifyProgress
from replfs.jobs.verify import verify as verify_job
from replfs.nbd.errors import ControlRefused, ControlUnsupported
from replfs.replication.controller import Controller
from replfs.replication.persist import DiskState, decide
from replfs.replication.stage import Op, ReplicationStage, Role

log = logging.getLogger("replfs.primary")

R, Y, D, F, S = (ReplicationStage.REPLICATING, ReplicationStage.SYNCING,
                 ReplicationStage.DEGRADED, ReplicationStage.FAILED_OVER,
                 ReplicationStage.STOPPED)

RECONNECT_FIRST = 0.5
#: Seconds between two ``resync`` progress events.
SYNC_EVENT_INTERVAL = 1.0
#: How long ``connect`` keeps trying a secondary that is not ready yet.
CONNECT_PATIENCE = 3.0
#: Ranges of a secondary's overwritten writes named in the log and status.
MAX_RANGES_REPORTED = 64
#: The write protocols (``--protocol``); "sync" is the default.
PROTOCOLS = ("sync", "checkpoint")
#: Default ``--max-lag``: bytes queued before writes wait (checkpoint mode).
MAX_LAG = 64 * 1024 * 1024


class Control(Protocol):
    failure: Exception | None

    async def call(self, request: dict) -> dict: ...

    async def wait_closed(self) -> None: ...


class Session(Protocol):
    """A connection to a secondary: the control channel (None for a plain NBD
    server), then - once the handshake agreed - a peer node per disk."""

    target: str
    control: Control | None

    async def open_peers(self) -> dict[str, BlockNode]: ...

    def abort(self) -> None: ...

    async def aclose(self) -> None: ...


#: ``connector(target, nursery) -> Session``; raises ReplfsError when it cannot.
Connector = Callable[[str, trio.Nursery], Awaitable[Session]]


class SplitBrain(PeerMismatch):
    """The two images both took writes the other lacks: refused."""


class PrimaryController(Controller):
    """The replication state of one primary mount (all its disks)."""

    role = Role.PRIMARY

    def __init__(self, secondary: str, timeout: float, *, connector: Connector | None = None,
                 reconnect_interval: float = 5.0, resync_rate: float | None = None,
                 protocol: str = "sync", max_lag: int = MAX_LAG) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}")
        self.protocol = protocol
        self.max_lag = max_lag
        #: The checkpoint protocol's streamer while "replicating", else None.
        self.streamer: Streamer | None = None
        self._stream_scope: trio.CancelScope | None = None
        self.last_checkpoint_drain_s: float | None = None
        self.secondary = secondary
        self.timeout = timeout
        self.connector = connector
        self.reconnect_interval = reconnect_interval
        self.resync_rate = resync_rate
        self.disks: dict[str, Mirror] = {}
        self.images: dict[str, str] = {}
        self.states: dict[str, DiskState] = {}
        self.session: Session | None = None
        self.want_connected = True
        self.reconnect_error: str | None = None
        self.generation_check: str | None = None
        #: disk -> the secondary's own writes the running resync overwrites
        self.discarding: dict[str, dict] = {}
        #: disk -> what the last pairing decided, and why (status ``pairing``)
        self.pairing: dict[str, dict] = {}
        self.sync: SyncProgress | None = None
        self._sync_reported: SyncProgress | None = None
        #: The last verify's progress and result (the status's ``verify``).
        self.verifying: VerifyProgress | None = None
        self._verify_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._resync_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        self._connecting = trio.Lock()
        self._shut_down = False

    def attach(self, disks: dict[str, Mirror], images: dict[str, str],
               states: dict[str, DiskState] | None = None) -> None:
        self.disks = disks
        self.images = images
        self.states = states or {}

    @property
    def peer_connected(self) -> bool:
        return any(d.peer is not None for d in self.disks.values())

    @property
    def reconnect(self) -> str | None:
        """"retrying" while degraded, "off" after disconnect, else None."""
        if not self.want_connected:
            return "off"
        return "retrying" if self.stage is D and self.connector is not None else None

    def start_degraded(self, reason: str) -> None:
        """Start without a secondary (``--allow-degraded-start``): every write
        is recorded from the first one, in a new generation; the reconnect
        loop looks for the secondary.  Call it once ``run()`` has started."""
        self.stage = D
        self._update_degraded()
        self.record_error(reason)
        self._spawn(self._diverged)
        self._poke()

    # -- the background: watchdog, reconnects, follow-ups ---------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The background tasks, until :meth:`shutdown` (or cancelled)."""
        self._stopped = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.watchdog)
                if self.connector is not None:
                    nursery.start_soon(self._reconnect_loop)
                task_status.started()
        finally:
            self._nursery = None
            self._stopped.set()

    async def watchdog(self) -> None:
        """Give up on the secondary once a request has waited ``timeout``.

        A timer task rather than a cancel scope per request: cancelling a
        request cannot unblock a send that the peer stopped reading, but
        aborting the connection does, and it fails every request in flight."""
        tick = min(0.05, self.timeout / 10)
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for d in self.disks.values():
                if d.peer is not None and d.oldest_request_age(now) >= self.timeout:
                    self.peer_failed(
                        d, f"the secondary did not answer within {self.timeout:g} s")
                    break

    async def _reconnect_loop(self) -> None:
        delay = RECONNECT_FIRST
        while True:
            if not (self.stage is D and self.want_connected):
                self._wake = trio.Event()
                await self._wake.wait()
                delay = RECONNECT_FIRST
                continue
            try:
                await self._connect_now()
                delay = RECONNECT_FIRST
            except SplitBrain:
                self.want_connected = False  # no retries: the operator decides
            except (ReplfsError, BlockError, OSError) as exc:
                self.reconnect_error = str(exc)
                log.info("reconnect to %s failed: %s (next try in %.1f s)",
                         self.secondary, exc, min(delay, self.reconnect_interval))
                with trio.move_on_after(min(delay, self.reconnect_interval)):
                    self._wake = trio.Event()
                    await self._wake.wait()
                delay = min(delay * 2, self.reconnect_interval)

    def _poke(self) -> None:
        self._wake.set()

    def _spawn(self, fn, *args) -> None:
        """Start a background task, unless the background is stopping (the
        daemon goes away: nothing more to do)."""
        if self._nursery is None:
            return
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # the nursery is closing
            log.debug("not started (stopping): %s", getattr(fn, "__name__", fn))

    async def connect_at_start(self) -> None:
        """The first connection, before the mount goes live: the secondary
        must be reachable (``PeerUnavailable`` otherwise) and agree."""
        await self._connect_now()

    async def _connect_now(self) -> None:
        if self.connector is None or self._nursery is None:
            raise BlockError(errno.ENOTCONN, "connect: this primary cannot connect by itself")
        # One attempt at a time (the reconnect loop and a `connect` action
        # would otherwise pair twice, the second refused as a second writer).
        async with self._connecting:
            if self.session is not None:
                return  # the other attempt made it
            await self._connect_once()

    async def _connect_once(self) -> None:
        try:
            with trio.fail_after(max(self.timeout, 1.0) * 4):
                session = await self.connector(self.secondary, self._nursery)
                await self.establish(session)
        except trio.TooSlowError:
            raise PeerUnavailable(f"the secondary {self.secondary} did not answer in "
                                  f"time") from None

    # -- a session ------------------------------------------------------------------
    async def establish(self, session: Session) -> None:
        """Compare generations, attach the peers, resync what differs."""
        try:
            decisions = await self._handshake(session)
        except BaseException:
            session.abort()
            raise
        control = session.control
        for name, st in self.states.items():
            dec = decisions.get(name)
            if st.header.current == 0:
                await st.new_generation()
            if dec is not None and dec.action == "full":
                st.record.mark_all()
            log.info("disk %s: %s", name, dec.reason if dec else "plain NBD secondary: "
                     "its dirty record is resynced")
        try:
            peers = await session.open_peers()
        except BaseException:
            session.abort()
            raise
        for name, d in self.disks.items():
            d.attach_peer(peers[name])
        self.session = session
        self.note_peer()
        self.sync = SyncProgress(total_bytes=self._total_out_of_sync())
        self.enter(Y)
        self.reconnect_error = None
        if control is not None:
            self._spawn(self._watch, session)
        try:
            if self._total_out_of_sync() == 0:
                await self._sync_done(session)
                return
            if control is not None:
                await control.call({"op": "sync-start",
                                    "total_bytes": self._total_out_of_sync(),
                                    "discarded": self.discarding or None})
        except (BlockError, ReplfsError) as exc:  # the link died right away
            self.peer_failed(next(iter(self.disks.values())), f"connect: {exc}")
            raise
        self._spawn(self._resync, session)

    async def _handshake(self, session: Session) -> dict:
        control = session.control
        if control is None:
            self.generation_check = "skipped: the secondary speaks plain NBD (no replfs metadata)"
            return {}
        try:
            reply = await control.call({"op": "hello", "protocol": self.protocol, "disks": {
                n: st.describe() for n, st in self.states.items()}})
        except ControlUnsupported:  # a plain NBD server: no generations to compare
            control.abort()
            session.control = None
            return await self._handshake(session)
        except ControlRefused as exc:  # e.g. a failed-over secondary: split brain
            text = f"the secondary refused: {exc.message}"
            if "split brain" in text:
                self.record_error(text)
                raise SplitBrain(text) from None
            raise ReplfsError(text) from None
        peer_disks = reply["disks"]
        missing = [n for n in self.states if n not in peer_disks]
        if missing:
            raise PeerMismatch(f"the secondary {self.secondary} has no disk named "
                               f"{', '.join(missing)} (it has: {', '.join(peer_disks)})")
        decisions = {n: decide(n, st.describe(), peer_disks[n]) for n, st in self.states.items()}
        split = [d.reason for d in decisions.values() if d.action == "split-brain"]
        if split:
            line = (f"{'; '.join(split)}: refused, nothing written; keep the side whose data "
                    f"is wanted and start the other afresh from a copy of it")
            try:
                await control.call({"op": "refuse", "reason": line})
            except (ReplfsError, BlockError):
                pass
            self.record_error(line)
            raise SplitBrain(line)
        self.generation_check = "ok"
        self.pairing = {n: {"resync": d.action, "why": d.reason} for n, d in decisions.items()}
        self.discarding = {}
        for name, dec in decisions.items():
            st = self.states[name]
            if peer_disks[name].get("crashed") and dec.action in ("record", "reprotect"):
                # its page cache may have lost recent writes
                st.record.suspect_extents(list(st.al.hot))
            if dec.action in ("record", "reprotect") and peer_disks[name].get("own_changes"):
                await self._take_peer_changes(control, name, st)
        return decisions

    async def _take_peer_changes(self, control, name: str, st: DiskState) -> None:
        """The secondary's own changes since the common generation (an old
        primary's writes, a failover's) join this disk's record: the resync
        overwrites them.  What it throws away is said (bytes, ranges)."""
        reply = await control.call({"op": "own-changes", "disk": name})
        rec = st.record
        if int(reply.get("cluster_size", 0)) != rec.cluster_size:
            rec.mark_all()
            log.warning("disk %s: the secondary's cluster size differs: a full resync", name)
            return
        bits = ClusterBitmap.from_bytes(rec.nclusters, decode_bits(
            reply["bits"], (rec.nclusters + 7) // 8))
        ranges, total = [], 0
        for c0, c1 in bits.set_runs():
            off, length = rec.span(c0, c1)
            rec.mark(off, length)
            total += length
            if len(ranges) < MAX_RANGES_REPORTED:
                ranges.append([off, length])
        if reply.get("al"):
            rec.suspect_extents(reply["al"])
        if total or reply.get("al"):
            self.discarding[name] = {"bytes": total, "ranges": ranges,
                                     "suspect_extents": len(reply.get("al") or ())}
            log.warning("disk %s: the secondary's own writes are overwritten: %d bytes in "
                        "%d ranges%s", name, total, len(ranges),
                        f", {len(reply['al'])} extents compared" if reply.get("al") else "")

    async def _watch(self, session: Session) -> None:
        """Fresh health while idle: the control connection ending (the
        secondary died, its host vanished: keepalive) fails the session at
        once, not at the next write."""
        await session.control.wait_closed()
        if self.session is session:
            d = next(iter(self.disks.values()))
            why = session.control.failure or "closed"
            self.peer_failed(d, f"the secondary's control connection ended: {why}")

    def _total_out_of_sync(self) -> int:
        return sum(st.record.out_of_sync_bytes for st in self.states.values()
                   if st.record is not None)

    async def _resync(self, session: Session) -> None:
        progress = self.sync or SyncProgress()
        self.sync = progress
        self._spawn(self._report_sync, progress)
        with trio.CancelScope() as scope:
            self._resync_scope = scope
            try:
                await resync([(n, self.disks[n], st.record) for n, st in self.states.items()],
                             digests=self._digests(session), rate=self.resync_rate,
                             progress=progress)
                if self.session is session:
                    await self._sync_done(session)
            except Exception as exc:  # the peer failed (or a bug): never the daemon
                if not isinstance(exc, (BlockError, ReplfsError)):
                    log.error("resync: unexpected error", exc_info=exc)
                if self.session is session:
                    d = next(iter(self.disks.values()))
                    self.peer_failed(d, f"resync failed: {exc}")
            finally:
                self._resync_scope = None

    async def _report_sync(self, progress: SyncProgress) -> None:
        """``resync`` events while ``progress`` is the running resync's (one
        reporter per progress: a restarted resync keeps its reporter)."""
        if self._sync_reported is progress:
            return
        self._sync_reported = progress
        try:
            while self.sync is progress:
                if self.events.readers:
                    self.events.publish("resync", **progress.status(trio.current_time()))
                await trio.sleep(SYNC_EVENT_INTERVAL)
        finally:
            if self._sync_reported is progress:
                self._sync_reported = None

    def _digests(self, session: Session):
        control = session.control
        if control is None:
            return None

        async def digests(disk: str, offset: int, length: int) -> list[int]:
            reply = await control.call({"op": "digests", "disk": disk, "offset": offset,
                                        "length": length, "cluster_size":
                                        self.states[disk].record.cluster_size})
            return decode(reply["digests"])

        return digests

    async def _sync_done(self, session: Session) -> None:
        """Both sides hold the same data: one generation again."""
        gens = {}
        for name, st in self.states.items():
            await st.persist_bits()
            gens[name] = st.header.current
        if session.control is not None:
            await session.control.call({"op": "sync-done", "generations": gens})
        for st in self.states.values():
            if st.header.bitmap_gen or st.fresh or st.header.failover:
                # one generation with the secondary again: a failover that
                # made this image a primary is history now
                await st.update(bitmap_gen=0, failover="")
                st.fresh = False
        if self.sync is not None and self.sync.total_bytes:
            self.events.publish("resync", **self.sync.status(trio.current_time()), done=True)
        self.sync = None
        self.enter(R)
        self.last_error = None
        log.info("in sync with the secondary %s: replicating", self.secondary)

    # -- stage ------------------------------------------------------------------------
    def _configure(self, stage: ReplicationStage) -> None:
        if stage is R and self.protocol == "checkpoint":
            self._start_stream()
        else:
            self._stop_stream()
        if self.verdict(Op.REPLICATE).allowed:
            return
        for d in self.disks.values():
            peer = d.drop_peer()
            if peer is not None:
                peer.abort()
        if self._resync_scope is not None:
            self._resync_scope.cancel()
        self.sync = None
        session, self.session = self.session, None
        if session is not None:
            session.abort()
        if stage in (D, F):
            self._spawn(self._diverged)
        self._poke()
        self.note_peer()

    # -- the checkpoint protocol's streamer -----------------------------------------------
    def _start_stream(self) -> None:
        if self.streamer is not None or self._nursery is None:
            return
        streamer = Streamer(list(self.disks.values()), max_lag=self.max_lag,
                            on_error=self.peer_failed)
        streamer.start()
        self.streamer = streamer
        self._stream_scope = trio.CancelScope()
        self._spawn(self._run_stream, streamer, self._stream_scope)

    async def _run_stream(self, streamer: Streamer, scope: trio.CancelScope) -> None:
        with scope:
            await streamer.run()

    def _stop_stream(self) -> None:
        """Off the write path at once; the round under way is cancelled (the
        peer is being dropped, or :meth:`_finish_stream` ended it first)."""
        streamer, self.streamer = self.streamer, None
        if streamer is not None:
            streamer.stop()
        if self._stream_scope is not None:
            self._stream_scope.cancel()
            self._stream_scope = None

    async def _finish_stream(self) -> None:
        """End the streamer after its round under way (acknowledged), so that no
        copy of it reaches the secondary after a write mirrored in sync."""
        streamer = self.streamer
        if streamer is not None:
            with trio.move_on_after(max(self.timeout, 1.0) * 4):
                await streamer.finish()
            self._stop_stream()

    @property
    def lag_bytes(self) -> int:
        return self.streamer.lag_bytes if self.streamer is not None else 0

    async def _barrier(self, stack) -> None:
        """Hold every disk's write barrier (in ``stack``), in a fixed order."""
        for name in sorted(self.disks):
            await stack.enter_async_context(self.disks[name].barrier())

    async def _diverged(self) -> None:
        """This image goes on without the secondary: a new generation, and
        the record on disk."""
        for name, st in self.states.items():
            try:
                await st.new_generation()
                await st.persist_bits()
            except (OSError, ReplfsError) as exc:
                log.error("disk %s: cannot update the metadata: %s", name, exc)

    def peer_failed(self, disk: Mirror, reason: str) -> None:
        """One disk's secondary failed: the pair is no longer a pair."""
        if self.stage in (R, Y):
            self.record_error(f"disk {disk.name}: {reason}")
            log.error("continuing without the secondary")
            self.enter(D)
        else:
            self._configure(self.stage)

    def _keeps_last_error(self) -> bool:
        """Out of sync, ``last_error`` keeps why the primary degraded."""
        return self.stage in (D, Y) and self.last_error is not None

    # -- actions ------------------------------------------------------------------------
    def actions(self):
        return {**super().actions(), "connect": self.connect,
                "reprotect": self._reprotect_refused,
                "disconnect": self.disconnect, "resync": self.resync, "verify": self.verify}

    def sync_left(self) -> int:
        return self._total_out_of_sync()

    async def checkpoint(self, pair: bool = False) -> None:
        """A flush barrier on both sides; in checkpoint mode a drain under
        the write barrier; ``pair``: then the secondary's checkpoint, the
        barrier still held (both modes)."""
        if not self.admit(Op.CHECKPOINT):
            return
        session = self.session
        if pair and (session is None or session.control is None):
            raise BlockError(errno.EOPNOTSUPP, (
                "checkpoint --pair: the secondary speaks plain NBD (no replfs control "
                "channel, e.g. qemu-nbd or nbdkit): it cannot take a checkpoint from the "
                "primary; checkpoint it by its own means"))
        if not pair and self.streamer is None:
            for d in self.disks.values():  # sync mode: as it always was
                await d.flush()
            self.admit(Op.CHECKPOINT)  # the secondary may have failed meanwhile
            self._checkpointed(None)
        else:
            async with AsyncExitStack() as stack:
                started = trio.current_time()
                await self._barrier(stack)
                if self.streamer is not None:
                    await self.streamer.drain()
                for d in self.disks.values():  # local only in checkpoint mode
                    await d.flush()
                self.admit(Op.CHECKPOINT)  # the secondary may have failed meanwhile
                drained = trio.current_time() - started
                if pair:
                    await self._pair_checkpoint(session)
            self._checkpointed(drained if self.protocol == "checkpoint" else None)
        for st in self.states.values():
            await st.update(checkpoint=st.header.checkpoint + 1)

    def _checkpointed(self, drained: float | None) -> None:
        if drained is not None:
            self.last_checkpoint_drain_s = round(drained, 6)
            log.info("checkpoint: drained in %.3f s", drained)
        self.checkpoint_done()

    async def _pair_checkpoint(self, session: Session) -> None:
        """The secondary's checkpoint, over the control channel."""
        try:
            with trio.fail_after(max(self.timeout, 1.0) * 4):
                await session.control.call({"op": "checkpoint"})
        except ControlUnsupported:
            raise BlockError(errno.EOPNOTSUPP, "checkpoint --pair: the secondary does not "
                             "know the call (an older replfs?)") from None
        except ControlRefused as exc:
            raise BlockError(errno.EIO, f"checkpoint --pair: the secondary refused: "
                             f"{exc.message}") from None
        except trio.TooSlowError:
            raise BlockError(errno.ETIMEDOUT, "checkpoint --pair: the secondary did not "
                             "answer in time") from None
        except (ReplfsError, BlockError) as exc:
            raise BlockError(getattr(exc, "errno", None) or errno.EIO,
                             f"checkpoint --pair: {exc}") from None
        for st in self.states.values():
            await st.update(checkpoint=st.header.checkpoint + 1)

    async def failover(self) -> None:
        """Drop the secondary on purpose; the primary runs alone from now on."""
        if not self.admit(Op.FAILOVER):
            return
        for d in self.disks.values():
            await d.local.flush()
        await self._disconnect()
        for st in self.states.values():
            # this image goes on as the survivor: should the old secondary be
            # made a primary too, the two are a split brain
            await st.update(failover="done")
        self.enter(F)
        self.events.publish("failover", state=self.state)
        log.info("failover: the secondary is dropped; running alone")

    async def stop(self) -> None:
        """Orderly end of replication: flush both sides, disconnect."""
        if not self.admit(Op.STOP):
            return
        if self.stage is R:
            if self.streamer is not None:  # what is queued goes first
                async with AsyncExitStack() as stack:
                    await self._barrier(stack)
                    await self.streamer.drain()
            for d in self.disks.values():
                await d.flush()
        await self._disconnect()
        self.enter(S)

    async def connect(self, target: str | None = None) -> None:
        """Connect to the secondary now (``target``: another one)."""
        if target:
            self.secondary = target
        self.want_connected = True
        if not self.admit(Op.CONNECT):
            return
        deadline = trio.current_time() + CONNECT_PATIENCE
        try:
            while True:
                try:
                    await self._connect_now()
                    return
                except PeerUnavailable:
                    # e.g. the secondary has not yet seen the last connection go
                    if trio.current_time() > deadline or self.stage not in (D, F):
                        raise
                    await trio.sleep(0.2)
        except (ReplfsError, BlockError, OSError) as exc:
            self.reconnect_error = str(exc)
            self._poke()
            raise BlockError(getattr(exc, "errno", None) or errno.ECONNREFUSED,
                             f"connect: {exc}") from None

    async def disconnect(self) -> None:
        """Drop the secondary on purpose; no retries until ``connect``."""
        self.want_connected = False
        if not self.admit(Op.DISCONNECT):
            return
        await self._disconnect()
        if self.stage in (R, Y):
            self.enter(D)
        log.info("disconnected from the secondary on request; no retries until connect")

    async def resync(self, full: bool = False) -> None:
        """Resync now; ``full``: every cluster, whatever the record says."""
        if not self.admit(Op.RESYNC):
            return
        session = self.session
        if session is None:
            raise BlockError(errno.ENOTCONN, "resync: no secondary")
        if full:
            for st in self.states.values():
                st.record.mark_all()
        if self._resync_scope is not None:
            self._resync_scope.cancel()
            await trio.sleep(0)
        if self.stage is R:
            await self._finish_stream()
            self.enter(Y)
        if session.control is not None:
            await session.control.call({"op": "sync-start",
                                        "total_bytes": self._total_out_of_sync()})
        self._spawn(self._resync, session)

    async def verify(self, repair: bool = False, rate: float | None = None,
                     cancel: bool = False) -> None:
        """Compare every cluster with the secondary while the VM runs
        (:mod:`replfs.jobs.verify`); ``repair``: copy what differs.  The
        result stays in the status (``verify``); a secondary that fails
        during it degrades the pair, as a failed write does.  ``cancel``:
        stop the running verify (its caller gets ECANCELED); a no-op when
        none runs."""
        if cancel:
            if self._verify_scope is not None:
                self._verify_scope.cancel()
            return
        if not self.admit(Op.VERIFY):
            return
        session = self.session
        if session is None:
            raise BlockError(errno.ENOTCONN, "verify: no secondary")
        if self.verifying is not None and self.verifying.state == "running":
            raise BlockError(errno.EBUSY, "verify: a verify is already running")

        def check() -> None:  # before every window: still replicating, same secondary
            self.admit(Op.VERIFY)
            if self.session is not session:
                raise BlockError(errno.ENOTCONN, "verify: the secondary changed")

        self.verifying = progress = VerifyProgress()
        disks = [(n, d, d.record.cluster_size if d.record is not None else 64 * 1024)
                 for n, d in self.disks.items()]
        with trio.CancelScope() as scope:
            self._verify_scope = scope
            try:
                await verify_job(disks, digests=self._digests(session), repair=repair,
                                 rate=rate, progress=progress, check=check, events=self.events,
                                 timeout=max(4 * self.timeout, 10.0))
            except SecondaryFailed as exc:
                if self.session is session:
                    self.peer_failed(next(iter(self.disks.values())), str(exc))
                raise
            finally:
                self._verify_scope = None
        if scope.cancelled_caught:
            raise BlockError(errno.ECANCELED, "verify: cancelled")
        log.info("verify: %d bytes compared, %d ranges differ%s", progress.done_bytes,
                 progress.difference_count, ", repaired" if progress.repaired else "")

    async def _disconnect(self) -> None:
        if self._resync_scope is not None:
            self._resync_scope.cancel()
        for d in self.disks.values():
            peer = d.drop_peer()
            if peer is not None:
                await close_within(peer, self.timeout)
        session, self.session = self.session, None
        if session is not None:
            with trio.move_on_after(self.timeout):
                await session.aclose()
            session.abort()
        self.note_peer()

    async def abandon(self) -> None:
        """A primary that never paired goes away (a re-protect that failed):
        the background stops and any peer is dropped; the disks' metadata
        stays open for its owner."""
        self._shut_down = True
        self.want_connected = False
        await self._disconnect()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if hasattr(self, "_stopped"):
            await self._stopped.wait()

    async def _reprotect_refused(self, *args) -> None:
        self.admit(Op.REPROTECT)  # refused: a primary already

    async def shutdown(self) -> None:
        """On unmount: flush the images, disconnect cleanly (NBD DISC), stop
        the background, record on disk.  Idempotent."""
        if self._shut_down:
            return
        self._shut_down = True
        self.want_connected = False
        if self._resync_scope is not None:
            self._resync_scope.cancel()
        if self.streamer is not None:  # what is queued goes first, if it can
            with trio.move_on_after(max(self.timeout, 1.0) * 4):
                try:
                    await self.streamer.drain()
                except BlockError as exc:
                    log.warning("at exit, the queue stays in the dirty record: %s", exc)
            self._stop_stream()
        for d in self.disks.values():
            try:
                await d.flush()
            except BlockError as exc:
                log.error("disk %s: flush at exit failed: %s", d.name, exc)
        await self._disconnect()  # NBD DISC, while the clients' tasks still run
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        if hasattr(self, "_stopped"):
            await self._stopped.wait()
        for name, st in self.states.items():
            try:
                await st.close_clean()
            except (OSError, ReplfsError) as exc:
                log.error("disk %s: metadata at exit: %s", name, exc)

    def sync_status(self) -> dict | None:
        return self.sync.status(trio.current_time()) if self.sync is not None else None

    def peer_fields(self) -> dict:
        return {"secondary": self.secondary}

    def status(self) -> dict:
        return {
            **super().status(),
            "secondary": self.secondary,
            "protocol": self.protocol,
            "lag_bytes": self.lag_bytes,
            "max_lag": self.max_lag if self.protocol == "checkpoint" else None,
            "last_checkpoint_drain_s": self.last_checkpoint_drain_s,
            "stream": self.streamer.statistics() if self.streamer is not None else None,
            "reconnect": self.reconnect,
            "reconnect_error": self.reconnect_error,
            "generation_check": self.generation_check,
            "pairing": self.pairing or None,
            "discarding": self.discarding or None,
            "sync": self.sync_status(),
            "verify": (self.verifying.status(trio.current_time())
                       if self.verifying is not None else None),
            "disks": {
                name: {"size": d.size, "image": self.images[name], **d.statistics(),
                       **(self.states[name].status() if name in self.states else {})}
                for name, d in self.disks.items()
            },
        }


async def close_within(peer: BlockNode, timeout: float) -> None:
    """Disconnect cleanly (NBD DISC) if the peer lets us within ``timeout``;
    else abort the connection (a send to a stalled peer cannot be cancelled)."""
    async def guard():
        await trio.sleep(timeout)
        peer.abort()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard)
        try:
            await peer.aclose()
        except BlockError:
            pass
        nursery.cancel_scope.cancel()
