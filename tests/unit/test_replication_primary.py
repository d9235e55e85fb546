"""The primary's controller in process (QEMU's test-replication.c style): a
real pair of image files, an in-process link, pattern bytes.  No FUSE, no
sockets."""

from __future__ import annotations

import errno

import pytest
import trio

from replfs.errors import BlockError
from replfs.replication.stage import ReplicationStage
from tests.replpair import BASE, CL, PRIMARY, SECONDARY_VM, Pair, pattern, read_image, run



def test_reads_come_from_the_local_image(tmp_path):
    pair = Pair(tmp_path)
    with open(pair.simages["d0"], "r+b") as f:  # the secondary differs: never read
        f.write(pattern(SECONDARY_VM, CL))

    async def main():
        async with pair.running():
            assert await pair.pdisk().read(0, CL) == pattern(BASE, CL)

    run(main)


def test_a_write_lands_on_both_images_and_the_old_data_in_hidden(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.pdisk().write(CL + 100, pattern(PRIMARY, 5000))
            await pair.primary.checkpoint()
            assert pair.primary.stage is ReplicationStage.REPLICATING
            assert pair.primary.checkpoints == 1
            assert pair.pdisk().statistics()["bytes_replicated"] == 5000

    run(main)
    want = bytearray(pattern(BASE, pair.size))
    want[CL + 100:CL + 5100] = pattern(PRIMARY, 5000)
    assert read_image(pair.pimages["d0"]) == want
    assert read_image(pair.simages["d0"]) == want


def test_a_secondary_error_degrades_and_never_reaches_the_vm(tmp_path):
    pair = Pair(tmp_path, secondary_faults="write:EIO:count=1")

    async def main():
        async with pair.running():
            pair.reachable = False  # no reconnect: the degraded state stays
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))  # the VM sees success
            assert pair.primary.stage is ReplicationStage.DEGRADED
            assert "Input/output error" in pair.primary.last_error or \
                "EIO" in pair.primary.last_error
            assert not pair.primary.peer_connected
            await pair.pdisk().write(CL, pattern(PRIMARY, 4096))  # not sent any more
            with pytest.raises(BlockError) as e:
                await pair.primary.checkpoint()
            assert e.value.errno == errno.ENOTCONN

    run(main)
    assert read_image(pair.pimages["d0"])[CL:CL + 4096] == pattern(PRIMARY, 4096)
    assert read_image(pair.simages["d0"])[CL:CL + 4096] == pattern(BASE, 4096)


def test_one_failing_disk_drops_the_secondary_of_every_disk(tmp_path):
    # The secondary must never hold a mix of epochs: disk d1 stops
    # replicating too when d0's secondary fails.
    pair = Pair(tmp_path, disks=("d0", "d1"), secondary_faults="write:EIO:count=1")

    async def main():
        async with pair.running():
            pair.reachable = False  # no reconnect: the degraded state stays
            await pair.pdisk("d0").write(0, pattern(PRIMARY, 512))
            assert pair.links["d0"].broken and pair.links["d1"].broken
            assert pair.pdisk("d1").peer is None
            await pair.pdisk("d1").write(0, pattern(PRIMARY, 512))

    run(main)
    assert read_image(pair.simages["d1"])[:512] == pattern(BASE, 512)
    assert read_image(pair.pimages["d1"])[:512] == pattern(PRIMARY, 512)


def test_the_watchdog_gives_up_on_a_stalled_secondary(tmp_path):
    pair = Pair(tmp_path, timeout=0.4)

    async def main():
        async with pair.running():
            pair.reachable = False  # no reconnect: the degraded state stays
            pair.links["d0"].stall()
            start = trio.current_time()
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))  # completes
            waited = trio.current_time() - start
            assert 0.4 <= waited < 2.0, waited
            assert pair.primary.stage is ReplicationStage.DEGRADED
            assert "did not answer within 0.4 s" in pair.primary.last_error
            pair.links["d0"].resume()  # a stalled peer that wakes up gets nothing

    run(main)
    assert read_image(pair.simages["d0"])[:4096] == pattern(BASE, 4096)


def test_a_flush_error_of_the_secondary_is_recorded_not_returned(tmp_path):
    pair = Pair(tmp_path, secondary_faults="flush:EIO:count=1")

    async def main():
        async with pair.running():
            pair.reachable = False  # no reconnect: the degraded state stays
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            await pair.pdisk().flush()
            assert pair.primary.stage is ReplicationStage.DEGRADED

    run(main)


def test_a_local_error_reaches_the_vm_and_nothing_is_sent(tmp_path):
    pair = Pair(tmp_path, primary_faults="write:ENOSPC:count=1")

    async def main():
        async with pair.running():
            with pytest.raises(BlockError) as e:
                await pair.pdisk().write(0, pattern(PRIMARY, 512))
            assert e.value.errno == errno.ENOSPC
            assert pair.primary.stage is ReplicationStage.REPLICATING
            assert pair.links["d0"].sent == 0

    run(main)
    assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])


def test_failover_on_the_primary_drops_the_secondary_and_runs_alone(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.primary.failover()
            assert pair.primary.stage is ReplicationStage.FAILED_OVER
            assert not pair.secondary.peer_connected
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            await pair.primary.failover()  # a no-op the second time
            for action in (pair.primary.checkpoint,):
                with pytest.raises(BlockError) as e:
                    await action()
                assert e.value.errno == errno.EINVAL
                assert "failed-over" in str(e.value)

    run(main)
    assert read_image(pair.simages["d0"])[:512] == pattern(BASE, 512)


def test_stop_flushes_both_sides_and_ends_replication(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            await pair.primary.stop()
            assert pair.primary.stage is ReplicationStage.STOPPED
            await pair.primary.stop()  # a no-op
            with pytest.raises(BlockError) as e:
                await pair.primary.failover()
            assert e.value.errno == errno.EINVAL
            with pytest.raises(BlockError) as e:
                await pair.primary.checkpoint()
            assert e.value.errno == errno.EINVAL

    run(main)
    assert read_image(pair.simages["d0"])[:512] == pattern(PRIMARY, 512)


def test_a_refused_action_keeps_the_reason_the_primary_degraded(tmp_path):
    pair = Pair(tmp_path, secondary_faults="write:EIO:count=1")

    async def main():
        async with pair.running():
            pair.reachable = False  # no reconnect: the degraded state stays
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            degraded_because = pair.primary.last_error
            assert "EIO" in degraded_because or "Input/output" in degraded_because
            for action in ("checkpoint", "resync"):
                with pytest.raises(BlockError):
                    await pair.primary.run_action(action)
                assert pair.primary.action_error.startswith(f"{action}: ")
                assert pair.primary.last_error == degraded_because  # verbatim, kept
            await pair.primary.run_action("failover")
            assert pair.primary.action_error is None

    run(main)


def test_a_refused_action_is_recorded_in_last_error_when_in_sync(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.primary.stop()
            with pytest.raises(BlockError):
                await pair.primary.run_action("checkpoint")
            assert pair.primary.last_error.startswith("checkpoint: not replicating")
            assert pair.primary.action_error == pair.primary.last_error

    run(main)


def test_status_names_the_stage_and_the_disks(tmp_path):
    pair = Pair(tmp_path, disks=("a", "b"))

    async def main():
        async with pair.running():
            st = pair.primary.status()
            assert st["role"] == "primary" and st["state"] == "replicating"
            assert st["peer_connected"] is True and set(st["disks"]) == {"a", "b"}
            assert st["disks"]["a"]["image"] == pair.pimages["a"]

    run(main)
