"""An in-process replication pair: both controllers over real image files,
joined by an in-process link instead of NBD over TCP (QEMU's
tests/unit/test-replication.c runs its scenarios the same way).

No FUSE, no sockets: the primary's :class:`~replfs.block.mirror.Mirror`
sends to a :class:`Link` whose far end is the secondary's gated export.  The
link behaves as the NBD client does where the replication logic can tell:

* ``stall()`` holds every request from then on (a peer that stopped
  answering); ``resume()`` lets them go;
* ``abort()`` fails the requests in flight and every later one with
  ``ECONNRESET`` at once; the far end finishes what it already started (an
  NBD server does too);
* the secondary controller's ``server`` is a :class:`LinkServer`: its
  ``close_all()`` aborts every link (what failover and stop do to the
  primary's connection), and it reports connected clients as the NBD server
  does.

Pattern bytes as in tests/conftest.py: 0x11 the initial content of both
images, 0x22 the primary VM, 0x33 the secondary VM.
"""

from __future__ import annotations

import errno
import os
from contextlib import asynccontextmanager

import trio
import trio.testing

from replfs.block.base import BlockNode, Extent
from replfs.block.graph import PrimaryGraph, SecondaryDisk, SecondaryGraph
from replfs.errors import BlockError
from replfs.replication.primary import PrimaryController
from replfs.replication.secondary import SecondaryController

BASE, PRIMARY, SECONDARY_VM = 0x11, 0x22, 0x33
CL = 64 * 1024


class Link(BlockNode):
    """The wire from a primary's mirror to a secondary's export, in process."""

    can_abort = True

    def __init__(self, far: BlockNode, server: "LinkServer", name: str) -> None:
        self.far = far
        self.server = server
        self.size = far.size
        self.name = name
        self.broken = False
        self.sent = 0
        self._resumed = trio.Event()
        self._resumed.set()
        self._waiters: set[trio.Event] = set()

    def stall(self) -> None:
        self._resumed = trio.Event()

    def resume(self) -> None:
        self._resumed.set()

    def abort(self) -> None:
        if not self.broken:
            self.broken = True
            self.server.disconnected(self.name)
        for done in self._waiters:
            done.set()

    def close(self) -> None:
        """A clean disconnect (the primary's NBD_CMD_DISC)."""
        if not self.broken:
            self.broken = True
            self.server.disconnected(self.name)

    def _check(self) -> None:
        if self.broken:
            raise BlockError(errno.ECONNRESET, f"{self.name}: connection aborted")

    async def _call(self, op: str, *args):
        """Run ``far.<op>(*args)`` in the far end's task; give up on abort."""
        self._check()
        done = trio.Event()
        result: dict = {}

        async def far_end():
            try:
                await self._resumed.wait()
                if not self.broken:
                    result["value"] = await getattr(self.far, op)(*args)
            except BlockError as exc:
                result["error"] = exc
            finally:
                done.set()

        self._waiters.add(done)
        try:
            self.server.nursery.start_soon(far_end)
            await done.wait()
        finally:
            self._waiters.discard(done)
        self._check()
        if "error" in result:
            raise result["error"]
        return result.get("value")

    async def _read(self, offset: int, length: int) -> bytes:
        return await self._call("read", offset, length)

    async def _write(self, offset: int, data, fua: bool) -> None:
        self.sent += len(data)
        await self._call("write", offset, bytes(data), fua)

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._call("write_zeroes", offset, length, fua)

    async def _trim(self, offset: int, length: int) -> None:
        await self._call("trim", offset, length)

    async def flush(self) -> None:
        await self._call("flush")

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, True)]


