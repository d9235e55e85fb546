"""The sans-IO NBD cores (replfs.nbd.connection), socket-free: a client core
and a server core talking through in-memory byte strings."""

from __future__ import annotations

import contextlib
import errno
import random
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replfs.nbd import DIRECT_PAYLOAD_THRESHOLD, NEED_DATA, PAUSED, ClientConnection, ServerConnection
from replfs.nbd import LocalProtocolError, ProtocolError, RemoteProtocolError
from replfs.nbd import ClientFlags, ExportInfo, ExportList, Greeting, OptAck, OptionError  # handshake
from replfs.nbd import OptAbort, OptExportName, OptGo, OptInfo, OptInvalid, OptList, OptUnknown  # options
from replfs.nbd import BadRequest, ConnectionClosed, Disconnect, Reply, Request  # transmission
from replfs.nbd import ControlRefused, ControlUnsupported, OptPrivate, PrivateReply  # control channel
from replfs.nbd import connection
from replfs.nbd import proto as P
from replfs.nbd._state import INITIAL_STATE, SERVER, TRANSITIONS, State, Trigger, next_state

SIZE = 1 << 30
FLAGS = P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES
BLOCK = (1, 4096, P.MAX_BLOCK_SIZE)


# -- helpers -----------------------------------------------------------------------
def events(conn) -> list:
    """Every event available now (stops at NEED_DATA / PAUSED)."""
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return out
        out.append(ev)
        if type(ev) is ConnectionClosed:
            return out


def feed(conn, data: bytes, step: int | None = None) -> list:
    """Feed ``data`` (``step`` bytes at a time) collecting events as they come."""
    out = []
    if step is None:
        conn.receive_data(data)
        return events(conn)
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        out += events(conn)
    return out


def greet(step=None, server_flags=P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, client_flags=None, control=False):
    s, c = ServerConnection(control=control), ClientConnection()
    assert feed(c, s.send(Greeting(server_flags)), step) == [Greeting(server_flags)]
    if client_flags is None:
        client_flags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES
    assert feed(s, c.send(ClientFlags(client_flags)), step) == [ClientFlags(client_flags)]
    return s, c


def ask(s, c, option, step=None):
    """Client sends ``option``; returns what the server received."""
    evs = feed(s, c.send(option), step)
    assert len(evs) == 1, evs
    assert s.next_event() is PAUSED
    return evs[0]


def answer(s, c, reply, step=None) -> list:
    return feed(c, s.send(reply), step)


def connected(step=None):
    s, c = greet(step)
    assert ask(s, c, OptGo("disk", (P.NBD_INFO_BLOCK_SIZE,)), step) == OptGo("disk", (P.NBD_INFO_BLOCK_SIZE,))
    info = ExportInfo(SIZE, FLAGS | P.NBD_FLAG_HAS_FLAGS, BLOCK)
    assert answer(s, c, info, step) == [info]
    assert s.in_transmission and c.in_transmission
    return s, c


def raw_option(option: int, data: bytes = b"", magic: int = P.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, option, len(data)) + data


def raw_request(command, cookie=1, offset=0, length=0, flags=0, magic=P.NBD_REQUEST_MAGIC) -> bytes:
    return P.REQUEST.pack(magic, flags, command, cookie, offset, length)


def go_data(name: bytes, infos=(), namelen=None, count=None) -> bytes:
    namelen = len(name) if namelen is None else namelen
    count = len(infos) if count is None else count
    return struct.pack(">I", namelen) + name + struct.pack(">H", count) + b"".join(struct.pack(">H", i) for i in infos)


# -- proto --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "err,code",
    [
        (errno.EPERM, 1), (errno.EIO, 5), (errno.ENOMEM, 12), (errno.EINVAL, 22), (errno.ENOSPC, 28),
        (errno.EOVERFLOW, 75), (errno.ENOTSUP, 95), (errno.ESHUTDOWN, 108),
        # "It also SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC"; the rest is EIO.
        (errno.EDQUOT, 28), (errno.EFBIG, 28), (errno.ENOENT, 5), (errno.EBADF, 5), (errno.ECONNRESET, 5),
    ],
)
def test_errno_to_nbd(err, code):
    assert P.errno_to_nbd(err) == code


def test_nbd_to_errno_round_trip_and_unknown():
    for err in (errno.EPERM, errno.EIO, errno.ENOMEM, errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW,
                errno.ENOTSUP, errno.ESHUTDOWN):
        assert P.nbd_to_errno(P.errno_to_nbd(err)) == err
    assert P.nbd_to_errno(77) == errno.EIO


def test_struct_sizes():
    assert P.REQUEST.size == 28
    assert P.SIMPLE_REPLY.size == 16
    assert P.GREETING.size == 18
    assert P.OPTION_HEADER.size == 16
    assert P.OPTION_REPLY_HEADER.size == 20
    assert P.INFO_EXPORT.size == 12
    assert P.INFO_BLOCK_SIZE.size == 14


# -- handshake ----------------------------------------------------------------------
@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_full_session_in_memory(step):
    s, c = connected(step)
    data = bytes(range(256)) * 20
    reqs = [
        Request(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 1, 4096, len(data), data),
        Request(P.NBD_CMD_READ, 0, 2, 4096, len(data)),
        Request(P.NBD_CMD_FLUSH, 0, 3, 0, 0),
        Request(P.NBD_CMD_TRIM, 0, 4, 0, 512),
        Request(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_NO_HOLE, 5, 512, 512),
    ]
    wire = b"".join(c.send(r) for r in reqs)
    got = feed(s, wire, step)
    assert [type(e) for e in got] == [Request] * 5
    assert got[0].data == data and got[0].flags == P.NBD_CMD_FLAG_FUA
    assert [(e.command, e.cookie, e.offset, e.length) for e in got] == [
        (r.command, r.cookie, r.offset, r.length) for r in reqs
    ]
    assert s.in_flight == 5 and c.in_flight == 5
    wire = b"".join(s.send(Reply(k, 0, data if k == 2 else None)) for k in (5, 2, 1, 4, 3))
    replies = feed(c, wire, step)
    assert [r.cookie for r in replies] == [5, 2, 1, 4, 3]
    assert replies[1].data == data
    assert s.in_flight == 0 and c.in_flight == 0
    assert feed(s, c.send(Disconnect()), step) == [Disconnect()]
    s.receive_data(b"")
    assert events(s) == [ConnectionClosed(clean=True)]


