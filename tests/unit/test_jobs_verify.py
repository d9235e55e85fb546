"""Online verify in process (replfs/jobs/verify.py through the primary
controller): both controllers over real image files, the in-process link of
tests/replpair.py.  A cluster is changed "behind replfs's back" by writing
the secondary's image file directly.  Pattern bytes: 0x11 base, 0x22 primary,
0x33 a change nobody replicated."""

from __future__ import annotations

import errno
import json
import os
import random

import pytest
import trio

from replfs.errors import BlockError, UsageError
from replfs.fuse.control import parse
from replfs.jobs.verify import VerifyProgress
from replfs.jobs.verify import verify as verify_job
from tests.replpair import CL, PRIMARY, Pair, pattern, read_image, run

MiB = 1 << 20
BEHIND = 0x33


def poke(path: str, offset: int, data: bytes) -> None:
    """Change an image file behind replfs's back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)


def result(pair) -> dict:
    st = pair.primary.status()["verify"]
    json.dumps(st)  # the status file must be able to carry it
    return st


def test_an_equal_pair_has_no_differences_and_no_data_crosses_the_link(tmp_path):
    pair = Pair(tmp_path, size=64 * CL)

    async def main():
        async with pair.running():
            await pair.pdisk().write(3 * CL, pattern(PRIMARY, 2 * CL))
            sent = sum(link.sent for link in pair.links.values())
            await pair.primary.run_action("verify")
            st = result(pair)
            assert st["state"] == "done" and st["method"] == "digests", st
            assert st["differences"] == [] and st["differences_count"] == 0
            assert st["checked_bytes"] == st["total_bytes"] == pair.size
            assert st["finished_at"] >= st["started_at"] and st["repaired"] is False
            assert sum(link.sent for link in pair.links.values()) == sent
            ops = [c["op"] for s in pair.sessions for c in s.control.calls]
            assert "digests" in ops
            assert pair.primary.state == "replicating"

    run(main)


def test_changed_clusters_are_reported_exactly_and_coalesced(tmp_path):
    pair = Pair(tmp_path, size=64 * CL + 4096, disks=("d0", "d1"))  # a short last cluster

    async def main():
        async with pair.running():
            poke(pair.simages["d0"], 5 * CL + 100, b"\x33" * 10)        # one byte run
            poke(pair.simages["d0"], 9 * CL, pattern(BEHIND, 2 * CL))    # two adjacent
            poke(pair.simages["d0"], 64 * CL + 10, b"\x33")              # the short one
            poke(pair.simages["d1"], 30 * CL - 1, b"\x33\x33")           # across a border
            await pair.primary.run_action("verify")
            st = result(pair)
            assert st["state"] == "done"
            assert st["differences"] == [["d0", 5 * CL, CL], ["d0", 9 * CL, 2 * CL],
                                         ["d0", 64 * CL, 4096], ["d1", 29 * CL, 2 * CL]], st
            assert st["differences_count"] == 4 and st["difference_bytes"] == 5 * CL + 4096
            assert st["repaired"] is False
            # a plain verify reports; it changes nothing
            assert read_image(pair.simages["d0"])[9 * CL] == BEHIND
            assert pair.pstates["d0"].record.out_of_sync_bytes == 0

    run(main)


def test_repair_makes_the_pair_equal(tmp_path):
    pair = Pair(tmp_path, size=64 * CL)

    async def main():
        async with pair.running():
            await pair.pdisk().write(0, pattern(PRIMARY, 8 * CL))
            poke(pair.simages["d0"], 2 * CL, pattern(BEHIND, 4096))
            poke(pair.simages["d0"], 40 * CL, pattern(BEHIND, 3 * CL))
            await pair.primary.run_action("verify", True)
            st = result(pair)
            assert st["differences"] == [["d0", 2 * CL, CL], ["d0", 40 * CL, 3 * CL]], st
            assert st["repaired"] is True and st["repaired_bytes"] == 4 * CL
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])
            assert pair.pstates["d0"].record.out_of_sync_bytes == 0
            await pair.primary.run_action("verify")
            assert result(pair)["differences"] == []
            await pair.primary.checkpoint()
            await pair.secondary.checkpoint()
            assert await pair.view().read(0, pair.size) == read_image(pair.pimages["d0"])

    run(main)


def test_a_plain_nbd_secondary_is_verified_by_reading(tmp_path):
    pair = Pair(tmp_path, size=32 * CL, plain=True)

    async def main():
        async with pair.running():
            poke(pair.simages["d0"], 7 * CL, b"\x33")
            await pair.primary.run_action("verify")
            st = result(pair)
            assert st["method"] == "read" and st["differences"] == [["d0", 7 * CL, CL]], st
            await pair.primary.run_action("verify", True)
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])
            await pair.primary.run_action("verify")
            assert result(pair)["differences"] == []

    run(main)


@pytest.mark.parametrize("seed", range(6))
def test_writes_racing_the_verify_raise_no_false_alarm(tmp_path, seed):
    """A writer hammers a few clusters while the verify walks them in small
    windows: the first pass sees writes in flight (``rechecked_bytes``), the
    re-check under the range lock must clear every one of them.  One cluster
    really differs and must be the only one reported."""
    rng = random.Random(seed)
    size = 48 * CL
    pair = Pair(tmp_path, size=size)
    hot = rng.sample(range(size // CL), 6)
    real = next(c for c in range(size // CL) if c not in hot)

    async def main():
        async with pair.running():
            poke(pair.simages["d0"], real * CL + rng.randrange(CL), b"\x33")
            # The link delays each write up to 2 ms (a network's latency): a
            # wide window between a write landing here and there.
            link = pair.links["d0"]
            send = link._write

            async def slow_write(offset, data, fua):
                await trio.sleep(rng.random() * 0.002)
                await send(offset, data, fua)

            link._write = slow_write
            rechecked = 0
            for rnd in range(4):
                stop = trio.Event()

                async def writer(stop=stop):
                    i = 0
                    while not stop.is_set():
                        c = rng.choice(hot)
                        off = c * CL + rng.randrange(0, CL - 4096)
                        await pair.pdisk().write(off, pattern(0x40 + (i % 64), 4096))
                        i += 1
                        if rng.random() < 0.3:
                            await trio.lowlevel.checkpoint()

                progress = VerifyProgress()
                async with trio.open_nursery() as nursery:
                    for _ in range(3):
                        nursery.start_soon(writer)
                    session = pair.primary.session
                    digests = pair.primary._digests(session) if rnd % 2 == 0 else None
                    await verify_job([("d0", pair.pdisk(), CL)], digests=digests,
                                     progress=progress, window=2 * CL, workers=3)
                    stop.set()
                assert progress.differences() == [["d0", real * CL, CL]], (rnd, progress)
                rechecked += progress.rechecked_bytes
            assert rechecked > CL * 4, "the race was never exercised"
            await pair.primary.run_action("verify", True)
            assert read_image(pair.simages["d0"]) == read_image(pair.pimages["d0"])

    run(main, limit=60)


def test_verify_is_refused_unless_replicating_on_the_primary(tmp_path):
    pair = Pair(tmp_path, size=16 * CL)

    async def main():
        async with pair.running():
            with pytest.raises(BlockError) as e:
                await pair.secondary.run_action("verify")
            assert e.value.errno == errno.EINVAL and "run it on the primary" in str(e.value)
            await pair.primary.run_action("disconnect")
            with pytest.raises(BlockError) as e:
                await pair.primary.run_action("verify")
            assert e.value.errno == errno.ENOTCONN and "verify" in str(e.value)
            assert pair.primary.action_error.startswith("verify:")
            await pair.primary.run_action("failover")
            with pytest.raises(BlockError) as e:
                await pair.primary.run_action("verify")
            assert e.value.errno == errno.EINVAL

    run(main)


def test_verify_is_refused_while_syncing(tmp_path):
    pair = Pair(tmp_path, size=16 * CL)

    async def main():
        async with pair.running():
            pair.primary.resync_rate = 4096  # keep the resync running
            await pair.primary.run_action("resync", True)
            assert pair.primary.state == "syncing"
            with pytest.raises(BlockError) as e:
                await pair.primary.run_action("verify")
            assert e.value.errno == errno.EBUSY

    run(main)


def test_a_secondary_that_dies_during_verify_fails_it_and_degrades_the_pair(tmp_path):
    pair = Pair(tmp_path, size=24 * MiB)  # three windows

    async def main():
        async with pair.running():
            failed = []

            async def verify():
                try:
                    # 8 MiB/s with a burst of one second: a window a second
                    await pair.primary.verify(rate=8 * MiB)
                except BlockError as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(verify)
                with trio.fail_after(5):
                    while pair.primary.verifying is None or \
                            result(pair)["checked_bytes"] < 8 * MiB:
                        await trio.sleep(0.01)
                assert result(pair)["state"] == "running"
                assert result(pair)["eta_s"] is not None
                pair.crash_secondary()
                pair.reachable = False  # gone for good: no reconnects
            assert failed and result(pair)["state"] == "failed", result(pair)
            assert result(pair)["error"] and result(pair)["finished_at"]
            await pair.wait_state(pair.primary, "degraded")

    run(main)


def test_cancel_stops_a_running_verify_and_settles_its_repairs(tmp_path):
    pair = Pair(tmp_path, size=24 * MiB)  # three windows, one a second at 8 MiB/s

    async def main():
        async with pair.running():
            poke(pair.simages["d0"], 100, b"\x33")  # in the first window
            errors = []

            async def verify():
                try:
                    await pair.primary.run_action("verify", True, 8 * MiB)
                except BlockError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(verify)
                with trio.fail_after(5):
                    while pair.primary.verifying is None or \
                            result(pair)["checked_bytes"] < 8 * MiB:
                        await trio.sleep(0.01)
                await pair.primary.run_action("verify", *parse("verify", b"cancel\n"))
            assert errors and errors[0].errno == errno.ECANCELED, errors
            st = result(pair)
            assert st["state"] == "cancelled" and st["checked_bytes"] < pair.size, st
            assert st["differences"] == [["d0", 0, CL]] and st["repaired_bytes"] == CL
            # the copy made before the cancel was flushed and cleared
            assert pair.pstates["d0"].record.out_of_sync_bytes == 0
            assert read_image(pair.simages["d0"])[:CL] == read_image(pair.pimages["d0"])[:CL]
            assert pair.primary.state == "replicating"
            await pair.primary.run_action("verify", False, None, True)  # none runs: no-op

    run(main)


def test_the_rate_limit_holds(tmp_path):
    pair = Pair(tmp_path, size=48 * CL)  # 3 MiB

    async def main():
        async with pair.running():
            t0 = trio.current_time()
            await pair.primary.verify(rate=MiB)  # 1 MiB at once, then 1 MiB/s
            assert trio.current_time() - t0 >= 1.5
            assert result(pair)["rate_limit"] == MiB

    run(main)


def test_verify_events(tmp_path):
    pair = Pair(tmp_path, size=16 * CL)

    async def main():
        async with pair.running():
            sub = pair.primary.events.subscribe()
            poke(pair.simages["d0"], 0, b"\x33")
            await pair.primary.run_action("verify")
            lines = [json.loads(line) for line in sub.take(1 << 20).splitlines()]
            verify = [e for e in lines if e["event"] == "verify"]
            assert verify[0]["state"] == "running" and verify[-1].get("done") is True
            assert verify[-1]["state"] == "done" and verify[-1]["differences_count"] == 1
            sub.close()

    run(main)


def test_progress_coalesces_ranges_in_any_order():
    p = VerifyProgress()
    for s, e in [(10, 20), (30, 40), (20, 30), (50, 60), (0, 5), (5, 10), (55, 70)]:
        p.add("d", s, e)
    assert p.differences() == [["d", 0, 40], ["d", 50, 20]]
    for i in range(2000):
        p.add("e", 100 * i, 100 * i + 10)
    st = p.status(0.0)
    assert len(st["differences"]) == 1000 and st["differences_truncated"]
    assert st["differences_count"] == 2002


def test_control_file_values():
    assert parse("verify", b"1\n") == ()
    assert parse("verify", b"repair\n") == (True, None)
    assert parse("verify", b"rate=100M") == (False, 100 * MiB)
    assert parse("verify", b"repair rate=1G/s\n") == (True, 1 << 30)
    assert parse("verify", b" Cancel\n") == (False, None, True)
    for bad in (b"rate=", b"rate=x", b"repair repair", b"fix", b"rate=0", b"cancel repair"):
        with pytest.raises(UsageError):
            parse("verify", bad)


def test_status_watch_shows_a_running_verify_and_status_the_result():
    from replfs.tools.watch import summary, verify_text

    p = VerifyProgress(total_bytes=4 * MiB, done_bytes=MiB)
    p.add("d0", 0, CL)
    st = {"role": "primary", "state": "replicating", "peer_connected": True,
          "verify": p.status(1.0)}
    line = summary(st)
    assert "verify 1 MiB of 4 MiB (25 %)" in line and "1 differing range so far" in line
    p.finish("done")
    assert "verify" not in summary({**st, "verify": p.status(2.0)})
    assert verify_text(p.status(2.0)) == "verify done: 1 MiB compared, 1 differing range"
