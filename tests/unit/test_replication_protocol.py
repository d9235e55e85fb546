"""The checkpoint write protocol in process (QEMU test-replication style):
both controllers over real image and metadata files, joined by the
in-process link of tests/replpair.py (which can stall and abort, and counts
what it carries).  Pattern bytes: 0x11 base, 0x22 primary, 0x33 secondary VM."""

from __future__ import annotations

import errno

import pytest
import trio

from replfs.errors import BlockError
from tests.replpair import CL, PRIMARY, Pair, pattern, read_image, run


class CPair(Pair):
    """A pair whose primary runs ``protocol`` with ``max_lag``."""

    def __init__(self, tmp_path, *args, protocol: str = "checkpoint",
                 max_lag: int = 64 * CL, **kw) -> None:
        self.protocol, self.max_lag = protocol, max_lag
        kw.setdefault("timeout", 5.0)
        super().__init__(tmp_path, *args, **kw)

    def open_primary(self) -> None:
        super().open_primary()
        self.primary.protocol = self.protocol
        self.primary.max_lag = self.max_lag


def sent(pair) -> int:
    return sum(link.sent for link in pair.links.values())


async def until(pred, limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not pred():
            await trio.sleep(0.005)


def test_writes_complete_locally_and_are_streamed(tmp_path):
    pair = CPair(tmp_path)

    async def main():
        async with pair.running():
            p = pair.primary
            assert p.state == "replicating" and p.streamer is not None
            pair.links["d0"].stall()
            with trio.fail_after(1):  # the stalled secondary is not on the VM's path
                for i in range(4):
                    await pair.pdisk().write(i * CL, pattern(PRIMARY, CL))
            assert p.lag_bytes == 4 * CL and p.state == "replicating"
            assert p.status()["lag_bytes"] == 4 * CL and p.status()["protocol"] == "checkpoint"
            pair.links["d0"].resume()
            await until(lambda: p.lag_bytes == 0)
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])
            assert p.last_error is None

    run(main)


def test_a_4k_write_sends_4k_not_its_cluster(tmp_path):
    pair = CPair(tmp_path)

    async def main():
        async with pair.running():
            before = sent(pair)
            await pair.pdisk().write(CL + 8192, pattern(PRIMARY, 4096))
            await until(lambda: pair.primary.lag_bytes == 0)
            assert sent(pair) - before == 4096
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])

    run(main)


def test_back_pressure_at_max_lag(tmp_path):
    # the lag counts the 4 KiB blocks written, not their 64 KiB clusters
    pair = CPair(tmp_path, max_lag=2 * 4096)

    async def main():
        async with pair.running():
            p = pair.primary
            pair.links["d0"].stall()
            done = []

            async def writer():
                for i in range(6):
                    await pair.pdisk().write(i * CL, pattern(PRIMARY, 4096))
                    done.append(i)
                    if i < 3:
                        assert p.lag_bytes == (i + 1) * 4096

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                await trio.sleep(0.3)
                # beyond max-lag the writes wait: bounded, never unbounded
                assert len(done) == 3 and p.lag_bytes == 3 * 4096
                assert p.state == "replicating"
                pair.links["d0"].resume()
            assert len(done) == 6
            await until(lambda: p.lag_bytes == 0)
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])

    run(main)


def test_checkpoint_drains_with_writes_held(tmp_path):
    pair = CPair(tmp_path)

    async def main():
        async with pair.running():
            p = pair.primary
            pair.links["d0"].stall()
            for i in range(3):
                await pair.pdisk().write(i * CL, pattern(PRIMARY, CL))
            order = []

            async def checkpoint():
                await p.checkpoint(pair=True)
                order.append("checkpoint")

            async def late_write():
                await trio.sleep(0.1)  # the checkpoint holds the barrier by then
                await pair.pdisk().write(10 * CL, pattern(0x44, CL))
                order.append(f"write after {pair.secondary.checkpoints} checkpoint")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(checkpoint)
                nursery.start_soon(late_write)
                await trio.sleep(0.3)
                assert order == []  # still draining; the write waits at the barrier
                pair.links["d0"].resume()
            assert sorted(order) == ["checkpoint", "write after 1 checkpoint"]
            assert p.checkpoints == 1 and pair.secondary.checkpoints == 1
            assert p.last_checkpoint_drain_s >= 0.25
            # the secondary's checkpoint is exactly the drained state: no 0x44
            view = await pair.view().read(0, pair.size)
            img = bytearray(read_image(pair.pimages["d0"]))
            img[10 * CL:11 * CL] = b"\x11" * CL
            assert view == bytes(img)

    run(main)


