"""The control files' values, dispatch and errno mapping.

``echo 1 > MOUNT/.replfs/ACTION`` runs one action of the controller and the
``write()`` returns once it is done; a refused or failed action fails the
``write()`` with the action's errno and the reason in the status file's
``action_error`` (and ``last_error``, unless that keeps why a primary
degraded).  A value that means nothing goes to ``action_error`` only: a typo
never hides the last real error.  Accepted values: ``1 y yes true on now`` or the action's
own name (case and surrounding white space ignored), and for some actions
an argument instead: ``failover`` takes ``force``, ``resync`` takes
``full``, ``checkpoint`` takes ``pair`` (on the primary: both sides, one
cut), ``connect`` takes ``HOST:PORT`` (another secondary), and
``verify`` takes ``repair`` and/or ``rate=BYTES/s`` (e.g. ``repair rate=100M``),
or ``cancel`` (the running verify stops; its own write fails with ECANCELED).
"""

from __future__ import annotations

import errno
import logging
import re
from collections.abc import Callable

import pyfuse3
import trio

from replfs.errors import BlockError, UsageError
from replfs.units import parse_size

log = logging.getLogger("replfs.fuse")

#: The control files that run an action, by name.
ACTIONS = ("checkpoint", "failover", "stop", "connect", "disconnect", "resync", "verify",
           "reprotect")

#: Actions that take one word instead of "1": the word -> the argument.
FLAGS = {"failover": {b"force": True}, "resync": {b"full": True},
         "checkpoint": {b"pair": True}}

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
    if action in ("connect", "reprotect") and _HOSTPORT.fullmatch(value.strip()):
        return (value.strip().decode(),)
    if action == "verify":
        return parse_verify(word)
    raise UsageError(f"{action}: unknown value {value.strip()[:40]!r} "
                     f"(write 1 to run the action)")


def parse_verify(word: bytes) -> tuple:
    """``verify``'s words, in any order: ``repair`` and ``rate=BYTES/s``
    (e.g. ``repair rate=100M``) -> ``(repair, rate)``; ``cancel`` alone (stop
    the running verify) -> ``(False, None, True)``."""
    if word == b"cancel":
        return False, None, True
    repair, rate = False, None
    for w in word.split():
        if w == b"repair" and not repair:
            repair = True
        elif w.startswith(b"rate=") and rate is None:
            try:
                rate = parse_size(w[5:].decode("ascii", "replace").removesuffix("/s"))
            except ValueError:
                rate = 0
            if rate <= 0:
                raise UsageError(f"verify: bad rate {w[5:][:40]!r} (bytes per second, "
                                 f"e.g. rate=100M)")
        else:
            raise UsageError(f"verify: unknown value {word[:40]!r} (write 1, repair, "
                             f"rate=BYTES/s or repair rate=BYTES/s)")
    return repair, rate


_HOSTPORT = re.compile(rb"\[?[A-Za-z0-9_.:-]+\]?:[0-9]{1,5}")


#: Actions that may run long (the write returns when they are done): a
#: signal to the writer cancels them (see :func:`run_interruptible`).
CANCELLABLE = ("verify",)


async def run_interruptible(controller, action: str, value: bytes,
                            interrupted: Callable[[], bool], poll: float) -> None:
    """:func:`run`, for a :data:`CANCELLABLE` action: every ``poll`` seconds
    ``interrupted()`` says whether the writer has a signal to take (a
    Ctrl-C); then the action is cancelled (its ``cancel`` value) and the
    write fails with EINTR.  Design note: the kernel waits for a FUSE write's
    answer even through a signal (pyfuse3 does not pass FUSE_INTERRUPT on),
    and it serialises writes to one file, so neither the signal nor a second
    write of ``cancel`` to the same file could end a long action by itself."""
    hit = False
    failure = None

    async def watch() -> None:
        nonlocal hit
        while not interrupted():
            await trio.sleep(poll)
        hit = True
        await controller.actions()[action](*parse(action, b"cancel"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        try:
            await run(controller, action, value)
        except pyfuse3.FUSEError as exc:
            failure = exc
        finally:
            nursery.cancel_scope.cancel()
    if hit:
        raise pyfuse3.FUSEError(errno.EINTR)
    if failure is not None:
        raise failure


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
