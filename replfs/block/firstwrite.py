"""A pass-through node that runs a hook before the first write of an epoch.

Design note
-----------
The secondary must know, after a restart, whether its disk still equals the
last checkpoint: the hidden overlay that could restore it lives in memory
and dies with the daemon.  So before the first of the primary's writes after
a checkpoint reaches the disk, the controller persists "this epoch is dirty"
(one metadata write and sync per epoch, not per write), and clears it at the
next checkpoint.  This layer is where that hook runs: it awaits
``before_first_write()`` before the first modifying request after
:meth:`arm` (concurrent first writers wait for the one hook), and is free
after that.  A hook that fails fails the write, which leaves the disk
untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from replfs.block.base import BlockNode, Extent


class FirstWrite(BlockNode):
    def __init__(self, child: BlockNode, before_first_write: Callable[[], Awaitable[None]],
                 *, armed: bool = True, name: str | None = None) -> None:
        self.child = child
        self.size = child.size
        self.name = name or f"first-write({child.name})"
        self._hook = before_first_write
        self.armed = armed
        self._lock = trio.Lock()

    def arm(self) -> None:
        """The next modifying request runs the hook first."""
        self.armed = True

    async def _fire(self) -> None:
        async with self._lock:
            if self.armed:
                await self._hook()
                self.armed = False

    # A pass-through on the secondary's write path: the public methods are
    # overridden (the child checks the bounds), one frame less per request.
    async def read(self, offset: int, length: int) -> bytes:
        return await self.child.read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        if self.armed:
            await self._fire()
        await self.child.write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        if self.armed:
            await self._fire()
        await self.child.write_zeroes(offset, length, fua)

    async def trim(self, offset: int, length: int) -> None:
        if self.armed:
            await self._fire()
        await self.child.trim(offset, length)

    async def flush(self) -> None:
        await self.child.flush()

    def allocation(self, offset: int, length: int) -> list[Extent]:
        return self.child.allocation(offset, length)

    def children(self) -> dict[str, BlockNode]:
        return {"file": self.child}
