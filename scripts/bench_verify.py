#!/usr/bin/env python3
"""Verify benchmark: how fast `replfs verify` compares a pair on loopback, beside
reading both images locally with the same hash, and what it costs in CPU.

    .venv/bin/python scripts/bench_verify.py [--size 1G] [--dir /var/tmp] [--rounds 3]
                                             [--json FILE]

A pair of ``--size`` images with the same content (a byte pattern, so that
nothing compresses or is sparse) on 127.0.0.1.  Rounds alternate:

* **local**: this process reads both image files in 8 MiB chunks and
  computes the same per-cluster digests (xxh3 per 64 KiB,
  ``replfs.core.digest.cluster_digests``) - what a verify could do at best if
  both images were on this host, one read after the other;
* **verify**: ``replfs verify MOUNT`` (digests computed on each side over the
  control channel), timed from the command and by the job itself
  (``finished_at - started_at`` in the status), with the CPU seconds both
  daemons used meanwhile (``/proc/PID/stat`` utime + stime), per GiB.

The images are in the page cache for every round (written just before, and
read by the first round): the figures compare the work, not the disk.
Target: verify rate >= 0.7x the local rate.  Everything it mounts it
unmounts; the images are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from replfs.core.digest import cluster_digests
from replfs.units import human, parse_size
from scripts.bench.run import cpu_seconds
from scripts import benchpair
from scripts.benchpair import MiB, replfs, status

GiB = 1 << 30
CHUNK = 8 * MiB
CLUSTER = 64 * 1024


class Pair(benchpair.Pair):
    def start(self) -> None:
        self.start_secondary()
        self.start_primary()
        self.ppid, self.spid = status(self.pm)["pid"], status(self.sm)["pid"]


def local_round(pair: Pair) -> float:
    """Seconds to read both images and hash every cluster, here."""
    t = time.perf_counter()
    for img in (pair.pimg, pair.simg):
        fd = os.open(img, os.O_RDONLY)
        try:
            off = 0
            while off < pair.size:
                data = os.pread(fd, CHUNK, off)
                cluster_digests(data, CLUSTER)
                off += len(data)
        finally:
            os.close(fd)
    return time.perf_counter() - t


def verify_round(pair: Pair) -> dict:
    before = cpu_seconds(pair.ppid), cpu_seconds(pair.spid)
    t = time.perf_counter()
    r = replfs("verify", pair.pm, ok=(0, 1))
    took = time.perf_counter() - t
    after = cpu_seconds(pair.ppid), cpu_seconds(pair.spid)
    v = status(pair.pm)["verify"]
    if r.returncode != 0 or v["differences_count"]:
        raise SystemExit(f"bench: the images differ?\n{r.stdout}{r.stderr}")
    gib = pair.size / GiB
    return {"command_s": took, "job_s": v["finished_at"] - v["started_at"],
            "primary_cpu_s_per_gib": (after[0] - before[0]) / gib,
            "secondary_cpu_s_per_gib": (after[1] - before[1]) / gib}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    base = tempfile.mkdtemp(prefix="replfs-bench-verify-", dir=args.dir)
    pair = Pair(base, size)
    local, runs = [], []
    try:
        pair.start()
        local_round(pair)  # both images into the page cache
        for i in range(args.rounds):
            local.append(local_round(pair))
            runs.append(verify_round(pair))
            print(f"  round {i + 1}: local {local[-1]:.2f} s, verify {runs[-1]['job_s']:.2f} s "
                  f"(command {runs[-1]['command_s']:.2f} s)", flush=True)
    finally:
        pair.close()
        shutil.rmtree(base, ignore_errors=True)
    loc = statistics.median(local)
    job = statistics.median(r["job_s"] for r in runs)
    cmd = statistics.median(r["command_s"] for r in runs)
    pcpu = statistics.median(r["primary_cpu_s_per_gib"] for r in runs)
    scpu = statistics.median(r["secondary_cpu_s_per_gib"] for r in runs)
    rows = [("local: read both images + xxh3", loc, None, None),
            ("replfs verify (the job)", job, pcpu, scpu),
            ("replfs verify (the command)", cmd, None, None)]
    print(f"\n{human(size)} on loopback, median of {args.rounds} rounds "
          f"(target: verify >= 0.7x local)")
    print(f"{'':34} {'seconds':>8} {'rate':>12} {'x local':>8} {'CPU s/GiB p+s':>16}")
    for name, secs, p, s in rows:
        cpu = f"{p:.2f} + {s:.2f}" if p is not None else ""
        print(f"{name:34} {secs:8.2f} {human(size / secs) + '/s':>12} {loc / secs:8.2f} "
              f"{cpu:>16}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "local_s": local, "verify": runs,
                       "ratio_job": loc / job, "ratio_command": loc / cmd}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