def test_export_name_with_and_without_zeroes():
    for cflags, length in ((P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, 10),
                           (P.NBD_FLAG_C_FIXED_NEWSTYLE, 134), (0, 134)):
        s, c = greet(client_flags=cflags)
        assert ask(s, c, OptExportName("x")) == OptExportName("x")
        wire = s.send(ExportInfo(SIZE, FLAGS))
        assert len(wire) == length
        assert feed(c, wire, 1) == [ExportInfo(SIZE, FLAGS | P.NBD_FLAG_HAS_FLAGS)]
        assert s.in_transmission and c.in_transmission


def test_info_then_go_and_list():
    s, c = greet()
    assert ask(s, c, OptList()) == OptList()
    assert answer(s, c, ExportList(("a", "bé"))) == [ExportList(("a", "bé"))]
    assert ask(s, c, OptInfo("a", (P.NBD_INFO_NAME, P.NBD_INFO_BLOCK_SIZE))) == OptInfo(
        "a", (P.NBD_INFO_NAME, P.NBD_INFO_BLOCK_SIZE)
    )
    info = ExportInfo(123, P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_READ_ONLY, None)
    assert answer(s, c, info) == [info]
    assert not s.in_transmission and not c.in_transmission
    assert ask(s, c, OptGo("a")) == OptGo("a")
    assert answer(s, c, info) == [info]
    assert c.in_transmission


# Table: option bytes the client sends -> what the server core reports.
OPTION_CASES = [
    ("go", raw_option(P.NBD_OPT_GO, go_data(b"disk", (3,))), OptGo("disk", (3,))),
    ("go-empty-name", raw_option(P.NBD_OPT_GO, go_data(b"")), OptGo("", ())),
    ("info", raw_option(P.NBD_OPT_INFO, go_data(b"d", (0, 1, 2))), OptInfo("d", (0, 1, 2))),
    ("export-name", raw_option(P.NBD_OPT_EXPORT_NAME, b"disk"), OptExportName("disk")),
    ("list", raw_option(P.NBD_OPT_LIST), OptList()),
    ("abort", raw_option(P.NBD_OPT_ABORT), OptAbort()),
    ("abort-with-data", raw_option(P.NBD_OPT_ABORT, b"junk"), OptAbort()),
    ("structured-reply", raw_option(P.NBD_OPT_STRUCTURED_REPLY), OptUnknown(P.NBD_OPT_STRUCTURED_REPLY)),
    ("starttls", raw_option(P.NBD_OPT_STARTTLS), OptUnknown(P.NBD_OPT_STARTTLS)),
    ("meta-context", raw_option(P.NBD_OPT_SET_META_CONTEXT, b"\0" * 8),
     OptUnknown(P.NBD_OPT_SET_META_CONTEXT, b"\0" * 8)),
    ("unknown-99", raw_option(99, b"xyz"), OptUnknown(99, b"xyz")),
    # without control=True, replfs's private option is unknown, as on a plain server
    ("x-replfs-without-control", raw_option(P.NBD_OPT_X_REPLFS, b"{}"), OptUnknown(P.NBD_OPT_X_REPLFS, b"{}")),
    ("list-with-data", raw_option(P.NBD_OPT_LIST, b"x"), OptInvalid(P.NBD_OPT_LIST, "NBD_OPT_LIST must not carry data")),
    ("go-short", raw_option(P.NBD_OPT_GO, b"\0\0"), OptInvalid),
    ("go-name-too-long", raw_option(P.NBD_OPT_GO, go_data(b"ab", namelen=50)), OptInvalid),
    ("go-count-mismatch", raw_option(P.NBD_OPT_GO, go_data(b"ab", (1,), count=3)), OptInvalid),
    ("go-bad-utf8", raw_option(P.NBD_OPT_GO, go_data(b"\xff\xfe")), OptInvalid),
    ("go-nul-in-name", raw_option(P.NBD_OPT_GO, go_data(b"a\0b")), OptInvalid),
]


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.parametrize("wire,expected", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_server_option_table(wire, expected, step):
    s, c = greet()
    evs = feed(s, wire, step)
    assert len(evs) == 1
    if isinstance(expected, type):
        assert type(evs[0]) is expected
    else:
        assert evs[0] == expected
    assert s.next_event() is PAUSED
    assert s.pending_option == struct.unpack_from(">QI", wire)[1]


# Table: server answer -> what the client core reports, and whether the
# client can go on negotiating.
ANSWER_CASES = [
    ("unknown-export", OptGo("nope"), OptionError(P.NBD_REP_ERR_UNKNOWN, "no export named 'nope'"), True),
    ("policy", OptGo("disk"), OptionError(P.NBD_REP_ERR_POLICY, "only one client"), True),
    ("shutdown", OptGo("disk"), OptionError(P.NBD_REP_ERR_SHUTDOWN, "going down"), True),
    ("unsup", OptUnknown(P.NBD_OPT_STRUCTURED_REPLY), OptionError(P.NBD_REP_ERR_UNSUP, ""), True),
    ("invalid", OptInfo("x"), OptionError(P.NBD_REP_ERR_INVALID, "bad"), True),
    ("list", OptList(), ExportList(("a", "b", "c")), True),
    ("list-empty", OptList(), ExportList(()), True),
    ("info", OptInfo("disk"), ExportInfo(SIZE, FLAGS, BLOCK), True),
    ("abort", OptAbort(), OptAck(), False),
]


@pytest.mark.parametrize("step", [None, 1])
@pytest.mark.parametrize("option,reply,goes_on", [c[1:] for c in ANSWER_CASES], ids=[c[0] for c in ANSWER_CASES])
def test_option_answer_table(option, reply, goes_on, step):
    s, c = greet()
    ask(s, c, option, step)
    got = answer(s, c, reply, step)
    assert len(got) == 1
    ev = got[0]
    if type(reply) is OptionError:
        assert ev == OptionError(reply.reply_type, reply.message, option.option)
        assert P.reply_name(reply.reply_type) == ev.reply_name
    elif type(reply) is ExportInfo:
        assert ev == ExportInfo(reply.size, reply.transmission_flags | P.NBD_FLAG_HAS_FLAGS, reply.block_size)
    else:
        assert ev == reply
    if goes_on:
        # Negotiation continues: a GO still works.
        ask(s, c, OptGo("disk"))
        assert answer(s, c, ExportInfo(1, 0)) == [ExportInfo(1, P.NBD_FLAG_HAS_FLAGS)]
    else:
        c.receive_data(b"")
        assert events(c) == [ConnectionClosed(clean=True)]
        s.receive_data(b"")
        assert events(s) == [ConnectionClosed(clean=True)]


def test_export_name_refusal_is_a_hard_disconnect():
    s, c = greet()
    ask(s, c, OptExportName("nope"))
    assert s.send(OptionError(P.NBD_REP_ERR_UNKNOWN, "no")) == b""
    assert s.closed
    c.receive_data(b"")
    assert events(c) == [ConnectionClosed(clean=False)]


def test_client_ignores_unknown_info_and_requires_info_export():
    s, c = greet()
    c.send(OptGo("d"))
    hdr = P.OPTION_REPLY_HEADER.pack
    wire = (
        hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_GO, P.NBD_REP_INFO, 6) + struct.pack(">HI", 77, 1)
        + hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_GO, P.NBD_REP_INFO, 12) + P.INFO_EXPORT.pack(0, 5, 1)
        + hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_GO, P.NBD_REP_ACK, 0)
    )
    assert feed(c, wire, 1) == [ExportInfo(5, 1, None)]
    s, c = greet()
    c.send(OptGo("d"))
    with pytest.raises(RemoteProtocolError, match="NBD_INFO_EXPORT"):
        feed(c, hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_GO, P.NBD_REP_ACK, 0))


