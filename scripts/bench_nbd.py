#!/usr/bin/env python3
"""NBD write throughput on loopback: replfs client/server beside qemu.

Design note
-----------
Three workloads, the same for every pair: 4 KiB "random" writes at queue
depth 1 and 16 (offsets stepping by a prime number of blocks through the
image, which is what ``qemu-img bench -S`` can express; every block is hit
once before any is hit twice), and 1 MiB sequential writes at queue depth 4.
Each runs for about ``--seconds`` (a short calibration run picks the request
count for qemu-img bench).

Pairs (client -> server), each server in its own process serving a raw file
in /dev/shm, so that client and server each get a core:

* replfs -> replfs   the replication link (this script's trio client against
                     ``NBDServer`` over a ``RawImage``)
* qemu   -> qemu-nbd ``qemu-img bench -w -t none`` against ``qemu-nbd``
* fio    -> qemu-nbd fio's libnbd engine against ``qemu-nbd`` (qemu-img bench
                     with more than one request in flight stalls on 40 ms
                     delayed ACKs against qemu-nbd 7.2, so fio is the fair
                     C reference for queue depth > 1)
* fio    -> replfs   a C client against our server
* replfs -> qemu-nbd our client against a C server

Prints one table: IOPS, MB/s, and the ratio of replfs->replfs to the better
of the two C pairs.
Every process started here is killed by its PID before exit.  Total run time
is bounded (about 12 runs of ``--seconds`` plus start-up; < 2 minutes with
the default 3 s).

Usage: .venv/bin/python scripts/bench_nbd.py [--seconds 3] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests._proc import free_port, wait_port  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
IMAGE_SIZE = 512 * MiB
STEP_BLOCKS = 7919  # prime: coprime with the power-of-two block count
WORKLOADS = [
    # name, block size, queue depth, step (bytes)
    ("4k-rand-qd1", 4 * KiB, 1, STEP_BLOCKS * 4 * KiB),
    ("4k-rand-qd16", 4 * KiB, 16, STEP_BLOCKS * 4 * KiB),
    ("1m-seq-qd4", MiB, 4, MiB),
]


# -- the replfs server process --------------------------------------------------------
def serve_main(image: str) -> None:
    import trio

    from replfs.block.raw import RawImage
    from replfs.nbd.server import NBDServer

    async def main():
        node = RawImage(image)
        server = NBDServer({"disk": node})
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(server.serve, "127.0.0.1", 0)
            print(port, flush=True)

    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    trio.run(main)


# -- the replfs client benchmark ------------------------------------------------------------
def client_bench(port: int, bs: int, qd: int, step: int, seconds: float) -> tuple[int, float]:
    """Run our client; returns (requests, elapsed seconds)."""
    import trio

    from replfs.nbd.client import open_client

    async def main():
        async with open_client("127.0.0.1", port, "disk") as c:
            size = c.size
            nblocks = size // bs
            step_blocks = step // bs
            buf = os.urandom(bs)
            state = {"i": 0}
            deadline = time.perf_counter() + seconds

            async def worker():
                while time.perf_counter() < deadline:
                    i = state["i"]
                    state["i"] = i + 1
                    await c.write(((i * step_blocks) % nblocks) * bs, buf)

            t0 = time.perf_counter()
            async with trio.open_nursery() as n:
                for _ in range(qd):
                    n.start_soon(worker)
            elapsed = time.perf_counter() - t0
            await c.flush()
            return c.statistics()["writes"], elapsed

    return trio.run(main)


# -- qemu-img bench --------------------------------------------------------------------------
def qemu_bench(port: int, bs: int, qd: int, step: int, seconds: float, cache: str) -> tuple[int, float]:
    uri = f"nbd://127.0.0.1:{port}/disk"

    def once(count: int) -> float:
        r = subprocess.run(
            ["qemu-img", "bench", "-w", "-f", "raw", "-t", cache, "-c", str(count), "-d", str(qd),
             "-s", str(bs), "-S", str(step), uri],
            capture_output=True, text=True, timeout=120,
        )
        m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
        if r.returncode or not m:
            raise RuntimeError(f"qemu-img bench failed: {r.stdout}{r.stderr}")
        return float(m.group(1))

    calib = 2000 if bs <= 64 * KiB else 200
    t = once(calib)
    count = int(min(max(calib, calib * seconds / max(t, 1e-3)), 5_000_000))
    return count, once(count)


# -- fio with its nbd engine (libnbd) ------------------------------------------------------
def fio_bench(port: int, bs: int, qd: int, step: int, seconds: float) -> tuple[int, float]:
    """fio's libnbd engine; random offsets for the 4 KiB workloads."""
    import json

    rw = "write" if step == bs else "randwrite"
    r = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/disk", f"--rw={rw}",
         f"--bs={bs}", f"--iodepth={qd}", f"--size={IMAGE_SIZE}", f"--runtime={seconds}", "--time_based",
         "--randrepeat=1", "--output-format=json"],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    if r.returncode:
        raise RuntimeError(f"fio failed: {r.stdout}{r.stderr}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]["write"]
    runtime = job["runtime"] / 1000.0
    return int(job["total_ios"]), runtime


class Procs:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start_replfs(self, image: str) -> tuple[subprocess.Popen, int]:
        p = subprocess.Popen([sys.executable, __file__, "--serve", image], stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        line = p.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"replfs server did not start: {line!r}")
        return p, int(line)

    def start_qemu_nbd(self, image: str) -> tuple[subprocess.Popen, int]:
        port = free_port()
        p = subprocess.Popen(
            ["qemu-nbd", "--persistent", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port),
             "--cache=writeback", "--aio=threads", image],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        self.procs.append(p)
        wait_port(port, p)
        return p, port

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.kill()
        p.wait(10)

    def stop_all(self) -> None:
        for p in self.procs:
            self.stop(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each run (default 3)")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    ap.add_argument("--cache", default="none", choices=["none", "writeback"], help="qemu-img bench -t")
    ap.add_argument("--serve", metavar="IMAGE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args.serve)
        return 0
    have_qemu = shutil.which("qemu-img") and shutil.which("qemu-nbd")
    have_fio = shutil.which("fio") and "nbd" in subprocess.run(
        ["fio", "--enghelp"], capture_output=True, text=True).stdout
    if not have_qemu:
        print("qemu-img / qemu-nbd not installed: only replfs -> replfs is measured", file=sys.stderr)
    workdir = tempfile.mkdtemp(prefix="bench-nbd-", dir=args.dir)
    procs = Procs()
    results: dict[tuple[str, str], tuple[int, float]] = {}
    t_start = time.monotonic()
    try:
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        pairs = [("replfs->replfs", "replfs", "replfs")]
        if have_qemu:
            pairs.append(("qemu->qemu-nbd", "qemu", "qemu-nbd"))
            if have_fio:
                pairs += [("fio->qemu-nbd", "fio", "qemu-nbd"), ("fio->replfs", "fio", "replfs")]
            pairs.append(("replfs->qemu-nbd", "replfs", "qemu-nbd"))
        for pair, client, server in pairs:
            proc, port = procs.start_replfs(image) if server == "replfs" else procs.start_qemu_nbd(image)
            try:
                for name, bs, qd, step in WORKLOADS:
                    if client == "replfs":
                        results[(pair, name)] = client_bench(port, bs, qd, step, args.seconds)
                    elif client == "fio":
                        results[(pair, name)] = fio_bench(port, bs, qd, step, args.seconds)
                    else:
                        results[(pair, name)] = qemu_bench(port, bs, qd, step, args.seconds, args.cache)
                    n, t = results[(pair, name)]
                    print(f"  {pair:18} {name:13} {n / t:10.0f} IOPS", file=sys.stderr, flush=True)
            finally:
                procs.stop(proc)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    pairs_done = list(dict.fromkeys(p for p, _ in results))
    bs_of = {name: bs for name, bs, _, _ in WORKLOADS}
    header = f"{'workload':14}" + "".join(f" | {p:>19}" for p in pairs_done) + " | replfs/best-C"
    print(f"\nNBD writes over 127.0.0.1, raw image in {args.dir}, qemu-img bench -t {args.cache}")
    print("each cell: IOPS / MB/s")
    print(header)
    print("-" * len(header))
    for name, bs, qd, step in WORKLOADS:
        cells = []
        for p in pairs_done:
            n, t = results[(p, name)]
            cells.append(f"{n / t:7.0f} / {n * bs_of[name] / t / 1e6:7.1f}")
        ratio = ""
        refs = [results[(p, name)] for p in ("qemu->qemu-nbd", "fio->qemu-nbd") if (p, name) in results]
        if refs:
            ours = results[("replfs->replfs", name)]
            best = max(n / t for n, t in refs)
            ratio = f"{(ours[0] / ours[1]) / best:.2f}"
        print(f"{name:14}" + "".join(f" | {c:>19}" for c in cells) + f" | {ratio:>13}")
    print(f"\n(total {time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
