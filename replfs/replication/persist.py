"""One disk's persistent replication state, as the controllers use it.

Design note
-----------
Each image has a metadata file beside it (:mod:`replfs.meta`): generations,
the last checkpoint, the dirty record and its activity log, the secondary's
epoch and failover state.  :class:`DiskState` opens it, tells what the last
run left behind (``fresh``: never paired; ``crashed``: the daemon did not
exit cleanly), and writes every change durably *before* it takes effect,
from an I/O thread so the trio loop does not stall on fdatasync.

Generations follow DRBD (research notes §1.3): ``current`` names the data
history of the image; a primary that loses its peer, and a secondary that
fails over, start a new one and keep the old in ``bitmap_gen`` (the
generation the dirty record counts from) and ``history``.  Two images whose
``current`` agree are equal except for the primary's dirty record; the
connect-time decision (:func:`decide`) reads the rest.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from replfs.block.dirty import ActivityLog, DirtyRecord
from replfs.core import iothreads
from replfs.core.bitmap import ClusterBitmap
from replfs.meta.format import Header, MetaFile
from replfs.meta.paths import meta_path

log = logging.getLogger("replfs.replication")


class DiskState:
    """The metadata file of one disk, its dirty record and activity log."""

    def __init__(self, name: str, image: str, size: int, cluster_size: int, *,
                 meta_dir: str | None = None, tracking: bool = False) -> None:
        self.name = name
        self.image = image
        self.path = meta_path(image, meta_dir)
        self.meta = MetaFile.open(self.path, size=size, cluster_size=cluster_size)
        h = self.meta.header
        self.fresh = self.meta.created or h.current == 0
        self.crashed = not self.meta.created and not h.clean
        self.record: DirtyRecord | None = None
        self.al: ActivityLog | None = None
        if tracking:
            self.start_tracking()

    def start_tracking(self) -> None:
        """Keep a dirty record and an activity log from now on (a primary
        from the start; a secondary from its failover on: its VM's writes are
        what a later re-protect sends)."""
        if self.record is not None:
            return
        h = self.meta.header
        record = DirtyRecord(h.size, h.cluster_size, self.meta.read_bitmap())
        old_al = self.meta.read_al() if self.crashed else []
        if old_al:
            record.suspect_extents(old_al)
            log.warning("disk %s: the last run did not exit cleanly: %d extents of its "
                        "activity log are compared with the peer", self.name, len(old_al))
        self.record = record
        # The old extents stay in the log until the resync cleared them
        # (or the bits were persisted): a second crash still finds them.
        self.al = ActivityLog(self.meta.write_al, before_evict=self.persist_bits,
                              hot=old_al)

    def own_changes(self) -> tuple[bytes, list[int]]:
        """What this image changed on its own since its ``bitmap_gen``: the
        dirty bits, and the extents a crash left in the activity log (they
        may or may not differ).  A secondary that was a primary, or failed
        over, hands them to its new primary, whose resync overwrites them."""
        if self.record is not None:
            return self.record.to_bytes(), (sorted(self.al.hot) if self.al is not None
                                            and self.crashed else [])
        return self.meta.read_bitmap(), (self.meta.read_al() if self.crashed else [])

    async def forget_own_changes(self) -> None:
        """In sync with a primary: nothing of this image's own is left."""
        rec = self.record
        if rec is not None:
            rec.clear(0, rec.nclusters)
            await self.persist_bits()
            if self.al is not None:
                await self.al.clear()
            return
        await iothreads.run(self.meta.write_bitmap,
                            ClusterBitmap(self.meta.header.nclusters).to_bytes())
        await iothreads.run(self.meta.write_al, [])

    @property
    def header(self) -> Header:
        return self.meta.header

    async def update(self, **changes) -> Header:
        """Write a changed header, durably, then return it."""
        h = dataclasses.replace(self.meta.header, **changes)
        await iothreads.run(self.meta.write_header, h)
        return h

    async def new_generation(self, keep_bitmap_gen: bool = True, **changes) -> int:
        """Start a new data generation; the old one becomes ``bitmap_gen``
        (unless one is kept already: the record still counts from it).
        ``changes``: more header fields, written in the same transaction."""
        h = dataclasses.replace(self.meta.header, history=list(self.meta.header.history),
                                **changes)
        if not (keep_bitmap_gen and h.bitmap_gen) and h.current:
            h.bitmap_gen = h.current
        h.new_generation()
        await iothreads.run(self.meta.write_header, h)
        return h.current

    async def write_bits(self, bits: bytes) -> None:
        """Replace the dirty bits on disk (a secondary's failover records what
        it changed); a record kept in memory takes them too."""
        await iothreads.run(self.meta.write_bitmap, bits)
        if self.record is not None:
            merged = ClusterBitmap.from_bytes(self.record.nclusters, bits)
            for s, e in merged.set_runs():
                self.record.bits.set_range(s, e)
            self.record.nonempty = self.record.nonempty or merged.count > 0

    def has_own_changes(self) -> bool:
        """Dirty bits on disk or in memory, or a crash's activity log."""
        if self.record is not None:
            return self.record.nonempty
        bits = self.meta.read_bitmap()
        return bits.count(0) != len(bits) or (self.crashed and bool(self.meta.read_al()))

    async def persist_bits(self) -> None:
        """The dirty record on disk (suspects count as dirty there: after a
        second crash they are copied rather than compared)."""
        rec = self.record
        if rec is None or not rec.changed:
            return
        rec.changed = False
        bits = rec.bits
        if rec.suspect.count:
            bits = ClusterBitmap.from_bytes(rec.nclusters, bits.to_bytes())
            for s, e in rec.suspect.set_runs():
                bits.set_range(s, e)
        try:
            await iothreads.run(self.meta.write_bitmap, bits.to_bytes())
        except BaseException:
            rec.changed = True  # not known to be on disk: write it next time
            raise

    async def start_run(self) -> None:
        """Mark the file as in use: a crash from now on is seen at the next start."""
        await self.update(clean=False)

    async def close_clean(self) -> None:
        """At a clean exit: bits on disk, the log emptied, ``clean`` set."""
        try:
            await self.persist_bits()
            if self.al is not None:
                await self.al.clear()
            await self.update(clean=True)
        finally:
            self.meta.close()

    def status(self) -> dict:
        h = self.meta.header
        return {"generation": gen(h.current), "metadata": self.path}

    def describe(self) -> dict:
        """What the peer needs for the connect-time decision."""
        h = self.meta.header
        return {
            "node_id": h.node_id, "current": h.current, "bitmap_gen": h.bitmap_gen,
            "history": list(h.history), "fresh": self.fresh, "crashed": self.crashed,
            "failover": h.failover, "epoch_dirty": h.epoch_dirty,
            "full_resync": h.extra.get("full_resync", ""),
            "own_changes": self.has_own_changes(),
            "size": h.size, "cluster_size": h.cluster_size,
        }