@pytest.mark.parametrize(
    "wire,match",
    [
        (struct.pack(">I", 4), "unknown client flags"),
        (struct.pack(">I", 0x80000001), "unknown client flags"),
    ],
)
def test_bad_client_flags(wire, match):
    s = ServerConnection()
    s.send(Greeting())
    with pytest.raises(RemoteProtocolError, match=match):
        feed(s, wire)
    with pytest.raises(RemoteProtocolError):  # stays broken
        s.next_event()


def test_client_flag_not_offered():
    s = ServerConnection()
    s.send(Greeting(P.NBD_FLAG_FIXED_NEWSTYLE))
    with pytest.raises(RemoteProtocolError, match="NO_ZEROES"):
        feed(s, struct.pack(">I", 3))


@pytest.mark.parametrize(
    "wire,match",
    [
        (raw_option(P.NBD_OPT_GO, magic=0x1234), "bad option magic"),
        (struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, P.MAX_OPTION_LENGTH + 1), "limit"),
        (raw_option(P.NBD_OPT_EXPORT_NAME, b"\xff"), "EXPORT_NAME"),
        (raw_option(P.NBD_OPT_EXPORT_NAME, b"x" * 5000), "EXPORT_NAME"),
    ],
)
def test_fatal_option_input(wire, match):
    s, c = greet()
    with pytest.raises(RemoteProtocolError, match=match):
        feed(s, wire)


def test_client_rejects_bad_greetings():
    for wire, match in [
        (struct.pack(">QQH", 1, P.IHAVEOPT, 3), "NBDMAGIC"),
        (struct.pack(">QQH", P.NBDMAGIC, P.CLISERV_MAGIC, 0), "oldstyle"),
        (struct.pack(">QQH", P.NBDMAGIC, 5, 0), "IHAVEOPT"),
    ]:
        c = ClientConnection()
        with pytest.raises(RemoteProtocolError, match=match):
            feed(c, wire, 1)


def test_client_rejects_bad_option_replies():
    hdr = P.OPTION_REPLY_HEADER.pack
    for wire, match in [
        (hdr(123, P.NBD_OPT_GO, P.NBD_REP_ACK, 0), "magic"),
        (hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_LIST, P.NBD_REP_ACK, 0), "while waiting"),
        (hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_GO, P.NBD_REP_INFO, 3) + b"\0\0\0", "12 bytes"),
        (hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_GO, P.NBD_REP_SERVER, 0), "unexpected"),
    ]:
        s, c = greet()
        c.send(OptGo("x"))
        with pytest.raises(RemoteProtocolError, match=match):
            feed(c, wire)


def test_nonfixed_newstyle_server_only_allows_export_name():
    s, c = greet(server_flags=0, client_flags=0)
    assert ask(s, c, OptExportName("x")) == OptExportName("x")
    assert len(s.send(ExportInfo(9, 0))) == 134
    s, c = greet(server_flags=0, client_flags=0)
    with pytest.raises(LocalProtocolError, match="fixed newstyle"):
        c.send(OptGo("x"))


