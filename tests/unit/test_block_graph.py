"""The graph's own layers - the gated node and its gate, the mirror - and the
secondary disk's graph: the conformance kit over each, and their rules."""

from __future__ import annotations

import errno
import itertools

import pytest
import trio
import trio.testing

from replfs.block.base import BlockNode, close_graph, walk
from replfs.block.fault import FaultLayer
from replfs.block.gated import Gate, GatedNode
from replfs.block.graph import SecondaryDisk
from replfs.block.mirror import Mirror
from replfs.block.raw import RawImage
from replfs.errors import BlockError
from tests.blockconformance import conformance_test
from tests.replpair import checkpoint_disk, failover_disk

_counter = itertools.count()


def _raw(tmp_path, initial: bytes) -> RawImage:
    path = tmp_path / f"disk-{next(_counter)}.img"
    path.write_bytes(initial)
    return RawImage(path)


def _never_fails(mirror, reason):
    raise AssertionError(f"the peer failed: {reason}")


# Each builder: (tmp_path, initial) -> (node, roots to close, a final check)
async def build_gated(tmp_path, initial):
    raw = _raw(tmp_path, initial)
    return GatedNode(raw, Gate(), "gated"), [raw], None


async def build_mirror(tmp_path, initial):
    local, peer = _raw(tmp_path, initial), _raw(tmp_path, initial)
    node = Mirror("m", local, peer, on_peer_error=_never_fails)

    async def peer_equals_local():
        assert await peer.read(0, peer.size) == await local.read(0, local.size)

    return node, [node], peer_equals_local


async def build_mirror_yielding_peer(tmp_path, initial):
    # Every peer request yields: overlapping writes really overlap in flight.
    local, raw = _raw(tmp_path, initial), _raw(tmp_path, initial)
    node = Mirror("m", local, FaultLayer(raw, "delay=0"), on_peer_error=_never_fails)

    async def peer_equals_local():
        assert await raw.read(0, raw.size) == await local.read(0, local.size)

    return node, [node], peer_equals_local


async def build_secondary_view(tmp_path, initial):
    d = SecondaryDisk("d", _raw(tmp_path, initial), tmp_path, Gate(), cluster_size=4096)
    return d.view, [d.view, d.export], None


async def build_secondary_view_busy_primary(tmp_path, initial):
    # The primary overwrote clusters since the checkpoint: the view must not see it.
    d = SecondaryDisk("d", FaultLayer(_raw(tmp_path, initial), "delay=0"), tmp_path, Gate(),
                      cluster_size=4096)
    for off in range(0, len(initial), 3 * 65536):
        await d.export.write(off + 17, b"\xee" * min(70000, len(initial) - off - 17))
    return d.view, [d.view, d.export], None


