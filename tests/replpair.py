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
  does;
* the primary's connector opens a :class:`LinkSession`: the control
  channel is the secondary controller's handler called in process, and the
  peers are links admitted by the secondary's stage as the NBD server's
  ``admit`` hook would.  Both controllers keep real metadata files beside
  the images, so restarts (``open_primary()`` / ``open_secondary()`` on the
  same files) behave as the daemons' do.

Pattern bytes as in tests/conftest.py: 0x11 the initial content of both
images, 0x22 the primary VM, 0x33 the secondary VM.
"""

from __future__ import annotations

import errno
import os
from contextlib import asynccontextmanager

import trio

from replfs.block.base import BlockNode, Extent, close_graph
from replfs.block.graph import PrimaryGraph, SecondaryDisk, SecondaryGraph
from replfs.errors import BlockError, PeerMismatch, PeerUnavailable
from replfs.replication.persist import DiskState
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
        self.accepting = True

    def connect(self, name: str, far: BlockNode) -> Link:
        refusal = self.ctl.admit_primary(name, 0)
        if refusal is not None:
            raise PeerMismatch(refusal)
        link = self.links[name] = Link(far, self, name)
        self.ctl.clients_changed(name, 1)
        return link

    def disconnected(self, name: str) -> None:
        self.ctl.clients_changed(name, 0)

    def set_accepting(self, accepting: bool) -> None:
        self.accepting = accepting

    async def close_all(self) -> None:
        for link in self.links.values():
            link.abort()


class LinkControl:
    """The control channel, in process: the secondary controller's handler."""

    def __init__(self, ctl: SecondaryController) -> None:
        self.ctl = ctl
        self.calls: list[dict] = []
        self.failure: BlockError | None = None
        self._closed = trio.Event()

    async def call(self, request: dict) -> dict:
        if self.failure is not None:
            raise self.failure
        self.calls.append(request)
        return await self.ctl.control(request, ("in-process", 0))

    def abort(self, reason: str = "connection aborted") -> None:
        if self.failure is None:
            self.failure = BlockError(errno.ECONNRESET, f"control channel: {reason}")
        self._closed.set()

    async def aclose(self) -> None:
        self.abort("closed")

    async def wait_closed(self) -> None:
        await self._closed.wait()


