#!/usr/bin/env python3
"""Copy-before-write microbenchmark: the secondary's cost per 4 KiB write.

    .venv/bin/python scripts/bench_cbw.py [--size 256M] [--writes 2000] [--rounds 5]
                                          [--dir /var/tmp] [--profile] [--json FILE]

In-process, no FUSE, no NBD: a :class:`~replfs.block.graph.SecondaryGraph`
on a fully written ``--size`` image (random bytes, so nothing is sparse),
warmed up as scripts/bench warms a pair (every cluster written once through
the export, so the hidden overlay's blocks exist, then a checkpoint).  Each
round then re-arms (checkpoint) and times, per write, ``--writes`` 4 KiB
writes at random 4 KiB offsets, one per cluster, in distinct random
clusters, through the export node (gate -> first-write -> copy-before-write):

* ``export, copy``    each write copies its 64 KiB cluster into hidden first:
                      the headline (a write right after a checkpoint);
* ``export, copy, cold``  the same on other clusters, after the image's and
                      the hidden file's pages were dropped from the page
                      cache (``fdatasync`` + ``POSIX_FADV_DONTNEED``, what
                      scripts/bench's ``drop_caches`` does to them): each
                      copy reads its old cluster from the disk;
* ``export, copied``  the same offsets again: the clusters are held already;
* ``raw write 4K``    the same writes on the disk's RawImage alone;
* ``copy 64K``        what the copy costs alone (``cbw``'s copy of one
                      cluster, on fresh clusters after a checkpoint), and the
                      old way of it (read the cluster, ``hidden.write``).

Per phase: the median over rounds of the mean µs per write, and the median
over rounds of the per-write medians (steadier when other processes share
the machine: compare those).  Except in the cold phase, the images sit in the
page cache (written just before): that measures the CPU work, not the disk.  ``--profile`` runs one
more round of the headline phase under cProfile and prints the top entries.
Everything is created in a temporary directory under ``--dir`` and removed.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import shutil
import statistics
import sys
import tempfile
import time

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from replfs.block.graph import SecondaryGraph  # noqa: E402
from replfs.units import parse_size  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
BLOCK = 4 * KiB


def fill(path: str, size: int) -> None:
    chunk = os.urandom(MiB)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for off in range(0, size, MiB):
            os.pwrite(fd, chunk[: min(MiB, size - off)], off)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def evict(path: str) -> None:
    """Write back and drop ``path``'s pages from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read ``path`` whole, so that its pages are in the page cache again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.read(fd, 4 * MiB):
            pass
    finally:
        os.close(fd)


def offsets(nclusters: int, cluster: int, n: int, rng: random.Random) -> list[int]:
    return [c * cluster + rng.randrange(cluster // BLOCK) * BLOCK
            for c in rng.sample(range(nclusters), n)]


async def timed(fn, offs: list[int], data) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for off in offs:
        t0 = clock()
        await fn(off, data)
        out.append((clock() - t0) / 1000)
    return out


async def bench(args) -> dict:
    size = parse_size(args.size)
    work = tempfile.mkdtemp(prefix="bench-cbw-", dir=args.dir)
    image = os.path.join(work, "disk.img")
    fill(image, size)
    graph = SecondaryGraph({"d": image}, workdir=os.path.join(work, "wd"))
    try:
        d = graph.disks["d"]
        export, cbw, raw = d.export, d.cbw, d.disk
        cluster = cbw.cluster_size
        nclusters = size // cluster
        n = min(args.writes, nclusters)

        async def checkpoint():
            async with graph.gate.exclusive():
                await d.checkpoint()

        # Warm-up, as scripts/bench does: every cluster once, then a checkpoint.
        for off in range(0, size, MiB):
            await export.write(off, await raw.read(off, MiB))
        await checkpoint()

        payload = os.urandom(BLOCK)
        rng = random.Random(args.seed)
        phases: dict[str, list[list[float]]] = {}

        def add(name, times):
            phases.setdefault(name, []).append(times)

        async def old_copy(off, _):
            a = off & ~(cluster - 1)
            await d.hidden.write(a, await raw.read(a, cluster))

        async def new_copy(off, _):
            c = off >> cbw._shift
            await cbw._copy_old(c, c + 1)

        for _ in range(args.rounds):
            offs = offsets(nclusters, cluster, n, rng)
            await checkpoint()
            add("export, copy", await timed(export.write, offs, payload))
            add("export, copied", await timed(export.write, offs, payload))
            add("raw write 4K", await timed(raw.write, offs, payload))
            await checkpoint()
            add("copy 64K (cbw)", await timed(new_copy, offs, None))
            await checkpoint()
            add("copy 64K (read+write)", await timed(old_copy, offs, None))
            cold = offsets(nclusters, cluster, n, rng)
            await checkpoint()
            evict(image)
            evict(d.hidden.path)
            add("export, copy, cold", await timed(export.write, cold, payload))
            warm(image)  # the next round's other phases run on a warm cache
            warm(d.hidden.path)
        await checkpoint()

        result = {
            "size": size, "writes": n, "rounds": args.rounds, "cluster_size": cluster,
            "phases": {
                name: {
                    "mean_us": statistics.median(statistics.fmean(r) for r in rounds),
                    "median_us": statistics.median(statistics.median(r) for r in rounds),
                    "round_means_us": [round(statistics.fmean(r), 2) for r in rounds],
                }
                for name, rounds in phases.items()
            },
            "cbw": cbw.statistics(),
        }
        if args.profile:
            offs = offsets(nclusters, cluster, n, rng)
            await checkpoint()
            prof = cProfile.Profile()
            prof.enable()
            await timed(export.write, offs, payload)
            prof.disable()
            await checkpoint()
            pstats.Stats(prof).sort_stats("tottime").print_stats(18)
        return result
    finally:
        graph.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--writes", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--dir", default="/var/tmp", help="where the scratch image goes (default /var/tmp)")
    ap.add_argument("--profile", action="store_true", help="one more headline round under cProfile")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    result = trio.run(bench, args)
    print(f"{result['writes']} writes x {result['rounds']} rounds, image {result['size'] // MiB} MiB, "
          f"cluster {result['cluster_size'] // KiB} KiB")
    print(f"{'phase':24} {'mean µs':>9} {'median µs':>10}   round means")
    for name, p in result["phases"].items():
        print(f"{name:24} {p['mean_us']:9.1f} {p['median_us']:10.1f}   {p['round_means_us']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
