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
  anybody's fields;
* the controller owns the mount's event stream (``events``, an
  :class:`~replfs.events.EventHub`) and publishes from these same central
  points: :meth:`enter` (``state``), :meth:`record_error` and
  :meth:`record_refusal` (``error``), :meth:`checkpoint_done`
  (``checkpoint``), :meth:`note_peer` (``peer``); the subclasses add
  ``resync`` progress and ``failover``.  Nothing is published from the data
  path.  The timestamps (``last_checkpoint_at``, ``degraded_since``) are
  unix seconds (float), null when not applicable; ``degraded_since`` is the
  time since which the mount has not been both "replicating" and connected
  to its peer.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Awaitable, Callable

from replfs.errors import BlockError
from replfs.events import EventHub
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
        #: Unix seconds of the last checkpoint this daemon ran; None before one.
        self.last_checkpoint_at: float | None = None
        #: Unix seconds since which the mount is not "replicating" with its peer
        #: connected; None while it is (:meth:`_update_degraded`).
        self.degraded_since: float | None = time.time()
        #: Replication errors recorded (:meth:`record_error`) since the start.
        self.errors = 0
        self.events = EventHub(self.event_snapshot)
        self._peer_seen = False

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
        previous, self.stage = self.stage, stage
        self._configure(stage)
        self.note_peer()
        self._update_degraded()
        self.events.publish("state", state=stage.value, previous=previous.value,
                            degraded_since=self.degraded_since, last_error=self.last_error)

    def _update_degraded(self) -> None:
        """Start or clear ``degraded_since`` after a change of the stage or peer."""
        if self.stage is ReplicationStage.REPLICATING and self.peer_connected:
            self.degraded_since = None
        elif self.degraded_since is None:
            self.degraded_since = time.time()

    def note_peer(self) -> None:
        """Publish a ``peer`` event if the peer came or went since last time
        (called after anything that may attach or drop it)."""
        connected = self.peer_connected
        if connected == self._peer_seen:
            return
        self._peer_seen = connected
        self._update_degraded()
        self.events.publish("peer", peer_connected=connected, **self.peer_fields())

    def peer_fields(self) -> dict:
        """Extra fields of a ``peer`` event (e.g. the peer's address)."""
        return {}

    @abc.abstractmethod
    def _configure(self, stage: ReplicationStage) -> None:
        """Set the graph's enforcement points as the table says for ``stage``."""

    # -- errors -------------------------------------------------------------------
    def record_error(self, reason: str) -> None:
        self.last_error = reason
        self.errors += 1
        log.error("%s", reason)
        self.events.publish("error", error=reason, state=self.state)

    def record_refusal(self, reason: str) -> None:
        """An action failed or was refused: its reason goes to ``action_error``
        and, unless a more important reason is kept there, ``last_error``."""
        self.action_error = reason
        if not self._keeps_last_error():
            self.last_error = reason
        log.warning("%s", reason)
        self.events.publish("error", action_error=reason, state=self.state)

    def _keeps_last_error(self) -> bool:
        return False

    def get_error(self) -> str | None:
        return self.last_error

    # -- actions ------------------------------------------------------------------
    def checkpoint_done(self) -> None:
        """Count a completed checkpoint, note its time, publish it."""
        self.checkpoints += 1
        self.last_checkpoint_at = time.time()
        self.events.publish("checkpoint", checkpoints=self.checkpoints,
                            last_checkpoint_at=self.last_checkpoint_at, state=self.state)

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
            "last_checkpoint_at": self.last_checkpoint_at,
            "degraded_since": self.degraded_since,
            "replication_errors": self.errors,
            "last_error": self.last_error,
            "action_error": self.action_error,
        }

    def event_snapshot(self) -> dict:
        """The fields of the event stream's ``exists`` line: the state now."""
        return {
            "role": self.role.value,
            "state": self.state,
            "peer_connected": self.peer_connected,
            "checkpoints": self.checkpoints,
            "last_checkpoint_at": self.last_checkpoint_at,
            "degraded_since": self.degraded_since,
            "last_error": self.last_error,
            "sync": self.sync_status(),
        }

    def sync_status(self) -> dict | None:
        """A running resync's progress (the status's ``sync``), else None."""
        return None
