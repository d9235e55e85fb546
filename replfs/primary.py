"""The primary host: every write to the local image and to the secondary.

Design note
-----------
QEMU builds the primary as ``quorum(vote-threshold=1)`` over the local disk
and a ``replication mode=primary`` node over an NBD client.  replfs keeps the
same contract in one layer, :class:`ReplicatedDisk`:

* reads come from the local image only;
* a write goes to the local image first; if that fails the app gets the
  error and the secondary is not sent anything (the two stay equal).  Then
  it goes over NBD to the secondary, and completes when the secondary has
  replied - or when the secondary has been given up on;
* a failure of the secondary (error reply, lost connection, or no reply
  within ``timeout`` seconds, which :meth:`Primary.watchdog` checks) is
  *never* returned to the VM: it is recorded, the connection is aborted at
  once (so a stalled secondary that wakes up later receives nothing more)
  and the disk carries on alone.  That is QEMU's "replication error is
  recorded, not returned";
* two writes that overlap are never in flight to the secondary at the same
  time (a range lock): the secondary may serve concurrent requests in any
  order, and the two images must end up equal;
* ``flush()`` flushes both sides concurrently (NBD FLUSH on the wire).

:class:`Primary` holds the disks of one mount and the replication state
("replicating", "degraded", "failed-over", "stopped") that the status file
shows.
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from replfs.block.base import BlockNode
from replfs.block.rangelock import RangeLock
from replfs.controller import Controller
from replfs.errors import BlockError

log = logging.getLogger("replfs.primary")


class ReplicatedDisk(BlockNode):
    def __init__(self, name: str, local: BlockNode, remote: BlockNode | None,
                 *, timeout: float, on_failure) -> None:
        self.name = name
        self.local = local
        self.remote = remote
        self.size = local.size
        self.timeout = timeout
        self._on_failure = on_failure
        self._order = RangeLock()
        self._inflight: dict[int, float] = {}  # token -> start (monotonic)
        self._next_token = 0
        self.bytes_written = 0
        self.bytes_replicated = 0
        self.writes = 0

    # -- the secondary ------------------------------------------------------
    def drop_remote(self) -> BlockNode | None:
        remote, self.remote = self.remote, None
        return remote

    async def _to_remote(self, what: str, call) -> None:
        remote = self.remote
        if remote is None:
            return
        token = self._next_token
        self._next_token = token + 1
        self._inflight[token] = time.monotonic()
        try:
            await call(remote)
        except Exception as exc:  # never fail the VM's I/O for the secondary
            if self.remote is remote:
                self._on_failure(self, f"{what} on the secondary failed: {exc}")
        finally:
            del self._inflight[token]

    def oldest_request_age(self, now: float) -> float:
        """Seconds the oldest request to the secondary has been waiting."""
        return now - min(self._inflight.values()) if self._inflight else 0.0

    # -- BlockNode ----------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        return await self.local.read(offset, length)

    async def _replicated(self, what: str, offset: int, length: int, call) -> None:
        """Run ``call(node)`` on the local image, then on the secondary."""
        self.check_write(offset, length)
        async with self._order.exclusive(offset, offset + length):
            await call(self.local)
            self.writes += 1
            self.bytes_written += length
            if self.remote is not None:
                await self._to_remote(what, call)
                if self.remote is not None:
                    self.bytes_replicated += length

    async def write(self, offset: int, data, fua: bool = False) -> None:
        await self._replicated("write", offset, len(data),
                               lambda node: node.write(offset, data, fua))

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        await self._replicated("write_zeroes", offset, length,
                               lambda node: node.write_zeroes(offset, length, fua))

    async def trim(self, offset: int, length: int) -> None:
        await self._replicated("trim", offset, length,
                               lambda node: node.trim(offset, length))

    async def flush(self) -> None:
        """Both sides at once; only the local side's error reaches the caller
        (raised outside the nursery, so it is not wrapped in a group)."""
        local_error = None
        async with trio.open_nursery() as nursery:
            if self.remote is not None:
                nursery.start_soon(self._to_remote, "flush", lambda node: node.flush())
                # Let it send NBD FLUSH before the local sync, which may run
                # inline (blocking this thread): the two syncs then overlap.
                await trio.lowlevel.cancel_shielded_checkpoint()
            try:
                await self.local.flush()
            except BlockError as exc:
                local_error = exc
        if local_error is not None:
            raise local_error

    def allocation(self, offset: int, length: int):
        return self.local.allocation(offset, length)

    def statistics(self) -> dict:
        return {
            "writes": self.writes,
            "bytes_written": self.bytes_written,
            "bytes_replicated": self.bytes_replicated,
            "replicating": self.remote is not None,
        }


class Primary(Controller):
    """The replication state of one primary mount (all its disks)."""

    role = "primary"

    def __init__(self, disks: dict[str, ReplicatedDisk], images: dict[str, str],
                 secondary: str) -> None:
        super().__init__()
        self.disks = disks
        self.images = images
        self.secondary = secondary
        for d in disks.values():
            d._on_failure = self._remote_failed

    @property
    def peer_connected(self) -> bool:
        return any(d.remote is not None for d in self.disks.values())

    def _drop_all(self) -> None:
        for d in self.disks.values():
            remote = d.drop_remote()
            if remote is not None:
                abort = getattr(remote, "abort", None)
                if abort is not None:
                    abort()

    def _remote_failed(self, disk: ReplicatedDisk, reason: str) -> None:
        # One disk's secondary failed: the pair is no longer a pair.  Stop
        # sending anything to the secondary for every disk of the mount, so
        # that the secondary never holds a mix of epochs.
        log.error("disk %s: %s; continuing without the secondary", disk.name, reason)
        self.last_error = f"disk {disk.name}: {reason}"
        if self.state == "replicating":
            self.state = "degraded"
        self._drop_all()

    async def watchdog(self) -> None:
        """Give up on the secondary once a request has waited ``timeout``.

        A timer task rather than a cancel scope per request: cancelling a
        request cannot unblock a send that the peer stopped reading, but
        aborting the connection does, and it fails every request in flight."""
        timeout = min(d.timeout for d in self.disks.values())
        tick = min(0.05, timeout / 10)
        while True:
            await trio.sleep(tick)
            now = time.monotonic()
            for d in self.disks.values():
                if d.remote is not None and d.oldest_request_age(now) >= d.timeout:
                    self._remote_failed(
                        d, f"the secondary did not answer within {d.timeout:g} s")
                    break

    # -- actions ------------------------------------------------------------
    async def checkpoint(self) -> None:
        """A flush barrier on both sides."""
        if self.state != "replicating":
            raise BlockError(errno.ENOTCONN,
                             f"checkpoint: not replicating (state {self.state})")
        for d in self.disks.values():
            await d.flush()
        if self.state != "replicating":
            raise BlockError(errno.EIO, f"checkpoint: {self.last_error}")
        self.checkpoints += 1

    async def failover(self) -> None:
        """Drop the secondary on purpose; the primary runs alone from now on."""
        if self.state == "failed-over":
            return
        if self.state == "stopped":
            raise BlockError(errno.EINVAL, "failover: replication is stopped")
        for d in self.disks.values():
            await d.local.flush()
        await self._disconnect()
        self.state = "failed-over"
        log.info("failover: the secondary is dropped; running alone")

    async def stop(self) -> None:
        """Orderly end of replication: flush both sides, disconnect."""
        if self.state == "stopped":
            return
        if self.state == "replicating":
            for d in self.disks.values():
                await d.flush()
        await self._disconnect()
        self.state = "stopped"

    async def _disconnect(self) -> None:
        for d in self.disks.values():
            remote = d.drop_remote()
            if remote is not None:
                await close_within(remote, d.timeout)

    async def shutdown(self) -> None:
        """On unmount: flush the images, disconnect cleanly."""
        for d in self.disks.values():
            try:
                await d.flush()
            except BlockError as exc:
                log.error("disk %s: flush at exit failed: %s", d.name, exc)
        await self._disconnect()
        for d in self.disks.values():
            d.local.close()

    def status(self) -> dict:
        return {
            **super().status(),
            "secondary": self.secondary,
            "disks": {
                name: {"size": d.size, "image": self.images[name], **d.statistics()}
                for name, d in self.disks.items()
            },
        }


async def close_within(remote, timeout: float) -> None:
    """Disconnect cleanly (NBD DISC) if the peer lets us within ``timeout``;
    else abort the connection (a send to a stalled peer cannot be cancelled)."""
    async def guard():
        await trio.sleep(timeout)
        remote.abort()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard)
        try:
            await remote.aclose()
        except BlockError:
            pass
        nursery.cancel_scope.cancel()
