"""Commit: write what an overlay holds into the node under it, then empty it.

Design note
-----------
QEMU's commit block job, for replfs's volatile overlays.  Failover runs it
twice: the hidden overlay into the disk (the disk goes back to the last
checkpoint), then the active overlay into the disk (the disk becomes the
VM's view).

``commit(overlay, into=None, progress=None)`` holds the overlay's
``whole()`` lock throughout (no request to the overlay runs meanwhile) and

1. copies every allocated run (``overlay.allocated_ranges()``), in order,
   in chunks of at most ``COMMIT_CHUNK`` (4 MiB) bytes, from the overlay's
   data file into ``into`` (default: the overlay's ``backing``).  ``into``
   exists because the secondary's active overlay sits on a read-only view
   (the CBW's snapshot) but commits into the disk under it;
2. after each chunk, if ``into.can_writeback``, calls
   ``into.start_writeback`` on it: the kernel starts writing the chunk back
   while the next one is copied, so the final flush has little left to wait
   for (a 256 MiB hidden commit: 0.17 s without, 0.09 s with).  Pass-through
   layers (FaultLayer) forward the capability, so fault injection does not
   switch it off;
3. flushes ``into``;
4. empties the overlay (``make_empty_held``), still under the lock, so no
   write can land between the flush and the emptying and be dropped.

On any error the exception propagates and nothing is emptied: the overlay
still holds everything, and running the commit again rewrites the same
bytes (it is idempotent), so a failed commit is simply retried.  A
cancelled one (trio) stops the same way.

Progress: :class:`Progress` counts ``done`` of ``total`` bytes (QEMU's job
``current-progress``/``total-progress``).  Pass one in to read it from
another task while the commit runs; ``total`` is set when the copy starts
(the lock is held, so it cannot grow).  A retry starts again from 0.  The
overlay's own ``commits``/``bytes_committed`` counters (its status keys)
are kept too.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from replfs.block.base import BlockNode
from replfs.block.overlay import Overlay
from replfs.errors import BlockError

#: Largest single copy (read from the overlay, write into the target).
COMMIT_CHUNK = 4 * 1024 * 1024


@dataclass(slots=True)
class Progress:
    """``done`` of ``total`` bytes; readable while the job runs."""

    done: int = 0
    total: int = 0


async def commit(
    overlay: Overlay, into: BlockNode | None = None, *, progress: Progress | None = None
) -> Progress:
    """Write every allocated cluster of ``overlay`` into ``into`` (default:
    its ``backing``), flush ``into``, then empty ``overlay``.  Returns the
    progress (``done == total`` on success)."""
    target = overlay.backing if into is None else into
    if target.size != overlay.size:
        raise BlockError(
            errno.EINVAL,
            f"{overlay.name}: cannot commit {overlay.size} bytes into {target.name} "
            f"({target.size} bytes)",
        )
    if progress is None:
        progress = Progress()
    writeback = target.can_writeback
    stats = overlay.stats
    async with overlay.whole():
        progress.done, progress.total = 0, overlay.allocated_bytes
        for a, b in overlay.allocated_ranges():
            while a < b:
                n = min(COMMIT_CHUNK, b - a)
                await target.write(a, await overlay.data.read(a, n))
                if writeback:
                    await target.start_writeback(a, n)
                stats.bytes_committed += n
                progress.done += n
                a += n
        await target.flush()
        stats.commits += 1
        await overlay.make_empty_held()
    return progress
