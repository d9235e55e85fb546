#!/usr/bin/env python3
"""Resync benchmark: how fast a pair heals, beside nbdcopy, and what it costs the VM.

    .venv/bin/python scripts/bench_resync.py [--size 1G] [--dir /var/tmp] [--rounds 2]
                                             [--fio-seconds 20] [--json FILE]

1. **Resync rate.**  A pair of ``--size`` images (the primary's filled with
   data); ``replfs resync --full`` copies every cluster to the secondary, timed
   from the command to "replicating" again (a checkpoint before each run
   empties the hidden overlay, so the resync's copy-before-write copies every
   cluster).  Beside it, ``nbdcopy --flush`` copies the same image into
   ``qemu-nbd`` serving a copy of the secondary's image on the same disk
   (raw, writeback cache).  Since issue 11 a replfs secondary admits plain
   NBD clients as read-only observers (only the replicating primary may
   write), so nbdcopy can no longer write into its export; the qemu-nbd
   target has no copy-before-write, which makes it the harder baseline.
   Rounds alternate.  Ratio = replfs / nbdcopy.
2. **A secondary restart under a running fio job.**  fio writes 4 KiB at
   random on the primary's disk file (QD1, psync) for ``--fio-seconds``;
   after a quarter of it the secondary daemon is killed (SIGKILL), after half
   it is restarted with the same arguments; reported: the time from the
   restart to "replicating", and fio's IOPS before the kill, while degraded,
   while syncing and after.

Everything it mounts it unmounts; the images are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from replfs.units import human, parse_size  # noqa: E402
from scripts import benchpair  # noqa: E402
from scripts.benchpair import replfs, status, wait_state  # noqa: E402
from tests._proc import unmount, wait_gone  # noqa: E402


class Pair(benchpair.Pair):
    def start_primary(self) -> None:
        super().start_primary("--reconnect-interval", "0.5")

    def checkpoint(self) -> None:
        replfs("checkpoint", self.pm)
        replfs("checkpoint", self.sm)

    def kill_secondary(self) -> None:
        pid = status(self.sm)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)
        unmount(self.sm)


def resync_round(pair: Pair) -> tuple[float, float]:
    """(from the command, from the resync's start): the command returns once
    the resync has started, so the second leaves out the CLI's start-up."""
    t = time.perf_counter()
    replfs("resync", pair.pm, "--full")
    started = time.perf_counter()
    wait_state(pair.pm, "replicating")
    end = time.perf_counter()
    return end - t, end - started


def nbdcopy_round(pair: Pair) -> float:
    """nbdcopy of the primary's image into qemu-nbd serving a copy of the
    secondary's (made once, outside the timing)."""
    target = os.path.join(pair.base, "nbdcopy-target.img")
    if not os.path.exists(target):
        shutil.copyfile(pair.simg, target)
    with socket.socket() as s:  # a free port (qemu-nbd binds it a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pid_file = os.path.join(pair.base, "qemu-nbd.pid")
    subprocess.run(["qemu-nbd", "--fork", "--pid-file", pid_file, "-f", "raw", "-b", "127.0.0.1",
                    "-p", str(port), "-x", "d", "--cache=writeback", target], check=True)
    with open(pid_file) as f:
        pid = int(f.read())
    try:
        t = time.perf_counter()
        subprocess.run(["nbdcopy", "--flush", pair.pimg, f"nbd://127.0.0.1:{port}/d"],
                       check=True)
        return time.perf_counter() - t
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid, 10)


def part_rate(pair: Pair, rounds: int) -> dict:
    out = {"replfs_s": [], "replfs_job_s": [], "nbdcopy_s": []}
    for i in range(rounds):
        pair.checkpoint()
        took, job = resync_round(pair)
        out["replfs_s"].append(took)
        out["replfs_job_s"].append(job)
        print(f"  round {i + 1}: replfs   {took:6.2f} s  {human(pair.size / took)}/s "
              f"(the job alone {job:.2f} s, {human(pair.size / job)}/s)", flush=True)
        pair.checkpoint()
        took = nbdcopy_round(pair)
        out["nbdcopy_s"].append(took)
        print(f"  round {i + 1}: nbdcopy  {took:6.2f} s  {human(pair.size / took)}/s",
              flush=True)
    return out