# -- transmission ----------------------------------------------------------------------
def test_out_of_order_replies_match_cookies():
    s, c = connected()
    rng = random.Random(5)
    payloads = {}
    wire = b""
    for cookie in range(1, 41):
        n = rng.choice([0, 1, 512, 4096, 70000])
        if cookie % 2:
            payloads[cookie] = rng.randbytes(n)
            wire += c.send(Request(P.NBD_CMD_READ, 0, cookie, 0, n))
        else:
            wire += c.send(Request(P.NBD_CMD_WRITE, 0, cookie, 0, n, rng.randbytes(n)))
    reqs = feed(s, wire, 4096)
    assert len(reqs) == 40
    order = list(range(1, 41))
    rng.shuffle(order)
    out = b"".join(s.send(Reply(k, 0, payloads.get(k))) for k in order)
    got = feed(c, out, 1000)
    assert [r.cookie for r in got] == order
    for r in got:
        assert r.error == 0
        if r.cookie in payloads:
            assert bytes(r.data) == payloads[r.cookie]
        else:
            assert r.data is None


def test_error_replies_carry_no_payload():
    s, c = connected()
    feed(s, c.send(Request(P.NBD_CMD_READ, 0, 7, 0, 4096)))
    assert feed(c, s.send(Reply(7, P.NBD_EIO))) == [Reply(7, P.NBD_EIO, None)]
    # Nothing left over: the next reply parses.
    feed(s, c.send(Request(P.NBD_CMD_FLUSH, 0, 8, 0, 0)))
    assert feed(c, s.send(Reply(8))) == [Reply(8, 0, None)]


@pytest.mark.parametrize("step", [1, 1000, 65536, None])
def test_large_write_payload_assembled_in_place(step):
    s, c = connected()
    data = random.Random(1).randbytes(3 * DIRECT_PAYLOAD_THRESHOLD + 17)
    wire = c.send(Request(P.NBD_CMD_WRITE, 0, 9, 100, len(data), data)) + c.send(Request(P.NBD_CMD_FLUSH, 0, 10, 0, 0))
    got = feed(s, wire, step)
    assert [type(e) for e in got] == [Request, Request]
    assert bytes(got[0].data) == data and got[1].command == P.NBD_CMD_FLUSH


def test_payload_view_recv_into_path():
    s, c = connected()
    data = random.Random(2).randbytes(1 << 20)
    wire = c.send(Request(P.NBD_CMD_WRITE, 0, 1, 0, len(data), data))
    s.receive_data(wire[:1000])
    assert s.next_event() is NEED_DATA
    pos = 1000
    while (view := s.payload_view()) is not None:
        n = min(len(view), 65536)
        view[:n] = wire[pos : pos + n]
        s.payload_received(n)
        pos += n
    assert pos == len(wire)
    ev = s.next_event()
    assert bytes(ev.data) == data
    # The same on the client side for a large READ reply.
    feed(s, c.send(Request(P.NBD_CMD_READ, 0, 2, 0, len(data))))
    wire = s.send(Reply(2, 0, data))
    c.receive_data(wire[:16])
    assert c.next_event() is NEED_DATA
    view = c.payload_view()
    view[:] = data
    c.payload_received(len(data))
    assert c.next_event() == Reply(2, 0, bytearray(data))


def test_bad_request_magic_is_fatal():
    s, c = connected()
    s.receive_data(raw_request(P.NBD_CMD_READ, magic=0x25609514))
    with pytest.raises(RemoteProtocolError, match="magic"):
        s.next_event()
    with pytest.raises(RemoteProtocolError):
        s.next_event()


def test_oversized_write_is_fatal_and_oversized_read_is_einval():
    s, c = connected()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        feed(s, raw_request(P.NBD_CMD_WRITE, length=P.MAX_BLOCK_SIZE + 1))
    s, c = connected()
    got = feed(s, raw_request(P.NBD_CMD_READ, cookie=3, length=P.MAX_BLOCK_SIZE + 1)
               + raw_request(P.NBD_CMD_WRITE_ZEROES, cookie=4, length=1 << 31)
               + raw_request(P.NBD_CMD_TRIM, cookie=5, length=1 << 31))
    assert [type(e) for e in got] == [BadRequest, BadRequest, Request]
    assert got[0].error == P.NBD_EINVAL and got[0].cookie == 3
    # The BadRequest is answered like any request.
    assert s.send(Reply(3, P.NBD_EINVAL)) == P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 22, 3)


@pytest.mark.parametrize(
    "command,flags,ok",
    [
        (P.NBD_CMD_CACHE, 0, False),
        (P.NBD_CMD_BLOCK_STATUS, 0, False),
        (P.NBD_CMD_RESIZE, 0, False),
        (42, 0, False),
        (0xFFFF, 0, False),
        (P.NBD_CMD_READ, P.NBD_CMD_FLAG_FUA, True),
        (P.NBD_CMD_FLUSH, P.NBD_CMD_FLAG_FUA, True),
        (P.NBD_CMD_TRIM, P.NBD_CMD_FLAG_FUA, True),
        (P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FUA, True),
        (P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO, False),
        (P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, False),
        (P.NBD_CMD_READ, P.NBD_CMD_FLAG_NO_HOLE, False),
        (P.NBD_CMD_TRIM, 0x100, False),
        (P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, True),
        (P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_NO_HOLE, False),
    ],
)
def test_command_and_flag_table(command, flags, ok):
    s, c = connected()
    length = 8
    wire = raw_request(command, cookie=77, length=length, flags=flags)
    if command == P.NBD_CMD_WRITE:
        wire += b"w" * length
    wire += raw_request(P.NBD_CMD_FLUSH, cookie=78)
    got = feed(s, wire, 5)
    assert len(got) == 2 and type(got[1]) is Request  # stream stays in sync
    if ok:
        assert type(got[0]) is Request and got[0].flags == flags
    else:
        assert type(got[0]) is BadRequest and got[0].error == P.NBD_EINVAL and got[0].cookie == 77
    # And the client sees EINVAL for it.
    c._inflight[77] = (command, length)
    c._inflight[78] = (P.NBD_CMD_FLUSH, 0)
    if not ok:
        assert feed(c, s.send(Reply(77, P.NBD_EINVAL))) == [Reply(77, P.NBD_EINVAL)]


