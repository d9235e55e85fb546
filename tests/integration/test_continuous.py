"""Continuous replication end to end: the pair heals itself after faults, and
never silently diverges.

Real daemons started through the CLI, real mounts, real TCP on 127.0.0.1.
The secondary listens on a fixed port, so that a restart "with the same
arguments" is found again; the primary's target is a FaultProxy in front of
it (tests/faultproxy.py), which counts the bytes that cross the link and can
black-hole it.  Pattern bytes: 0x11 base, 0x22 primary VM, 0x33 secondary VM.
Every comparison is byte for byte; every wait is bounded.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import pty
import random
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from tests import _proc
from tests.conftest import (BASE, MiB, PRIMARY, SECONDARY_VM, make_image, pread, pwrite,
                            replfs_cmd)
from tests.faultproxy import FaultProxy
from tests.integration.test_replication import fill, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sync", "checkpoint"])
def protocol(request) -> str:
    """Every test here runs with both write protocols of the primary."""
    return request.param

KiB = 1 << 10
CLUSTER = 64 * KiB
#: Every primary in this file: a short --timeout and fast retries.
FAST = ("--timeout", "2", "--reconnect-interval", "0.5")
#: What a resync costs beyond its data: NBD request headers, the control
#: channel's JSON (digests, hello, sync-start/done), flushes.
PROTOCOL = MiB


# -- helpers ---------------------------------------------------------------------------
def chunks(path, size: int = 4 * MiB):
    with open(path, "rb") as f:
        while block := f.read(size):
            yield block


def sha(path) -> str:
    h = hashlib.sha256()
    for block in chunks(path):
        h.update(block)
    return h.hexdigest()


def assert_same_bytes(first, *others) -> None:
    """Each of ``others`` holds exactly the bytes of ``first`` (streamed, so a
    256 MiB image costs no memory; the first difference is named)."""
    for other in others:
        off = 0
        it = chunks(other)
        for a in chunks(first):
            b = next(it, b"")
            if a != b:
                i = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]),
                         min(len(a), len(b)))
                raise AssertionError(
                    f"{other} differs from {first} at byte {off + i}: "
                    f"{b[i:i + 8].hex() or 'EOF'} != {a[i:i + 8].hex()}")
            off += len(a)
        assert next(it, b"") == b"", f"{other} is longer than {first}"


def offsets(rng: random.Random, n: int, size: int, length: int, align: int = 4096) -> list[int]:
    return [rng.randrange(0, (size - length) // align) * align for _ in range(n)]


def union_bytes(offs, length: int) -> int:
    """How many distinct bytes writes of ``length`` at ``offs`` cover."""
    runs = sorted((o, o + length) for o in offs)
    total, end = 0, -1
    for s, e in runs:
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def write_all(path, offs, length: int, byte: int = PRIMARY) -> None:
    data = fill(byte, length)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offs:
            assert os.pwrite(fd, data, off) == length
    finally:
        os.close(fd)


def oos(m) -> int:
    return sum(d["out_of_sync_bytes"] for d in m.status()["disks"].values())


def gone(m, timeout: float = 15) -> None:
    """SIGKILL the daemon of ``m`` (its own pid); within 10 s of its death its
    mount is gone, with no command of ours (fusermount3's auto_unmount, and
    replfs's own watcher where that races with the kernel: see
    replfs/fuse/watcher.py)."""
    m.kill(signal.SIGKILL)
    assert m.wait_exit(timeout), f"daemon {m.pid} survived SIGKILL"
    deadline = time.monotonic() + 10
    while _proc.mounted(m.path) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _proc.mounted(m.path), f"{m.path} stays mounted 10 s after kill -9"


def state_is(m, *states) -> bool:
    try:
        return m.status()["state"] in states
    except OSError:
        return False


class Link:
    """The pair of the test, wired for restarts: the secondary on a fixed
    port, the primary's target a FaultProxy in front of it.  Restarts use
    the same arguments as the first start."""

    def __init__(self, pair) -> None:
        self.pair = pair
        self.proxy = FaultProxy(("127.0.0.1", 0))
        self.port = _proc.free_port()   # (not the proxy's: that one is taken)
        self.proxy.upstream = ("127.0.0.1", self.port)
        self.primary_args: tuple = ()
        self.secondary_args: tuple = ()
        self.procs: list[subprocess.Popen] = []

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def start(self, sizes: dict, *, primary=(), secondary=()):
        self.pair.images(sizes)
        self.start_secondary(*secondary)
        self.start_primary(*primary)
        return self.pair.primary, self.pair.secondary

    def start_secondary(self, *extra):
        self.secondary_args = extra
        return self.pair.start_secondary(*extra, listen=self.listen)

    def start_primary(self, *extra):
        self.primary_args = FAST + extra
        return self.pair.start_primary(*self.primary_args, secondary=self.target)

    def secondary_again(self):
        """The secondary started again with the same arguments."""
        return self.pair.start_secondary(*self.secondary_args, listen=self.listen)

    def primary_again(self, *extra):
        """The primary started again with the same arguments (and ``extra``)."""
        return self.pair.start_primary(*self.primary_args, *extra, secondary=self.target)

    def primary_cmd(self, *extra, check=False):
        """The primary's mount command as such (for refusals): its result."""
        disks = [a for n, img in self.pair.pimgs.items() for a in ("--disk", f"{n}={img}")]
        path = self.pair.tmp / "mnt-primary"
        path.mkdir(exist_ok=True)
        return replfs_cmd("primary", path, "--secondary", self.target, *disks, *FAST, *extra,
                          "--protocol", self.pair.protocol,
                          "--log", self.pair.tmp / "primary.log", check=check)

    def settle(self, timeout: float = 60) -> None:
        """Both sides replicating, then a checkpoint on both."""
        p, s = self.pair.primary, self.pair.secondary
        wait_for(lambda: state_is(p, "replicating") and state_is(s, "replicating"),
                 timeout, "the pair to be back in sync")
        self.pair.checkpoint()

    def close(self) -> None:
        # First, with the link up: the primary disconnects cleanly, then the rest.
        if self.pair.primary is not None:
            self.pair.primary.unmount()
        self.pair.close()
        self.proxy.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def link(pair):
    lk = Link(pair)
    try:
        yield lk
    finally:
        lk.close()


