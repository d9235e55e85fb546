"""The dirty record, the activity log, and the mirror that feeds them
(``replfs/block/dirty.py``, ``replfs/block/mirror.py``).

* ``DirtyRecord`` against a brute-force model of its clusters (which a byte
  range touches, which it covers whole, the short last cluster), plus
  suspects, ``out_of_sync_bytes``, ``changed`` and the persisted form.
* ``ActivityLog`` with a ``write_al`` (:class:`Recorder`) that runs in an I/O
  thread -- a ``time.sleep`` in it blocks a pool thread, not trio -- and
  notes each log it made durable.  Every test replays what happened
  (:func:`check_crash_safe`) against the log's contract: a write reaches the
  image only once its extents are in the durable log, and no log written
  while it is in flight drops them.
* ``Mirror`` with a record and a log: what the peer did not get is marked,
  a write the peer got clears the clusters it covers whole, and the log is
  durable before the local image is written.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from replfs.block.base import BlockNode
from replfs.block.dirty import ActivityLog, DirtyRecord
from replfs.block.fault import FaultLayer
from replfs.block.mirror import Mirror
from replfs.block.raw import RawImage

CS = 4096
TIMEOUT = 10


def run(fn, *args, timeout: float = TIMEOUT):
    async def bounded():
        with trio.fail_after(timeout):
            return await fn(*args)

    return trio.run(bounded)


# ---------------------------------------------------------------------------
# DirtyRecord
# ---------------------------------------------------------------------------


def cluster_bounds(size: int, cs: int, c: int) -> tuple[int, int]:
    return c * cs, min((c + 1) * cs, size)


def touched(size: int, cs: int, off: int, n: int) -> set[int]:
    """Clusters sharing a byte with ``[off, off+n)`` (brute force)."""
    bounds = [cluster_bounds(size, cs, c) for c in range(-(-size // cs))]
    return {c for c, (a, b) in enumerate(bounds) if n and off < b and a < off + n}


def covered(size: int, cs: int, off: int, n: int) -> set[int]:
    """Clusters whose every byte is in ``[off, off+n)`` (brute force)."""
    bounds = [cluster_bounds(size, cs, c) for c in range(-(-size // cs))]
    return {c for c, (a, b) in enumerate(bounds) if off <= a and b <= off + n}


def setbits(bm) -> set[int]:
    return {c for s, e in bm.set_runs() for c in range(s, e)}


def model_bytes(size: int, cs: int, clusters: set[int]) -> int:
    return sum(b - a for a, b in (cluster_bounds(size, cs, c) for c in clusters))


@st.composite
def byte_range(draw, size: int, cs: int):
    edge = st.tuples(st.integers(0, size // cs), st.integers(-2, 2)).map(lambda t: t[0] * cs + t[1])
    off = min(max(draw(st.one_of(st.integers(0, size), edge)), 0), size)
    room = size - off
    n = draw(st.one_of(st.integers(0, room), st.just(room),
                       st.integers(0, room // cs).map(lambda k: max(0, k * cs - off % cs))))
    return off, min(max(n, 0), room)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), cs=st.sampled_from([512, 1024]), nfull=st.integers(0, 6),
       tail=st.sampled_from([0, 1, 100, 511]))
def test_record_against_cluster_model(data, cs, nfull, tail):
    size = nfull * cs + tail
    rec = DirtyRecord(size, cs)
    bits, suspect = set(), set()
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        op = data.draw(st.sampled_from(["mark", "clear_covered", "suspect", "clear"]), label="op")
        if op == "suspect":
            ext = data.draw(st.sampled_from([cs, 2 * cs, 4 * cs]), label="extent")
            es = data.draw(st.lists(st.integers(0, 8), max_size=3), label="extents")
            rec.suspect_extents(es, ext)
            for e in es:
                suspect |= touched(size, cs, e * ext, max(0, min(ext, size - e * ext)))
            continue
        if op == "clear":
            c0 = data.draw(st.integers(0, rec.nclusters), label="c0")
            c1 = data.draw(st.integers(c0, rec.nclusters), label="c1")
            rec.clear(c0, c1)
            bits -= set(range(c0, c1))
            suspect -= set(range(c0, c1))
            continue
        off, n = data.draw(byte_range(size, cs), label="range")
        if op == "mark":
            rec.mark(off, n)
            bits |= touched(size, cs, off, n)
            assert set(range(*rec.outward(off, n))) == touched(size, cs, off, n) or not n
        else:
            rec.clear_covered(off, n)
            bits -= covered(size, cs, off, n)
            suspect -= covered(size, cs, off, n)
            assert set(range(*rec.inward(off, n))) == covered(size, cs, off, n)
        assert setbits(rec.bits) == bits, (op, off, n)
        assert setbits(rec.suspect) == suspect, (op, off, n)
    assert rec.dirty_clusters == len(bits)
    assert rec.suspect_clusters == len(suspect - bits)
    assert rec.out_of_sync_bytes == model_bytes(size, cs, bits | suspect)
    assert rec.out_of_sync_bytes <= size


def test_mark_rounds_outward():
    rec = DirtyRecord(3 * CS + 100, CS)
    rec.mark(CS - 1, 2)  # one byte either side of the first edge
    assert setbits(rec.bits) == {0, 1}
    rec.mark(3 * CS + 99, 1)  # the last byte: the short last cluster
    assert setbits(rec.bits) == {0, 1, 3}
    rec.mark(2 * CS, 0)  # empty: nothing
    assert setbits(rec.bits) == {0, 1, 3}


def test_clear_rounds_inward_with_the_short_last_cluster():
    size = 3 * CS + 100
    rec = DirtyRecord(size, CS)
    rec.mark_all()
    rec.clear_covered(1, 2 * CS)  # covers cluster 1 only: 0 and 2 partly
    assert setbits(rec.bits) == {0, 2, 3}
    rec.clear_covered(3 * CS + 1, 99)  # the last cluster but its first byte
    assert setbits(rec.bits) == {0, 2, 3}
    rec.clear_covered(3 * CS, 100)  # the whole short cluster, to the end
    assert setbits(rec.bits) == {0, 2}
    rec.clear_covered(2 * CS, CS - 1)
    assert setbits(rec.bits) == {0, 2}
    rec.clear_covered(0, size)
    assert rec.dirty_clusters == 0 and rec.out_of_sync_bytes == 0


def test_suspects_do_not_double_count():
    ext = 2 * CS
    size = 5 * CS + 100  # clusters 0..5, the last one short
    rec = DirtyRecord(size, CS)
    rec.mark(0, 3 * CS)  # dirty 0, 1, 2
    rec.suspect_extents([1, 2, 40], ext)  # clusters 2..5 (extent 40 is past the end)
    assert setbits(rec.suspect) == {2, 3, 4, 5}
    assert rec.dirty_clusters == 3
    assert rec.suspect_clusters == 3  # 2 is dirty anyway
    assert rec.out_of_sync_bytes == 5 * CS + 100  # every byte of the disk, no more
    rec.clear(0, 3)
    assert rec.out_of_sync_bytes == 2 * CS + 100
    rec.clear_covered(3 * CS, 2 * CS + 100)
    assert rec.out_of_sync_bytes == 0 and rec.suspect.count == 0


def test_changed_follows_the_bits():
    rec = DirtyRecord(8 * CS, CS)
    assert not rec.changed
    rec.clear_covered(0, 8 * CS)  # nothing set: nothing changes
    assert not rec.changed
    rec.mark(10, 1)
    assert rec.changed
    rec.changed = False  # persisted
    rec.mark(0, 0)
    assert not rec.changed
    rec.clear_covered(CS, CS)  # cluster 1 was clean
    assert not rec.changed
    rec.clear_covered(0, CS)
    assert rec.changed and rec.dirty_clusters == 0
    rec.changed = False
    rec.suspect_extents([0], 2 * CS)
    rec.clear_covered(0, 2 * CS)  # suspects are persisted as bits: a change
    assert rec.changed
    rec.changed = False
    rec.mark_all()
    assert rec.changed


@pytest.mark.parametrize("size", [1, CS, 9 * CS + 7, 70 * CS])
def test_persisted_bits_round_trip(size):
    rec = DirtyRecord(size, CS)
    for off in range(0, size, 3 * CS):
        rec.mark(off, 1)
    rec.mark(size - 1, 1)
    data = rec.to_bytes()
    assert len(data) == (rec.nclusters + 7) // 8
    back = DirtyRecord(size, CS, data)
    assert setbits(back.bits) == setbits(rec.bits)
    assert back.dirty_clusters == rec.dirty_clusters
    assert back.out_of_sync_bytes == rec.out_of_sync_bytes
    assert not back.changed and back.suspect.count == 0
    with pytest.raises(ValueError):
        DirtyRecord(size, CS, data + b"\0")


@pytest.mark.parametrize("cs", [0, 256, 3000, 4095])
def test_cluster_size_must_be_a_power_of_two(cs):
    with pytest.raises(ValueError):
        DirtyRecord(1 << 20, cs)


# ---------------------------------------------------------------------------
# ActivityLog
# ---------------------------------------------------------------------------

EXT = 64 * 1024  # the tests' extent size


class Recorder:
    """``write_al`` for the tests.  It runs in an I/O thread, sleeps
    ``delay`` seconds there (or ``delay(extents)``), fails with EIO if
    ``fail`` says so, and then the log it was given is durable.

    ``events`` is one real-time ordered list of what happened:
    ``("call", extents)`` when a write starts, ``("durable", set)`` when it
    is done, ``("evict",)`` for ``before_evict``, and the writers'
    ``("in", extents)`` / ``("out", extents)`` (:func:`writer`)."""

    def __init__(self, hot=(), delay=0.0, fail: int = 0) -> None:
        self.delay = delay
        self.fail = fail
        self.durable = frozenset(hot)
        self.initial = self.durable
        self.calls: list[list[int]] = []
        self.events: list[tuple] = []

    def __call__(self, extents) -> None:
        assert threading.current_thread() is not threading.main_thread()
        extents = list(extents)
        self.calls.append(extents)
        self.events.append(("call", extents))
        time.sleep(self.delay(extents) if callable(self.delay) else self.delay)
        if self.fail:
            self.fail -= 1
            raise OSError(errno.EIO, "injected: metadata write failed")
        self.durable = frozenset(extents)
        self.events.append(("durable", self.durable))

    async def before_evict(self) -> None:
        self.events.append(("evict",))
        await trio.sleep(0.01)

    def log(self, **kw) -> ActivityLog:
        kw.setdefault("before_evict", self.before_evict)
        return ActivityLog(self, extent_size=EXT, hot=self.initial, **kw)


async def writer(al: ActivityLog, rec: Recorder, offset: int, length: int,
                 hold: trio.Event | None = None) -> None:
    """A write of ``[offset, offset+length)`` as the mirror does it: begin,
    (the image is written here, until ``hold`` is set), end."""
    await al.begin(offset, length)
    es = list(al.extents(offset, length))
    assert set(es) <= rec.durable, f"extents {es} used before they are durably logged"
    assert all(al.hot[e] > 0 for e in es)
    rec.events.append(("in", es))
    if hold is not None:
        await hold.wait()
    await trio.lowlevel.checkpoint()
    rec.events.append(("out", es))
    al.end(offset, length)


def check_crash_safe(rec: Recorder, cleared: bool = False) -> None:
    """Replay ``rec.events``: every extent a write uses is in the durable
    log when the write starts, and in every log made durable until it ends;
    an extent is dropped from the log only after ``before_evict`` (or by
    ``clear()``, whose caller persisted the bits: ``cleared``)."""
    durable = set(rec.initial)
    inflight: Counter = Counter()
    evicted = False  # may drop only right after a before_evict
    for ev in rec.events:
        if ev[0] == "in":
            assert set(ev[1]) <= durable, f"{ev}: not in the durable log {sorted(durable)}"
            inflight.update(ev[1])
        elif ev[0] == "out":
            inflight.subtract(ev[1])
        elif ev[0] == "evict":
            evicted = True
        elif ev[0] == "call":
            dropped = durable - set(ev[1])
            assert evicted or cleared or not dropped, f"{ev}: dropped {dropped} before before_evict"
            assert len(ev[1]) == len(set(ev[1])), f"{ev}: an extent listed twice"
        elif ev[0] == "durable":
            busy = {e for e, n in inflight.items() if n > 0}
            assert busy <= ev[1], f"log {sorted(ev[1])} dropped extents in flight {busy - ev[1]}"
            durable = set(ev[1])
            evicted = False
    assert not +inflight


def test_cold_write_waits_for_one_log_write_holding_its_extent():
    rec = Recorder(delay=0.05)
    al = rec.log()

    async def main():
        t0 = trio.current_time()
        await writer(al, rec, 3 * EXT + 10, 100)
        assert trio.current_time() - t0 >= 0.04  # it waited for the write
        assert rec.calls == [[3]]
        # A write across an extent edge: one transaction for the cold one.
        await writer(al, rec, 4 * EXT - 1, 2)
        assert rec.calls == [[3], [3, 4]]

    run(main)
    assert al.transactions == 2 and al.hot == {3: 0, 4: 0}
    check_crash_safe(rec)


def test_writes_into_hot_extents_call_nothing():
    rec = Recorder(hot=[0, 1, 2])
    al = rec.log()

    async def main():
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(writer, al, rec, (i * 7919) % (3 * EXT), 4096)
        await writer(al, rec, 0, 3 * EXT)  # all three at once

    run(main)
    assert rec.calls == [] and al.transactions == 0
    assert al.hot == {0: 0, 1: 0, 2: 0}
    check_crash_safe(rec)


def test_concurrent_cold_writes_share_transactions():
    rec = Recorder(delay=0.1)
    al = rec.log()

    async def main():
        async with trio.open_nursery() as nursery:
            for e in range(10):
                nursery.start_soon(writer, al, rec, e * EXT + 5, 10)
                nursery.start_soon(writer, al, rec, e * EXT + 500, 10)

    run(main)
    # The first writer's transaction, then one for everybody who came meanwhile.
    assert len(rec.calls) == 2, rec.calls
    assert len(rec.calls[0]) == 1 and sorted(rec.calls[1]) == list(range(10))
    assert al.transactions == 2
    check_crash_safe(rec)


def test_evicted_extent_is_not_used_before_the_new_log_is_durable():
    # capacity 2, hot [0, 1]: a write into 2 evicts 0 (the least recently
    # used); a write into 0 meanwhile must wait for a log that has 0 again.
    rec = Recorder(hot=[0, 1], delay=0.2)
    al = rec.log(capacity=2)
    hold = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, al, rec, 2 * EXT, 10, hold)
            await trio.sleep(0.05)  # the log write that drops 0 is under way
            assert 0 not in al.hot and rec.calls == [[1, 2]]
            t0 = trio.current_time()
            await writer(al, rec, 100, 10)
            assert trio.current_time() - t0 >= 0.1  # waited for two transactions
            hold.set()

    run(main)
    # 2 was in flight when 0 came back: 1 was evicted, not 2.
    assert rec.calls == [[1, 2], [2, 0]]
    assert rec.events[0] == ("evict",)
    check_crash_safe(rec)


def test_before_evict_is_awaited_before_the_log_write_that_drops():
    rec = Recorder(hot=[0, 1, 2])
    al = rec.log(capacity=3)

    async def main():
        for e in range(3, 8):
            await writer(al, rec, e * EXT, 1)

    run(main)
    assert al.evictions == 5
    calls = [ev for ev in rec.events if ev[0] in ("call", "evict")]
    assert calls == [("evict",), ("call", [1, 2, 3])] + [
        x for e in range(4, 8) for x in (("evict",), ("call", [e - 2, e - 1, e]))]
    check_crash_safe(rec)


def test_before_evict_only_when_an_extent_is_dropped():
    # Over capacity but every hot extent has a write in flight: nothing is
    # dropped, so there is nothing to persist first.
    rec = Recorder(hot=[0])
    al = rec.log(capacity=1)
    hold = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, al, rec, 10, 1, hold)
            await trio.sleep(0.01)
            await writer(al, rec, EXT, 1)
            hold.set()

    run(main)
    assert rec.calls == [[0, 1]]
    assert ("evict",) not in rec.events
    check_crash_safe(rec)


def test_extents_with_writes_in_flight_are_never_evicted():
    rec = Recorder()
    al = rec.log(capacity=1)
    holds = [trio.Event() for _ in range(4)]

    async def main():
        async with trio.open_nursery() as nursery:
            for e in range(4):  # each holds its extent: capacity is exceeded
                nursery.start_soon(writer, al, rec, e * EXT, 1, holds[e])
                await trio.sleep(0.02)
            assert sorted(al.hot) == [0, 1, 2, 3] and al.evictions == 0
            for h in holds[:3]:
                h.set()
            await trio.sleep(0.02)
            await writer(al, rec, 9 * EXT, 1)  # now 0..2 can go, 3 cannot
            assert sorted(al.hot) == [3, 9]
            holds[3].set()

    run(main)
    assert al.evictions == 3
    assert all(len(c) == len(set(c)) for c in rec.calls)
    check_crash_safe(rec)


def test_capacity_is_respected_when_possible():
    rec = Recorder()
    al = rec.log(capacity=3)

    async def main():
        for i in range(20):
            e = (i * 7) % 10
            await writer(al, rec, e * EXT, 1)
            assert len(al.hot) <= 3

    run(main)
    assert all(len(c) <= 3 for c in rec.calls)
    check_crash_safe(rec)


def test_a_write_does_not_evict_the_hot_extents_it_needs():
    # A write across extents 0 (hot) and 1 (cold) with capacity 2 and hot
    # [0, 5]: 5 goes, 0 stays; one transaction.
    rec = Recorder(hot=[0, 5])
    al = rec.log(capacity=2)
    run(writer, al, rec, EXT - 10, 20)
    assert rec.calls == [[0, 1]]
    check_crash_safe(rec)
    # With capacity 1 the write needs more than the capacity: it must still
    # get both (once), not evict one to log the other for ever.
    rec = Recorder(hot=[0])
    al = rec.log(capacity=1)
    run(writer, al, rec, EXT - 10, 20, timeout=3)
    assert len(rec.calls) == 1 and sorted(rec.calls[0]) == [0, 1]
    check_crash_safe(rec)


def test_in_flight_counts_survive_a_second_transaction():
    # A commits 0 (slow); B (into 0) and C (into 1) wait for it.  After it,
    # B finds 0 hot and C commits 1: that must not reset 0's count.
    rec = Recorder(delay=0.05)
    al = rec.log()
    hold = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, al, rec, 0, 10, hold)
            await trio.sleep(0.01)
            nursery.start_soon(writer, al, rec, 100, 10, hold)
            nursery.start_soon(writer, al, rec, EXT, 10, hold)
            while len(rec.calls) < 2 or al._committing is not None:
                await trio.sleep(0.01)
            await trio.sleep(0.01)
            assert al.hot == {0: 2, 1: 1}
            hold.set()

    run(main)
    assert al.hot == {0: 0, 1: 0}
    assert rec.calls == [[0], [0, 1]]
    check_crash_safe(rec)


@pytest.mark.parametrize("seed", range(6))
def test_random_concurrent_writers_keep_the_log_crash_safe(seed):
    rnd = random.Random(seed)
    rec = Recorder(hot=[0, 1], delay=lambda es: rnd.random() * 0.004)
    al = rec.log(capacity=rnd.choice([1, 2, 3]))

    async def one():
        await trio.sleep(rnd.random() * 0.03)
        off = rnd.randrange(0, 8 * EXT)
        n = rnd.choice([1, 4096, EXT, 2 * EXT])
        hold = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, al, rec, off, n, hold)
            await trio.sleep(rnd.random() * 0.01)
            hold.set()

    async def main():
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(one)

    run(main)
    assert all(n == 0 for n in al.hot.values())
    # Over capacity only while writes were in flight: the next transaction
    # gets back under it.
    run(writer, al, rec, 20 * EXT, 1)
    assert len(al.hot) <= al.capacity
    check_crash_safe(rec)


def test_clear_forgets_every_idle_extent():
    rec = Recorder(hot=[0, 1, 2])
    al = rec.log()
    hold = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, al, rec, EXT, 1, hold)
            await trio.sleep(0.01)
            await al.clear()
            assert al.hot == {1: 1} and rec.calls == [[1]]
            hold.set()
        await al.clear()

    run(main)
    assert al.hot == {} and rec.calls == [[1], []]
    check_crash_safe(rec, cleared=True)


def test_clear_during_a_transaction_keeps_the_new_extent_logged():
    # A commits 3 (a quick log write); clear() starts meanwhile and its
    # write is slow: the log left on disk must still hold 3 while A writes.
    rec = Recorder(hot=[0], delay=lambda es: 0.05 if 3 in es else 0.2)
    al = rec.log()
    hold = trio.Event()

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, al, rec, 3 * EXT, 1, hold)
            await trio.sleep(0.01)
            await al.clear()
            assert 3 in rec.durable
            hold.set()

    run(main)
    check_crash_safe(rec, cleared=True)


def test_failing_log_write_fails_the_writer_and_a_later_one_retries():
    rec = Recorder(delay=0.05, fail=1)
    al = rec.log()

    async def failing():
        with pytest.raises(OSError):
            await writer(al, rec, 0, 1)

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(failing)
            await trio.sleep(0.01)
            nursery.start_soon(writer, al, rec, EXT, 1)  # waits for the failing one
        assert 0 not in al.hot and al._committing is None
        await writer(al, rec, 2, 1)  # retries extent 0

    run(main)
    assert rec.calls == [[0], [1], [1, 0]]
    assert al.hot == {0: 0, 1: 0}
    check_crash_safe(rec)


# ---------------------------------------------------------------------------
# Mirror with a record and a log
# ---------------------------------------------------------------------------

SIZE = 10 * CS + 100  # a short last cluster


def image(tmp_path, name: str, byte: int = 0x11) -> RawImage:
    p = tmp_path / name
    p.write_bytes(bytes([byte]) * SIZE)
    return RawImage(p)


class LoggedFirst(BlockNode):
    """The local image, checking that each write's extents are durably in
    the activity log (and held in flight) when it lands."""

    def __init__(self, child: BlockNode, al: ActivityLog, rec: Recorder) -> None:
        self.child, self.al, self.rec = child, al, rec
        self.size = child.size
        self.checked = 0

    def _check(self, offset: int, length: int) -> None:
        es = set(self.al.extents(offset, length))
        assert es <= self.rec.durable, f"{es} written before the log has them"
        assert all(self.al.hot.get(e, 0) > 0 for e in es)
        self.checked += 1

    async def _read(self, offset, length):
        return await self.child.read(offset, length)

    async def _write(self, offset, data, fua):
        self._check(offset, len(data))
        await self.child.write(offset, data, fua)

    async def _write_zeroes(self, offset, length, fua):
        self._check(offset, length)
        await self.child.write_zeroes(offset, length, fua)

    async def _trim(self, offset, length):
        self._check(offset, length)
        await self.child.trim(offset, length)

    async def flush(self):
        await self.child.flush()


@pytest.fixture
def images(tmp_path):
    local, peer = image(tmp_path, "local.img"), image(tmp_path, "peer.img")
    yield local, peer
    local.close()
    peer.close()


def mirror(local, peer, **kw):
    errors = []
    rec = DirtyRecord(SIZE, CS)
    m = Mirror("d", local, peer, record=rec, on_peer_error=lambda m, r: errors.append(r), **kw)
    return m, rec, errors


async def vm_io(m: Mirror) -> None:
    await m.write(CS + 10, b"\x22" * 100)  # cluster 1
    await m.write_zeroes(3 * CS - 1, 2)  # clusters 2 and 3
    await m.trim(SIZE - 1, 1)  # the short last cluster


def test_write_without_peer_marks_its_clusters(images):
    local, _ = images
    m, rec, errors = mirror(local, None)
    run(vm_io, m)
    assert setbits(rec.bits) == {1, 2, 3, 10}
    assert errors == [] and run(local.read, CS + 10, 100) == b"\x22" * 100
    assert m.statistics()["out_of_sync_bytes"] == 3 * CS + 100


def test_write_whose_peer_copy_fails_marks_its_clusters(images):
    local, peer = images
    m, rec, errors = mirror(local, FaultLayer(peer, "write|zero|trim:EIO"))
    run(vm_io, m)
    assert setbits(rec.bits) == {1, 2, 3, 10}
    assert len(errors) == 3 and "EIO" in errors[0]
    assert run(local.read, CS + 10, 100) == b"\x22" * 100  # the VM's write landed


def test_mirrored_write_clears_only_clusters_it_covers_whole(images):
    local, peer = images
    m, rec, _ = mirror(local, peer)
    rec.mark_all()
    rec.suspect_extents([0], 4 * CS)

    async def main():
        await m.write(CS + 1, b"\x22" * (2 * CS))  # 1 and 3 partly, 2 whole
        assert setbits(rec.bits) == set(range(11)) - {2}
        await m.write_zeroes(4 * CS, CS)  # 4 whole
        await m.trim(10 * CS, 100)  # the short last cluster, whole
        await m.write(5 * CS + 1, b"\x22" * (CS - 1))  # 5 but its first byte
        await m.write(6 * CS, b"\x22" * (CS - 1))  # 6 but its last byte

    run(main)
    assert setbits(rec.bits) == set(range(11)) - {2, 4, 10}
    assert setbits(rec.suspect) == {0, 1, 3}
    assert run(peer.read, 0, SIZE) == run(local.read, 0, SIZE)


def test_activity_log_is_durable_before_the_local_image_is_written(images):
    local, peer = images
    rec = Recorder(delay=0.01)
    al = ActivityLog(rec, extent_size=2 * CS, capacity=2, before_evict=rec.before_evict)
    checked = LoggedFirst(local, al, rec)
    m, record, _ = mirror(checked, peer, al=al)

    async def main():
        for _ in range(2):  # one extent after the other: evictions
            for off in range(0, SIZE, 2 * CS):
                await m.write(off, b"\x33")
        assert al.transactions == 12 and al.evictions == 10
        async with trio.open_nursery() as nursery:  # concurrent: group commits
            for i in range(12):
                off = (i * 5 * CS + 77) % (SIZE - 3 * CS)
                nursery.start_soon(m.write, off, b"\x22" * (i * 1000 + 1))
                nursery.start_soon(m.write_zeroes, SIZE - 1 - i * 300, 1)
                nursery.start_soon(m.trim, i * 3 * CS % SIZE, 1)
        await vm_io(m)

    run(main)
    assert checked.checked == 12 + 36 + 3 and al.transactions > 12
    assert all(n == 0 for n in al.hot.values())
    assert record.dirty_clusters == 0
    check_crash_safe(rec)
