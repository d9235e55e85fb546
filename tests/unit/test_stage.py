"""The stage table: complete, consistent, and the controllers obey it."""

from __future__ import annotations

import errno
import itertools

import pytest
import trio

from replfs.errors import BlockError
from replfs.replication.primary import PrimaryController
from replfs.replication.secondary import SecondaryController
from replfs.replication.stage import (
    TABLE,
    TRANSITIONS,
    Op,
    ReplicationStage,
    Role,
    ops,
    stages,
    verdict,
)

R, Y, D, I, F, S = (
    ReplicationStage.REPLICATING, ReplicationStage.SYNCING, ReplicationStage.DEGRADED,
    ReplicationStage.INCONSISTENT, ReplicationStage.FAILED_OVER, ReplicationStage.STOPPED)


def test_the_stage_is_an_enum_whose_values_are_the_status_states():
    assert ReplicationStage.__name__.endswith("Stage")
    assert {s.value for s in ReplicationStage} == \
        {"replicating", "syncing", "degraded", "inconsistent", "failed-over", "stopped"}
    assert stages(Role.PRIMARY) == (R, Y, D, F, S)
    assert stages(Role.SECONDARY) == (R, Y, I, F, S)


@pytest.mark.parametrize("role", list(Role))
def test_every_stage_of_a_role_answers_every_op_of_the_role(role):
    for stage in stages(role):
        assert set(TABLE[(role, stage)]) == set(ops(role)), (role, stage)


def test_walk_the_whole_table():
    """Every verdict: refusals carry an errno and a reason; allowances don't."""
    seen = 0
    for (role, stage), row in TABLE.items():
        for op, v in row.items():
            seen += 1
            if v.allowed:
                assert v.errno == 0 and not v.reason, (role, stage, op)
            else:
                assert v.errno in (errno.ENOTCONN, errno.EINVAL, errno.ESHUTDOWN,
                                   errno.EBUSY), (role, stage, op)
                assert v.message(op, stage).startswith(f"{op.value}: ")
            # the VM's own I/O is never refused, in any stage (QEMU's rule:
            # replication errors are recorded, not returned)
            if op is Op.VM_IO:
                assert v.allowed and not v.noop
    assert seen == 5 * 10 + 5 * 9  # (primary: 10 ops, secondary: 9) x 5 stages each


@pytest.mark.parametrize("role,stage,op,expect", [
    (Role.PRIMARY, R, Op.REPLICATE, "allow"),
    (Role.PRIMARY, D, Op.REPLICATE, errno.ENOTCONN),
    (Role.PRIMARY, D, Op.CHECKPOINT, errno.ENOTCONN),   # no peer
    (Role.PRIMARY, F, Op.CHECKPOINT, errno.EINVAL),     # the stage forbids it
    (Role.PRIMARY, S, Op.CHECKPOINT, errno.EINVAL),
    (Role.PRIMARY, S, Op.FAILOVER, errno.EINVAL),
    (Role.PRIMARY, F, Op.FAILOVER, "noop"),
    (Role.PRIMARY, S, Op.STOP, "noop"),
    (Role.SECONDARY, R, Op.PEER_CONNECT, "allow"),
    (Role.SECONDARY, F, Op.PEER_CONNECT, errno.ESHUTDOWN),
    (Role.SECONDARY, S, Op.PEER_CONNECT, errno.ESHUTDOWN),
    (Role.SECONDARY, F, Op.REPLICATE, errno.ESHUTDOWN),
    (Role.SECONDARY, S, Op.REPLICATE, errno.ESHUTDOWN),
    (Role.SECONDARY, F, Op.CHECKPOINT, errno.EINVAL),
    (Role.SECONDARY, F, Op.STOP, errno.EINVAL),
    (Role.SECONDARY, S, Op.FAILOVER, "allow"),
    (Role.SECONDARY, F, Op.FAILOVER, "noop"),
    (Role.PRIMARY, Y, Op.CHECKPOINT, errno.EBUSY),      # a resync runs
    (Role.SECONDARY, Y, Op.CHECKPOINT, errno.EBUSY),
    (Role.SECONDARY, I, Op.CHECKPOINT, errno.EBUSY),    # needs a resync first
    (Role.SECONDARY, I, Op.REPLICATE, "allow"),         # ... which arrives as writes
    (Role.PRIMARY, D, Op.CONNECT, "allow"),
    (Role.PRIMARY, F, Op.CONNECT, "allow"),             # re-protect from failed-over
    (Role.PRIMARY, R, Op.CONNECT, "noop"),
    (Role.PRIMARY, S, Op.CONNECT, errno.EINVAL),
    (Role.PRIMARY, D, Op.RESYNC, errno.ENOTCONN),
    (Role.SECONDARY, R, Op.RESYNC, errno.EINVAL),       # run it on the primary
    (Role.PRIMARY, R, Op.VERIFY, "allow"),
    (Role.PRIMARY, Y, Op.VERIFY, errno.EBUSY),          # a resync runs
    (Role.PRIMARY, D, Op.VERIFY, errno.ENOTCONN),
    (Role.PRIMARY, F, Op.VERIFY, errno.EINVAL),
    (Role.SECONDARY, R, Op.VERIFY, errno.EINVAL),       # run it on the primary
])
def test_the_rules_that_the_docs_promise(role, stage, op, expect):
    v = verdict(role, stage, op)
    if expect == "allow":
        assert v.allowed and not v.noop
    elif expect == "noop":
        assert v.allowed and v.noop
    else:
        assert not v.allowed and v.errno == expect


