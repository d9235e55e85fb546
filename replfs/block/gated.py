"""The one quiesce gate, and the gated node: the edge of every host's graph.

Design note
-----------
A checkpoint must be atomic for all disks of a mount with respect to the
VM's I/O and to the primary's NBD writes (QEMU drains the whole graph for the
same reason).  One :class:`Gate` per mount; every request from outside the
daemon enters it through a :class:`GatedNode`:

* I/O passes ``enter()``/``leave()``: cheap and synchronous unless an action
  holds the gate (no scheduler pass in the common case);
* ``exclusive()`` stops new requests at the gate, waits for the ones in
  flight to finish, and holds the gate while the action (checkpoint,
  failover, stop) runs.  Writer preference: once an action waits, new I/O
  waits behind it, so a steady stream of writes cannot starve a checkpoint;
* while the gate is held, ``GatedNode.replace_child()`` may switch what the
  node serves (failover points the secondary's view at its disk, QEMU's
  active-commit pivot);
* a gated node can refuse writes with an errno (``refuse_writes``): the
  stage table (``replication/stage.py``) says when; the refusal is checked
  *after* entering the gate, so a request that waited behind a failover is
  refused, not let through.  A refusal is an answer, not a failure:
  ``on_error`` is called only for requests the child failed.

This is the only quiesce mechanism in the tree: the layers below keep their
own range locks for ordering, never for draining.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager

import trio

from replfs.block.base import BlockNode, Extent
from replfs.errors import BlockError


class Gate:
    def __init__(self) -> None:
        self._inside = 0          # I/O requests in flight
        self._closed = False      # an exclusive holder or waiter exists
        self._held = False        # an exclusive holder runs
        self._lock = trio.Lock()  # exclusive holders queue here
        self._drained = trio.Event()
        self._reopened = trio.Event()

    @property
    def held(self) -> bool:
        """True while an action holds the gate (no request is inside)."""
        return self._held

    def statistics(self) -> dict:
        return {"in_flight": self._inside, "closed": self._closed}

    async def enter(self) -> None:
        while self._closed:
            await self._reopened.wait()
        self._inside += 1

    def try_enter(self) -> bool:
        """:meth:`enter` if the gate is open (no await: every request asks)."""
        if self._closed:
            return False
        self._inside += 1
        return True

    def leave(self) -> None:
        self._inside -= 1
        if self._inside == 0 and self._closed:
            self._drained.set()

    @asynccontextmanager
    async def exclusive(self):
        async with self._lock:
            self._closed = True
            self._reopened = trio.Event()
            try:
                while self._inside:
                    self._drained = trio.Event()
                    await self._drained.wait()
                self._held = True
                yield
            finally:
                self._held = False
                self._closed = False
                self._reopened.set()


#: ``on_error(node, op, exc)``: a request the child failed.
ErrorHook = Callable[["GatedNode", str, BlockError], None]


class GatedNode(BlockNode):
    """Every request passes the gate; writes may be refused (stage rules)."""

    def __init__(self, child: BlockNode, gate: Gate, name: str,
                 on_error: ErrorHook | None = None) -> None:
        self.child = child
        self.gate = gate
        self.size = child.size
        self.name = name
        self.on_error = on_error
        self._refusal: BlockError | None = None
        self.refused = 0

    # -- stage enforcement ------------------------------------------------------
    def refuse_writes(self, err: int, reason: str) -> None:
        self._refusal = BlockError(err, reason)

    def allow_writes(self) -> None:
        self._refusal = None

    @property
    def writes_refused(self) -> bool:
        return self._refusal is not None

    def replace_child(self, child: BlockNode) -> None:
        """Serve ``child`` from now on; only while the gate is held."""
        if not self.gate.held:
            raise RuntimeError(f"{self.name}: replace_child outside the gate")
        if child.size != self.size:
            raise ValueError(f"{self.name}: the new child's size differs")
        self.child = child

    async def _io(self, op: str, *args, modifies: bool = False):
        """``self.child.<op>(*args)`` inside the gate.  The child is looked up
        after entering: a failover may have replaced it while we waited."""
        gate = self.gate
        if not gate.try_enter():
            await gate.enter()
        try:
            if modifies and self._refusal is not None:
                self.refused += 1
                raise BlockError(self._refusal.errno, str(self._refusal))
            try:
                return await getattr(self.child, op)(*args)
            except BlockError as exc:
                if self.on_error is not None:
                    self.on_error(self, op, exc)
                raise
        finally:
            gate.leave()

    # -- BlockNode ----------------------------------------------------------------
    async def _read(self, offset: int, length: int) -> bytes:
        return await self._io("read", offset, length)

    def read_now(self, offset: int, length: int) -> bytes | None:
        gate = self.gate
        if not gate.try_enter():
            return None
        try:
            return self.child.read_now(offset, length)
        except BlockError as exc:
            if self.on_error is not None:
                self.on_error(self, "read", exc)
            raise
        finally:
            gate.leave()

    async def _write(self, offset: int, data, fua: bool) -> None:
        await self._io("write", offset, data, fua, modifies=True)

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._io("write_zeroes", offset, length, fua,
                       modifies=True)

    async def _trim(self, offset: int, length: int) -> None:
        await self._io("trim", offset, length, modifies=True)

    async def flush(self) -> None:
        await self._io("flush")

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        return self.child.allocation(offset, length)

    def children(self) -> dict[str, BlockNode]:
        return {"file": self.child}

    def statistics(self) -> dict:
        return {"writes_refused": self.writes_refused, "refused": self.refused}


