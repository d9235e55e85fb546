"""The secondary's controller in process (QEMU's test-replication.c style):
checkpoint, failover and stop over a real graph, with the primary's writes
arriving through an in-process link.  Pattern bytes: 0x11 base, 0x22 the
primary VM, 0x33 the secondary VM."""

from __future__ import annotations

import errno

import pytest
import trio

from replfs.errors import BlockError
from replfs.replication.stage import ReplicationStage
from tests.replpair import BASE, CL, PRIMARY, SECONDARY_VM, Pair, pattern, read_image, run



def layout(size: int, *writes: tuple[int, bytes]) -> bytes:
    out = bytearray(pattern(BASE, size))
    for off, data in writes:
        out[off:off + len(data)] = data
    return bytes(out)


def test_the_view_is_the_checkpoint_plus_the_vms_writes(tmp_path):
    pair = Pair(tmp_path)
    p, v = pattern(PRIMARY, CL), pattern(SECONDARY_VM, 100)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, p)             # after the (initial) checkpoint
            await pair.view().write(CL // 2, v)        # the secondary VM
            assert await pair.view().read(0, pair.size) == layout(pair.size, (CL // 2, v))
            await pair.secondary.checkpoint()
            assert pair.secondary.checkpoints == 1
            # view == secondary disk == primary disk; the VM's write is gone
            assert await pair.view().read(0, pair.size) == layout(pair.size, (0, p))
            st = pair.secondary.status()["disks"]["d0"]
            assert st["hidden_bytes"] == 0 and st["active_bytes"] == 0

    run(main)
    assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])


def test_failover_gives_the_checkpoint_plus_the_vms_writes(tmp_path):
    pair = Pair(tmp_path)
    p1, p2, v = pattern(PRIMARY, 3 * CL), pattern(PRIMARY, CL), pattern(SECONDARY_VM, 5000)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, p1)
            await pair.primary.checkpoint()
            await pair.secondary.checkpoint()
            await pair.pdisk().write(4 * CL, p2)      # after the checkpoint: discarded
            await pair.view().write(2 * CL + 7, v)    # the secondary VM's: kept
            await pair.secondary.failover()
            assert pair.secondary.stage is ReplicationStage.FAILED_OVER
            # the primary's connection was dropped; its next write degrades it
            await pair.pdisk().write(6 * CL, p2)
            assert pair.primary.stage is ReplicationStage.DEGRADED
            await pair.view().write(8 * CL, v)        # straight onto the disk now

    run(main)
    want = layout(pair.size, (0, p1), (2 * CL + 7, v), (8 * CL, v))
    assert read_image(pair.simages["d0"]) == want


def test_after_failover_the_primary_is_refused_with_the_reason(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.secondary.failover()
            refusal = pair.secondary.admit_primary("d0", 0)
            assert refusal.startswith(
                "peer-connect: split brain: this secondary has failed over and takes no "
                "primary (its generation: d0 ")
            with pytest.raises(BlockError) as e:  # a write that was already on its way
                await pair.sgraph.disks["d0"].export.write(0, b"late")
            assert e.value.errno == errno.ESHUTDOWN
            assert pair.secondary.last_error is None  # a refusal is not a failure
            await pair.secondary.failover()           # a no-op the second time
            for action in (pair.secondary.checkpoint, pair.secondary.stop):
                with pytest.raises(BlockError) as e:
                    await action()
                assert e.value.errno == errno.EINVAL

    run(main)


def test_failover_waits_for_a_primary_write_in_flight(tmp_path):
    # The primary's write is slow on the secondary disk when failover starts:
    # failover waits for it at the gate, so the disk ends == the view, and a
    # VM write that arrives meanwhile waits, then lands on the disk.
    pair = Pair(tmp_path, secondary_faults="write:delay=1:count=1", timeout=10)

    async def main():
        async with pair.running():
            await pair.view().write(5 * CL, pattern(SECONDARY_VM, 3))
            async with trio.open_nursery() as n:
                n.start_soon(pair.pdisk().write, CL, pattern(PRIMARY, 100))
                await trio.sleep(0.3)
                n.start_soon(pair.secondary.failover)
                await trio.sleep(0.1)
                n.start_soon(pair.view().write, 7 * CL, b"late")
            assert pair.secondary.stage is ReplicationStage.FAILED_OVER

    run(main)
    # the primary's write is post-checkpoint: copy-before-write kept the old
    # data in hidden, and failover committed it back
    want = layout(pair.size, (5 * CL, pattern(SECONDARY_VM, 3)), (7 * CL, b"late"))
    assert read_image(pair.simages["d0"]) == want


def test_a_failed_commit_can_be_retried(tmp_path):
    pair = Pair(tmp_path, secondary_faults="")

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 10))
            await pair.view().write(2 * CL, pattern(SECONDARY_VM, 10))
            view = await pair.view().read(0, pair.size)
            pair.sdisk().set_rules("write:EIO:count=1")
            with pytest.raises(BlockError):
                await pair.secondary.run_action("failover")
            assert pair.secondary.stage is ReplicationStage.REPLICATING
            assert "Input/output error" in pair.secondary.last_error or \
                "EIO" in pair.secondary.last_error
            with pytest.raises(BlockError) as e:  # still refused meanwhile
                await pair.sgraph.disks["d0"].export.write(0, b"x")
            assert e.value.errno == errno.ESHUTDOWN
            await pair.secondary.failover()
            assert pair.secondary.stage is ReplicationStage.FAILED_OVER
            assert await pair.view().read(0, pair.size) == view

    run(main)


