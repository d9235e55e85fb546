"""Sans-IO NBD protocol state machines, one per role.

Design note
-----------
In the style of h11: a :class:`ServerConnection` or :class:`ClientConnection`
never touches a socket.  Bytes from the peer go in with
:meth:`receive_data` (``b""`` means end of file); :meth:`next_event` returns
one parsed event, :data:`NEED_DATA` when more bytes are needed, or
:data:`PAUSED` when the connection waits for *us* to answer (an option reply
during the handshake).  Events to the peer go through :meth:`send`, which
returns the bytes to write (``send_parts`` returns them as a list so a large
payload is never concatenated).  Events are frozen dataclasses and flow the
same way in both roles: the client *sends* ``OptGo`` and the server
*receives* it; the server sends ``ExportInfo`` and the client receives it.

Errors say whose fault they are: :class:`RemoteProtocolError` when the peer
broke the protocol (the caller should drop the connection), and
:class:`LocalProtocolError` when our own code asked for something the
protocol forbids.  Once a RemoteProtocolError was raised the connection stays
broken and every later ``next_event`` raises it again.

Scope (see the NBD document, ``doc/proto.md``): fixed newstyle handshake with
``NBD_FLAG_NO_ZEROES``; options ``NBD_OPT_EXPORT_NAME``, ``NBD_OPT_GO``,
``NBD_OPT_INFO`` (``NBD_INFO_EXPORT`` and ``NBD_INFO_BLOCK_SIZE``),
``NBD_OPT_LIST`` and ``NBD_OPT_ABORT``; every other option reaches the
server as :class:`OptUnknown` so that it can answer ``NBD_REP_ERR_UNSUP``
("Baseline": servers MUST reply to what they do not implement with it and
keep parsing).  Transmission uses simple replies only (we never accept
``NBD_OPT_STRUCTURED_REPLY``), so a READ reply's payload length is known only
from the request it answers: both roles keep a table of requests in flight
keyed by cookie (the document's "handle").

Hot path: the transmission phase is the replication path (every VM write),
so headers are parsed with precompiled ``struct.Struct.unpack_from`` straight
from a ``bytearray`` buffer, consumed bytes are dropped with ``del buf[:n]``
(O(1) at the front of a CPython bytearray), and a small WRITE payload is
taken with a single slice copy.  A payload that is not yet complete and is
larger than :data:`DIRECT_PAYLOAD_THRESHOLD` gets its own ``bytearray`` that
later data is copied into directly; the I/O layer may even ``recv_into`` it
via :meth:`payload_view` / :meth:`payload_received`, so a 1 MiB WRITE is
copied once from the kernel and never again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from replfs.errors import ReplfsError
from replfs.nbd import proto as P

__all__ = [
    "NEED_DATA",
    "PAUSED",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Greeting",
    "ClientFlags",
    "OptExportName",
    "OptGo",
    "OptInfo",
    "OptList",
    "OptAbort",
    "OptUnknown",
    "OptInvalid",
    "ExportInfo",
    "ExportList",
    "OptionError",
    "OptAck",
    "Request",
    "BadRequest",
    "Disconnect",
    "Reply",
    "ConnectionClosed",
    "ServerConnection",
    "ClientConnection",
    "DIRECT_PAYLOAD_THRESHOLD",
]


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"
    PAUSED = "PAUSED"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


NEED_DATA = _Sentinel.NEED_DATA
PAUSED = _Sentinel.PAUSED

#: An incomplete payload at least this large gets a buffer of its own.
DIRECT_PAYLOAD_THRESHOLD = 16 * 1024


# -- errors ---------------------------------------------------------------------
class ProtocolError(ReplfsError):
    """The NBD protocol was broken; see the subclasses for whose fault."""


class LocalProtocolError(ProtocolError):
    """Our side tried to send or do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: drop it."""


# -- events: handshake ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Greeting:
    """S->C: NBDMAGIC, IHAVEOPT and the handshake flags."""

    handshake_flags: int = P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES


@dataclass(frozen=True, slots=True)
class ClientFlags:
    """C->S: the 32-bit client flags."""

    flags: int = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES


@dataclass(frozen=True, slots=True)
class OptExportName:
    """C->S: NBD_OPT_EXPORT_NAME (enters transmission, cannot be refused)."""

    name: str = ""
    option = P.NBD_OPT_EXPORT_NAME


@dataclass(frozen=True, slots=True)
class OptGo:
    """C->S: NBD_OPT_GO with the NBD_INFO_* types the client asks for."""

    name: str = ""
    info_requests: tuple[int, ...] = ()
    option = P.NBD_OPT_GO


@dataclass(frozen=True, slots=True)
class OptInfo:
    """C->S: NBD_OPT_INFO (like GO but stays in the handshake)."""

    name: str = ""
    info_requests: tuple[int, ...] = ()
    option = P.NBD_OPT_INFO


@dataclass(frozen=True, slots=True)
class OptList:
    """C->S: NBD_OPT_LIST."""

    option = P.NBD_OPT_LIST


@dataclass(frozen=True, slots=True)
class OptAbort:
    """C->S: NBD_OPT_ABORT (soft disconnect during the handshake)."""

    option = P.NBD_OPT_ABORT


@dataclass(frozen=True, slots=True)
class OptUnknown:
    """C->S: any option this implementation does not handle, raw."""

    option: int
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class OptInvalid:
    """Received by a server: a known option whose data is malformed.

    The server should answer ``OptionError(NBD_REP_ERR_INVALID, ...)``.
    """

    option: int
    reason: str


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """S->C: success of NBD_OPT_GO / NBD_OPT_INFO / NBD_OPT_EXPORT_NAME.

    ``block_size`` is ``(minimum, preferred, maximum)`` when the server sent
    (or is to send) NBD_INFO_BLOCK_SIZE, else None.
    """

    size: int
    transmission_flags: int
    block_size: tuple[int, int, int] | None = None


@dataclass(frozen=True, slots=True)
class ExportList:
    """S->C: the answer to NBD_OPT_LIST (one NBD_REP_SERVER per name)."""

    names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class OptionError:
    """S->C: an error reply to the current option.

    When received by a client, ``option`` says which option it answers.
    """

    reply_type: int
    message: str = ""
    option: int = 0

    @property
    def reply_name(self) -> str:
        return P.reply_name(self.reply_type)


@dataclass(frozen=True, slots=True)
class OptAck:
    """S->C: a bare NBD_REP_ACK (the answer to NBD_OPT_ABORT)."""

    option: int = P.NBD_OPT_ABORT


# -- events: transmission ------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Request:
    """C->S: one request.  ``data`` is the WRITE payload (bytes-like)."""

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: object = None


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Received by a server: a well-framed request it must fail.

    The server answers with ``Reply(cookie, error)``; the connection goes on
    ("Error values": unknown commands and flags get NBD_EINVAL).
    """

    cookie: int
    command: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """C->S: NBD_CMD_DISC; no reply follows."""


