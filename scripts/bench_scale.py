#!/usr/bin/env python3
"""Scale check: a 1 TiB sparse disk pair -- mount time, clean-checkpoint time, RSS.

    .venv/bin/python scripts/bench_scale.py [--size 1T] [--dir /var/tmp] [--rounds 20]

Prints the time each mount command takes to return (mount live, replication
set up), the median and worst time of a checkpoint on a clean disk (the
write to .replfs/checkpoint, on each side), and each daemon's RSS.
Everything it mounts it unmounts; the sparse images are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from replfs.units import parse_size  # noqa: E402
from tests._proc import unmount  # noqa: E402


def replfs(*argv) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "replfs", *map(str, argv)], check=True,
                   capture_output=True, text=True)
    return time.perf_counter() - t


def status(mount: str) -> dict:
    with open(os.path.join(mount, ".replfs", "status")) as f:
        return json.load(f)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def checkpoint(mount: str) -> float:
    t = time.perf_counter()
    fd = os.open(os.path.join(mount, ".replfs", "checkpoint"), os.O_WRONLY)
    try:
        os.write(fd, b"1")
    finally:
        os.close(fd)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 40)
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="replfs-scale-", dir=args.dir)
    mounts = []
    try:
        imgs = {}
        for side in ("primary", "secondary"):
            imgs[side] = os.path.join(base, f"{side}.img")
            with open(imgs[side], "wb") as f:
                f.truncate(args.size)
            os.mkdir(os.path.join(base, side))
        smnt, pmnt = os.path.join(base, "secondary"), os.path.join(base, "primary")
        t_s = replfs("secondary", smnt, "--listen", "127.0.0.1:0",
                     "--disk", f"disk0={imgs['secondary']}", "--log", f"{base}/s.log")
        mounts.append(smnt)
        t_p = replfs("primary", pmnt, "--secondary", status(smnt)["listen"],
                     "--disk", f"disk0={imgs['primary']}", "--log", f"{base}/p.log")
        mounts.append(pmnt)
        ck = {m: [checkpoint(m) for _ in range(args.rounds)] for m in (smnt, pmnt)}
        print(f"disk size {args.size} bytes ({args.size / (1 << 40):g} TiB), sparse")
        print(f"mount secondary: {t_s * 1000:.0f} ms   mount primary: {t_p * 1000:.0f} ms "
              "(command start to return: process start, images, NBD, FUSE)")
        for name, m in (("secondary", smnt), ("primary", pmnt)):
            v = ck[m]
            print(f"clean checkpoint on the {name}: median {statistics.median(v) * 1000:.2f} ms, "
                  f"max {max(v) * 1000:.2f} ms over {len(v)}; "
                  f"RSS {rss_mib(status(m)['pid']):.1f} MiB")
    finally:
        for m in reversed(mounts):
            unmount(m)  # fusermount3 -u, then -u -z if that fails
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