class LinkSession:
    """What the primary's connector returns (cf. replfs/replication/link.py)."""

    def __init__(self, pair: "Pair", plain: bool = False) -> None:
        self.pair = pair
        self.target = "in-process"
        self.control = None if plain else LinkControl(pair.secondary)
        self.links: dict[str, Link] = {}

    async def open_peers(self) -> dict[str, BlockNode]:
        if not self.pair.server.accepting:
            raise PeerUnavailable("the secondary is shutting down")
        self.links = {n: self.pair.server.connect(n, e)
                      for n, e in self.pair.sgraph.exports().items()}
        return dict(self.links)

    def abort(self) -> None:
        if self.control is not None:
            self.control.abort()
        for link in self.links.values():
            link.abort()

    async def aclose(self) -> None:
        if self.control is not None:
            await self.control.aclose()
        for link in self.links.values():
            link.close()


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
    """Both hosts of a mount with ``disks`` disks of ``size`` bytes.

    ``reachable = False`` makes the connector fail (the secondary is down);
    ``plain = True`` gives sessions without a control channel (a qemu-nbd
    secondary)."""

    def __init__(self, tmp_path, size: int = 16 * CL, disks=("d0",), *,
                 timeout: float = 1.0, secondary_faults: str | None = None,
                 primary_faults: str | None = None, images: bool = True,
                 reconnect_interval: float = 0.2, plain: bool = False) -> None:
        self.tmp = tmp_path
        self.size = size
        self.names = tuple(disks)
        if images:
            self.pimages = {n: make_image(tmp_path / f"p-{n}.img", size) for n in disks}
            self.simages = {n: make_image(tmp_path / f"s-{n}.img", size) for n in disks}
        self.workdir = os.fspath(tmp_path / "work")
        self.timeout = timeout
        self.secondary_faults = secondary_faults
        self.primary_faults = primary_faults
        self.reconnect_interval = reconnect_interval
        self.plain = plain
        self.reachable = True
        self.primary_down = self.secondary_down = False
        self.sessions: list[LinkSession] = []
        self.open_secondary()
        self.open_primary()

    def open_secondary(self) -> None:
        """(Re)create the secondary daemon's objects, as a restart does."""
        self.secondary = SecondaryController()
        self.sstates = {n: DiskState(n, self.simages[n], self.size, CL)
                        for n in self.names}
        resume = SecondaryController.resume_of(self.sstates, self.workdir)
        self.sgraph = SecondaryGraph(self.simages, workdir=self.workdir, cluster_size=CL,
                                     faults=self.secondary_faults,
                                     on_export_error=self.secondary.export_failed,
                                     before_first_write=self.secondary.before_first_write,
                                     resume=resume)
        self.resumed = frozenset(resume)
        self.secondary.attach(self.sgraph, self.sstates)
        self.server = self.secondary.server = LinkServer(self.secondary)

    def open_primary(self) -> None:
        self.primary = PrimaryController("in-process", self.timeout, connector=self.connect,
                                         reconnect_interval=self.reconnect_interval)
        self.pgraph = PrimaryGraph(self.pimages, faults=self.primary_faults)
        self.pstates = {n: DiskState(n, self.pimages[n], self.size, CL, tracking=True)
                        for n in self.names}
        self.primary.attach(self.pgraph.mirror(
            {}, on_peer_error=self.primary.peer_failed,
            records={n: st.record for n, st in self.pstates.items()},
            logs={n: st.al for n, st in self.pstates.items()}), self.pimages, self.pstates)

    async def connect(self, target: str, nursery) -> LinkSession:
        if not self.reachable:
            raise PeerUnavailable("the secondary is not reachable")
        if self.secondary_down:  # a dead daemon answers nobody
            raise PeerUnavailable("the secondary is down: connection refused")
        session = LinkSession(self, plain=self.plain)
        self.sessions.append(session)
        return session

    @property
    def links(self) -> dict[str, Link]:
        return self.server.links

    # -- the two VMs' disks --------------------------------------------------------
    def pdisk(self, name: str = "d0"):
        return self.primary.disks[name]

    def view(self, name: str = "d0"):
        return self.sgraph.disks[name].view

    def sdisk(self, name: str = "d0"):
        """The secondary disk node (a FaultLayer when faults were given)."""
        return self.sgraph.disks[name].disk

    async def start_secondary(self) -> None:
        for st in self.sstates.values():
            await st.start_run()
        await self.secondary.recover(self.resumed)

    async def start_primary(self, nursery, connect: bool = True) -> None:
        for st in self.pstates.values():
            await st.start_run()
        await nursery.start(self.primary.run)
        if connect:
            await self.primary.connect_at_start()

    @asynccontextmanager
    async def running(self, connect: bool = True):
        async with trio.open_nursery() as nursery:
            self.nursery = self.server.nursery = nursery
            await self.start_secondary()
            await self.start_primary(nursery, connect)
            try:
                yield self
            finally:
                with trio.CancelScope(shield=True):
                    await self.close()
                nursery.cancel_scope.cancel()

    # -- kill -9, in process: nothing written, connections cut, files left -------------
    def crash_secondary(self) -> None:
        """The secondary daemon dies: its connections drop, its metadata and
        overlay files stay as they are (its in-memory overlay bitmaps are lost)."""
        self.secondary_down = True
        self.server.accepting = False
        for link in self.server.links.values():
            link.abort()
        for session in self.sessions:
            if session.control is not None and session.control.ctl is self.secondary:
                session.control.abort("the secondary died")
        for st in self.sstates.values():
            st.meta.close()
        for d in self.sgraph.disks.values():
            close_graph([d.view, d.export])
        self.sgraph.drop_locks()

    def crash_primary(self) -> None:
        """The primary daemon dies: background stopped, sessions cut, files left."""
        self.primary_down = True
        if self.primary._nursery is not None:
            self.primary._nursery.cancel_scope.cancel()
        for session in self.sessions:
            session.abort()
        for st in self.pstates.values():
            st.meta.close()
        self.pgraph.close()

    async def restart_secondary(self) -> None:
        self.secondary_down = False
        self.open_secondary()
        self.server.nursery = self.nursery
        await self.start_secondary()

    async def restart_primary(self, connect: bool = True) -> None:
        self.primary_down = False
        self.open_primary()
        await self.start_primary(self.nursery, connect)

    async def close(self) -> None:
        """What the daemons do at unmount: flush, disconnect, close the graphs
        (a daemon that was crashed and not restarted has nothing to do)."""
        if not self.primary_down:
            await self.primary.shutdown()
            self.pgraph.close()
        if not self.secondary_down:
            await self.secondary.shutdown()

    async def wait_state(self, ctl, state: str, limit: float = 10.0) -> None:
        with trio.fail_after(limit):
            while ctl.state != state:
                await trio.sleep(0.01)


def run(fn, limit: float = 20.0) -> None:
    """``trio.run(fn)`` bounded by ``limit`` seconds.  (No virtual clock: the
    metadata is written from I/O threads, and an autojumping clock would jump
    past deadlines while a thread works.)"""

    async def bounded():
        with trio.fail_after(limit):
            await fn()

    trio.run(bounded)


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n
