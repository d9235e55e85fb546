"""Scaffolding for NBD tests that run our server and client in one trio run.

* :func:`trio_run` / :func:`trio_test`: run a coroutine function in
  ``trio.run`` inside ``trio.fail_after(timeout)``: every trio test is
  bounded (STYLE.md), and the bound is written once.  ``@trio_test()`` turns
  an ``async def test_...`` into a plain pytest test (fixtures still work).
* :func:`serving`: ``async with serving(node_or_exports, **server_kw) as srv``
  runs an :class:`NBDServer` on 127.0.0.1 (port 0) in a nursery of its own
  and stops it when the block ends.  An exception from the body comes out
  unchanged, not wrapped in an exception group.
* :class:`MemNode`: a bytearray disk to serve, optionally slow, failing or
  recording its calls.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from replfs.block.base import BlockNode
from replfs.errors import BlockError
from replfs.nbd.client import NBDClient, connect, open_client
from replfs.nbd.control import ControlClient, open_control
from replfs.nbd.server import NBDServer

#: Default bound of one trio test, in seconds.
TIMEOUT = 60
MiB = 1024 * 1024


def trio_run(fn: Callable[..., Awaitable[object]], *args, timeout: float = TIMEOUT):
    """``trio.run(fn, *args)`` bounded by ``fail_after(timeout)``."""

    async def bounded():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(bounded)


def trio_test(timeout: float = TIMEOUT):
    """Decorator: an ``async def`` test run by :func:`trio_run`."""

    def decorate(fn):
        @functools.wraps(fn)
        def test(*args, **kwargs):
            return trio_run(functools.partial(fn, *args, **kwargs), timeout=timeout)

        return test

    return decorate


@dataclass
class Served:
    """A running server: ``changes`` records ``on_clients_changed`` calls;
    ``nursery`` lives as long as the server (for clients' tasks)."""

    server: NBDServer
    host: str
    port: int
    nursery: trio.Nursery
    changes: list[tuple[str, int]] = field(default_factory=list)

    def client(self, export: str = "disk", **kw):
        """``async with srv.client() as c``: see :func:`open_client`."""
        return open_client(self.host, self.port, export, **kw)

    async def connect(self, export: str = "disk", **kw) -> NBDClient:
        """A client whose tasks run in the server's nursery."""
        return await connect(self.host, self.port, export, nursery=self.nursery, **kw)

    async def control(self, **kw) -> ControlClient:
        """A control client whose watcher runs in the server's nursery."""
        return await open_control(self.host, self.port, nursery=self.nursery, **kw)


class MemNode(BlockNode):
    """A bytearray disk; optionally slow, failing, or recording its calls."""

    def __init__(self, size: int = 8 * MiB, *, delay: float = 0.0, gated: bool = False, fail=None):
        self.size = size
        self.name = "mem"
        self.data = bytearray(size)
        self.log: list[tuple] = []
        #: Writes wait for this event (when there is one).
        self.gate: trio.Event | None = trio.Event() if gated else None
        #: Every write takes this long.
        self.delay = delay
        #: offset -> errno: a request at that offset fails with it.
        self.fail: dict[int, int] = fail or {}

    async def _maybe(self, op, off):
        if off in self.fail:
            raise BlockError(self.fail[off], f"{self.name}: injected failure at {off}")
        if self.gate is not None and op == "write":
            await self.gate.wait()
        if self.delay and op == "write":
            await trio.sleep(self.delay)

    async def _read(self, off, n):
        await self._maybe("read", off)
        return bytes(self.data[off : off + n])

    async def _write(self, off, data, fua):
        self.log.append(("write-start", off, len(data)))
        await self._maybe("write", off)
        self.data[off : off + len(data)] = data
        self.log.append(("write-done", off, len(data), fua))

    async def _write_zeroes(self, off, n, fua):
        await self._maybe("zero", off)
        self.data[off : off + n] = bytes(n)

    async def _trim(self, off, n):
        self.data[off : off + n] = bytes(n)

    async def flush(self):
        self.log.append(("flush",))


@asynccontextmanager
async def serving(exports, **server_kw):
    """Serve ``exports`` (a node, exported as "disk"; a mapping; or a lookup
    callable) until the block ends; yields a :class:`Served`."""
    if isinstance(exports, BlockNode):
        exports = {"disk": exports}
    changes: list[tuple[str, int]] = []
    server = NBDServer(exports, on_clients_changed=lambda name, n: changes.append((name, n)), **server_kw)
    failure = None
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield Served(server, host, port, nursery, changes)
        except BaseException as exc:
            # Re-raised below, outside the nursery, so that it is not
            # wrapped in an ExceptionGroup.
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        try:
            raise failure
        finally:
            failure = None
