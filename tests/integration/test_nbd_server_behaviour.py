"""Our NBDServer's behaviour, driven by our client (and raw sockets) over
127.0.0.1, in one trio run per test, serving an in-memory node.

Admission (the ``admit`` hook, the client limit, shutdown), robustness
(malformed and fuzzed peers close only their own connection), ordering
(FLUSH after earlier writes, overlapping writes in order), error mapping,
abort and cancellation.  Real external peers are in test_nbd_interop.py.
"""

from __future__ import annotations

import errno
import logging
import random
import shutil
import struct

import pytest
import trio

from replfs.errors import BlockError
from replfs.nbd import (
    NEED_DATA,
    ClientConnection,
    ClientFlags,
    ConnectionClosed,
    ExportInfo,
    OptExportName,
    OptInfo,
)
from replfs.nbd import proto as P
from replfs.nbd.client import ExportRefusedError, connect
from tests.nbdserving import TIMEOUT, MemNode, serving, trio_test

pytestmark = pytest.mark.integration

KiB, MiB = 1024, 1024 * 1024


async def wait_until(cond, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


async def negotiate(port: int, option) -> object:
    """Send the client flags and one option on a fresh connection; the
    server's answer as our client core sees it (ConnectionClosed when the
    server hung up)."""
    core = ClientConnection()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:

        async def next_event():
            while (ev := core.next_event()) is NEED_DATA:
                core.receive_data(await stream.receive_some(65536))
            return ev

        await next_event()  # the greeting
        await stream.send_all(core.send(ClientFlags()) + core.send(option))
        return await next_event()


# -- who may connect -------------------------------------------------------------------------
@trio_test()
async def test_second_client_refused_with_policy(tool_env):
    async with serving(MemNode(), max_clients_per_export=1) as srv:
        async with srv.client() as first:
            await first.write(0, b"first")
            with pytest.raises(ExportRefusedError) as info:
                async with srv.client():
                    pass
            assert info.value.errno == errno.EPERM
            assert info.value.reply_type == P.NBD_REP_ERR_POLICY
            assert "already has 1 client(s) connected (limit 1)" in str(info.value)
            if shutil.which("qemu-io"):  # a real client shows our message too
                r = await trio.run_process(
                    ["qemu-io", "-f", "raw", f"nbd://127.0.0.1:{srv.port}/disk", "-c", "read 0 512"],
                    capture_stdout=True, capture_stderr=True, check=False, env=tool_env,
                )
                assert r.returncode != 0 and b"already has 1 client(s) connected" in r.stderr
            # the refused attempts did not disturb the first client
            assert await first.read(0, 5) == b"first"
            assert srv.server.clients("disk") == 1
        # once the first has gone, a new client is welcome
        await wait_until(lambda: srv.server.clients("disk") == 0)
        async with srv.client() as again:
            assert await again.read(0, 5) == b"first"
        await wait_until(lambda: srv.server.clients("disk") == 0)
        assert srv.changes == [("disk", 1), ("disk", 0), ("disk", 1), ("disk", 0)]


@trio_test()
async def test_admit_hook_decides_who_enters_transmission(caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")
    calls = []
    refusal = None

    def admit(name: str, clients_now: int) -> str | None:
        calls.append((name, clients_now))
        if refusal == "raise":
            raise RuntimeError("policy bug")
        return refusal

    async with serving(MemNode(), admit=admit, max_clients_per_export=2) as srv:
        async with srv.client() as first:  # admitted
            assert calls == [("disk", 0)]
            async with srv.client():  # the hook sees the clients already there
                assert calls[-1] == ("disk", 1)
                with pytest.raises(ExportRefusedError, match="limit 2"):
                    await srv.connect()
                assert len(calls) == 2  # the transport limit comes first
            await wait_until(lambda: srv.server.clients("disk") == 1)

            refusal = "replication stopped: not taking writes"
            with pytest.raises(ExportRefusedError) as info:
                await srv.connect()
            assert info.value.errno == errno.EPERM and info.value.reply_type == P.NBD_REP_ERR_POLICY
            assert "replication stopped: not taking writes" in str(info.value)
            # NBD_OPT_INFO does not enter transmission: not asked
            before = len(calls)
            answer = await negotiate(srv.port, OptInfo("disk"))
            assert type(answer) is ExportInfo and answer.size == 8 * MiB
            assert len(calls) == before
            # NBD_OPT_EXPORT_NAME cannot carry the message: the session ends
            assert await negotiate(srv.port, OptExportName("disk")) == ConnectionClosed(clean=False)
            assert len(calls) == before + 1
            await wait_until(lambda: any("refused 'disk': replication stopped" in r.getMessage()
                                         for r in caplog.records))
            # a hook that raises refuses, and is logged
            refusal = "raise"
            with pytest.raises(ExportRefusedError, match="admission check failed"):
                await srv.connect()
            assert any(r.exc_info and "admit hook failed" in r.getMessage() for r in caplog.records)
            # the admitted client was never disturbed
            await first.write(0, b"still here")
            assert await first.read(0, 10) == b"still here"
        await wait_until(lambda: srv.server.clients("disk") == 0)
        assert srv.changes == [("disk", 1), ("disk", 2), ("disk", 1), ("disk", 0)]


@trio_test()
async def test_shutdown_refuses_new_clients_and_close_all_disconnects():
    node = MemNode()
    async with serving(node) as srv:
        server = srv.server
        client = await srv.connect()
        await client.write(0, b"abc")
        server.set_accepting(False)
        with pytest.raises(ExportRefusedError) as info:
            await srv.connect()
        assert info.value.errno == errno.ESHUTDOWN and "shutting down" in str(info.value)
        # existing client unaffected until close_all
        assert await client.read(0, 3) == b"abc"
        node.gate = trio.Event()  # hold the next write in the server

        async def blocked_write():
            with pytest.raises(BlockError) as info:
                await client.write(4096, b"x" * 8192)
            assert info.value.errno == errno.ECONNRESET

        async with trio.open_nursery() as n:
            n.start_soon(blocked_write)
            await wait_until(lambda: ("write-start", 4096, 8192) in node.log)
            assert client.statistics()["in_flight"] == 1
            close = trio.Event()

            async def closer():
                await server.close_all()
                close.set()

            n.start_soon(closer)
            await trio.sleep(0.05)
            node.gate.set()  # let the server-side write finish
            await close.wait()
        assert server.statistics()["connections"] == 0
        assert not client.connected
        with pytest.raises(BlockError) as info2:
            await client.read(0, 1)
        assert info2.value.errno == errno.ECONNRESET
        server.set_accepting(True)
        async with srv.client() as again:
            assert await again.read(0, 3) == b"abc"


@trio_test()
async def test_dynamic_exports():
    nodes = {"a": MemNode(MiB), "b": MemNode(2 * MiB)}
    async with serving(nodes.get) as srv:
        async with srv.client("b") as c:
            assert c.size == 2 * MiB
        with pytest.raises(ExportRefusedError, match="no export named 'c'"):
            await srv.connect("c")


# -- malformed and random peers ----------------------------------------------------------------
def _handshake_bytes(name=b"disk") -> bytes:
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    return struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, len(data)) + data


MALFORMED = {
    "bad-client-flags": struct.pack(">I", 0xFF),
    "bad-option-magic": struct.pack(">I", 3) + struct.pack(">QII", 0xDEADBEEF, P.NBD_OPT_GO, 0),
    "huge-option": struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, 99, 1 << 30),
    "bad-request-magic": _handshake_bytes() + P.REQUEST.pack(0x12345678, 0, 0, 1, 0, 0),
    "oversized-write": _handshake_bytes() + P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, 1, 1, 0, 64 * MiB),
    "duplicate-cookie": _handshake_bytes()
    + P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, 3, 9, 0, 0) * 2,
}


