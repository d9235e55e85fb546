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
"""

from __future__ import annotations

import errno

from replfs.errors import ReplfsError

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError"]


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
