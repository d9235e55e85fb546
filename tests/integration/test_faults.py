"""Faults: nothing acknowledged is ever lost, the VM's I/O never fails because
of the secondary, and every failure is reported.

Faults are injected by signals, by a TCP proxy between the hosts
(tests/faultproxy.py), by a small tmpfs for the overlays, and by the
daemon's fault layer (``--inject-faults``, like QEMU's blkdebug).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

from tests.conftest import BASE, MiB, PRIMARY, SECONDARY_VM, pread, pwrite, read_all
from tests.faultproxy import FaultProxy
from tests.integration.test_replication import fill, wait_for

pytestmark = pytest.mark.integration


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)  # ENOTCONN once the daemon behind it is gone
    except OSError:
        pass


def timed_write(path, off, data, fsync=True) -> float:
    t = time.monotonic()
    pwrite(path, off, data, fsync=fsync)
    return time.monotonic() - t


def start_via_proxy(pair, sizes=None, timeout="1"):
    pair.images(sizes or {"disk0": 8 * MiB})
    pair.start_secondary()
    port = int(pair.secondary.status()["listen"].rsplit(":", 1)[1])
    proxy = FaultProxy(("127.0.0.1", port))
    pair.start_primary("--timeout", timeout, secondary=f"127.0.0.1:{proxy.port}")
    return proxy


@pytest.mark.parametrize("how", ["proxy-stall", "sigstop", "sigkill", "proxy-cut"])
def test_secondary_failure_never_fails_the_primary(pair, how):
    proxy = start_via_proxy(pair)
    p, s = pair.primary, pair.secondary
    try:
        assert timed_write(p.file("disk0"), 0, fill(PRIMARY)) < 1
        if how == "proxy-stall":
            proxy.stall()
        elif how == "sigstop":
            s.kill(signal.SIGSTOP)
        elif how == "sigkill":
            s.kill(signal.SIGKILL)
        else:
            proxy.cut()
        # Each write and fsync succeeds, none waits much longer than --timeout.
        for i in range(1, 4):
            took = timed_write(p.file("disk0"), i * MiB, fill(PRIMARY))
            assert took < 3, f"write {i} took {took:.1f} s"
        st = p.status()
        assert st["state"] == "degraded" and not st["peer_connected"]
        assert st["last_error"] and ("did not answer" in st["last_error"]
                                     or "failed" in st["last_error"]
                                     or "connection ended" in st["last_error"]), st["last_error"]
        # Writes after the failure go to the local image only, at full speed.
        assert timed_write(p.file("disk0"), 5 * MiB, fill(PRIMARY)) < 0.5
        for i in (0, 1, 2, 3, 5):
            assert pread(pair.pimgs["disk0"], i * MiB, MiB) == fill(PRIMARY)
    finally:
        if how == "sigstop":
            s.kill(signal.SIGCONT)
        proxy.resume()
    if how in ("proxy-stall", "sigstop", "proxy-cut"):
        # The secondary comes back: the primary reconnects by itself, resyncs
        # what the secondary missed, and the pair is whole again.
        wait_for(lambda: p.status()["state"] == "replicating", timeout=30,
                 what="the pair heals")
        assert p.status()["last_error"] is None
        pair.checkpoint()
        assert read_all(pair.simgs["disk0"]) == read_all(pair.pimgs["disk0"])
        assert s.status()["state"] == "replicating"
    proxy.close()


def test_primary_killed_during_writes_then_failover(pair):
    pair.start({"disk0": 16 * MiB})
    p, s = pair.primary, pair.secondary
    pwrite(p.file("disk0"), 0, fill(PRIMARY, 4 * MiB), fsync=True)
    pair.checkpoint()
    checkpoint = read_all(pair.simgs["disk0"])
    pwrite(s.file("disk0"), 8 * MiB, fill(SECONDARY_VM))
    stop = threading.Event()

    def writer():
        fd = os.open(p.file("disk0"), os.O_WRONLY)
        i = 0
        try:
            while not stop.is_set():
                os.pwrite(fd, fill(0x44, 65536), (i * 65536) % (6 * MiB))
                i += 1
        except OSError:
            pass
        finally:
            close_quietly(fd)

    t = threading.Thread(target=writer)
    t.start()
    time.sleep(0.3)
    p.kill(signal.SIGKILL)
    stop.set()
    t.join()
    wait_for(lambda: not s.status()["peer_connected"], what="secondary notices")
    assert pread(s.file("disk0"), 0, 4 * MiB) == fill(PRIMARY, 4 * MiB)
    s.action("failover")
    expected = bytearray(checkpoint)
    expected[8 * MiB:9 * MiB] = fill(SECONDARY_VM)
    assert read_all(pair.simgs["disk0"]) == bytes(expected)


def test_overlay_storage_full(pair, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(work)], check=True)
    try:
        pair.images({"disk0": 16 * MiB})
        pair.start_secondary()
        pair.start_primary("--timeout", "2")
        p, s = pair.primary, pair.secondary
        view0 = read_all(s.file("disk0"))
        # 4 MiB of primary writes need 4 MiB of hidden: the copy cannot be
        # stored, so the write must not land in the secondary disk.
        pwrite(p.file("disk0"), 0, fill(PRIMARY, 4 * MiB), fsync=True)
        assert pread(pair.pimgs["disk0"], 0, 4 * MiB) == fill(PRIMARY, 4 * MiB)
        wait_for(lambda: p.status()["state"] == "degraded", what="primary degrades")
        assert "No space" in p.status()["last_error"] or "ENOSPC" in p.status()["last_error"]
        assert s.status()["last_error"]
        assert read_all(s.file("disk0")) == view0
        # The secondary disk holds only writes whose copy was stored.
        simg = read_all(pair.simgs["disk0"])
        hidden = s.status()["disks"]["disk0"]["hidden_bytes"]
        assert simg[hidden:] == view0[hidden:]
        # A view write that cannot be stored fails with ENOSPC.
        with pytest.raises(OSError) as e:
            pwrite(s.file("disk0"), 8 * MiB, fill(SECONDARY_VM, 4 * MiB), fsync=True)
        assert e.value.errno == errno.ENOSPC
        assert pread(s.file("disk0"), 12 * MiB - 65536, 65536) == fill(BASE, 65536)
    finally:
        pair.close()
        subprocess.run(["umount", "-l", str(work)], capture_output=True)


def test_image_io_errors_are_reported(pair):
    pair.images({"disk0": 8 * MiB})
    pair.start_secondary("--inject-faults", "read:EIO@4M-5M")
    pair.start_primary("--inject-faults", "write:EIO@6M-7M")
    p, s = pair.primary, pair.secondary
    # The primary's own image fails: the app gets EIO, nothing is replicated.
    with pytest.raises(OSError) as e:
        pwrite(p.file("disk0"), 6 * MiB, fill(PRIMARY, 4096))
    assert e.value.errno == errno.EIO
    assert pread(pair.simgs["disk0"], 6 * MiB, 4096) == fill(BASE, 4096)
    assert p.status()["state"] == "replicating"
    # The secondary's disk fails a read: the view's reader gets EIO ...
    fd = os.open(s.file("disk0"), os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, 4096)
        with pytest.raises(OSError) as e:
            os.preadv(fd, [buf], 4 * MiB)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    # ... and the copy-before-write of a primary write there fails: the write
    # does not land, the primary degrades, the secondary says why.
    pwrite(p.file("disk0"), 4 * MiB, fill(PRIMARY, 65536), fsync=True)
    wait_for(lambda: p.status()["state"] == "degraded", what="primary degrades")
    assert pread(pair.simgs["disk0"], 4 * MiB, 65536) == fill(BASE, 65536)
    assert "Input/output error" in s.status()["last_error"] or "EIO" in s.status()["last_error"]


def test_second_primary_is_refused(pair, tmp_path):
    pair.start({"disk0": 4 * MiB})
    listen = pair.secondary.status()["listen"]
    other = tmp_path / "other"
    other.mkdir()
    from tests.conftest import replfs_cmd
    r = replfs_cmd("primary", other, "--secondary", listen, "--disk",
                   f"disk0={pair.pimgs['disk0']}", check=False)
    assert r.returncode == 1 and "disk0" in r.stderr, r.stderr
    assert not os.path.ismount(other)
    pwrite(pair.primary.file("disk0"), 0, fill(PRIMARY), fsync=True)
    assert pread(pair.simgs["disk0"], 0, MiB) == fill(PRIMARY)
    assert pair.primary.status()["state"] == "replicating"


def test_unmount_under_load(pair, require_tool):
    require_tool("fio")
    pair.start({"disk0": 32 * MiB})
    p = pair.primary
    fio = subprocess.Popen(
        ["fio", "--name=load", f"--filename={p.file('disk0')}", "--rw=randwrite",
         "--bs=4k", "--size=32M", "--ioengine=psync", "--fsync=1", "--time_based",
         "--runtime=3", "--output=/dev/null"])
    try:
        time.sleep(1)
        busy = subprocess.run(["fusermount3", "-u", p.path], capture_output=True, text=True,
                              timeout=10)
        assert busy.returncode != 0 and "busy" in busy.stderr.lower()
        assert os.path.ismount(p.path) and p.alive()
        lazy = subprocess.run(["fusermount3", "-u", "-z", p.path], capture_output=True,
                              timeout=10)
        assert lazy.returncode == 0
        assert fio.wait(timeout=30) == 0
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert p.wait_exit(), p.log_text()
    assert not os.path.ismount(p.path)
    # Everything fio wrote (and fsynced) is in both images.
    assert read_all(pair.pimgs["disk0"]) == read_all(pair.simgs["disk0"])


@pytest.fixture
def fusectl():
    """/sys/fs/fuse/connections, mounted for the test if it is not already."""
    path = "/sys/fs/fuse/connections"
    mounted_here = False
    if not os.path.ismount(path):
        r = subprocess.run(["mount", "-t", "fusectl", "none", path], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"fusectl cannot be mounted: {r.stderr.strip()}")
        mounted_here = True
    yield path
    if mounted_here:
        subprocess.run(["umount", path], capture_output=True)


def test_fuse_connection_abort_under_load_ends_the_daemon(pair, fusectl):
    """An admin aborts a mount's FUSE connection (fusectl, the cure for a
    hung mount) while 8 writers are busy: every worker of the daemon sees the
    connection gone, the daemon exits, nothing stays mounted or running, and
    the writers get an error instead of hanging."""
    pair.start({"disk0": 8 * MiB})
    p = pair.primary
    conn = os.path.join(fusectl, str(os.minor(os.stat(p.path).st_dev)))
    assert os.path.isdir(conn)
    started, errors = threading.Barrier(9, timeout=10), []

    def writer(i):
        import mmap
        buf = mmap.mmap(-1, 4096)
        buf[:] = fill(PRIMARY, 4096)
        fd = os.open(p.file("disk0"), os.O_WRONLY | os.O_DIRECT)
        try:
            started.wait()
            for k in range(1_000_000):
                os.pwritev(fd, [buf], ((k * 8 + i) * 4096) % (8 * MiB))
        except OSError as exc:
            errors.append(exc.errno)
        finally:
            try:
                os.close(fd)
            except OSError:  # close's FLUSH fails too: the connection is gone
                pass

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)
    with open(os.path.join(conn, "abort"), "w") as f:
        f.write("1")
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a writer hung after the abort"
    assert len(errors) == 8 and set(errors) <= {errno.ECONNABORTED, errno.ENOTCONN}
    assert p.wait_exit(), p.log_text()
    # fusermount3 (auto_unmount) removes the mount once the daemon is gone.
    wait_for(lambda: not os.path.ismount(p.path), what="the mount to go")
    # The secondary carries on, serving its view; a checkpoint needs a
    # primary to agree with, so it is refused (ENOTCONN) and changes nothing.
    s = pair.secondary
    wait_for(lambda: not s.status()["peer_connected"], what="the secondary to notice")
    with pytest.raises(OSError) as e:
        s.action("checkpoint")
    assert e.value.errno == errno.ENOTCONN
    assert "no primary connected" in s.status()["last_error"]
    assert s.status()["checkpoints"] == 0 and s.status()["state"] == "replicating"


@pytest.mark.parametrize("seed", range(20))
def test_kill9_at_random_points_keeps_every_fsynced_write(pair, seed):
    """Seeded rounds: a writer fsyncs numbered records; one daemon is killed
    at a random moment; every record acknowledged by fsync is in the
    primary's image; no stale mount is left."""
    rng = random.Random(seed)
    victim = rng.choice(["primary", "secondary"])
    pair.start({"disk0": 8 * MiB}, primary_args=("--timeout", "1"))
    p, s = pair.primary, pair.secondary
    acked: list[int] = []
    stop = threading.Event()

    def writer():
        fd = os.open(p.file("disk0"), os.O_WRONLY)
        try:
            for i in range(100_000):
                if stop.is_set():
                    return
                os.pwrite(fd, i.to_bytes(4, "little") * 1024, (i % 2048) * 4096)
                os.fsync(fd)
                acked.append(i)
        except OSError:
            pass
        finally:
            close_quietly(fd)

    t = threading.Thread(target=writer)
    t.start()
    # the kill lands at a random moment after the first record is acknowledged
    # (a kill before it would check nothing; the first fsync also persists the
    # secondary's epoch, which may take longer than the shortest draws)
    wait_for(lambda: acked, what="the first acknowledged record")
    time.sleep(rng.uniform(0.05, 0.8))
    (p if victim == "primary" else s).kill(signal.SIGKILL)
    time.sleep(0.3)
    stop.set()
    t.join(timeout=30)
    assert not t.is_alive()
    assert acked, "the writer made no progress"
    img = read_all(pair.pimgs["disk0"])
    last = {}
    for i in acked:
        last[i % 2048] = i
    for slot, i in last.items():
        assert img[slot * 4096:slot * 4096 + 4096] == i.to_bytes(4, "little") * 1024
    for m in (p, s):
        if m.pid and not m.alive():
            wait_for(lambda: not os.path.ismount(m.path), what="auto_unmount")


