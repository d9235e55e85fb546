"""The control channel (NBD_OPT_X_REPLFS, replfs's private extension): our
server's ``control=`` hook driven by ``open_control`` over 127.0.0.1, one trio
run per test.

Calls and answers, refusals (verbatim), internal errors, size limits, one
call at a time, a slow handler beside a data client, the handshake timeout
exemption, keepalive, lost links, timeouts and cancellation.  Against
qemu-nbd and nbdkit (which answer "unsupported"): test_nbd_interop.py.
"""

from __future__ import annotations

import errno
import logging
import socket

import pytest
import trio

from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd.client import ExportRefusedError
from replfs.nbd.control import ControlRefused, ControlUnsupported, open_control
from tests.nbdserving import MemNode, serving, trio_test

pytestmark = pytest.mark.integration


class Handler:
    """A control hook that echoes, records, and can be held or told to refuse."""

    def __init__(self):
        self.calls: list[tuple[dict, tuple]] = []
        self.running = 0
        self.most_at_once = 0
        #: When set, every call waits for this event first.
        self.hold: trio.Event | None = None
        #: Set once a call has started.
        self.started = trio.Event()

    async def __call__(self, request: dict, peer: tuple) -> dict:
        self.calls.append((request, peer))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.started.set()
        try:
            if self.hold is not None:
                await self.hold.wait()
            op = request.get("op")
            if op == "refuse":
                raise ControlRefused(request["code"], request["message"])
            if op == "crash":
                raise RuntimeError("handler bug")
            if op == "huge":
                return {"blob": "x" * P.MAX_CONTROL_PAYLOAD}
            if op == "sleep":
                await trio.sleep(request["seconds"])
            return {"echo": request, "peer": list(peer)}
        finally:
            self.running -= 1


