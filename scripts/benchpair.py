"""What the pair benchmarks (bench_resync, bench_verify, bench_reprotect)
share: the CLI run as a subprocess, the status file, a wait for a state,
pattern-filled images, and mounts stopped at the end (a daemon's CPU time is
``scripts.bench.run.cpu_seconds``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests._proc import mounted, stop_pid, unmount

MiB = 1 << 20


def replfs(*argv, ok=(0,)) -> subprocess.CompletedProcess:
    """``replfs ARGV...``; exit with its output unless its status is in ``ok``."""
    r = subprocess.run([sys.executable, "-m", "replfs", *map(str, argv)],
                       capture_output=True, text=True, check=False)
    if r.returncode not in ok:
        raise SystemExit(f"bench: replfs {argv[0]} failed ({r.returncode}): "
                         f"{(r.stdout + r.stderr).strip()}")
    return r


def status(mount: str) -> dict:
    with open(os.path.join(mount, ".replfs", "status")) as f:
        return json.load(f)


def wait_state(mount: str, state: str, timeout: float = 600) -> float:
    """Seconds until ``mount`` reports ``state``."""
    t = time.perf_counter()
    deadline = t + timeout
    while status(mount)["state"] != state:
        if time.perf_counter() > deadline:
            raise SystemExit(f"bench: {mount} did not reach {state} in {timeout:g} s")
        time.sleep(0.02)
    return time.perf_counter() - t


def fill_images(paths, size: int) -> None:
    """Write ``size`` bytes of the same 0..255 pattern into each of ``paths``."""
    block = bytes(range(256)) * (4 * MiB // 256)
    for path in paths:
        with open(path, "wb") as f:
            f.writelines(block for _ in range(size // len(block)))
            f.write(block[:size % len(block)])


class Pair:
    """Two pattern-filled images of ``size`` under ``base`` and their mount
    points; a secondary (``d``) on a free loopback port, and its primary."""

    def __init__(self, base: str, size: int) -> None:
        self.base, self.size = base, size
        self.pimg, self.simg = os.path.join(base, "p.img"), os.path.join(base, "s.img")
        self.pm, self.sm = os.path.join(base, "pm"), os.path.join(base, "sm")
        os.mkdir(self.pm)
        os.mkdir(self.sm)
        fill_images((self.pimg, self.simg), size)
        self.listen = "127.0.0.1:0"

    def start_secondary(self) -> None:
        replfs("secondary", self.sm, "--listen", self.listen, "--disk", f"d={self.simg}",
               "--log", os.path.join(self.base, "s.log"))
        self.listen = status(self.sm)["listen"]

    def start_primary(self, *extra: str) -> None:
        replfs("primary", self.pm, "--secondary", self.listen, "--disk", f"d={self.pimg}",
               *extra, "--log", os.path.join(self.base, "p.log"))

    def close(self) -> None:
        stop_mounts(self.pm, self.sm, self.sm, self.pm)  # a dead mount may lie under a live one


def stop_mounts(*mounts: str) -> None:
    """Unmount each of ``mounts`` still mounted and stop its daemon (a mount
    may be listed twice: a dead one may lie under a live one)."""
    for m in mounts:
        if mounted(m):
            try:
                pid = status(m)["pid"]
            except OSError:
                pid = None
            unmount(m)
            if pid:
                stop_pid(pid)
