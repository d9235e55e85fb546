"""Shared test helpers: pattern bytes, image files, and real replfs mounts.

Pattern bytes name the writer, as QEMU's test-replication does:
0x11 the secondary's base (and the initial content of both images),
0x22 the primary VM, 0x33 the secondary VM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests import _proc

BASE, PRIMARY, SECONDARY_VM = 0x11, 0x22, 0x33
MiB = 1 << 20


def have_fuse() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (Debian package fuse3)"
    if os.geteuid() != 0:
        return "mount tests need root"
    return None


def make_image(path, size: int, byte: int = BASE) -> str:
    with open(path, "wb") as f:
        chunk = bytes([byte]) * min(size, 4 * MiB)
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
    return str(path)


def pread(path, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def pwrite(path, off: int, data: bytes, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, off) == len(data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def replfs_cmd(*argv, check=True, timeout=60, prefix=()) -> subprocess.CompletedProcess:
    r = subprocess.run([*prefix, sys.executable, "-m", "replfs", *map(str, argv)],
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"replfs {' '.join(map(str, argv))} -> {r.returncode}\n"
                             f"{r.stdout}{r.stderr}")
    return r


class Mount:
    """One running replfs daemon, mounted in the background by the real CLI."""

    def __init__(self, path, log) -> None:
        self.path = str(path)
        self.log = str(log)
        self.pid: int | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def ctl(self, name: str) -> str:
        return os.path.join(self.path, ".replfs", name)

    def status(self) -> dict:
        with open(self.ctl("status"), "rb") as f:
            return json.loads(f.read())

    def action(self, name: str, value: bytes = b"1\n") -> None:
        fd = os.open(self.ctl(name), os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)

    def alive(self) -> bool:
        return self.pid is not None and _proc.alive(self.pid)

    def wait_exit(self, timeout: float = 20) -> bool:
        return self.pid is None or _proc.wait_gone(self.pid, timeout)

    def kill(self, sig=signal.SIGKILL) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def unmount(self, timeout: float = 20) -> None:
        """fusermount3 -u; if the daemon has not exited after ``timeout`` s,
        SIGKILL; then a lazy unmount if anything is still mounted there."""
        _proc.unmount(self.path, lazy=False)
        if not self.wait_exit(timeout):
            _proc.stop_pid(self.pid, ((signal.SIGKILL, 5),))
        _proc.unmount(self.path)

    def log_text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""


class Pair:
    """A secondary and a primary on 127.0.0.1, each a real mount.

    ``protocol``: the primary's write protocol (``--protocol``); in
    "checkpoint" mode :meth:`checkpoint` is the primary's ``checkpoint
    --pair`` (the secondary refuses one of its own) and :meth:`settle`
    drains the queue, so a test can compare the secondary disk."""

    def __init__(self, tmp_path, protocol: str = "sync") -> None:
        self.tmp = tmp_path
        self.protocol = protocol
        self.mounts: list[Mount] = []
        self.secondary: Mount | None = None
        self.primary: Mount | None = None
        self.pimgs: dict[str, str] = {}
        self.simgs: dict[str, str] = {}

    def images(self, sizes: dict[str, int], byte: int = BASE) -> None:
        for name, size in sizes.items():
            self.pimgs[name] = make_image(self.tmp / f"p-{name}.img", size, byte)
            self.simgs[name] = make_image(self.tmp / f"s-{name}.img", size, byte)

    def _mount(self, role: str, argv: list, prefix=()) -> Mount:
        path = self.tmp / f"mnt-{role}"
        path.mkdir(exist_ok=True)
        m = Mount(path, self.tmp / f"{role}.log")
        self.mounts.append(m)
        replfs_cmd(role, path, *argv, "--log", m.log, prefix=prefix)
        m.pid = m.status()["pid"]
        return m

    def start_secondary(self, *extra, listen: str = "127.0.0.1:0") -> Mount:
        disks = [a for n, img in self.simgs.items() for a in ("--disk", f"{n}={img}")]
        self.secondary = self._mount("secondary", ["--listen", listen,
                                                   "--workdir", self.tmp / "work",
                                                   *disks, *extra])
        return self.secondary

    def start_primary(self, *extra, secondary: str | None = None, prefix=()) -> Mount:
        """``prefix``: a command to run it under (e.g. nsenter into a netns)."""
        disks = [a for n, img in self.pimgs.items() for a in ("--disk", f"{n}={img}")]
        addr = secondary or self.secondary.status()["listen"]
        if self.protocol != "sync" and "--protocol" not in map(str, extra):
            extra = (*extra, "--protocol", self.protocol)
        self.primary = self._mount("primary", ["--secondary", addr, *disks, *extra],
                                   prefix=prefix)
        return self.primary

    def start(self, sizes=None, *, primary_args=(), secondary_args=()) -> "Pair":
        self.images(sizes or {"disk0": 16 * MiB})
        self.start_secondary(*secondary_args)
        self.start_primary(*primary_args)
        return self

    def checkpoint(self) -> None:
        if self.protocol == "checkpoint":
            self.primary.action("checkpoint", b"pair\n")
            return
        self.primary.action("checkpoint")
        self.secondary.action("checkpoint")

    def settle(self, timeout: float = 20) -> None:
        """Checkpoint mode: wait until nothing is queued for the secondary
        (its disk has every write made so far); sync mode: nothing to wait for."""
        if self.protocol != "checkpoint":
            return
        deadline = time.monotonic() + timeout
        while self.primary.status().get("lag_bytes"):
            if time.monotonic() > deadline:
                raise AssertionError(f"still queued after {timeout} s: "
                                     f"{self.primary.status()}")
            time.sleep(0.02)

    def close(self) -> None:
        for m in reversed(self.mounts):
            m.unmount()


@pytest.fixture
def protocol() -> str:
    """The primary's write protocol for the ``pair`` fixture: $REPLFS_TEST_PROTOCOL
    (default sync); a module overrides this fixture to run in both modes."""
    return os.environ.get("REPLFS_TEST_PROTOCOL", "sync")


@pytest.fixture
def pair(tmp_path, protocol):
    reason = have_fuse()
    if reason:
        pytest.skip(reason)
    p = Pair(tmp_path, protocol)
    try:
        yield p
    finally:
        p.close()
        for m in p.mounts:
            assert not os.path.ismount(m.path), f"{m.path} left mounted"
            assert not m.alive(), f"daemon {m.pid} left running"