class LinkServer:
    """The secondary's side of the links: what ``SecondaryController.server`` is."""

    def __init__(self, ctl: SecondaryController) -> None:
        self.ctl = ctl
        self.links: dict[str, Link] = {}
        self.nursery: trio.Nursery | None = None

    def connect(self, name: str, far: BlockNode) -> Link:
        refusal = self.ctl.admit_primary(name, 0)
        if refusal is not None:
            raise BlockError(errno.ECONNREFUSED, refusal)
        link = self.links[name] = Link(far, self, name)
        self.ctl.clients_changed(name, 1)
        return link

    def disconnected(self, name: str) -> None:
        self.ctl.clients_changed(name, 0)

    def set_accepting(self, accepting: bool) -> None:
        pass

    async def close_all(self) -> None:
        for link in self.links.values():
            link.abort()


async def checkpoint_disk(disk: SecondaryDisk) -> None:
    """One secondary disk's checkpoint as the controller runs it (gate held)."""
    async with disk.view.gate.exclusive():
        await disk.checkpoint()


async def failover_disk(disk: SecondaryDisk) -> None:
    """One secondary disk's failover as the controller runs it: the gate
    held, the export refusing the primary's writes, then the commits."""
    async with disk.view.gate.exclusive():
        disk.export.refuse_writes(errno.ESHUTDOWN, f"{disk.name}: failed over")
        await disk.failover()


def make_image(path, size: int, byte: int = BASE) -> str:
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)
    return str(path)


def read_image(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Pair:
    """Both hosts of a mount with ``disks`` disks of ``size`` bytes."""

    def __init__(self, tmp_path, size: int = 16 * CL, disks=("d0",), *,
                 timeout: float = 1.0, secondary_faults: str | None = None,
                 primary_faults: str | None = None) -> None:
        self.size = size
        self.pimages = {n: make_image(tmp_path / f"p-{n}.img", size) for n in disks}
        self.simages = {n: make_image(tmp_path / f"s-{n}.img", size) for n in disks}
        self.workdir = os.fspath(tmp_path / "work")

        self.secondary = SecondaryController()
        self.sgraph = SecondaryGraph(self.simages, workdir=self.workdir, cluster_size=CL,
                                     faults=secondary_faults,
                                     on_export_error=self.secondary.export_failed)
        self.secondary.attach(self.sgraph)
        self.server = self.secondary.server = LinkServer(self.secondary)
        self.links = {n: self.server.connect(n, e) for n, e in self.sgraph.exports().items()}

        self.primary = PrimaryController("in-process", timeout)
        self.pgraph = PrimaryGraph(self.pimages, faults=primary_faults)
        self.primary.attach(self.pgraph.mirror(self.links, on_peer_error=self.primary.peer_failed),
                            self.pimages)

    # -- the two VMs' disks --------------------------------------------------------
    def pdisk(self, name: str = "d0"):
        return self.primary.disks[name]

    def view(self, name: str = "d0"):
        return self.sgraph.disks[name].view

    def sdisk(self, name: str = "d0"):
        """The secondary disk node (a FaultLayer when faults were given)."""
        return self.sgraph.disks[name].disk

    @asynccontextmanager
    async def running(self, watchdog: bool = True):
        async with trio.open_nursery() as nursery:
            self.server.nursery = nursery
            if watchdog:
                nursery.start_soon(self.primary.watchdog)
            try:
                yield self
            finally:
                with trio.CancelScope(shield=True):
                    await self.close()
                nursery.cancel_scope.cancel()

    async def close(self) -> None:
        """What the daemons do at unmount: flush, disconnect, close the graphs."""
        await self.primary.shutdown()
        self.pgraph.close()
        await self.secondary.shutdown()


def run(fn, autojump: bool = False, limit: float = 20.0) -> None:
    """``trio.run(fn)`` bounded by ``limit`` seconds.  With ``autojump`` the
    clock is virtual and jumps whenever every task waits - also while an I/O
    thread works (a flush) - so there a virtual deadline would fire early:
    the bound is then pytest-timeout's, in real time."""
    if autojump:
        trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))
        return

    async def bounded():
        with trio.fail_after(limit):
            await fn()

    trio.run(bounded)


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n
