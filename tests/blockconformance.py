"""One conformance suite for every BlockNode (raw, overlays, CBW, NBD...).

How to use it
-------------
Write a *factory*: a callable ``make_node(size, initial)`` returning an
**async context manager** that yields a ``BlockNode`` of exactly ``size``
bytes whose content reads as ``initial`` (``bytes``, ``len(initial) ==
size``), and that cleans up on exit (``close_graph([node])`` closes a whole
stack).  With ``contextlib``::

    @asynccontextmanager
    async def make_node(size, initial):
        path = tmp_path / "disk.img"
        path.write_bytes(initial)
        node = RawImage(path)
        try:
            yield node
        finally:
            close_graph([node])

An NBD factory starts a server over such a node and yields the client.  A
check may call the factory more than once, so it must hand out a fresh node
(fresh files) every time.

Then either run everything::

    trio.run(check_conformance, make_node)

or one pytest test per check (better failure reports)::

    @pytest.mark.parametrize("check", CHECKS, ids=check_id)
    def test_conformance(check, tmp_path):
        trio.run(check, factory(tmp_path))

Every check is ``async def check_xxx(make_node, size=DEFAULT_SIZE)``.  The
default size, 20 * 64 KiB + 12345 bytes, is a multiple of neither 512 nor
64 KiB, so the last cluster is short whatever the cluster size; the offsets
used sit on and around 512 B, 4 KiB and 64 KiB boundaries.  The initial
content is random (never all zeroes), so a layer that reveals the wrong
data, or reads zeroes where it should not, is caught.  After every check the
whole node is read back and compared with a ``bytearray`` model.
"""

from __future__ import annotations

import errno
import random
from contextlib import asynccontextmanager

import pytest
import trio

from replfs.block.base import BlockNode, close_graph, walk
from replfs.errors import BlockError

KiB = 1024
CL = 64 * KiB
DEFAULT_SIZE = 20 * CL + 12345
#: Reads of the whole node are split into requests of this size.
READ_STEP = 256 * KiB


def initial_content(size: int, seed: int = 1) -> bytes:
    data = bytearray(random.Random(seed).randbytes(size))
    # No zero bytes at all: a read of zeroes where data belongs cannot match.
    return bytes(data.replace(b"\x00", b"\x5a"))


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length).replace(b"\x00", b"\xa5")


def check_id(check) -> str:
    return check.__name__.removeprefix("check_")


async def expect_error(err: int, fn, *args) -> BlockError:
    try:
        await fn(*args)
    except BlockError as e:
        assert e.errno == err, f"{fn.__name__}{args[:2]}: errno {e.errno} ({e}), wanted {err}"
        return e
    raise AssertionError(f"{fn.__name__}{args[:2]} did not fail with errno {err}")


def first_difference(a, b) -> str:
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    for i in range(0, len(a), 4096):
        if a[i : i + 4096] != b[i : i + 4096]:
            j = next(k for k in range(i, min(i + 4096, len(a))) if a[k] != b[k])
            k = j
            while k < len(a) and a[k] != b[k]:
                k += 1
            return f"first difference at byte {j} (to {k}): got {bytes(a[j:j+8]).hex()} wanted {bytes(b[j:j+8]).hex()}"
    return "equal"


class Harness:
    """A node and its model, with write helpers that update both."""

    def __init__(self, node, initial: bytes):
        self.node = node
        self.model = bytearray(initial)
        self.size = len(initial)

    async def write(self, off: int, data, fua: bool = False) -> None:
        await self.node.write(off, data, fua)
        self.model[off : off + len(data)] = data

    async def zero(self, off: int, length: int, fua: bool = False) -> None:
        await self.node.write_zeroes(off, length, fua)
        self.model[off : off + length] = bytes(length)

    async def trim(self, off: int, length: int) -> None:
        await self.node.trim(off, length)
        self.model[off : off + length] = bytes(length)

    async def check_range(self, off: int, length: int) -> None:
        got = await self.node.read(off, length)
        assert isinstance(got, (bytes, bytearray)), type(got)
        want = self.model[off : off + length]
        assert got == want, f"read({off}, {length}): {first_difference(got, want)}"
        self.check_read_now(off, length)

    def check_read_now(self, off: int, length: int) -> None:
        """``read_now`` gives the same data as ``read``, or None."""
        got = self.node.read_now(off, length)
        if got is not None:
            want = self.model[off : off + length]
            assert got == want, f"read_now({off}, {length}): {first_difference(got, want)}"

    async def verify(self) -> None:
        parts = []
        for off in range(0, self.size, READ_STEP):
            parts.append(await self.node.read(off, min(READ_STEP, self.size - off)))
            self.check_read_now(off, min(READ_STEP, self.size - off))
        got = b"".join(parts)
        assert got == self.model, f"whole-node check: {first_difference(got, self.model)}"