@pytest.mark.parametrize("role", list(Role))
def test_transitions_stay_inside_the_role_and_end_somewhere(role):
    table = TRANSITIONS[role]
    assert set(table) == set(stages(role))
    for src, dsts in table.items():
        assert dsts <= set(stages(role)) and src not in dsts
    # every stage is reachable from "replicating"
    reach, todo = {R}, [R]
    while todo:
        for nxt in table[todo.pop()]:
            if nxt not in reach:
                reach.add(nxt)
                todo.append(nxt)
    assert reach == set(stages(role))


def _controller(role):
    if role is Role.PRIMARY:
        return PrimaryController("nowhere:1", 1.0)
    return SecondaryController()  # no graph attached: nothing to configure


@pytest.mark.parametrize("role", list(Role))
def test_a_controller_changes_stage_only_along_the_table(role):
    for src, dst in itertools.product(stages(role), repeat=2):
        if src is dst:
            continue
        ctl = _controller(role)
        ctl.stage = src
        if dst in TRANSITIONS[role][src]:
            ctl.enter(dst)
            assert ctl.stage is dst and ctl.state == dst.value
        else:
            with pytest.raises(RuntimeError):
                ctl.enter(dst)
            assert ctl.stage is src


@pytest.mark.parametrize("role", list(Role))
def test_a_controller_answers_actions_as_the_table_says(role):
    for stage in stages(role):
        for op in (Op.CHECKPOINT, Op.FAILOVER, Op.STOP):
            ctl = _controller(role)
            ctl.stage = stage
            v = verdict(role, stage, op, ctl.peer_connected)
            if v.allowed:
                assert ctl.admit(op) is (not v.noop)
            else:
                with pytest.raises(BlockError) as e:
                    ctl.admit(op)
                assert e.value.errno == v.errno
                assert stage.value in str(e.value) or not v.reason.count("{stage}")


def test_a_secondary_checkpoint_needs_a_connected_primary():
    v = verdict(Role.SECONDARY, R, Op.CHECKPOINT, peer_connected=False)
    assert not v.allowed and v.errno == errno.ENOTCONN
    assert "no primary connected" in v.message(Op.CHECKPOINT, R)
    assert verdict(Role.SECONDARY, R, Op.CHECKPOINT, peer_connected=True).allowed
    # a refusal for the stage still wins, and the primary's checkpoint is not affected
    assert verdict(Role.SECONDARY, F, Op.CHECKPOINT, peer_connected=False).errno == errno.EINVAL
    assert verdict(Role.PRIMARY, R, Op.CHECKPOINT, peer_connected=False).allowed


def test_a_resync_refusal_says_how_much_is_left():
    v = verdict(Role.PRIMARY, Y, Op.CHECKPOINT)
    assert v.message(Op.CHECKPOINT, Y, left=1234) == \
        "checkpoint: resync in progress, 1234 bytes left"


def test_refused_actions_change_nothing():
    ctl = _controller(Role.PRIMARY)
    ctl.stage = D

    async def main():
        with pytest.raises(BlockError):
            await ctl.checkpoint()

    trio.run(main)
    assert ctl.stage is D and ctl.checkpoints == 0
