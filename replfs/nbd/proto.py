"""NBD wire constants and struct layouts.

Design note
-----------
Everything here is a plain constant or a precompiled :class:`struct.Struct`
so that the parsers in :mod:`replfs.nbd.connection` can unpack a header with one C
call.  Names and values follow the NBD protocol document (NetworkBlockDevice
``doc/proto.md``); section names are quoted in the comments.  All integers on
the wire are big-endian ("Conventions": network byte order).

The errno <-> NBD error mapping lives here too ("Error values"): a server
maps a local :class:`~replfs.errors.BlockError` errno onto the small set of
values the protocol allows, and a client maps it back.

One value is not in the document: :data:`NBD_OPT_X_REPLFS` and its reply
type :data:`NBD_REP_X_REPLFS`, replfs's private control channel (see
:mod:`replfs.nbd.control`).  It is a third-party extension: an option
number, because "Baseline" makes every server answer an option it does not
know with NBD_REP_ERR_UNSUP and keep negotiating, so qemu-nbd and nbdkit
answer "unsupported" and nothing breaks; a new command or flag would not be
that safe.
"""

from __future__ import annotations

import errno as _errno
import struct

# -- "Newstyle negotiation" ---------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # 'NBDMAGIC' (INIT_PASSWD)
IHAVEOPT = 0x49484156454F5054  # 'IHAVEOPT'
# "Fixed newstyle negotiation": magic of every option reply.
OPTION_REPLY_MAGIC = 0x3E889045565A9
# "Oldstyle negotiation" cliserv_magic (recognised only to reject it).
CLISERV_MAGIC = 0x00420281861253

# -- "Handshake flags" (16 bits, server -> client) -----------------------------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1

# -- "Client flags" (32 bits, client -> server) --------------------------------
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# -- "Transmission flags" (16 bits) ---------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# -- "Option types" -------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# -- replfs's private extension (third-party; not in the NBD document) ---------
#: The control channel's option: ASCII "RPLF", far from the document's small
#: option numbers.  Its data is one JSON object (UTF-8), the request.  A
#: connection that uses it never sends NBD_OPT_GO: it stays in option
#: haggling (see replfs/nbd/control.py).
NBD_OPT_X_REPLFS = 0x52504C46
#: The reply type of a successful control call (bit 31 clear, so not an
#: error; the document's reply types are 1 to 4): its data is one JSON
#: object, the answer.  A refusal is any NBD_REP_ERR_* with a UTF-8 message.
NBD_REP_X_REPLFS = 0x52504C46
#: Largest control request or answer (the data of the option or its reply):
#: digests of a large disk need far more than MAX_OPTION_LENGTH.
MAX_CONTROL_PAYLOAD = 4 * 1024 * 1024

OPTION_NAMES = {
    NBD_OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    NBD_OPT_ABORT: "NBD_OPT_ABORT",
    NBD_OPT_LIST: "NBD_OPT_LIST",
    NBD_OPT_PEEK_EXPORT: "NBD_OPT_PEEK_EXPORT",
    NBD_OPT_STARTTLS: "NBD_OPT_STARTTLS",
    NBD_OPT_INFO: "NBD_OPT_INFO",
    NBD_OPT_GO: "NBD_OPT_GO",
    NBD_OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    NBD_OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    NBD_OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
    NBD_OPT_EXTENDED_HEADERS: "NBD_OPT_EXTENDED_HEADERS",
    NBD_OPT_X_REPLFS: "NBD_OPT_X_REPLFS",
}

# -- "Option reply types" -------------------------------------------------------
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_FLAG_ERROR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2
NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3
NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4
NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8
NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9

REPLY_NAMES = {
    NBD_REP_ACK: "NBD_REP_ACK",
    NBD_REP_SERVER: "NBD_REP_SERVER",
    NBD_REP_INFO: "NBD_REP_INFO",
    NBD_REP_META_CONTEXT: "NBD_REP_META_CONTEXT",
    NBD_REP_ERR_UNSUP: "NBD_REP_ERR_UNSUP",
    NBD_REP_ERR_POLICY: "NBD_REP_ERR_POLICY",
    NBD_REP_ERR_INVALID: "NBD_REP_ERR_INVALID",
    NBD_REP_ERR_PLATFORM: "NBD_REP_ERR_PLATFORM",
    NBD_REP_ERR_TLS_REQD: "NBD_REP_ERR_TLS_REQD",
    NBD_REP_ERR_UNKNOWN: "NBD_REP_ERR_UNKNOWN",
    NBD_REP_ERR_SHUTDOWN: "NBD_REP_ERR_SHUTDOWN",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "NBD_REP_ERR_BLOCK_SIZE_REQD",
    NBD_REP_ERR_TOO_BIG: "NBD_REP_ERR_TOO_BIG",
    NBD_REP_X_REPLFS: "NBD_REP_X_REPLFS",
}