def test_ext4_primary_killed_at_random_then_failover(pair, require_tool, tmp_path):
    """Files written and synced, checkpoint, more writes, kill -9 of the
    primary at a random moment, failover: the secondary image passes
    e2fsck -fn and holds every file of the last checkpoint."""
    require_tool("losetup", "mkfs.ext4", "e2fsck", "debugfs", "fsfreeze")
    rng = random.Random(1234)
    pair.start({"disk0": 64 * MiB})
    p, s = pair.primary, pair.secondary
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True, timeout=120)
    loop = run("losetup", "-f", "--show", p.file("disk0")).stdout.strip()
    fsdir = tmp_path / "ext4"
    fsdir.mkdir()
    mounted = False
    stop = threading.Event()
    try:
        run("mkfs.ext4", "-q", "-F", loop)
        run("mount", loop, str(fsdir))
        mounted = True
        for i in range(10):
            (fsdir / f"kept{i}").write_bytes(bytes([i + 1]) * 30_000)
        run("fsfreeze", "-f", str(fsdir))
        try:
            pair.checkpoint()
        finally:
            run("fsfreeze", "-u", str(fsdir))

        def churn():
            i = 0
            while not stop.is_set():
                try:
                    with open(fsdir / f"new{i % 50}", "wb") as f:
                        f.write(bytes([i % 256]) * 70_000)
                        f.flush()
                        os.fsync(f.fileno())
                except OSError:
                    return
                i += 1

        t = threading.Thread(target=churn)
        t.start()
        time.sleep(rng.uniform(0.2, 1.0))
        p.kill(signal.SIGKILL)
        stop.set()
        t.join(timeout=30)
        wait_for(lambda: not s.status()["peer_connected"], what="secondary notices")
        s.action("failover")
        simg = pair.simgs["disk0"]
        r = subprocess.run(["e2fsck", "-fn", simg], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        for i in range(10):
            r = subprocess.run(["debugfs", "-R", f"cat /kept{i}", simg],
                               capture_output=True, timeout=60)
            assert r.stdout == bytes([i + 1]) * 30_000, f"kept{i}"
    finally:
        stop.set()
        if mounted:
            subprocess.run(["umount", "-l", str(fsdir)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


def test_nbd_fuzz_while_the_primary_replicates(pair):
    """Thousands of malformed NBD conversations against the secondary while
    the real primary writes: the secondary never crashes, the primary keeps
    replicating, and the images stay equal."""
    import socket
    import struct
    pair.start({"disk0": 4 * MiB})
    p, s = pair.primary, pair.secondary
    host, port = s.status()["listen"].rsplit(":", 1)
    rng = random.Random(99)
    magic = b"NBDMAGIC" + struct.pack(">Q", 0x49484156454F5054)
    prefixes = [b"", struct.pack(">I", 1), struct.pack(">I", 3),
                struct.pack(">IQII", 3, 0x49484156454F5054, 7, 5) + b"disk0"]
    for i in range(2000):
        with socket.create_connection((host, int(port)), timeout=5) as c:
            c.settimeout(5)
            got = b""
            while len(got) < len(magic) + 2:
                chunk = c.recv(64)
                if not chunk:
                    break
                got += chunk
            assert got[:16] == magic
            junk = rng.choice(prefixes) + rng.randbytes(rng.randrange(0, 300))
            try:
                c.sendall(junk)
            except OSError:
                pass
        if i % 200 == 0:
            pwrite(p.file("disk0"), (i // 200) * 65536, bytes([i % 251]) * 65536, fsync=True)
    assert s.alive() and p.status()["state"] == "replicating"
    assert "Traceback" not in s.log_text()
    assert read_all(pair.pimgs["disk0"]) == read_all(pair.simgs["disk0"])


def test_fsync_error_on_the_primary_image_reaches_the_app(pair):
    pair.images({"disk0": 4 * MiB})
    pair.start_secondary()
    pair.start_primary("--inject-faults", "flush:EIO:count=1")
    p = pair.primary
    fd = os.open(p.file("disk0"), os.O_WRONLY)
    try:
        os.pwrite(fd, fill(PRIMARY, 4096), 0)
        with pytest.raises(OSError) as e:
            os.fsync(fd)
        assert e.value.errno == errno.EIO
        os.fsync(fd)  # the fault was for one flush only
    finally:
        close_quietly(fd)
    assert p.status()["state"] == "replicating"
    assert pread(pair.simgs["disk0"], 0, 4096) == fill(PRIMARY, 4096)


@pytest.fixture
def netns_host(tmp_path):
    """A second host: a network namespace behind a veth pair, 10.231.N.2,
    reached from here at 10.231.N.1.  Yields (name, host_ip, ns_ip)."""
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        pytest.skip("ip (iproute2) or nsenter (util-linux) is not installed")
    n = os.getpid() % 200 + 20
    ns, here, there = f"replfs-t{n}", f"rfh{n}", f"rfn{n}"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True)
    try:
        run("ip", "netns", "add", ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces unavailable: {exc.stderr.strip()}")
    try:
        try:
            run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            run("ip", "link", "set", there, "netns", ns)
            run("ip", "addr", "add", f"10.231.{n}.1/30", "dev", here)
            run("ip", "link", "set", here, "up")
            for cmd in (["ip", "addr", "add", f"10.231.{n}.2/30", "dev", there],
                        ["ip", "link", "set", there, "up"], ["ip", "link", "set", "lo", "up"]):
                run("ip", "netns", "exec", ns, *cmd)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot build a veth pair into {ns}: {exc.stderr.strip()}")
        yield ns, here, f"10.231.{n}.1", f"10.231.{n}.2"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_primary_host_vanishes_secondary_notices(pair, netns_host):
    """The primary's host drops off the network (no FIN, no RST: its link
    goes down).  TCP keepalive lets the secondary notice within about 10 s;
    it keeps serving the view, and failover gives the last checkpoint plus
    the secondary VM's writes."""
    ns, link, host_ip, ns_ip = netns_host
    pair.images({"disk0": 4 * MiB})
    s = pair.start_secondary("--insecure", listen=f"{host_ip}:0")
    p = pair.start_primary(secondary=s.status()["listen"],
                           prefix=["nsenter", f"--net=/run/netns/{ns}"])
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    pair.checkpoint()
    pwrite(s.file("disk0"), MiB, fill(SECONDARY_VM))
    assert s.status()["peer_connected"]
    subprocess.run(["ip", "link", "set", link, "down"], check=True)
    t = time.monotonic()
    wait_for(lambda: not s.status()["peer_connected"], timeout=30, what="keepalive")
    noticed = time.monotonic() - t
    assert noticed < 20, noticed
    s.action("failover")
    expected = fill(PRIMARY) + fill(SECONDARY_VM) + fill(BASE, 2 * MiB)
    assert read_all(pair.simgs["disk0"]) == expected
    # The primary's writes go on locally; it degrades once its own request
    # to the vanished secondary times out.
    pwrite(p.file("disk0"), 2 * MiB, fill(PRIMARY), fsync=True)
    wait_for(lambda: p.status()["state"] == "degraded", what="primary degrades")
