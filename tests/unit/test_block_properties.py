"""Model-based (hypothesis stateful) tests of the block stacks.

Each machine drives random sequences of writes, write_zeroes, trims and
reads -- unaligned, across cluster boundaries, with small clusters (512 B to
4 KiB) and disk sizes that are not cluster multiples -- against plain
``bytearray`` models, and reads the whole stack back after every step:

* ``RawMachine``: a RawImage (inline and threaded paths);
* ``OverlayMachine``: an Overlay over a RawImage; models the overlay's
  clusters and the backing (which must stay untouched, except through the
  commit job), plus make_empty/commit and injected ENOSPC in the overlay's
  storage (the view must not change);
* ``SecondaryMachine``: one secondary disk's whole graph (``SecondaryDisk``):
  the primary writes through the gated export, the "VM" through the view,
  concurrently too, with checkpoints, ENOSPC in the hidden overlay and
  failover; models: disk, snapshot (disk at the last checkpoint) and view.

Each rule runs its I/O with ``trio.run``.  Where the disk is wrapped in a
``FaultLayer`` with (seeded, random) ``delay=0`` rules, requests yield to
the scheduler 0-2 times each, so concurrent requests really interleave.
"""

import errno
import random
import shutil
import tempfile

import pytest
import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from replfs.block.fault import FaultLayer
from replfs.block.gated import Gate
from replfs.block.graph import SecondaryDisk
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage
from replfs.errors import BlockError
from replfs.jobs.commit import commit
from tests.replpair import checkpoint_disk, failover_disk

SETTINGS = dict(
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    report_multiple_bugs=False,
)


def yielding(node, seed: int) -> FaultLayer:
    """Every request yields to the scheduler 0, 1 or 2 times (seeded)."""
    return FaultLayer(node, f"delay=0:prob=0.6,delay=0:prob=0.6,seed={seed}")


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n).replace(b"\x00", b"\x01")


