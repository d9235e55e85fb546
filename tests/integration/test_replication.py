"""The replication filesystem end to end: real mounts, real NBD on 127.0.0.1.

Every step asserts which writer's pattern byte survives where, and compares
whole images byte for byte (QEMU's test-replication, and the scenarios of
shared/QEMU-REFERENCE.md).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from tests.conftest import (BASE, MiB, PRIMARY, SECONDARY_VM, pread, pwrite, read_all)

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sync", "checkpoint"])
def protocol(request) -> str:
    """Every test here runs with both write protocols of the primary."""
    return request.param

R0, R1, R2, R3, R4 = (i * 2 * MiB for i in range(5))


def fill(byte: int, n: int = MiB) -> bytes:
    return bytes([byte]) * n


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_primary_writes_replicate_and_view_keeps_checkpoint(pair):
    pair.start()
    p, s = pair.primary, pair.secondary
    pimg, simg = pair.pimgs["disk0"], pair.simgs["disk0"]
    st = s.status()
    assert st["role"] == "secondary" and st["state"] == "replicating"
    wait_for(lambda: s.status()["peer_connected"], what="peer")
    assert p.status()["peer_connected"] is True

    pwrite(p.file("disk0"), R0, fill(PRIMARY))
    pwrite(s.file("disk0"), R1, fill(SECONDARY_VM))
    pair.settle()  # checkpoint mode: nothing queued any more
    # The primary's write is in both images; the view still shows the base.
    assert pread(pimg, R0, MiB) == fill(PRIMARY)
    assert pread(simg, R0, MiB) == fill(PRIMARY)
    assert pread(p.file("disk0"), R0, MiB) == fill(PRIMARY)
    assert pread(s.file("disk0"), R0, MiB) == fill(BASE)
    # The secondary VM's write is in its view only.
    assert pread(s.file("disk0"), R1, MiB) == fill(SECONDARY_VM)
    assert pread(simg, R1, MiB) == fill(BASE)
    assert pread(pimg, R1, MiB) == fill(BASE)
    held = s.status()["disks"]["disk0"]
    assert held["hidden_bytes"] == MiB and held["active_bytes"] == MiB

    pair.checkpoint()
    assert read_all(s.file("disk0")) == read_all(simg) == read_all(pimg)
    held = s.status()["disks"]["disk0"]
    assert held["hidden_bytes"] == 0 and held["active_bytes"] == 0
    assert s.status()["checkpoints"] == 1 and p.status()["checkpoints"] == 1


def test_divergent_writes_then_primary_dies_then_failover(pair):
    """QEMU-REFERENCE scenario 1, steps 3-6."""
    pair.start()
    p, s = pair.primary, pair.secondary
    simg = pair.simgs["disk0"]
    pwrite(p.file("disk0"), R0, fill(PRIMARY))
    pair.checkpoint()
    checkpoint = read_all(pair.pimgs["disk0"])

    pwrite(s.file("disk0"), R2, fill(SECONDARY_VM))        # secondary first,
    pwrite(p.file("disk0"), R2, fill(PRIMARY))             # then primary: VM wins
    pwrite(p.file("disk0"), R3, fill(PRIMARY))             # primary first,
    pwrite(s.file("disk0"), R3, fill(SECONDARY_VM))        # then VM
    pwrite(p.file("disk0"), R4 + 68 * 1024, fill(0xA5, 4096))  # inside a cluster
    pair.settle()
    assert pread(s.file("disk0"), R2, MiB) == fill(SECONDARY_VM)
    assert pread(s.file("disk0"), R3, MiB) == fill(SECONDARY_VM)
    assert pread(s.file("disk0"), R4, MiB) == fill(BASE)
    assert pread(simg, R4, 192 * 1024) == fill(BASE, 68 * 1024) + fill(0xA5, 4096) + \
        fill(BASE, 120 * 1024)
    view_before = read_all(s.file("disk0"))

    p.kill(signal.SIGKILL)
    wait_for(lambda: not s.status()["peer_connected"], what="primary gone")
    assert s.status()["state"] == "replicating"
    s.action("failover")
    st = s.status()
    assert st["state"] == "failed-over"
    assert read_all(simg) == view_before
    assert read_all(s.file("disk0")) == view_before
    expected = bytearray(checkpoint)
    expected[R2:R2 + MiB] = fill(SECONDARY_VM)
    expected[R3:R3 + MiB] = fill(SECONDARY_VM)
    assert read_all(simg) == bytes(expected)

    # After failover the view writes straight to the secondary disk.
    pwrite(s.file("disk0"), R1, fill(0xEE), fsync=True)
    assert pread(simg, R1, MiB) == fill(0xEE)
    # A checkpoint now makes no sense: refused, and nothing is lost.
    with pytest.raises(OSError) as exc:
        s.action("checkpoint")
    assert exc.value.errno == errno.EINVAL
    assert "failed-over" in s.status()["last_error"]
    assert pread(s.file("disk0"), R1, MiB) == fill(0xEE)
    # Failover twice is a no-op.
    s.action("failover")
    assert read_all(simg)[R1:R1 + MiB] == fill(0xEE)


def test_failover_with_live_primary_refuses_its_writes(pair):
    pair.start()
    p, s = pair.primary, pair.secondary
    pwrite(p.file("disk0"), R0, fill(PRIMARY))
    pair.checkpoint()
    pwrite(s.file("disk0"), R1, fill(SECONDARY_VM))
    pwrite(p.file("disk0"), R2, fill(PRIMARY))
    view = read_all(s.file("disk0"))
    s.action("failover")
    assert read_all(pair.simgs["disk0"]) == view
    # The primary carries on alone: its write succeeds locally, the secondary
    # refuses it, the primary degrades and says why.
    pwrite(p.file("disk0"), R3, fill(PRIMARY), fsync=True)
    assert pread(pair.pimgs["disk0"], R3, MiB) == fill(PRIMARY)
    wait_for(lambda: p.status()["state"] == "degraded", what="primary degraded")
    assert p.status()["last_error"]
    assert p.status()["peer_connected"] is False
    assert read_all(pair.simgs["disk0"]) == view


def test_unaligned_small_and_last_byte_writes(pair):
    size = 4 * MiB + 4096 + 17   # not a cluster multiple
    pair.start({"disk0": size})
    p, s = pair.primary, pair.secondary
    writes = [(0, b"\x22"), (1, b"\x22" * 3), (65535, b"\x22" * 2), (size - 1, b"\x22"),
              (100_000, b"\x22" * 200_000), (size - 70_000, b"\x22" * 70_000)]
    for off, data in writes:
        pwrite(p.file("disk0"), off, data)
    pwrite(s.file("disk0"), 65536 * 3 + 5, b"\x33" * 7)
    pwrite(s.file("disk0"), size - 2, b"\x33")
    expected_p = bytearray(fill(BASE, size))
    for off, data in writes:
        expected_p[off:off + len(data)] = data
    view = bytearray(fill(BASE, size))
    view[65536 * 3 + 5:65536 * 3 + 12] = b"\x33" * 7
    view[size - 2] = 0x33
    pair.settle()
    assert read_all(p.file("disk0")) == bytes(expected_p)
    assert read_all(pair.pimgs["disk0"]) == bytes(expected_p)
    assert read_all(pair.simgs["disk0"]) == bytes(expected_p)
    assert read_all(s.file("disk0")) == bytes(view)
    assert os.path.getsize(s.file("disk0")) == size
    pair.checkpoint()
    assert read_all(s.file("disk0")) == bytes(expected_p)


def test_several_disks_and_many_checkpoints(pair):
    pair.start({"a": 4 * MiB, "b": 6 * MiB})
    p, s = pair.primary, pair.secondary
    for i in range(20):
        for name in ("a", "b"):
            pwrite(p.file(name), (i * 123_457) % (3 * MiB), bytes([i + 1]) * 5000)
            pwrite(s.file(name), (i * 98_765) % (3 * MiB), bytes([0x80 + i]) * 3000)
        pair.checkpoint()
        for name in ("a", "b"):
            assert read_all(s.file(name)) == read_all(pair.simgs[name]) \
                == read_all(pair.pimgs[name])
    assert s.status()["checkpoints"] == 20
    assert set(s.status()["disks"]) == {"a", "b"}


def test_fsync_and_open_fd_sees_checkpoint_at_once(pair):
    pair.start()
    p, s = pair.primary, pair.secondary
    fd = os.open(s.file("disk0"), os.O_RDONLY)  # buffered, opened before
    try:
        pwrite(p.file("disk0"), R0, fill(PRIMARY), fsync=True)
        pwrite(s.file("disk0"), R1, fill(SECONDARY_VM))
        assert os.pread(fd, MiB, R0) == fill(BASE)
        assert os.pread(fd, MiB, R1) == fill(SECONDARY_VM)
        pair.checkpoint()
        assert os.pread(fd, MiB, R0) == fill(PRIMARY)
        assert os.pread(fd, MiB, R1) == fill(BASE)
    finally:
        os.close(fd)


def test_view_reads_are_never_torn_during_primary_writes(pair):
    pair.start()
    p, s = pair.primary, pair.secondary
    stop = threading.Event()
    bad: list[str] = []

    def reader():
        fd = os.open(s.file("disk0"), os.O_RDONLY | os.O_DIRECT)
        try:
            import mmap
            buf = mmap.mmap(-1, MiB)
            while not stop.is_set():
                os.preadv(fd, [buf], R0)
                if buf[:] != fill(BASE):
                    bad.append(f"view showed {set(buf[:])}")
                    return
        finally:
            os.close(fd)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            pwrite(p.file("disk0"), R0, fill(PRIMARY if i % 2 else 0x44))
    finally:
        stop.set()
        t.join()
    assert not bad, bad[0]


def test_concurrent_requests_take_the_fast_path_and_replicate(pair):
    """16 writers and 16 readers at once (O_DIRECT, so each is one FUSE
    request): the queued requests are taken without a wait (fuse.fast_wait
    counts them), every write is replicated, and the images end up equal."""
    pair.start({"disk0": 4 * MiB})
    p, s = pair.primary, pair.secondary
    n = 16
    errors: list[BaseException] = []

    def worker(i):
        import mmap
        buf = mmap.mmap(-1, 4096)
        try:
            fd = os.open(p.file("disk0"), os.O_RDWR | os.O_DIRECT)
            try:
                for k in range(64):
                    off = (k * n + i) * 4096
                    buf[:] = bytes([PRIMARY ^ (k & 0x0F)]) * 4096
                    assert os.pwritev(fd, [buf], off) == 4096
                    assert os.preadv(fd, [buf], off) == 4096
                    assert buf[:] == bytes([PRIMARY ^ (k & 0x0F)]) * 4096
            finally:
                os.close(fd)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    fuse = p.status()["fuse"]
    assert fuse["fast_wait"] is True
    assert fuse["requests_queued"] > 0
    pair.checkpoint()
    assert read_all(pair.simgs["disk0"]) == read_all(pair.pimgs["disk0"])
    expect = b"".join(bytes([PRIMARY ^ ((off // (n * 4096)) & 0x0F)]) * 4096
                      for off in range(0, 4 * MiB, 4096))
    assert read_all(s.file("disk0")) == expect


def test_no_extended_attributes(pair):
    """The disk files answer ENOSYS to every xattr call, which the kernel
    reports as EOPNOTSUPP and then stops asking (before every write it would
    otherwise ask for security.capability)."""
    pair.start({"disk0": 4 * MiB})
    f = pair.primary.file("disk0")
    for call in (lambda: os.getxattr(f, "security.capability"),
                 lambda: os.listxattr(f),
                 lambda: os.setxattr(f, "user.x", b"1")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EOPNOTSUPP
    pwrite(f, 0, fill(PRIMARY, 4096))
    pair.checkpoint()
    assert pread(pair.secondary.file("disk0"), 0, 8192) == fill(PRIMARY, 4096) + fill(BASE, 4096)


def test_qemu_io_odirect_on_primary_file(pair, require_tool):
    require_tool("qemu-io")
    import subprocess
    pair.start()
    p = pair.primary
    r = subprocess.run(["qemu-io", "-f", "raw", "-n", "-c", f"write -P 0x22 {R0} 1M",
                        "-c", f"write -P 0x22 {R1 + 512} 4k",
                        "-c", f"read -P 0x22 {R0} 1M", p.file("disk0")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    pair.settle()
    assert pread(pair.simgs["disk0"], R0, MiB) == fill(PRIMARY)
    assert pread(pair.simgs["disk0"], R1 + 512, 4096) == fill(PRIMARY, 4096)
    assert read_all(pair.simgs["disk0"]) == read_all(pair.pimgs["disk0"])


def test_control_files_and_fixed_namespace(pair):
    pair.start({"disk0": 4 * MiB})
    p, s = pair.primary, pair.secondary
    for m in (p, s):
        st = m.status()
        for key in ("role", "state", "peer_connected", "checkpoints", "last_error", "disks"):
            assert key in st
        assert st["disks"]["disk0"]["size"] == 4 * MiB
        assert sorted(os.listdir(m.path)) == [".replfs", "disk0"]
        assert sorted(os.listdir(os.path.join(m.path, ".replfs"))) == \
            ["checkpoint", "connect", "disconnect", "events", "failover", "metrics",
             "reprotect", "resync", "status", "stop", "verify"]
        f = m.file("disk0")
        for off, n in ((4 * MiB, 1), (4 * MiB - 4096, 8192), (4 * MiB + 4096, 4096)):
            with pytest.raises(OSError) as e:
                pwrite(f, off, b"\xee" * n)
            assert e.value.errno == errno.ENOSPC
        assert pread(f, 4 * MiB - 4096, 4096) == fill(BASE, 4096)  # nothing written
        # The kernel may split a buffered write that crosses the end at a page
        # boundary: then the part inside is written and write() returns the
        # short count (as a block device does); or it fails whole.  Nothing
        # ever lands past the end.
        fd = os.open(f, os.O_WRONLY)
        try:
            n = os.pwrite(fd, b"\x5a\x5a", 4 * MiB - 1)
            assert n == 1 and pread(f, 4 * MiB - 1, 1) == b"\x5a"
        except OSError as e:
            assert e.errno == errno.ENOSPC
            assert pread(f, 4 * MiB - 1, 1) == bytes([BASE])
        finally:
            os.close(fd)
        assert os.path.getsize(f) == 4 * MiB
        assert pread(f, 4 * MiB, 10) == b""                      # read past the end
        with pytest.raises(OSError) as e:
            os.truncate(f, MiB)
        assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            open(os.path.join(m.path, "new"), "wb")
        assert e.value.errno == errno.EPERM
        for op in (lambda: os.mkdir(os.path.join(m.path, "d")),
                   lambda: os.unlink(f),
                   lambda: os.rename(f, os.path.join(m.path, "x"))):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EPERM
        with pytest.raises(OSError) as e:
            open(m.ctl("status"), "wb")
        assert e.value.errno == errno.EACCES
        before = m.status()["last_error"]
        with pytest.raises(OSError) as e:
            m.action("checkpoint", b"banana\n")
        assert e.value.errno == errno.EINVAL
        assert "unknown value" in m.status()["action_error"]
        assert m.status()["last_error"] == before  # a typo hides no real error
        with pytest.raises(OSError) as e:  # O_TRUNC on a disk: refused, data kept
            os.close(os.open(f, os.O_WRONLY | os.O_TRUNC))
        assert e.value.errno == errno.EPERM
        assert os.path.getsize(f) == 4 * MiB
    assert s.status()["listen"].startswith("127.0.0.1:")
    assert s.status()["checkpoints"] == 0


def test_stop_then_unmount_exits_cleanly(pair):
    pair.start({"disk0": 4 * MiB})
    p, s = pair.primary, pair.secondary
    pwrite(p.file("disk0"), 0, fill(PRIMARY))
    pwrite(s.file("disk0"), MiB, fill(SECONDARY_VM))
    pair.settle()
    s.action("stop")
    assert s.status()["state"] == "stopped"
    assert read_all(s.file("disk0")) == read_all(pair.simgs["disk0"]) == \
        read_all(pair.pimgs["disk0"])
    p.action("stop")
    assert p.status()["state"] == "stopped"
    for m in (p, s):
        import subprocess
        subprocess.run(["fusermount3", "-u", m.path], check=True)
        assert m.wait_exit(), m.log_text()
        assert not os.path.ismount(m.path)
    assert not os.listdir(pair.tmp / "work")


def test_ext4_on_the_primary_checks_clean_on_the_secondary(pair, require_tool, tmp_path):
    import subprocess
    require_tool("losetup", "mkfs.ext4", "e2fsck", "fsfreeze")
    pair.start({"disk0": 64 * MiB}, )
    p, s = pair.primary, pair.secondary
    simg = pair.simgs["disk0"]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, text=True, timeout=120)
    loop = run("losetup", "-f", "--show", p.file("disk0")).stdout.strip()
    fsdir = tmp_path / "ext4"
    fsdir.mkdir()
    mounted = False
    try:
        run("mkfs.ext4", "-q", "-F", loop)
        run("mount", loop, str(fsdir))
        mounted = True
        for i in range(20):
            (fsdir / f"f{i}").write_bytes(bytes([i]) * (i * 10_000 + 1))
        run("fsfreeze", "-f", str(fsdir))
        try:
            pair.checkpoint()
        finally:
            run("fsfreeze", "-u", str(fsdir))
        r = subprocess.run(["e2fsck", "-fn", simg], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        # More writes on the primary, then failover: back to the checkpoint.
        for i in range(20, 40):
            (fsdir / f"f{i}").write_bytes(bytes([i]) * 50_000)
        s.action("failover")
        r = subprocess.run(["e2fsck", "-fn", simg], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        r = subprocess.run(["debugfs", "-R", "ls -l /", simg], capture_output=True, text=True)
        for i in range(20):
            assert f" f{i}" in r.stdout or f"f{i}\n" in r.stdout, r.stdout
    finally:
        if mounted:
            subprocess.run(["umount", str(fsdir)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly_and_primary_degrades(pair, sig):
    pair.start({"disk0": 4 * MiB})
    p, s = pair.primary, pair.secondary
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)
    pair.settle()  # checkpoint mode: the fsync is local, the secondary gets it streamed
    s.kill(sig)
    assert s.wait_exit(), s.log_text()
    assert not os.path.ismount(s.path)
    assert "Traceback" not in s.log_text()
    # The primary loses its secondary: the app's writes still succeed.
    pwrite(p.file("disk0"), MiB, fill(PRIMARY), fsync=True)
    wait_for(lambda: p.status()["state"] == "degraded", what="primary degraded")
    assert p.status()["last_error"]
    assert pread(pair.pimgs["disk0"], MiB, MiB) == fill(PRIMARY)
    assert pread(pair.simgs["disk0"], 0, MiB) == fill(PRIMARY)
    p.kill(sig)
    assert p.wait_exit(), p.log_text()
    assert not os.path.ismount(p.path)
    assert "Traceback" not in p.log_text()


def test_killed_daemon_leaves_no_stale_mount(pair):
    pair.start({"disk0": 4 * MiB})
    p, s = pair.primary, pair.secondary
    for m in (p, s):
        m.kill(signal.SIGKILL)
        assert m.wait_exit()
        wait_for(lambda: not os.path.ismount(m.path), what="auto_unmount")
