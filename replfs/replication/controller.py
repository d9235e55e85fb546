"""What the two roles share: the stage, the actions, the error, the status.

Design note
-----------
QEMU's ``ReplicationOps`` is ``{start, checkpoint, get_error, stop}``; a
replfs controller is the same idea for one mount (all its disks):

* the actions are ``checkpoint()``, ``failover()`` and ``stop()``, listed by
  :meth:`Controller.actions` (the control files dispatch through that map,
  never by attribute name); each first asks the stage table
  (:meth:`Controller.admit`), which refuses with an errno and a reason, or
  says the action is a no-op;
* :meth:`record_error` keeps the last failure in words (``last_error`` in
  the status); :meth:`run_action` records the reason of a failed or refused
  action (``action_error``, and ``last_error`` too unless a reason is kept
  there: :meth:`_keeps_last_error`, a primary out of sync keeps why it
  degraded), so the FUSE edge never writes controller state;
* the stage changes only in :meth:`enter`, which checks the role's
  transition table and then lets the subclass configure its graph for the
  new stage (:meth:`_configure`);
* a controller is built from its configuration first, and its graph is
  attached afterwards (``attach``): the graph's error hooks are the
  controller's bound methods, passed at construction, so nobody patches
  anybody's fields.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Awaitable, Callable

from replfs.errors import BlockError
from replfs.replication.stage import (
    TRANSITIONS,
    Op,
    ReplicationStage,
    Role,
    Verdict,
    verdict,
)

log = logging.getLogger("replfs.replication")


class Controller(abc.ABC):
    role: Role

    def __init__(self) -> None:
        self.stage = ReplicationStage.REPLICATING
        self.last_error: str | None = None
        self.action_error: str | None = None
        self.checkpoints = 0

    # -- stage --------------------------------------------------------------------
    @property
    def state(self) -> str:
        """The stage as the status file shows it."""
        return self.stage.value

    def verdict(self, op: Op) -> Verdict:
        return verdict(self.role, self.stage, op, self.peer_connected)

    def admit(self, op: Op) -> bool:
        """Raise the table's refusal for ``op``; False if it is a no-op."""
        v = self.verdict(op)
        if not v.allowed:
            raise BlockError(v.errno, v.message(op, self.stage, left=self.sync_left()))
        return not v.noop

    def sync_left(self) -> int | str:
        """Bytes a running resync has left (for a refusal's reason)."""
        return "?"

    def enter(self, stage: ReplicationStage) -> None:
        """Change the stage (a legal transition only), then configure the graph."""
        if stage is self.stage:
            return
        if stage not in TRANSITIONS[self.role][self.stage]:
            raise RuntimeError(f"{self.role.value}: no transition {self.stage.value} -> "
                               f"{stage.value}")
        log.info("%s: %s -> %s", self.role.value, self.stage.value, stage.value)
        self.stage = stage
        self._configure(stage)

    @abc.abstractmethod
    def _configure(self, stage: ReplicationStage) -> None:
        """Set the graph's enforcement points as the table says for ``stage``."""

    # -- errors -------------------------------------------------------------------
    def record_error(self, reason: str) -> None:
        self.last_error = reason
        log.error("%s", reason)

    def record_refusal(self, reason: str) -> None:
        """An action failed or was refused: its reason goes to ``action_error``
        and, unless a more important reason is kept there, ``last_error``."""
        self.action_error = reason
        if not self._keeps_last_error():
            self.last_error = reason
        log.warning("%s", reason)

    def _keeps_last_error(self) -> bool:
        return False

    def get_error(self) -> str | None:
        return self.last_error

    # -- actions ------------------------------------------------------------------
    @abc.abstractmethod
    async def checkpoint(self) -> None: ...

    @abc.abstractmethod
    async def failover(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """On unmount: flush, disconnect, close the graph."""

    def actions(self) -> dict[str, Callable[..., Awaitable[None]]]:
        """The actions by name (the control files and commands run these)."""
        return {"checkpoint": self.checkpoint, "failover": self.failover, "stop": self.stop}

    async def run_action(self, name: str, *args) -> None:
        """Run one action; a failure is recorded in ``last_error`` and re-raised."""
        action = self.actions()[name]
        try:
            await action(*args)
        except BlockError as exc:
            self.record_refusal(str(exc))
            raise
        except Exception as exc:
            self.record_refusal(f"{name}: internal error: {exc!r}")
            log.error("%s failed", name, exc_info=exc)
            raise
        self.action_error = None
        log.info("%s done", name)

    # -- status -------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def peer_connected(self) -> bool: ...

    def status(self) -> dict:
        return {
            "role": self.role.value,
            "state": self.state,
            "pid": os.getpid(),
            "peer_connected": self.peer_connected,
            "checkpoints": self.checkpoints,
            "last_error": self.last_error,
            "action_error": self.action_error,
        }
