"""Continuous replication in process: the pair heals itself after faults, and
never silently diverges.  Both controllers over real image and metadata
files, the in-process link of tests/replpair.py (which counts the bytes it
carries), restarts as crashes (nothing written at "kill -9"), pattern bytes:
0x11 base, 0x22 primary, 0x33 secondary VM."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from replfs.errors import BlockError, PeerMismatch
from tests.replpair import BASE, CL, PRIMARY, SECONDARY_VM, Pair, pattern, read_image, run

MiB = 1 << 20


def sent(pair) -> int:
    return sum(link.sent for link in pair.links.values())


async def write_scattered(disk, rng, n: int, size: int, byte: int = PRIMARY) -> set[int]:
    """``n`` 4 KiB writes at random cluster-aligned-ish offsets; the clusters."""
    clusters = set()
    for _ in range(n):
        off = rng.randrange(0, size - 4096) & ~511
        await disk.write(off, pattern(byte, 4096))
        clusters.update(range(off // CL, (off + 4095) // CL + 1))
    return clusters


async def settle(pair) -> None:
    await pair.wait_state(pair.primary, "replicating")
    await pair.primary.checkpoint()
    await pair.secondary.checkpoint()


def images_equal(pair, name="d0") -> bool:
    return read_image(pair.simages[name]) == read_image(pair.pimages[name])


def test_a_fresh_pair_is_taken_as_equal_and_shares_a_generation(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            assert pair.primary.state == "replicating" and sent(pair) == 0
            assert pair.primary.generation_check == "ok"
            p, s = pair.pstates["d0"].header, pair.sstates["d0"].header
            assert p.current != 0 and p.current == s.current and p.bitmap_gen == 0

    run(main)


def test_secondary_restart_resyncs_only_what_it_missed(tmp_path):
    pair = Pair(tmp_path, size=64 * MiB // 8)
    rng = random.Random(7)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))
            pair.crash_secondary()
            clusters = await write_scattered(pair.pdisk(), rng, 40, pair.size)
            assert pair.primary.state == "degraded"
            assert pair.primary.last_error and pair.primary.reconnect == "retrying"
            dirty = pair.pstates["d0"].record.out_of_sync_bytes
            assert dirty >= len(clusters) * CL
            await pair.restart_secondary()
            await pair.wait_state(pair.primary, "replicating")
            assert pair.primary.last_error is None and pair.primary.reconnect_error is None
            resync_bytes = sent(pair)
            assert resync_bytes <= dirty + CL, (resync_bytes, dirty)
            assert resync_bytes >= len(clusters) * CL * 0.9
            await settle(pair)
            assert await pair.view().read(0, pair.size) == read_image(pair.pimages["d0"])

    run(main)
    assert images_equal(pair)


def test_a_restarted_secondary_is_inconsistent_until_resync_and_checkpoint(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.primary.checkpoint()
            await pair.secondary.checkpoint()
            checkpoint = read_image(pair.simages["d0"])
            await pair.pdisk().write(CL, pattern(PRIMARY, CL))  # post-checkpoint
            pair.reachable = False
            pair.crash_secondary()
            await pair.restart_secondary()
            s = pair.secondary
            assert s.state == "inconsistent" and not s.failover_ready
            # Its hidden overlay died with it: failover cannot give the
            # checkpoint back, so it is refused and changes nothing.
            with pytest.raises(BlockError) as e:
                await s.run_action("failover")
            assert e.value.errno == errno.ENODATA and "--force" in s.last_error
            assert read_image(pair.simages["d0"]) != checkpoint  # (it has the write)
            with pytest.raises(BlockError) as e:
                await s.checkpoint()
            assert e.value.errno in (errno.EBUSY, errno.ENOTCONN)
            pair.reachable = True
            await pair.primary.connect()
            await pair.wait_state(pair.primary, "replicating")
            assert s.state == "replicating" and not s.failover_ready
            await pair.primary.checkpoint()
            await s.checkpoint()
            assert s.failover_ready
            await s.failover()
            assert s.state == "failed-over"

    run(main)
    assert images_equal(pair)


def test_failover_force_takes_the_disk_as_it_is(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, CL))
            pair.reachable = False
            pair.crash_secondary()
            await pair.restart_secondary()
            await pair.secondary.run_action("failover", True)
            assert pair.secondary.state == "failed-over"

    run(main)
    assert read_image(pair.simages["d0"])[:CL] == pattern(PRIMARY, CL)


def test_primary_crash_with_writes_in_flight_resyncs_by_digest(tmp_path):
    # The link stalls, the primary writes (its copies never arrive), the
    # primary dies.  After its restart the activity log's extents are
    # suspects: compared by digest, and only what differs is sent.
    pair = Pair(tmp_path, size=32 * MiB, timeout=30)

    async def main():
        async with pair.running():
            # warm: many extents are hot, all in sync
            for i in range(0, pair.size, 4 * MiB):
                await pair.pdisk().write(i, pattern(PRIMARY, 4096))
            pair.links["d0"].stall()
            async with trio.open_nursery() as n:
                for off in (5 * MiB, 9 * MiB + 4096, 20 * MiB):
                    n.start_soon(pair.pdisk().write, off, pattern(PRIMARY + 1, 8192))
                await trio.sleep(0.2)
                pair.crash_primary()
                n.cancel_scope.cancel()
            assert read_image(pair.simages["d0"])[5 * MiB:5 * MiB + 8192] == \
                pattern(BASE, 8192)
            for link in pair.links.values():
                link.sent = 0
            await pair.restart_primary()
            st = pair.pstates["d0"]
            assert st.crashed
            await pair.wait_state(pair.primary, "replicating")
            resync_bytes = sent(pair)
            assert 0 < resync_bytes <= 6 * CL, resync_bytes  # 3 writes, 4 clusters at most
            await settle(pair)

    run(main)
    assert images_equal(pair)


def test_checkpoints_are_refused_while_a_resync_runs(tmp_path):
    pair = Pair(tmp_path, size=16 * MiB)

    async def main():
        async with pair.running():
            pair.crash_secondary()
            for i in range(0, pair.size, CL):
                await pair.pdisk().write(i, pattern(PRIMARY, 512))
            await pair.restart_secondary()
            with trio.fail_after(10):
                while pair.primary.state != "syncing":
                    await trio.sleep(0)
            for link in pair.links.values():
                link.stall()
            await trio.sleep(0.05)
            for ctl in (pair.primary, pair.secondary):
                with pytest.raises(BlockError) as e:
                    await ctl.run_action("checkpoint")
                assert e.value.errno == errno.EBUSY
                assert "resync in progress" in ctl.action_error
                assert "bytes left" in ctl.action_error
            for link in pair.links.values():
                link.resume()
            await settle(pair)

    run(main)
    assert images_equal(pair)


def test_a_secondary_checkpoint_without_a_primary_is_refused(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.view().write(0, pattern(SECONDARY_VM, 512))
            pair.reachable = False
            await pair.primary.disconnect()
            assert pair.primary.state == "degraded" and pair.primary.reconnect == "off"
            with pytest.raises(BlockError) as e:
                await pair.secondary.run_action("checkpoint")
            assert e.value.errno == errno.ENOTCONN
            # nothing changed: the VM's write is still in the view
            assert await pair.view().read(0, 512) == pattern(SECONDARY_VM, 512)
            assert pair.secondary.checkpoints == 0

    run(main)


def test_disconnect_stops_retries_and_connect_resyncs(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.primary.disconnect()
            await pair.pdisk().write(3 * CL, pattern(PRIMARY, 100))
            await trio.sleep(0.5)  # several reconnect intervals: no retry
            assert pair.primary.state == "degraded" and len(pair.sessions) == 1
            await pair.primary.connect()
            await pair.wait_state(pair.primary, "replicating")
            await settle(pair)

    run(main)
    assert images_equal(pair)


def test_a_failed_over_secondary_refuses_the_old_primary_after_a_restart(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            await pair.primary.checkpoint()
            await pair.secondary.checkpoint()
            pair.crash_primary()
            await pair.secondary.failover()
            await pair.view().write(0, pattern(SECONDARY_VM, CL))  # after failover
            after = read_image(pair.simages["d0"])
            pair.crash_secondary()
            await pair.restart_secondary()
            assert pair.secondary.state == "failed-over"
            with pytest.raises(PeerMismatch) as e:
                await pair.restart_primary()
            assert "split brain" in str(e.value)
            assert "split brain" in pair.primary.last_error
            assert read_image(pair.simages["d0"]) == after  # nothing overwritten

    run(main)


def test_split_brain_is_refused_on_both_sides(tmp_path):
    # The secondary failed over and was restarted as a *secondary* of a
    # fresh run that forgot it: both images diverged from one generation,
    # and both made themselves the survivor (a diverged secondary that did
    # not fail over is an old primary: it gives its writes up, re-protect).
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            pair.reachable = False
            await pair.primary.disconnect()                # primary goes on alone...
            await pair.pdisk().write(0, pattern(PRIMARY, 512))
            s = pair.sstates["d0"]
            await s.new_generation(keep_bitmap_gen=False,  # ...and so did the secondary
                                   failover="done")
            await trio.sleep(0.1)
            pimg, simg = read_image(pair.pimages["d0"]), read_image(pair.simages["d0"])
            pair.reachable = True
            with pytest.raises(BlockError) as e:
                await pair.primary.connect()
            assert "split brain" in str(e.value)
            for ctl in (pair.primary, pair.secondary):
                assert "split brain" in ctl.last_error
            assert read_image(pair.pimages["d0"]) == pimg
            assert read_image(pair.simages["d0"]) == simg

    run(main)


def test_a_new_empty_secondary_gets_a_full_sync_while_writes_go_on(tmp_path):
    pair = Pair(tmp_path, size=8 * MiB)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 2 * MiB))
            pair.crash_secondary()
            # a new, empty secondary image, no metadata
            with open(pair.simages["d0"], "wb") as f:
                f.truncate(pair.size)
            os.unlink(pair.sstates["d0"].path)
            await pair.restart_secondary()
            async with trio.open_nursery() as n:
                async def writer():
                    rng = random.Random(3)
                    for _ in range(50):
                        await write_scattered(pair.pdisk(), rng, 1, pair.size, PRIMARY + 2)
                        await trio.sleep(0.001)
                n.start_soon(writer)
                await pair.wait_state(pair.primary, "replicating")
            await settle(pair)
            assert sent(pair) >= pair.size

    run(main)
    assert images_equal(pair)


def test_a_plain_nbd_secondary_skips_the_generation_check(tmp_path):
    pair = Pair(tmp_path, plain=True)

    async def main():
        async with pair.running():
            assert pair.primary.generation_check.startswith("skipped")
            pair.crash_secondary()
            await pair.pdisk().write(CL, pattern(PRIMARY, 4096))
            await pair.restart_secondary()
            await pair.wait_state(pair.primary, "replicating")
            assert sent(pair) == CL

    run(main)
    assert images_equal(pair)


def test_a_failover_interrupted_by_a_crash_resumes_after_the_restart(tmp_path):
    pair = Pair(tmp_path, secondary_faults="")

    async def main():
        async with pair.running():
            await pair.primary.checkpoint()
            await pair.secondary.checkpoint()
            checkpoint = read_image(pair.simages["d0"])
            await pair.pdisk().write(0, pattern(PRIMARY, 3 * CL))    # undone by failover
            await pair.view().write(5 * CL, pattern(SECONDARY_VM, 100))  # kept
            want = bytearray(checkpoint)
            want[5 * CL:5 * CL + 100] = pattern(SECONDARY_VM, 100)
            pair.crash_primary()
            pair.sdisk().set_rules("write:EIO:skip=1")  # the commit dies half-way
            with pytest.raises(BlockError):
                await pair.secondary.failover()
            assert pair.sstates["d0"].header.failover == "committing"
            pair.crash_secondary()
            await pair.restart_secondary()
            assert pair.secondary.state == "failed-over"
            assert read_image(pair.simages["d0"]) == bytes(want)

    run(main)
