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
degraded primary, a secondary with no primary connected: :data:`NEEDS_PEER`);
``EBUSY`` while a resync runs (a checkpoint asserts that the two disks are
equal); ``EINVAL`` when the stage itself forbids it (after a failover or a
stop, on either side); ``ESHUTDOWN`` for the primary's writes that a
failed-over or stopped secondary no longer takes.
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
    SYNCING = "syncing"            # a resync runs: the secondary is being brought level
    DEGRADED = "degraded"          # primary only: no secondary (it failed, or disconnect)
    INCONSISTENT = "inconsistent"  # secondary only: restarted without the way back to
                                   # its last checkpoint; a resync from the primary first
    FAILED_OVER = "failed-over"
    STOPPED = "stopped"


class Op(enum.Enum):
    VM_IO = "vm-io"                # the VM's requests on MOUNT/NAME
    REPLICATE = "replicate"        # primary: send writes on; secondary: take them
    PEER_CONNECT = "peer-connect"  # secondary: admit a primary's NBD connection
    CHECKPOINT = "checkpoint"
    FAILOVER = "failover"
    STOP = "stop"
    CONNECT = "connect"            # primary: (re)connect to a secondary now
    DISCONNECT = "disconnect"      # primary: drop the secondary on purpose, no retries
    RESYNC = "resync"              # primary: resync (--full: every cluster)
    VERIFY = "verify"              # primary: compare with the secondary online (repair)
    REPROTECT = "reprotect"        # secondary, failed over: become the primary of a new secondary


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    noop: bool = False   # allowed, and there is nothing to do
    errno: int = 0
    reason: str = ""     # may contain {stage}, and {left} (bytes a resync has left)

    def message(self, op: Op, stage: ReplicationStage, **context) -> str:
        context.setdefault("left", "?")
        return f"{op.value}: {self.reason.format(stage=stage.value, **context)}"


ALLOW = Verdict(True)
NOOP = Verdict(True, noop=True)


def refuse(err: int, reason: str) -> Verdict:
    return Verdict(False, errno=err, reason=reason)


_R, _Y, _D, _I, _F, _S = (
    ReplicationStage.REPLICATING, ReplicationStage.SYNCING, ReplicationStage.DEGRADED,
    ReplicationStage.INCONSISTENT, ReplicationStage.FAILED_OVER, ReplicationStage.STOPPED)
_NOT_REPLICATING = "not replicating (state {stage})"
_NO_PEER = refuse(errno.ENOTCONN, "no secondary: the primary runs alone (state {stage})")
_RESYNCING = refuse(errno.EBUSY, "resync in progress, {left} bytes left")
_STOPPED = refuse(errno.EINVAL, "replication is stopped")
_PRIMARY_ONLY = refuse(errno.EINVAL, "run it on the primary")
_IS_PRIMARY = refuse(errno.EINVAL, "this mount is a primary already (to change its "
                                   "secondary: connect HOST:PORT)")
_NOT_FAILED_OVER = refuse(errno.EINVAL, "only a failed-over mount can become a primary "
                                        "(state {stage})")