def test_stop_checkpoints_and_refuses_the_primary(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            await pair.view().write(CL, pattern(SECONDARY_VM, 512))
            await pair.secondary.stop()
            assert pair.secondary.stage is ReplicationStage.STOPPED
            assert pair.secondary.checkpoints == 1
            assert "stopped" in pair.secondary.admit_primary("d0", 0)
            with pytest.raises(BlockError) as e:
                await pair.secondary.checkpoint()
            assert e.value.errno == errno.EINVAL
            await pair.secondary.stop()        # a no-op
            await pair.secondary.failover()    # allowed after a stop
            assert pair.secondary.stage is ReplicationStage.FAILED_OVER

    run(main)
    assert read_image(pair.simages["d0"]) == layout(pair.size, (0, pattern(PRIMARY, 512)))


def test_a_checkpoint_is_atomic_for_every_disk(tmp_path):
    # Writes keep coming on both disks while checkpoints run: after each,
    # every disk's view equals its secondary disk.
    pair = Pair(tmp_path, disks=("a", "b"))

    async def main():
        async with pair.running():
            async def writer(name, byte):
                for i in range(40):
                    await pair.pdisk(name).write((i % 16) * CL, pattern(byte + i % 3, 4096))
                    await trio.sleep(0)

            async with trio.open_nursery() as n:
                n.start_soon(writer, "a", PRIMARY)
                n.start_soon(writer, "b", PRIMARY)
                for _ in range(5):
                    await trio.sleep(0)
                    await pair.secondary.checkpoint()
                    for name in ("a", "b"):
                        d = pair.sgraph.disks[name]
                        assert d.hidden.allocated_bytes == 0 == d.active.allocated_bytes
            await pair.secondary.checkpoint()
            for name in ("a", "b"):
                assert await pair.view(name).read(0, pair.size) == \
                    await pair.sgraph.disks[name].disk.read(0, pair.size)

    run(main)
    for name in ("a", "b"):
        assert read_image(pair.simages[name]) == read_image(pair.pimages[name])


def test_an_export_error_is_recorded(tmp_path):
    pair = Pair(tmp_path, secondary_faults="write:ENOSPC:count=1")

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            assert "primary's write failed" in pair.secondary.last_error
            assert pair.primary.stage is ReplicationStage.DEGRADED

    run(main)


def test_shutdown_removes_the_overlays(tmp_path):
    pair = Pair(tmp_path)
    paths = [d.hidden.path for d in pair.sgraph.disks.values()] + \
        [d.active.path for d in pair.sgraph.disks.values()]

    async def main():
        async with pair.running():
            await pair.view().write(0, b"x")

    run(main)
    import os
    assert not any(os.path.exists(p) for p in paths)
