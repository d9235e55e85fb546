"""Scaffolding for NBD tests that run our server and client in one trio run.

* :func:`trio_run` / :func:`trio_test`: run a coroutine function in
  ``trio.run`` inside ``trio.fail_after(timeout)``: every trio test is
  bounded (STYLE.md), and the bound is written once.  ``@trio_test()`` turns
  an ``async def test_...`` into a plain pytest test (fixtures still work).
* :func:`serving`: ``async with serving(node_or_exports, **server_kw) as srv``
  runs an :class:`NBDServer` on 127.0.0.1 (port 0) in a nursery of its own
  and stops it when the block ends.  An exception from the body comes out
  unchanged, not wrapped in an exception group.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from replfs.block.base import BlockNode
from replfs.nbd.client import NBDClient, connect, open_client
from replfs.nbd.server import NBDServer

#: Default bound of one trio test, in seconds.
TIMEOUT = 60


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
