"""The block conformance suite (tests/blockconformance.py) over every local stack."""

import itertools
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from replfs.block.cbw import CopyBeforeWrite
from replfs.block.fault import FaultLayer
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage
from replfs.block.secondary import SecondaryStack
from tests.blockconformance import CHECKS, check_id

_counter = itertools.count()


def _raw(tmp_path, initial: bytes, **kw) -> RawImage:
    path = tmp_path / f"disk-{next(_counter)}.img"
    path.write_bytes(initial)
    return RawImage(path, **kw)


def _ovpath(tmp_path, what: str) -> Path:
    return tmp_path / f"{what}-{next(_counter)}.ovl"


# Each builder: (tmp_path, initial) -> (node, [things to close]); may be async.


async def build_raw(tmp_path, initial):
    node = _raw(tmp_path, initial)
    return node, [node]


async def build_raw_threaded(tmp_path, initial):
    # Everything above 4 KiB goes through worker threads.
    node = _raw(tmp_path, initial, inline_max=4096)
    return node, [node]


async def build_overlay(tmp_path, initial, cluster_size=65536):
    raw = _raw(tmp_path, initial)
    ov = Overlay(_ovpath(tmp_path, "ov"), raw, cluster_size=cluster_size)
    return ov, [ov, raw]


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
    return ov, [ov, raw]


async def build_cbw(tmp_path, initial, cluster_size=65536):
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=cluster_size)
    return CopyBeforeWrite(raw, hidden), [hidden, raw]


async def build_cbw_big_copy_cluster(tmp_path, initial):
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=4096)
    return CopyBeforeWrite(raw, hidden, cluster_size=65536), [hidden, raw]


async def build_active_over_snapshot(tmp_path, initial, cluster_size=65536):
    raw = _raw(tmp_path, initial)
    hidden = Overlay(_ovpath(tmp_path, "hidden"), raw, cluster_size=cluster_size)
    cbw = CopyBeforeWrite(raw, hidden)
    active = Overlay(_ovpath(tmp_path, "active"), cbw.snapshot, cluster_size=cluster_size)
    return active, [active, hidden, raw]


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
    return active, [active, hidden, raw]


async def build_secondary_view(tmp_path, initial):
    stack = SecondaryStack(
        _raw(tmp_path, initial), _ovpath(tmp_path, "hidden"), _ovpath(tmp_path, "active")
    )
    return stack.view, [stack]


async def build_secondary_after_failover(tmp_path, initial):
    # Disk starts with garbage in places; the view (checkpoint + VM writes)
    # is `initial`; after failover the view is the disk.
    raw = _raw(tmp_path, initial)
    stack = SecondaryStack(raw, _ovpath(tmp_path, "hidden"), _ovpath(tmp_path, "active"),
                           cluster_size=4096)
    n = len(initial)
    await stack.cbw.write(5, b"\x11" * (n // 3))  # primary: copied to hidden
    await stack.view.write(n // 2, b"\x22" * 9000)  # VM: into active
    await stack.view.write(n // 2, initial[n // 2 : n // 2 + 9000])
    await stack.failover()
    return stack.view, [stack]


async def build_fault_no_rules(tmp_path, initial):
    raw = _raw(tmp_path, initial)
    return FaultLayer(raw), [raw]


async def build_fault_yield_overlay(tmp_path, initial):
    # delay=0 makes every request yield to the scheduler: concurrent requests
    # really interleave inside the overlay.
    raw = FaultLayer(_raw(tmp_path, initial), "delay=0")
    ov = Overlay(_ovpath(tmp_path, "ov"), raw, cluster_size=4096)
    return FaultLayer(ov, "delay=0"), [ov, raw]


async def build_fault_yield_secondary(tmp_path, initial):
    disk = FaultLayer(_raw(tmp_path, initial), "delay=0")
    stack = SecondaryStack(disk, _ovpath(tmp_path, "hidden"), _ovpath(tmp_path, "active"),
                           cluster_size=4096)
    return stack.view, [stack]


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
    "secondary-view": build_secondary_view,
    "secondary-failed-over": build_secondary_after_failover,
    "fault-no-rules": build_fault_no_rules,
    "fault-yield-overlay": build_fault_yield_overlay,
    "fault-yield-secondary": build_fault_yield_secondary,
}


def factory(builder, tmp_path):
    @asynccontextmanager
    async def make_node(size, initial):
        node, closers = await builder(tmp_path, initial)
        try:
            yield node
        finally:
            for c in closers:
                c.close()

    return make_node


@pytest.mark.parametrize("check", CHECKS, ids=check_id)
@pytest.mark.parametrize("stack", list(BUILDERS))
def test_conformance(stack, check, tmp_path):
    trio.run(check, factory(BUILDERS[stack], tmp_path))
