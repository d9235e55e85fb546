#!/usr/bin/env python3
"""Re-protect benchmark: time and bytes to protect a failed-over disk again,
beside the full copy that QEMU's re-protect (drive-mirror sync=full) makes.

    .venv/bin/python scripts/bench_reprotect.py [--size 1G] [--diverged 64M]
                                                [--dir /var/tmp] [--json FILE]

A pair on loopback (host "a" primary, "b" secondary; images filled with data):
a checkpoint, then ``--diverged`` bytes of 1 MiB writes at random on the
primary (they reach the secondary's hidden overlay), the primary killed
(SIGKILL), ``replfs failover`` on b, ``--diverged`` bytes of the VM's writes on
b's file, a restarted as a secondary on its image, then ``replfs reprotect``
on b, timed from the command to "replicating"; the bytes through a counting
TCP proxy in front of a.  Then, on the same pair, ``replfs resync --full``
(every cluster, the full-copy alternative), timed and counted the same way.

Everything it mounts it unmounts; the images are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from replfs.units import human, parse_size  # noqa: E402
from scripts.bench.run import cpu_seconds  # noqa: E402
from scripts.benchpair import MiB, replfs, status, wait_state  # noqa: E402
from tests._proc import free_port, mounted, stop_pid, unmount, wait_gone  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402


def write_random(path: str, total: int, byte: int, rng: random.Random, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for _ in range(total // MiB):
            os.pwrite(fd, bytes([byte]) * MiB, rng.randrange(size // MiB) * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--diverged", default="64M", help="bytes written on each side")
    ap.add_argument("--dir", default="/var/tmp")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    size, diverged = parse_size(args.size), parse_size(args.diverged)
    work = tempfile.mkdtemp(prefix="replfs-bench-reprotect-", dir=args.dir)
    mounts: list[str] = []
    proxy = FaultProxy(("127.0.0.1", 0))
    port_a, port_b = free_port(), free_port()
    proxy.upstream = ("127.0.0.1", port_a)
    rng = random.Random(1)
    try:
        imgs = {}
        for h in "ab":
            imgs[h] = os.path.join(work, f"{h}.img")
            with open(imgs[h], "wb") as f:
                block = bytes(range(256)) * (MiB // 256)
                for _ in range(size // MiB):
                    f.write(block)

        def mount(role: str, h: str, *argv) -> str:
            path = os.path.join(work, f"mnt-{h}-{len(mounts)}")
            os.mkdir(path)
            replfs(role, path, "--disk", f"disk0={imgs[h]}",
                   "--log", os.path.join(work, f"{h}-{len(mounts)}.log"), *argv)
            mounts.append(path)
            return path

        b = mount("secondary", "b", "--listen", f"127.0.0.1:{port_b}",
                  "--workdir", os.path.join(work, "work-b"))
        a = mount("primary", "a", "--secondary", f"127.0.0.1:{port_b}")
        replfs("checkpoint", a)
        replfs("checkpoint", b)
        write_random(os.path.join(a, "disk0"), diverged, 0x22, rng, size)
        pid = status(a)["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 20)
        deadline = time.monotonic() + 10
        while mounted(a) and time.monotonic() < deadline:
            time.sleep(0.05)
        replfs("failover", b)
        write_random(os.path.join(b, "disk0"), diverged, 0x33, rng, size)
        a2 = mount("secondary", "a", "--listen", f"127.0.0.1:{port_a}",
                   "--workdir", os.path.join(work, "work-a"))
        bpid = status(b)["pid"]

        rows = []
        for what, run in (
                ("reprotect (incremental)",
                 lambda: replfs("reprotect", b, "--secondary", f"127.0.0.1:{proxy.port}")),
                ("full copy (resync --full)", lambda: replfs("resync", b, "--full"))):
            sent0, cpu0, t0 = proxy.bytes_up, cpu_seconds(bpid), time.monotonic()
            run()
            wait_state(b, "replicating", 900)
            seconds = time.monotonic() - t0
            rows.append({"what": what, "seconds": round(seconds, 2),
                         "bytes_sent": proxy.bytes_up - sent0,
                         "cpu_seconds": round(cpu_seconds(bpid) - cpu0, 2)})
            replfs("checkpoint", b)
            replfs("checkpoint", a2)
        same = _digest(imgs["a"]) == _digest(imgs["b"])
    finally:
        for path in reversed(mounts):
            if mounted(path):
                try:
                    pid = status(path)["pid"]
                except OSError:
                    pid = None
                unmount(path, lazy=False)
                if pid:
                    stop_pid(pid, ((signal.SIGTERM, 20), (signal.SIGKILL, 5)))
                unmount(path)
        proxy.close()
        shutil.rmtree(work, ignore_errors=True)

    print(f"Re-protect of a {human(size)} disk after {human(diverged)} of writes on each side "
          f"(images equal afterwards: {same})")
    print(f"{'':28} {'time':>9} {'sent':>11} {'CPU':>7} {'sent/diverged':>14}")
    for r in rows:
        print(f"{r['what']:28} {r['seconds']:>8.2f}s {human(r['bytes_sent']):>11} "
              f"{r['cpu_seconds']:>6.2f}s {r['bytes_sent'] / (2 * diverged):>14.2f}")
    full, inc = rows[1], rows[0]
    print(f"incremental / full: time {inc['seconds'] / full['seconds']:.2f}, "
          f"bytes {inc['bytes_sent'] / full['bytes_sent']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": size, "diverged_each_side": diverged, "rows": rows,
                       "equal": same}, f, indent=1)
    return 0 if same else 1


def _digest(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
