"""A cheaper wait for the next FUSE request in pyfuse3's worker loop.

pyfuse3 (3.x) runs each worker task as: wait until /dev/fuse is readable,
read one request, handle it.  Its wait takes a ``trio.Lock`` (one scheduler
pass) and then ``trio.lowlevel.wait_readable`` (an epoll registration and a
second scheduler pass) for *every* request, even when the next request is
already queued in the kernel, which under load it nearly always is.  Those two
passes were the largest single item in the daemon's profile.

:func:`install` replaces pyfuse3's module-level ``_wait_fuse_readable`` with
:meth:`FastWait.wait`:

* first a ``poll()`` with a zero timeout on the session fd (one syscall).  If
  a request is queued, return True at once, without yielding;
* only when the fd is idle does one worker (the watcher) wait in
  ``wait_readable``; other idle workers park.  A worker that takes a request
  while nobody watches unparks one, so a new request is always read while
  the others are busy (the NBD pipeline stays full);
* POLLERR (unmounted, or the connection aborted), POLLHUP or POLLNVAL with
  nothing left to read, :func:`request_exit` and ``pyfuse3.terminate()`` end
  every worker;
* so that a stream of requests that all complete without awaiting cannot
  starve the rest of the daemon (the NBD server on the secondary), every
  :data:`YIELD_EVERY` fast returns yield once (before the ``poll()``, never
  between it and the read).

The contract this relies on, read in pyfuse3's ``internal.pxi``
(``_wait_fuse_readable``, ``_session_loop``) and ``terminate()``, and in the
generated C, of every release in :data:`TESTED_VERSIONS`:

1. ``_session_loop`` looks ``_wait_fuse_readable`` up as a module global on
   every iteration (the generated C calls ``__Pyx_GetModuleGlobalName``), so
   assigning the attribute takes effect for running workers too.
2. **No await between the wait and the read.**  When the wait returns True,
   the worker calls ``fuse_session_receive_buf`` on the *blocking* session fd
   (pyfuse3 never sets ``O_NONBLOCK``) with no await in between.  trio runs
   one task at a time, so no other worker can run between our ``poll()``
   seeing a request and that read taking it: a fast return cannot race
   another worker.  (pyfuse3's own wait relies on the same: it releases its
   lock and returns without yielding.)  If a release put an await there, two
   workers could see the same request and the second would block the whole
   trio thread in ``read(2)`` until the next request came; hence the version
   gate.  One window remains, as with the stock wait: the kernel can withdraw
   a queued request whose caller was killed before it was read, and the read
   then blocks until the next request.
3. False ends the worker; ``terminate()`` is ``fuse_session_exit`` plus
   ``trio.lowlevel.notify_closing(session_fd)``, which wakes the watcher with
   ``ClosedResourceError``.
4. pyfuse3 counts idle workers (``active_readers``) only inside its own
   wait.  With this one it sees none, so it starts a new worker after every
   read up to ``max_tasks`` and never retires idle ones; the daemon starts
   them all up front anyway (``min_tasks == max_tasks``).
5. The loop runs under trio (not ``pyfuse3.asyncio``).

:func:`install` checks the name, the version and trio mode, and otherwise
leaves the stock wait in place and says why (:func:`statistics`'s
``reason``; the daemon logs it): slower, but correct.  To admit a new
pyfuse3 release, re-read those three places and add it to
:data:`TESTED_VERSIONS`.

The state lives in the :class:`FastWait` object :func:`install` returns.  The
module keeps a reference to it for the daemon's calls; pyfuse3 itself allows
one session per process (its ``session`` is a module global), so one
installed wait per process is pyfuse3's limit, not an extra one.
"""

from __future__ import annotations

import os
import select

import pyfuse3
import trio

#: After this many requests taken without a scheduler pass, yield once.
YIELD_EVERY = 8

#: pyfuse3 releases whose source was read against the contract above (all
#: 3.3-3.5 releases on PyPI; there is no 3.4.1).
TESTED_VERSIONS = ("3.3.0", "3.4.0", "3.4.2", "3.5.0")

_POLLIN = select.POLLIN
#: With no POLLIN, the fd will never have a request again: /dev/fuse reports
#: POLLERR once unmounted or aborted; POLLHUP (a pipe's writer gone, as in the
#: tests) and POLLNVAL (the fd closed) end the loop the same way.
_GONE = select.POLLERR | select.POLLHUP | select.POLLNVAL


