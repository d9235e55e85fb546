"""ClusterBitmap: against a list-of-bools model, and its cost claims."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replfs.core.bitmap import CHUNK, ClusterBitmap

CHUNK_BITS = CHUNK * 8


def model_runs(model, start, end):
    out, i = [], start
    while i < end:
        j = i
        while j < end and model[j] == model[i]:
            j += 1
        out.append((i, j, model[i]))
        i = j
    return out


def test_basics():
    bm = ClusterBitmap(100)
    assert len(bm) == 100 and bm.count == 0
    assert not bm.test(0) and not bm[99]
    bm.set_range(3, 10)
    assert [bm.test(i) for i in range(12)] == [False] * 3 + [True] * 7 + [False] * 2
    assert bm.count == 7
    bm.set_range(5, 20)  # overlapping: counted once
    assert bm.count == 17
    bm.clear_range(0, 4)
    assert bm.count == 16 and not bm.test(3) and bm.test(4)
    assert list(bm.runs(0, 100)) == [(0, 4, False), (4, 20, True), (20, 100, False)]
    assert list(bm.set_runs()) == [(4, 20)]
    assert bm.next_set(0, 100) == 4 and bm.next_clear(4, 100) == 20
    assert bm.next_set(20, 100) == 100 and bm.next_clear(4, 10) == 10
    assert bm.all_set(4, 20) and not bm.all_set(3, 20) and bm.any_set(19, 21)
    assert bm.count_range(0, 100) == 16 and bm.count_range(10, 12) == 2
    bm.clear_all()
    assert bm.count == 0 and not bm.any_set(0, 100)


def test_bounds_are_checked():
    bm = ClusterBitmap(10)
    for bad in [(-1, 3), (0, 11), (5, 4)]:
        with pytest.raises(ValueError):
            bm.set_range(*bad)
        with pytest.raises(ValueError):
            list(bm.runs(*bad))
    with pytest.raises(IndexError):
        bm.test(10)
    bm.set_range(10, 10)  # empty is fine
    assert bm.count == 0 and list(bm.runs(4, 4)) == []


def test_empty_bitmap():
    bm = ClusterBitmap(0)
    assert bm.count == 0 and list(bm.runs(0, 0)) == [] and list(bm.set_runs()) == []
    bm.clear_all()


@settings(max_examples=150, deadline=None)
@given(
    nbits=st.one_of(st.integers(1, 200), st.integers(CHUNK_BITS - 100, 3 * CHUNK_BITS + 100)),
    ops=st.lists(
        st.tuples(st.sampled_from(["set", "clear", "clear_all"]), st.floats(0, 1), st.floats(0, 1)),
        max_size=25,
    ),
    probes=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=8),
)
def test_against_model(nbits, ops, probes):
    bm = ClusterBitmap(nbits)
    model = [False] * nbits

    def rng(a, b):
        x, y = sorted((int(a * nbits), int(b * nbits)))
        return x, y

    for op, a, b in ops:
        s, e = rng(a, b)
        if op == "set":
            bm.set_range(s, e)
            model[s:e] = [True] * (e - s)
        elif op == "clear":
            bm.clear_range(s, e)
            model[s:e] = [False] * (e - s)
        else:
            bm.clear_all()
            model = [False] * nbits
        assert bm.count == sum(model)
    for a, b in probes + [(0, 1)]:
        s, e = rng(a, b)
        assert list(bm.runs(s, e)) == model_runs(model, s, e)
        assert list(bm.set_runs(s, e)) == [(x, y) for x, y, v in model_runs(model, s, e) if v]
        assert bm.count_range(s, e) == sum(model[s:e])
        want_set = next((i for i in range(s, e) if model[i]), e)
        want_clear = next((i for i in range(s, e) if not model[i]), e)
        assert bm.next_set(s, e) == want_set
        assert bm.next_clear(s, e) == want_clear
        assert bm.all_set(s, e) == all(model[s:e])
    assert [bm.test(i) for i in range(0, nbits, max(1, nbits // 300))] == model[:: max(1, nbits // 300)]


def test_one_tib_disk_is_instant():
    # 1 TiB at 64 KiB clusters: 16 Mi bits, 2 MiB.
    t = time.perf_counter()
    bm = ClusterBitmap(1 << 24)
    assert time.perf_counter() - t < 0.05
    assert bm.nbytes < 2 * 1024 * 1024 + 1024
    # Sparse bits far apart: finding them skips the clean chunks.
    for i in (5, 1 << 20, (1 << 24) - 1):
        bm.set_range(i, i + 1)
    t = time.perf_counter()
    assert list(bm.set_runs()) == [(5, 6), (1 << 20, (1 << 20) + 1), ((1 << 24) - 1, 1 << 24)]
    assert time.perf_counter() - t < 0.05
    # clear_all costs the dirty chunks only.
    t = time.perf_counter()
    for _ in range(100):
        bm.set_range(12345, 12400)
        bm.clear_all()
    assert time.perf_counter() - t < 0.05
    assert bm.count == 0 and not bm.any_set(0, 1 << 24)
    # Setting everything and finding runs on a full 2 MiB map is still fast.
    t = time.perf_counter()
    bm.set_range(0, 1 << 24)
    assert list(bm.set_runs()) == [(0, 1 << 24)]
    assert bm.count == 1 << 24
    bm.clear_range(1, (1 << 24) - 1)
    assert list(bm.set_runs()) == [(0, 1), ((1 << 24) - 1, 1 << 24)]
    assert bm.count == 2
    assert time.perf_counter() - t < 0.5


def test_partial_chunk_clear_keeps_summary():
    # Clearing a range that covers only part of a dirty chunk must not mark
    # the chunk clean (bits outside the range are still set).
    bm = ClusterBitmap(4 * CHUNK_BITS)
    bm.set_range(CHUNK_BITS + 8, CHUNK_BITS + 40)
    bm.set_range(2 * CHUNK_BITS - 8, 2 * CHUNK_BITS)
    bm.clear_range(CHUNK_BITS + 16, 2 * CHUNK_BITS - 16)
    assert list(bm.set_runs()) == [
        (CHUNK_BITS + 8, CHUNK_BITS + 16),
        (2 * CHUNK_BITS - 8, 2 * CHUNK_BITS),
    ]
    bm.clear_range(CHUNK_BITS, 2 * CHUNK_BITS)
    assert bm.count == 0 and list(bm.set_runs()) == []