def test_large_write_with_bad_flags_still_consumes_payload():
    s, c = connected()
    n = DIRECT_PAYLOAD_THRESHOLD * 2
    wire = raw_request(P.NBD_CMD_WRITE, cookie=1, length=n, flags=P.NBD_CMD_FLAG_DF) + b"x" * n
    wire += raw_request(P.NBD_CMD_FLUSH, cookie=2)
    got = feed(s, wire, 999)
    assert [type(e) for e in got] == [BadRequest, Request]


def test_duplicate_cookie_in_flight_is_fatal():
    s, c = connected()
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        feed(s, raw_request(P.NBD_CMD_FLUSH, cookie=5) + raw_request(P.NBD_CMD_FLUSH, cookie=5))
    # ...but reusing a cookie after its reply is fine.
    s, c = connected()
    feed(s, raw_request(P.NBD_CMD_FLUSH, cookie=5))
    s.send(Reply(5))
    assert len(feed(s, raw_request(P.NBD_CMD_FLUSH, cookie=5))) == 1


def test_eof_mid_message_and_clean_disc():
    s, c = connected()
    s.receive_data(raw_request(P.NBD_CMD_WRITE, length=100)[:20])
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        s.next_event()
    s, c = connected()
    s.receive_data(b"")
    assert events(s) == [ConnectionClosed(clean=False)]
    s, c = connected()
    feed(s, c.send(Disconnect()) + b"ignored garbage after DISC")
    s.receive_data(b"")
    assert events(s) == [ConnectionClosed(clean=True)]


def test_client_rejects_bad_replies():
    for wire, match in [
        (P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, 999), "not in flight"),
        (P.SIMPLE_REPLY.pack(0x11223344, 0, 1), "bad reply magic"),
        (P.STRUCTURED_REPLY.pack(P.NBD_STRUCTURED_REPLY_MAGIC, 1, 1, 1, 0), "structured"),
    ]:
        s, c = connected()
        c.send(Request(P.NBD_CMD_READ, 0, 1, 0, 4))
        with pytest.raises(RemoteProtocolError, match=match):
            feed(c, wire, 3)
        with pytest.raises(RemoteProtocolError):
            c.next_event()


def test_client_eof_after_disc_is_clean():
    s, c = connected()
    c.send(Disconnect())
    c.receive_data(b"")
    assert events(c) == [ConnectionClosed(clean=True)]
    s, c = connected()
    c.receive_data(b"")
    assert events(c) == [ConnectionClosed(clean=False)]


# -- the control channel: NBD_OPT_X_REPLFS, replfs's private extension --------------------
def test_private_option_numbers_are_not_the_documents():
    assert P.NBD_OPT_X_REPLFS == 0x52504C46 == int.from_bytes(b"RPLF", "big")
    assert P.NBD_REP_X_REPLFS < P.NBD_REP_FLAG_ERROR
    spec_options = {v for k, v in vars(P).items() if k.startswith("NBD_OPT_") and k != "NBD_OPT_X_REPLFS"}
    spec_replies = {v for k, v in vars(P).items() if k.startswith("NBD_REP_") and k != "NBD_REP_X_REPLFS"}
    assert P.NBD_OPT_X_REPLFS not in spec_options and P.NBD_REP_X_REPLFS not in spec_replies
    assert P.option_name(P.NBD_OPT_X_REPLFS) == "NBD_OPT_X_REPLFS"
    assert P.reply_name(P.NBD_REP_X_REPLFS) == "NBD_REP_X_REPLFS"
    assert P.MAX_CONTROL_PAYLOAD == 4 * 1024 * 1024


@pytest.mark.parametrize("step", [None, 1, 3, 7])
def test_control_calls_stay_in_option_haggling(step):
    s, c = greet(step, control=True)
    for i in range(3):
        request = b'{"op":"hello","n":%d}' % i
        assert ask(s, c, OptPrivate(request), step) == OptPrivate(request)
        assert s.pending_option == P.NBD_OPT_X_REPLFS
        assert answer(s, c, PrivateReply(b'{"ok":true}'), step) == [PrivateReply(b'{"ok":true}')]
        assert (s.state, c.state) == (State.OPTIONS, State.OPTIONS)
    # an empty payload is framed too, and a refusal keeps the connection
    assert ask(s, c, OptPrivate(b""), step) == OptPrivate(b"")
    assert answer(s, c, PrivateReply(b""), step) == [PrivateReply(b"")]
    ask(s, c, OptPrivate(b"{}"), step)
    refusal = OptionError(P.NBD_REP_ERR_POLICY, "split brain: generation 7 > 5 (ü)")
    assert answer(s, c, refusal, step) == [OptionError(P.NBD_REP_ERR_POLICY, refusal.message, P.NBD_OPT_X_REPLFS)]
    # the same connection ends politely
    ask(s, c, OptAbort(), step)
    assert answer(s, c, OptAck(), step) == [OptAck()]
    assert (s.state, c.state) == (State.CLOSED, State.CLOSED)


@pytest.mark.parametrize("chunk", [65521, 1 << 20])
def test_control_payload_of_4_mib_both_ways(chunk):
    s, c = greet(control=True)
    big = bytes(range(256)) * (P.MAX_CONTROL_PAYLOAD // 256)
    assert len(big) == P.MAX_CONTROL_PAYLOAD
    parts = c.send_parts(OptPrivate(big))
    assert len(parts) == 2 and parts[1] is big  # not concatenated
    assert feed(s, b"".join(parts), chunk) == [OptPrivate(big)]
    parts = s.send_parts(PrivateReply(big))
    assert len(parts) == 2 and parts[1] is big
    assert feed(c, b"".join(parts), chunk) == [PrivateReply(big)]


def test_control_payload_over_the_limit_is_fatal():
    s, c = greet(control=True)
    with pytest.raises(RemoteProtocolError, match="limit"):
        feed(s, struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_X_REPLFS, P.MAX_CONTROL_PAYLOAD + 1))
    # without control, the usual 64 KiB limit, as for any unknown option
    s, c = greet()
    with pytest.raises(RemoteProtocolError, match="limit"):
        feed(s, struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_X_REPLFS, P.MAX_OPTION_LENGTH + 1))
    s, c = greet(control=True)
    c.send(OptPrivate(b"{}"))
    hdr = P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, P.NBD_OPT_X_REPLFS, P.NBD_REP_X_REPLFS,
                                     P.MAX_CONTROL_PAYLOAD + 1)
    with pytest.raises(RemoteProtocolError, match="too large"):
        feed(c, hdr)


