"""Shared/exclusive locks on ranges of integers, for trio tasks.

Design note
-----------
Ranges are half-open ``[start, end)`` of whatever unit the caller picks; the
replfs layers lock *cluster indexes* (an overlay's clusters, the CBW's copy
clusters), so "the whole disk" is ``[0, nclusters)``.  An empty range never
conflicts and is granted at once.

Two requests conflict when their ranges overlap and at least one is
exclusive.  Every request (granted or waiting) sits in one list in arrival
order.  A request is granted when it conflicts with no request *ahead of it*
in that list, granted or waiting.  So:

* the uncontended case is a linear scan of the (short) list, an append and,
  on release, a ``list.remove``; no trio checkpoint, no Event is created;
* it is FIFO among conflicting requests: a reader arriving after a waiting
  writer on an overlapping range queues behind it, so writers don't starve;
  non-overlapping requests never wait for each other.

Cancellation while waiting (or right after being granted) removes the
request and wakes whoever it was holding up.  Not reentrant: a task that
holds a range and asks for an overlapping exclusive one deadlocks.

Besides ``async with``, a hot path may call :meth:`RangeLock.try_acquire`
(synchronous: the request if granted at once, else None), fall back to
``await acquire()`` only when it returns None, and :meth:`RangeLock.release`
in a ``finally``.  Design note: the copy-before-write path takes two locks
per request; the guard object and two coroutine frames per ``async with``
were a measurable part of it, and the uncontended case never suspends
anyway.
"""

from __future__ import annotations

import trio


class _Request:
    __slots__ = ("start", "end", "exclusive", "event", "granted")

    def __init__(self, start: int, end: int, exclusive: bool):
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self.event: trio.Event | None = None
        self.granted = False

    def conflicts(self, other: "_Request") -> bool:
        return (
            (self.exclusive or other.exclusive)
            and self.start < other.end
            and other.start < self.end
        )


class _Guard:
    __slots__ = ("_lock", "_req")

    def __init__(self, lock: "RangeLock", req: _Request):
        self._lock = lock
        self._req = req

    async def __aenter__(self) -> "_Guard":
        await self._lock._acquire(self._req)
        return self

    async def __aexit__(self, *exc) -> None:
        self._lock._release(self._req)


class RangeLock:
    """``async with lock.shared(a, b):`` / ``async with lock.exclusive(a, b):``"""

    __slots__ = ("_reqs", "_waiting", "name")

    def __init__(self, name: str = "rangelock"):
        self.name = name
        self._reqs: list[_Request] = []
        self._waiting = 0

    def shared(self, start: int, end: int) -> _Guard:
        return _Guard(self, _Request(start, end, False))

    def exclusive(self, start: int, end: int) -> _Guard:
        return _Guard(self, _Request(start, end, True))

    # -- without a context manager (hot paths) ------------------------------------
    def try_acquire(self, start: int, end: int, exclusive: bool) -> _Request | None:
        """The granted request if nothing ahead conflicts, else None (and
        nothing queued: call :meth:`acquire` then).  No checkpoint."""
        req = _Request(start, end, exclusive)
        if start >= end:
            req.granted = True  # never enters the list
            return req
        reqs = self._reqs
        for other in reqs:
            if req.conflicts(other):
                return None
        req.granted = True
        reqs.append(req)
        return req

    async def acquire(self, start: int, end: int, exclusive: bool) -> _Request:
        """Wait for the range; pass the result to :meth:`release`."""
        req = _Request(start, end, exclusive)
        await self._acquire(req)
        return req

    def release(self, req: _Request) -> None:
        self._release(req)

    # -- introspection (tests, status) ------------------------------------------
    @property
    def held(self) -> int:
        """Granted requests."""
        return len(self._reqs) - self._waiting

    @property
    def waiting(self) -> int:
        return self._waiting

    def is_locked(self, start: int, end: int, exclusive: bool = True) -> bool:
        """Would a request for this range have to wait right now?"""
        probe = _Request(start, end, exclusive)
        return start < end and any(probe.conflicts(r) for r in self._reqs)

    # -- machinery ------------------------------------------------------------------
    async def _acquire(self, req: _Request) -> None:
        if req.start >= req.end:
            req.granted = True  # never enters the list
            return
        reqs = self._reqs
        for other in reqs:
            if req.conflicts(other):
                break
        else:
            req.granted = True
            reqs.append(req)
            return
        req.event = trio.Event()
        reqs.append(req)
        self._waiting += 1
        try:
            await req.event.wait()
        except BaseException:
            if not req.granted:
                self._waiting -= 1
            req.granted = False
            reqs.remove(req)
            self._wake()
            raise

    def _release(self, req: _Request) -> None:
        if req.start >= req.end:
            return
        self._reqs.remove(req)
        if self._waiting:
            self._wake()

    def _wake(self) -> None:
        reqs = self._reqs
        for i, r in enumerate(reqs):
            if r.granted:
                continue
            for j in range(i):
                if r.conflicts(reqs[j]):
                    break
            else:
                r.granted = True
                self._waiting -= 1
                r.event.set()
