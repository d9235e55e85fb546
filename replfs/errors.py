"""Errors that carry an errno inside.

Every layer raises :class:`BlockError`; only the edges translate it (an NBD
error reply, a ``pyfuse3.FUSEError``, a CLI exit status).  ``errno`` is
always one of the :mod:`errno` constants.
"""

import errno as _errno


class ReplfsError(Exception):
    """Base class: something replfs can explain in one line.  ``exit_code``
    is the command's exit status when it ends with this error."""

    exit_code = 1


class BlockError(ReplfsError):
    """An I/O request failed with ``self.errno``; ``str()`` says why."""

    def __init__(self, err: int, message: str | None = None):
        self.errno = err
        super().__init__(message or _errno.errorcode.get(err, str(err)))

    @classmethod
    def from_oserror(cls, exc: OSError, what: str) -> "BlockError":
        err = exc.errno if exc.errno is not None else _errno.EIO
        return cls(err, f"{what}: {exc.strerror or exc}")


class UsageError(ReplfsError):
    """Bad input from the user (command line, control file)."""


class PeerUnavailable(ReplfsError):
    """The peer cannot be reached (yet): worth retrying later."""

    exit_code = 75  # EX_TEMPFAIL


class PeerMismatch(ReplfsError):
    """The peer is not this pair's (a size, export or history mismatch):
    retrying will not help."""

    exit_code = 78  # EX_CONFIG
