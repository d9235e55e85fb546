"""The secondary host's block graph, assembled, with checkpoint and failover.

Design note
-----------
::

    primary --NBD--> export = CopyBeforeWrite ----------------> disk (raw)
                                   | old content, once per epoch    ^
                                   v                                | backing
                              hidden Overlay -----------------------+
    VM --> view --> active Overlay --backing--> cbw.snapshot (hidden-if-copied-else-disk)
               \\__ after failover: straight to disk

``checkpoint()``: the VM is paused and the primary's writes are done (COLO
does that); empties active, then re-arms the CBW (empties hidden).
Afterwards view == snapshot == disk.

``failover()``: refuses any further replication write (ESHUTDOWN), waits for
the ones in flight, commits hidden into disk (disk := snapshot) and then
active into disk (disk := view), flushes, and points ``view`` at the disk,
like QEMU's active commit pivoting onto the secondary disk.  VM requests
that arrive meanwhile wait (``view`` has a gate: every request holds it
shared, failover and checkpoint hold it exclusive).  If a commit fails the
error is raised and ``failover()`` can simply be called again: commits are
idempotent and nothing is emptied before it was written.
"""

from __future__ import annotations

import errno
import os

from replfs.block.base import BlockNode, Extent
from replfs.block.cbw import CopyBeforeWrite
from replfs.block.overlay import Overlay
from replfs.block.rangelock import RangeLock
from replfs.errors import BlockError


class _View(BlockNode):
    """Forwards to ``node``; a gate lets the stack switch ``node`` safely."""

    def __init__(self, node: BlockNode, name: str):
        self.node = node
        self.size = node.size
        self.name = name
        self.gate = RangeLock(f"{name}.gate")

    async def read(self, offset: int, length: int) -> bytes:
        async with self.gate.shared(0, 1):
            return await self.node.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        async with self.gate.shared(0, 1):
            await self.node.write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        async with self.gate.shared(0, 1):
            await self.node.write_zeroes(offset, length, fua)

    async def trim(self, offset: int, length: int) -> None:
        async with self.gate.shared(0, 1):
            await self.node.trim(offset, length)

    async def flush(self) -> None:
        async with self.gate.shared(0, 1):
            await self.node.flush()

    def allocation(self, offset: int, length: int) -> list[Extent]:
        return self.node.allocation(offset, length)

    def statistics(self) -> dict:
        return self.node.statistics()


class SecondaryStack:
    def __init__(
        self,
        disk: BlockNode,
        hidden_path: str | os.PathLike,
        active_path: str | os.PathLike,
        *,
        cluster_size: int = 65536,
        name: str = "secondary",
    ):
        self.name = name
        self.disk = disk
        self.hidden = Overlay(hidden_path, disk, cluster_size=cluster_size, name=f"{name}.hidden")
        self.cbw = CopyBeforeWrite(disk, self.hidden, name=f"{name}.cbw")
        self.active = Overlay(
            active_path, self.cbw.snapshot, cluster_size=cluster_size, name=f"{name}.active"
        )
        self.view: BlockNode = _View(self.active, f"{name}.view")
        self.failed_over = False

    @property
    def export(self) -> CopyBeforeWrite:
        """What the NBD server exports to the primary."""
        return self.cbw

    async def checkpoint(self) -> None:
        if self.failed_over:
            raise BlockError(errno.EINVAL, f"{self.name}: no checkpoint after failover")
        async with self.view.gate.exclusive(0, 1):
            await self.active.make_empty()
            await self.cbw.checkpoint()

    async def failover(self) -> None:
        if self.failed_over:
            return
        self.cbw.refuse_writes(
            errno.ESHUTDOWN, f"{self.name}: failed over, replication writes refused"
        )
        async with self.view.gate.exclusive(0, 1):
            if self.failed_over:
                return
            await self.cbw.drain()
            await self.hidden.commit()  # disk := snapshot
            await self.active.commit(into=self.disk)  # disk := view
            self.view.node = self.disk
            self.failed_over = True

    def close(self) -> None:
        """Close the overlays and the disk."""
        self.active.close()
        self.hidden.close()
        self.disk.close()

    def statistics(self) -> dict:
        return {
            "failed_over": self.failed_over,
            "cbw": self.cbw.statistics(),
            "hidden": self.hidden.statistics(),
            "active": self.active.statistics(),
            "disk": self.disk.statistics(),
        }
