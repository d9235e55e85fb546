"""Each host's block graph, assembled in one place.

Design note
-----------
The primary, one disk (``build_primary``)::

    VM --> MOUNT/NAME --> Mirror --file--> [fault] --> IMAGE (RawImage)
                                 \\--peer--> NBD client --> the secondary's export

The secondary, one disk (:class:`SecondaryDisk`), in QEMU's names::

    primary --NBD--> export: Gated --> FirstWrite --> CopyBeforeWrite --file--> [fault] --> IMAGE
                                             | old data, once per epoch     ^
                                             v target                       | backing
                                         hidden Overlay --------------------+
    VM --> MOUNT/NAME --> view: Gated --> active Overlay --backing--> cbw.snapshot
                                     \\__ after failover: straight to IMAGE

Every edge into a host's graph from outside (the VM's file, the NBD export)
is a :class:`~replfs.block.gated.GatedNode` on the mount's one
:class:`~replfs.block.gated.Gate`, so checkpoint, failover and stop are
atomic for all disks.  The graph owns its nodes and closes them with
:func:`~replfs.block.base.close_graph`; the secondary's overlays are scratch
files in the workdir, removed when the graph closes.

A secondary holds ``WORKDIR/NAME.lock`` (flock, exclusive, its pid written
in it) for each disk *before* it creates, truncates or reopens the disk's
overlays there, and until it has removed them: a second secondary given the
same workdir and disk name (whatever its image) is refused with the holder's
pid instead of truncating the first one's hidden overlay.

What the nodes *do* in each replication stage is not decided here: the
controllers configure the enforcement points (the gated nodes' refusals,
the mirror's peer edge) from ``replication/stage.py``.

``checkpoint()``: the VM is paused and the primary's writes are done (COLO
does that, and the gate is held): empties active, then re-arms the
copy-before-write (empties hidden).  Afterwards view == snapshot == disk.

``failover()``: with the gate held and the export refusing writes, commits
hidden into the disk (disk := snapshot), then active into the disk (disk :=
view), flushes, and points the view at the disk, like QEMU's active commit
pivoting onto the secondary disk.  If a commit fails, the error is raised and
``failover()`` can simply be called again: commits are idempotent and
nothing is emptied before it was written.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Mapping

from replfs.block.base import BlockNode, close_graph
from replfs.block.cbw import CopyBeforeWrite
from replfs.block.fault import FaultLayer
from replfs.block.firstwrite import FirstWrite
from replfs.block.gated import ErrorHook, Gate, GatedNode
from replfs.block.mirror import Mirror, PeerErrorHook
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage
from replfs.core import iothreads
from replfs.errors import ReplfsError
from replfs.jobs.commit import commit
from replfs.meta.paths import workdir_path

CLUSTER_SIZE = 64 * 1024


class WorkdirLocked(ReplfsError):
    """Another daemon uses a disk's overlays in the same workdir."""


def lock_workdir(workdir: str, name: str) -> int:
    """Hold ``WORKDIR/NAME.lock`` for this process; returns its fd (close it
    after :func:`unlock_workdir`).  Raises :class:`WorkdirLocked` naming the
    holder when another open file holds it."""
    path = os.path.join(workdir, f"{name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise WorkdirLocked(f"workdir {workdir}: the overlays of disk {name} are in use "
                                f"by {holder or 'another replfs daemon'}; give each "
                                f"secondary its own --workdir") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its last holder unlinked meanwhile
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"replfs daemon pid {os.getpid()}\n".encode(), 0)
    return fd


def unlock_workdir(workdir: str, name: str, fd: int) -> None:
    try:
        os.unlink(os.path.join(workdir, f"{name}.lock"))
    except FileNotFoundError:
        pass
    os.close(fd)


def open_image(image: str, name: str, faults: str | None = None) -> BlockNode:
    """A disk image, with injected faults below everything (tests, like
    QEMU's blkdebug) when ``faults`` is a fault spec ("" = none yet)."""
    node: BlockNode = RawImage(image, name=name, lock=True)
    if faults is not None:
        node = FaultLayer(node, faults)
    return node