async def _bad_peer(port: int, payload: bytes) -> bytes:
    """Send ``payload`` and read until the server closes; returns what came back."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    async with stream:
        try:
            await stream.send_all(payload)
            while chunk := await stream.receive_some(65536):
                got += chunk
        except trio.BrokenResourceError:
            pass
    return bytes(got)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_peer_closes_only_its_connection(case, caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")

    @trio_test()
    async def run():
        async with serving(MemNode()) as srv, srv.client() as good:
            stop = trio.Event()
            written = []

            async def keep_writing():
                i = 0
                while not stop.is_set():
                    await good.write((i % 8192) * 512, bytes([i % 251 + 1]) * 512)
                    written.append(i)
                    i += 1
                    await trio.sleep(0)

            async with trio.open_nursery() as n:
                n.start_soon(keep_writing)
                got = await _bad_peer(srv.port, MALFORMED[case])
                await trio.sleep(0.05)
                stop.set()
            assert got.startswith(struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT))
            assert written, "the good client made no progress"
            for i in written[-8192:]:
                assert await good.read((i % 8192) * 512, 512) == bytes([i % 251 + 1]) * 512
            assert srv.server.protocol_errors == 1

    run()
    lines = [r for r in caplog.records if r.name == "replfs.nbd" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "protocol error" in lines[0].getMessage()


def _fuzz_request(rng: random.Random) -> bytes:
    """One request with random fields (never touching the good client's
    range, 4 MiB and up to 4 MiB + 2 MiB), sometimes corrupted."""
    length = rng.choice([0, 1, 512, 4096, 1 << 20, 1 << 31])
    cmd = rng.choice([0, 1, 1, 2, 3, 4, 5, 6, 7, rng.getrandbits(16)])
    off = rng.choice([0, 4096, rng.randrange(2 * MiB), 8 * MiB - 1, 1 << 62])
    magic = P.NBD_REQUEST_MAGIC if rng.random() < 0.95 else rng.getrandbits(32)
    out = P.REQUEST.pack(magic, rng.choice([0, 0, 1, 2, rng.getrandbits(16)]), cmd, rng.getrandbits(3), off, length)
    if cmd == 1 and length <= 4096:
        out += rng.randbytes(length if rng.random() < 0.8 else rng.randint(0, length))
    if rng.random() < 0.1:
        out = out[: rng.randint(0, len(out))]
    return out


def _fuzz_stream(rng: random.Random) -> bytes:
    """Random bytes shaped like NBD traffic: valid prefixes, random fields."""
    parts = []
    if rng.random() < 0.4:
        # A valid handshake, then requests.
        parts.append(_handshake_bytes() if rng.random() < 0.8 else struct.pack(">I", 3) + struct.pack(
            ">QII", P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 4) + b"disk")
        parts += [_fuzz_request(rng) for _ in range(rng.randint(0, 8))]
        return b"".join(parts)
    if rng.random() < 0.7:
        parts.append(struct.pack(">I", rng.choice([0, 1, 2, 3, 3, 3, rng.getrandbits(32)])))
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.randbytes(rng.randint(0, 40)))
        elif r < 0.7:
            opt = rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, rng.getrandbits(32)])
            data = rng.choice([b"disk", b"", rng.randbytes(rng.randint(0, 20))])
            if opt in (6, 7) and rng.random() < 0.7:
                infos = b"".join(struct.pack(">H", rng.randrange(5)) for _ in range(rng.randrange(3)))
                data = struct.pack(">I", len(data)) + data + struct.pack(">H", len(infos) // 2) + infos
            parts.append(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
        else:
            parts.append(_fuzz_request(rng))
    return b"".join(parts)


@trio_test(TIMEOUT * 2)
async def test_fuzz_server_with_random_peers_while_a_client_works():
    rng = random.Random(20240611)
    streams = [_fuzz_stream(rng) for _ in range(3000)]
    async with serving(MemNode(8 * MiB), handshake_timeout=5) as srv, srv.client() as good:
        limiter = trio.CapacityLimiter(32)
        done = 0

        async def fuzz_one(payload):
            nonlocal done
            async with limiter:
                stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
                async with stream:
                    try:
                        await stream.send_all(payload)
                        # Half-close so the server sees EOF after the payload.
                        await stream.send_eof()
                        while await stream.receive_some(65536):
                            pass
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                done += 1

        async def good_client():
            for i in range(300):
                await good.write(4 * MiB + i * 4096, bytes([i % 200 + 1]) * 4096)
                await trio.sleep(0)

        async with trio.open_nursery() as n:
            n.start_soon(good_client)
            for s in streams:
                n.start_soon(fuzz_one, s)
        assert done == len(streams)
        for i in range(300):
            assert await good.read(4 * MiB + i * 4096, 4096) == bytes([i % 200 + 1]) * 4096
        st = srv.server.statistics()
        assert st["connections"] == 1  # only the good client is left
        assert st["connections_total"] == len(streams) + 1
        # most streams break the protocol somewhere; many got far enough to
        # have requests answered
        assert st["protocol_errors"] > len(streams) // 4
        assert st["requests"] > 300 + len(streams) // 3


# -- requests: ordering, errors, abort, cancellation --------------------------------------------
@trio_test()
async def test_flush_waits_for_earlier_writes_and_fua():
    node = MemNode(64 * MiB, delay=0.02)
    async with serving(node, inline_max=64 * KiB) as srv, srv.client() as c:
        async with trio.open_nursery() as n:
            for i in range(6):  # large -> spawned in the server, slow
                n.start_soon(c.write, i * MiB, b"z" * MiB)
            n.start_soon(c.write, 40 * MiB, b"f" * 4096, True)  # FUA -> spawned
            await wait_until(lambda: c.statistics()["in_flight"] == 7)
            n.start_soon(c.flush)
    flush_at = node.log.index(("flush",))
    done_before = [e for e in node.log[:flush_at] if e[0] == "write-done"]
    assert len(done_before) == 7, node.log
    assert ("write-done", 40 * MiB, 4096, True) in node.log


@trio_test()
async def test_overlapping_writes_apply_in_order():
    node = MemNode(delay=0.01)
    async with serving(node, inline_max=64 * KiB) as srv, srv.client() as c:
        async with trio.open_nursery() as n:
            n.start_soon(c.write, 0, b"A" * MiB)  # spawned (large)
            await wait_until(lambda: ("write-start", 0, MiB) in node.log)
            n.start_soon(c.write, 4096, b"B" * 4096)  # inline, overlaps
        assert await c.read(4096, 4096) == b"B" * 4096


@trio_test()
async def test_node_errors_map_to_errno():
    fail = {0: errno.EIO, 512: errno.ENOSPC, 1024: errno.ENOENT, 1536: errno.EDQUOT, 2048: errno.ESHUTDOWN}
    node = MemNode(fail=fail)
    async with serving(node) as srv:
        async with srv.client() as c:
            for off, want in ((0, errno.EIO), (512, errno.ENOSPC), (1024, errno.EIO), (1536, errno.ENOSPC)):
                with pytest.raises(BlockError) as info:
                    await c.write(off, b"q" * 10)
                assert info.value.errno == want
                assert "NBD_CMD_WRITE" in str(info.value)
            with pytest.raises(BlockError) as info:
                await c.read(0, 10)
            assert info.value.errno == errno.EIO
            assert await c.read(100, 5) == bytes(5)  # still working
            # ESHUTDOWN from the server: the client disconnects softly.
            with pytest.raises(BlockError) as info:
                await c.write(2048, b"s")
            assert info.value.errno == errno.ESHUTDOWN
            with pytest.raises(BlockError):
                await c.read(0, 1)
            await wait_until(lambda: not c.connected, 5)
        assert srv.server.statistics()["errors"] == 6


@trio_test()
async def test_read_only_export_refuses_every_write_command():
    node = MemNode(MiB)
    async with serving(node, read_only=True) as srv, srv.client() as c:
        assert c.read_only
        c.read_only = False  # make the client send them anyway
        for call in (c.write(0, b"x"), c.write_zeroes(0, 5), c.trim(0, 5)):
            with pytest.raises(BlockError) as info:
                await call
            assert info.value.errno == errno.EPERM
        assert await c.read(0, 5) == bytes(5)
        c.read_only = True
        with pytest.raises(BlockError) as info:
            await c.write(0, b"x")  # refused by the client itself
        assert info.value.errno == errno.EPERM
        assert srv.server.statistics()["errors"] == 3
    assert node.log == [] and node.data == bytes(MiB)


@trio_test()
async def test_abort_fails_in_flight_requests_at_once():
    node = MemNode(gated=True)
    async with serving(node) as srv:
        client = await srv.connect()
        assert client.can_abort
        failures = []

        async def w(i):
            try:
                await client.write(i * 4096, b"y" * 4096)
            except BlockError as exc:
                failures.append(exc.errno)

        async with trio.open_nursery() as n:
            for i in range(8):
                n.start_soon(w, i)
            # the first blocks the server (small writes run inline)
            await wait_until(lambda: len(node.log) == 1)
            assert client.statistics()["in_flight"] == 8
            client.abort("test abort")
        assert failures == [errno.ESHUTDOWN] * 8
        with pytest.raises(BlockError, match="test abort") as info:
            await client.flush()
        assert info.value.errno == errno.ESHUTDOWN
        node.gate.set()
        await wait_until(lambda: not srv.server.statistics()["connections"], 5)


@trio_test()
async def test_client_in_long_lived_nursery_survives_server_loss():
    """The primary's pattern: connect() into its own nursery; losing the
    server fails requests with ECONNRESET but never the nursery."""
    async with trio.open_nursery() as outer:
        async with serving(MemNode()) as srv:
            client = await connect(srv.host, srv.port, "disk", nursery=outer)
            await client.write(0, b"data")
        # the server is gone
        with pytest.raises(BlockError) as info:
            with trio.fail_after(5):
                while True:
                    await client.write(0, b"more")
                    await trio.sleep(0.01)
        assert info.value.errno == errno.ECONNRESET
        assert "nbd://127.0.0.1" in str(info.value)
        assert not client.connected and client.failure is not None
        await client.aclose()  # harmless after failure
        client.close()
    # the outer nursery ended normally: the client's tasks exited quietly


@trio_test()
async def test_cancelled_request_does_not_break_the_connection():
    node = MemNode(gated=True)
    async with serving(node) as srv, srv.client() as c:
        with trio.move_on_after(0.05) as scope:
            await c.write(0, b"late")
        assert scope.cancelled_caught
        node.gate.set()  # its reply arrives later and is dropped
        assert await c.read(0, 4) == b"late"
        await c.write(8, b"next")
        assert await c.read(8, 4) == b"next"


@trio_test()
async def test_body_exception_passes_through_open_client_unwrapped():
    async with serving(MemNode()) as srv:
        with pytest.raises(KeyError):
            async with srv.client():
                raise KeyError("boom")
        with pytest.raises(ExportRefusedError):
            async with srv.client("missing"):
                pass


@trio_test()
async def test_our_own_protocol_error_carries_its_errno_hint():
    async with serving(MemNode()) as srv:
        with pytest.raises(BlockError, match="handshake failed: export name must be") as info:
            await srv.connect("x" * 5000)  # too long to send: our mistake, not the server's
        assert info.value.errno == errno.EINVAL
        assert srv.server.protocol_errors == 0


@trio_test()
async def test_write_batch_sends_many_writes_and_waits_once():
    """NBDClient.write_batch (the checkpoint protocol's streamer): every write
    lands; an error on one is raised after all replies came; a batch that
    does not fit is refused before anything is sent; a lost connection fails
    the waiting batch."""
    node = MemNode(8 * MiB, fail={5 * MiB: errno.ENOSPC})
    async with serving(node) as srv, srv.client() as c:
        rng = random.Random(4)
        items = [(rng.randrange(0, 1024) * 4096, bytes([i % 251 + 1]) * 4096) for i in range(300)]
        await c.write_batch(items)
        expect = bytearray(8 * MiB)
        for off, data in items:
            expect[off:off + len(data)] = data
        assert await c.read(0, 4 * MiB) == bytes(expect[:4 * MiB])
        assert c.statistics()["in_flight"] == 0
        with pytest.raises(BlockError) as err:  # one failing write in the middle
            await c.write_batch([(0, b"a" * 4096), (5 * MiB, b"b" * 4096), (8192, b"c" * 4096)])
        assert err.value.errno == errno.ENOSPC
        assert await c.read(8192, 4096) == b"c" * 4096  # the others landed
        with pytest.raises(BlockError):  # beyond the end: refused up front, nothing sent
            await c.write_batch([(12288, b"d" * 4096), (8 * MiB, b"e" * 4096)])
        assert await c.read(12288, 4096) == bytes(expect[12288:16384])
        await c.write_batch([])
    node = MemNode(8 * MiB, gated=True)
    async with serving(node) as srv, srv.client() as c:
        async with trio.open_nursery() as n:
            async def batch():
                with pytest.raises(BlockError):
                    await c.write_batch([(i * 4096, b"x" * 4096) for i in range(8)])
            n.start_soon(batch)
            await wait_until(lambda: c.statistics()["in_flight"] >= 1)
            c.abort("test: connection lost")
