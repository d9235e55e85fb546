"""FaultLayer: the spec syntax and what each rule does."""

import errno

import pytest
import trio
import trio.testing

from replfs.block.base import BlockNode
from replfs.block.fault import FaultLayer, parse_rules
from replfs.block.raw import RawImage
from replfs.errors import BlockError, UsageError


@pytest.fixture
def disk(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(b"d" * 256 * 1024)
    node = RawImage(p)
    yield node
    node.close()


async def outcome(fn, *args):
    try:
        await fn(*args)
        return "ok"
    except BlockError as e:
        return errno.errorcode[e.errno]


def test_parse():
    rules, seed = parse_rules(
        " write:EIO@0-64K , read:EIO:count=1, flush:EIO,write|zero:ENOSPC:skip=3,"
        "delay=0.5, read:delay=0:prob=0.25, seed=7, trim:28@1M-2M"
    )
    assert seed == 7 and len(rules) == 7
    w = rules[0]
    assert w.ops == {"write"} and w.err == errno.EIO and (w.start, w.end) == (0, 65536)
    assert rules[1].count == 1 and rules[2].ops == {"flush"}
    assert rules[3].ops == {"write", "zero"} and rules[3].skip == 3 and rules[3].err == errno.ENOSPC
    assert rules[4].err is None and rules[4].delay == 0.5 and len(rules[4].ops) == 5
    assert rules[5].prob == 0.25 and rules[5].ops == {"read"}
    assert rules[6].err == 28 and rules[6].start == 1 << 20
    assert parse_rules("") == ([], 0)
    assert parse_rules("EIO")[0][0].ops == {"read", "write", "zero", "trim", "flush"}
    assert parse_rules("any:EIO")[0][0].ops == parse_rules("*:EIO")[0][0].ops


@pytest.mark.parametrize(
    "bad",
    ["write:EWHAT", "write", "write:EIO@5-5", "write:EIO@x-3", "read:EIO:bogus=1",
     "read:EIO:prob=2", "delay=-1", "read:EIO:count=x"],
)
def test_parse_errors(bad):
    with pytest.raises(UsageError):
        parse_rules(bad)


def test_errors_by_op_and_range(disk):
    node = FaultLayer(disk, "write:EIO@0-64K,flush:ENOSPC")

    async def main():
        assert await outcome(node.write, 65535, b"ab") == "EIO"  # overlaps
        assert await outcome(node.write, 65536, b"ab") == "ok"
        assert await outcome(node.read, 0, 10) == "ok"
        assert await outcome(node.write_zeroes, 0, 10) == "ok"
        assert await outcome(node.write, 0, b"") == "ok"  # empty: no overlap
        assert await outcome(node.flush) == "ENOSPC"
        assert node.injected == 2
        node.set_rules("")
        assert await outcome(node.write, 0, b"x") == "ok"
        assert await outcome(node.flush) == "ok"
        # Bounds checks still come first.
        assert await outcome(node.write, 256 * 1024, b"x") == "ENOSPC"
        assert await outcome(node.read, 256 * 1024, 1) == "EINVAL"

    trio.run(main)
    assert node.statistics()["injected"] == 2


def test_count_and_skip(disk):
    node = FaultLayer(disk, "read:EIO:skip=1:count=2")

    async def main():
        results = [await outcome(node.read, 0, 1) for _ in range(5)]
        assert results == ["ok", "EIO", "EIO", "ok", "ok"]

    trio.run(main)


def test_probability_is_seeded(disk):
    async def run(spec):
        node = FaultLayer(disk, spec)
        return [await outcome(node.read, 0, 1) for _ in range(200)]

    a = trio.run(run, "read:EIO:prob=0.3,seed=5")
    b = trio.run(run, "read:EIO:prob=0.3,seed=5")
    assert a == b and 30 < a.count("EIO") < 90


def test_delay_and_passthrough(disk):
    node = FaultLayer(disk, "write:delay=2,read:delay=0.5@0-10")

    async def main():
        t = trio.current_time()
        await node.write(0, b"hello")
        assert trio.current_time() - t == 2
        t = trio.current_time()
        assert await node.read(0, 5) == b"hello"
        assert trio.current_time() - t == 0.5
        t = trio.current_time()
        await node.read(100, 5)
        await node.trim(0, 1)
        await node.write_zeroes(1, 1)
        await node.flush()
        assert trio.current_time() - t == 0
        assert await node.read(0, 3) == b"\0\0l"
        assert node.allocation(0, 10) == disk.allocation(0, 10)
        assert node.size == disk.size and node.delayed == 3

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_transparent_to_hints_capabilities_and_close(disk):
    """Rules apply to requests only: writeback hints, abort, the capabilities
    and allocation are the child's.  Empty requests never reach a rule."""
    node = FaultLayer(disk, "EIO")  # every request fails

    class Remote(BlockNode):
        can_abort = True
        size, aborted = 4096, 0

        def abort(self):
            self.aborted += 1

    async def main():
        assert await outcome(node.read, 0, 1) == "EIO"
        assert await outcome(node.write, 0, b"") == "ok"  # empty: no-op before any rule
        await node.start_writeback(0, 4096)
        assert node.allocation(0, 10) == disk.allocation(0, 10)

    trio.run(main)
    assert node.can_writeback and not node.can_abort
    assert node.children() == {"file": disk}
    remote = Remote()
    over_remote = FaultLayer(remote)
    assert over_remote.can_abort and not over_remote.can_writeback
    over_remote.abort()
    assert remote.aborted == 1
    node.close()  # closes nothing: the graph owns the child
    assert trio.run(disk.read, 0, 1) == b"d"
