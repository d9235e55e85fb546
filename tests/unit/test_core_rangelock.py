"""RangeLock: sharing, exclusion, FIFO fairness, cancellation."""

import trio
import trio.testing

from replfs.core.rangelock import RangeLock


def run(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_uncontended_needs_no_wait():
    async def main():
        lock = RangeLock()
        async with lock.exclusive(0, 10):
            async with lock.exclusive(10, 20):  # adjacent, not overlapping
                async with lock.shared(20, 30):
                    async with lock.shared(25, 26):
                        assert lock.held == 4 and lock.waiting == 0
        assert lock.held == 0
        async with lock.exclusive(5, 5):  # empty range: never conflicts
            async with lock.exclusive(0, 100):
                pass

    run(main)


def test_shared_excludes_exclusive_and_vice_versa():
    async def main():
        lock = RangeLock()
        log = []

        async def task(name, excl, a, b, hold):
            async with (lock.exclusive if excl else lock.shared)(a, b):
                log.append(("in", name, trio.current_time()))
                await trio.sleep(hold)
            log.append(("out", name, trio.current_time()))

        async with trio.open_nursery() as n:
            n.start_soon(task, "r1", False, 0, 10, 1)
            await trio.sleep(0.1)
            n.start_soon(task, "r2", False, 5, 15, 1)  # shares with r1
            await trio.sleep(0.1)
            n.start_soon(task, "w", True, 9, 10, 1)  # waits for r1 and r2
            await trio.sleep(0.1)
            n.start_soon(task, "w2", True, 50, 60, 1)  # unrelated: no wait
        t = {(k, name): when for k, name, when in log}
        assert t["in", "r2"] < t["out", "r1"]
        assert t["in", "w"] >= t["out", "r2"] and t["in", "w"] >= t["out", "r1"]
        assert abs(t["in", "w2"] - 0.3) < 1e-9

    run(main)


def test_fifo_reader_queues_behind_waiting_writer():
    async def main():
        lock = RangeLock()
        order = []

        async def task(name, excl, a, b):
            async with (lock.exclusive if excl else lock.shared)(a, b):
                order.append(name)
                await trio.sleep(1)

        async with trio.open_nursery() as n:
            n.start_soon(task, "reader1", False, 0, 10)
            await trio.sleep(0.1)
            n.start_soon(task, "writer", True, 0, 10)
            await trio.sleep(0.1)
            # Would share with reader1, but a writer is waiting first.
            n.start_soon(task, "reader2", False, 0, 10)
            await trio.sleep(0.1)
            assert lock.waiting == 2
        assert order == ["reader1", "writer", "reader2"]

    run(main)


def test_cancel_unblocks_queued_request():
    async def main():
        lock = RangeLock()
        got = []

        async def holder():
            async with lock.exclusive(0, 10):
                await trio.sleep(5)

        async def waiter(name, a, b):
            async with lock.exclusive(a, b):
                got.append((name, trio.current_time()))

        async with trio.open_nursery() as n:
            n.start_soon(holder)
            await trio.sleep(1)
            scope = trio.CancelScope()

            async def doomed():
                with scope:
                    await waiter("doomed", 5, 20)  # waits for holder

            n.start_soon(doomed)
            await trio.sleep(1)
            n.start_soon(waiter, "queued", 15, 20)  # waits behind doomed (FIFO)
            await trio.sleep(1)
            assert got == [] and lock.waiting == 2
            scope.cancel()
            await trio.sleep(0.5)
            assert [g[0] for g in got] == ["queued"]
            assert abs(got[0][1] - 3.0) < 1e-9  # woke at the cancel, not after holder
        assert lock.held == 0 and lock.waiting == 0

    run(main)


def test_is_locked():
    async def main():
        lock = RangeLock()
        async with lock.shared(0, 4):
            assert lock.is_locked(3, 5, exclusive=True)
            assert not lock.is_locked(3, 5, exclusive=False)
            assert not lock.is_locked(4, 8)
        assert not lock.is_locked(0, 4)

    run(main)


def test_try_acquire_acquire_release():
    # The hot path's form: try_acquire (sync) or await acquire, then release.
    async def main():
        with trio.fail_after(5):
            lock = RangeLock()
            a = lock.try_acquire(0, 10, True)
            assert a is not None and lock.held == 1
            assert lock.try_acquire(5, 6, False) is None  # conflicts: nothing queued
            assert lock.held == 1 and lock.waiting == 0
            b = lock.try_acquire(10, 20, False)  # adjacent
            c = lock.try_acquire(3, 3, True)  # empty: granted, never listed
            assert b is not None and c is not None and lock.held == 2
            got = []

            async def waiter(tag, start, end, exclusive):
                req = await lock.acquire(start, end, exclusive)
                got.append((tag, trio.current_time()))
                await trio.sleep(1)
                lock.release(req)

            async with trio.open_nursery() as n:
                n.start_soon(waiter, "w", 5, 15, True)
                await trio.testing.wait_all_tasks_blocked()
                assert lock.waiting == 1
                # A request behind a waiting one that it overlaps is refused too
                # (FIFO), one that overlaps nothing is not.
                assert lock.try_acquire(12, 13, False) is None
                d = lock.try_acquire(30, 40, True)
                assert d is not None
                await trio.sleep(1)
                lock.release(a)
                lock.release(c)
                await trio.sleep(1)
                assert got == []  # b still holds 10..20
                lock.release(b)
                lock.release(d)
            assert got == [("w", 2.0)]
            assert lock.held == 0 and lock.waiting == 0

    run(main)