def test_pair_checkpoint_is_atomic_for_two_disks(tmp_path):
    pair = CPair(tmp_path, disks=("a", "b"))

    async def main():
        async with pair.running():
            for name in ("a", "b"):
                await pair.pdisk(name).write(2 * CL, pattern(PRIMARY, 3 * CL))
            await pair.primary.checkpoint(pair=True)
            for name in ("a", "b"):
                assert await pair.view(name).read(0, pair.size) == \
                    read_image(pair.pimages[name])
            assert pair.secondary.checkpoints == 1 and pair.primary.lag_bytes == 0
            assert pair.sstates["a"].header.checkpoint == 1

    run(main)


def test_secondary_alone_refuses_a_checkpoint_in_checkpoint_mode(tmp_path):
    pair = CPair(tmp_path)

    async def main():
        async with pair.running():
            assert pair.secondary.protocol == "checkpoint"
            with pytest.raises(BlockError) as info:
                await pair.secondary.run_action("checkpoint")
            assert info.value.errno == errno.EBUSY
            assert "--pair" in str(info.value) and "queued" in str(info.value)
            with pytest.raises(BlockError) as info:
                await pair.secondary.run_action("checkpoint", True)
            assert "run it on the primary" in str(info.value)
            assert pair.secondary.checkpoints == 0

    run(main)


def test_link_loss_in_checkpoint_mode_keeps_the_queue_then_resyncs(tmp_path):
    pair = CPair(tmp_path, size=64 * CL)

    async def main():
        async with pair.running():
            p = pair.primary
            pair.links["d0"].stall()
            for i in range(0, 40, 3):
                await pair.pdisk().write(i * CL + 512, pattern(PRIMARY, 4096))
            queued = p.lag_bytes
            assert queued > 0
            pair.links["d0"].abort()  # the link dies with writes queued
            await until(lambda: p.state != "replicating")
            assert p.streamer is None and p.lag_bytes == 0
            assert pair.pstates["d0"].record.out_of_sync_bytes >= queued
            await pair.wait_state(p, "replicating")  # reconnect + the resync job
            await p.checkpoint(pair=True)
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])
            assert await pair.view().read(0, pair.size) == read_image(pair.pimages["d0"])

    run(main)


def test_watchdog_gives_up_on_a_stalled_stream(tmp_path):
    pair = CPair(tmp_path, timeout=0.3)

    async def main():
        async with pair.running():
            p = pair.primary
            pair.links["d0"].stall()
            pair.reachable = False  # no reconnect behind the test's back
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))
            await until(lambda: p.state == "degraded", 3)
            assert "did not answer" in p.last_error
            await pair.pdisk().write(CL, pattern(PRIMARY, 4096))  # never blocked
            assert pair.pstates["d0"].record.dirty_clusters == 2

    run(main)


def test_sync_mode_is_unchanged_and_pairs_checkpoints_too(tmp_path):
    pair = CPair(tmp_path, protocol="sync")

    async def main():
        async with pair.running():
            p = pair.primary
            assert p.streamer is None and pair.pdisk().stream is None
            pair.links["d0"].stall()
            with trio.move_on_after(0.2) as scope:  # a sync write waits for both sides
                await pair.pdisk().write(0, pattern(PRIMARY, 4096))
            assert scope.cancelled_caught
            pair.links["d0"].resume()
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))
            assert p.status()["lag_bytes"] == 0 and p.status()["protocol"] == "sync"
            await pair.secondary.checkpoint()  # allowed alone in sync mode
            await p.checkpoint(pair=True)
            assert pair.secondary.checkpoints == 2
            assert p.last_checkpoint_drain_s is None

    run(main)


def test_pair_checkpoint_refused_against_a_plain_nbd_secondary(tmp_path):
    pair = CPair(tmp_path, plain=True)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))
            with pytest.raises(BlockError) as info:
                await pair.primary.run_action("checkpoint", True)
            assert info.value.errno == errno.EOPNOTSUPP
            assert "plain NBD" in str(info.value)
            await pair.primary.checkpoint()  # without --pair: the drain
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])

    run(main)


def test_resync_action_ends_the_stream_then_streams_again(tmp_path):
    pair = CPair(tmp_path)

    async def main():
        async with pair.running():
            p = pair.primary
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))
            await p.resync(full=True)
            assert p.streamer is None
            await pair.wait_state(p, "replicating")
            assert p.streamer is not None
            await pair.pdisk().write(CL, pattern(PRIMARY, 4096))
            await p.checkpoint(pair=True)
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])

    run(main)
