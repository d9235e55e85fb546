"""The one interface every block layer implements.

Design note
-----------
A layer is a ``BlockNode`` of fixed ``size`` (bytes).  The I/O methods are
coroutines run on the trio thread; they raise :class:`replfs.errors.BlockError`
(an errno inside) and nothing else for I/O failures.

* ``read(offset, length) -> bytes`` returns exactly ``length`` bytes.  A
  range that is not inside ``[0, size]`` raises ``EINVAL``.
* ``write(offset, data, fua=False)``: a range past the end raises
  ``ENOSPC`` and writes nothing.  ``data`` is any bytes-like object.
* ``write_zeroes(offset, length, fua=False)`` and ``trim(offset, length)``:
  same bounds rule as write.  After ``trim`` the content is unspecified by
  NBD, but every replfs layer reads zeroes there.
* ``flush()``: everything completed before the call is durable after it.
* ``allocation(offset, length) -> list[Extent]``: which parts of the range
  this layer holds itself (``allocated=True``) and which it passes to its
  backing.  Extents are contiguous, in order, and cover the range exactly.
  Synchronous: it consults in-memory metadata only.
* ``close()``: release file descriptors; idempotent.

Zero-length requests are valid no-ops (after the bounds check).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from replfs.errors import BlockError


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    allocated: bool


class BlockNode:
    """Base class with the bounds checks; subclasses override the ``_do`` parts."""

    size: int = 0
    #: Short name for status and error messages.
    name: str = "node"

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

    # -- interface ----------------------------------------------------------
    async def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    async def write(self, offset: int, data, fua: bool = False) -> None:
        raise NotImplementedError

    async def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        raise NotImplementedError

    async def trim(self, offset: int, length: int) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        raise NotImplementedError

    def allocation(self, offset: int, length: int) -> list[Extent]:
        self.check_read(offset, length)
        return [Extent(offset, length, True)] if length else []

    def close(self) -> None:
        pass

    def statistics(self) -> dict:
        """Counters for the status file; cheap, synchronous."""
        return {}