# -- 1. the secondary dies and comes back -------------------------------------------------
def test_restarted_secondary_gets_only_what_it_missed(link):
    size, n, length = 256 * MiB, 64, 64 * KiB
    p, s = link.start({"disk0": size})
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    link.pair.checkpoint()

    gone(s)
    wait_for(lambda: state_is(p, "degraded"), 10, "the primary to degrade")
    offs = offsets(random.Random(1), n, size, length)
    write_all(p.file("disk0"), offs, length)
    st = p.status()
    assert st["state"] == "degraded" and st["reconnect"] == "retrying"
    assert "control connection ended" in st["last_error"], st["last_error"]
    assert union_bytes(offs, length) <= oos(p) <= 2 * n * length
    wait_for(lambda: p.status()["reconnect_error"], 10, "a failed reconnect attempt")
    # The failed attempts go to reconnect_error, never over the reason.
    assert p.status()["last_error"] == st["last_error"]

    before = link.proxy.bytes_up
    s = link.secondary_again()
    wait_for(lambda: state_is(p, "replicating"), 30, "the primary to resync by itself")
    resync = link.proxy.bytes_up - before
    assert union_bytes(offs, length) <= resync <= 2 * n * length + PROTOCOL, resync
    st = p.status()
    assert st["last_error"] is None and st["reconnect_error"] is None and st["sync"] is None
    assert oos(p) == 0

    link.settle()
    assert s.status()["failover_ready"] is True
    assert_same_bytes(pimg, simg, s.file("disk0"))
    for off in offs[:8]:
        assert pread(simg, off, length) == fill(PRIMARY, length)
    for m, img in ((p, pimg), (s, simg)):   # the history lives beside each image
        assert m.status()["disks"]["disk0"]["metadata"] == img + ".replfs-meta"
        assert os.path.isfile(img + ".replfs-meta")


def test_a_refused_action_keeps_the_reason_the_primary_degraded(link):
    p, s = link.start({"disk0": 4 * MiB})
    gone(s)
    wait_for(lambda: state_is(p, "degraded"), 10, "the primary to degrade")
    why = p.status()["last_error"]
    assert "control connection ended" in why, why
    for action in ("checkpoint", "resync"):
        r = replfs_cmd(action, p.path, check=False)
        assert r.returncode == 1 and "degraded" in r.stderr, (action, r.stderr)
    assert p.status()["last_error"] == why