async def build_secondary_after_failover(tmp_path, initial):
    # The disk starts with other data in places; the view (checkpoint + VM
    # writes) is `initial`; after failover the view is the disk.
    d = SecondaryDisk("d", _raw(tmp_path, initial), tmp_path, Gate(), cluster_size=4096)
    n = len(initial)
    await d.export.write(5, b"\x11" * (n // 3))      # primary: its old data goes to hidden
    await d.view.write(n // 2, b"\x22" * 9000)       # VM: into active
    await d.view.write(n // 2, initial[n // 2:n // 2 + 9000])
    await failover_disk(d)
    return d.view, [d.view, d.export], None


BUILDERS = {
    "gated": build_gated,
    "mirror": build_mirror,
    "mirror-yielding-peer": build_mirror_yielding_peer,
    "secondary-view": build_secondary_view,
    "secondary-view-busy-primary": build_secondary_view_busy_primary,
    "secondary-failed-over": build_secondary_after_failover,
}


test_conformance = conformance_test(BUILDERS)


# -- the gate ------------------------------------------------------------------------
class Slow(BlockNode):
    """Writes wait for ``release`` to be set."""

    def __init__(self, size=4096):
        self.size = size
        self.release = trio.Event()
        self.writes = []

    async def _write(self, offset, data, fua):
        await self.release.wait()
        self.writes.append(bytes(data))

    async def _read(self, offset, length):
        return bytes(length)

    async def flush(self):
        pass


def test_an_action_waits_for_requests_in_flight_and_new_ones_wait_for_it():
    async def main():
        gate, slow = Gate(), Slow()
        node = GatedNode(slow, gate, "g")
        order = []
        async with trio.open_nursery() as n:
            n.start_soon(node.write, 0, b"a")
            await trio.testing.wait_all_tasks_blocked()

            async def action():
                async with gate.exclusive():
                    order.append("action")

            n.start_soon(action)
            await trio.testing.wait_all_tasks_blocked()
            assert order == [] and gate.statistics()["closed"]

            async def late():
                await node.write(0, b"b")
                order.append("late")

            n.start_soon(late)
            await trio.testing.wait_all_tasks_blocked()
            slow.release.set()
        assert order == ["action", "late"] and slow.writes == [b"a", b"b"]

    trio.run(main)


def test_a_write_that_waited_behind_a_refusing_action_is_refused():
    async def main():
        gate = Gate()
        raw = Slow()
        raw.release.set()
        node = GatedNode(raw, gate, "g")
        errors, refused = [], []
        node.on_error = lambda n, op, exc: errors.append(exc)

        async def write_waiting_at_the_gate():
            try:
                await node.write(0, b"x")
            except BlockError as exc:
                refused.append(exc.errno)

        async with trio.open_nursery() as n:
            async with gate.exclusive():
                n.start_soon(write_waiting_at_the_gate)
                await trio.testing.wait_all_tasks_blocked()
                node.refuse_writes(errno.ESHUTDOWN, "failed over")
        assert refused == [errno.ESHUTDOWN]
        assert raw.writes == [] and node.refused == 1 and errors == []
        assert await node.read(0, 1) == b"\0"  # reads are not refused
        with pytest.raises(BlockError) as e:
            await node.trim(0, 1)
        assert e.value.errno == errno.ESHUTDOWN and str(e.value) == "failed over"
        node.allow_writes()
        await node.write(0, b"y")
        assert raw.writes == [b"y"]

    trio.run(main)


def test_the_child_is_replaced_only_while_the_gate_is_held(tmp_path):
    a, b = _raw(tmp_path, b"a" * 512), _raw(tmp_path, b"b" * 512)
    gate = Gate()
    node = GatedNode(a, gate, "g")
    with pytest.raises(RuntimeError):
        node.replace_child(b)

    async def main():
        async with gate.exclusive():
            node.replace_child(b)
        assert await node.read(0, 3) == b"bbb"

    trio.run(main)
    close_graph([node, a])


def test_a_child_error_reaches_the_hook(tmp_path):
    raw = _raw(tmp_path, b"\0" * 4096)
    node = GatedNode(FaultLayer(raw, "write:EIO"), Gate(), "g")
    seen = []
    node.on_error = lambda n, op, exc: seen.append((n.name, op, exc.errno))

    async def main():
        with pytest.raises(BlockError):
            await node.write(0, b"x")

    trio.run(main)
    assert seen == [("g", "write", errno.EIO)]
    close_graph([node])


# -- the graph's edges ---------------------------------------------------------------
def test_walk_names_every_node_once_parents_first(tmp_path):
    d = SecondaryDisk("d", _raw(tmp_path, b"\0" * 8192), tmp_path, Gate(), cluster_size=4096)
    nodes = walk([d.view, d.export])
    assert len(nodes) == len({id(n) for n in nodes})
    pos = {id(n): i for i, n in enumerate(nodes)}
    for n in nodes:
        for child in n.children().values():
            assert pos[id(n)] < pos[id(child)], (n.name, child.name)
    assert {d.disk, d.hidden, d.active, d.cbw} <= set(nodes)
    d.close()
    assert not (tmp_path / "d.hidden").exists()


def test_checkpoint_empties_both_overlays(tmp_path):
    d = SecondaryDisk("d", _raw(tmp_path, b"\x11" * 65536), tmp_path, Gate(), cluster_size=4096)

    async def main():
        await d.export.write(0, b"\x22" * 100)
        await d.view.write(8192, b"\x33" * 100)
        await checkpoint_disk(d)
        assert d.hidden.allocated_bytes == d.active.allocated_bytes == 0
        assert await d.view.read(0, 65536) == await d.disk.read(0, 65536)

    trio.run(main)
    d.close()


def test_view_reads_now_from_each_layer_and_leaves_waiting_to_read(tmp_path):
    """``read_now`` (no await) serves the view from active, hidden or the disk;
    it answers None, and ``read`` waits, where a layer must wait."""
    C = 4096
    gate = Gate()
    d = SecondaryDisk("d", _raw(tmp_path, b"\x11" * 16 * C), tmp_path, gate, cluster_size=C)
    view = d.view

    async def main():
        await d.export.write(0, b"\x22" * C)       # primary: old cluster 0 -> hidden
        await view.write(2 * C, b"\x33" * C)       # secondary VM: cluster 2 -> active
        assert view.read_now(0, C) == b"\x11" * C           # from hidden
        assert view.read_now(C, C) == b"\x11" * C           # from the disk
        assert view.read_now(2 * C, C) == b"\x33" * C       # from active
        assert view.read_now(C + 100, C) is None            # active holds part of it only
        assert await view.read(C + 100, C) == b"\x11" * (C - 100) + b"\x33" * 100
        # A copy-before-write in progress on cluster 5 holds the cbw lock:
        copy = d.cbw.lock.try_acquire(5, 6, True)
        assert view.read_now(5 * C, C) is None
        async with trio.open_nursery() as nursery:
            got = []

            async def reader():
                got.append(await view.read(5 * C, C))

            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not got                                   # read waits for the copy
            d.cbw.lock.release(copy)
        assert got == [b"\x11" * C]
        assert view.read_now(5 * C, C) == b"\x11" * C
        # The gate held by an action: nothing is read now.
        async with gate.exclusive():
            assert view.read_now(C, C) is None
        assert view.read_now(C, C) == b"\x11" * C
        assert view.read_now(16 * C - 1, 2) is None          # past the end: read raises
        with pytest.raises(BlockError):
            await view.read(16 * C - 1, 2)

    trio.run(main)
    close_graph([d.view, d.export])