def test_plain_server_answers_the_control_option_unsupported():
    """What qemu-nbd and nbdkit do; and our server core without control=True."""
    s, c = greet()
    assert ask(s, c, OptPrivate(b'{"op":"hello"}'), 1) == OptUnknown(P.NBD_OPT_X_REPLFS, b'{"op":"hello"}')
    got = answer(s, c, OptionError(P.NBD_REP_ERR_UNSUP, "unsupported"), 1)
    assert got == [OptionError(P.NBD_REP_ERR_UNSUP, "unsupported", P.NBD_OPT_X_REPLFS)]
    assert ask(s, c, OptGo("disk")) == OptGo("disk")  # and the connection goes on
    # with control=True every other unknown option is still just unknown
    s, c = greet(control=True)
    assert feed(s, raw_option(99, b"xyz"), 1) == [OptUnknown(99, b"xyz")]


def test_client_rejects_other_replies_to_the_control_option():
    hdr = P.OPTION_REPLY_HEADER.pack
    for rtype in (P.NBD_REP_ACK, P.NBD_REP_SERVER, P.NBD_REP_INFO):
        s, c = greet(control=True)
        c.send(OptPrivate(b"{}"))
        with pytest.raises(RemoteProtocolError, match="NBD_OPT_X_REPLFS"):
            feed(c, hdr(P.OPTION_REPLY_MAGIC, P.NBD_OPT_X_REPLFS, rtype, 0))


def test_control_message_codec_and_errors():
    from replfs.nbd.control import decode_message, encode_message, fit_message

    msg = {"op": "digest", "ranges": [[0, 4096]], "name": "dïsk"}
    assert decode_message(encode_message(msg)) == msg
    assert encode_message({"a": [1, 2]}) == b'{"a":[1,2]}'
    for bad in (b"[1]", b"\xff", b"{", b'"x"', b"null"):
        with pytest.raises(ValueError):
            decode_message(bad)
    with pytest.raises(TypeError):
        encode_message([1])
    with pytest.raises(ValueError):
        encode_message({"x": float("nan")})
    assert fit_message("split brain: x") == "split brain: x"
    long = fit_message("é" * 5000)
    assert len(long.encode()) <= P.MAX_STRING and long.endswith("...")
    assert fit_message("a\0b") == "a\\0b"  # an option error carries no NUL
    e = ControlRefused(P.NBD_REP_ERR_POLICY, "split brain: x")
    assert (e.code, e.message) == (P.NBD_REP_ERR_POLICY, "split brain: x") and "split brain: x" in str(e)
    for code in (P.NBD_REP_ACK, P.NBD_REP_X_REPLFS, P.NBD_REP_ERR_UNSUP):
        with pytest.raises(ValueError):
            ControlRefused(code, "no")
    assert ControlUnsupported("Unsupported option").code == P.NBD_REP_ERR_UNSUP


# -- our own mistakes: LocalProtocolError -------------------------------------------
def _server_asked(option=OptList()):
    s, c = greet()
    ask(s, c, option)
    return s


def _server_asked_control(option):
    s, c = greet(control=True)
    ask(s, c, option)
    return s


def _client_asking(option=OptList()):
    s, c = greet()
    c.send(option)
    return c


def _client_greeted():
    c = ClientConnection()
    feed(c, ServerConnection().send(Greeting()))
    return c


def _greeted_server():
    s = ServerConnection()
    s.send(Greeting())
    return s


def _server_with(*requests):
    """A server in transmission with ``requests`` received (and in flight)."""
    s, c = connected()
    feed(s, b"".join(c.send(r) for r in requests))
    return s


def _client_with(*requests):
    s, c = connected()
    for r in requests:
        c.send(r)
    return c


def _client_after_disc():
    c = _client_with()
    c.send(Disconnect())
    return c


READ_10 = Request(P.NBD_CMD_READ, 0, 1, 0, 10)
FLUSH_4 = Request(P.NBD_CMD_FLUSH, 0, 4, 0, 0)

