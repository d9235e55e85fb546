"""The process that tests/unit/test_meta_crash.py kills with SIGKILL.

    python -m tests.meta_crash_child PATH N0

Opens (creating if absent) the metadata file PATH of an image of ``SIZE`` at
``CS``, prints ``R``, then for n = N0, N0+1, ... writes the header, the
bitmap and the activity log derived from n, printing ``H n``, ``B n``,
``A n`` after each call has returned (durable).  Each line is one
``os.write`` to fd 1 (a pipe): no buffering, so a line the parent reads was
printed after its write was durable.  It runs until killed.

The parent imports ``header_for``/``bits_for``/``al_for`` to check what it
reads back.  n = 0 gives exactly what a new file holds.
"""

from __future__ import annotations

import os
import sys

from replfs.meta.format import AL_CAPACITY, Header, MetaFile

# 1 TiB + 3 clusters at 64 KiB: the 2 MiB bitmap of the design target (one
# 2 MiB pwritev, which a kill can tear: writing it in place instead of
# A/B fails this test most runs), and a bit count not a multiple of 8.
CS = 64 * 1024
SIZE = ((16 << 20) + 3) * CS
NBITS = (16 << 20) + 3
NBYTES = (NBITS + 7) >> 3


def _gen(n: int) -> int:
    return n * 0x9E3779B97F4A7C15 % (1 << 64)   # odd multiplier: non-zero for n > 0


def header_for(base: Header, n: int) -> Header:
    """The header written as number ``n`` (identity fields from ``base``)."""
    return Header(node_id=base.node_id, size=base.size, cluster_size=base.cluster_size,
                  checkpoint=n, current=_gen(n), peer_current=3 * n,
                  history=[_gen(n - k) for k in range(1, 5) if n - k > 0],
                  clean=n % 2 == 0, epoch_dirty=n % 5 == 1,
                  failover=("", "committing", "done")[n % 3],
                  extra={"n": n, "pad": "x" * (n * 37 % 3000)} if n else {})


def bits_for(n: int) -> bytes:
    """Bitmap number ``n``: its 8-byte counter repeated (so two of them differ
    in every 8 bytes), the spare bits of the last byte 0."""
    b = bytearray(n.to_bytes(8, "little") * (NBYTES // 8 + 1))[:NBYTES]
    b[-1] &= (1 << (NBITS & 7)) - 1
    return bytes(b)


def al_for(n: int) -> list[int]:
    """Activity log number ``n``: n itself plus 0..AL_CAPACITY-1 others, sorted."""
    k = n * 13 % AL_CAPACITY
    return sorted({n} | {(n * 7919 + i * 104729) % (1 << 32) for i in range(k)}) if n else []


def main(path: str, n0: int) -> None:
    m = MetaFile.open(path, size=SIZE, cluster_size=CS)
    base = m.header
    os.write(1, b"R\n")
    n = n0
    while True:
        m.write_header(header_for(base, n))
        os.write(1, b"H %d\n" % n)
        m.write_bitmap(bits_for(n))
        os.write(1, b"B %d\n" % n)
        m.write_al(al_for(n))
        os.write(1, b"A %d\n" % n)
        n += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
