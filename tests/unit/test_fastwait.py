"""fastwait: the replacement for pyfuse3's request wait, driven with a pipe in
place of /dev/fuse.  Each fake worker does what pyfuse3's ``_session_loop``
does: wait, then read at once (no await in between), then handle."""

import os
import select
import types
from contextlib import asynccontextmanager

import pyfuse3
import pytest
import trio
import trio.testing

from replfs.fuse import fastwait

BOUND = 5  # seconds; every test finishes in milliseconds


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    """Whatever a test installs, pyfuse3 and fastwait end as they began."""
    monkeypatch.setattr(pyfuse3, "_wait_fuse_readable", pyfuse3._wait_fuse_readable)
    monkeypatch.setattr(fastwait, "_active", None)
    monkeypatch.setattr(fastwait, "_reason", "not installed")
    monkeypatch.setattr(fastwait, "_stock_wait", None)


@pytest.fixture
def pipe():
    """(read end, write end); the read end stands for /dev/fuse.  It is
    non-blocking so that a read with nothing queued fails the test instead of
    hanging it (pyfuse3's fd blocks)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    fds = [r, w]
    yield fds
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def run(fn):
    async def bounded():
        with trio.fail_after(BOUND):
            await fn()
    trio.run(bounded)


def installed(pipe):
    """The fast wait installed on the pipe's read end: (fw, read fd, write fd)."""
    r, w = pipe
    return fastwait.install(r), r, w


def first_step(coro):
    """Run a coroutine up to its first suspension: ("returned", value) if it
    ran to the end without yielding to trio, else ("yielded", None) (the
    coroutine is then closed)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return "returned", done.value
    coro.close()
    return "yielded", None


class Workers:
    """Fake pyfuse3 workers on ``fw``: each takes one byte per request and
    then stays busy until ``release()``."""

    def __init__(self, fw, fd):
        self.fw, self.fd = fw, fd
        self.taken: list[bytes] = []
        self.ended = 0
        self._busy = trio.Event()

    async def worker(self):
        while await self.fw.wait():
            self.taken.append(os.read(self.fd, 1))  # as _session_loop: no await first
            await self._busy.wait()
        self.ended += 1

    def release(self):
        self._busy.set()

    async def start(self, nursery, n):
        for _ in range(n):
            nursery.start_soon(self.worker)
        await trio.testing.wait_all_tasks_blocked()

    @classmethod
    @asynccontextmanager
    async def running(cls, fw, fd, n=4, released=False):
        """``n`` workers in a nursery, all blocked when the body starts;
        ``ws.cancel()`` ends them."""
        ws = cls(fw, fd)
        if released:
            ws.release()  # handlers return at once
        async with trio.open_nursery() as nursery:
            ws.cancel = nursery.cancel_scope.cancel
            await ws.start(nursery, n)
            yield ws


def test_installed_version_is_tested():
    """Upgrading pyfuse3 silently drops the fast wait: read the new release's
    internal.pxi against fastwait's contract, then add it to TESTED_VERSIONS."""
    assert pyfuse3.__version__ in fastwait.TESTED_VERSIONS


def test_install_replaces_the_wait_and_uninstall_restores_it(pipe):
    stock = pyfuse3._wait_fuse_readable
    fw = fastwait.install(pipe[0])
    assert isinstance(fw, fastwait.FastWait) and fw.fd == pipe[0]
    assert pyfuse3._wait_fuse_readable == fw.wait
    assert fastwait.statistics() == {"fast_wait": True, "requests_queued": 0, "waits": 0}
    fastwait.uninstall()
    assert pyfuse3._wait_fuse_readable is stock
    assert fastwait.statistics() == {"fast_wait": False, "reason": "not installed"}


@pytest.mark.parametrize("version", ["3.9.0", "3.5.1", "3.2.3", "4.0.0", "unknown"])
def test_install_refuses_an_untested_version(pipe, monkeypatch, version):
    stock = pyfuse3._wait_fuse_readable
    monkeypatch.setattr(pyfuse3, "__version__", version)
    assert fastwait.install(pipe[0]) is None
    assert pyfuse3._wait_fuse_readable is stock
    assert fastwait.statistics() == {
        "fast_wait": False,
        "reason": f"pyfuse3 {version} is not a tested version"
                  " (tested: 3.3.0, 3.4.0, 3.4.2, 3.5.0)"}
    os.write(pipe[1], b"x")
    assert fastwait.requests_waiting() is False  # nothing installed to ask


@pytest.mark.parametrize("version", fastwait.TESTED_VERSIONS)
def test_install_accepts_each_tested_version(pipe, monkeypatch, version):
    monkeypatch.setattr(pyfuse3, "__version__", version)
    fw = fastwait.install(pipe[0])
    assert fw is not None and pyfuse3._wait_fuse_readable == fw.wait


def test_install_refuses_a_missing_name(pipe, monkeypatch):
    monkeypatch.delattr(pyfuse3, "_wait_fuse_readable")
    assert fastwait.install(pipe[0]) is None
    assert not hasattr(pyfuse3, "_wait_fuse_readable")
    assert fastwait.statistics() == {
        "fast_wait": False,
        "reason": f"pyfuse3 {pyfuse3.__version__} has no _wait_fuse_readable to replace"}