class _Run:
    """``async with _Run(make_node, size) as h:`` -> Harness; verifies on exit."""

    def __init__(self, make_node, size: int, seed: int = 1):
        self.initial = initial_content(size, seed)
        self.cm = make_node(size, self.initial)

    async def __aenter__(self) -> Harness:
        node = await self.cm.__aenter__()
        self.h = Harness(node, self.initial)
        return self.h

    async def __aexit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                await self.h.verify()
        finally:
            await self.cm.__aexit__(exc_type, exc, tb)
        return False


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------


async def check_size_and_content(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        assert h.node.size == size, f"size {h.node.size}, wanted {size}"
        await h.check_range(0, size)
        for off, n in [(0, 1), (1, 511), (511, 2), (CL - 1, 2), (size - 1, 1), (size - 700, 700)]:
            await h.check_range(off, n)


async def check_aligned_writes(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        seed = 10
        for off, n in [(0, CL), (3 * CL, 2 * CL), (8 * CL, 4096), (8 * CL + 4096, 4096),
                       (10 * CL, 512), (11 * CL + 512, 1024), (0, 4096)]:
            seed += 1
            await h.write(off, pattern(n, seed))
            await h.check_range(off, n)
        await h.verify()
        # Overwrite what was written.
        await h.write(3 * CL, pattern(CL, 99))
        await h.check_range(2 * CL, 4 * CL)


async def check_unaligned_writes(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        cases = [
            (1, 2 * CL - 2),  # head and tail in neighbouring clusters
            (CL - 6, 12),  # straddles a cluster boundary
            (100, 300),  # inside one cluster, touching neither edge
            (511, 2),  # straddles a sector boundary
            (5 * CL - 7, 3 * CL + 14),  # head, two whole clusters, tail
            (4095, 4097 + CL),
            (9 * CL + 1, CL - 1),  # up to a cluster end
            (10 * CL, CL - 1),  # from a cluster start
            (12 * CL + 33, 5 * CL + 77),
        ]
        for i, (off, n) in enumerate(cases):
            await h.write(off, pattern(n, 100 + i))
            await h.check_range(max(0, off - 600), min(size, off + n + 600) - max(0, off - 600))
        # Unaligned writes over clusters that were already written.
        await h.write(3, pattern(7, 1000))
        await h.write(CL - 3, pattern(CL + 6, 1001))


async def check_one_byte_writes(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        offsets = [0, 1, 511, 512, 4095, 4096, CL - 1, CL, CL + 1, size // 2, size - 2, size - 1]
        for i, off in enumerate(offsets):
            await h.write(off, bytes([(i * 37 + 1) & 0xFF or 1]))
            await h.check_range(max(0, off - 2), min(size, off + 3) - max(0, off - 2))


async def check_last_cluster(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        tail = size % CL or CL
        await h.write(size - 1, b"\x01")
        await h.write(size - tail, pattern(tail, 201))  # the whole short cluster
        await h.write(size - tail - 10, pattern(20, 202))  # across into it
        await h.write(size - 100, pattern(50, 203))  # inside it
        await h.write(size - 3 * CL - 5, pattern(3 * CL + 5, 204))  # up to the very end
        await h.check_range(size - 4 * CL, 4 * CL)
        await h.zero(size - 17, 17)
        await h.check_range(size - 100, 100)
        await h.trim(size - tail, tail)
        await h.check_range(size - tail - 5, tail + 5)


async def check_write_zeroes(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        cases = [(0, CL), (2 * CL + 100, 50), (3 * CL - 10, 20), (4 * CL + 1, 3 * CL),
                 (9 * CL, 512), (10 * CL + 7, 1), (12 * CL - 4096, 4096 + 2 * CL + 3)]
        for off, n in cases:
            await h.zero(off, n)
            await h.check_range(max(0, off - 100), min(size, off + n + 100) - max(0, off - 100))
        await h.zero(15 * CL + 3, 1000, fua=True)
        # Write over zeroes, zero over writes.
        await h.write(2 * CL + 90, pattern(40, 301))
        await h.write(4 * CL, pattern(CL, 302))
        await h.zero(4 * CL + 10, 10)


async def check_trim(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        cases = [(0, CL), (2 * CL + 100, 50), (3 * CL - 10, 20), (4 * CL + 1, 3 * CL),
                 (13 * CL, 2 * CL), (17 * CL + 5, 4096)]
        for off, n in cases:
            await h.trim(off, n)
            await h.check_range(max(0, off - 100), min(size, off + n + 100) - max(0, off - 100))
        await h.write(CL - 5, pattern(10, 401))
        await h.trim(CL - 2, 4)


async def check_whole_disk_ops(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        await h.zero(0, size)
        await h.verify()
        await h.write(0, pattern(size, 501))
        await h.verify()
        await h.trim(0, size)
        await h.verify()
        await h.write(7, pattern(size - 7, 502))


async def check_read_bounds(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        node = h.node
        assert await node.read(size, 0) == b""
        assert await node.read(0, 0) == b""
        await h.check_range(size - 1, 1)
        for off, n in [(size, 1), (size - 1, 2), (-1, 1), (0, size + 1), (size + 100, 1),
                       (size + 1, 0), (0, -1)]:
            await expect_error(errno.EINVAL, node.read, off, n)
        for off, n in [(size, 1), (size - 1, 2), (-1, 1)]:
            try:
                node.allocation(off, n)
            except BlockError as e:
                assert e.errno == errno.EINVAL, e
            else:
                raise AssertionError(f"allocation({off}, {n}) did not fail")


async def check_write_bounds(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        node = h.node
        await expect_error(errno.ENOSPC, node.write, size - 1, b"ab")
        await expect_error(errno.ENOSPC, node.write, size, b"x")
        await expect_error(errno.ENOSPC, node.write, size + CL, pattern(CL, 1))
        await expect_error(errno.ENOSPC, node.write, size - CL, pattern(CL + 1, 2))
        await expect_error(errno.ENOSPC, node.write_zeroes, size - 10, 11)
        await expect_error(errno.ENOSPC, node.write_zeroes, size, 1)
        await expect_error(errno.ENOSPC, node.trim, size - 1, 2)
        await expect_error(errno.ENOSPC, node.trim, size + 1, 1)
        await h.check_range(size - 2 * CL, 2 * CL)  # nothing was written


async def check_zero_length(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        node = h.node
        for off in (0, 1, CL, size - 1, size):
            await node.write(off, b"")
            await node.write_zeroes(off, 0)
            await node.trim(off, 0)
            assert await node.read(off, 0) == b""
            assert node.allocation(off, 0) == []
        await node.write(5, bytearray())
        await node.write(5, memoryview(b""))


def _check_extents(node, off: int, length: int) -> None:
    extents = node.allocation(off, length)
    assert isinstance(extents, list)
    pos = off
    for e in extents:
        assert e.offset == pos, f"allocation({off}, {length}): gap or overlap at {pos}: {extents}"
        assert e.length > 0, f"allocation({off}, {length}): empty extent {e}"
        assert isinstance(e.allocated, bool)
        pos += e.length
    assert pos == off + length, f"allocation({off}, {length}) covers up to {pos}: {extents}"


async def check_allocation(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        ranges = [(0, size), (0, 1), (1, CL), (CL - 1, 2), (size - 1, 1), (size - 5000, 5000),
                  (3 * CL + 17, 4 * CL + 9), (511, 513)]
        for off, n in ranges:
            _check_extents(h.node, off, n)
        await h.write(CL + 100, pattern(10, 601))
        await h.zero(5 * CL, 2 * CL + 3)
        await h.trim(9 * CL - 1, 2)
        await h.write(size - 3, b"xyz")
        for off, n in ranges:
            _check_extents(h.node, off, n)


async def check_large_transfers(make_node, size=DEFAULT_SIZE):
    """Requests big enough to leave any inline fast path."""
    async with _Run(make_node, size) as h:
        n = min(size - 3 * CL, 700 * KiB + 333)
        await h.write(CL + 12, pattern(n, 701))
        await h.check_range(CL, n + 100)
        await h.zero(3, n)
        await h.check_range(0, n + 100)
        await h.write(0, pattern(size, 702))
        await h.check_range(0, size)


async def check_buffer_types(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        await h.write(10, bytearray(pattern(100, 801)))
        await h.write(CL - 50, memoryview(pattern(100, 802)))
        big = pattern(3000, 803)
        await h.node.write(2 * CL + 1, memoryview(big)[1000:2000])
        h.model[2 * CL + 1 : 2 * CL + 1001] = big[1000:2000]
        await h.check_range(2 * CL, 2000)


async def check_fua_and_flush(make_node, size=DEFAULT_SIZE):
    async with _Run(make_node, size) as h:
        await h.write(100, pattern(5000, 901), fua=True)
        await h.write(4 * CL, pattern(CL, 902), fua=True)
        await h.zero(6 * CL + 1, 100, fua=True)
        await h.node.flush()
        await h.check_range(0, 8 * CL)
        await h.node.flush()


async def check_concurrent_writes(make_node, size=DEFAULT_SIZE):
    """Concurrent writes to disjoint bytes of the same clusters all survive,
    and concurrent reads of untouched bytes see the right data."""
    async with _Run(make_node, size) as h:
        base = 2 * CL + 3
        pieces = [(base + i * 1000, pattern(700, 1100 + i)) for i in range(24)]
        pieces.append((5 * CL - 100, pattern(200, 1200)))
        pieces.append((5 * CL + 100, pattern(200, 1201)))
        # The 300-byte gaps between the pieces: some get zeroed, some read.
        zeroed = [(base + i * 1000 + 700, 100) for i in range(0, 24, 5)]
        untouched = [(base + i * 1000 + 850, 150) for i in range(0, 24, 3)]

        async def reader(off, n):
            await h.check_range(off, n)

        async with trio.open_nursery() as nursery:
            for off, data in pieces:
                nursery.start_soon(h.write, off, data)
            for off, n in zeroed:
                nursery.start_soon(h.zero, off, n)
            for off, n in untouched:
                nursery.start_soon(reader, off, n)
        await h.verify()


async def check_mixed_sequence(make_node, size=DEFAULT_SIZE):
    """A fixed pseudo-random sequence of everything, checked as it goes."""
    async with _Run(make_node, size) as h:
        rng = random.Random(4242)
        for step in range(150):
            kind = rng.random()
            if rng.random() < 0.5:
                off = rng.randrange(size)
                n = rng.randrange(1, min(3 * CL, size - off) + 1)
            else:  # near a boundary
                b = rng.choice([512, 4096, CL]) * rng.randrange(1, size // CL)
                off = max(0, min(size - 1, b + rng.randrange(-20, 20)))
                n = rng.randrange(1, min(40, size - off) + 1)
            if kind < 0.55:
                await h.write(off, pattern(n, step))
            elif kind < 0.7:
                await h.zero(off, n)
            elif kind < 0.8:
                await h.trim(off, n)
            else:
                await h.check_range(off, n)
            if step % 25 == 0:
                await h.verify()


async def check_edges(make_node, size=DEFAULT_SIZE):
    """The graph interface: every node reachable through ``children()`` names
    its edges with strings, its capabilities are booleans, and a writeback
    hint changes nothing (whether or not the node can act on it)."""
    async with _Run(make_node, size) as h:
        for node in walk([h.node]):
            edges = node.children()
            assert isinstance(edges, dict), f"{node.name}: children() is {type(edges)}"
            for name, child in edges.items():
                assert isinstance(name, str) and isinstance(child, BlockNode), (
                    f"{node.name}: edge {name!r} -> {child!r}")
            assert isinstance(node.can_writeback, bool), f"{node.name}: can_writeback"
            assert isinstance(node.can_abort, bool), f"{node.name}: can_abort"
        await h.write(CL - 3, pattern(2 * CL, 1300))
        await h.node.start_writeback(0, size)
        await h.node.start_writeback(CL, 0)
        await h.node.flush()
        await h.check_range(0, 4 * CL)


CHECKS = [
    check_size_and_content,
    check_aligned_writes,
    check_unaligned_writes,
    check_one_byte_writes,
    check_last_cluster,
    check_write_zeroes,
    check_trim,
    check_whole_disk_ops,
    check_read_bounds,
    check_write_bounds,
    check_zero_length,
    check_allocation,
    check_large_transfers,
    check_buffer_types,
    check_fua_and_flush,
    check_concurrent_writes,
    check_mixed_sequence,
    check_edges,
]


def node_factory(builder, tmp_path):
    """``make_node`` for the checks, from ``builder(tmp_path, initial)``
    returning ``(node, roots)`` or ``(node, roots, final)``: after the check
    the graph under ``node`` and ``roots`` is closed (``close_graph``), and
    ``await final()`` runs first when the check passed (an extra assertion,
    e.g. that a mirror's peer equals its local image)."""

    @asynccontextmanager
    async def make_node(size, initial):
        node, roots, *final = await builder(tmp_path, initial)
        try:
            yield node
            if final and final[0] is not None:
                await final[0]()
        finally:
            close_graph([node, *roots])

    return make_node


def conformance_test(builders: dict, limit: float = 60.0):
    """A pytest test running every check over every stack in ``builders``
    (name -> builder, as for :func:`node_factory`), each within ``limit``
    seconds.  Use: ``test_conformance = conformance_test(BUILDERS)``."""

    @pytest.mark.parametrize("check", CHECKS, ids=check_id)
    @pytest.mark.parametrize("stack", list(builders))
    def test_conformance(stack, check, tmp_path):
        async def main():
            with trio.fail_after(limit):
                await check(node_factory(builders[stack], tmp_path))

        trio.run(main)

    return test_conformance


async def check_conformance(make_node, size: int = DEFAULT_SIZE, checks=None) -> None:
    """Run every check (or ``checks``) in turn; the first failure raises."""
    for check in checks or CHECKS:
        try:
            await check(make_node, size)
        except AssertionError as e:
            raise AssertionError(f"{check.__name__}: {e}") from e
