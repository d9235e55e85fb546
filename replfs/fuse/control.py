"""The control files' values, dispatch and errno mapping.

``echo 1 > MOUNT/.replfs/ACTION`` runs one action of the controller and the
``write()`` returns once it is done; a refused or failed action fails the
``write()`` with the action's errno and the reason in the status file's
``action_error`` (and ``last_error``, unless that keeps why a primary
degraded).  A value that means nothing goes to ``action_error`` only: a typo
never hides the last real error.  Accepted values: ``1 y yes true on now`` or the action's
own name (case and surrounding white space ignored), and for three actions
an argument instead: ``failover`` takes ``force``, ``resync`` takes
``full``, ``connect`` takes ``HOST:PORT`` (another secondary).
"""

from __future__ import annotations

import errno
import logging
import re

import pyfuse3

from replfs.errors import BlockError, UsageError

log = logging.getLogger("replfs.fuse")

#: The control files that run an action, by name.
ACTIONS = ("checkpoint", "failover", "stop", "connect", "disconnect", "resync")

#: Actions that take one word instead of "1": the word -> the argument.
FLAGS = {"failover": {b"force": True}, "resync": {b"full": True}}

#: Values a control file accepts (besides the action's own name).
YES = {b"1", b"y", b"yes", b"true", b"on", b"now"}


def parse(action: str, value: bytes) -> tuple:
    """The action's arguments for a write of ``value``; UsageError if the
    value means nothing to it."""
    word = value.strip().lower()
    if word in YES or word == action.encode():
        return ()
    if word in FLAGS.get(action, {}):
        return (FLAGS[action][word],)
    if action == "connect" and _HOSTPORT.fullmatch(value.strip()):
        return (value.strip().decode(),)
    raise UsageError(f"{action}: unknown value {value.strip()[:40]!r} "
                     f"(write 1 to run the action)")


_HOSTPORT = re.compile(rb"\[?[A-Za-z0-9_.:-]+\]?:[0-9]{1,5}")


async def run(controller, action: str, value: bytes) -> None:
    """Run ``action`` for a write of ``value``; errors as ``FUSEError``."""
    try:
        args = parse(action, value)
    except UsageError as exc:  # a typo: said in action_error, not over a real error
        controller.action_error = str(exc)
        raise pyfuse3.FUSEError(errno.EINVAL) from None
    try:
        await controller.run_action(action, *args)
    except BlockError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None
    except Exception:
        raise pyfuse3.FUSEError(errno.EIO) from None
