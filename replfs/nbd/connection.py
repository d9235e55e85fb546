"""Sans-IO NBD protocol state machines, one per role.

Design note
-----------
In the style of h11: a :class:`ServerConnection` or :class:`ClientConnection`
never touches a socket.  Bytes from the peer go in with
:meth:`~_Connection.receive_data` (``b""`` means end of file);
``next_event()`` returns one parsed event (``_events.py``),
:data:`NEED_DATA` when more bytes are needed, or :data:`PAUSED` when the
connection waits for *us* to answer (an option reply during the handshake).
Events to the peer go through ``send()``, which returns the bytes to write
(``send_parts()`` returns them as a list so a large payload is never
concatenated).

The package is split as h11 is: ``errors.py`` (whose fault, and an errno
hint), ``_events.py`` (the messages), ``_state.py`` (the states and the one
transition table; Rule 1: only :meth:`_Connection._transition` changes
``_state``), and this module (buffering, parsing and encoding).  Errors are
raised as ``raise self._remote_error(...)`` (the peer's fault) or
``raise self._local_error(...)`` (ours): both move the connection to ERROR
for good, and every later ``next_event`` raises the first error again.

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

TLS (``NBD_OPT_STARTTLS``, "TLS support"): a server core built with
``tls=True`` turns the option into :class:`OptStartTLS` (with data:
:class:`OptInvalid`); the server answers ``OptAck(NBD_OPT_STARTTLS)`` and
stays in OPTIONS, and so does a client core that receives that ACK.  The
bytes that follow are TLS records, not NBD: the I/O layer takes whatever the
core has buffered beyond the ACK (:meth:`~_Connection.take_pending_bytes`,
normally nothing) into its TLS object and feeds the core the decrypted
stream from then on.  Which options need TLS first (NBD_REP_ERR_TLS_REQD)
is the server's policy, not the core's.  Without ``tls=True`` the option is
an :class:`OptUnknown`, byte for byte what a server without TLS does.

replfs's private extension, ``NBD_OPT_X_REPLFS`` (the control channel,
``replfs/nbd/control.py``): a client sends :class:`OptPrivate` and reads
:class:`PrivateReply` or :class:`OptionError`; a server built with
``control=True`` receives :class:`OptPrivate` (data up to
``MAX_CONTROL_PAYLOAD``, 4 MiB, instead of ``MAX_OPTION_LENGTH``) and answers
it like any option, so the connection stays in OPTIONS.  Without
``control=True`` the option is an :class:`OptUnknown` under the usual limit,
byte for byte what a plain server does.

Hot path: the transmission phase is the replication path (every VM write),
so headers are parsed with precompiled ``struct.Struct.unpack_from`` straight
from a ``bytearray`` buffer, consumed bytes are dropped with ``del buf[:n]``
(O(1) at the front of a CPython bytearray), and a small WRITE payload is
taken with a single slice copy.  A payload that is not yet complete and is
larger than :data:`DIRECT_PAYLOAD_THRESHOLD` gets its own ``bytearray`` that
later data is copied into directly; the I/O layer may even ``recv_into`` it
via :meth:`~_Connection.payload_view` / :meth:`~_Connection.payload_received`,
so a 1 MiB WRITE is copied once from the kernel and never again.  No state
transition happens per request: only NBD_CMD_DISC changes the state in
transmission.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass

from replfs.nbd import proto as P
from replfs.nbd._events import ClientFlags, ExportInfo, ExportList, Greeting, OptAck, OptionError  # handshake
from replfs.nbd._events import OptAbort, OptExportName, OptGo, OptInfo, OptInvalid, OptList, OptUnknown  # options
from replfs.nbd._events import OptPrivate, PrivateReply  # replfs's private extension (control.py)
from replfs.nbd._events import OptStartTLS  # TLS (the I/O layer: tls.py)
from replfs.nbd._events import BadRequest, ConnectionClosed, Disconnect, Reply, Request  # transmission
from replfs.nbd._state import CLEAN_END, CLIENT, INITIAL_STATE, SERVER, State, Trigger, next_state
from replfs.nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["NEED_DATA", "PAUSED", "DIRECT_PAYLOAD_THRESHOLD", "ServerConnection", "ClientConnection"]


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

_REQUEST_unpack_from = P.REQUEST.unpack_from
_REQUEST_pack = P.REQUEST.pack
_REQUEST_SIZE = P.REQUEST.size
_SIMPLE_REPLY_unpack_from = P.SIMPLE_REPLY.unpack_from
_SIMPLE_REPLY_pack = P.SIMPLE_REPLY.pack
_REPLY_SIZE = P.SIMPLE_REPLY.size
_REQUEST_MAGIC = P.NBD_REQUEST_MAGIC
_SIMPLE_REPLY_MAGIC = P.NBD_SIMPLE_REPLY_MAGIC
_CMD_READ = P.NBD_CMD_READ
_CMD_WRITE = P.NBD_CMD_WRITE
_CMD_DISC = P.NBD_CMD_DISC
_OPTION_HEADER_SIZE = P.OPTION_HEADER.size
_OPTION_REPLY_SIZE = P.OPTION_REPLY_HEADER.size

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


def _decode_string(raw: bytes, what: str) -> str:
    """A protocol string ("Conventions"): UTF-8, no NUL, at most 4096 bytes."""
    if len(raw) > P.MAX_STRING:
        raise ValueError(f"{what} is {len(raw)} bytes long (limit {P.MAX_STRING})")
    text = raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL character")
    return text


@dataclass(frozen=True, slots=True)
class _PendingWrite:
    """The header of a WRITE whose payload is being assembled in place."""

    flags: int
    cookie: int
    offset: int
    length: int


class _Connection:
    """Buffering, payloads, errors and the state, common to both roles."""

    our_role = ""

    def __init__(self, *, max_payload: int = P.MAX_BLOCK_SIZE):
        self._state = INITIAL_STATE[self.our_role]
        self._buf = bytearray()
        self._eof = False
        self._error: ProtocolError | None = None
        self.max_payload = max_payload
        # An incomplete large payload being assembled in place, and what it
        # completes (see _payload_event).
        self._payload: bytearray | None = None
        self._payload_view: memoryview | None = None
        self._payload_filled = 0
        self._payload_for = None
        #: cookie -> (command, length) of requests in flight.
        self._inflight: dict[int, tuple[int, int]] = {}

    @property
    def state(self) -> State:
        return self._state

    # -- state and errors (Rule 1: _state.py) -----------------------------------
    def _transition(self, trigger: Trigger) -> None:
        """The one place that changes ``self._state`` after ``__init__``."""
        try:
            self._state = next_state(self.our_role, self._state, trigger)
        except LocalProtocolError as exc:
            raise self._broke(exc) from None

    def _broke(self, exc: ProtocolError) -> ProtocolError:
        """Record the first protocol error and move to ERROR; returns ``exc``."""
        if self._error is None:
            self._error = exc
        self._transition(Trigger.BROKE)
        return exc

    def _remote_error(self, message: str, errno_hint: int | None = None) -> RemoteProtocolError:
        return self._broke(RemoteProtocolError(message, errno_hint))

    def _local_error(self, message: str) -> LocalProtocolError:
        return self._broke(LocalProtocolError(message))

    def _encode_string(self, text: str, what: str) -> bytes:
        raw = text.encode("utf-8")
        if len(raw) > P.MAX_STRING or "\0" in text:
            raise self._local_error(f"{what} must be at most {P.MAX_STRING} UTF-8 bytes without NUL")
        return raw

    # -- input -------------------------------------------------------------------
    def receive_data(self, data) -> None:
        """Feed bytes from the peer; ``b""`` (or None) means end of file."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise self._local_error("receive_data() after end of file")
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
            raise self._local_error("payload_received() does not match payload_view()")
        self._payload_filled += nbytes

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Unparsed bytes and whether end of file was seen (like h11)."""
        return bytes(self._buf), self._eof

    def take_pending_bytes(self) -> bytes:
        """Every byte received and not parsed yet, removed from the core.

        For the switch to TLS after NBD_OPT_STARTTLS's ACK: what a peer sent
        beyond it belongs to the TLS stream.  Only in OPTIONS, with no
        payload being assembled."""
        if self._state is not State.OPTIONS or self._payload is not None:
            raise self._local_error(f"take_pending_bytes() in state {self._state.name}")
        data = bytes(self._buf)
        self._buf.clear()
        return data

    @property
    def in_flight(self) -> int:
        """Requests sent (client) / received (server) and not yet answered."""
        return len(self._inflight)

    def _start_payload(self, length: int, pending) -> None:
        """Move every buffered byte into a fresh ``length``-byte payload that
        completes ``pending`` (the buffer holds less than ``length``)."""
        have = len(self._buf)
        payload = bytearray(length)
        view = memoryview(payload)
        if have:
            view[:have] = self._buf
            self._buf.clear()
        self._payload = payload
        self._payload_view = view
        self._payload_filled = have
        self._payload_for = pending

    def _finish_payload(self):
        """The event of the payload being assembled once it is complete."""
        if self._payload_filled < len(self._payload):
            return self._eof_event()
        payload = self._payload
        pending = self._payload_for
        self._payload_view.release()
        self._payload = self._payload_view = self._payload_for = None
        self._payload_filled = 0
        return self._payload_event(pending, payload)

    def _payload_event(self, pending, payload):  # pragma: no cover - overridden
        raise NotImplementedError

    # -- events ------------------------------------------------------------------
    def next_event(self):
        """The next event from the peer, :data:`NEED_DATA`, or :data:`PAUSED`."""
        state = self._state
        if state is State.TRANSMISSION:
            return self._next_in_transmission()
        if state is State.ERROR:
            raise self._error
        return self._READERS[state](self)

    def _next_in_transmission(self):  # pragma: no cover - overridden
        """A request (server) or a reply (client)."""
        raise NotImplementedError

    #: state -> what reads the next event in it (outside TRANSMISSION and ERROR).
    _READERS: dict = {}

    def _paused(self):
        return PAUSED

    def _after_close(self):
        # Ignore anything further from a peer that said goodbye.
        self._buf.clear()
        return self._eof_event()

    def _eof_event(self):
        """What to return when the buffer cannot yield an event."""
        if not self._eof:
            return NEED_DATA
        if self._buf or self._payload is not None:
            raise self._remote_error("connection closed in the middle of a message", errno.ECONNRESET)
        return ConnectionClosed(clean=self._state in CLEAN_END)

    # -- output ------------------------------------------------------------------
    def send(self, event) -> bytes:
        """The bytes that transmit ``event`` (see ``send_parts``)."""
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
    with a ``Reply``.  With ``control=True`` an ``OptPrivate`` may arrive too,
    answered with ``PrivateReply`` or ``OptionError``.
    """

    our_role = SERVER

    def __init__(self, *, max_payload: int = P.MAX_BLOCK_SIZE, control: bool = False, tls: bool = False):
        super().__init__(max_payload=max_payload)
        #: Whether NBD_OPT_X_REPLFS is recognised (as OptPrivate).  The
        #: server may switch it on later (after TLS started).
        self.control = control
        #: Whether NBD_OPT_STARTTLS is recognised (as OptStartTLS).
        self.tls = tls
        self.handshake_flags = 0
        self.client_flags = 0
        self.no_zeroes = False
        #: The option waiting for our answer (NBD_OPT_* value) or None.
        self.pending_option: int | None = None

    @property
    def in_transmission(self) -> bool:
        return self._state is State.TRANSMISSION

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED or self._state is State.ERROR

    # -- receiving ---------------------------------------------------------------
    def _not_greeted(self):
        raise self._local_error("send(Greeting()) before reading from the client")

    def _next_flags(self):
        size = P.CLIENT_FLAGS.size
        if len(self._buf) < size:
            return self._eof_event()
        (flags,) = P.CLIENT_FLAGS.unpack_from(self._buf)
        del self._buf[:size]
        known = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES
        # "Client flags": the server MUST drop the connection on an unknown
        # flag or one that does not match what it advertised.
        if flags & ~known:
            raise self._remote_error(f"client sent unknown client flags {flags:#x}")
        if flags & P.NBD_FLAG_C_NO_ZEROES and not self.handshake_flags & P.NBD_FLAG_NO_ZEROES:
            raise self._remote_error("client set NBD_FLAG_C_NO_ZEROES which the server did not offer")
        if flags & P.NBD_FLAG_C_FIXED_NEWSTYLE and not self.handshake_flags & P.NBD_FLAG_FIXED_NEWSTYLE:
            raise self._remote_error("client set NBD_FLAG_C_FIXED_NEWSTYLE which the server did not offer")
        self.client_flags = flags
        self.no_zeroes = bool(flags & P.NBD_FLAG_C_NO_ZEROES)
        self._transition(Trigger.CLIENT_FLAGS)
        return ClientFlags(flags)

    def _next_option(self):
        buf = self._buf
        if len(buf) < _OPTION_HEADER_SIZE:
            return self._eof_event()
        magic, option, length = P.OPTION_HEADER.unpack_from(buf)
        if magic != P.IHAVEOPT:
            raise self._remote_error(f"bad option magic {magic:#x} (expected IHAVEOPT)")
        private = option == P.NBD_OPT_X_REPLFS and self.control
        limit = P.MAX_CONTROL_PAYLOAD if private else P.MAX_OPTION_LENGTH
        if length > limit:
            raise self._remote_error(f"{P.option_name(option)} carries {length} bytes of data (limit {limit})")
        end = _OPTION_HEADER_SIZE + length
        if len(buf) < end:
            return self._eof_event()
        data = bytes(buf[_OPTION_HEADER_SIZE:end])
        del buf[:end]
        self._transition(Trigger.OPTION)
        self.pending_option = option
        if private:
            return OptPrivate(data)
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
            if option == P.NBD_OPT_STARTTLS and self.tls:
                if data:
                    return OptInvalid(option, "NBD_OPT_STARTTLS must not carry data")
                return OptStartTLS()
        except ValueError as exc:
            if option == P.NBD_OPT_EXPORT_NAME:
                # It cannot be answered with an error: terminate the session.
                raise self._remote_error(f"NBD_OPT_EXPORT_NAME: {exc}") from None
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

    def _next_in_transmission(self):
        if self._payload is not None:
            return self._finish_payload()
        buf = self._buf
        if len(buf) < _REQUEST_SIZE:
            return self._eof_event()
        magic, flags, command, cookie, offset, length = _REQUEST_unpack_from(buf)
        if magic != _REQUEST_MAGIC:
            # "Request message": nothing after a bad magic can be framed.
            raise self._remote_error(f"bad request magic {magic:#010x}")
        if command == _CMD_DISC:
            # "NBD_CMD_DISC": no reply; nothing may follow.
            del buf[:_REQUEST_SIZE]
            self._transition(Trigger.DISCONNECT)
            return Disconnect()
        if cookie in self._inflight:
            raise self._remote_error(f"cookie {cookie:#x} is already in flight")
        if command != _CMD_WRITE:
            del buf[:_REQUEST_SIZE]
            return self._request_event(command, flags, cookie, offset, length, None)
        if length > self.max_payload:
            # "Block size constraints": a payload this large may be deemed a
            # denial of service; we cannot skip it safely.
            raise self._remote_error(f"NBD_CMD_WRITE of {length} bytes exceeds {self.max_payload}")
        end = _REQUEST_SIZE + length
        if len(buf) >= end:
            data = buf[_REQUEST_SIZE:end]
            del buf[:end]
            return self._request_event(_CMD_WRITE, flags, cookie, offset, length, data)
        if length < DIRECT_PAYLOAD_THRESHOLD:
            return self._eof_event()  # a small payload is taken whole
        del buf[:_REQUEST_SIZE]
        self._start_payload(length, _PendingWrite(flags, cookie, offset, length))
        return self._finish_payload()

    def _payload_event(self, w: _PendingWrite, payload: bytearray):
        return self._request_event(_CMD_WRITE, w.flags, w.cookie, w.offset, w.length, payload)

    def _request_event(self, command: int, flags: int, cookie: int, offset: int, length: int, data):
        """Record a received request as in flight; the event for it.

        A request the server must fail (unknown command or flags, too long)
        becomes a BadRequest to answer with NBD_EINVAL ("Error values").
        """
        self._inflight[cookie] = (command, length)
        allowed = _ALLOWED_FLAGS.get(command)
        if allowed is None:
            reason = f"unsupported {P.command_name(command)}"
        elif flags & ~allowed:
            reason = f"{P.command_name(command)} with unsupported command flags {flags & ~allowed:#x}"
        elif length > self.max_payload and command in _LENGTH_LIMITED:
            reason = f"{P.command_name(command)} of {length} bytes exceeds the maximum block size"
        else:
            return Request(command, flags, cookie, offset, length, data)
        return BadRequest(cookie, command, P.NBD_EINVAL, reason)

    # -- sending -----------------------------------------------------------------
    def send_parts(self, event) -> list:
        if type(event) is Reply:
            return self._send_reply(event)
        return self._send_handshake(event)

    def _send_handshake(self, event) -> list:
        t = type(event)
        if self._state is State.ERROR:
            raise self._local_error("connection is broken")
        if t is Greeting:
            if self._state is not State.SEND_GREETING:
                raise self._local_error("greeting already sent")
            self.handshake_flags = event.handshake_flags
            self._transition(Trigger.GREETING)
            return [P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, event.handshake_flags)]
        if self._state is not State.OPTION_REPLY:
            raise self._local_error(f"cannot send {t.__name__} now (state {self._state.name})")
        option = self.pending_option
        if t is ExportInfo:
            return [self._send_export_info(option, event)]
        if t is OptionError:
            return [self._send_option_error(option, event)]
        if t is ExportList:
            return [self._send_export_list(option, event)]
        if t is OptAck:
            if option == P.NBD_OPT_STARTTLS and self.tls and event.option == option:
                self._answered(Trigger.ANSWERED)  # TLS follows; still haggling
            elif option != P.NBD_OPT_ABORT:
                raise self._local_error("a bare ACK only answers NBD_OPT_ABORT or NBD_OPT_STARTTLS here")
            else:
                self._answered(Trigger.ENDED)
            return [P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_ACK, 0)]
        if t is PrivateReply:
            return self._send_private_reply(option, event)
        raise self._local_error(f"a server cannot send {t.__name__}")

    def _send_private_reply(self, option: int, event: PrivateReply) -> list:
        if option != P.NBD_OPT_X_REPLFS or not self.control:
            raise self._local_error(f"PrivateReply does not answer {P.option_name(option)}")
        payload = event.payload
        if len(payload) > P.MAX_CONTROL_PAYLOAD:
            raise self._local_error(f"control reply of {len(payload)} bytes exceeds {P.MAX_CONTROL_PAYLOAD}")
        self._answered(Trigger.ANSWERED)
        header = P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_X_REPLFS, len(payload))
        return [header, payload] if payload else [header]

    def _answered(self, trigger: Trigger) -> None:
        self.pending_option = None
        self._transition(trigger)

    def _send_option_error(self, option: int, event: OptionError) -> bytes:
        if not event.reply_type & P.NBD_REP_FLAG_ERROR:
            raise self._local_error(f"{event.reply_type:#x} is not an error reply type")
        if option == P.NBD_OPT_EXPORT_NAME:
            # "NBD_OPT_EXPORT_NAME": the server MUST terminate the session;
            # there is no way to send the error.
            self._answered(Trigger.ENDED)
            return b""
        msg = self._encode_string(event.message, "error message")
        self._answered(Trigger.ANSWERED)
        return P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, option, event.reply_type, len(msg)) + msg

    def _send_export_list(self, option: int, event: ExportList) -> bytes:
        if option != P.NBD_OPT_LIST:
            raise self._local_error(f"ExportList does not answer {P.option_name(option)}")
        hdr = P.OPTION_REPLY_HEADER.pack
        out = []
        for name in event.names:
            raw = self._encode_string(name, "export name")
            out.append(hdr(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_SERVER, 4 + len(raw)))
            out.append(P.U32.pack(len(raw)) + raw)
        out.append(hdr(P.OPTION_REPLY_MAGIC, option, P.NBD_REP_ACK, 0))
        self._answered(Trigger.ANSWERED)
        return b"".join(out)

    def _send_export_info(self, option: int, event: ExportInfo) -> bytes:
        flags = event.transmission_flags | P.NBD_FLAG_HAS_FLAGS
        if not 0 <= event.size < 1 << 64 or flags >= 1 << 16:
            raise self._local_error("export size or transmission flags out of range")
        if option == P.NBD_OPT_EXPORT_NAME:
            out = P.EXPORT_NAME_REPLY.pack(event.size, flags)
            if not self.no_zeroes:
                out += P.EXPORT_NAME_ZEROES
            self._answered(Trigger.ENTERED)
            return out
        if option not in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
            raise self._local_error(f"ExportInfo does not answer {P.option_name(option)}")
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
        self._answered(Trigger.ENTERED if option == P.NBD_OPT_GO else Trigger.ANSWERED)
        return b"".join(out)

    def _send_reply(self, event: Reply) -> list:
        try:
            command, length = self._inflight.pop(event.cookie)
        except KeyError:
            raise self._local_error(f"no request with cookie {event.cookie:#x} is in flight") from None
        header = _SIMPLE_REPLY_pack(_SIMPLE_REPLY_MAGIC, event.error, event.cookie)
        data = event.data
        if command == _CMD_READ and not event.error:
            if data is None or len(data) != length:
                got = None if data is None else len(data)
                raise self._local_error(f"READ reply must carry {length} bytes, not {got}")
            if length == 0:
                return [header]
            return [header, data]
        if data:
            raise self._local_error("only a successful READ reply carries data")
        return [header]

    #: What reads the next event in each state (see _Connection.next_event).
    _READERS = {
        State.SEND_GREETING: _not_greeted,
        State.FLAGS: _next_flags,
        State.OPTIONS: _next_option,
        State.OPTION_REPLY: _Connection._paused,  # we owe the answer
        State.CLOSED: _Connection._after_close,
    }