def _write_file(path: str, data: bytes) -> None:
    """``data`` in ``path``, durably, replacing it atomically."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        mv = memoryview(data)
        while mv:
            mv = mv[os.write(fd, mv):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- the primary -------------------------------------------------------------------
class PrimaryGraph:
    """The local images of a primary mount, then (``mirror``) one Mirror each."""

    def __init__(self, images: Mapping[str, str], *, faults: str | None = None) -> None:
        self.images = dict(images)
        self.local: dict[str, BlockNode] = {}
        self.disks: dict[str, Mirror] = {}
        try:
            for name, image in self.images.items():
                self.local[name] = open_image(image, f"{name}:primary-disk", faults)
        except BaseException:
            self.close()
            raise

    def mirror(self, peers: Mapping[str, BlockNode | None], *,
               on_peer_error: PeerErrorHook, records: Mapping | None = None,
               logs: Mapping | None = None) -> dict[str, Mirror]:
        """Put a Mirror over each local image, with ``peers[name]`` as its
        peer (None: none yet), its dirty record and activity log."""
        records, logs = records or {}, logs or {}
        self.disks = {name: Mirror(name, local, peers.get(name), on_peer_error=on_peer_error,
                                   record=records.get(name), al=logs.get(name))
                      for name, local in self.local.items()}
        return self.disks

    def close(self) -> None:
        """Close the local images (a dropped peer is closed by whoever dropped it)."""
        close_graph(self.local.values())


# -- the secondary -----------------------------------------------------------------
async def _nothing() -> None:
    pass


class SecondaryDisk:
    """The graph of one secondary disk (drawn in the module's note).

    ``before_first_write``: awaited before the first of the primary's writes
    after each checkpoint (:mod:`replfs.block.firstwrite`).  ``saved``: the
    overlays' bits that :meth:`save_overlays` wrote, to reopen the overlays as
    they were (a failover's commit resumed after a crash)."""

    def __init__(self, name: str, disk: BlockNode, workdir: str | os.PathLike, gate: Gate,
                 *, image: str | None = None, cluster_size: int = CLUSTER_SIZE,
                 on_export_error: ErrorHook | None = None,
                 before_first_write=_nothing,
                 saved: tuple[bytes, bytes] | None = None) -> None:
        self.name = name
        self.image = image
        self.disk = disk
        self.size = disk.size
        self.workdir = os.fspath(workdir)
        self.hidden = self.active = None
        hidden_bits, active_bits = saved or (None, None)
        try:
            self.hidden = Overlay(os.path.join(workdir, f"{name}.hidden"), self.disk,
                                  cluster_size=cluster_size, name=f"{name}.hidden",
                                  bitmap=hidden_bits)
            self.cbw = CopyBeforeWrite(self.disk, self.hidden, name=f"{name}.cbw")
            self.active = Overlay(os.path.join(workdir, f"{name}.active"), self.cbw.snapshot,
                                  cluster_size=cluster_size, name=f"{name}.active",
                                  bitmap=active_bits)
        except BaseException:
            self.close()
            raise
        self.first_write = FirstWrite(self.cbw, before_first_write, name=f"{name}:epoch")
        self.export = GatedNode(self.first_write, gate, f"{name}:export",
                                on_error=on_export_error)
        self.view = GatedNode(self.active, gate, f"{name}:view")
        self.failed_over = False

    async def checkpoint(self) -> None:
        """Empty active, then hidden.  The caller holds the gate."""
        await self.active.make_empty()
        await self.cbw.checkpoint()

    async def failover(self, top: BlockNode | None = None) -> None:
        """Commit hidden, then active, into the disk and pivot the view onto
        it (or onto ``top``, a node over the disk that records the VM's
        writes from now on).  The caller holds the gate and the export
        refuses writes."""
        if self.failed_over:
            return
        await commit(self.hidden)                 # disk := snapshot
        await commit(self.active, into=self.disk)  # disk := view
        self.view.replace_child(top or self.disk)
        self.failed_over = True

    def changed_clusters(self, cluster_size: int) -> list[tuple[int, int]]:
        """Byte ranges (rounded out to ``cluster_size``) that hidden or active
        hold: what the disk's failover changes against the primary's disk
        (hidden: the primary's writes since the checkpoint, which it undoes;
        active: the secondary VM's writes).  Before :meth:`failover`."""
        out = []
        for overlay in (self.hidden, self.active):
            ocs = overlay.cluster_size
            for s, e in overlay.bitmap.set_runs():
                a = (s * ocs) // cluster_size * cluster_size
                b = min(e * ocs, self.size)
                out.append((a, b - a))
        return out

    # -- the overlays kept across a crash during failover -----------------------------
    def _saved_path(self, which: str) -> str:
        return os.path.join(self.workdir, f"{self.name}.{which}.bits")

    async def save_overlays(self) -> None:
        """Make both overlays durable and write their bits beside them
        (write-then-rename), so that a commit interrupted by a crash can be
        resumed.  The caller holds the gate."""
        for which, overlay in (("hidden", self.hidden), ("active", self.active)):
            bits = await overlay.save()
            await iothreads.run(_write_file, self._saved_path(which), bits)

    @staticmethod
    def load_saved(workdir: str, name: str) -> tuple[bytes, bytes] | None:
        """The bits :meth:`save_overlays` wrote, or None if any is missing."""
        out = []
        for which in ("hidden", "active"):
            try:
                with open(os.path.join(workdir, f"{name}.{which}.bits"), "rb") as f:
                    out.append(f.read())
            except FileNotFoundError:
                return None
        return out[0], out[1]

    def drop_saved(self) -> None:
        for which in ("hidden", "active"):
            try:
                os.unlink(self._saved_path(which))
            except FileNotFoundError:
                pass

    def statistics(self) -> dict:
        return {
            "size": self.size,
            "image": self.image,
            "hidden_bytes": self.hidden.allocated_bytes,
            "active_bytes": self.active.allocated_bytes,
            "primary": {**self.cbw.statistics(), **self.export.statistics()},
            "view": self.active.statistics(),
        }

    def close(self, keep_files: bool = False) -> None:
        """Close every node; remove the overlays' scratch files (unless
        ``keep_files``: a failover's commit still needs them)."""
        close_graph(n for n in (self.active, self.hidden, self.disk) if n is not None)
        if keep_files:
            return
        for overlay in (self.active, self.hidden):
            if overlay is None:
                continue
            try:
                os.unlink(overlay.path)
            except FileNotFoundError:
                pass


class SecondaryGraph:
    """All disks of a secondary mount, their workdir and their one gate.

    The default workdir is deterministic (:func:`replfs.meta.paths.workdir_path`
    of the first image), so a restarted daemon finds what a crashed one
    left there; it is removed at a clean exit when nothing in it is needed."""

    def __init__(self, images: Mapping[str, str], *, workdir: str | None = None,
                 cluster_size: int = CLUSTER_SIZE, faults: str | None = None,
                 on_export_error: ErrorHook | None = None,
                 before_first_write=None,
                 resume: Mapping[str, tuple[bytes, bytes]] | None = None) -> None:
        self.remove_workdir = workdir is None
        if workdir is None:
            workdir = workdir_path(next(iter(images.values())))
        os.makedirs(workdir, mode=0o700, exist_ok=True)
        self.workdir = workdir
        self.gate = Gate()
        self.disks: dict[str, SecondaryDisk] = {}
        self._locks: dict[str, int] = {}
        try:
            for name in images:
                self._locks[name] = lock_workdir(workdir, name)
            for name, image in images.items():
                disk = open_image(image, f"{name}:secondary-disk", faults)
                hook = _nothing if before_first_write is None else \
                    functools.partial(before_first_write, name)
                try:
                    self.disks[name] = SecondaryDisk(
                        name, disk, workdir, self.gate, image=image,
                        cluster_size=cluster_size, on_export_error=on_export_error,
                        before_first_write=hook, saved=(resume or {}).get(name))
                except BaseException:
                    close_graph([disk])
                    raise
        except BaseException:
            self.close()
            raise

    def exports(self) -> dict[str, GatedNode]:
        return {name: d.export for name, d in self.disks.items()}

    def views(self) -> dict[str, GatedNode]:
        return {name: d.view for name, d in self.disks.items()}

    def drop_locks(self) -> None:
        """Let go of the workdir locks as the death of the process would (the
        lock files stay): for in-process crash tests."""
        for fd in self._locks.values():
            os.close(fd)
        self._locks = {}

    def close(self, keep: frozenset[str] = frozenset()) -> None:
        """Close every disk; ``keep``: disks whose overlay files stay."""
        for name, d in self.disks.items():
            d.close(keep_files=name in keep)
        for name, fd in self._locks.items():
            unlock_workdir(self.workdir, name, fd)
        self._locks = {}
        if self.remove_workdir:
            try:
                os.rmdir(self.workdir)  # only if empty: saved bits stay
            except OSError:
                pass