def draw_range(data, size: int, cs: int) -> tuple[int, int]:
    """An (offset, length) inside the disk, biased to cluster edges."""
    near_edge = st.tuples(st.integers(0, size // cs), st.integers(-3, 3)).map(
        lambda t: t[0] * cs + t[1]
    )
    off = data.draw(st.one_of(st.integers(0, size - 1), near_edge), label="off")
    off = min(max(off, 0), size - 1)
    room = size - off
    length = data.draw(
        st.one_of(
            st.integers(1, min(8, room)),
            st.integers(1, min(3 * cs + 5, room)),
            st.just(room),  # to the very end
            st.integers(0, room // cs).map(lambda k: max(1, k * cs - off % cs)),  # to an edge
        ),
        label="len",
    )
    return off, min(max(length, 1), room)


async def read_all(node, size: int, step: int = 16384) -> bytes:
    parts = []
    for off in range(0, size, step):
        parts.append(await node.read(off, min(step, size - off)))
    return b"".join(parts)


def diff(got, want) -> str:
    if len(got) != len(want):
        return f"length {len(got)} != {len(want)}"
    i = next((k for k in range(len(got)) if got[k] != want[k]), None)
    return "equal" if i is None else f"first difference at {i}"


class _TmpMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="replfs-prop-")
        self.closers = []

    def teardown(self):
        for c in self.closers:
            c.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def path(self, name):
        return f"{self.tmp}/{name}"


# ---------------------------------------------------------------------------
# RawImage
# ---------------------------------------------------------------------------


class RawMachine(_TmpMachine):
    @initialize(
        size=st.one_of(st.integers(1, 3000), st.integers(3000, 40000)),
        threaded=st.booleans(),
        seed=st.integers(0, 1000),
    )
    def init(self, size, threaded, seed):
        self.size = size
        self.model = bytearray(blob(size, seed))
        with open(self.path("raw.img"), "wb") as f:
            f.write(self.model)
        self.node = RawImage(self.path("raw.img"), inline_max=1024 if threaded else 1 << 20)
        self.closers.append(self.node)
        self.cs = 512

    @rule(data=st.data(), seed=st.integers(0, 1 << 16), fua=st.booleans())
    def write(self, data, seed, fua):
        off, n = draw_range(data, self.size, self.cs)
        buf = blob(n, seed)
        trio.run(self.node.write, off, buf, fua)
        self.model[off : off + n] = buf

    @rule(data=st.data(), trim=st.booleans())
    def zero(self, data, trim):
        off, n = draw_range(data, self.size, self.cs)
        if trim:
            trio.run(self.node.trim, off, n)
        else:
            trio.run(self.node.write_zeroes, off, n)
        self.model[off : off + n] = bytes(n)

    @rule(data=st.data())
    def read(self, data):
        off, n = draw_range(data, self.size, self.cs)
        assert trio.run(self.node.read, off, n) == self.model[off : off + n]

    @rule(extra=st.integers(1, 5000))
    def write_past_end(self, extra):
        off = max(0, self.size - extra // 2)
        with pytest.raises(BlockError) as e:
            trio.run(self.node.write, off, b"\xff" * extra)
        assert e.value.errno == errno.ENOSPC

    @invariant()
    def content(self):
        if hasattr(self, "node"):
            got = trio.run(read_all, self.node, self.size)
            assert got == self.model, diff(got, self.model)


# ---------------------------------------------------------------------------
# Overlay over RawImage
# ---------------------------------------------------------------------------


class _FailingData:
    """Makes the overlay's data file fail with ENOSPC after ``ok`` calls."""

    def __init__(self, data, ok: int):
        self.data, self.ok = data, ok
        self.orig = {m: getattr(data, m) for m in ("writev", "write", "write_zeroes", "copy_from")}
        for m in self.orig:
            setattr(data, m, self._wrap(self.orig[m]))

    def _wrap(self, fn):
        async def failing(*args, **kw):
            if self.ok <= 0:
                raise BlockError(errno.ENOSPC, "injected: overlay storage full")
            self.ok -= 1
            return await fn(*args, **kw)

        return failing

    def restore(self):
        for m, fn in self.orig.items():
            setattr(self.data, m, fn)


class OverlayMachine(_TmpMachine):
    @initialize(
        size=st.one_of(st.integers(1, 5000), st.integers(5000, 40000)),
        cs=st.sampled_from([512, 1024, 4096]),
        yields=st.booleans(),
        seed=st.integers(0, 1000),
    )
    def init(self, size, cs, yields, seed):
        self.size, self.cs = size, cs
        self.backing_model = bytearray(blob(size, seed))
        with open(self.path("backing.img"), "wb") as f:
            f.write(self.backing_model)
        self.raw = RawImage(self.path("backing.img"))
        self.backing = yielding(self.raw, seed) if yields else self.raw
        self.ov = Overlay(self.path("ov"), self.backing, cluster_size=cs)
        self.closers += [self.ov, self.raw]
        self.nclusters = (size + cs - 1) // cs
        # Model: overlay's own bytes where allocated.
        self.ov_model = bytearray(size)
        self.alloc = [False] * self.nclusters

    def view(self) -> bytearray:
        v = bytearray(self.backing_model)
        for c, a in enumerate(self.alloc):
            if a:
                v[c * self.cs : (c + 1) * self.cs] = self.ov_model[c * self.cs : (c + 1) * self.cs]
        return v

    def model_write(self, off, buf):
        n = len(buf)
        for c in range(off // self.cs, (off + n - 1) // self.cs + 1):
            if not self.alloc[c]:
                a, b = c * self.cs, min((c + 1) * self.cs, self.size)
                self.ov_model[a:b] = self.backing_model[a:b]
                self.alloc[c] = True
        self.ov_model[off : off + n] = buf

    @rule(data=st.data(), seed=st.integers(0, 1 << 16))
    def write(self, data, seed):
        off, n = draw_range(data, self.size, self.cs)
        buf = blob(n, seed)
        trio.run(self.ov.write, off, buf)
        self.model_write(off, buf)

    @rule(data=st.data(), trim=st.booleans())
    def zero(self, data, trim):
        off, n = draw_range(data, self.size, self.cs)
        trio.run(self.ov.trim if trim else self.ov.write_zeroes, off, n)
        self.model_write(off, bytes(n))

    @rule(data=st.data(), seed=st.integers(0, 1 << 16))
    def backing_changes(self, data, seed):
        # Somebody writes the backing directly: shows where not allocated.
        off, n = draw_range(data, self.size, self.cs)
        buf = blob(n, seed)
        trio.run(self.raw.write, off, buf)
        self.backing_model[off : off + n] = buf

    @rule(data=st.data())
    def read(self, data):
        off, n = draw_range(data, self.size, self.cs)
        assert trio.run(self.ov.read, off, n) == self.view()[off : off + n]

    @rule(data=st.data(), seeds=st.lists(st.integers(0, 1 << 16), min_size=2, max_size=6))
    def concurrent(self, data, seeds):
        """Concurrent writes/zeroes on disjoint bytes (often the same cluster)."""
        ops, taken = [], []
        for seed in seeds:
            off, n = draw_range(data, self.size, self.cs)
            if any(off < b and a < off + n for a, b in taken):
                continue
            taken.append((off, off + n))
            ops.append((off, blob(n, seed) if seed % 3 else bytes(n), seed % 3 == 0))

        async def go():
            async with trio.open_nursery() as nursery:
                for off, buf, zero in ops:
                    if zero:
                        nursery.start_soon(self.ov.write_zeroes, off, len(buf))
                    else:
                        nursery.start_soon(self.ov.write, off, buf)

        trio.run(go)
        for off, buf, _ in ops:
            self.model_write(off, buf)

    @rule(data=st.data(), ok=st.integers(0, 2), seed=st.integers(0, 1 << 16), kind=st.integers(0, 2))
    def enospc(self, data, ok, seed, kind):
        off, n = draw_range(data, self.size, self.cs)
        failing = _FailingData(self.ov.data, ok)
        try:
            if kind == 0:
                trio.run(self.ov.write, off, blob(n, seed))
            else:
                trio.run(self.ov.trim if kind == 1 else self.ov.write_zeroes, off, n)
        except BlockError as e:
            assert e.errno == errno.ENOSPC
        else:
            # Enough calls succeeded: the operation went through.
            self.model_write(off, blob(n, seed) if kind == 0 else bytes(n))
        finally:
            failing.restore()

    @rule()
    def make_empty(self):
        trio.run(self.ov.make_empty)
        self.alloc = [False] * self.nclusters

    @rule()
    def commit(self):
        trio.run(commit, self.ov)
        self.backing_model = self.view()
        self.alloc = [False] * self.nclusters

    @invariant()
    def consistent(self):
        if not hasattr(self, "ov"):
            return
        want = self.view()
        got = trio.run(read_all, self.ov, self.size)
        assert got == want, "view: " + diff(got, want)
        got = trio.run(read_all, self.raw, self.size)
        assert got == self.backing_model, "backing: " + diff(got, self.backing_model)
        assert self.ov.bitmap.count == sum(self.alloc)
        for e in self.ov.allocation(0, self.size):
            for c in range(e.offset // self.cs, (e.offset + e.length - 1) // self.cs + 1):
                assert self.alloc[c] == e.allocated, (c, e)


# ---------------------------------------------------------------------------
# One secondary disk's graph
# ---------------------------------------------------------------------------


class SecondaryMachine(_TmpMachine):
    @initialize(
        size=st.one_of(st.integers(1, 5000), st.integers(5000, 40000)),
        cs=st.sampled_from([512, 4096]),
        yields=st.booleans(),
        seed=st.integers(0, 1000),
    )
    def init(self, size, cs, yields, seed):
        self.size, self.cs = size, cs
        self.disk_model = bytearray(blob(size, seed))
        with open(self.path("disk.img"), "wb") as f:
            f.write(self.disk_model)
        self.raw = RawImage(self.path("disk.img"))
        disk = yielding(self.raw, seed) if yields else self.raw
        self.stack = SecondaryDisk("d", disk, self.path(""), Gate(), cluster_size=cs)
        self.closers.append(self.stack)
        self.snap_model = bytearray(self.disk_model)
        self.view_model = bytearray(self.disk_model)
        self.failed_over = False

    # -- the primary, through the CBW ------------------------------------------------
    async def _primary(self, off, buf, kind):
        cbw = self.stack.export
        if kind == "write":
            await cbw.write(off, buf)
        elif kind == "zero":
            await cbw.write_zeroes(off, len(buf))
        else:
            await cbw.trim(off, len(buf))

    def _primary_done(self, off, buf):
        self.disk_model[off : off + len(buf)] = buf
        if self.failed_over:  # the VM runs on the disk now
            self.view_model[off : off + len(buf)] = buf

    @rule(data=st.data(), seed=st.integers(0, 1 << 16), kind=st.sampled_from(["write", "zero", "trim"]))
    def primary(self, data, seed, kind):
        off, n = draw_range(data, self.size, self.cs)
        buf = blob(n, seed) if kind == "write" else bytes(n)
        if self.failed_over:
            with pytest.raises(BlockError) as e:
                trio.run(self._primary, off, buf, kind)
            assert e.value.errno == errno.ESHUTDOWN
            return
        trio.run(self._primary, off, buf, kind)
        self._primary_done(off, buf)

    # -- the VM, through the view -----------------------------------------------------
    async def _vm(self, off, buf, kind):
        view = self.stack.view
        if kind == "write":
            await view.write(off, buf)
        elif kind == "zero":
            await view.write_zeroes(off, len(buf))
        else:
            await view.trim(off, len(buf))

    def _vm_done(self, off, buf):
        self.view_model[off : off + len(buf)] = buf
        if self.failed_over:
            self.disk_model[off : off + len(buf)] = buf

    @rule(data=st.data(), seed=st.integers(0, 1 << 16), kind=st.sampled_from(["write", "zero", "trim"]))
    def vm(self, data, seed, kind):
        off, n = draw_range(data, self.size, self.cs)
        buf = blob(n, seed) if kind == "write" else bytes(n)
        trio.run(self._vm, off, buf, kind)
        self._vm_done(off, buf)

    @rule(data=st.data(), which=st.sampled_from(["view", "disk", "snapshot"]))
    def read(self, data, which):
        off, n = draw_range(data, self.size, self.cs)
        if which == "view":
            node, model = self.stack.view, self.view_model
        elif which == "disk":
            node, model = self.stack.cbw, self.disk_model
        else:
            if self.failed_over:
                return
            node, model = self.stack.cbw.snapshot, self.snap_model
        assert trio.run(node.read, off, n) == model[off : off + n]

    @rule(data=st.data(), seeds=st.lists(st.integers(0, 1 << 16), min_size=2, max_size=8))
    def concurrent(self, data, seeds):
        """Primary and VM writes at once, with snapshot/view reads in between.
        Primary requests are disjoint from each other, VM requests too (but
        they overlap each other freely); reads of the view avoid the VM's
        writes; snapshot reads may overlap the primary's writes and must
        still return the checkpoint's data."""
        primary, vm, reads, p_taken, v_taken = [], [], [], [], []
        kinds = ["write", "zero", "trim"]
        for seed in seeds:
            off, n = draw_range(data, self.size, self.cs)
            role = seed % 4
            kind = kinds[(seed >> 2) % 3]
            buf = blob(n, seed) if kind == "write" else bytes(n)
            if role == 0 and not self.failed_over:
                if not any(off < b and a < off + n for a, b in p_taken):
                    p_taken.append((off, off + n))
                    primary.append((off, buf, kind))
            elif role == 1 or (role == 0 and self.failed_over):
                if not any(off < b and a < off + n for a, b in v_taken):
                    v_taken.append((off, off + n))
                    vm.append((off, buf, kind))
            else:
                reads.append((off, n, "snapshot" if role == 2 else "view"))
        if self.failed_over:
            reads = [r for r in reads if r[2] == "view"]
        reads = [
            (off, n, w) for off, n, w in reads
            if w == "snapshot" or not any(off < b and a < off + n for a, b in v_taken)
        ]
        snap_model, view_model = bytes(self.snap_model), bytes(self.view_model)

        async def reader(off, n, which):
            if which == "snapshot":
                got = await self.stack.cbw.snapshot.read(off, n)
                assert got == snap_model[off : off + n], "snapshot read during primary writes"
            else:
                got = await self.stack.view.read(off, n)
                assert got == view_model[off : off + n], "view read"

        async def go():
            async with trio.open_nursery() as nursery:
                for i in range(max(len(primary), len(vm), len(reads))):
                    if i < len(primary):
                        nursery.start_soon(self._primary, *primary[i])
                    if i < len(reads):
                        nursery.start_soon(reader, *reads[i])
                    if i < len(vm):
                        nursery.start_soon(self._vm, *vm[i])

        trio.run(go)
        for off, buf, _ in primary:
            self._primary_done(off, buf)
        for off, buf, _ in vm:
            self._vm_done(off, buf)

    @precondition(lambda self: not self.failed_over)
    @rule(data=st.data(), ok=st.integers(0, 1), seed=st.integers(0, 1 << 16))
    def hidden_enospc(self, data, ok, seed):
        """The hidden overlay's storage is full: the primary's write fails
        and neither the disk nor the view changes."""
        off, n = draw_range(data, self.size, self.cs)
        buf = blob(n, seed)
        failing = _FailingData(self.stack.hidden.data, ok)
        try:
            trio.run(self.stack.export.write, off, buf)
        except BlockError as e:
            assert e.errno == errno.ENOSPC
        else:
            self._primary_done(off, buf)
        finally:
            failing.restore()

    @precondition(lambda self: not self.failed_over)
    @rule()
    def checkpoint(self):
        trio.run(checkpoint_disk, self.stack)
        self.snap_model = bytearray(self.disk_model)
        self.view_model = bytearray(self.disk_model)
        assert self.stack.hidden.bitmap.count == 0 and self.stack.active.bitmap.count == 0

    @precondition(lambda self: not self.failed_over)
    @rule()
    def failover(self):
        trio.run(failover_disk, self.stack)
        self.failed_over = True
        self.disk_model = bytearray(self.view_model)
        got = trio.run(read_all, self.raw, self.size)
        assert got == self.view_model, "disk after failover: " + diff(got, self.view_model)
        assert self.stack.hidden.bitmap.count == 0 and self.stack.active.bitmap.count == 0

    @invariant()
    def consistent(self):
        if not hasattr(self, "stack"):
            return
        got = trio.run(read_all, self.stack.view, self.size)
        assert got == self.view_model, "view: " + diff(got, self.view_model)
        got = trio.run(read_all, self.raw, self.size)
        assert got == self.disk_model, "disk: " + diff(got, self.disk_model)
        if not self.failed_over:
            got = trio.run(read_all, self.stack.cbw.snapshot, self.size)
            assert got == self.snap_model, "snapshot: " + diff(got, self.snap_model)


# ---------------------------------------------------------------------------


def test_raw_model():
    run_state_machine_as_test(
        RawMachine, settings=settings(max_examples=40, stateful_step_count=40, **SETTINGS)
    )


def test_overlay_model():
    run_state_machine_as_test(
        OverlayMachine, settings=settings(max_examples=60, stateful_step_count=50, **SETTINGS)
    )


def test_secondary_model():
    run_state_machine_as_test(
        SecondaryMachine, settings=settings(max_examples=80, stateful_step_count=50, **SETTINGS)
    )
