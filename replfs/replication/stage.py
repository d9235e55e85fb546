"""The replication stage of a host, and the one table of what each stage allows.

Design note
-----------
QEMU's ``block/replication.c`` keeps one ``ReplicationStage`` enum and one
``replication_get_io_status()`` switch that says, for the stage and the
mode, whether a request may go on.  replfs does the same for both roles,
for the I/O edges *and* the actions, in :data:`TABLE`:

* every (role, stage, op) has exactly one :class:`Verdict` (a unit test walks
  the whole table): allowed, a no-op (the action's result already holds), or
  refused with an errno and a reason;
* the controllers (``replication/primary.py``, ``secondary.py``) ask the
  table before an action and, on entering a stage, configure the block
  graph's enforcement points from it (the gated nodes' refusals, the NBD
  server's admission, the mirror's peer edge), so the hot path tests one
  attribute and never a stage;
* :data:`TRANSITIONS` lists the stage changes each role may make; a
  controller changes its stage only through
  :meth:`~replfs.replication.controller.Controller.enter`, which checks it.

The stage's value is what the status file shows as ``state``.

Errnos: ``ENOTCONN`` when the action needs a peer that is not there (a
degraded primary); ``EINVAL`` when the stage itself forbids it (after a
failover or a stop, on either side); ``ESHUTDOWN`` for the primary's writes
that a failed-over or stopped secondary no longer takes.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass


class Role(enum.Enum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ReplicationStage(enum.Enum):
    REPLICATING = "replicating"
    DEGRADED = "degraded"        # primary only: the secondary failed, running alone
    FAILED_OVER = "failed-over"
    STOPPED = "stopped"


class Op(enum.Enum):
    VM_IO = "vm-io"                # the VM's requests on MOUNT/NAME
    REPLICATE = "replicate"        # primary: send writes on; secondary: take them
    PEER_CONNECT = "peer-connect"  # secondary: admit a primary's NBD connection
    CHECKPOINT = "checkpoint"
    FAILOVER = "failover"
    STOP = "stop"


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    noop: bool = False   # allowed, and there is nothing to do
    errno: int = 0
    reason: str = ""     # may contain {stage}

    def message(self, op: Op, stage: ReplicationStage) -> str:
        return f"{op.value}: {self.reason.format(stage=stage.value)}"


ALLOW = Verdict(True)
NOOP = Verdict(True, noop=True)


def refuse(err: int, reason: str) -> Verdict:
    return Verdict(False, errno=err, reason=reason)


_R, _D, _F, _S = (ReplicationStage.REPLICATING, ReplicationStage.DEGRADED,
                  ReplicationStage.FAILED_OVER, ReplicationStage.STOPPED)
_NOT_REPLICATING = "not replicating (state {stage})"
_NO_PEER = refuse(errno.ENOTCONN, "no secondary: the primary runs alone (state {stage})")

#: What each role accepts in each of its stages.
TABLE: dict[tuple[Role, ReplicationStage], dict[Op, Verdict]] = {
    (Role.PRIMARY, _R): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.CHECKPOINT: ALLOW,
        Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
    },
    (Role.PRIMARY, _D): {
        Op.VM_IO: ALLOW, Op.REPLICATE: _NO_PEER,
        Op.CHECKPOINT: refuse(errno.ENOTCONN, _NOT_REPLICATING),
        Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
    },
    (Role.PRIMARY, _F): {
        Op.VM_IO: ALLOW, Op.REPLICATE: _NO_PEER,
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: NOOP, Op.STOP: ALLOW,
    },
    (Role.PRIMARY, _S): {
        Op.VM_IO: ALLOW, Op.REPLICATE: _NO_PEER,
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: refuse(errno.EINVAL, "replication is stopped"),
        Op.STOP: NOOP,
    },
    (Role.SECONDARY, _R): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.PEER_CONNECT: ALLOW,
        Op.CHECKPOINT: ALLOW, Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
    },
    (Role.SECONDARY, _F): {
        Op.VM_IO: ALLOW,
        Op.REPLICATE: refuse(errno.ESHUTDOWN, "failed over, replication writes refused"),
        Op.PEER_CONNECT: refuse(errno.ESHUTDOWN,
                                "this secondary has failed over and takes no primary"),
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: NOOP,
        Op.STOP: refuse(errno.EINVAL, _NOT_REPLICATING),
    },
    (Role.SECONDARY, _S): {
        Op.VM_IO: ALLOW,
        Op.REPLICATE: refuse(errno.ESHUTDOWN, "replication stopped, writes refused"),
        Op.PEER_CONNECT: refuse(errno.ESHUTDOWN,
                                "replication is stopped on this secondary"),
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: ALLOW,
        Op.STOP: NOOP,
    },
}

#: The stage changes each role may make.
TRANSITIONS: dict[Role, dict[ReplicationStage, frozenset[ReplicationStage]]] = {
    Role.PRIMARY: {
        _R: frozenset({_D, _F, _S}),
        _D: frozenset({_F, _S}),
        _F: frozenset({_S}),
        _S: frozenset(),
    },
    Role.SECONDARY: {
        _R: frozenset({_F, _S}),
        _S: frozenset({_F}),
        _F: frozenset(),
    },
}


def stages(role: Role) -> tuple[ReplicationStage, ...]:
    """The stages ``role`` can be in, in declaration order."""
    return tuple(s for s in ReplicationStage if (role, s) in TABLE)


def ops(role: Role) -> tuple[Op, ...]:
    """The ops that mean something for ``role``."""
    return tuple(TABLE[(role, ReplicationStage.REPLICATING)])


def verdict(role: Role, stage: ReplicationStage, op: Op) -> Verdict:
    return TABLE[(role, stage)][op]
