"""One bit per cluster: which clusters an overlay holds.

Design note
-----------
Bit ``i`` lives in byte ``i >> 3`` at bit position ``i & 7`` (LSB first) of a
``bytearray``.  A 1 TiB disk at 64 KiB clusters is 16 Mi bits = 2 MiB, which
``bytearray(n)`` gets zero-filled from the allocator at no visible cost, so
creating a bitmap is instant whatever the disk size.

All the range operations work on whole bytes with slice assignment or slice
comparison (C speed); only the partial first and last byte of a range are
handled bit by bit with masks.  Nothing loops per bit in Python.

Alongside the bits we keep a *summary*: one flag byte per 4 KiB chunk of the
bitmap (32768 clusters, i.e. 2 GiB of disk at 64 KiB clusters), set whenever
any bit in that chunk is set.  It is a superset of the dirty chunks (clearing
bits does not always clear the flag).  It makes

* ``clear_all()`` cost proportional to the dirty chunks, not to the disk, and
* ``next_set()`` skip clean chunks with one ``bytearray.find`` (memchr).

The number of set bits is maintained incrementally, so ``count`` is O(1).

Ranges are half-open ``[start, end)`` in bit (cluster) indexes and must lie
within ``[0, nbits]``; anything else is a programming error (``ValueError``).
"""

from __future__ import annotations

import re
from typing import Iterator

#: Bytes of bitmap per summary flag.
CHUNK = 4096
_CHUNK_SHIFT = 12
_ZERO_CHUNK = bytes(CHUNK)
_FF_CHUNK = b"\xff" * CHUNK
_NONZERO = re.compile(rb"[^\x00]")
_NONFF = re.compile(rb"[^\xff]")


def _lowbit(v: int) -> int:
    """Index of the lowest set bit of ``v`` (``v`` > 0)."""
    return (v & -v).bit_length() - 1


def _popcount(buf, start: int, end: int) -> int:
    if start >= end:
        return 0
    return int.from_bytes(buf[start:end], "little").bit_count()