@dataclass(frozen=True, slots=True)
class Reply:
    """S->C: a simple reply; ``error`` is an NBD error value (0 = success).

    ``data`` is the READ payload when the request was a successful READ.
    """

    cookie: int
    error: int = 0
    data: object = None


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end.  ``clean`` after NBD_CMD_DISC / NBD_OPT_ABORT."""

    clean: bool = False


# -- shared machinery -----------------------------------------------------------
_REQUEST_unpack_from = P.REQUEST.unpack_from
_REQUEST_pack = P.REQUEST.pack
_SIMPLE_REPLY_unpack_from = P.SIMPLE_REPLY.unpack_from
_SIMPLE_REPLY_pack = P.SIMPLE_REPLY.pack
_REQUEST_MAGIC = P.NBD_REQUEST_MAGIC
_SIMPLE_REPLY_MAGIC = P.NBD_SIMPLE_REPLY_MAGIC
_CMD_READ = P.NBD_CMD_READ
_CMD_WRITE = P.NBD_CMD_WRITE
_CMD_DISC = P.NBD_CMD_DISC
_CMD_WRITE_ZEROES = P.NBD_CMD_WRITE_ZEROES

#: Command flags a server accepts per command ("Command flags": FUA is valid
#: for all commands; NO_HOLE only for WRITE_ZEROES).
_ALLOWED_FLAGS = {
    P.NBD_CMD_READ: P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_WRITE: P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_FLUSH: P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_TRIM: P.NBD_CMD_FLAG_FUA,
    P.NBD_CMD_WRITE_ZEROES: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE,
}
#: Commands whose length is bounded by the maximum block size ("Block size
#: constraints": READ, WRITE, CACHE and WRITE_ZEROES).
_LENGTH_LIMITED = frozenset({P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_WRITE_ZEROES})


class _St(enum.Enum):
    FLAGS = 1  # server: waiting for client flags
    GREETING = 2  # client: waiting for the server greeting
    SEND_FLAGS = 3  # client: must send its flags
    OPTIONS = 4  # server: waiting for an option / client: may send one
    OPTION_REPLY = 5  # server: must answer / client: waiting for the answer
    TRANSMISSION = 6
    CLOSED = 7  # no more traffic expected (after DISC, ABORT, refusal)
    ERROR = 8


def _decode_string(raw: bytes, what: str) -> str:
    """A protocol string ("Conventions"): UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > P.MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes long (limit {P.MAX_STRING})")
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL character")
    return text


