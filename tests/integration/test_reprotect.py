"""Re-protect without stopping the VM, fail back, split brain resolved by
--discard-my-data (real daemons, real TCP through a byte-counting proxy).

Two hosts on one machine, "a" and "b", each with its image, a fixed listen
port and a proxy in front of it: whoever is the primary reaches the other
through that proxy, which counts what a resync sends."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import _proc
from tests.conftest import BASE, MiB, PRIMARY, SECONDARY_VM, Mount, make_image, pread, pwrite, \
    read_all, replfs_cmd
from tests.faultproxy import FaultProxy
from tests.integration.test_replication import wait_for

pytestmark = pytest.mark.integration

FAST = ("--timeout", "2", "--reconnect-interval", "0.5")


def sha(path) -> str:
    return hashlib.sha256(read_all(path)).hexdigest()




def state(m: Mount) -> str | None:
    try:
        return m.status()["state"]
    except OSError:
        return None


class Hosts:
    """Hosts "a" and "b": images, listen ports, proxies, mounts."""

    def __init__(self, tmp, size: int) -> None:
        self.tmp = tmp
        self.size = size
        self.img = {h: make_image(tmp / f"{h}.img", size, BASE) for h in "ab"}
        self.port = {h: _proc.free_port() for h in "ab"}
        self.proxy = {}
        for h in "ab":
            self.proxy[h] = FaultProxy(("127.0.0.1", 0))
            self.proxy[h].upstream = ("127.0.0.1", self.port[h])
        self.mounts: list[Mount] = []
        self.n = 0

    def target(self, h: str) -> str:
        return f"127.0.0.1:{self.proxy[h].port}"

    def _mount(self, role: str, h: str, *argv) -> Mount:
        self.n += 1
        path = self.tmp / f"mnt-{h}-{self.n}"
        path.mkdir()
        m = Mount(path, self.tmp / f"{h}-{self.n}.log")
        self.mounts.append(m)
        replfs_cmd(role, path, "--disk", f"disk0={self.img[h]}", "--log", m.log, *argv)
        m.pid = m.status()["pid"]
        return m

    def secondary(self, h: str, *extra) -> Mount:
        return self._mount("secondary", h, "--listen", f"127.0.0.1:{self.port[h]}",
                           "--workdir", self.tmp / f"work-{h}", *extra)

    def primary(self, h: str, *extra) -> Mount:
        other = "b" if h == "a" else "a"
        return self._mount("primary", h, "--secondary", self.target(other), *FAST, *extra)

    def kill(self, m: Mount) -> None:
        m.kill(signal.SIGKILL)
        assert m.wait_exit(15)
        wait_for(lambda: not _proc.mounted(m.path), 10, "the dead mount to go")

    def close(self) -> None:
        for m in reversed(self.mounts):
            if _proc.mounted(m.path) or m.alive():
                m.unmount()
        for p in self.proxy.values():
            p.close()
        for m in self.mounts:
            assert not _proc.mounted(m.path), f"{m.path} left mounted"
            assert not m.alive(), f"daemon {m.pid} left running"


@pytest.fixture
def hosts(tmp_path):
    made: list[Hosts] = []

    def make(size: int) -> Hosts:
        made.append(Hosts(tmp_path, size))
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            h.close()


def checkpoint(primary: Mount, secondary: Mount) -> None:
    replfs_cmd("checkpoint", primary.path)
    replfs_cmd("checkpoint", secondary.path)


def reprotect(hs: Hosts, survivor: Mount, new_secondary_host: str) -> int:
    """``replfs reprotect`` of ``survivor`` towards the host restarted as a
    secondary; waits for the pair to be in sync; returns the bytes sent."""
    proxy = hs.proxy[new_secondary_host]
    before = proxy.bytes_up
    r = replfs_cmd("reprotect", survivor.path, "--secondary", hs.target(new_secondary_host))
    assert "reprotect done" in r.stdout, r.stdout
    wait_for(lambda: state(survivor) == "replicating", 60, "the resync to finish")
    st = survivor.status()
    assert st["role"] == "primary" and st["peer_connected"], st
    return proxy.bytes_up - before


def test_reprotect_and_fail_back_three_times_without_a_full_copy(hosts):
    """Raw data, the VM writing all along on the survivor's file: each cycle
    sends little more than what diverged; after each checkpoint the two
    images are equal byte for byte."""
    size = 256 * MiB
    hs = hosts(size)
    rng = random.Random(12)
    s = hs.secondary("b")
    p = hs.primary("a")
    pfile = p.file("disk0")
    pwrite(pfile, 0, bytes([PRIMARY]) * 8 * MiB, fsync=True)
    checkpoint(p, s)
    roles = {"a": p, "b": s}
    prim, sec = "a", "b"
    for cycle in range(3):
        p, s = roles[prim], roles[sec]
        # the primary writes after the checkpoint (these reach the secondary)
        diverged = 0
        for _ in range(16):
            off = rng.randrange(size // MiB) * MiB
            pwrite(p.file("disk0"), off, bytes([PRIMARY + cycle]) * MiB, fsync=True)
            diverged += MiB
        hs.kill(p)
        wait_for(lambda: not s.status()["peer_connected"], 10, "the secondary to notice")
        replfs_cmd("failover", s.path)
        view_before = read_all(s.file("disk0"))
        # the survivor's VM writes, before and during the re-protect
        for _ in range(16):
            off = rng.randrange(size // MiB) * MiB
            pwrite(s.file("disk0"), off, bytes([SECONDARY_VM]) * MiB, fsync=True)
            diverged += MiB
        stop = threading.Event()
        written = []

        def vm(m=s, seed=cycle) -> None:
            r = random.Random(seed)
            while not stop.is_set():
                off = r.randrange(size // 65536) * 65536
                pwrite(m.file("disk0"), off, bytes([0x40 + cycle]) * 65536, fsync=True)
                written.append(off)

        new_sec = hs.secondary(prim)   # the old primary, restarted as a secondary
        t = threading.Thread(target=vm)
        t.start()
        try:
            sent = reprotect(hs, s, prim)
        finally:
            stop.set()
            t.join()
        diverged += len(set(written)) * 65536
        print("CYCLE", cycle, "sent", sent, "diverged", diverged)
        assert sent <= 2 * diverged + 8 * MiB, (cycle, sent, diverged)
        assert view_before != read_all(s.file("disk0")) or not written
        checkpoint(s, new_sec)
        assert sha(hs.img["a"]) == sha(hs.img["b"]), f"cycle {cycle}: images differ"
        assert new_sec.status()["state"] == "replicating"
        roles = {sec: s, prim: new_sec}
        prim, sec = sec, prim


def test_reprotect_is_refused_on_a_mount_that_did_not_fail_over(hosts):
    hs = hosts(16 * MiB)
    s = hs.secondary("b")
    p = hs.primary("a")
    for m, word in ((s, "failed-over"), (p, "primary already")):
        r = replfs_cmd("reprotect", m.path, "--secondary", "127.0.0.1:1", check=False)
        assert r.returncode == 1 and word in r.stderr, r.stderr
    assert state(s) == "replicating" and state(p) == "replicating"


def test_a_failed_reprotect_leaves_the_mount_failed_over(hosts):
    hs = hosts(16 * MiB)
    s = hs.secondary("b")
    p = hs.primary("a")
    pwrite(p.file("disk0"), 0, bytes([PRIMARY]) * MiB, fsync=True)
    checkpoint(p, s)
    hs.kill(p)
    replfs_cmd("failover", s.path)
    # nothing listens behind a's proxy yet
    r = replfs_cmd("reprotect", s.path, "--secondary", hs.target("a"), check=False)
    assert r.returncode == 1, r
    st = s.status()
    assert st["role"] == "secondary" and st["state"] == "failed-over", st
    pwrite(s.file("disk0"), MiB, bytes([SECONDARY_VM]) * MiB, fsync=True)  # the VM still writes
    # and a later re-protect works
    new_sec = hs.secondary("a")
    reprotect(hs, s, "a")
    checkpoint(s, new_sec)
    assert sha(hs.img["a"]) == sha(hs.img["b"])


@pytest.mark.parametrize("victim", ["a", "b"])
def test_split_brain_refused_then_resolved_with_discard_my_data(hosts, victim):
    """Both sides fail over and take writes: pairing is refused (both images
    untouched); the side restarted with --discard-my-data is overwritten
    (either side may be chosen), and its status says what was thrown away."""
    hs = hosts(32 * MiB)
    s = hs.secondary("b")
    p = hs.primary("a")
    pwrite(p.file("disk0"), 0, bytes([PRIMARY]) * 4 * MiB, fsync=True)
    checkpoint(p, s)
    hs.proxy["b"].blackhole()      # the link goes dark; each side thinks the other died
    replfs_cmd("failover", s.path)
    replfs_cmd("failover", p.path)  # the primary drops its secondary on purpose, too
    pwrite(p.file("disk0"), 8 * MiB, bytes([PRIMARY]) * MiB, fsync=True)
    pwrite(s.file("disk0"), 16 * MiB, bytes([SECONDARY_VM]) * MiB, fsync=True)
    hs.proxy["b"].restore()
    if victim == "a":
        # b keeps its data and re-protects; a, restarted as a secondary, is refused
        p.unmount()
        before = sha(hs.img["a"]), sha(hs.img["b"])
        a2 = hs.secondary("a")
        r = replfs_cmd("reprotect", s.path, "--secondary", hs.target("a"), check=False)
        assert r.returncode == 1 and "split brain" in r.stderr, r.stderr
        assert "split brain" in (s.status()["last_error"] or "")
        assert (sha(hs.img["a"]), sha(hs.img["b"])) == before
        a2.unmount()
        loser = hs.secondary("a", "--discard-my-data")   # the operator's choice
        reprotect(hs, s, "a")
        checkpoint(s, loser)
        lost, kept = (8 * MiB, bytes([BASE])), (16 * MiB, bytes([SECONDARY_VM]))
    else:
        # a keeps its data and connects; b, restarted as a secondary, is refused
        s.unmount()
        before = sha(hs.img["a"]), sha(hs.img["b"])
        b2 = hs.secondary("b")
        r = replfs_cmd("connect", p.path, check=False)
        assert r.returncode == 1 and "split brain" in r.stderr, r.stderr
        assert (sha(hs.img["a"]), sha(hs.img["b"])) == before
        b2.unmount()
        loser = hs.secondary("b", "--discard-my-data")
        replfs_cmd("connect", p.path)
        wait_for(lambda: state(p) == "replicating", 60, "the resync to finish")
        checkpoint(p, loser)
        lost, kept = (16 * MiB, bytes([BASE])), (8 * MiB, bytes([PRIMARY]))
    assert sha(hs.img["a"]) == sha(hs.img["b"])
    assert pread(hs.img[victim], lost[0], MiB) == lost[1] * MiB    # the victim's write: gone
    assert pread(hs.img[victim], kept[0], MiB) == kept[1] * MiB    # the survivor's: there
    discarded = loser.status()["discarded"]
    assert discarded and discarded["disk0"]["bytes"] >= MiB, discarded
    assert any(start <= lost[0] and start + length >= lost[0] + MiB
               for start, length in discarded["disk0"]["ranges"]), discarded


class Ext4:
    """ext4 on a loop device over a replfs file, as a VM would hold it."""

    def __init__(self, tmp, path: str, mkfs: bool = False) -> None:
        self.dir = tmp / f"ext4-{os.path.basename(os.path.dirname(path))}"
        self.dir.mkdir(exist_ok=True)
        self.loop = run("losetup", "-f", "--show", path).stdout.strip()
        try:
            if mkfs:
                run("mkfs.ext4", "-q", "-F", self.loop)
            run("mount", self.loop, str(self.dir))
        except BaseException:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            raise

    def write(self, name: str, data: bytes) -> int:
        (self.dir / name).write_bytes(data)
        return len(data)

    def frozen_checkpoint(self, primary: Mount, secondary: Mount) -> None:
        run("fsfreeze", "-f", str(self.dir))
        try:
            checkpoint(primary, secondary)
        finally:
            run("fsfreeze", "-u", str(self.dir))

    def close(self) -> None:
        subprocess.run(["umount", str(self.dir)], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)


def fsck_clean(image) -> None:
    r = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ext4_fail_over_reprotect_fail_back_three_cycles(hosts, require_tool, tmp_path):
    """The issue's cycle with a real filesystem: files, checkpoint, more
    files, the primary killed, failover, the VM writing on the view while
    the old primary comes back as a secondary and is re-protected; the
    resync sends little more than what changed; a checkpoint later the two
    images are equal and fsck is clean.  Three times, the roles swapping."""
    require_tool("losetup", "mkfs.ext4", "e2fsck", "fsfreeze")
    size = 256 * MiB
    hs = hosts(size)
    s = hs.secondary("b")
    p = hs.primary("a")
    roles = {"a": p, "b": s}
    prim, sec = "a", "b"
    for cycle in range(3):
        p, s = roles[prim], roles[sec]
        fs = Ext4(tmp_path, p.file("disk0"), mkfs=cycle == 0)
        try:
            for i in range(8):
                fs.write(f"c{cycle}-kept-{i}", bytes([i + 1]) * 300_000)
            fs.frozen_checkpoint(p, s)
            changed = 0
            for i in range(8):  # after the checkpoint: the failover discards these
                changed += fs.write(f"c{cycle}-lost-{i}", bytes([0x80 + i]) * 500_000)
        finally:
            fs.close()
        hs.kill(p)
        replfs_cmd("failover", s.path)
        vm = Ext4(tmp_path, s.file("disk0"))   # the VM carries on on the view
        try:
            names = sorted(os.listdir(vm.dir))
            assert [n for n in names if n.startswith(f"c{cycle}-lost")] == []
            assert len([n for n in names if n.startswith(f"c{cycle}-kept")]) == 8
            for i in range(4):
                changed += vm.write(f"c{cycle}-vm-{i}", bytes([0x40 + i]) * 400_000)
            new_sec = hs.secondary(prim)   # the old primary, restarted as a secondary
            sent = reprotect(hs, s, prim)
            for i in range(4, 8):  # and keeps writing once protected again
                vm.write(f"c{cycle}-vm-{i}", bytes([0x40 + i]) * 400_000)
            vm.frozen_checkpoint(s, new_sec)
        finally:
            vm.close()
        checkpoint(s, new_sec)  # what the unmount wrote
        print("EXT4 CYCLE", cycle, "sent", sent, "changed", changed)
        assert sent <= 2 * changed + 8 * MiB, (cycle, sent, changed)
        assert sent < size // 4, "that was a full copy"
        assert sha(hs.img["a"]) == sha(hs.img["b"]), f"cycle {cycle}: images differ"
        fsck_clean(hs.img[prim])
        roles = {sec: s, prim: new_sec}
        prim, sec = sec, prim


def test_a_reprotected_survivor_killed_restarts_as_a_primary(hosts):
    """After a re-protect the mount is a primary: killed with SIGKILL while
    its VM writes, it is restarted as `replfs primary` on its image and
    resyncs what its crash may have left out."""
    hs = hosts(64 * MiB)
    s = hs.secondary("b")
    p = hs.primary("a")
    pwrite(p.file("disk0"), 0, bytes([PRIMARY]) * 4 * MiB, fsync=True)
    checkpoint(p, s)
    hs.kill(p)
    replfs_cmd("failover", s.path)
    a2 = hs.secondary("a")
    reprotect(hs, s, "a")
    checkpoint(s, a2)
    stop = threading.Event()

    def vm() -> None:
        r = random.Random(3)
        try:
            while not stop.is_set():
                pwrite(s.file("disk0"), r.randrange(1024) * 65536,
                       bytes([SECONDARY_VM]) * 65536, fsync=True)
        except OSError:
            pass  # the daemon is gone

    t = threading.Thread(target=vm)
    t.start()
    time.sleep(0.3)
    hs.kill(s)
    stop.set()
    t.join()
    b2 = hs.primary("b")   # b's image, as a primary now; its secondary is a
    wait_for(lambda: state(b2) == "replicating", 60, "the resync after the crash")
    checkpoint(b2, a2)
    assert sha(hs.img["a"]) == sha(hs.img["b"])


@pytest.mark.parametrize("seed", range(8))
def test_kill9_during_reprotect_then_the_pair_heals(hosts, seed):
    """Seeded rounds: during the re-protect's resync, SIGKILL the survivor
    (now the primary) or the new secondary at a random moment; restarted
    (the survivor as `replfs primary`, the secondary with the same
    arguments), the pair heals: every write the survivor's VM had fsynced is
    in its image, and after a checkpoint the images are equal."""
    rng = random.Random(seed)
    size = 256 * MiB
    hs = hosts(size)
    s = hs.secondary("b")
    p = hs.primary("a")
    pwrite(p.file("disk0"), 0, bytes([PRIMARY]) * 8 * MiB, fsync=True)
    checkpoint(p, s)
    for _ in range(48):
        pwrite(p.file("disk0"), rng.randrange(size // MiB) * MiB, bytes([PRIMARY]) * MiB, fsync=True)
    hs.kill(p)
    replfs_cmd("failover", s.path)
    acked: dict[int, int] = {}
    for i in range(48):
        off = rng.randrange(size // MiB) * MiB
        pwrite(s.file("disk0"), off, (i + 1).to_bytes(4, "little") * (MiB // 4), fsync=True)
        acked[off] = i + 1
    a2 = hs.secondary("a")
    victim = ("survivor", "new-secondary")[seed % 2]
    proc = subprocess.Popen([sys.executable, "-m", "replfs", "reprotect", s.path,
                             "--secondary", hs.target("a")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.wait(timeout=30)   # returns once paired: the resync has just started
    assert proc.returncode == 0
    time.sleep(rng.uniform(0.0, 0.15))
    syncing = state(s) == "syncing"
    hs.kill(s if victim == "survivor" else a2)
    print("ROUND", seed, victim, "killed while syncing:", syncing)
    if victim == "survivor":
        survivor = hs.primary("b")    # its image, as a primary from now on
        secondary = a2
    else:
        survivor = s   # a primary now: it reconnects by itself
        secondary = hs.secondary("a")
    wait_for(lambda: state(survivor) == "replicating", 60, "the pair to heal")
    checkpoint(survivor, secondary)
    img = read_all(hs.img["b"])
    for off, i in acked.items():
        assert img[off:off + 4] == i.to_bytes(4, "little"), (off, i)
    assert sha(hs.img["a"]) == sha(hs.img["b"])