def part_restart(pair: Pair, seconds: int) -> dict:
    log_prefix = os.path.join(pair.base, "fio")
    fio = subprocess.Popen(
        ["fio", "--name=w", f"--filename={os.path.join(pair.pm, 'd')}", "--rw=randwrite",
         "--bs=4k", "--ioengine=psync", "--time_based", f"--runtime={seconds}",
         f"--size={pair.size}", f"--write_iops_log={log_prefix}", "--log_avg_msec=250",
         "--output-format=json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    marks = {}
    time.sleep(seconds / 4)
    pair.kill_secondary()
    marks["killed"] = time.perf_counter() - t0
    time.sleep(max(0.0, seconds / 2 - (time.perf_counter() - t0)))
    pair.start_secondary()
    marks["restarted"] = time.perf_counter() - t0
    wait_state(pair.pm, "syncing", 60) if status(pair.pm)["state"] == "degraded" else None
    marks["syncing"] = time.perf_counter() - t0
    wait_state(pair.pm, "replicating", 600)
    marks["replicating"] = time.perf_counter() - t0
    fio.communicate(timeout=seconds + 120)
    iops = _iops_by_phase(f"{log_prefix}_iops.1.log", marks, seconds)
    pair.checkpoint()
    same = open(pair.pimg, "rb").read() == open(pair.simg, "rb").read()
    return {"marks_s": marks, "restart_to_replicating_s": marks["replicating"] - marks["restarted"],
            "iops": iops, "images_equal": same}


def _iops_by_phase(path: str, marks: dict, seconds: int) -> dict:
    phases = {"before the kill": (0, marks["killed"]),
              "degraded": (marks["killed"], marks["restarted"]),
              "syncing": (marks["restarted"], marks["replicating"]),
              "after": (marks["replicating"], seconds)}
    samples = []
    with open(path) as f:
        for line in f:
            ms, value = line.split(",")[:2]
            samples.append((int(ms) / 1000, int(value)))
    out = {}
    for name, (a, b) in phases.items():
        vals = [v for t, v in samples if a <= t < b]
        out[name] = round(statistics.mean(vals)) if vals else None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--fio-seconds", type=int, default=20)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    base = tempfile.mkdtemp(prefix="replfs-bench-resync-", dir=args.dir)
    pair = Pair(base, size)
    result = {"size": size}
    try:
        pair.start_secondary()
        pair.start_primary()
        print(f"1. resync rate, {human(size)} of dirty clusters (resync --full) "
              f"against nbdcopy into qemu-nbd on a copy of the secondary's image", flush=True)
        rate = part_rate(pair, args.rounds)
        r, n = statistics.median(rate["replfs_s"]), statistics.median(rate["nbdcopy_s"])
        j = statistics.median(rate["replfs_job_s"])
        result["rate"] = {**rate, "replfs_bytes_per_s": size / r, "nbdcopy_bytes_per_s": size / n,
                          "ratio": n / r, "ratio_job": n / j}
        print(f"  median: replfs {human(size / r)}/s from the command ({human(size / j)}/s "
              f"the job alone), nbdcopy {human(size / n)}/s; ratio {n / r:.2f} "
              f"({n / j:.2f} the job alone)", flush=True)
        print(f"2. secondary killed and restarted under fio (4 KiB randwrite QD1, "
              f"{args.fio_seconds} s)", flush=True)
        restart = part_restart(pair, args.fio_seconds)
        result["restart"] = restart
        print(f"  restart -> replicating: {restart['restart_to_replicating_s']:.2f} s; "
              f"images equal after a checkpoint: {restart['images_equal']}")
        print("  fio IOPS: " + ", ".join(f"{k} {v}" for k, v in restart["iops"].items()))
    finally:
        pair.close()
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
