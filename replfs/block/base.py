"""The one interface every block layer implements.

Design note
-----------
A layer is a ``BlockNode`` of fixed ``size`` (bytes).  The I/O methods are
coroutines run on the trio thread; they raise :class:`replfs.errors.BlockError`
(an errno inside) and nothing else for I/O failures.

The public methods are template methods (QEMU's ``bdrv_co_pwritev`` checks
the request before the driver sees it; nbdkit's server does the same before
any filter): they check the bounds once, turn a zero-length request into a
no-op, and only then call the layer's ``_read`` / ``_write`` /
``_write_zeroes`` / ``_trim`` / ``_allocation``.  A layer overrides the
underscore methods, never the public ones, so no layer repeats the checks.

* ``read(offset, length) -> bytes`` returns exactly ``length`` bytes.  A
  range that is not inside ``[0, size]`` raises ``EINVAL``.
* ``read_now(offset, length) -> bytes | None``: a plain call, not a
  coroutine.  The same data as ``read`` if the node can serve it without
  waiting for anything (no lock held against it, the gate open, the pages
  cached when other requests are queued), else ``None`` and the caller
  awaits ``read``.  The default is ``None``; the nodes on the VM's read
  paths (gate, mirror, overlays, snapshot, raw image) implement it.  Why:
  a read of the secondary's view passes five layers, and each awaited
  layer costs two coroutine frames on the daemon's one thread; as plain
  calls, the FUSE and NBD read handlers await only when something must
  actually be waited for.  Bounds are not checked: a range outside
  ``[1, size]`` bytes is simply ``None`` (``read`` raises).
* ``write(offset, data, fua=False)``: a range past the end raises
  ``ENOSPC`` and writes nothing.  ``data`` is any bytes-like object.
* ``write_zeroes(offset, length, fua=False)`` and ``trim(offset, length)``:
  same bounds rule as write.  After ``trim`` the content is unspecified by
  NBD, but every replfs layer reads zeroes there.
* ``flush()``: everything completed before the call is durable after it.
  (No bounds, so layers override ``flush`` itself.)
* ``allocation(offset, length) -> list[Extent]``: which parts of the range
  this layer holds itself (``allocated=True``) and which it passes to its
  backing.  Extents are contiguous, in order, and cover the range exactly.
  Synchronous: it consults in-memory metadata only.

Edges and capabilities
----------------------
* ``children()`` names a node's edges, as QEMU names its child edges
  (``file``, ``backing``, ``target``): the graph is walkable without knowing
  each class.
* Capabilities are class attributes, constant for a node's life (nbdkit's
  ``.can_*``): ``can_writeback`` says that ``start_writeback()`` starts
  writing dirty pages back (a raw image); ``can_abort`` that ``abort()``
  drops a connection at once (an NBD client).  Callers ask the capability,
  or just call the method: the defaults are harmless no-ops.  Pass-through
  layers forward both to their child.

Who closes what
---------------
The graph owns its nodes (QEMU's ``bdrv_unref``): ``close()`` releases only
what the node itself opened (file descriptors, scratch files) and never
touches its children; :func:`close_graph` closes every node reachable from
the roots once, parents before children.  ``close()`` is idempotent.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass

from replfs.errors import BlockError


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    allocated: bool


def nbytes(data) -> int:
    """Length in bytes of any bytes-like object."""
    return data.nbytes if isinstance(data, memoryview) else len(data)


class BlockNode:
    """Base class: bounds checks once, then the layer's ``_`` methods."""

    size: int = 0
    #: Short name for status and error messages.
    name: str = "node"

    #: ``start_writeback()`` starts writing dirty pages back.
    can_writeback: bool = False
    #: ``abort()`` drops a connection to something outside this process.
    can_abort: bool = False

    # -- bounds -------------------------------------------------------------
    def check_read(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(
                errno.EINVAL,
                f"{self.name}: read of {length} bytes at {offset} is outside the "
                f"disk ({self.size} bytes)",
            )

    def check_write(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise BlockError(errno.EINVAL, f"{self.name}: negative offset or length")
        if offset + length > self.size:
            raise BlockError(
                errno.ENOSPC,
                f"{self.name}: write of {length} bytes at {offset} is past the end "
                f"of the disk ({self.size} bytes)",
            )

    # -- interface (template methods) ----------------------------------------
    # The checks are inlined (the methods raise only when a bound is crossed):
    # these run for every request of every layer.
    async def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_read(offset, length)
        if not length:
            return b""
        return await self._read(offset, length)

    async def write(self, offset: int, data, fua: bool = False) -> None:
        length = data.nbytes if type(data) is memoryview else len(data)
        if offset < 0 or offset + length > self.size:
            self.check_write(offset, length)
        if length:
            await self._write(offset, data, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_write(offset, length)
        if length:
            await self._write_zeroes(offset, length, fua)

    async def trim(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_write(offset, length)
        if length:
            await self._trim(offset, length)

    async def flush(self) -> None:
        raise NotImplementedError

    def read_now(self, offset: int, length: int) -> bytes | None:
        """The data at once, or None: await :meth:`read` (module note)."""
        return None

    # A request sent now, its completion awaited later (the NBD client: the
    # mirror overlaps the peer's write with the local one).  None: this node
    # cannot; the caller then awaits ``write`` / ``flush``.
    async def begin_write(self, offset: int, data, fua: bool = False):
        return None

    async def begin_flush(self):
        return None

    async def end(self, started) -> None:
        raise NotImplementedError

    def allocation(self, offset: int, length: int) -> list[Extent]:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_read(offset, length)
        if not length:
            return []
        return self._allocation(offset, length)

    # -- what a layer implements ---------------------------------------------
    async def _read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def _write(self, offset: int, data, fua: bool) -> None:
        raise NotImplementedError

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        raise NotImplementedError

    async def _trim(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def _allocation(self, offset: int, length: int) -> list[Extent]:
        return [Extent(offset, length, True)]

    # -- edges, capabilities, life -------------------------------------------
    def children(self) -> dict[str, BlockNode]:
        """Named child edges (none for a leaf)."""
        return {}

    async def start_writeback(self, offset: int, length: int) -> None:
        """Hint: start writing this range back to stable storage (no wait)."""

    def abort(self) -> None:
        """Drop the connection to the outside at once (requests fail)."""

    def close(self) -> None:
        """Release what this node opened itself (never its children)."""

    async def aclose(self) -> None:
        """Close politely (an NBD client says NBD_CMD_DISC first)."""
        self.close()

    def statistics(self) -> dict:
        """Counters for the status file; cheap, synchronous."""
        return {}


def walk(roots: Iterable[BlockNode]) -> list[BlockNode]:
    """Every node reachable from ``roots`` once, each before all of its
    children (a topological order: the reverse of a depth-first post-order)."""
    post: list[BlockNode] = []
    seen: set[int] = set()

    def visit(node: BlockNode) -> None:
        seen.add(id(node))
        for child in node.children().values():
            if id(child) not in seen:
                visit(child)
        post.append(node)

    for root in roots:
        if id(root) not in seen:
            visit(root)
    return post[::-1]


def close_graph(roots: Iterable[BlockNode]) -> None:
    """Close every node reachable from ``roots`` once, parents first."""
    for node in walk(roots):
        node.close()
