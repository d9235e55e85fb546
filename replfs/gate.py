"""The quiesce gate: I/O enters shared, checkpoint and failover enter exclusive.

A checkpoint must be atomic for all disks of a mount with respect to view I/O
and to the primary's NBD writes (QEMU drains the whole graph for the same
reason).  Every I/O request passes ``enter()``/``leave()`` (cheap, synchronous
in the common case); ``exclusive()`` stops new requests at the gate, waits for
the ones in flight to finish, and holds the gate while the action runs.

Writer preference: once an action waits, new I/O waits behind it, so a steady
stream of writes cannot starve a checkpoint.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio


class Gate:
    def __init__(self) -> None:
        self._inside = 0          # I/O requests in flight
        self._closed = False      # an exclusive holder or waiter exists
        self._lock = trio.Lock()  # exclusive holders queue here
        self._drained = trio.Event()
        self._reopened = trio.Event()

    def statistics(self) -> dict:
        return {"in_flight": self._inside, "closed": self._closed}

    async def enter(self) -> None:
        while self._closed:
            await self._reopened.wait()
        self._inside += 1

    def leave(self) -> None:
        self._inside -= 1
        if self._inside == 0 and self._closed:
            self._drained.set()

    @asynccontextmanager
    async def exclusive(self):
        async with self._lock:
            self._closed = True
            self._reopened = trio.Event()
            try:
                while self._inside:
                    self._drained = trio.Event()
                    await self._drained.wait()
                yield
            finally:
                self._closed = False
                self._reopened.set()
