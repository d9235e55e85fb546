"""The secondary host's controller: checkpoint, failover and stop over its
graph, the pair's control channel, and what survives a restart.

Design note
-----------
The graph (:class:`~replfs.block.graph.SecondaryGraph`) takes the primary's
writes through the NBD export into the secondary disk, copying the old data
into *hidden* first, and serves the secondary VM's view as *active* over
that snapshot.  This controller decides what the graph accepts, from the
stage table (``replication/stage.py``), as ``replication.c`` does with its
stage enum:

* while "replicating", "syncing" or "inconsistent" the export takes the
  primary's writes (a resync's too), and the NBD server admits one primary
  (:meth:`admit_primary`); "failed-over" and "stopped" make the exports
  refuse writes with ``ESHUTDOWN`` and the server refuse a primary with the
  table's reason;
* every action holds the mount's one gate, so it is atomic for all disks
  with respect to both kinds of I/O.

What a restart must not lose, each image's metadata file keeps
(:mod:`replfs.replication.persist`), written before it takes effect:

* **the epoch**: before the first of the primary's writes after a
  checkpoint lands, ``epoch_dirty`` is persisted (the hidden overlay, the
  only way back to the checkpoint, lives in memory).  A secondary that
  restarts with a dirty epoch cannot give the checkpoint back: it is
  "inconsistent", ``failover_ready`` is false and failover is refused
  (``--force`` takes the disk as it is) until a resync from the primary and
  the next checkpoint have run;
* **the failover**: a new generation and ``failover: committing`` are
  persisted, with the overlays made durable and their bits saved beside them,
  before the commit writes the disk; ``failover: done`` after.  A restart in
  the middle resumes the commit from the saved overlays; a restart after it
  serves the view on the disk and still refuses the old primary;
* **generations**: the control channel's ``hello`` gives them to the
  primary, which decides (a resync, or a split brain refused on both sides),
  and ``sync-done`` makes this image take the primary's generation.

Failover configures the graph for "failed-over" (writes refused) *before*
its commits and enters the stage only once every disk is committed: a commit
that fails leaves the stage as it was with writes refused, and the action can
simply be run again (commits are idempotent).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable

from replfs.block.gated import GatedNode
from replfs.block.graph import SecondaryDisk, SecondaryGraph
from replfs.block.mirror import Mirror
from replfs.core.bitmap import ClusterBitmap
from replfs.core.digest import cluster_digests, encode, encode_bits
from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd.errors import ControlRefused
from replfs.replication.controller import Controller
from replfs.replication.persist import DiskState, gen
from replfs.replication.stage import Op, ReplicationStage, Role, verdict

log = logging.getLogger("replfs.secondary")

R, Y, I, F, S = (ReplicationStage.REPLICATING, ReplicationStage.SYNCING,
                 ReplicationStage.INCONSISTENT, ReplicationStage.FAILED_OVER,
                 ReplicationStage.STOPPED)

MAX_DIGEST_RANGE = 256 * 1024 * 1024


class SecondaryController(Controller):
    """The replication state of one secondary mount (all its disks)."""

    role = Role.SECONDARY

    def __init__(self, *, discard_my_data: bool = False) -> None:
        super().__init__()
        #: ``--discard-my-data``: this image's own writes since the common
        #: generation (a failover's, an old primary's) give way to the primary.
        self.discard_my_data = discard_my_data
        #: What a resync overwrote of this image's own writes (status).
        self.discarded: dict | None = None
        #: ``await become_primary(target)``: the daemon turns this failed-over
        #: mount into a primary of ``target`` (re-protect); None in tests
        #: that do not re-protect.
        self.become_primary: Callable[[str], Awaitable[None]] | None = None
        self.graph: SecondaryGraph | None = None
        self.states: dict[str, DiskState] = {}
        self.listen: str | None = None
        self.server = None
        self.failover_ready = True
        self.sync: dict | None = None
        self._clients: dict[str, int] = {}  # export -> primaries connected
        #: The primary's write protocol (its ``hello`` says): in "checkpoint"
        #: mode a checkpoint asked here alone is refused (writes may be
        #: queued on the primary); the primary's ``checkpoint --pair`` runs it.
        self.protocol = "sync"
        #: Called after the view's content changed under open files.
        self.on_view_changed: Callable[[], Awaitable[None]] | None = None

    def attach(self, graph: SecondaryGraph, states: dict[str, DiskState] | None = None) -> None:
        self.graph = graph
        self.states = states or {}

    @property
    def disks(self) -> dict:
        return self.graph.disks if self.graph is not None else {}

    @property
    def peer_connected(self) -> bool:
        return any(self._clients.values())

    # -- start-up: what the last run left ----------------------------------------------
    @staticmethod
    def resume_of(states: dict[str, DiskState], workdir: str) -> dict:
        """Saved overlays of an interrupted failover, by disk (graph's ``resume``)."""
        out = {}
        for name, st in states.items():
            if st.header.failover == "committing":
                saved = SecondaryDisk.load_saved(workdir, name)
                if saved is not None:
                    out[name] = saved
        return out

    async def recover(self, resumed: frozenset[str] = frozenset()) -> None:
        """Before serving: finish or report what the last run left.
        ``resumed``: disks whose interrupted failover has its overlays back."""
        states = self.states
        if self.discard_my_data:
            await self._discard_failover(resumed)
        interrupted = {n for n, st in states.items() if st.header.failover == "committing"}
        if interrupted - resumed:
            self.stage, self.failover_ready = I, False
            self.record_error(
                f"failover of {', '.join(sorted(interrupted - resumed))} was interrupted "
                f"and the overlays it needs are gone: the disk is neither the checkpoint "
                f"nor the primary's; `replfs failover --force` takes it as it is")
            return
        if interrupted or any(st.header.failover == "done" for st in states.values()):
            if interrupted:
                log.warning("resuming the failover a crash interrupted: %s",
                            ", ".join(sorted(interrupted)))
            await self.failover(force=True)
            return
        if any(st.header.epoch_dirty for st in states.values()):
            self.stage, self.failover_ready = I, False
            log.warning("the primary wrote since the last checkpoint and this daemon "
                        "restarted: inconsistent until a resync and a checkpoint")

    async def _discard_failover(self, resumed: frozenset[str]) -> None:
        """``--discard-my-data`` on an image that failed over: it is a plain
        secondary again, inconsistent until the primary's resync has
        overwritten what it changed on its own (its dirty record, kept)."""
        for name, st in self.states.items():
            if st.header.failover:
                await st.update(failover="")
                if name in resumed:
                    self.disks[name].drop_saved()
                self.failover_ready = False
                log.warning("disk %s: --discard-my-data: the failover is given up; this "
                            "image's own writes will be overwritten by the primary's resync",
                            name)
        if not self.failover_ready:
            self.stage = I

    # -- the primary ----------------------------------------------------------------
    def admit_primary(self, export: str, clients_now: int) -> str | None:
        """The NBD server's admission hook: None admits, else the reason."""
        v = self.verdict(Op.PEER_CONNECT)
        return None if v.allowed else self._split_brain_text(v.message(Op.PEER_CONNECT,
                                                                       self.stage))

    def _split_brain_text(self, text: str) -> str:
        if self.stage is F and self.states:
            gens = ", ".join(f"{n} {gen(st.header.current)}" for n, st in self.states.items())
            return f"{text} (its generation: {gens})"
        return text

    def clients_changed(self, export: str, count: int) -> None:
        was = self.peer_connected
        self._clients[export] = count
        now = self.peer_connected
        if was and not now:
            log.warning("the primary disconnected (export %s)", export)
            if self.stage is Y:  # an unfinished resync: back to what we were
                self.enter(R if self.failover_ready else I)
                self.sync = None
        elif now and not was:
            log.info("the primary connected (export %s)", export)
        self.note_peer()

    def export_failed(self, node: GatedNode, op: str, exc: BlockError) -> None:
        self.record_error(f"{node.name}: primary's {op} failed: {exc}")

    async def before_first_write(self, name: str) -> None:
        """The primary's first write of an epoch on disk ``name``: persist
        that the disk no longer equals the last checkpoint."""
        st = self.states.get(name)
        if st is not None and not st.header.epoch_dirty:
            await st.update(epoch_dirty=True)

    async def control(self, request: dict, peer) -> dict:
        """The control channel (NBD_OPT_X_REPLFS): one request, one answer."""
        op = request.get("op")
        if op == "hello":
            refusal = self.admit_primary("", 0)
            if refusal is not None:
                self.record_error(f"refused a primary ({peer[0]}:{peer[1]}): {refusal}"
                                  if peer else f"refused a primary: {refusal}")
                raise ControlRefused(P.NBD_REP_ERR_POLICY, refusal)
            self.protocol = "checkpoint" if request.get("protocol") == "checkpoint" else "sync"
            return {"disks": {n: st.describe() for n, st in self.states.items()},
                    "state": self.state}
        if op == "own-changes":
            st = self.states.get(request.get("disk"))
            if st is None:
                raise ControlRefused(P.NBD_REP_ERR_INVALID, f"bad request {request!r}")
            bits, extents = st.own_changes()
            return {"bits": encode_bits(bits), "al": extents,
                    "cluster_size": st.header.cluster_size}
        if op == "writer":
            # The primary's data connection identifies itself before NBD_OPT_GO
            # (the NBD server then admits it as the export's one writer; any
            # other client of the export is a read-only observer).
            refusal = self.admit_primary(str(request.get("disk", "")), 0)
            if refusal is not None:
                raise ControlRefused(P.NBD_REP_ERR_POLICY, refusal)
            return {"writer": True}
        if op == "refuse":
            self.record_error(f"the primary refused to pair: {request.get('reason')}")
            return {}
        if op == "sync-start":
            if self.stage in (R, I):
                self.enter(Y)
            self.sync = {"total_bytes": int(request.get("total_bytes", 0))}
            if request.get("discarded"):
                self.discarded = request["discarded"]
                log.warning("the primary's resync overwrites this image's own writes: %s",
                            self.discarded)
            self.events.publish("resync", **self.sync)
            return {}
        if op == "digests":
            return {"digests": encode(await self._digests(request))}
        if op == "sync-done":
            await self._sync_done(request.get("generations", {}))
            return {}
        if op == "checkpoint":  # the primary's `checkpoint --pair`: it has drained
            try:
                await self._checkpoint()
            except BlockError as exc:
                self.record_refusal(str(exc))
                raise ControlRefused(P.NBD_REP_ERR_INVALID, str(exc)) from None
            return {"checkpoints": self.checkpoints}
        raise ControlRefused(P.NBD_REP_ERR_INVALID, f"unknown control request {op!r}")

    async def _digests(self, request: dict) -> list[int]:
        """Digests of the secondary disk in the *primary's* clusters (its dirty
        record's granularity, which this side's copy-before-write need not share)."""
        d = self.disks.get(request.get("disk"))
        offset, length = int(request.get("offset", -1)), int(request.get("length", -1))
        cs = int(request.get("cluster_size", 0))
        if d is None or offset < 0 or not 0 < length <= MAX_DIGEST_RANGE \
                or offset + length > d.size or cs < 512 or cs & (cs - 1):
            raise ControlRefused(P.NBD_REP_ERR_INVALID, f"bad digest request {request!r}")
        data = await d.cbw.read(offset, length)  # the disk, consistent with copies
        return cluster_digests(data, cs)

    async def _sync_done(self, generations: dict) -> None:
        for name, g in generations.items():
            st = self.states.get(name)
            if st is not None and st.header.current != g:
                h = st.header
                history = ([h.current] if h.current else []) + list(h.history)
                extra = {k: v for k, v in h.extra.items() if k != "full_resync"}
                await st.update(current=int(g), bitmap_gen=0, history=history[:4], extra=extra)
                st.fresh = False
            if st is not None:
                await st.forget_own_changes()
        if self.stage in (Y, I):
            self.enter(R)
        self.sync = None
        log.info("in sync with the primary%s", "" if self.failover_ready else
                 "; failover is refused until the next checkpoint")

    # -- stage ----------------------------------------------------------------------
    def _configure(self, stage: ReplicationStage) -> None:
        v = verdict(self.role, stage, Op.REPLICATE)
        for d in self.disks.values():
            if v.allowed:
                d.export.allow_writes()
            else:
                d.export.refuse_writes(v.errno, f"{d.name}: {v.message(Op.REPLICATE, stage)}")

    def sync_left(self) -> int | str:
        return self.sync.get("total_bytes", "?") if self.sync else "?"

    # -- actions --------------------------------------------------------------------
    async def checkpoint(self, pair: bool = False) -> None:
        if pair:
            raise BlockError(errno.EINVAL, "checkpoint --pair: run it on the primary "
                             "(`replfs checkpoint PRIMARY_MOUNT --pair`)")
        if self.protocol == "checkpoint" and self.admit(Op.CHECKPOINT):
            raise BlockError(errno.EBUSY, (
                "checkpoint: in checkpoint mode the primary may still have writes queued: "
                "run `replfs checkpoint PRIMARY --pair` on the primary"))
        await self._checkpoint()

    async def _checkpoint(self) -> None:
        if not self.admit(Op.CHECKPOINT):
            return
        async with self.graph.gate.exclusive():
            await self._checkpoint_held()
        await self._view_changed()

    async def failover(self, force: bool = False) -> None:
        if not self.admit(Op.FAILOVER):
            return
        if not self.failover_ready and not force:
            raise BlockError(errno.ENODATA, (
                f"failover: this secondary cannot give back the last checkpoint (state "
                f"{self.state}): it restarted after the primary wrote since that checkpoint, "
                f"and no resync and checkpoint have run since; `replfs failover --force` "
                f"takes the secondary disk as it is"))
        unknown = not self.failover_ready
        async with self.graph.gate.exclusive():
            self._configure(F)
            for name, d in self.disks.items():
                st = self.states.get(name)
                was = st.header.failover if st is not None else ""
                if st is not None and was != "done":
                    await self._record_failover_changes(name, d, st, unknown)
                if st is not None and was == "":
                    await d.save_overlays()
                    await st.new_generation(keep_bitmap_gen=False, failover="committing")
                top = None
                if st is not None:
                    # from now on the VM's writes are recorded (a re-protect sends them)
                    st.start_tracking()
                    top = Mirror(name, d.disk, None, on_peer_error=self.no_peer,
                                 record=st.record, al=st.al)
                await d.failover(top)  # after a restart with "done": just the pivot
                if st is not None and was != "done":
                    await st.update(failover="done", epoch_dirty=False)
                d.drop_saved()
            self.enter(F)
        await self._disconnect_primary()
        await self._view_changed()
        self.events.publish("failover", state=self.state)
        log.info("failover: the view now runs on the secondary disks")

    async def _record_failover_changes(self, name: str, d: SecondaryDisk, st: DiskState,
                                       unknown: bool) -> None:
        """Before the commit: what the failover changes against the primary's
        disk goes into this image's dirty record (on disk), counted from the
        generation the two shared; a re-protect resyncs it.  ``unknown``:
        forced while inconsistent, the difference is not known: a re-protect
        copies everything (said in the metadata, with why)."""
        h = st.header
        bits = ClusterBitmap.from_bytes(h.nclusters, st.meta.read_bitmap())
        for offset, length in d.changed_clusters(h.cluster_size):
            bits.set_range(offset // h.cluster_size, -(-(offset + length) // h.cluster_size))
        await st.write_bits(bits.to_bytes())
        if unknown and not h.extra.get("full_resync"):
            await st.update(extra={**h.extra, "full_resync": (
                "failed over with --force while inconsistent: which clusters differ "
                "from the old primary is not known")})

    def no_peer(self, disk, reason: str) -> None:  # pragma: no cover - no peer edge
        log.error("disk %s: %s", disk.name, reason)

    def hand_over(self) -> None:
        """Re-protected: the mount's new primary controller owns the disks'
        metadata now; this one only closes the graph at exit, and its NBD
        server lets no primary in any more."""
        self.states = {}
        if self.server is not None:
            self.server.set_accepting(False)

    async def reprotect(self, target: str | None = None) -> None:
        """A failed-over mount becomes the primary of ``target`` (the old
        primary, restarted as a secondary), while its VM keeps running: only
        what diverged since the last common generation is sent."""
        if not self.admit(Op.REPROTECT):
            return
        if not target:
            raise BlockError(errno.EINVAL, "reprotect: which secondary? (HOST:PORT)")
        if self.become_primary is None:
            raise BlockError(errno.EOPNOTSUPP, "reprotect: not supported by this daemon")
        await self.become_primary(target)

    def actions(self):
        return {**super().actions(), "connect": self._primary_only, "reprotect": self.reprotect,
                "disconnect": self._primary_only, "resync": self._primary_only,
                "verify": self._verify_refused}

    async def _primary_only(self, *args) -> None:
        self.admit(Op.RESYNC)  # refused: "run it on the primary"

    async def _verify_refused(self, *args) -> None:
        self.admit(Op.VERIFY)  # refused: "verify: run it on the primary"

    async def stop(self) -> None:
        if not self.admit(Op.STOP):
            return
        async with self.graph.gate.exclusive():
            await self._checkpoint_held()
            self.enter(S)
        await self._disconnect_primary()
        await self._view_changed()

    async def _checkpoint_held(self) -> None:
        """Every disk's checkpoint; the caller holds the gate."""
        for d in self.disks.values():
            await d.checkpoint()
        for name, st in self.states.items():
            await st.update(epoch_dirty=False, checkpoint=st.header.checkpoint + 1)
        for d in self.disks.values():
            d.first_write.arm()
        self.failover_ready = True
        self.checkpoint_done()

    async def _disconnect_primary(self) -> None:
        if self.server is not None:
            await self.server.close_all()

    async def _view_changed(self) -> None:
        if self.on_view_changed is not None:
            await self.on_view_changed()

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.set_accepting(False)
            await self.server.close_all()
        for d in self.disks.values():
            try:
                await d.disk.flush()
            except BlockError as exc:
                log.error("disk %s: flush at exit failed: %s", d.name, exc)
        keep = frozenset(n for n, st in self.states.items()
                         if st.header.failover == "committing")
        for name, st in self.states.items():
            try:
                await st.close_clean()
            except OSError as exc:
                log.error("disk %s: metadata at exit: %s", name, exc)
        self.graph.close(keep=keep)

    def sync_status(self) -> dict | None:
        return self.sync

    def peer_fields(self) -> dict:
        return {"listen": self.listen}

    def status(self) -> dict:
        return {
            **super().status(),
            "discarded": self.discarded,
            "protocol": self.protocol,
            "listen": self.listen,
            "workdir": self.graph.workdir,
            "failover_ready": self.failover_ready,
            "sync": self.sync,
            "disks": {name: {**d.statistics(),
                             **(self.states[name].status() if name in self.states else {})}
                      for name, d in self.disks.items()},
        }