# Table: how to reach a connection -> a call that the protocol forbids there.
LOCAL_ERROR_CASES = [
    ("read-before-greeting", ServerConnection, lambda s: s.next_event()),
    ("greeting-twice", _greeted_server, lambda s: s.send(Greeting())),
    ("answer-without-option", _greeted_server, lambda s: s.send(ExportInfo(1, 0))),
    ("exportinfo-answers-list", _server_asked, lambda s: s.send(ExportInfo(1, 0))),
    ("exportlist-answers-go", lambda: _server_asked(OptGo("x")), lambda s: s.send(ExportList(("x",)))),
    ("not-an-error-type", _server_asked, lambda s: s.send(OptionError(P.NBD_REP_ACK))),
    ("bare-ack-not-abort", _server_asked, lambda s: s.send(OptAck())),
    ("server-sends-client-event", _server_asked, lambda s: s.send(OptList())),
    ("private-reply-answers-list", _server_asked, lambda s: s.send(PrivateReply(b"{}"))),
    ("private-reply-without-control", lambda: _server_asked(OptUnknown(P.NBD_OPT_X_REPLFS, b"{}")),
     lambda s: s.send(PrivateReply(b"{}"))),
    ("private-reply-too-large", lambda: _server_asked_control(OptPrivate(b"{}")),
     lambda s: s.send(PrivateReply(bytes(P.MAX_CONTROL_PAYLOAD + 1)))),
    ("private-request-too-large", lambda: greet()[1], lambda c: c.send(OptPrivate(bytes(P.MAX_CONTROL_PAYLOAD + 1)))),
    ("error-message-too-long", _server_asked, lambda s: s.send(OptionError(P.NBD_REP_ERR_POLICY, "x" * 5000))),
    ("export-size-out-of-range", lambda: _server_asked(OptGo("x")), lambda s: s.send(ExportInfo(1 << 64, 0))),
    ("client-flags-not-offered", _client_greeted, lambda c: c.send(ClientFlags(4))),
    ("client-flags-twice", lambda: greet()[1], lambda c: c.send(ClientFlags(1))),
    ("request-in-handshake", lambda: greet()[1], lambda c: c.send(Request(P.NBD_CMD_READ, 0, 1, 0, 1))),
    ("two-options-at-once", _client_asking, lambda c: c.send(OptGo("x"))),
    ("export-name-too-long", lambda: greet()[1], lambda c: c.send(OptGo("x" * 5000))),
    ("export-name-with-nul", lambda: greet()[1], lambda c: c.send(OptExportName("a\0b"))),
    ("client-sends-server-event", lambda: greet()[1], lambda c: c.send(OptAck())),
    ("receive-after-eof", lambda: greet()[1], lambda c: (c.receive_data(b""), c.receive_data(b"x"))),
    ("payload-received-without-view", _server_with, lambda s: s.payload_received(1)),
    ("reply-without-request", _server_with, lambda s: s.send(Reply(1))),
    ("read-reply-too-short", lambda: _server_with(READ_10), lambda s: s.send(Reply(1, 0, b"short"))),
    ("data-on-flush-reply", lambda: _server_with(FLUSH_4), lambda s: s.send(Reply(4, 0, b"data"))),
    ("cookie-in-flight", lambda: _client_with(READ_10), lambda c: c.send(READ_10)),
    ("write-length-mismatch", _client_with, lambda c: c.send(Request(P.NBD_CMD_WRITE, 0, 2, 0, 10, b"abc"))),
    ("data-on-flush", _client_with, lambda c: c.send(Request(P.NBD_CMD_FLUSH, 0, 3, 0, 0, b"data"))),
    ("request-after-disc", _client_after_disc, lambda c: c.send(FLUSH_4)),
]


@pytest.mark.parametrize("make,call", [c[1:] for c in LOCAL_ERROR_CASES], ids=[c[0] for c in LOCAL_ERROR_CASES])
def test_local_protocol_error_breaks_the_connection(make, call):
    """As in h11: our own mistake moves the connection to ERROR for good."""
    conn = make()
    assert conn.state is not State.ERROR
    with pytest.raises(LocalProtocolError) as info:
        call(conn)
    assert info.value.errno_hint == errno.EINVAL
    assert conn.state is State.ERROR
    with pytest.raises(LocalProtocolError) as again:
        conn.next_event()
    assert again.value is info.value  # the first error, again
    with pytest.raises(LocalProtocolError, match="broken"):
        conn.send(Greeting() if isinstance(conn, ServerConnection) else OptList())


def test_remote_protocol_error_hints_and_base_class():
    s, c = connected()
    with pytest.raises(RemoteProtocolError) as info:
        feed(s, raw_request(P.NBD_CMD_READ, magic=1))
    assert info.value.errno_hint == errno.EPROTO and s.state is State.ERROR and s.closed
    s, c = connected()
    s.receive_data(raw_request(P.NBD_CMD_READ)[:5])
    s.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="middle") as info:
        s.next_event()
    assert info.value.errno_hint == errno.ECONNRESET
    with pytest.raises(TypeError):
        ProtocolError("whose fault?")


# -- the state table (Rule 1: _state.py) -------------------------------------------------
def test_state_table_has_no_unreachable_or_unused_state():
    used = {State.ERROR}
    for role, table in TRANSITIONS.items():
        states = set(table) | {new for row in table.values() for new in row.values()}
        seen = {INITIAL_STATE[role]}
        todo = [INITIAL_STATE[role]]
        while todo:
            for new in table.get(todo.pop(), {}).values():
                if new not in seen:
                    seen.add(new)
                    todo.append(new)
        assert seen == states, role
        used |= states
        for state in State:
            assert next_state(role, state, Trigger.BROKE) is State.ERROR
    assert used == set(State)
    with pytest.raises(LocalProtocolError, match="out of place"):
        next_state(SERVER, State.TRANSMISSION, Trigger.OPTION)


def test_rule_1_only_transition_changes_the_state():
    """connection.py assigns ``_state`` in __init__ and _transition only, and
    raises protocol errors only through the helpers that break the
    connection."""
    source = Path(connection.__file__).read_text()
    assert len(re.findall(r"\bself\._state = ", source)) == 2
    assert "raise LocalProtocolError(" not in source and "raise RemoteProtocolError(" not in source


def test_states_seen_through_a_session():
    s, c = ServerConnection(), ClientConnection()
    assert (s.state, c.state) == (State.SEND_GREETING, State.GREETING)
    c.receive_data(s.send(Greeting()))
    assert c.next_event() == Greeting() and (s.state, c.state) == (State.FLAGS, State.SEND_FLAGS)
    s.receive_data(c.send(ClientFlags()))
    assert s.next_event() == ClientFlags() and (s.state, c.state) == (State.OPTIONS, State.OPTIONS)
    s.receive_data(c.send(OptGo("d")))
    assert type(s.next_event()) is OptGo and (s.state, c.state) == (State.OPTION_REPLY, State.OPTION_REPLY)
    c.receive_data(s.send(ExportInfo(1, 0)))
    assert type(c.next_event()) is ExportInfo and (s.state, c.state) == (State.TRANSMISSION, State.TRANSMISSION)
    s.receive_data(c.send(Disconnect()))
    assert s.next_event() == Disconnect() and (s.state, c.state) == (State.CLOSED, State.DISC_SENT)
    assert c.disconnect_sent and not c.in_transmission


