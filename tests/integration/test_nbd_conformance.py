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

from replfs.block.raw import RawImage
from tests.blockconformance import CHECKS, check_id
from tests.nbdserving import serving, trio_run

pytestmark = pytest.mark.integration

_counter = itertools.count()
SERVER_MODES = {"inline": {}, "spawned": {"inline_max": 0}}


def _factory(tmp_path, server_kw):
    @asynccontextmanager
    async def make_node(size, initial):
        assert len(initial) == size
        path = tmp_path / f"nbd-disk-{next(_counter)}.img"
        path.write_bytes(initial)
        raw = RawImage(path)
        try:
            async with serving(raw, **server_kw) as srv:
                async with srv.client() as client:
                    yield client
                assert srv.server.statistics()["protocol_errors"] == 0
        finally:
            raw.close()

    return make_node


@pytest.mark.parametrize("mode", list(SERVER_MODES))
@pytest.mark.parametrize("check", CHECKS, ids=check_id)
def test_conformance_over_nbd(check, mode, tmp_path):
    trio_run(check, _factory(tmp_path, SERVER_MODES[mode]), timeout=120)