async def wait_until(cond, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


# -- calls -----------------------------------------------------------------------------------
@trio_test()
async def test_calls_answers_and_peer_address():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl:
            me = ctl._sock.sock.getsockname()
            for i in range(3):
                answer = await ctl.call({"op": "hello", "n": i, "text": "dïsk"})
                assert answer == {"echo": {"op": "hello", "n": i, "text": "dïsk"}, "peer": [me[0], me[1]]}
            assert [peer for _, peer in handler.calls] == [me] * 3
            stats = srv.server.statistics()
            assert stats["control_calls"] == 3 and stats["control_connections"] == 1
            assert stats["clients"] == {} and ctl.calls == 3
        assert ctl.failure is not None and ctl.failure.errno == errno.ESHUTDOWN
        # NBD_OPT_ABORT: the server saw a polite end, not a lost connection
        await wait_until(lambda: srv.server.statistics()["connections"] == 0)
        assert srv.server.statistics()["protocol_errors"] == 0


@trio_test()
async def test_payloads_up_to_4_mib_both_ways():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl:
            # a request just under the limit, echoed: the answer is a bit larger
            blob = "d" * (P.MAX_CONTROL_PAYLOAD // 2)
            answer = await ctl.call({"op": "digest", "blob": blob})
            assert answer["echo"]["blob"] == blob
            biggest = "e" * (P.MAX_CONTROL_PAYLOAD - len('{"blob":""}'))
            assert len(handler.calls) == 1
            with pytest.raises(ControlRefused) as info:  # its echo is over the limit
                await ctl.call({"blob": biggest})
            assert info.value.code == P.NBD_REP_ERR_TOO_BIG and len(handler.calls) == 2
            # over the limit on our side: refused before anything is sent
            with pytest.raises(ValueError, match="exceeds"):
                await ctl.call({"blob": biggest + "e"})
            with pytest.raises(ControlRefused) as info:
                await ctl.call({"op": "huge"})
            assert info.value.code == P.NBD_REP_ERR_TOO_BIG and "exceeds" in info.value.message
            assert (await ctl.call({"op": "still-fine"}))["echo"] == {"op": "still-fine"}
            with pytest.raises(TypeError):
                await ctl.call(["not", "a", "dict"])


@trio_test()
async def test_refusals_arrive_verbatim_and_the_connection_goes_on(caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl:
            message = "split brain: secondary generation 7 > primary 5 (disque « ü »)"
            with pytest.raises(ControlRefused) as info:
                await ctl.call({"op": "refuse", "code": P.NBD_REP_ERR_POLICY, "message": message})
            assert info.value.code == P.NBD_REP_ERR_POLICY and info.value.message == message
            with pytest.raises(ControlRefused) as info:
                await ctl.call({"op": "refuse", "code": P.NBD_REP_ERR_SHUTDOWN, "message": "failed over"})
            assert (info.value.code, info.value.message) == (P.NBD_REP_ERR_SHUTDOWN, "failed over")
            # a handler bug: "internal error", the traceback in the log, the connection kept
            with pytest.raises(ControlRefused) as info:
                await ctl.call({"op": "crash"})
            assert (info.value.code, info.value.message) == (P.NBD_REP_ERR_INVALID, "internal error")
            assert any(r.exc_info and "control handler failed" in r.getMessage() for r in caplog.records)
            assert await ctl.call({"op": "after"}) == {"echo": {"op": "after"}, "peer": list(handler.calls[-1][1])}
            assert srv.server.statistics()["control_errors"] == 3


@trio_test()
async def test_request_that_is_not_a_json_object_is_invalid():
    """Through the sans-IO core of a client, to send what open_control would not."""
    from replfs.nbd import NEED_DATA, ClientConnection, ClientFlags, OptionError, OptPrivate, PrivateReply

    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        core = ClientConnection()
        async with await trio.open_tcp_stream(srv.host, srv.port) as stream:

            async def next_event():
                while (ev := core.next_event()) is NEED_DATA:
                    core.receive_data(await stream.receive_some(65536))
                return ev

            await next_event()
            await stream.send_all(core.send(ClientFlags()))
            for payload in (b"[1, 2]", b"\xff", b"{", b""):
                await stream.send_all(core.send(OptPrivate(payload)))
                ev = await next_event()
                assert type(ev) is OptionError and ev.reply_type == P.NBD_REP_ERR_INVALID
                assert ev.message.startswith("control request:")
            await stream.send_all(core.send(OptPrivate(b'{"op":"ok"}')))
            assert type(await next_event()) is PrivateReply
        assert [r for r, _ in handler.calls] == [{"op": "ok"}]


@trio_test()
async def test_concurrent_callers_take_turns():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl:
            answers = {}

            async def caller(i):
                answers[i] = await ctl.call({"op": "sleep", "seconds": 0.01, "i": i})

            async with trio.open_nursery() as n:
                for i in range(8):
                    n.start_soon(caller, i)
            assert {i: a["echo"]["i"] for i, a in answers.items()} == {i: i for i in range(8)}
            assert handler.most_at_once == 1


# -- beside the data path ------------------------------------------------------------------
@trio_test()
async def test_slow_handler_does_not_block_another_clients_go_and_data():
    handler = Handler()
    handler.hold = trio.Event()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl, trio.open_nursery() as n:
            result = {}

            async def slow_call():
                result["answer"] = await ctl.call({"op": "digest"})

            n.start_soon(slow_call)
            await handler.started.wait()
            with trio.fail_after(5):
                async with srv.client() as data:  # NBD_OPT_GO while the handler waits
                    await data.write(4096, b"payload")
                    assert await data.read(4096, 7) == b"payload"
                    await data.flush()
            assert "answer" not in result
            handler.hold.set()
        assert result["answer"]["echo"] == {"op": "digest"}


@trio_test()
async def test_admission_and_client_limit_do_not_apply_to_control():
    handler = Handler()
    refusals = []

    def admit(name, clients_now):
        refusals.append(name)
        return "replication stopped: not taking writes"

    async with serving(MemNode(), control=handler, admit=admit, max_clients_per_export=1) as srv:
        async with await srv.control() as first, await srv.control() as second:
            assert (await first.call({"n": 1}))["echo"] == {"n": 1}
            assert (await second.call({"n": 2}))["echo"] == {"n": 2}
            with pytest.raises(ExportRefusedError, match="not taking writes"):
                await srv.connect()
        assert refusals == ["disk"] and srv.server.clients("disk") == 0


@trio_test()
async def test_server_without_control_answers_unsupported():
    async with serving(MemNode()) as srv:
        async with await srv.control() as ctl:
            with pytest.raises(ControlUnsupported) as info:
                await ctl.call({"op": "hello"})
            assert info.value.code == P.NBD_REP_ERR_UNSUP and "not supported" in info.value.message
            assert ctl.connected  # and the same connection goes on to close politely
        await wait_until(lambda: srv.server.statistics()["connections"] == 0)
        stats = srv.server.statistics()
        assert stats["protocol_errors"] == 0 and stats["control_calls"] == 0


@trio_test()
async def test_shutting_down_server_refuses_calls():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl:
            await ctl.call({"n": 1})
            srv.server.set_accepting(False)
            with pytest.raises(ControlRefused) as info:
                await ctl.call({"n": 2})
            assert info.value.code == P.NBD_REP_ERR_SHUTDOWN
            srv.server.set_accepting(True)
            await ctl.call({"n": 3})
        assert [r["n"] for r, _ in handler.calls] == [1, 3]


# -- the handshake timeout, keepalive --------------------------------------------------------
@trio_test()
async def test_a_successful_call_exempts_from_the_handshake_timeout():
    handler = Handler()
    async with serving(MemNode(), control=handler, handshake_timeout=0.3) as srv:
        # no call: dropped after the handshake timeout, which the watcher notices
        idle = await srv.control()
        with trio.fail_after(5):
            await idle.wait_closed()
        assert idle.failure.errno == errno.ECONNRESET
        with pytest.raises(BlockError) as info:
            await idle.call({"n": 0})
        assert info.value.errno == errno.ECONNRESET
        # a refused first call does not exempt
        refused = await srv.control()
        with pytest.raises(ControlRefused):
            await refused.call({"op": "refuse", "code": P.NBD_REP_ERR_POLICY, "message": "no"})
        with trio.fail_after(5):
            await refused.wait_closed()
        # a first call slower than the timeout still completes (our time, not the client's),
        # and exempts the connection from then on
        async with await srv.control() as ctl:
            assert (await ctl.call({"op": "sleep", "seconds": 0.6}))["echo"]["op"] == "sleep"
            await trio.sleep(0.8)
            with pytest.raises(ControlRefused):  # a refusal later does not bring it back
                await ctl.call({"op": "refuse", "code": P.NBD_REP_ERR_POLICY, "message": "no"})
            await trio.sleep(0.8)
            assert (await ctl.call({"n": 2}))["echo"] == {"n": 2}
            assert ctl.connected and srv.server.statistics()["control_connections"] == 1


@trio_test()
async def test_keepalive_is_on_at_both_ends():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        async with await srv.control() as ctl:
            await ctl.call({})
            (conn,) = srv.server._conns
            for sock in (conn.sock.sock, ctl._sock.sock):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


# -- lost links, timeouts, cancellation, abort ------------------------------------------------
@trio_test()
async def test_server_gone_while_idle_and_during_a_call():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        watched = await srv.control()  # with a watcher (the server's nursery)
        unwatched = await open_control(srv.host, srv.port)  # without
        busy = await open_control(srv.host, srv.port)
        for ctl in (watched, unwatched, busy):
            await ctl.call({})
        handler.hold = trio.Event()
        handler.started = trio.Event()
        async with trio.open_nursery() as n:

            async def in_call():
                with pytest.raises(BlockError) as info:
                    await busy.call({"op": "held"})
                assert info.value.errno == errno.ECONNRESET

            n.start_soon(in_call)
            await handler.started.wait()
            await srv.server.close_all()
        with trio.fail_after(5):
            await watched.wait_closed()  # noticed without a call
        assert watched.failure.errno == errno.ECONNRESET and "closed" in str(watched.failure)
        assert unwatched.connected  # not known until the next call
        for ctl in (watched, unwatched, busy):
            with pytest.raises(BlockError) as info:
                await ctl.call({})
            assert info.value.errno == errno.ECONNRESET
            assert not ctl.connected


@trio_test()
async def test_timeout_and_cancel_drop_the_connection_but_waiting_does_not():
    handler = Handler()
    async with serving(MemNode(), control=handler) as srv:
        ctl = await srv.control()
        with pytest.raises(BlockError) as info:
            await ctl.call({"op": "sleep", "seconds": 5}, timeout=0.2)
        assert info.value.errno == errno.ETIMEDOUT and not ctl.connected
        with pytest.raises(BlockError) as info:
            await ctl.call({})
        assert info.value.errno == errno.ETIMEDOUT

        ctl = await srv.control()
        with trio.move_on_after(0.2):
            await ctl.call({"op": "sleep", "seconds": 5})
        assert ctl.failure.errno == errno.ECANCELED

        # a call that times out while an earlier one is still running leaves it alone
        ctl = await srv.control()
        async with trio.open_nursery() as n:
            done = trio.Event()

            async def first():
                await ctl.call({"op": "sleep", "seconds": 0.5})
                done.set()

            n.start_soon(first)
            await wait_until(lambda: handler.calls[-1][0] == {"op": "sleep", "seconds": 0.5})
            with pytest.raises(BlockError) as info:
                await ctl.call({"n": 2}, timeout=0.1)
            assert info.value.errno == errno.ETIMEDOUT
        assert done.is_set() and ctl.connected
        assert (await ctl.call({"n": 3}))["echo"] == {"n": 3}
        await ctl.aclose()


@trio_test()
async def test_abort_fails_a_call_in_progress_and_aclose_is_idempotent():
    handler = Handler()
    handler.hold = trio.Event()
    async with serving(MemNode(), control=handler) as srv:
        ctl = await srv.control()
        async with trio.open_nursery() as n:

            async def in_call():
                with pytest.raises(BlockError) as info:
                    await ctl.call({})
                assert info.value.errno == errno.ESHUTDOWN

            n.start_soon(in_call)
            await handler.started.wait()
            ctl.abort("test over")
        assert "test over" in str(ctl.failure)
        await ctl.aclose()
        await ctl.aclose()
        handler.hold.set()
        with pytest.raises(RuntimeError):
            async with await srv.control() as other:
                raise RuntimeError("body failed")
        assert not other.connected


@trio_test()
async def test_connect_errors_and_a_server_without_fixed_newstyle(free_port):
    with pytest.raises(BlockError) as info:
        await open_control("127.0.0.1", free_port())
    assert info.value.errno == errno.ECONNREFUSED

    async def old_server(stream):
        async with stream:
            await stream.send_all(P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, 0))
            await stream.receive_some(100)

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, old_server, 0)
        port = listeners[0].socket.getsockname()[1]
        with pytest.raises(ControlUnsupported, match="fixed newstyle"):
            await open_control("127.0.0.1", port)
        n.cancel_scope.cancel()
