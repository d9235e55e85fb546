"""The block conformance suite (tests/blockconformance.py) over NBD:
replfs client -> TCP 127.0.0.1 -> replfs server -> RawImage.

Run twice: with the server's defaults (small requests inline in the reader
task) and with ``inline_max=0`` (every request in its own task), so both
server paths are held to the BlockNode contract.
"""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager

import pytest
import trio

from replfs.block.raw import RawImage
from replfs.nbd.client import connect
from replfs.nbd.server import NBDServer
from tests.blockconformance import CHECKS, check_id

pytestmark = pytest.mark.integration

_counter = itertools.count()
SERVER_MODES = {"inline": {}, "spawned": {"inline_max": 0}}


async def _serve(server: NBDServer, scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED):
    with scope:
        await server.serve("127.0.0.1", 0, task_status=task_status)


def _factory(tmp_path, nursery, server_kw):
    @asynccontextmanager
    async def make_node(size, initial):
        assert len(initial) == size
        path = tmp_path / f"nbd-disk-{next(_counter)}.img"
        path.write_bytes(initial)
        raw = RawImage(path)
        server = NBDServer({"disk": raw}, **server_kw)
        scope = trio.CancelScope()
        try:
            host, port = await nursery.start(_serve, server, scope)
            client = await connect(host, port, "disk", nursery=nursery)
            try:
                yield client
            finally:
                await client.aclose()
                assert server.statistics()["protocol_errors"] == 0
        finally:
            scope.cancel()
            raw.close()

    return make_node


@pytest.mark.parametrize("mode", list(SERVER_MODES))
@pytest.mark.parametrize("check", CHECKS, ids=check_id)
def test_conformance_over_nbd(check, mode, tmp_path):
    async def main():
        failure = None
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(120):
                    await check(_factory(tmp_path, nursery, SERVER_MODES[mode]))
            except BaseException as exc:  # re-raised outside the nursery, unwrapped
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    trio.run(main)
