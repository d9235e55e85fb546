"""``replfs demo``: a primary and a secondary on loopback, on scratch images.

Shows replication, the secondary view before and after a checkpoint, a
fault that heals itself (the secondary killed and restarted: the primary
reconnects and resyncs what it missed), and a failover, with the pattern bytes QEMU's test-replication uses: 0x11 the
initial content of both disks, 0x22 written by the primary VM, 0x33 by the
secondary VM.  Everything it mounts and starts, it unmounts and stops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from replfs.units import parse_size

MiB = 1 << 20
REGIONS = [("R0", 0), ("R1", 4 * MiB), ("R2", 8 * MiB), ("R3", 12 * MiB)]


def describe(data: bytes) -> str:
    """Run-length summary: ``22x1M``, ``11x64K+22x960K``."""
    def size(n):
        for unit, div in (("M", MiB), ("K", 1024)):
            if n % div == 0:
                return f"{n // div}{unit}"
        return str(n)
    out, i = [], 0
    while i < len(data):
        b = data[i]
        j = i
        stripped = data[i:].lstrip(bytes([b]))
        j = len(data) - len(stripped)
        out.append(f"{b:02x}x{size(j - i)}")
        i = j
    return "+".join(out)


def region(path: str, off: int, n: int = MiB) -> str:
    with open(path, "rb") as f:
        f.seek(off)
        return describe(f.read(n))


def fill(path: str, off: int, byte: int, n: int = MiB) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([byte]) * n, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(4 * MiB), fb.read(4 * MiB)
            if x != y:
                return False
            if not x:
                return True


class Demo:
    def __init__(self, base: str, size: int) -> None:
        self.base = base
        self.size = size
        self.pimg = os.path.join(base, "primary.img")
        self.simg = os.path.join(base, "secondary.img")
        self.pmnt = os.path.join(base, "primary")
        self.smnt = os.path.join(base, "secondary")
        self.pview = os.path.join(self.pmnt, "disk0")
        self.sview = os.path.join(self.smnt, "disk0")
        self.pids: list[int] = []

    def replfs(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "replfs", *argv]
        print("  $ replfs " + " ".join(argv))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        for line in (r.stdout + r.stderr).splitlines():
            print("    " + line)
        if check and r.returncode != 0:
            raise SystemExit(f"demo: 'replfs {argv[0]}' failed with status {r.returncode}")
        return r

    def status(self, mount: str) -> dict:
        with open(os.path.join(mount, ".replfs", "status")) as f:
            return json.load(f)

    def table(self, title: str, cols: dict[str, str]) -> None:
        print(f"\n  {title}")
        print("  " + "region".ljust(8) + "".join(k.ljust(22) for k in cols))
        for name, off in REGIONS:
            cells = "".join(region(p, off).ljust(22) for p in cols.values())
            print(f"  {name}@{off // MiB}M".ljust(10) + cells)

    def step(self, text: str) -> None:
        print(f"\n== {text}")

    def run(self) -> int:
        self.step(f"scratch images of {self.size // MiB} MiB in {self.base}, both 0x11")
        for img in (self.pimg, self.simg):
            with open(img, "wb") as f:
                f.write(b"\x11" * self.size)
        os.mkdir(self.pmnt)
        os.mkdir(self.smnt)

        self.step("start the secondary (NBD on a free port), then the primary")
        self.replfs("secondary", self.smnt, "--listen", "127.0.0.1:0",
                    "--disk", f"disk0={self.simg}",
                    "--log", os.path.join(self.base, "secondary.log"))
        self.pids.append(self.status(self.smnt)["pid"])
        listen = self.status(self.smnt)["listen"]
        self.replfs("primary", self.pmnt, "--secondary", listen,
                    "--disk", f"disk0={self.pimg}",
                    "--log", os.path.join(self.base, "primary.log"))
        self.pids.append(self.status(self.pmnt)["pid"])
        self.replfs("status", self.smnt)

        self.step("the primary VM writes 0x22 to R0; the secondary VM writes 0x33 to R1")
        fill(self.pview, REGIONS[0][1], 0x22)
        fill(self.sview, REGIONS[1][1], 0x33)
        cols = {"primary file": self.pview, "secondary.img": self.simg,
                "secondary view": self.sview}
        self.table("secondary.img has the primary's write; the view still shows the "
                   "checkpoint (0x11) plus its own 0x33", cols)

        self.step("checkpoint (both sides)")
        self.replfs("checkpoint", self.pmnt)
        self.replfs("checkpoint", self.smnt)
        self.table("after the checkpoint: view == secondary.img == primary.img", cols)
        print(f"\n  primary.img == secondary.img: {same(self.pimg, self.simg)}; "
              f"view == secondary.img: {same(self.sview, self.simg)}")

        self.step("epoch 2, a fault that heals itself: the secondary daemon is killed (SIGKILL); "
                  "the primary VM keeps writing 0x22 to R3")
        os.kill(self.pids[0], signal.SIGKILL)  # the secondary
        wait_gone(self.pids[:1])
        subprocess.run(["fusermount3", "-u", "-z", self.smnt], capture_output=True)
        fill(self.pview, REGIONS[3][1], 0x22)
        st = self.status(self.pmnt)
        print(f"  primary: state {st['state']}, reconnect {st['reconnect']}, "
              f"out of sync {st['disks']['disk0']['out_of_sync_bytes'] // MiB} MiB")
        print(f"  primary's last_error: {st['last_error']}")

        self.step("restart the secondary with the same arguments: the primary reconnects "
                  "by itself and resyncs only what the secondary missed")
        self.replfs("secondary", self.smnt, "--listen", listen,
                    "--disk", f"disk0={self.simg}",
                    "--log", os.path.join(self.base, "secondary.log"))
        self.pids[0] = self.status(self.smnt)["pid"]
        deadline = time.time() + 30
        while self.status(self.pmnt)["state"] != "replicating" and time.time() < deadline:
            time.sleep(0.1)
        self.replfs("status", self.pmnt)
        self.replfs("checkpoint", self.pmnt)
        self.replfs("checkpoint", self.smnt)
        self.table("healed, after a checkpoint: R3's 0x22 reached the secondary", cols)
        print(f"\n  primary.img == secondary.img: {same(self.pimg, self.simg)}")

        self.step("epoch 3: primary writes 0x22 to R2, secondary VM writes 0x33 to R3; "
                  "then the primary dies")
        fill(self.pview, REGIONS[2][1], 0x22)
        fill(self.sview, REGIONS[3][1], 0x33)
        os.kill(self.pids[1], signal.SIGKILL)  # the primary
        deadline = time.time() + 10
        while self.status(self.smnt)["peer_connected"] and time.time() < deadline:
            time.sleep(0.05)
        print(f"  secondary sees peer_connected={self.status(self.smnt)['peer_connected']}")
        subprocess.run(["fusermount3", "-u", "-z", self.pmnt], capture_output=True)

        self.step("failover on the secondary: secondary.img := last checkpoint + own writes")
        self.replfs("failover", self.smnt)
        self.table("after failover (R2's 0x22 from the dead primary is undone, "
                   "R3's 0x33 from the secondary VM is kept)", {"primary.img": self.pimg,
                                          "secondary.img": self.simg,
                                          "secondary view": self.sview})
        self.replfs("status", self.smnt)

        self.step("re-protect, the secondary VM running on: the old primary comes back as a "
                  "secondary on its image, and the survivor becomes its primary (only what "
                  "diverged is sent: R2 and R3)")
        port = free_port()
        self.replfs("secondary", self.pmnt, "--listen", f"127.0.0.1:{port}",
                    "--disk", f"disk0={self.pimg}",
                    "--workdir", os.path.join(self.base, "work-old-primary"),
                    "--log", os.path.join(self.base, "old-primary.log"))
        self.pids[1] = self.status(self.pmnt)["pid"]
        self.replfs("reprotect", self.smnt, "--secondary", f"127.0.0.1:{port}")
        deadline = time.time() + 30
        while self.status(self.smnt)["state"] != "replicating" and time.time() < deadline:
            time.sleep(0.1)
        self.replfs("status", self.smnt)
        self.replfs("checkpoint", self.smnt)
        self.replfs("checkpoint", self.pmnt)
        self.table("protected again, after a checkpoint: the old primary's R2 is overwritten",
                   {"primary.img": self.pimg, "secondary.img": self.simg})
        print(f"\n  primary.img == secondary.img: {same(self.pimg, self.simg)}")

        self.step("unmount")
        for m in (self.smnt, self.pmnt):
            subprocess.run(["fusermount3", "-u", m], check=True)
        wait_gone(self.pids)
        print("  done: both daemons exited, nothing left mounted")
        return 0

    def cleanup(self) -> None:
        for m in (self.pmnt, self.smnt):
            if os.path.ismount(m):
                subprocess.run(["fusermount3", "-u", "-z", m], capture_output=True)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        wait_gone(self.pids)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.time() + timeout
    for pid in pids:
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)


def run_demo(args) -> int:
    base = args.dir or tempfile.mkdtemp(prefix="replfs-demo-")
    os.makedirs(base, exist_ok=True)
    demo = Demo(base, parse_size(args.size))
    try:
        return demo.run()
    finally:
        demo.cleanup()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
