"""Errors of the sans-IO NBD core: whose fault it was, and an errno for the edge.

Design note
-----------
As in h11 (``h11/_util.py``), an error says whose fault it is:

* :class:`RemoteProtocolError`: the peer sent something the protocol does
  not allow.  The stream can no longer be trusted: drop the connection.
* :class:`LocalProtocolError`: our own code asked the core for something the
  protocol forbids (a bug, or an export name too long to send).

Either one moves the connection to its ERROR state for good (see
``_state.py``); a later ``next_event`` raises the first error again.
:class:`ProtocolError` is only a base class and is never raised itself.

``errno_hint`` is the errno an adapter reports when it turns the error into
a :class:`~replfs.errors.BlockError` at the edge (h11's
``error_status_hint``): ``EPROTO`` for what the peer sent, ``EINVAL`` for
what we asked, ``ECONNRESET`` when the peer hung up in the middle of a
message.  A raise site may pass a better one.

The control channel (``NBD_OPT_X_REPLFS``, replfs's private extension, see
``control.py``) adds two errors that are not protocol errors: the
connection is intact and may carry the next call.

* :class:`ControlRefused` ``(code, message)``: the peer's control handler
  said no, with an NBD_REP_ERR_* reply type and a message ("split brain:
  ...").  A server's handler raises it to refuse; a client receives it.
* :class:`ControlUnsupported`: the server answered NBD_REP_ERR_UNSUP, as
  every plain NBD server (qemu-nbd, nbdkit) or a replfs server without a
  control handler does.  Its own class, not a refusal, because the caller
  wants to tell "no control channel here" from "the peer said no".
"""

from __future__ import annotations

import errno

from replfs.errors import ReplfsError
from replfs.nbd import proto as P

__all__ = [
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "ControlError", "ControlRefused", "ControlUnsupported",
]


class ProtocolError(ReplfsError):
    """The NBD protocol was broken; the subclasses say whose fault it was."""

    #: The errno that describes this error to the layers above.
    errno_hint: int = errno.EPROTO

    def __init__(self, message: str, errno_hint: int | None = None):
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)
        if errno_hint is not None:
            self.errno_hint = errno_hint


class LocalProtocolError(ProtocolError):
    """Our side tried to send or do something the protocol does not allow."""

    errno_hint = errno.EINVAL


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow: drop it."""

    errno_hint = errno.EPROTO


class ControlError(ReplfsError):
    """A control call was answered with an error; the connection goes on."""


class ControlRefused(ControlError):
    """The control handler refused: ``code`` (an NBD_REP_ERR_* value other
    than NBD_REP_ERR_UNSUP) and ``message`` go to the client verbatim."""

    def __init__(self, code: int, message: str):
        if not code & P.NBD_REP_FLAG_ERROR or code > 0xFFFFFFFF:
            raise ValueError(f"{code:#x} is not an NBD_REP_ERR_* reply type")
        if code == P.NBD_REP_ERR_UNSUP:
            raise ValueError("NBD_REP_ERR_UNSUP means 'no control channel here'; refuse with another code")
        super().__init__(f"{message} ({P.reply_name(code)})")
        self.code = code
        self.message = message


class ControlUnsupported(ControlError):
    """The server does not know NBD_OPT_X_REPLFS (it answered
    NBD_REP_ERR_UNSUP): a plain NBD server.  ``message`` is its text."""

    code = P.NBD_REP_ERR_UNSUP

    def __init__(self, message: str = ""):
        super().__init__(f"server does not support the replfs control channel: {message or 'NBD_REP_ERR_UNSUP'}")
        self.message = message
