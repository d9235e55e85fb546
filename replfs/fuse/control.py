"""The control files' values, dispatch and errno mapping.

``echo 1 > MOUNT/.replfs/ACTION`` runs one action of the controller and the
``write()`` returns once it is done; a refused or failed action fails the
``write()`` with the action's errno and the reason in the status file's
``last_error``.  Accepted values: ``1 y yes true on now`` or the action's
own name (case and surrounding white space ignored).
"""

from __future__ import annotations

import errno
import logging

import pyfuse3

from replfs.errors import BlockError

log = logging.getLogger("replfs.fuse")

#: The control files that run an action, by name.
ACTIONS = ("checkpoint", "failover", "stop")

#: Values a control file accepts (besides the action's own name).
YES = {b"1", b"y", b"yes", b"true", b"on", b"now"}


def parse(action: str, value: bytes) -> str | None:
    """None if ``value`` asks to run ``action``, else why not."""
    word = value.strip().lower()
    if word in YES or word == action.encode():
        return None
    return (f"{action}: unknown value {value.strip()[:40]!r} "
            f"(write 1 to run the action)")


async def run(controller, action: str, value: bytes) -> None:
    """Run ``action`` for a write of ``value``; errors as ``FUSEError``."""
    problem = parse(action, value)
    if problem is not None:
        controller.record_error(problem)
        raise pyfuse3.FUSEError(errno.EINVAL)
    try:
        await controller.run_action(action)
    except BlockError as exc:
        raise pyfuse3.FUSEError(exc.errno) from None
    except Exception:
        raise pyfuse3.FUSEError(errno.EIO) from None