def test_install_refuses_asyncio_mode_and_a_missing_fd(pipe, monkeypatch):
    assert fastwait.install(None) is None
    assert fastwait.statistics()["reason"] == "no single /dev/fuse descriptor was found"
    monkeypatch.setattr(pyfuse3, "trio", types.SimpleNamespace())
    assert fastwait.install(pipe[0]) is None
    assert "asyncio" in fastwait.statistics()["reason"]


def test_a_refused_reinstall_restores_the_stock_wait(pipe, monkeypatch):
    stock = pyfuse3._wait_fuse_readable
    assert fastwait.install(pipe[0]) is not None
    assert fastwait.install(None) is None  # e.g. a second session: no stale fd
    assert pyfuse3._wait_fuse_readable is stock
    assert fastwait.statistics()["fast_wait"] is False


def test_queued_request_returns_true_without_yielding(pipe):
    fw, r, w = installed(pipe)

    async def main():
        os.write(w, b"ab")
        assert first_step(fw.wait()) == ("returned", True)
        assert os.read(r, 1) == b"a"
        assert first_step(fw.wait()) == ("returned", True)
        assert os.read(r, 1) == b"b"
        assert fw.statistics() == {"fast_wait": True, "requests_queued": 2, "waits": 0}

    run(main)


def test_fast_returns_yield_once_every_YIELD_EVERY(pipe):
    fw, r, w = installed(pipe)
    n = fastwait.YIELD_EVERY

    async def main():
        os.write(w, b"x")  # stays queued: every wait finds it
        steps = [first_step(fw.wait())[0] for _ in range(2 * n + 3)]
        assert steps == (["returned"] * n + ["yielded"]) * 2 + ["returned"]
        for _ in range(n - 1):
            assert first_step(fw.wait()) == ("returned", True)
        assert await fw.wait() is True  # the one that yields still returns True

    run(main)


def test_idle_workers_park_and_exactly_one_watches(pipe):
    fw, r, w = installed(pipe)

    async def main():
        async with Workers.running(fw, r) as ws:
            assert fw.watching and fw.parked == 3
            assert fw.statistics()["waits"] == 1
            ws.cancel()
        assert not fw.watching and fw.parked == 0

    run(main)


def test_a_request_wakes_the_watcher_and_another_takes_over(pipe):
    fw, r, w = installed(pipe)

    async def main():
        async with Workers.running(fw, r) as ws:
            os.write(w, b"a")
            await trio.testing.wait_all_tasks_blocked()
            assert ws.taken == [b"a"]  # read by the watcher, which is now busy
            assert fw.watching and fw.parked == 2  # a parked one took over
            os.write(w, b"b")
            await trio.testing.wait_all_tasks_blocked()
            assert ws.taken == [b"a", b"b"]
            assert fw.watching and fw.parked == 1
            assert fw.statistics() == {"fast_wait": True, "requests_queued": 2, "waits": 3}
            ws.cancel()

    run(main)


def test_pollhup_ends_every_worker_after_the_queued_requests(pipe):
    fw, r, w = installed(pipe)

    async def main():
        async with Workers.running(fw, r, released=True) as ws:
            os.write(w, b"ab")
            os.close(w)
            pipe[1] = -1
            assert fw.events() == select.POLLIN | select.POLLHUP
        assert ws.taken == [b"a", b"b"] and ws.ended == 4
        assert first_step(fw.wait()) == ("returned", False)

    run(main)


def test_pollhup_wakes_idle_workers(pipe):
    fw, r, w = installed(pipe)

    async def main():
        async with Workers.running(fw, r) as ws:
            os.close(w)
            pipe[1] = -1
        assert ws.taken == [] and ws.ended == 4

    run(main)


def test_pollerr_ends_every_worker(pipe):
    """/dev/fuse reports POLLERR once unmounted or aborted; a pipe's write
    end does so once its reader is gone."""
    r, w = pipe
    fw = fastwait.install(w)

    async def main():
        async with Workers.running(fw, w) as ws:
            assert fw.watching and fw.parked == 3
            os.close(r)
            pipe[0] = -1
            assert fw.events() == select.POLLERR
        assert ws.ended == 4 and not fw.requests_waiting()

    run(main)


def test_request_exit_ends_the_parked_at_once_and_the_watcher_on_terminate(pipe):
    fw, r, w = installed(pipe)

    async def main():
        async with Workers.running(fw, r) as ws:
            fastwait.request_exit()
            await trio.testing.wait_all_tasks_blocked()
            assert ws.ended == 3 and fw.watching
            trio.lowlevel.notify_closing(r)  # what pyfuse3.terminate() does
        assert ws.ended == 4
        os.write(w, b"x")  # queued, but the loop is ending
        assert first_step(fw.wait()) == ("returned", False)
        assert ws.taken == []

    run(main)


def test_requests_waiting(pipe):
    r, w = pipe
    assert fastwait.requests_waiting() is False  # not installed
    fastwait.install(r)
    assert fastwait.requests_waiting() is False
    os.write(w, b"x")
    assert fastwait.requests_waiting() is True
    os.read(r, 1)
    assert fastwait.requests_waiting() is False


def test_statistics_say_why_not(pipe, monkeypatch):
    assert fastwait.statistics() == {"fast_wait": False, "reason": "not installed"}
    monkeypatch.setattr(pyfuse3, "__version__", "3.9.0")
    fastwait.install(pipe[0])
    assert fastwait.statistics()["reason"].startswith("pyfuse3 3.9.0 is not a tested version")