class FastWait:
    """The replacement wait for the FUSE session on ``fd``, and its state."""

    __slots__ = ("fd", "fast", "slow", "_poll", "_idle", "_watching",
                 "_exiting", "_streak")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        #: Requests found already queued (returned without a wait).
        self.fast = 0
        #: Times a worker waited in ``wait_readable``.
        self.slow = 0
        poller = select.poll()
        poller.register(fd, _POLLIN)
        self._poll = poller.poll
        self._idle = trio.lowlevel.ParkingLot()
        self._watching = False
        self._exiting = False
        self._streak = 0

    def events(self) -> int:
        """The fd's poll events now: POLLIN (a request is queued), POLLERR
        (the mount is gone) or 0."""
        ready = self._poll(0)
        return ready[0][1] if ready else 0

    @property
    def watching(self) -> bool:
        """True while one idle worker waits on the fd."""
        return self._watching

    @property
    def parked(self) -> int:
        """Idle workers parked behind the watcher."""
        return len(self._idle)

    async def wait(self) -> bool:
        """pyfuse3's ``_wait_fuse_readable``: True when a request can be read
        without blocking, False when the worker should end."""
        if self._streak >= YIELD_EVERY:
            self._streak = 0
            await trio.lowlevel.cancel_shielded_checkpoint()
        while not self._exiting:
            ready = self._poll(0)
            events = ready[0][1] if ready else 0
            if events & _POLLIN:
                # No await from here to the worker's read (contract point 2).
                self._streak += 1
                self.fast += 1
                if not self._watching and self._idle:
                    self._idle.unpark()  # someone must watch while this one is busy
                return True
            if events & _GONE:  # reading would fail (ENODEV) or block forever
                self._exiting = True
                break
            self._streak = 0
            if self._watching:  # another idle worker already waits on the fd
                await self._idle.park()
                continue
            self.slow += 1
            self._watching = True
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate()
                self._exiting = True
            finally:
                self._watching = False
        self._idle.unpark_all()
        return False

    def request_exit(self) -> None:
        """Every wait from now on returns False; parked workers end now, the
        watcher when ``pyfuse3.terminate()`` wakes it."""
        self._exiting = True
        self._idle.unpark_all()

    def requests_waiting(self) -> bool:
        """True if a FUSE request is queued that no worker has taken yet."""
        ready = self._poll(0)
        return bool(ready and ready[0][1] & _POLLIN)

    def statistics(self) -> dict:
        return {"fast_wait": True, "requests_queued": self.fast, "waits": self.slow}


_active: FastWait | None = None
_reason = "not installed"
_stock_wait = None  # pyfuse3's own wait, while ours replaces it


def refusal(fd: int | None) -> str | None:
    """Why :func:`install` would keep the stock wait for ``fd``; None if it
    would not."""
    version = getattr(pyfuse3, "__version__", "unknown")
    if not hasattr(pyfuse3, "_wait_fuse_readable"):
        return f"pyfuse3 {version} has no _wait_fuse_readable to replace"
    if version not in TESTED_VERSIONS:
        return (f"pyfuse3 {version} is not a tested version"
                f" (tested: {', '.join(TESTED_VERSIONS)})")
    if getattr(pyfuse3, "trio", None) is not trio:
        return "pyfuse3 is not in trio mode (pyfuse3.asyncio is enabled)"
    if fd is None:
        return "no single /dev/fuse descriptor was found"
    return None


def install(fd: int | None) -> FastWait | None:
    """Use :meth:`FastWait.wait` in pyfuse3's worker loop for the session on
    ``fd`` and return it; or keep (restore) the stock wait, record why
    (:func:`statistics`) and return None."""
    global _active, _reason, _stock_wait
    reason = refusal(fd)
    if reason is not None:
        uninstall()
        _reason = reason
        return None
    if _active is None:
        _stock_wait = pyfuse3._wait_fuse_readable
    _active = FastWait(fd)
    pyfuse3._wait_fuse_readable = _active.wait
    return _active


def uninstall() -> None:
    """Put pyfuse3's own wait back (for tests and re-initialisation)."""
    global _active, _reason, _stock_wait
    if _active is not None:
        pyfuse3._wait_fuse_readable = _stock_wait
        _active, _stock_wait = None, None
    _reason = "not installed"


def find_session_fd() -> int | None:
    """The daemon's one /dev/fuse descriptor (None unless exactly one)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    return found[0] if len(found) == 1 else None


def request_exit() -> None:
    """Before ``pyfuse3.terminate()``: workers end instead of taking more."""
    if _active is not None:
        _active.request_exit()


def requests_waiting() -> bool:
    """True if a FUSE request is queued that no worker has taken yet."""
    return _active is not None and _active.requests_waiting()


def statistics() -> dict:
    """``{"fast_wait": True, "requests_queued": n, "waits": n}``, or
    ``{"fast_wait": False, "reason": "..."}``."""
    if _active is None:
        return {"fast_wait": False, "reason": _reason}
    return _active.statistics()
