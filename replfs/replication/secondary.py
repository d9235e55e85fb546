"""The secondary host's controller: checkpoint, failover and stop over its graph.

Design note
-----------
The graph (:class:`~replfs.block.graph.SecondaryGraph`) takes the primary's
writes through the NBD export into the secondary disk, copying the old data
into *hidden* first, and serves the secondary VM's view as *active* over
that snapshot.  This controller decides what the graph accepts, from the
stage table (``replication/stage.py``), as ``replication.c`` does with its
stage enum:

* while "replicating" the export takes the primary's writes, and the NBD
  server admits one primary (:meth:`admit_primary`);
* "failed-over" and "stopped" make the exports refuse writes with
  ``ESHUTDOWN`` and the server refuse a primary with the table's reason;
* every action holds the mount's one gate, so it is atomic for all disks
  with respect to both kinds of I/O.

Failover configures the graph for "failed-over" (writes refused) *before*
its commits and enters the stage only once every disk is committed: a commit
that fails leaves the stage "replicating" with writes refused, and the
action can simply be run again (commits are idempotent).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from replfs.block.gated import GatedNode
from replfs.block.graph import SecondaryGraph
from replfs.errors import BlockError
from replfs.replication.controller import Controller
from replfs.replication.stage import Op, ReplicationStage, Role, verdict

log = logging.getLogger("replfs.secondary")


class SecondaryController(Controller):
    """The replication state of one secondary mount (all its disks)."""

    role = Role.SECONDARY

    def __init__(self) -> None:
        super().__init__()
        self.graph: SecondaryGraph | None = None
        self.listen: str | None = None
        self.server = None
        self._clients: dict[str, int] = {}  # export -> primaries connected
        #: Called after the view's content changed under open files.
        self.on_view_changed: Callable[[], Awaitable[None]] | None = None

    def attach(self, graph: SecondaryGraph) -> None:
        self.graph = graph

    @property
    def disks(self) -> dict:
        return self.graph.disks if self.graph is not None else {}

    @property
    def peer_connected(self) -> bool:
        return any(self._clients.values())

    # -- the primary ----------------------------------------------------------------
    def admit_primary(self, export: str, clients_now: int) -> str | None:
        """The NBD server's admission hook: None admits, else the reason."""
        v = self.verdict(Op.PEER_CONNECT)
        return None if v.allowed else v.message(Op.PEER_CONNECT, self.stage)

    def clients_changed(self, export: str, count: int) -> None:
        was = self.peer_connected
        self._clients[export] = count
        now = self.peer_connected
        if was and not now:
            log.warning("the primary disconnected (export %s)", export)
        elif now and not was:
            log.info("the primary connected (export %s)", export)

    def export_failed(self, node: GatedNode, op: str, exc: BlockError) -> None:
        self.record_error(f"{node.name}: primary's {op} failed: {exc}")

    # -- stage ----------------------------------------------------------------------
    def _configure(self, stage: ReplicationStage) -> None:
        v = verdict(self.role, stage, Op.REPLICATE)
        for d in self.disks.values():
            if v.allowed:
                d.export.allow_writes()
            else:
                d.export.refuse_writes(v.errno, f"{d.name}: {v.message(Op.REPLICATE, stage)}")

    # -- actions --------------------------------------------------------------------
    async def checkpoint(self) -> None:
        if not self.admit(Op.CHECKPOINT):
            return
        async with self.graph.gate.exclusive():
            await self._checkpoint_held()
        await self._view_changed()

    async def failover(self) -> None:
        if not self.admit(Op.FAILOVER):
            return
        async with self.graph.gate.exclusive():
            self._configure(ReplicationStage.FAILED_OVER)
            for d in self.disks.values():
                await d.failover()
            self.enter(ReplicationStage.FAILED_OVER)
        await self._disconnect_primary()
        await self._view_changed()
        log.info("failover: the view now runs on the secondary disks")

    async def stop(self) -> None:
        if not self.admit(Op.STOP):
            return
        async with self.graph.gate.exclusive():
            await self._checkpoint_held()
            self.enter(ReplicationStage.STOPPED)
        await self._disconnect_primary()
        await self._view_changed()

    async def _checkpoint_held(self) -> None:
        """Every disk's checkpoint; the caller holds the gate."""
        for d in self.disks.values():
            await d.checkpoint()
        self.checkpoints += 1

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
        self.graph.close()

    def status(self) -> dict:
        return {
            **super().status(),
            "listen": self.listen,
            "workdir": self.graph.workdir,
            "disks": {name: d.statistics() for name, d in self.disks.items()},
        }
