"""The primary host's controller: the degrade policy, the watchdog, the actions.

Design note
-----------
The primary's disks are :class:`~replfs.block.mirror.Mirror` nodes (the
write path, QEMU's quorum + ``replication mode=primary``).  This controller
holds the pair's state for the whole mount:

* a failure of the secondary on any disk (``peer_failed``, the mirrors'
  ``on_peer_error`` hook) is recorded in ``last_error`` and moves the stage
  from "replicating" to "degraded".  Entering a stage in which the table
  refuses ``REPLICATE`` cuts the peer edge of *every* disk and aborts those
  connections at once, so the secondary never holds a mix of epochs and a
  stalled secondary that wakes up later receives nothing more;
* :meth:`watchdog` gives up on a secondary that has not answered a request
  within ``timeout`` seconds;
* checkpoint is a flush barrier on both sides; failover drops the secondary
  on purpose; stop flushes both sides and disconnects cleanly (NBD DISC).
"""

from __future__ import annotations

import logging

import trio

from replfs.block.base import BlockNode
from replfs.block.mirror import Mirror
from replfs.errors import BlockError
from replfs.replication.controller import Controller
from replfs.replication.stage import Op, ReplicationStage, Role

log = logging.getLogger("replfs.primary")


class PrimaryController(Controller):
    """The replication state of one primary mount (all its disks)."""

    role = Role.PRIMARY

    def __init__(self, secondary: str, timeout: float) -> None:
        super().__init__()
        self.secondary = secondary
        self.timeout = timeout
        self.disks: dict[str, Mirror] = {}
        self.images: dict[str, str] = {}

    def attach(self, disks: dict[str, Mirror], images: dict[str, str]) -> None:
        self.disks = disks
        self.images = images

    @property
    def peer_connected(self) -> bool:
        return any(d.peer is not None for d in self.disks.values())

    # -- stage ------------------------------------------------------------------
    def _configure(self, stage: ReplicationStage) -> None:
        if not self.verdict(Op.REPLICATE).allowed:
            for d in self.disks.values():
                peer = d.drop_peer()
                if peer is not None:
                    peer.abort()

    def peer_failed(self, disk: Mirror, reason: str) -> None:
        """One disk's secondary failed: the pair is no longer a pair."""
        self.record_error(f"disk {disk.name}: {reason}")
        log.error("continuing without the secondary")
        if self.stage is ReplicationStage.REPLICATING:
            self.enter(ReplicationStage.DEGRADED)
        else:
            self._configure(self.stage)

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

    # -- actions ------------------------------------------------------------------
    async def checkpoint(self) -> None:
        """A flush barrier on both sides."""
        if not self.admit(Op.CHECKPOINT):
            return
        for d in self.disks.values():
            await d.flush()
        self.admit(Op.CHECKPOINT)  # the secondary may have failed meanwhile
        self.checkpoints += 1

    async def failover(self) -> None:
        """Drop the secondary on purpose; the primary runs alone from now on."""
        if not self.admit(Op.FAILOVER):
            return
        for d in self.disks.values():
            await d.local.flush()
        await self._disconnect()
        self.enter(ReplicationStage.FAILED_OVER)
        log.info("failover: the secondary is dropped; running alone")

    async def stop(self) -> None:
        """Orderly end of replication: flush both sides, disconnect."""
        if not self.admit(Op.STOP):
            return
        if self.stage is ReplicationStage.REPLICATING:
            for d in self.disks.values():
                await d.flush()
        await self._disconnect()
        self.enter(ReplicationStage.STOPPED)

    async def _disconnect(self) -> None:
        for d in self.disks.values():
            peer = d.drop_peer()
            if peer is not None:
                await close_within(peer, self.timeout)

    async def shutdown(self) -> None:
        """On unmount: flush the images, disconnect cleanly."""
        for d in self.disks.values():
            try:
                await d.flush()
            except BlockError as exc:
                log.error("disk %s: flush at exit failed: %s", d.name, exc)
        await self._disconnect()

    def status(self) -> dict:
        return {
            **super().status(),
            "secondary": self.secondary,
            "disks": {
                name: {"size": d.size, "image": self.images[name], **d.statistics()}
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