# -- 2. a black-holed link, and the primary dies while its writes wait --------------------
@pytest.mark.parametrize("kill_when", ["writes-waiting", "degraded"])
def test_blackholed_link_then_primary_killed(link, kill_when):
    """``writes-waiting``: SIGKILL while the VM's writes wait for copies that
    never arrive (only the activity log knows them: the restarted primary
    compares digests); ``degraded``: the watchdog degraded the primary first
    (its dirty record is on disk), then SIGKILL while it tries to reconnect."""
    size, length = 64 * MiB, 64 * KiB
    timeout = "5" if kill_when == "writes-waiting" else "1"
    p, s = link.start({"disk0": size}, primary=("--timeout", timeout))
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    link.pair.checkpoint()

    link.proxy.blackhole()
    offs = offsets(random.Random(2), 32, size, length)
    done: list[int] = []

    def writer(part):
        try:
            for off in part:
                pwrite(p.file("disk0"), off, fill(PRIMARY, length))
                done.append(off)
        except OSError:
            pass   # the daemon was killed under it

    threads = [threading.Thread(target=writer, args=(offs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        if kill_when == "writes-waiting":
            # (The kernel sends one write of a file at a time: the others
            # queue behind the one whose copy vanished.)
            wait_for(lambda: link.proxy.bytes_lost >= length, 5, "a write's copy to vanish")
            time.sleep(0.5)
            st = p.status()
            if link.pair.protocol == "checkpoint":
                # The writes completed on the local image; their copies are
                # queued: lag, not divergence.
                wait_for(lambda: len(done) == len(offs), 10, "the writes to complete")
                st = p.status()
                assert st["state"] == "replicating" and st["lag_bytes"] > 0, st
            else:
                assert st["state"] == "replicating" and len(done) == 0, (st["state"], done)
        else:
            wait_for(lambda: state_is(p, "degraded"), 10, "the watchdog to degrade it")
            assert "did not answer within 1 s" in p.status()["last_error"]
            for t in threads:
                t.join(10)
            assert len(done) == len(offs)
            wait_for(lambda: link.proxy.connections >= 3, 10, "a reconnect into the dark")
        gone(p)
    finally:
        for t in threads:
            t.join(10)
    assert not any(t.is_alive() for t in threads)
    # The secondary got none of it.
    assert all(pread(simg, off, length) == fill(BASE, length) for off in offs if off >= MiB)

    link.proxy.restore()
    wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to see the reset")
    before = link.proxy.bytes_up
    p = link.primary_again()
    link.settle()
    resync = link.proxy.bytes_up - before
    assert resync <= 2 * len(offs) * length + PROTOCOL, resync
    assert resync < size // 8, f"{resync} bytes: a full copy, not a resync"
    assert_same_bytes(pimg, simg, s.file("disk0"))
    assert p.status()["last_error"] is None


# -- 3. a restarted secondary that lost the way back to the checkpoint ---------------------
@pytest.mark.parametrize("then", ["primary-gone", "primary-back"])
def test_inconsistent_secondary_refuses_failover(link, then):
    p, s = link.start({"disk0": 16 * MiB})
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    link.pair.checkpoint()
    pwrite(p.file("disk0"), 4 * MiB, fill(PRIMARY), fsync=True)  # after the checkpoint
    link.pair.settle()
    assert pread(simg, 4 * MiB, MiB) == fill(PRIMARY)

    if then == "primary-gone":
        gone(s)
        gone(p)
        s = link.secondary_again()
        st = s.status()
        assert st["state"] == "inconsistent" and st["failover_ready"] is False, st
        image = sha(simg)
        r = replfs_cmd("failover", s.path, check=False)
        assert r.returncode == 1 and "--force" in r.stderr, (r.returncode, r.stderr)
        assert "--force" in s.status()["last_error"]
        assert s.status()["state"] == "inconsistent"
        assert sha(simg) == image
        pwrite(s.file("disk0"), 8 * MiB, fill(SECONDARY_VM))
        r = replfs_cmd("failover", s.path, "--force", check=False)
        assert r.returncode == 0, r.stderr
        assert s.status()["state"] == "failed-over"
        # The disk as it was, plus the secondary VM's write.
        assert pread(simg, 4 * MiB, MiB) == fill(PRIMARY)
        assert pread(simg, 8 * MiB, MiB) == fill(SECONDARY_VM)
        assert_same_bytes(simg, s.file("disk0"))
    else:
        gone(s)
        s = link.secondary_again()
        assert s.status()["failover_ready"] is False
        wait_for(lambda: state_is(p, "replicating") and state_is(s, "replicating"), 30,
                 "the resync")
        # In sync again, but the checkpoint the failover would give is not
        # there until the next one.
        assert s.status()["failover_ready"] is False
        r = replfs_cmd("failover", s.path, check=False)
        assert r.returncode == 1 and "--force" in r.stderr, (r.returncode, r.stderr)
        link.pair.checkpoint()
        assert s.status()["failover_ready"] is True
        pwrite(p.file("disk0"), 12 * MiB, fill(PRIMARY))   # after the checkpoint: undone
        gone(p)
        wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to notice")
        replfs_cmd("failover", s.path)
        assert s.status()["state"] == "failed-over"
        assert pread(simg, 12 * MiB, MiB) == fill(BASE)
        expected = bytearray(fill(BASE, 16 * MiB))
        expected[0:MiB] = fill(PRIMARY)
        expected[4 * MiB:5 * MiB] = fill(PRIMARY)
        with open(simg, "rb") as f:
            assert f.read() == bytes(expected)
        assert pread(pimg, 12 * MiB, MiB) == fill(PRIMARY)


# -- 4. a checkpoint with nobody to agree with ------------------------------------------
def test_secondary_checkpoint_without_primary_changes_nothing(link):
    p, s = link.start({"disk0": 16 * MiB})
    simg = link.pair.simgs["disk0"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    link.pair.checkpoint()
    pwrite(s.file("disk0"), 2 * MiB, fill(SECONDARY_VM))
    pwrite(p.file("disk0"), 4 * MiB, fill(PRIMARY), fsync=True)   # undone by a failover
    link.pair.settle()
    view = sha(s.file("disk0"))
    held = s.status()["disks"]["disk0"]
    assert held["hidden_bytes"] == MiB and held["active_bytes"] == MiB
    gone(p)
    wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to notice")

    image = sha(simg)
    r = replfs_cmd("checkpoint", s.path, check=False)
    assert r.returncode == 1 and "no primary connected" in r.stderr, (r.returncode, r.stderr)
    st = s.status()
    assert "no primary connected" in st["last_error"]
    assert st["checkpoints"] == 1 and st["state"] == "replicating"
    assert st["disks"]["disk0"]["hidden_bytes"] == MiB
    assert st["disks"]["disk0"]["active_bytes"] == MiB
    assert sha(simg) == image and sha(s.file("disk0")) == view
    assert pread(s.file("disk0"), 2 * MiB, MiB) == fill(SECONDARY_VM)
    assert pread(s.file("disk0"), 4 * MiB, MiB) == fill(BASE)
    # ... and the failover still gives the checkpoint plus the VM's write.
    replfs_cmd("failover", s.path)
    assert pread(simg, 4 * MiB, MiB) == fill(BASE)
    assert pread(simg, 2 * MiB, MiB) == fill(SECONDARY_VM)


# -- 5. split brain ---------------------------------------------------------------------
def split_brain(link):
    """The primary dies, the secondary fails over and its VM writes, the
    old primary comes back with the same arguments: refused (exit 78, one
    line), then started with --allow-degraded-start.  Returns both images'
    digests from before the old primary came back."""
    p, s = link.start({"disk0": 16 * MiB})
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    link.pair.checkpoint()
    gone(p)
    wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to notice")
    replfs_cmd("failover", s.path)
    pwrite(s.file("disk0"), 2 * MiB, fill(SECONDARY_VM), fsync=True)
    images = sha(pimg), sha(simg)

    r = link.primary_cmd()   # the old primary, the same arguments
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 78 and len(lines) == 1 and "split brain" in lines[0], \
        (r.returncode, r.stderr)
    assert not _proc.mounted(link.pair.tmp / "mnt-primary")
    assert (sha(pimg), sha(simg)) == images

    p = link.primary_again("--allow-degraded-start")
    # It does not keep knocking: the operator decides.
    wait_for(lambda: p.status()["reconnect"] == "off", 10, "retries to stop")
    return images


def test_split_brain_is_refused_and_nothing_is_written(link):
    images = split_brain(link)
    p, s = link.pair.primary, link.pair.secondary
    st = p.status()
    assert st["state"] == "degraded" and "split brain" in st["last_error"], st
    assert not st["peer_connected"]
    assert (sha(link.pair.pimgs["disk0"]), sha(link.pair.simgs["disk0"])) == images
    assert s.status()["state"] == "failed-over"
    assert pread(s.file("disk0"), 2 * MiB, MiB) == fill(SECONDARY_VM)
    assert pread(s.file("disk0"), 0, MiB) == fill(PRIMARY)


def test_split_brain_is_named_by_the_failed_over_secondary(link):
    split_brain(link)
    st = link.pair.secondary.status()
    assert "split brain" in (st["last_error"] or ""), st


# -- 6. a new, empty secondary ---------------------------------------------------------
def test_new_empty_secondary_gets_a_full_sync_under_writes(link, tmp_path):
    size = 64 * MiB
    p, s = link.start({"disk0": size}, primary=("--resync-rate", "24M"))
    pimg = link.pair.pimgs["disk0"]
    write_all(p.file("disk0"), offsets(random.Random(6), 32, size, 64 * KiB), 64 * KiB)
    link.pair.checkpoint()
    pwrite(p.file("disk0"), 10 * MiB, fill(PRIMARY), fsync=True)   # history since
    s.unmount()
    wait_for(lambda: state_is(p, "degraded"), 10, "the primary to degrade")

    fresh = make_image(tmp_path / "new-s-disk0.img", size, 0)   # zeros, no metadata
    assert not os.path.exists(fresh + ".replfs-meta")
    link.pair.simgs["disk0"] = fresh
    rng, stop = random.Random(66), threading.Event()
    during_sync: list[int] = []
    errors: list[OSError] = []

    def writer():
        fd = os.open(p.file("disk0"), os.O_WRONLY)
        try:
            i = 0
            while not stop.is_set():
                off = rng.randrange(0, size // 4096 - 16) * 4096
                os.pwrite(fd, bytes([PRIMARY ^ (i & 0x0F)]) * 64 * KiB, off)
                if p.status()["state"] == "syncing":
                    during_sync.append(off)
                i += 1
        except OSError as exc:
            errors.append(exc)
        finally:
            os.close(fd)

    before = link.proxy.bytes_up
    t = threading.Thread(target=writer)
    t.start()
    try:
        s = link.start_secondary()
        # (state "syncing" comes a moment before its progress: see
        # test_syncing_always_shows_its_progress)
        wait_for(lambda: p.status()["sync"], 10, "the full sync to start")
        assert p.status()["sync"]["total_bytes"] == size
        wait_for(lambda: state_is(p, "replicating"), 60, "the full sync to end")
        time.sleep(0.3)   # a few more writes, mirrored
    finally:
        stop.set()
        t.join(10)
    assert not errors and len(during_sync) > 10, (errors, len(during_sync))
    assert link.proxy.bytes_up - before >= size
    link.settle()
    assert_same_bytes(pimg, fresh, s.file("disk0"))


# -- 7. qemu-nbd as the secondary ------------------------------------------------------
def test_qemu_nbd_secondary_reconnect_and_resync(link, require_tool):
    require_tool("qemu-nbd")
    size = 32 * MiB
    link.pair.images({"disk0": size})
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    argv = ["qemu-nbd", "--persistent", "--shared=4", "-f", "raw", "-x", "disk0",
            "-b", "127.0.0.1", "-p", str(link.port), simg]

    def serve():
        with open(link.pair.tmp / "qemu-nbd.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        link.procs.append(proc)
        _proc.wait_port(link.port, proc)
        return proc

    nbd = serve()
    p = link.start_primary()
    st = p.status()
    assert st["state"] == "replicating" and st["generation_check"].startswith("skipped"), st
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    link.pair.settle()
    assert pread(simg, 0, MiB) == fill(PRIMARY)

    nbd.kill()
    nbd.wait(10)
    offs = offsets(random.Random(7), 32, size, 64 * KiB)
    write_all(p.file("disk0"), offs, 64 * KiB)
    wait_for(lambda: state_is(p, "degraded"), 10, "the primary to degrade")
    assert oos(p) >= union_bytes(offs, 64 * KiB)
    assert pread(simg, offs[0], 64 * KiB) != fill(PRIMARY, 64 * KiB)

    before = link.proxy.bytes_up
    nbd = serve()
    wait_for(lambda: state_is(p, "replicating"), 30, "the primary to reconnect and resync")
    resync = link.proxy.bytes_up - before
    assert union_bytes(offs, 64 * KiB) <= resync <= 2 * 32 * 64 * KiB + PROTOCOL, resync
    assert p.status()["generation_check"].startswith("skipped")
    p.action("checkpoint")   # the flush barrier, NBD FLUSH to qemu-nbd
    assert_same_bytes(pimg, simg)


# -- 8. --allow-degraded-start --------------------------------------------------------
def test_allow_degraded_start_then_the_secondary_comes(link):
    size = 16 * MiB
    link.pair.images({"disk0": size})
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    refused = link.pair.tmp / "mnt-refused"
    refused.mkdir()
    # Nothing listens on the secondary's port yet.
    r = replfs_cmd("primary", refused, "--secondary", link.listen, "--disk", f"disk0={pimg}",
                   *FAST, check=False)
    assert r.returncode == 75, (r.returncode, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("replfs: ")
    assert not _proc.mounted(refused)

    p = link.pair.start_primary(*FAST, "--allow-degraded-start", secondary=link.listen)
    st = p.status()
    assert st["state"] == "degraded" and st["reconnect"] == "retrying", st
    assert st["last_error"] and not st["peer_connected"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY))
    pwrite(p.file("disk0"), 9 * MiB + 4096, fill(PRIMARY), fsync=True)
    assert pread(simg, 0, MiB) == fill(BASE)

    s = link.start_secondary()
    wait_for(lambda: state_is(p, "replicating"), 30, "the primary to connect and sync")
    assert p.status()["last_error"] is None
    link.settle()
    assert_same_bytes(pimg, simg, s.file("disk0"))
    assert pread(simg, 9 * MiB + 4096, MiB) == fill(PRIMARY)


# -- 9. disconnect, connect, resync --full ------------------------------------------------
def test_disconnect_connect_resyncs_exactly_the_writes_and_full_copies_all(link):
    size, n = 32 * MiB, 24
    p, s = link.start({"disk0": size})
    pimg, simg = link.pair.pimgs["disk0"], link.pair.simgs["disk0"]
    replfs_cmd("disconnect", p.path)
    st = p.status()
    assert st["state"] == "degraded" and st["reconnect"] == "off" and not st["peer_connected"]
    clusters = random.Random(9).sample(range(size // CLUSTER), n)
    write_all(p.file("disk0"), [c * CLUSTER for c in clusters], CLUSTER)
    assert oos(p) == n * CLUSTER
    time.sleep(1.2)   # retries are off: nothing reconnects by itself
    assert state_is(p, "degraded") and oos(p) == n * CLUSTER
    assert pread(simg, clusters[0] * CLUSTER, CLUSTER) == fill(BASE, CLUSTER)

    before = link.proxy.bytes_up
    replfs_cmd("connect", p.path)
    wait_for(lambda: state_is(p, "replicating"), 30, "the resync after connect")
    resync = link.proxy.bytes_up - before
    assert n * CLUSTER <= resync <= n * CLUSTER + PROTOCOL, resync
    assert oos(p) == 0

    before = link.proxy.bytes_up
    replfs_cmd("resync", p.path, "--full")
    wait_for(lambda: state_is(p, "replicating"), 30, "the full resync")
    assert link.proxy.bytes_up - before >= size
    link.settle()
    assert_same_bytes(pimg, simg, s.file("disk0"))

    # The same through the control files; connect takes another address
    # (here the secondary itself, past the proxy).
    p.action("disconnect")
    assert p.status()["reconnect"] == "off"
    pwrite(p.file("disk0"), 0, fill(PRIMARY, CLUSTER))
    assert oos(p) == CLUSTER
    # (Connecting before the secondary has seen the old connection go is
    # refused, "already has 1 client(s)": a race reported with this test.)
    wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to see it go")
    p.action("connect", f"{link.listen}\n".encode())
    wait_for(lambda: state_is(p, "replicating"), 30, "the resync after connect")
    assert p.status()["secondary"] == link.listen and oos(p) == 0
    p.action("resync", b"full\n")
    wait_for(lambda: state_is(p, "replicating"), 30, "the full resync")
    link.settle()
    assert_same_bytes(pimg, simg, s.file("disk0"))


def test_syncing_always_shows_its_progress(link):
    p, s = link.start({"disk0": 4 * MiB})
    replfs_cmd("disconnect", p.path)
    pwrite(p.file("disk0"), 0, fill(PRIMARY))
    wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to see it go")
    link.proxy.delay = 0.1   # every message of the handshake takes a while
    samples, errors = [], []

    def run_connect():
        try:
            p.action("connect")
        except OSError as exc:
            errors.append(exc)

    connect = threading.Thread(target=run_connect)
    connect.start()
    try:
        deadline = time.monotonic() + 20
        while connect.is_alive() and time.monotonic() < deadline:
            st = p.status()
            samples.append((st["state"], st["sync"]))
            time.sleep(0.01)
    finally:
        connect.join(30)
        link.proxy.delay = 0
    assert not errors and not connect.is_alive(), errors
    wait_for(lambda: state_is(p, "replicating"), 30, "the resync")
    syncing = [sync for state, sync in samples if state == "syncing"]
    assert syncing and None not in syncing, syncing


# -- the end of a primary -------------------------------------------------------------------
def test_clean_unmount_of_the_primary_flushes_the_secondary_and_says_goodbye(link):
    p, _ = link.start({"disk0": 4 * MiB})
    pwrite(p.file("disk0"), 0, fill(PRIMARY))
    wait_for(lambda: link.proxy.bytes_up > MiB, 10, "the write to cross")
    before, seen = link.proxy.bytes_up, len(p.log_text())
    p.unmount()
    assert p.wait_exit()
    # NBD_CMD_FLUSH and NBD_CMD_DISC: a 28-byte request each.
    wait_for(lambda: link.proxy.bytes_up - before >= 2 * 28, 2,
             f"a flush and a goodbye on the wire (got {link.proxy.bytes_up - before} bytes)")
    said = p.log_text()[seen:]
    assert "failed" not in said and "degraded" not in said, said


# -- 10. status --watch -----------------------------------------------------------------
def test_status_watch_plain_and_on_a_terminal(link):
    size = 32 * MiB
    p, s = link.start({"disk0": size}, primary=("--resync-rate", "4M"))
    replfs_cmd("disconnect", p.path)
    write_all(p.file("disk0"), [i * MiB for i in range(24)], MiB)
    replfs_cmd("connect", p.path)
    assert state_is(p, "syncing")   # 24 MiB at 4 MiB/s: about 5 s (a 1 s burst first)

    watch = [sys.executable, "-m", "replfs", "status", p.path, "--watch", "--interval", "0.2"]
    plain = subprocess.Popen(watch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 160, 0, 0))
    tty = subprocess.Popen(watch, stdin=slave, stdout=slave, stderr=slave,
                           env={**os.environ, "TERM": "xterm-256color"})
    os.close(slave)
    drawn = bytearray()

    def drain():
        try:
            while chunk := os.read(master, 65536):
                drawn.extend(chunk)
        except OSError:   # EIO: the terminal's last writer is gone
            pass

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        time.sleep(2)
        st = p.status()
        assert st["state"] == "syncing" and s.status()["state"] == "syncing"
        sync = st["sync"]
        assert set(sync) == {"total_bytes", "done_bytes", "sent_bytes", "rate_bytes_per_s",
                             "eta_s"}, sync
        assert sync["total_bytes"] == 24 * MiB and 0 < sync["done_bytes"] < 24 * MiB, sync
        assert 0 < sync["sent_bytes"] <= sync["done_bytes"], sync
        assert 0 < sync["rate_bytes_per_s"] <= 8 * MiB and sync["eta_s"] > 0, sync
        # (bits are cleared once a FLUSH covered the copies: at the end here)
        assert 0 < oos(p) <= 24 * MiB
        for m in (p, s):   # no checkpoint until the two sides are level
            with pytest.raises(OSError) as busy:
                m.action("checkpoint")
            assert busy.value.errno == errno.EBUSY
            assert "resync in progress" in m.status()["last_error"]
        for proc in (plain, tty):
            assert proc.poll() is None, "status --watch ended by itself"
            proc.send_signal(signal.SIGINT)
        out, err = plain.communicate(timeout=10)
        assert tty.wait(timeout=10) == 130
        assert plain.returncode == 130, err
    finally:
        for proc in (plain, tty):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(10)
        os.close(master)
    lines = out.splitlines()
    assert lines and all("\x1b" not in line for line in lines), out
    assert any("syncing" in line and "resync" in line for line in lines), out
    assert all(line.split()[1] == "primary:" for line in lines), out
    text = drawn.decode(errors="replace")
    assert "\x1b[" in text and "syncing" in text and "resync" in text, text[-2000:]

    link.settle()
    assert_same_bytes(link.pair.pimgs["disk0"], link.pair.simgs["disk0"], s.file("disk0"))
