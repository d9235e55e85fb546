"""The events of the sans-IO NBD core: one frozen dataclass per message.

Design note
-----------
Events flow the same way in both roles, as in h11 (``h11/_events.py``): the
client *sends* ``OptGo`` and the server *receives* it; the server sends
``ExportInfo`` and the client receives it.  Each names the NBD message it
stands for (NBD document, ``doc/proto.md``); an event never carries
connection state.  They are frozen and slotted: cheap to build on the hot
path (one ``Request`` / ``Reply`` per NBD request) and safe to compare in
tests.  ``OptInvalid`` and ``BadRequest`` exist only on the receiving side:
a well-framed message that the server must refuse and then carry on.

``OptStartTLS`` is answered with ``OptAck(NBD_OPT_STARTTLS)``; what
follows on the stream is TLS, which the I/O layer (``tls.py``) handles: the
core only parses the plaintext on either side of it.

``OptPrivate`` / ``PrivateReply`` are replfs's private extension, not the
document's: one call on the control channel (``NBD_OPT_X_REPLFS``, see
``replfs/nbd/control.py``).  They carry raw bytes (the JSON lives above the
core); the server answers an ``OptPrivate`` with a ``PrivateReply`` or an
``OptionError``, and the connection stays in option haggling.
"""

from __future__ import annotations

from dataclasses import dataclass

from replfs.nbd import proto as P

__all__ = [
    "Greeting",
    "ClientFlags",
    "OptExportName",
    "OptGo",
    "OptInfo",
    "OptList",
    "OptAbort",
    "OptUnknown",
    "OptInvalid",
    "OptPrivate",
    "OptStartTLS",
    "ExportInfo",
    "ExportList",
    "OptionError",
    "OptAck",
    "PrivateReply",
    "Request",
    "BadRequest",
    "Disconnect",
    "Reply",
    "ConnectionClosed",
]


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
    """C->S: NBD_OPT_EXPORT_NAME (enters transmission; a refusal ends the session)."""

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
class OptStartTLS:
    """C->S: NBD_OPT_STARTTLS ("TLS support"; no data).

    A server core recognises it only when built with ``tls=True``; otherwise
    it arrives as an ``OptUnknown`` (a server without TLS answers it
    NBD_REP_ERR_UNSUP).  The server answers ``OptAck(NBD_OPT_STARTTLS)``,
    after which both ends speak TLS on the same stream and the option
    haggling goes on inside it.
    """

    option = P.NBD_OPT_STARTTLS


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
    """S->C: a bare NBD_REP_ACK (the answer to NBD_OPT_ABORT, or to
    NBD_OPT_STARTTLS: TLS starts right after it)."""

    option: int = P.NBD_OPT_ABORT


@dataclass(frozen=True, slots=True)
class OptPrivate:
    """C->S: NBD_OPT_X_REPLFS, a control request (replfs's private extension).

    A server core recognises it only when built with ``control=True``;
    otherwise it arrives as an ``OptUnknown`` like any option it does not know.
    """

    payload: bytes = b""
    option = P.NBD_OPT_X_REPLFS


@dataclass(frozen=True, slots=True)
class PrivateReply:
    """S->C: NBD_REP_X_REPLFS, the answer to a successful ``OptPrivate``."""

    payload: bytes = b""


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