# -- client role -----------------------------------------------------------------
class ClientConnection(_Connection):
    """The client's half of one NBD connection.

    Typical use: wait for ``Greeting``; ``send(ClientFlags(...))``; send one
    option at a time and read its answer (``ExportInfo``, ``ExportList``,
    ``OptionError``, ``OptAck``, or ``PrivateReply`` to ``OptPrivate``);
    after a successful GO / EXPORT_NAME send ``Request`` events with
    distinct cookies and read ``Reply`` events.
    """

    our_role = CLIENT

    def __init__(self, *, max_payload: int = P.MAX_BLOCK_SIZE):
        super().__init__(max_payload=max_payload)
        self.handshake_flags = 0
        self.client_flags = 0
        self.pending_option: int | None = None
        self._infos: dict[int, object] = {}
        self._names: list[str] = []
        #: The ExportInfo that entered transmission.
        self.export: ExportInfo | None = None

    @property
    def in_transmission(self) -> bool:
        return self._state is State.TRANSMISSION

    @property
    def disconnect_sent(self) -> bool:
        return self._state is State.DISC_SENT

    # -- receiving ---------------------------------------------------------------
    def _silent(self):
        # SEND_FLAGS / OPTIONS: the server should be silent now.
        if self._buf:
            raise self._remote_error("server sent data while no option was pending")
        return self._eof_event() if self._eof else PAUSED

    def _next_answer(self):
        if self.pending_option == P.NBD_OPT_EXPORT_NAME:
            return self._next_export_name_reply()
        return self._next_option_reply()

    def _next_greeting(self):
        size = P.GREETING.size
        if len(self._buf) < size:
            return self._eof_event()
        magic, second, flags = P.GREETING.unpack_from(self._buf)
        if magic != P.NBDMAGIC:
            raise self._remote_error(f"bad server magic {magic:#x} (expected NBDMAGIC)")
        if second == P.CLISERV_MAGIC:
            raise self._remote_error("server uses oldstyle negotiation, which is not supported")
        if second != P.IHAVEOPT:
            raise self._remote_error(f"bad server magic {second:#x} (expected IHAVEOPT)")
        del self._buf[:size]
        self.handshake_flags = flags
        self._transition(Trigger.GREETING)
        return Greeting(flags)

    def _next_export_name_reply(self):
        need = P.EXPORT_NAME_REPLY.size
        if not self.client_flags & P.NBD_FLAG_C_NO_ZEROES:
            need += len(P.EXPORT_NAME_ZEROES)
        if len(self._buf) < need:
            if self._eof and not self._buf:
                # Refused: "If the server is unwilling to allow the export,
                # it MUST terminate the session."
                self._option_done(Trigger.ENDED)
                return ConnectionClosed(clean=False)
            return self._eof_event()
        size, flags = P.EXPORT_NAME_REPLY.unpack_from(self._buf)
        del self._buf[:need]
        return self._entered(ExportInfo(size, flags, None))

    def _entered(self, info: ExportInfo) -> ExportInfo:
        self.export = info
        self._option_done(Trigger.ENTERED)
        return info

    def _next_option_reply(self):
        buf = self._buf
        while True:
            if len(buf) < _OPTION_REPLY_SIZE:
                return self._eof_event()
            magic, option, rtype, length = P.OPTION_REPLY_HEADER.unpack_from(buf)
            if magic != P.OPTION_REPLY_MAGIC:
                raise self._remote_error(f"bad option reply magic {magic:#x}")
            if option != self.pending_option:
                raise self._remote_error(
                    f"reply for {P.option_name(option)} while waiting for {P.option_name(self.pending_option)}"
                )
            limit = P.MAX_CONTROL_PAYLOAD if option == P.NBD_OPT_X_REPLFS else P.MAX_OPTION_LENGTH
            if length > limit:
                raise self._remote_error(f"option reply of {length} bytes is too large (limit {limit})")
            end = _OPTION_REPLY_SIZE + length
            if len(buf) < end:
                return self._eof_event()
            data = bytes(buf[_OPTION_REPLY_SIZE:end])
            del buf[:end]
            event = self._option_reply(option, rtype, data)
            if event is not None:
                return event

    def _option_reply(self, option: int, rtype: int, data: bytes):
        if rtype & P.NBD_REP_FLAG_ERROR:
            self._option_done(Trigger.ANSWERED)
            return OptionError(rtype, data.decode("utf-8", "replace"), option)
        if option == P.NBD_OPT_X_REPLFS:
            if rtype != P.NBD_REP_X_REPLFS:
                raise self._remote_error(f"unexpected {P.reply_name(rtype)} to NBD_OPT_X_REPLFS")
            self._option_done(Trigger.ANSWERED)
            return PrivateReply(data)
        if option in (P.NBD_OPT_GO, P.NBD_OPT_INFO):
            if rtype == P.NBD_REP_INFO:
                self._parse_info(data)
                return None
            if rtype == P.NBD_REP_ACK:
                export = self._infos.get(P.NBD_INFO_EXPORT)
                if export is None:
                    raise self._remote_error("server acknowledged NBD_OPT_GO/INFO without NBD_INFO_EXPORT")
                info = ExportInfo(export[0], export[1], self._infos.get(P.NBD_INFO_BLOCK_SIZE))
                if option == P.NBD_OPT_GO:
                    return self._entered(info)
                self._option_done(Trigger.ANSWERED)
                return info
            raise self._remote_error(f"unexpected {P.reply_name(rtype)} to {P.option_name(option)}")
        if option == P.NBD_OPT_LIST:
            if rtype == P.NBD_REP_SERVER:
                if len(data) < 4:
                    raise self._remote_error("NBD_REP_SERVER too short")
                (namelen,) = P.U32.unpack_from(data)
                if namelen > len(data) - 4:
                    raise self._remote_error("NBD_REP_SERVER name length exceeds the reply")
                self._names.append(data[4 : 4 + namelen].decode("utf-8", "replace"))
                return None
            if rtype == P.NBD_REP_ACK:
                names = tuple(self._names)
                self._option_done(Trigger.ANSWERED)
                return ExportList(names)
            raise self._remote_error(f"unexpected {P.reply_name(rtype)} to NBD_OPT_LIST")
        if rtype == P.NBD_REP_ACK:
            self._option_done(Trigger.ENDED if option == P.NBD_OPT_ABORT else Trigger.ANSWERED)
            return OptAck(option)
        # Some other non-error reply to an option we passed through raw:
        # not ours to interpret.
        return None

    def _parse_info(self, data: bytes) -> None:
        if len(data) < P.INFO_TYPE.size:
            raise self._remote_error("NBD_REP_INFO without an information type")
        (itype,) = P.INFO_TYPE.unpack_from(data)
        if itype == P.NBD_INFO_EXPORT:
            if len(data) != P.INFO_EXPORT.size:
                raise self._remote_error("NBD_INFO_EXPORT must be 12 bytes long")
            _, size, flags = P.INFO_EXPORT.unpack(data)
            self._infos[itype] = (size, flags)
        elif itype == P.NBD_INFO_BLOCK_SIZE:
            if len(data) != P.INFO_BLOCK_SIZE.size:
                raise self._remote_error("NBD_INFO_BLOCK_SIZE must be 14 bytes long")
            _, bmin, bpref, bmax = P.INFO_BLOCK_SIZE.unpack(data)
            self._infos[itype] = (bmin, bpref, bmax)
        # "The client MUST ignore information replies it does not understand."

    def _option_done(self, trigger: Trigger) -> None:
        self.pending_option = None
        self._infos = {}
        self._names = []
        self._transition(trigger)

    def _next_in_transmission(self):
        if self._payload is not None:
            return self._finish_payload()
        buf = self._buf
        if len(buf) < _REPLY_SIZE:
            return self._eof_event()
        magic, error, cookie = _SIMPLE_REPLY_unpack_from(buf)
        if magic != _SIMPLE_REPLY_MAGIC:
            if magic == P.NBD_STRUCTURED_REPLY_MAGIC:
                raise self._remote_error("structured reply received but never negotiated")
            raise self._remote_error(f"bad reply magic {magic:#010x}")
        entry = self._inflight.get(cookie)
        if entry is None:
            raise self._remote_error(f"reply for cookie {cookie:#x} which is not in flight")
        command, length = entry
        if command != _CMD_READ or error:
            del buf[:_REPLY_SIZE]
            del self._inflight[cookie]
            return Reply(cookie, error, None)
        end = _REPLY_SIZE + length
        if len(buf) >= end:
            data = bytes(buf[_REPLY_SIZE:end])
            del buf[:end]
            del self._inflight[cookie]
            return Reply(cookie, 0, data)
        if length < DIRECT_PAYLOAD_THRESHOLD:
            return self._eof_event()  # a small payload is taken whole
        del buf[:_REPLY_SIZE]
        del self._inflight[cookie]
        self._start_payload(length, cookie)
        return self._finish_payload()

    def _payload_event(self, cookie: int, payload: bytearray):
        return Reply(cookie, 0, payload)

    # -- sending -----------------------------------------------------------------
    def send_parts(self, event) -> list:
        if type(event) is Request:
            return self._send_request(event)
        return self._send_handshake(event)

    def _send_handshake(self, event) -> list:
        t = type(event)
        if self._state is State.ERROR:
            raise self._local_error("connection is broken")
        if t is Disconnect:
            return self._send_request(Request(_CMD_DISC, 0, 0, 0, 0))
        if t is ClientFlags:
            return [self._send_client_flags(event)]
        if self._state is not State.OPTIONS:
            raise self._local_error(f"cannot send {t.__name__} now (state {self._state.name})")
        if t is OptExportName:
            data = self._encode_string(event.name, "export name")
        elif t is OptGo or t is OptInfo:
            raw = self._encode_string(event.name, "export name")
            data = (
                P.U32.pack(len(raw))
                + raw
                + P.U16.pack(len(event.info_requests))
                + b"".join(P.U16.pack(i) for i in event.info_requests)
            )
        elif t is OptList or t is OptAbort or t is OptStartTLS:
            data = b""
        elif t is OptUnknown:
            data = bytes(event.data)
        elif t is OptPrivate:
            data = bytes(event.payload)
            if len(data) > P.MAX_CONTROL_PAYLOAD:
                raise self._local_error(f"control request of {len(data)} bytes exceeds {P.MAX_CONTROL_PAYLOAD}")
        else:
            raise self._local_error(f"a client cannot send {t.__name__}")
        option = event.option
        if option != P.NBD_OPT_EXPORT_NAME and not self.client_flags & P.NBD_FLAG_C_FIXED_NEWSTYLE:
            raise self._local_error("only NBD_OPT_EXPORT_NAME is possible without fixed newstyle")
        self._transition(Trigger.OPTION)
        self.pending_option = option
        header = P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data))
        if t is OptPrivate and data:
            return [header, data]  # up to 4 MiB: not concatenated
        return [header + data]

    def _send_client_flags(self, event: ClientFlags) -> bytes:
        if self._state is not State.SEND_FLAGS:
            raise self._local_error("client flags are sent once, right after the greeting")
        offered = 0
        if self.handshake_flags & P.NBD_FLAG_FIXED_NEWSTYLE:
            offered |= P.NBD_FLAG_C_FIXED_NEWSTYLE
        if self.handshake_flags & P.NBD_FLAG_NO_ZEROES:
            offered |= P.NBD_FLAG_C_NO_ZEROES
        if event.flags & ~offered:
            raise self._local_error(f"client flags {event.flags:#x} not offered by the server")
        self.client_flags = event.flags
        self._transition(Trigger.CLIENT_FLAGS)
        return P.CLIENT_FLAGS.pack(event.flags)

    def _send_request(self, event: Request) -> list:
        if self._state is not State.TRANSMISSION:
            raise self._local_error("requests are only possible in the transmission phase")
        command = event.command
        cookie = event.cookie
        length = event.length
        header = _REQUEST_pack(_REQUEST_MAGIC, event.flags, command, cookie, event.offset, length)
        if command == _CMD_DISC:
            self._transition(Trigger.DISCONNECT)
            return [header]
        if cookie in self._inflight:
            raise self._local_error(f"cookie {cookie:#x} is already in flight")
        if command == _CMD_WRITE:
            data = event.data
            if data is None or len(data) != length:
                raise self._local_error("WRITE data length must equal the request length")
            self._inflight[cookie] = (command, length)
            return [header, data] if length else [header]
        if event.data:
            raise self._local_error("only WRITE requests carry data")
        self._inflight[cookie] = (command, length)
        return [header]

    #: What reads the next event in each state (see _Connection.next_event).
    _READERS = {
        State.GREETING: _next_greeting,
        State.SEND_FLAGS: _silent,
        State.OPTIONS: _silent,
        State.OPTION_REPLY: _next_answer,
        State.DISC_SENT: _next_in_transmission,  # replies to earlier requests
        State.CLOSED: _Connection._after_close,
    }