class ClusterBitmap:
    __slots__ = ("nbits", "_buf", "_mv", "_summary", "_count")

    def __init__(self, nbits: int):
        if nbits < 0:
            raise ValueError("negative bitmap size")
        self.nbits = nbits
        nbytes = (nbits + 7) >> 3
        self._buf = bytearray(nbytes)
        self._mv = memoryview(self._buf)
        self._summary = bytearray((nbytes + CHUNK - 1) >> _CHUNK_SHIFT)
        self._count = 0

    # -- basics ---------------------------------------------------------------
    def __len__(self) -> int:
        return self.nbits

    @property
    def count(self) -> int:
        """Number of set bits (O(1))."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Memory held by the bits and the summary."""
        return len(self._buf) + len(self._summary)

    def _check(self, start: int, end: int) -> None:
        if start < 0 or end > self.nbits or start > end:
            raise ValueError(f"bit range [{start}, {end}) outside [0, {self.nbits}]")

    def test(self, i: int) -> bool:
        if not 0 <= i < self.nbits:
            raise IndexError(i)
        return bool(self._buf[i >> 3] >> (i & 7) & 1)

    __getitem__ = test

    # -- set / clear ------------------------------------------------------------
    def set_range(self, start: int, end: int) -> None:
        self._check(start, end)
        if start == end:
            return
        buf = self._buf
        sb, eb = start >> 3, (end - 1) >> 3
        if sb == eb:
            mask = ((1 << (end - start)) - 1) << (start & 7)
            old = buf[sb]
            buf[sb] = old | mask
            self._count += (mask & ~old).bit_count()
        else:
            hmask = (0xFF << (start & 7)) & 0xFF
            tmask = (1 << (((end - 1) & 7) + 1)) - 1
            old = buf[sb]
            buf[sb] = old | hmask
            added = (hmask & ~old).bit_count()
            old = buf[eb]
            buf[eb] = old | tmask
            added += (tmask & ~old).bit_count()
            n = eb - sb - 1
            if n:
                added += n * 8 - _popcount(buf, sb + 1, eb)
                self._mv[sb + 1 : eb] = _FF_CHUNK if n == CHUNK else b"\xff" * n
            self._count += added
        c0, c1 = sb >> _CHUNK_SHIFT, eb >> _CHUNK_SHIFT
        if c0 == c1:
            self._summary[c0] = 1
        else:
            self._summary[c0 : c1 + 1] = b"\x01" * (c1 + 1 - c0)

    def clear_range(self, start: int, end: int) -> None:
        self._check(start, end)
        if start == end or not self._count:
            return
        buf = self._buf
        sb, eb = start >> 3, (end - 1) >> 3
        if sb == eb:
            mask = ((1 << (end - start)) - 1) << (start & 7)
            old = buf[sb]
            buf[sb] = old & ~mask
            self._count -= (mask & old).bit_count()
            return
        hmask = (0xFF << (start & 7)) & 0xFF
        tmask = (1 << (((end - 1) & 7) + 1)) - 1
        old = buf[sb]
        buf[sb] = old & ~hmask
        removed = (hmask & old).bit_count()
        old = buf[eb]
        buf[eb] = old & ~tmask
        removed += (tmask & old).bit_count()
        # Middle bytes: only the chunks the summary says may be dirty.
        b, lim = sb + 1, eb
        summary = self._summary
        while b < lim:
            c = summary.find(1, b >> _CHUNK_SHIFT, ((lim - 1) >> _CHUNK_SHIFT) + 1)
            if c < 0:
                break
            b = max(b, c << _CHUNK_SHIFT)
            cend = min(lim, (c + 1) << _CHUNK_SHIFT)
            removed += _popcount(buf, b, cend)
            self._mv[b:cend] = _ZERO_CHUNK if cend - b == CHUNK else bytes(cend - b)
            if cend - b == CHUNK:
                summary[c] = 0
            b = cend
        self._count -= removed

    def clear_all(self) -> None:
        """Clear every bit; cost proportional to the dirty chunks."""
        summary, mv, nbytes = self._summary, self._mv, len(self._buf)
        c = summary.find(1)
        while c >= 0:
            a = c << _CHUNK_SHIFT
            b = min(a + CHUNK, nbytes)
            mv[a:b] = _ZERO_CHUNK if b - a == CHUNK else bytes(b - a)
            summary[c] = 0
            c = summary.find(1, c + 1)
        self._count = 0

    # -- queries ------------------------------------------------------------------
    def count_range(self, start: int, end: int) -> int:
        self._check(start, end)
        if start == end:
            return 0
        sb, eb = start >> 3, (end - 1) >> 3
        buf = self._buf
        if sb == eb:
            mask = ((1 << (end - start)) - 1) << (start & 7)
            return (buf[sb] & mask).bit_count()
        hmask = (0xFF << (start & 7)) & 0xFF
        tmask = (1 << (((end - 1) & 7) + 1)) - 1
        return (
            (buf[sb] & hmask).bit_count()
            + (buf[eb] & tmask).bit_count()
            + _popcount(buf, sb + 1, eb)
        )

    def _find_byte(self, b: int, lim: int, nonzero: bool) -> int:
        """First byte index in ``[b, lim)`` that is not 0 (``nonzero``) or not
        0xff; ``lim`` if none."""
        buf, summary = self._buf, self._summary
        const = _ZERO_CHUNK if nonzero else _FF_CHUNK
        pat = _NONZERO if nonzero else _NONFF
        while b < lim:
            c = b >> _CHUNK_SHIFT
            if nonzero:
                # Jump over clean chunks with memchr on the summary.
                c2 = summary.find(1, c)
                if c2 < 0:
                    return lim
                if c2 != c:
                    c, b = c2, c2 << _CHUNK_SHIFT
                    if b >= lim:
                        return lim
            elif not summary[c]:
                return b  # a clean chunk is all zeroes: b itself is not 0xff
            cend = min(lim, (c + 1) << _CHUNK_SHIFT)
            n = cend - b
            if n > 256:
                same = buf[b:cend] == (const if n == CHUNK else const[:n])
                if same:
                    b = cend
                    continue
            m = pat.search(buf, b, cend)
            if m is not None:
                return m.start()
            b = cend
        return lim

    def next_set(self, start: int, end: int) -> int:
        """Index of the first set bit in ``[start, end)``, or ``end``."""
        self._check(start, end)
        if start >= end or not self._count:
            return end
        b = start >> 3
        v = self._buf[b] >> (start & 7)
        if v:
            return min(start + _lowbit(v), end)
        j = self._find_byte(b + 1, (end + 7) >> 3, True)
        if j >= (end + 7) >> 3:
            return end
        return min((j << 3) + _lowbit(self._buf[j]), end)

    def next_clear(self, start: int, end: int) -> int:
        """Index of the first clear bit in ``[start, end)``, or ``end``."""
        self._check(start, end)
        if start >= end:
            return end
        if not self._count:
            return start
        b = start >> 3
        v = (~self._buf[b] & 0xFF) >> (start & 7)
        if v:
            return min(start + _lowbit(v), end)
        j = self._find_byte(b + 1, (end + 7) >> 3, False)
        if j >= (end + 7) >> 3:
            return end
        return min((j << 3) + _lowbit(~self._buf[j] & 0xFF), end)

    def all_set(self, start: int, end: int) -> bool:
        return self.next_clear(start, end) == end

    def any_set(self, start: int, end: int) -> bool:
        return self.next_set(start, end) < end

    def runs(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(run_start, run_end, is_set)`` runs covering ``[start, end)``
        exactly, alternating, in order."""
        self._check(start, end)
        i = start
        while i < end:
            if self._buf[i >> 3] >> (i & 7) & 1:
                j = self.next_clear(i, end)
                yield i, j, True
            else:
                j = self.next_set(i, end)
                yield i, j, False
            i = j

    def set_runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """``(run_start, run_end)`` of the set runs in ``[start, end)``."""
        if end is None:
            end = self.nbits
        self._check(start, end)
        i = self.next_set(start, end)
        while i < end:
            j = self.next_clear(i, end)
            yield i, j
            i = self.next_set(j, end)

    # -- serialization (the on-disk bitmap of :mod:`replfs.meta.format`) --------
    def to_bytes(self) -> bytes:
        """A copy of the packed bits (``(nbits + 7) >> 3`` bytes, the layout
        above); bits past ``nbits`` in the last byte are always 0."""
        return bytes(self._buf)

    @classmethod
    def from_bytes(cls, nbits: int, data) -> ClusterBitmap:
        """A bitmap of ``nbits`` bits from packed ``data`` (exactly
        ``(nbits + 7) >> 3`` bytes, bytes-like).  Bits past ``nbits`` in the
        last byte are cleared; the count and the summary are rebuilt from the
        bits (cost: one compare per 4 KiB chunk, a popcount of the non-zero
        ones)."""
        bm = cls(nbits)
        n = len(bm._buf)
        if len(data) != n:
            raise ValueError(f"{len(data)} bytes for {nbits} bits, expected {n}")
        if not n:
            return bm
        bm._mv[:] = data
        buf = bm._buf
        if nbits & 7:
            buf[-1] &= (1 << (nbits & 7)) - 1
        count = 0
        summary = bm._summary
        for c in range(len(summary)):
            a = c << _CHUNK_SHIFT
            b = min(a + CHUNK, n)
            chunk = buf[a:b]
            if chunk != (_ZERO_CHUNK if b - a == CHUNK else bytes(b - a)):
                summary[c] = 1
                count += int.from_bytes(chunk, "little").bit_count()
        bm._count = count
        return bm