#: What each role accepts in each of its stages.
TABLE: dict[tuple[Role, ReplicationStage], dict[Op, Verdict]] = {
    (Role.PRIMARY, _R): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.CHECKPOINT: ALLOW,
        Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
        Op.CONNECT: NOOP, Op.DISCONNECT: ALLOW, Op.RESYNC: ALLOW,
        Op.VERIFY: ALLOW,
        Op.REPROTECT: _IS_PRIMARY,
    },
    (Role.PRIMARY, _Y): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.CHECKPOINT: _RESYNCING,
        Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
        Op.CONNECT: NOOP, Op.DISCONNECT: ALLOW, Op.RESYNC: ALLOW,
        Op.VERIFY: _RESYNCING,
        Op.REPROTECT: _IS_PRIMARY,
    },
    (Role.PRIMARY, _D): {
        Op.VM_IO: ALLOW, Op.REPLICATE: _NO_PEER,
        Op.CHECKPOINT: refuse(errno.ENOTCONN, _NOT_REPLICATING),
        Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
        Op.CONNECT: ALLOW, Op.DISCONNECT: ALLOW, Op.RESYNC: _NO_PEER,
        Op.VERIFY: _NO_PEER,
        Op.REPROTECT: _IS_PRIMARY,
    },
    (Role.PRIMARY, _F): {
        Op.VM_IO: ALLOW, Op.REPLICATE: _NO_PEER,
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: NOOP, Op.STOP: ALLOW,
        Op.CONNECT: ALLOW, Op.DISCONNECT: NOOP, Op.RESYNC: _NO_PEER,
        Op.VERIFY: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.REPROTECT: _IS_PRIMARY,
    },
    (Role.PRIMARY, _S): {
        Op.VM_IO: ALLOW, Op.REPLICATE: _NO_PEER,
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: _STOPPED, Op.STOP: NOOP,
        Op.CONNECT: _STOPPED, Op.DISCONNECT: NOOP, Op.RESYNC: _STOPPED,
        Op.VERIFY: _STOPPED,
        Op.REPROTECT: _IS_PRIMARY,
    },
    (Role.SECONDARY, _R): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.PEER_CONNECT: ALLOW,
        Op.CHECKPOINT: ALLOW, Op.FAILOVER: ALLOW, Op.STOP: ALLOW,
        Op.RESYNC: _PRIMARY_ONLY, Op.VERIFY: _PRIMARY_ONLY,
        Op.REPROTECT: _NOT_FAILED_OVER,
    },
    (Role.SECONDARY, _Y): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.PEER_CONNECT: ALLOW,
        Op.CHECKPOINT: _RESYNCING, Op.FAILOVER: ALLOW, Op.STOP: _RESYNCING,
        Op.RESYNC: _PRIMARY_ONLY, Op.VERIFY: _PRIMARY_ONLY,
        Op.REPROTECT: _NOT_FAILED_OVER,
    },
    (Role.SECONDARY, _I): {
        Op.VM_IO: ALLOW, Op.REPLICATE: ALLOW, Op.PEER_CONNECT: ALLOW,
        Op.CHECKPOINT: refuse(errno.EBUSY, "inconsistent: the secondary needs a resync "
                                           "from the primary first"),
        Op.FAILOVER: ALLOW,  # only with --force: the controller checks failover_ready
        Op.STOP: refuse(errno.EBUSY, "inconsistent: the secondary needs a resync "
                                     "from the primary first"),
        Op.RESYNC: _PRIMARY_ONLY, Op.VERIFY: _PRIMARY_ONLY,
        Op.REPROTECT: _NOT_FAILED_OVER,
    },
    (Role.SECONDARY, _F): {
        Op.VM_IO: ALLOW,
        Op.REPLICATE: refuse(errno.ESHUTDOWN, "failed over, replication writes refused"),
        Op.PEER_CONNECT: refuse(errno.ESHUTDOWN,
                                "split brain: this secondary has failed over and takes "
                                "no primary"),
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: NOOP,
        Op.STOP: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.RESYNC: _PRIMARY_ONLY, Op.VERIFY: _PRIMARY_ONLY,
        Op.REPROTECT: ALLOW,
    },
    (Role.SECONDARY, _S): {
        Op.VM_IO: ALLOW,
        Op.REPLICATE: refuse(errno.ESHUTDOWN, "replication stopped, writes refused"),
        Op.PEER_CONNECT: refuse(errno.ESHUTDOWN,
                                "replication is stopped on this secondary"),
        Op.CHECKPOINT: refuse(errno.EINVAL, _NOT_REPLICATING),
        Op.FAILOVER: ALLOW,
        Op.STOP: NOOP,
        Op.RESYNC: _PRIMARY_ONLY, Op.VERIFY: _PRIMARY_ONLY,
        Op.REPROTECT: _NOT_FAILED_OVER,
    },
}

#: Ops that need the peer connected, whatever the stage (a secondary's
#: checkpoint asserts that its disk equals a primary's: with no primary
#: connected that cannot be known, and it would throw away the way back).
NEEDS_PEER: frozenset[tuple[Role, Op]] = frozenset({(Role.SECONDARY, Op.CHECKPOINT)})
_NO_PRIMARY = refuse(errno.ENOTCONN, "no primary connected")

#: The stage changes each role may make.
TRANSITIONS: dict[Role, dict[ReplicationStage, frozenset[ReplicationStage]]] = {
    Role.PRIMARY: {
        _R: frozenset({_Y, _D, _F, _S}),
        _Y: frozenset({_R, _D, _F, _S}),
        _D: frozenset({_Y, _F, _S}),
        _F: frozenset({_Y, _S}),
        _S: frozenset(),
    },
    Role.SECONDARY: {
        _R: frozenset({_Y, _F, _S}),
        _Y: frozenset({_R, _I, _F}),
        _I: frozenset({_Y, _R, _F}),
        _F: frozenset(),
        _S: frozenset({_F}),
    },
}


def stages(role: Role) -> tuple[ReplicationStage, ...]:
    """The stages ``role`` can be in, in declaration order."""
    return tuple(s for s in ReplicationStage if (role, s) in TABLE)


def ops(role: Role) -> tuple[Op, ...]:
    """The ops that mean something for ``role``."""
    return tuple(TABLE[(role, ReplicationStage.REPLICATING)])


def verdict(role: Role, stage: ReplicationStage, op: Op,
            peer_connected: bool = True) -> Verdict:
    v = TABLE[(role, stage)][op]
    if v.allowed and not v.noop and not peer_connected and (role, op) in NEEDS_PEER:
        return _NO_PRIMARY
    return v
