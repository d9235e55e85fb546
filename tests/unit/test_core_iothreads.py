"""The I/O thread pool: results, errors, concurrency, no abandoning on cancel."""

from __future__ import annotations

import threading

import pytest
import trio

from replfs.core import iothreads


def test_result_and_exception_come_back():
    async def main():
        assert await iothreads.run(lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            await iothreads.run(lambda: 1 / 0)
        name = await iothreads.run(lambda: threading.current_thread().name)
        assert name == "replfs-io"

    trio.run(main)


def test_calls_run_concurrently():
    n = 8
    barrier = threading.Barrier(n, timeout=10)  # breaks (and fails) unless all 8 run at once

    async def main():
        results = []

        async def one(i):
            results.append(await iothreads.run(lambda: (barrier.wait(), i)[1]))

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(n))

    trio.run(main)
    assert iothreads.statistics()["threads"] <= iothreads.MAX_THREADS


def test_cancel_waits_for_the_call():
    started, release = threading.Event(), threading.Event()
    done = []

    def slow():
        started.set()
        release.wait(10)
        done.append(True)
        return "finished"

    async def main():
        with trio.move_on_after(0.05):
            got = await iothreads.run(slow)
        # The call was not abandoned: the cancel had to wait for it.
        assert done == [True] and got == "finished"

    async def release_later():
        await trio.to_thread.run_sync(started.wait, 10)
        await trio.sleep(0.2)
        release.set()

    async def both():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(release_later)
            await main()

    trio.run(both)


def test_already_cancelled_does_not_start():
    ran = []

    async def main():
        with trio.CancelScope() as scope:
            scope.cancel()
            await iothreads.run(ran.append, 1)
        assert scope.cancelled_caught

    trio.run(main)
    assert ran == []