# -- fuzzing -----------------------------------------------------------------------------
def drive_server(data: bytes, chunks: list[int], *, handshake: bytes = b"", control: bool = False) -> None:
    """Run a server core the way the real server does over ``data``.  A
    RemoteProtocolError (the fuzzed peer's fault) ends it quietly; anything
    else fails the test."""
    with contextlib.suppress(RemoteProtocolError):
        _serve_stream(handshake + data, chunks, control)


def _serve_stream(stream: bytes, chunks: list[int], control: bool = False) -> None:
    s = ServerConnection(control=control)
    s.send(Greeting())
    pos = 0
    i = 0
    while True:
        if pos >= len(stream):
            s.receive_data(b"")
        else:
            n = chunks[i % len(chunks)] if chunks else len(stream)
            i += 1
            view = s.payload_view()
            if view is not None and i % 2:
                n = min(n, len(view), len(stream) - pos)
                view[:n] = stream[pos : pos + n]
                s.payload_received(n)
            else:
                s.receive_data(stream[pos : pos + n])
            pos += n
        while True:
            ev = s.next_event()
            t = type(ev)
            if ev is NEED_DATA:
                break
            if t is ConnectionClosed:
                return
            if ev is PAUSED:
                raise AssertionError("paused without a pending answer")
            if t in (OptGo, OptExportName, OptInfo):
                if ev.name == "disk":
                    s.send(ExportInfo(SIZE, FLAGS, BLOCK))
                else:
                    s.send(OptionError(P.NBD_REP_ERR_UNKNOWN, "unknown"))
            elif t is OptList:
                s.send(ExportList(("disk",)))
            elif t is OptAbort:
                s.send(OptAck())
            elif t is OptPrivate:
                s.send(PrivateReply(ev.payload))
            elif t in (OptUnknown, OptInvalid):
                s.send(OptionError(P.NBD_REP_ERR_UNSUP if t is OptUnknown else P.NBD_REP_ERR_INVALID))
            elif t is Request:
                data_out = bytes(ev.length) if ev.command == P.NBD_CMD_READ else None
                s.send(Reply(ev.cookie, 0, data_out))
            elif t is BadRequest:
                s.send(Reply(ev.cookie, ev.error))
            elif t in (ClientFlags, Disconnect):
                pass
            else:
                raise AssertionError(f"unexpected event {ev!r}")
        if pos >= len(stream):
            s.receive_data(b"")
            ev = s.next_event()
            assert type(ev) is ConnectionClosed or ev is PAUSED, ev
            return


HANDSHAKE = struct.pack(">I", 3) + raw_option(P.NBD_OPT_GO, go_data(b"disk"))

# Fragments that look like protocol messages with random fields.
fragment = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda o, d: raw_option(o, d), st.integers(0, 12), st.binary(max_size=30)),
    st.builds(lambda d: raw_option(P.NBD_OPT_X_REPLFS, d), st.binary(max_size=30)),
    st.builds(lambda n, k: raw_option(P.NBD_OPT_GO, go_data(n, k)), st.sampled_from([b"disk", b"x", b""]),
              st.lists(st.integers(0, 5), max_size=3)),
    st.builds(
        lambda cmd, fl, ck, off, ln, extra: raw_request(cmd, ck, off, ln, fl) + extra,
        st.integers(0, 9),
        st.integers(0, 0x1F),
        st.integers(0, 5),
        st.integers(0, 1 << 40),
        st.sampled_from([0, 1, 7, 512, 4096, 20000, P.MAX_BLOCK_SIZE + 1, 1 << 31]),
        st.binary(max_size=64),
    ),
)


#: Each fuzz test: 300 examples, no deadline (the machine is shared).
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunk_sizes(largest: int, most: int = 5):
    """How many bytes each ``receive_data`` call gets, in turn."""
    return st.lists(st.integers(1, largest), min_size=1, max_size=most)


@fuzz
@given(st.binary(max_size=600), chunk_sizes(64))
def test_fuzz_server_random_bytes_from_start(data, chunks):
    drive_server(data, chunks)


@fuzz
@given(st.lists(fragment, max_size=12), chunk_sizes(300))
def test_fuzz_server_structured_fragments(frags, chunks):
    drive_server(b"".join(frags), chunks)


@fuzz
@given(st.lists(fragment, max_size=12), chunk_sizes(300))
def test_fuzz_server_with_control_channel(frags, chunks):
    drive_server(b"".join(frags), chunks, handshake=struct.pack(">I", 3), control=True)


@fuzz
@given(st.lists(fragment, max_size=12), chunk_sizes(5000))
def test_fuzz_server_in_transmission(frags, chunks):
    drive_server(b"".join(frags), chunks, handshake=HANDSHAKE)


@fuzz
@given(st.binary(max_size=400), chunk_sizes(50, 4))
def test_fuzz_client_replies(data, chunks):
    s, c = connected()
    c.send(Request(P.NBD_CMD_READ, 0, 1, 0, 8))
    c.send(Request(P.NBD_CMD_WRITE, 0, 2, 0, 3, b"abc"))
    stream = P.SIMPLE_REPLY.pack(P.NBD_SIMPLE_REPLY_MAGIC, 0, 2) + data
    with contextlib.suppress(RemoteProtocolError):  # the fuzzed server's fault
        pos = 0
        i = 0
        while pos < len(stream):
            n = chunks[i % len(chunks)]
            i += 1
            c.receive_data(stream[pos : pos + n])
            pos += n
            events(c)
        c.receive_data(b"")
        events(c)
