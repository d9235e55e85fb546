"""The block conformance suite (tests/blockconformance.py) over every local stack
(the graph's own layers and the secondary disk's graph: test_block_graph.py)."""

import itertools
from pathlib import Path

from replfs.block.cbw import CopyBeforeWrite
from replfs.block.fault import FaultLayer
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage
from tests.blockconformance import conformance_test

_counter = itertools.count()


def _raw(tmp_path, initial: bytes, **kw) -> RawImage:
    path = tmp_path / f"disk-{next(_counter)}.img"
    path.write_bytes(initial)
    return RawImage(path, **kw)


def _ovpath(tmp_path, what: str) -> Path:
    return tmp_path / f"{what}-{next(_counter)}.ovl"


# Each builder: (tmp_path, initial) -> (node, [more to close]); may be async.
# The factory closes the graph under node (close_graph), then the rest.


async def build_raw(tmp_path, initial):
    return _raw(tmp_path, initial), []


async def build_raw_threaded(tmp_path, initial):
    # Everything above 4 KiB goes through worker threads.
    return _raw(tmp_path, initial, inline_max=4096), []


async def build_overlay(tmp_path, initial, cluster_size=65536):
    raw = _raw(tmp_path, initial)
    return Overlay(_ovpath(tmp_path, "ov"), raw, cluster_size=cluster_size), []


async def build_overlay_512(tmp_path, initial):
    return await build_overlay(tmp_path, initial, 512)


async def build_overlay_prefilled(tmp_path, initial):
    # Backing holds garbage where the overlay holds the right data: every
    # other 64 KiB cluster is allocated, so reads mix both.
    garbage = bytes(b ^ 0xFF for b in initial)
    raw = _raw(tmp_path, initial)
    ov = Overlay(_ovpath(tmp_path, "ov"), raw, cluster_size=4096)
    for off in range(0, len(initial), 2 * 65536):
        await ov.write(off, initial[off : off + 65536])
        n = min(65536, len(initial) - off)
        await raw.write(off, garbage[off : off + n])
    return ov, []


async def build_cbw(tmp_path, initial, cluster_size=65536):
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=cluster_size)
    return CopyBeforeWrite(raw, hidden), []


async def build_cbw_big_copy_cluster(tmp_path, initial):
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=4096)
    return CopyBeforeWrite(raw, hidden, cluster_size=65536), []


async def build_active_over_snapshot(tmp_path, initial, cluster_size=65536):
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=cluster_size)
    cbw = CopyBeforeWrite(raw, hidden)
    return Overlay(_ovpath(tmp_path, "active"), cbw.snapshot, cluster_size=cluster_size), []


async def build_active_over_snapshot_512(tmp_path, initial):
    return await build_active_over_snapshot(tmp_path, initial, 512)


async def build_active_busy_primary(tmp_path, initial):
    # The primary has rewritten the disk (through the CBW) before the VM
    # looks: the view must still be the checkpoint's content.
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=4096)
    cbw = CopyBeforeWrite(raw, hidden)
    active = Overlay(_ovpath(tmp_path, "active"), cbw.snapshot, cluster_size=65536)
    for off in range(0, len(initial), 3 * 65536):
        await cbw.write(off + 17, b"\xee" * min(70000, len(initial) - off - 17))
    return active, []


async def build_fault_no_rules(tmp_path, initial):
    return FaultLayer(_raw(tmp_path, initial)), []


async def build_fault_yield_overlay(tmp_path, initial):
    # delay=0 makes every request yield to the scheduler: concurrent requests
    # really interleave inside the overlay.
    raw = FaultLayer(_raw(tmp_path, initial), "delay=0")
    ov = Overlay(_ovpath(tmp_path, "ov"), raw, cluster_size=4096)
    return FaultLayer(ov, "delay=0"), []


BUILDERS = {
    "raw": build_raw,
    "raw-threaded": build_raw_threaded,
    "overlay": build_overlay,
    "overlay-512": build_overlay_512,
    "overlay-prefilled": build_overlay_prefilled,
    "cbw": build_cbw,
    "cbw-copy64k-target4k": build_cbw_big_copy_cluster,
    "active-snapshot": build_active_over_snapshot,
    "active-snapshot-512": build_active_over_snapshot_512,
    "active-busy-primary": build_active_busy_primary,
    "fault-no-rules": build_fault_no_rules,
    "fault-yield-overlay": build_fault_yield_overlay,
}


test_conformance = conformance_test(BUILDERS)