def _encode_string(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > P.MAX_STRING or "\0" in text:
        raise LocalProtocolError(f"{what} must be at most {P.MAX_STRING} UTF-8 bytes without NUL")
    return raw


class _Connection:
    """Buffering and payload handling common to both roles."""

    def __init__(self, *, max_payload: int = P.MAX_BLOCK_SIZE):
        self._buf = bytearray()
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self.max_payload = max_payload
        # An incomplete large payload being assembled in place.
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_filled = 0
        self._payload_done = None  # callable(payload) -> event
        #: cookie -> (command, length) of requests in flight.
        self._inflight: dict[int, tuple[int, int]] = {}

    # -- input ---------------------------------------------------------------
    def receive_data(self, data) -> None:
        """Feed bytes from the peer; ``b""`` (or None) means end of file."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after end of file")
        if self._payload is not None:
            need = len(self._payload) - self._payload_filled
            n = len(data)
            if n <= need:
                self._payload_view[self._payload_filled : self._payload_filled + n] = data
                self._payload_filled += n
                return
            self._payload_view[self._payload_filled :] = memoryview(data)[:need]
            self._payload_filled += need
            self._buf += memoryview(data)[need:]
            return
        self._buf += data

    def payload_view(self) -> memoryview | None:
        """Where the rest of a large payload goes, for ``recv_into``; or None.

        After writing ``n`` bytes into it, call :meth:`payload_received`.
        """
        if self._payload is None or self._payload_filled >= len(self._payload):
            return None
        return self._payload_view[self._payload_filled :]

    def payload_received(self, nbytes: int) -> None:
        if self._payload is None or nbytes < 0 or self._payload_filled + nbytes > len(self._payload):
            raise LocalProtocolError("payload_received() does not match payload_view()")
        self._payload_filled += nbytes

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Unparsed bytes and whether end of file was seen (like h11)."""
        return bytes(self._buf), self._eof

    @property
    def in_flight(self) -> int:
        """Requests sent (client) / received (server) and not yet answered."""
        return len(self._inflight)

    def _start_payload(self, length: int, have: int, done) -> None:
        """Move the ``have`` buffered bytes into a fresh payload buffer."""
        payload = bytearray(length)
        view = memoryview(payload)
        if have:
            view[:have] = self._buf[:have]
            del self._buf[:have]
        self._payload = payload
        self._payload_view = view
        self._payload_filled = have
        self._payload_done = done

    def _finish_payload(self):
        if self._payload_filled < len(self._payload):
            return None
        payload = self._payload
        done = self._payload_done
        self._payload_view.release()
        self._payload = self._payload_view = self._payload_done = None
        self._payload_filled = 0
        return done(payload)

    def _fail(self, message: str) -> RemoteProtocolError:
        self._state = _St.ERROR
        self._error = RemoteProtocolError(message)
        return self._error

    def _eof_event(self):
        """What to return when the buffer cannot yield an event."""
        if not self._eof:
            return NEED_DATA
        if self._buf or self._payload is not None:
            raise self._fail("connection closed in the middle of a message")
        return ConnectionClosed(clean=self._state is _St.CLOSED)

    def send(self, event) -> bytes:
        """The bytes that transmit ``event`` (see :meth:`send_parts`)."""
        parts = self.send_parts(event)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def send_parts(self, event) -> list:  # pragma: no cover - overridden
        raise NotImplementedError


# -- server role -----------------------------------------------------------------
class ServerConnection(_Connection):
    """The server's half of one NBD connection.

    Typical use: ``send(Greeting())``, then loop on ``next_event()``; answer
    every option event with ``ExportInfo`` / ``ExportList`` / ``OptionError``
    / ``OptAck``; in transmission answer each ``Request`` or ``BadRequest``
    with a ``Reply``.
    """

    our_role = "server"

    def __init__(self, *, max_payload: int = P.MAX_BLOCK_SIZE):
        super().__init__(max_payload=max_payload)
        self._state = _St.FLAGS
        self._greeted = False
        self.handshake_flags = 0
        self.client_flags = 0
        self.no_zeroes = False
        #: The option waiting for our answer (NBD_OPT_* value) or None.
        self.pending_option: int | None = None
        #: The export name that entered transmission.
        self.export_name: str | None = None

    @property
    def in_transmission(self) -> bool:
        return self._state is _St.TRANSMISSION

    @property
    def closed(self) -> bool:
        return self._state in (_St.CLOSED, _St.ERROR)

    # -- receiving ---------------------------------------------------------------
    def next_event(self):
        if self._state is _St.TRANSMISSION:
            return self._next_request()
        if self._state is _St.ERROR:
            raise self._error
        if not self._greeted:
            raise LocalProtocolError("send(Greeting()) before reading from the client")
        if self._state is _St.OPTION_REPLY:
            return PAUSED
        if self._state is _St.FLAGS:
            return self._next_flags()
        if self._state is _St.OPTIONS:
            return self._next_option()
        # CLOSED: ignore anything further from a peer that said goodbye.
        self._buf.clear()
        return self._eof_event()

    def _next_flags(self):
        if len(self._buf) < 4:
            return self._eof_event()
        (flags,) = P.CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[:4]
        known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES
        # "Client flags": the server MUST drop the connection on an unknown
        # flag or one that does not match what it advertised.
        if flags & ~known:
            raise self._fail(f"client sent unknown client flags {flags:#x}")
        if flags & P.NBD_FLAG_C_NO_ZEROES and not self.handshake_flags & P.NBD_FLAG_NO_ZEROES:
            raise self._fail("client set NBD_FLAG_C_NO_ZEROES which the server did not offer")
        if flags & P.NBD_FLAG_C_FIXED_NEWSTYLE and not self.handshake_flags & P.NBD_FLAG_FIXED_NEWSTYLE:
            raise self._fail("client set NBD_FLAG_C_FIXED_NEWSTYLE which the server did not offer")
        self.client_flags = flags
        self.no_zeroes = bool(flags & P.NBD_FLAG_C_NO_ZEROES)
        self._state = _St.OPTIONS
        return ClientFlags(flags)

    def _next_option(self):
        buf = self._buf
        if len(buf) < 16:
            return self._eof_event()
        magic, option, length = P.OPTION_HEADER.unpack_from(buf)
        if magic != P.IHAVEOPT:
            raise self._fail(f"bad option magic {magic:#x} (expected IHAVEOPT)")
        if length > P.MAX_OPTION_LENGTH:
            raise self._fail(
                f"{P.option_name(option)} carries {length} bytes of data (limit {P.MAX_OPTION_LENGTH})"
            )
        if len(buf) < 16 + length:
            return self._eof_event()
        data = bytes(buf[16 : 16 + length])
        del buf[: 16 + length]
        self._state = _St.OPTION_REPLY
        self.pending_option = option
        return self._parse_option(option, data)

    def _parse_option(self, option: int, data: bytes):
        try:
            if option == P.NBD_OPT_EXPORT_NAME:
                return OptExportName(_decode_string(data, "export name"))
            if option in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
                return self._parse_go(option, data)
            if option == P.NBD_OPT_LIST:
                if data:
                    return OptInvalid(option, "NBD_OPT_LIST must not carry data")
                return OptList()
            if option == P.NBD_OPT_ABORT:
                # "a server SHOULD ignore any data sent by the client"
                return OptAbort()
        except ValueError as exc:
            if option == P.NBD_OPT_EXPORT_NAME:
                # It cannot be answered with an error: terminate the session.
                raise self._fail(f"NBD_OPT_EXPORT_NAME: {exc}") from None
            return OptInvalid(option, str(exc))
        return OptUnknown(option, data)

    @staticmethod
    def _parse_go(option: int, data: bytes):
        # "NBD_OPT_INFO and NBD_OPT_GO": name length, name, count, count x type
        if len(data) < 6:
            return OptInvalid(option, f"{P.option_name(option)} data is too short")
        (namelen,) = P.U32.unpack_from(data)
        if namelen > len(data) - 6:
            return OptInvalid(option, "export name length exceeds the option data")
        name = _decode_string(data[4 : 4 + namelen], "export name")
        (count,) = P.U16.unpack_from(data, 4 + namelen)
        if len(data) != 4 + namelen + 2 + 2 * count:
            return OptInvalid(option, "information request count does not match the option length")
        rest = data[6 + namelen :]
        infos = tuple(P.U16.unpack_from(rest, 2 * i)[0] for i in range(count))
        if option == P.NBD_OPT_GO:
            return OptGo(name, infos)
        return OptInfo(name, infos)

    def _next_request(self):
        if self._payload is not None:
            event = self._finish_payload()
            if event is None:
                return self._eof_event()
            return event
        buf = self._buf
        if len(buf) < 28:
            return self._eof_event()
        magic, flags, command, cookie, offset, length = _REQUEST_unpack_from(buf)
        if magic != _REQUEST_MAGIC:
            # "Request message": nothing after a bad magic can be framed.
            raise self._fail(f"bad request magic {magic:#010x}")
        if command == _CMD_WRITE:
            if length > self.max_payload:
                # "Block size constraints": a payload this large may be
                # deemed a denial of service; we cannot skip it safely.
                raise self._fail(f"NBD_CMD_WRITE of {length} bytes exceeds {self.max_payload}")
            have = len(buf) - 28
            if have < length:
                if length >= DIRECT_PAYLOAD_THRESHOLD:
                    del buf[:28]
                    self._check_cookie(cookie)
                    bad = self._flag_problem(command, flags)

                    def done(payload, _c=cookie, _f=flags, _o=offset, _n=length, _bad=bad):
                        self._inflight[_c] = (_CMD_WRITE, _n)
                        if _bad:
                            return BadRequest(_c, _CMD_WRITE, P.NBD_EINVAL, _bad)
                        return Request(_CMD_WRITE, _f, _c, _o, _n, payload)

                    self._start_payload(length, have, done)
                    return self._next_request()
                return self._eof_event()
            data = buf[28 : 28 + length]
            del buf[: 28 + length]
            if cookie in self._inflight:
                raise self._fail(f"cookie {cookie:#x} is already in flight")
            if flags & ~P.NBD_CMD_FLAG_FUA:
                self._inflight[cookie] = (command, length)
                return BadRequest(cookie, command, P.NBD_EINVAL, self._flag_problem(command, flags))
            self._inflight[cookie] = (command, length)
            return Request(command, flags, cookie, offset, length, data)
        del buf[:28]
        if command == _CMD_DISC:
            # "NBD_CMD_DISC": no reply; nothing may follow.
            self._state = _St.CLOSED
            return Disconnect()
        if cookie in self._inflight:
            raise self._fail(f"cookie {cookie:#x} is already in flight")
        self._inflight[cookie] = (command, length)
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            return BadRequest(cookie, command, P.NBD_EINVAL, f"unsupported {P.command_name(command)}")
        if flags & ~allowed:
            return BadRequest(cookie, command, P.NBD_EINVAL, self._flag_problem(command, flags))
        if length > self.max_payload and command in _LENGTH_LIMITED:
            return BadRequest(
                cookie,
                command,
                P.NBD_EINVAL,
                f"{P.command_name(command)} of {length} bytes exceeds the maximum block size",
            )
        return Request(command, flags, cookie, offset, length, None)

    def _check_cookie(self, cookie: int) -> None:
        if cookie in self._inflight:
            raise self._fail(f"cookie {cookie:#x} is already in flight")

    @staticmethod
    def _flag_problem(command: int, flags: int) -> str | None:
        allowed = _ALLOWED_FLAGS.get(command, 0)
        if flags & ~allowed:
            return f"{P.command_name(command)} with unsupported command flags {flags & ~allowed:#x}"
        return None

    # -- sending -----------------------------------------------------------------
    def send_parts(self, event) -> list:
        t = type(event)
        if t is Reply:
            return self._send_reply(event)
        if self._state is _St.ERROR:
            raise LocalProtocolError("connection is broken")
        if t is Greeting:
            if self._greeted:
                raise LocalProtocolError("greeting already sent")
            self._greeted = True
            self.handshake_flags = event.handshake_flags
            return [P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, event.handshake_flags)]
        if self._state is not _St.OPTION_REPLY:
            raise LocalProtocolError(f"cannot send {t.__name__} now (state {self._state.name})")
        option = self.pending_option
        if t is ExportInfo:
            return self._send_export_info(option, event)
        if t is OptionError:
            if not event.reply_type & P.NBD_REP_FLAG_ERROR:
                raise LocalProtocolError(f"{event.reply_type:#x} is not an error reply type")
            self.pending_option = None
            if option == P.NBD_OPT_EXPORT_NAME:
                # "NBD_OPT_EXPORT_NAME": the server MUST terminate the
                # session; there is no way to send the error.
                self._state = _St.CLOSED
                return [b""]
            self._state = _St.OPTIONS
            msg = _encode_string(event.message, "error message")
            return [P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, event.reply_type, len(msg)) + msg]
        if t is ExportList:
            if option != P.NBD_OPT_LIST:
                raise LocalProtocolError(f"ExportList does not answer {P.option_name(option)}")
            out = []
            for name in event.names:
                raw = _encode_string(name, "export name")
                out.append(
                    P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_SERVER, 4 + len(raw))
                    + P.U32.pack(len(raw))
                    + raw
                )
            out.append(P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_ACK, 0))
            self.pending_option = None
            self._state = _St.OPTIONS
            return [b"".join(out)]
        if t is OptAck:
            if option != P.NBD_OPT_ABORT:
                raise LocalProtocolError("a bare ACK only answers NBD_OPT_ABORT here")
            self.pending_option = None
            self._state = _St.CLOSED
            return [P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_ACK, 0)]
        raise LocalProtocolError(f"a server cannot send {t.__name__}")

    def _send_export_info(self, option, event: ExportInfo) -> list:
        flags = event.transmission_flags | P.NBD_FLAG_HAS_FLAGS
        if not 0 <= event.size < 1 << 64 or flags >= 1 << 16:
            raise LocalProtocolError("export size or transmission flags out of range")
        if option == P.NBD_OPT_EXPORT_NAME:
            out = P.EXPORT_NAME_REPLY.pack(event.size, flags)
            if not self.no_zeroes:
                out += P.EXPORT_NAME_ZEROES
            self._enter_transmission()
            return [out]
        if option not in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
            raise LocalProtocolError(f"ExportInfo does not answer {P.option_name(option)}")
        hdr = P.OPTION_REPLY_HEADER.pack
        magic = P.OPTION_REPLY_MAGIC
        out = [
            hdr(magic, option, P.NBD_REP_INFO, P.INFO_EXPORT.size),
            P.INFO_EXPORT.pack(P.NBD_INFO_EXPORT, event.size, flags),
        ]
        if event.block_size is not None:
            out.append(hdr(magic, option, P.NBD_REP_INFO, P.INFO_BLOCK_SIZE.size))
            out.append(P.INFO_BLOCK_SIZE.pack(P.NBD_INFO_BLOCK_SIZE, *event.block_size))
        out.append(hdr(magic, option, P.NBD_REP_ACK, 0))
        self.pending_option = None
        if option == P.NBD_OPT_GO:
            self._enter_transmission()
        else:
            self._state = _St.OPTIONS
        return [b"".join(out)]

    def _enter_transmission(self) -> None:
        self.pending_option = None
        self._state = _St.TRANSMISSION

    def _send_reply(self, event: Reply) -> list:
        try:
            command, length = self._inflight.pop(event.cookie)
        except KeyError:
            raise LocalProtocolError(f"no request with cookie {event.cookie:#x} is in flight") from None
        header = _SIMPLE_REPLY_pack(_SIMPLE_REPLY_MAGIC, event.error, event.cookie)
        data = event.data
        if command == _CMD_READ and not event.error:
            if data is None or len(data) != length:
                got = None if data is None else len(data)
                raise LocalProtocolError(f"READ reply must carry {length} bytes, not {got}")
            if length == 0:
                return [header]
            return [header, data]
        if data:
            raise LocalProtocolError("only a successful READ reply carries data")
        return [header]


