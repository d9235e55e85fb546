"""The secondary host: the secondary disk, hidden and active, and the actions.

Design note
-----------
The graph of one disk, in QEMU's names (docs/design.md draws it)::

    NBD export NAME --> [gate] --> copy-before-write --> secondary disk (IMAGE)
                                          |  old data, once per epoch
                                          v
    view MOUNT/NAME --> [gate] --> active overlay --> snapshot = hidden-if-copied
                                                     else secondary disk

* The primary's writes arrive over NBD and land in IMAGE, after the
  copy-before-write layer has saved what they overwrite into *hidden*.
* The secondary VM's writes land in *active*; its reads see active over the
  snapshot, i.e. the last checkpoint plus its own writes.
* Every request from either side passes the mount's :class:`~replfs.gate.Gate`;
  checkpoint, failover and stop close the gate, so they are atomic for all
  disks with respect to both kinds of I/O.

The stage decides what is allowed (as ``replication.c`` does with its stage
enum): while "replicating", NBD writes are taken; after "failed-over" or
"stopped", the copy-before-write layer refuses them with ``ESHUTDOWN`` and
the NBD server takes no new connections.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil

from replfs.block.base import BlockNode
from replfs.block.fault import FaultLayer
from replfs.block.raw import RawImage
from replfs.block.secondary import SecondaryStack
from replfs.controller import Controller
from replfs.errors import BlockError
from replfs.gate import Gate

log = logging.getLogger("replfs.secondary")

CLUSTER_SIZE = 64 * 1024


class GatedNode(BlockNode):
    """The edge of the graph: every request passes the gate.  ``child`` may be
    replaced while the gate is held exclusively (failover does)."""

    def __init__(self, child: BlockNode, gate: Gate, name: str) -> None:
        self.child = child
        self.gate = gate
        self.size = child.size
        self.name = name
        #: ``on_error(node, op, exc)``: called for every failed request.
        self.on_error = None

    async def _io(self, op: str, *args):
        await self.gate.enter()
        try:
            return await getattr(self.child, op)(*args)
        except BlockError as exc:
            if self.on_error is not None:
                self.on_error(self, op, exc)
            raise
        finally:
            self.gate.leave()

    async def read(self, offset, length):
        return await self._io("read", offset, length)

    async def write(self, offset, data, fua=False):
        await self._io("write", offset, data, fua)

    async def write_zeroes(self, offset, length, fua=False):
        await self._io("write_zeroes", offset, length, fua)

    async def trim(self, offset, length):
        await self._io("trim", offset, length)

    async def flush(self):
        await self._io("flush")

    def allocation(self, offset, length):
        return self.child.allocation(offset, length)


class SecondaryDisk:
    """One disk: its stack (replfs/block/secondary.py) behind the mount's gate."""

    def __init__(self, name: str, image: str, workdir: str, gate: Gate,
                 cluster_size: int = CLUSTER_SIZE, faults: str | None = None) -> None:
        self.name = name
        self.image = image
        raw = RawImage(image, name=f"{name}:secondary-disk")
        if faults:  # tests: errors injected below everything, like blkdebug
            raw = FaultLayer(raw, faults)
        self.size = raw.size
        self.stack = SecondaryStack(raw, os.path.join(workdir, f"{name}.hidden"),
                                    os.path.join(workdir, f"{name}.active"),
                                    cluster_size=cluster_size, name=name)
        self.export = GatedNode(self.stack.export, gate, f"{name}:export")
        self.view = GatedNode(self.stack.view, gate, f"{name}:view")

    def statistics(self) -> dict:
        st = self.stack
        return {
            "size": self.size,
            "image": self.image,
            "hidden_bytes": st.hidden.allocated_bytes,
            "active_bytes": st.active.allocated_bytes,
            "primary": st.cbw.statistics(),
            "view": st.active.statistics(),
        }

    def close(self) -> None:
        self.stack.close()
        for overlay in (self.stack.active, self.stack.hidden):  # scratch
            try:
                os.unlink(overlay.path)
            except FileNotFoundError:
                pass


class Secondary(Controller):
    """The replication state of one secondary mount (all its disks)."""

    role = "secondary"

    def __init__(self, disks: dict[str, SecondaryDisk], gate: Gate, workdir: str,
                 remove_workdir: bool) -> None:
        super().__init__()
        self.disks = disks
        self.gate = gate
        self.workdir = workdir
        self.remove_workdir = remove_workdir
        self.listen: str | None = None
        self.server = None
        self._clients: dict[str, int] = {}  # export -> primaries connected
        #: Called after the view's content changed under open files.
        self.on_view_changed = None
        for d in disks.values():
            d.export.on_error = self._export_failed

    @property
    def peer_connected(self) -> bool:
        return any(self._clients.values())

    def clients_changed(self, export: str, count: int) -> None:
        was = self.peer_connected
        self._clients[export] = count
        total = self.peer_connected
        if was and not total:
            log.warning("the primary disconnected (export %s)", export)
        elif total and not was:
            log.info("the primary connected (export %s)", export)

    def _export_failed(self, node: GatedNode, op: str, exc: BlockError) -> None:
        if exc.errno == errno.ESHUTDOWN and self.state != "replicating":
            return  # the refusal we asked for
        self.last_error = f"{node.name}: primary's {op} failed: {exc}"
        log.error("%s", self.last_error)

    # -- actions ------------------------------------------------------------
    async def checkpoint(self) -> None:
        if self.state != "replicating":
            raise BlockError(errno.EINVAL,
                             f"checkpoint: not replicating (state {self.state})")
        async with self.gate.exclusive():
            for d in self.disks.values():
                await d.stack.checkpoint()
            self.checkpoints += 1
        await self._view_changed()

    async def failover(self) -> None:
        if self.state == "failed-over":
            return
        async with self.gate.exclusive():
            self._refuse_primary("failed over")
            for d in self.disks.values():
                await d.stack.failover()
            self.state = "failed-over"
        await self._disconnect_primary()
        await self._view_changed()
        log.info("failover: the view now runs on the secondary disks")

    async def stop(self) -> None:
        if self.state == "stopped":
            return
        if self.state != "replicating":
            raise BlockError(errno.EINVAL, f"stop: not replicating (state {self.state})")
        async with self.gate.exclusive():
            for d in self.disks.values():
                await d.stack.checkpoint()
            self.checkpoints += 1
            self._refuse_primary("replication stopped")
            self.state = "stopped"
        await self._disconnect_primary()
        await self._view_changed()

    def _refuse_primary(self, reason: str) -> None:
        for d in self.disks.values():
            d.stack.cbw.refuse_writes(errno.ESHUTDOWN, reason)
        if self.server is not None:
            self.server.set_accepting(False)

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
                await d.stack.disk.flush()
            except BlockError as exc:
                log.error("disk %s: flush at exit failed: %s", d.name, exc)
            d.close()
        if self.remove_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def status(self) -> dict:
        return {
            **super().status(),
            "listen": self.listen,
            "workdir": self.workdir,
            "disks": {name: d.statistics() for name, d in self.disks.items()},
        }