# -- NBD_REP_INFO information types (under "NBD_OPT_INFO and NBD_OPT_GO") -------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# -- "Request types" -----------------------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

COMMAND_NAMES = {
    NBD_CMD_READ: "NBD_CMD_READ",
    NBD_CMD_WRITE: "NBD_CMD_WRITE",
    NBD_CMD_DISC: "NBD_CMD_DISC",
    NBD_CMD_FLUSH: "NBD_CMD_FLUSH",
    NBD_CMD_TRIM: "NBD_CMD_TRIM",
    NBD_CMD_CACHE: "NBD_CMD_CACHE",
    NBD_CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    NBD_CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
    NBD_CMD_RESIZE: "NBD_CMD_RESIZE",
}

# -- "Command flags" -----------------------------------------------------------
NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# -- "Request message" / "Simple reply message" / "Structured reply chunk" -------
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- "Error values" ------------------------------------------------------------
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# -- "Block size constraints" --------------------------------------------------
#: What replfs advertises in NBD_INFO_BLOCK_SIZE: byte granularity, 4 KiB
#: preferred, and the 32 MiB payload limit that the document says no peer
#: should treat as a denial of service.
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 32 * 1024 * 1024
#: Largest option payload a server accepts during option haggling (but
#: NBD_OPT_X_REPLFS: MAX_CONTROL_PAYLOAD).  Strings are limited to 4096 bytes
#: ("Conventions"); anything far beyond is a peer trying to make us buffer
#: without bound.
MAX_OPTION_LENGTH = 64 * 1024
#: Longest string (export name, error message) we send or accept.
MAX_STRING = 4096

# -- struct layouts (all big-endian, no padding) --------------------------------
#: S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags  ("Newstyle negotiation")
GREETING = struct.Struct(">QQH")
#: C: 32-bit client flags
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT, option, length  (generic option header)
OPTION_HEADER = struct.Struct(">QII")
#: S: OPTION_REPLY_MAGIC, option, reply type, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")
#: S: export size, transmission flags  (reply to NBD_OPT_EXPORT_NAME)
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_ZEROES = bytes(124)
#: NBD_REP_INFO payloads: type + data
INFO_TYPE = struct.Struct(">H")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: NBD_OPT_GO / NBD_OPT_INFO data: name length, (name), request count, (types)
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")
#: C: magic, command flags, type, cookie, offset, length  ("Request message")
REQUEST = struct.Struct(">IHHQQI")
#: S: magic, error, cookie  ("Simple reply message")
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: magic, flags, type, cookie, length  ("Structured reply chunk message")
STRUCTURED_REPLY = struct.Struct(">IHHQI")

# -- errno <-> NBD error ("Error values") --------------------------------------
_ERRNO_TO_NBD = {
    _errno.EPERM: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    # "It also SHOULD map the EDQUOT and EFBIG errors to NBD_ENOSPC."
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.ENOTSUP: NBD_ENOTSUP,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}

_NBD_TO_ERRNO = {
    NBD_EPERM: _errno.EPERM,
    NBD_EIO: _errno.EIO,
    NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL,
    NBD_ENOSPC: _errno.ENOSPC,
    NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP,
    NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}


def errno_to_nbd(err: int) -> int:
    """The NBD error value for a local errno; anything unlisted becomes EIO."""
    return _ERRNO_TO_NBD.get(err, NBD_EIO)


def nbd_to_errno(code: int) -> int:
    """The local errno for an NBD error value received from a server.

    An unknown nonzero value is reported as EIO: the document says a client
    SHOULD treat it "as if it had been NBD_EINVAL" without disconnecting,
    which we honour by not disconnecting; for the layers above, an I/O error
    is the more honest description of a value we cannot interpret.
    """
    return _NBD_TO_ERRNO.get(code, _errno.EIO)


def option_name(option: int) -> str:
    return OPTION_NAMES.get(option, f"option {option}")


def reply_name(reply: int) -> str:
    return REPLY_NAMES.get(reply, f"reply type {reply:#x}")


def command_name(command: int) -> str:
    return COMMAND_NAMES.get(command, f"command {command}")