# -- client role -----------------------------------------------------------------
class ClientConnection(_Connection):
    """The client's half of one NBD connection.

    Typical use: wait for ``Greeting``; ``send(ClientFlags(...))``; send one
    option at a time and read its answer (``ExportInfo``, ``ExportList``,
    ``OptionError`` or ``OptAck``); after a successful GO / EXPORT_NAME send
    ``Request`` events with distinct cookies and read ``Reply`` events.
    """

    our_role = "client"

    def __init__(self, *, max_payload: int = P.MAX_BLOCK_SIZE):
        super().__init__(max_payload=max_payload)
        self._state = _St.GREETING
        self.handshake_flags = 0
        self.client_flags = 0
        self.pending_option: int | None = None
        self._infos: dict[int, object] = {}
        self._names: list[str] = []
        self._sent_disc = False
        #: The ExportInfo that entered transmission.
        self.export: ExportInfo | None = None

    @property
    def in_transmission(self) -> bool:
        return self._state is _St.TRANSMISSION

    @property
    def disconnect_sent(self) -> bool:
        return self._sent_disc

    # -- receiving ---------------------------------------------------------------
    def next_event(self):
        if self._state is _St.TRANSMISSION:
            return self._next_reply()
        if self._state is _St.ERROR:
            raise self._error
        if self._state is _St.GREETING:
            return self._next_greeting()
        if self._state is _St.OPTION_REPLY:
            if self.pending_option == P.NBD_OPT_EXPORT_NAME:
                return self._next_export_name_reply()
            return self._next_option_reply()
        if self._state is _St.CLOSED:
            self._buf.clear()
            return self._eof_event()
        # SEND_FLAGS / OPTIONS: the server should be silent now.
        if self._buf:
            raise self._fail("server sent data while no option was pending")
        return self._eof_event() if self._eof else PAUSED

    def _next_greeting(self):
        if len(self._buf) < 18:
            return self._eof_event()
        magic, second, flags = P.GREETING.unpack_from(self._buf)
        if magic != P.NBDMAGIC:
            raise self._fail(f"bad server magic {magic:#x} (expected NBDMAGIC)")
        if second == P.CLISERV_MAGIC:
            raise self._fail("server uses oldstyle negotiation, which is not supported")
        if second != P.IHAVEOPT:
            raise self._fail(f"bad server magic {second:#x} (expected IHAVEOPT)")
        del self._buf[:18]
        self.handshake_flags = flags
        self._state = _St.SEND_FLAGS
        return Greeting(flags)

    def _next_export_name_reply(self):
        need = 10 if self.client_flags & P.NBD_FLAG_C_NO_ZEROES else 134
        if len(self._buf) < need:
            if self._eof and not self._buf:
                # Refused: "If the server is unwilling to allow the export,
                # it MUST terminate the session."
                self._state = _St.CLOSED
                return ConnectionClosed(clean=False)
            return self._eof_event()
        size, flags = P.EXPORT_NAME_REPLY.unpack_from(self._buf)
        del self._buf[:need]
        return self._entered(ExportInfo(size, flags, None))

    def _entered(self, info: ExportInfo) -> ExportInfo:
        self.pending_option = None
        self.export = info
        self._state = _St.TRANSMISSION
        return info

    def _next_option_reply(self):
        buf = self._buf
        while True:
            if len(buf) < 20:
                return self._eof_event()
            magic, option, rtype, length = P.OPTION_REPLY_HEADER.unpack_from(buf)
            if magic != P.OPTION_REPLY_MAGIC:
                raise self._fail(f"bad option reply magic {magic:#x}")
            if option != self.pending_option:
                raise self._fail(
                    f"reply for {P.option_name(option)} while waiting for {P.option_name(self.pending_option)}"
                )
            if length > P.MAX_OPTION_LENGTH:
                raise self._fail(f"option reply of {length} bytes is too large")
            if len(buf) < 20 + length:
                return self._eof_event()
            data = bytes(buf[20 : 20 + length])
            del buf[: 20 + length]
            event = self._option_reply(option, rtype, data)
            if event is not None:
                return event

    def _option_reply(self, option: int, rtype: int, data: bytes):
        if rtype & P.NBD_REP_FLAG_ERROR:
            try:
                message = data.decode("utf-8", "replace")
            except Exception:  # pragma: no cover - decode with replace cannot fail
                message = ""
            self._option_done(_St.OPTIONS)
            return OptionError(rtype, message, option)
        if option in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
            if rtype == P.NBD_REP_INFO:
                self._parse_info(data)
                return None
            if rtype == P.NBD_REP_ACK:
                export = self._infos.get(P.NBD_INFO_EXPORT)
                if export is None:
                    raise self._fail("server acknowledged NBD_OPT_GO/INFO without NBD_INFO_EXPORT")
                info = ExportInfo(export[0], export[1], self._infos.get(P.NBD_INFO_BLOCK_SIZE))
                if option == P.NBD_OPT_GO:
                    self._infos = {}
                    return self._entered(info)
                self._option_done(_St.OPTIONS)
                return info
            raise self._fail(f"unexpected {P.reply_name(rtype)} to {P.option_name(option)}")
        if option == P.NBD_OPT_LIST:
            if rtype == P.NBD_REP_SERVER:
                if len(data) < 4:
                    raise self._fail("NBD_REP_SERVER too short")
                (namelen,) = P.U32.unpack_from(data)
                if namelen > len(data) - 4:
                    raise self._fail("NBD_REP_SERVER name length exceeds the reply")
                self._names.append(data[4 : 4 + namelen].decode("utf-8", "replace"))
                return None
            if rtype == P.NBD_REP_ACK:
                names = tuple(self._names)
                self._option_done(_St.OPTIONS)
                return ExportList(names)
            raise self._fail(f"unexpected {P.reply_name(rtype)} to NBD_OPT_LIST")
        if rtype == P.NBD_REP_ACK:
            self._option_done(_St.CLOSED if option == P.NBD_OPT_ABORT else _St.OPTIONS)
            return OptAck(option)
        # Some other non-error reply to an option we passed through raw:
        # not ours to interpret.
        return None

    def _parse_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise self._fail("NBD_REP_INFO without an information type")
        (itype,) = P.INFO_TYPE.unpack_from(data)
        if itype == P.NBD_INFO_EXPORT:
            if len(data) != P.INFO_EXPORT.size:
                raise self._fail("NBD_INFO_EXPORT must be 12 bytes long")
            _, size, flags = P.INFO_EXPORT.unpack(data)
            self._infos[itype] = (size, flags)
        elif itype == P.NBD_INFO_BLOCK_SIZE:
            if len(data) != P.INFO_BLOCK_SIZE.size:
                raise self._fail("NBD_INFO_BLOCK_SIZE must be 14 bytes long")
            _, bmin, bpref, bmax = P.INFO_BLOCK_SIZE.unpack(data)
            self._infos[itype] = (bmin, bpref, bmax)
        # "The client MUST ignore information replies it does not understand."

    def _option_done(self, state: _St) -> None:
        self.pending_option = None
        self._infos = {}
        self._names = []
        self._state = state

    def _next_reply(self):
        if self._payload is not None:
            event = self._finish_payload()
            if event is None:
                return self._eof_event()
            return event
        buf = self._buf
        if len(buf) < 16:
            if self._eof and not buf and self._sent_disc:
                return ConnectionClosed(clean=True)
            return self._eof_event()
        magic, error, cookie = _SIMPLE_REPLY_unpack_from(buf)
        if magic != _SIMPLE_REPLY_MAGIC:
            if magic == P.NBD_STRUCTURED_REPLY_MAGIC:
                raise self._fail("structured reply received but never negotiated")
            raise self._fail(f"bad reply magic {magic:#010x}")
        entry = self._inflight.get(cookie)
        if entry is None:
            raise self._fail(f"reply for cookie {cookie:#x} which is not in flight")
        command, length = entry
        if command == _CMD_READ and not error and length:
            have = len(buf) - 16
            if have < length:
                if length >= DIRECT_PAYLOAD_THRESHOLD:
                    del buf[:16]
                    del self._inflight[cookie]
                    self._start_payload(length, have, lambda payload, _c=cookie: Reply(_c, 0, payload))
                    return self._next_reply()
                return self._eof_event()
            data = bytes(buf[16 : 16 + length])
            del buf[: 16 + length]
            del self._inflight[cookie]
            return Reply(cookie, 0, data)
        del buf[:16]
        del self._inflight[cookie]
        if command == _CMD_READ and not error:
            return Reply(cookie, 0, b"")
        return Reply(cookie, error, None)

    # -- sending -----------------------------------------------------------------
    def send_parts(self, event) -> list:
        t = type(event)
        if t is Request:
            return self._send_request(event)
        if self._state is _St.ERROR:
            raise LocalProtocolError("connection is broken")
        if t is Disconnect:
            return self._send_request(Request(_CMD_DISC, 0, 0, 0, 0))
        if t is ClientFlags:
            if self._state is not _St.SEND_FLAGS:
                raise LocalProtocolError("client flags are sent once, right after the greeting")
            offered = 0
            if self.handshake_flags & P.NBD_FLAG_FIXED_NEWSTYLE:
                offered |= P.NBD_FLAG_C_FIXED_NEWSTYLE
            if self.handshake_flags & P.NBD_FLAG_NO_ZEROES:
                offered |= P.NBD_FLAG_C_NO_ZEROES
            if event.flags & ~offered:
                raise LocalProtocolError(f"client flags {event.flags:#x} not offered by the server")
            self.client_flags = event.flags
            self._state = _St.OPTIONS
            return [P.CLIENT_FLAGS.pack(event.flags)]
        if self._state is not _St.OPTIONS:
            raise LocalProtocolError(f"cannot send {t.__name__} now (state {self._state.name})")
        if t is OptExportName:
            data = _encode_string(event.name, "export name")
        elif t is OptGo or t is OptInfo:
            raw = _encode_string(event.name, "export name")
            data = (
                P.U32.pack(len(raw))
                + raw
                + P.U16.pack(len(event.info_requests))
                + b"".join(P.U16.pack(i) for i in event.info_requests)
            )
        elif t is OptList or t is OptAbort:
            data = b""
        elif t is OptUnknown:
            data = bytes(event.data)
        else:
            raise LocalProtocolError(f"a client cannot send {t.__name__}")
        option = event.option
        if option != P.NBD_OPT_EXPORT_NAME and not self.client_flags & P.NBD_FLAG_C_FIXED_NEWSTYLE:
            raise LocalProtocolError("only NBD_OPT_EXPORT_NAME is possible without fixed newstyle")
        self.pending_option = option
        self._state = _St.OPTION_REPLY
        return [P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data]

    def _send_request(self, event: Request) -> list:
        if self._state is not _St.TRANSMISSION or self._sent_disc:
            raise LocalProtocolError("requests are only possible in the transmission phase")
        command = event.command
        cookie = event.cookie
        length = event.length
        header = _REQUEST_pack(_REQUEST_MAGIC, event.flags, command, cookie, event.offset, length)
        if command == _CMD_DISC:
            self._sent_disc = True
            return [header]
        if cookie in self._inflight:
            raise LocalProtocolError(f"cookie {cookie:#x} is already in flight")
        if command == _CMD_WRITE:
            data = event.data
            if data is None or len(data) != length:
                raise LocalProtocolError("WRITE data length must equal the request length")
            self._inflight[cookie] = (command, length)
            return [header, data] if length else [header]
        if event.data:
            raise LocalProtocolError("only WRITE requests carry data")
        self._inflight[cookie] = (command, length)
        return [header]