@dataclass(frozen=True)
class Decision:
    """What a connect does for one disk: ``adopt`` (both new: taken as
    equal), ``record`` (resync the primary's dirty record, maybe empty),
    ``full`` (resync every cluster), ``split-brain`` (refused)."""

    action: str
    reason: str


def gen(g: int) -> str:
    return f"{g:016x}"


def decide(name: str, mine: dict, peer: dict) -> Decision:
    """The primary's decision for one disk from both sides' ``describe()``.

    A secondary that took writes of its own and did not fail over is an old
    primary restarted as a secondary: it gives its writes since the common
    generation up (COLO's failover discards them by definition), and the
    resync overwrites them ("reprotect": this primary's record plus the
    secondary's own changes, which the caller fetches).  One that failed
    over as well is a split brain, unless it was started with
    ``--discard-my-data``: it gave its failover up before serving (its
    ``failover`` is empty here), so it counts as re-protect.
    """
    if peer.get("failover"):
        return Decision("split-brain",
                        f"disk {name}: split brain: the secondary failed over (generation "
                        f"{gen(peer['current'])}) and this primary has generation "
                        f"{gen(mine['current'])}")
    if mine["fresh"] and peer["fresh"]:
        return Decision("adopt", "both images are new: taken as equal")
    if peer["fresh"]:
        return Decision("full", "the secondary's image has no replication history")
    if mine["fresh"]:
        return Decision("full", "this primary's image has no replication history")
    p_cur, p_bm, p_hist = mine["current"], mine["bitmap_gen"], mine["history"]
    s_cur, s_bm, s_hist = peer["current"], peer["bitmap_gen"], peer["history"]
    if mine.get("full_resync"):
        return Decision("full", mine["full_resync"])
    if peer.get("full_resync"):
        return Decision("full", f"the secondary: {peer['full_resync']}")
    if s_cur == p_cur:
        return Decision("record", "same generation")
    if s_cur == p_bm:
        return Decision("record", "the secondary is behind by this primary's dirty record")
    if s_bm and (s_bm == p_bm or s_bm == p_cur):
        return Decision("reprotect",
                        f"the secondary (generation {gen(s_cur)}) took writes of its own since "
                        f"generation {gen(s_bm)}: they are overwritten with this primary's data")
    if s_bm and p_cur in s_hist:
        return Decision("full", "the secondary took writes of its own since an older "
                                "generation of this primary")
    if s_cur in p_hist:
        return Decision("full", "the secondary is older than this primary's dirty record")
    return Decision("full", "the secondary's image has an unrelated history")
