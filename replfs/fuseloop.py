"""A cheaper wait for the next FUSE request in pyfuse3's worker loop.

pyfuse3 (3.x) runs each worker task as: wait until /dev/fuse is readable,
read one request, handle it.  Its wait takes a ``trio.Lock`` (one scheduler
pass) and then ``trio.lowlevel.wait_readable`` (an epoll registration and a
second scheduler pass) for *every* request, even when the next request is
already queued in the kernel, which under load it nearly always is.  Those two
passes were the largest single item in the daemon's profile.

:func:`install` swaps the module-level ``_wait_fuse_readable`` that the
compiled worker loop calls for :func:`_wait`:

* first a ``poll()`` with a zero timeout on the session fd (one syscall).  If
  a request is queued, return at once, without yielding, so that the read
  the worker does next cannot race another worker;
* only when the fd is idle does one worker (the watcher) wait in
  ``wait_readable``; other idle workers park.  A worker that takes a request
  while nobody watches unparks one, so a new request is always read while
  the others are busy (the NBD pipeline stays full);
* POLLERR (unmounted, or the connection aborted) and ``pyfuse3.terminate()``
  end every worker;
* so that a stream of requests that all complete without awaiting cannot
  starve the rest of the daemon (the NBD server on the secondary), every
  :data:`YIELD_EVERY` fast returns yield once.

The swap depends on a pyfuse3 internal name; when it is missing, the stock
wait stays and :func:`install` returns False (the daemon logs it).  pyfuse3
counts its idle workers inside its own wait, so with this one it sees none and
starts workers up to ``max_tasks`` at once; the daemon starts them all up
front anyway (``min_tasks == max_tasks``).
"""

from __future__ import annotations

import os
import select

import pyfuse3
import trio

#: After this many requests taken without a scheduler pass, yield once.
YIELD_EVERY = 8


class _LoopState:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.watching = False
        self.idle = trio.lowlevel.ParkingLot()
        self.exiting = False
        self.streak = 0
        self.fast = 0
        self.slow = 0

    def poll(self) -> int:
        """The fd's poll events now: POLLIN (a request is queued), POLLERR
        (the mount is gone) or 0."""
        for _fd, events in self.poller.poll(0):
            return events
        return 0


_state: _LoopState | None = None


async def _wait() -> bool:
    """pyfuse3's contract: True when a request can be read without blocking,
    False when the loop should end."""
    st = _state
    if st.streak >= YIELD_EVERY:
        st.streak = 0
        await trio.lowlevel.cancel_shielded_checkpoint()
    while not st.exiting:
        events = st.poll()
        if events & select.POLLIN:  # no await between here and the worker's read
            st.streak += 1
            st.fast += 1
            if not st.watching and len(st.idle):
                st.idle.unpark()  # someone must watch while this one is busy
            return True
        if events:  # POLLERR: unmounted or aborted; reading would say ENODEV
            st.exiting = True
            break
        st.streak = 0
        if st.watching:  # another idle worker already waits on the fd
            await st.idle.park()
            continue
        st.slow += 1
        st.watching = True
        try:
            await trio.lowlevel.wait_readable(st.fd)
        except trio.ClosedResourceError:  # pyfuse3.terminate()
            st.exiting = True
        finally:
            st.watching = False
    st.idle.unpark_all()
    return False


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


def install(fd: int | None) -> bool:
    """Use :func:`_wait` in pyfuse3's worker loop for the session on ``fd``."""
    global _state
    if fd is None or not hasattr(pyfuse3, "_wait_fuse_readable"):
        return False
    _state = _LoopState(fd)
    pyfuse3._wait_fuse_readable = _wait
    return True


def request_exit() -> None:
    """Before ``pyfuse3.terminate()``: workers that wake find the loop ending."""
    if _state is not None:
        _state.exiting = True


def requests_waiting() -> bool:
    """True if a FUSE request is queued that no worker has taken yet."""
    return _state is not None and bool(_state.poll() & select.POLLIN)


def statistics() -> dict:
    if _state is None:
        return {"fast_wait": False}
    return {"fast_wait": True, "requests_queued": _state.fast, "waits": _state.slow}
