"""Continuous replication under crashes: kill -9 during a resync while fio
writes, a failover in the middle of a resync, kill -9 during a failover's
commit.

Real daemons started through the CLI, real mounts, real TCP on 127.0.0.1.
Every daemon is restarted with exactly the arguments it was first started
with (the secondary on a fixed port, so that the primary finds it again);
every image is compared byte for byte; every wait is bounded.  Pattern
bytes: 0x11 base, 0x22 primary VM, 0x33 secondary VM, 0x44 the primary VM
after the checkpoint (where it must be told apart from 0x22).
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests import _proc
from tests.conftest import (BASE, PRIMARY, SECONDARY_VM, MiB, Pair, have_fuse, pread,
                            pwrite, read_all, replfs_cmd)
from tests.integration.test_replication import fill

pytestmark = pytest.mark.integration


def both(sync_seeds, checkpoint_seeds) -> list:
    """``(protocol, seed)`` cases: every seed in sync mode, a representative
    subset in checkpoint mode (the whole would double the suite's time)."""
    return ([pytest.param("sync", s, id=f"sync-{s}") for s in sync_seeds]
            + [pytest.param("checkpoint", s, id=f"checkpoint-{s}") for s in checkpoint_seeds])

CLUSTER = 64 * 1024


def addr(port: int) -> str:
    return f"127.0.0.1:{port}"


# -- diagnostics and bounded waits ----------------------------------------------------
def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)\n"


def diag(pair: Pair | None) -> str:
    """Both sides' status (if mounted) and the end of their logs."""
    if pair is None:
        return ""
    out = []
    for m in (pair.primary, pair.secondary):
        if m is None:
            continue
        role = "primary" if m is pair.primary else "secondary"
        try:
            st = m.status()
            st = {k: st.get(k) for k in ("state", "peer_connected", "last_error",
                                         "reconnect_error", "sync", "failover_ready")}
        except (OSError, ValueError) as exc:
            st = f"(no status: {exc})"
        out.append(f"--- {role} pid {m.pid}: {st}\n{_tail(m.log)}")
    return "\n".join(out)


def until(cond, what: str, pair: Pair | None = None, timeout: float = 20.0):
    """Polls ``cond`` (an OSError from a mount that is coming or going counts
    as false) until it is true; fails after ``timeout`` s with both logs."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
            if value:
                return value
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n"
                                 f"{diag(pair)}")
        time.sleep(0.02)


def state(m) -> str | None:
    try:
        return m.status()["state"]
    except (OSError, ValueError):
        return None


def kill9(m, pair: Pair) -> None:
    """SIGKILL one daemon (by its pid); wait until it is gone and its mount too.

    fusermount3's auto_unmount (libfuse 3.14) unmounts only if opening the
    mountpoint fails with ENOTCONN.  When that open reaches the kernel while
    the dead daemon's /dev/fuse is not yet released, the connection's abort
    ends it with ECONNABORTED and fusermount3 exits leaving the dead mount
    (a few rounds in 20 under load; strace of fusermount3: ``openat(...,
    "mnt-secondary", O_RDONLY) = -1 ECONNABORTED``, then ``exit_group(0)``).
    The remedy for a dead mount, ``fusermount3 -u -z``, is applied here after
    checking that the mount is dead, so the round goes on to what it tests."""
    m.kill(signal.SIGKILL)
    assert m.wait_exit(10), f"daemon {m.pid} survived SIGKILL"
    deadline = time.monotonic() + 1  # auto_unmount takes milliseconds
    while _proc.mounted(m.path) and time.monotonic() < deadline:
        time.sleep(0.02)
    if _proc.mounted(m.path):
        try:
            os.listdir(m.path)
            dead = False
        except OSError as exc:
            dead = exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert dead, f"{m.path} is still mounted and answers after its daemon {m.pid} died"
        print(f"auto_unmount left the dead mount {m.path} of daemon {m.pid}: "
              f"unmounted lazily")
        _proc.unmount(m.path)
    until(lambda: not _proc.mounted(m.path), f"the mount {m.path} to go", pair, 10)


def differences(a: bytes, b: bytes, what: str) -> str:
    """Where two images differ, in 64 KiB clusters (not the bytes themselves)."""
    if len(a) != len(b):
        return f"{what}: sizes differ ({len(a)} != {len(b)})"
    bad = [c for c in range(0, len(a), CLUSTER) if a[c:c + CLUSTER] != b[c:c + CLUSTER]]
    shown = ", ".join(f"{c // MiB}M+{c % MiB // 1024}K" for c in bad[:12])
    return (f"{what}: {len(bad)} of {len(a) // CLUSTER} clusters differ, first at "
            f"{shown}{' ...' if len(bad) > 12 else ''}")


def assert_same(got: bytes, expected: bytes, what: str, pair: Pair | None = None) -> None:
    if got != expected:
        raise AssertionError(f"{differences(got, expected, what)}\n{diag(pair)}")


def no_traceback(pair: Pair) -> None:
    for m in (pair.primary, pair.secondary):
        if m is not None:
            assert "Traceback" not in m.log_text(), m.log_text()[-4000:]


def settle_and_checkpoint(pair: Pair, timeout: float = 30.0) -> None:
    """Waits until both sides replicate, then checkpoints both (retrying if a
    late resync makes the primary's checkpoint EBUSY)."""
    p, s = pair.primary, pair.secondary
    deadline = time.monotonic() + timeout
    while True:
        until(lambda: state(p) == "replicating" and state(s) == "replicating",
              "both sides replicating", pair, max(1.0, deadline - time.monotonic()))
        try:
            pair.checkpoint()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# -- 1. kill -9 of either side at a seeded moment during a resync, fio writing --------
DISK1 = 64 * MiB
FIO_AT, FIO_LEN = 40 * MiB, 8 * MiB       # fio's region, overlapping the resync's
EPOCH_AT = 48 * MiB                        # the write that makes the secondary's epoch dirty
RESYNC_PRIMARY_ARGS = ("--reconnect-interval", "0.5", "--resync-rate", "8M",
                       "--allow-degraded-start")


def start_fio(path: str, out, seed: int, runtime: float, direct: int, fsync: int):
    """A time-based 4 KiB random-write fio job on FIO_AT..+FIO_LEN of ``path``.
    ``--thread``: one process, so that killing its pid stops every job;
    ``--allow_file_create=0``: a vanished mount fails it rather than letting it
    create a file in the bare mountpoint."""
    return subprocess.Popen(
        ["fio", f"--name=cf{seed}", f"--filename={path}", "--rw=randwrite", "--bs=4k",
         f"--offset={FIO_AT}", f"--size={FIO_LEN}", "--ioengine=psync", f"--direct={direct}",
         f"--fsync={fsync}", "--time_based", f"--runtime={runtime:g}", "--thread",
         "--allow_file_create=0", f"--randseed={seed + 1}"],
        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def fio_writing(pair: Pair, proc, output) -> None:
    """Waits until fio's writes reach the primary (fio takes a moment to start)."""
    p = pair.primary
    before = p.status()["disks"]["disk0"]["writes"]
    until(lambda: proc.poll() is not None or p.status()["disks"]["disk0"]["writes"] > before,
          "fio to write", pair, 10)
    assert proc.poll() is None, _tail(str(output), 40)


def stop_proc(proc) -> None:
    """Ends a process this test started (by its pid) and closes its pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.mark.parametrize("protocol,seed", both(range(20), range(4)))
def test_kill9_during_resync_with_fio_converges(pair, require_tool, tmp_path, seed):
    """The secondary is killed and misses 20 MiB; fio starts 4 KiB random
    writes over 8 MiB (2 MiB of the missed data among them); the secondary
    is restarted ("inconsistent": the primary wrote since the checkpoint) and
    a slow resync (8 MiB/s) starts.  At a seeded moment of the resync one
    daemon is killed with SIGKILL (even seeds the secondary, odd the primary)
    and restarted with the same arguments.  fio's I/O through the live
    primary never fails; once fio is done and the pair replicates again, a
    checkpoint leaves the two images identical byte for byte, and outside
    fio's region they hold exactly the bytes written there.

    A killed primary takes its mount and fio's open file with it: fio is
    stopped at once (its in-flight writes may be half on the secondary: the
    restarted primary compares its activity log's extents by digest), and a
    second fio run writes through the restarted primary during its resync."""
    require_tool("fio")
    rng = random.Random(seed)
    victim = ("secondary", "primary")[seed % 2]
    direct, fsync = rng.choice([0, 1]), rng.choice([0, 8])
    port = _proc.free_port()
    pair.images({"disk0": DISK1})
    pair.start_secondary(listen=addr(port))
    pair.start_primary(*RESYNC_PRIMARY_ARGS, secondary=addr(port))
    p, s = pair.primary, pair.secondary
    expected = bytearray(fill(BASE, DISK1))

    def write(off: int, data: bytes, fsync_: bool = False) -> None:
        pwrite(p.file("disk0"), off, data, fsync=fsync_)
        expected[off:off + len(data)] = data

    pair.checkpoint()
    # A write since the checkpoint: the secondary's epoch is dirty, so its
    # restart is "inconsistent" (no failover) until a resync and a checkpoint.
    write(EPOCH_AT, fill(PRIMARY), True)
    pair.settle()  # checkpoint mode: an fsync is local; the secondary gets it streamed
    kill9(s, pair)
    until(lambda: state(p) == "degraded", "the primary to degrade", pair)
    # 20 MiB the secondary misses: 18 chunks in 0..40M, 2 in fio's region.
    missed = sorted(rng.sample(range(40), 18) + rng.sample(range(40, 48), 2))
    for chunk in missed:
        write(chunk * MiB, fill(PRIMARY))
    write(missed[0] * MiB, fill(PRIMARY), True)

    fio_runs = []
    try:
        with open(tmp_path / "fio-1.txt", "wb") as out:
            fio_runs.append(start_fio(p.file("disk0"), out, seed, 3, direct, fsync))
        fio_writing(pair, fio_runs[0], tmp_path / "fio-1.txt")
        s = pair.start_secondary(listen=addr(port))
        assert s.status()["failover_ready"] is False, diag(pair)
        until(lambda: state(p) == "syncing", "the resync to start", pair)
        time.sleep(rng.uniform(0.05, 1.3))
        st = p.status()
        assert st["state"] == "syncing", f"the resync ended before the kill\n{diag(pair)}"
        kill9(p if victim == "primary" else s, pair)
        if victim == "primary":
            stop_proc(fio_runs[0])  # its file went with the mount
            until(lambda: not s.status()["peer_connected"], "the secondary to notice",
                  pair, 10)
            p = pair.start_primary(*RESYNC_PRIMARY_ARGS, secondary=addr(port))
            assert "did not exit cleanly" in p.log_text(), p.log_text()[-3000:]
            with open(tmp_path / "fio-2.txt", "wb") as out:
                fio_runs.append(start_fio(p.file("disk0"), out, seed + 100, 1.5, direct,
                                          fsync))
            fio_writing(pair, fio_runs[1], tmp_path / "fio-2.txt")
        else:
            s = pair.start_secondary(listen=addr(port))
            assert s.status()["failover_ready"] is False, diag(pair)
        # fio's I/O never fails because of the secondary (nor of a restart).
        for i, proc in enumerate(fio_runs):
            if victim == "primary" and i == 0:
                continue
            rc = proc.wait(timeout=60)
            assert rc == 0, _tail(str(tmp_path / f"fio-{i + 1}.txt"), 40) + diag(pair)
    finally:
        for proc in fio_runs:
            stop_proc(proc)
    print(f"seed {seed}: {victim} killed at {st['sync']}")

    settle_and_checkpoint(pair)
    assert s.status()["failover_ready"] is True, diag(pair)
    pimg, simg = read_all(pair.pimgs["disk0"]), read_all(pair.simgs["disk0"])
    assert_same(simg, pimg, f"seed {seed} ({victim} killed): secondary vs primary", pair)
    # Outside fio's region both hold exactly what was written.
    assert_same(pimg[:FIO_AT], bytes(expected[:FIO_AT]), "primary below fio's region", pair)
    assert_same(pimg[FIO_AT + FIO_LEN:], bytes(expected[FIO_AT + FIO_LEN:]),
                "primary above fio's region", pair)
    assert_same(read_all(p.file("disk0")), pimg, "primary view vs image", pair)
    assert_same(read_all(s.file("disk0")), simg, "secondary view vs image", pair)
    no_traceback(pair)


# -- 2. failover in the middle of a resync --------------------------------------------
DISK2 = 64 * MiB


@pytest.mark.parametrize("protocol,seed", both(range(3), range(1)))
def test_failover_in_the_middle_of_a_resync_gives_the_checkpoint(pair, seed):
    """Checkpoint; the secondary VM writes; the primary is disconnected,
    writes 26 MiB, and `replfs connect` starts a slow resync (4 MiB/s) that
    lands on the secondary's disk; at a seeded moment of it the primary is
    killed and `replfs failover` runs on the secondary: its image is exactly
    the checkpoint plus the secondary VM's writes, nothing of the resync."""
    rng = random.Random(1000 + seed)
    port = _proc.free_port()
    pair.images({"disk0": DISK2})
    pair.start_secondary(listen=addr(port))
    pair.start_primary("--reconnect-interval", "0.5", "--resync-rate", "4M",
                       secondary=addr(port))
    p, s = pair.primary, pair.secondary
    pimg_path, simg_path = pair.pimgs["disk0"], pair.simgs["disk0"]
    pwrite(p.file("disk0"), 0, fill(PRIMARY, 8 * MiB), fsync=True)
    pair.checkpoint()
    checkpoint = read_all(simg_path)
    assert_same(checkpoint, read_all(pimg_path), "checkpoint: secondary vs primary", pair)

    # The secondary VM's writes: some where the resync will copy, some not.
    expected = bytearray(checkpoint)
    vm_writes = [(rng.randrange(0, 8) * MiB, MiB), (rng.randrange(16, 40) * MiB, MiB // 2),
                 (rng.randrange(48, 63) * MiB + CLUSTER, 3 * CLUSTER)]
    for off, n in vm_writes:
        pwrite(s.file("disk0"), off, fill(SECONDARY_VM, n))
        expected[off:off + n] = fill(SECONDARY_VM, n)

    replfs_cmd("disconnect", p.path)
    until(lambda: state(p) == "degraded" and not s.status()["peer_connected"],
          "the disconnect", pair)
    # The primary's writes after the checkpoint, all missed by the secondary.
    fd = os.open(p.file("disk0"), os.O_WRONLY)
    try:
        os.pwrite(fd, fill(0x44, 2 * MiB), 4 * MiB)  # over the checkpoint's 0x22
        for chunk in range(16, 40):
            os.pwrite(fd, fill(PRIMARY), chunk * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    r = replfs_cmd("connect", p.path)
    assert "done" in r.stdout, r.stdout + r.stderr
    until(lambda: s.status()["state"] == "syncing", "the secondary to sync", pair, 10)
    time.sleep(rng.uniform(0.1, 2.0))
    st = p.status()
    assert st["state"] == "syncing" and st["sync"]["sent_bytes"] > 0, diag(pair)
    assert s.status()["failover_ready"] is True, diag(pair)
    # The resync's data is on the secondary's disk (the old data in hidden).
    assert read_all(simg_path) != checkpoint
    kill9(p, pair)
    until(lambda: not s.status()["peer_connected"], "the secondary to notice", pair, 10)
    assert s.status()["state"] == "replicating", diag(pair)
    r = replfs_cmd("failover", s.path)
    assert "failed-over" in r.stdout, r.stdout + r.stderr
    assert s.status()["state"] == "failed-over"
    assert_same(read_all(simg_path), bytes(expected),
                f"seed {seed}: secondary image after failover vs checkpoint + VM writes", pair)
    assert_same(read_all(s.file("disk0")), bytes(expected), "secondary view", pair)
    no_traceback(pair)


# -- 3. kill -9 of the secondary during a failover's commit ---------------------------
DISK3 = 288 * MiB
HIDDEN = 256 * MiB          # what the primary rewrites after the checkpoint
VM3 = [(8 * MiB, MiB), (100 * MiB, 4 * MiB), (128 * MiB, 32 * MiB), (270 * MiB, MiB)]
FAILOVER_PRIMARY_ARGS = ("--reconnect-interval", "0.5")
#: The fault layer under the secondary's image holds every write to the VM's
#: last run (which only the active commit writes) for 2 s: a failover's commit
#: then stops with hidden committed and the VM's other runs committed.
SLOW_COMMIT_ARGS = ("--inject-faults", "write:delay=2@270M-271M")
RESUMING = "resuming the failover a crash interrupted"


def start_secondary_default_workdir(pair: Pair, port: int, *extra):
    """The secondary without --workdir: its workdir is IMAGE.replfs-work, the
    same at every start, so a restart finds what a crash left."""
    m = pair._mount("secondary", ["--listen", addr(port),
                                  "--disk", f"disk0={pair.simgs['disk0']}", *extra])
    pair.secondary = m
    return m


def prepare_commit(pair: Pair, port: int, primary_args, secondary_args=()):
    """Checkpoint, then the primary rewrites 256 MiB (hidden holds 256 MiB of
    the checkpoint) and the secondary VM writes 38 MiB (active); the primary
    is killed.  Returns (the checkpoint, the secondary image now, what a
    failover must give)."""
    pair.images({"disk0": DISK3})
    start_secondary_default_workdir(pair, port, *secondary_args)
    pair.start_primary(*primary_args, secondary=addr(port))
    p, s = pair.primary, pair.secondary
    pwrite(p.file("disk0"), HIDDEN, fill(PRIMARY, 8 * MiB), fsync=True)
    pair.checkpoint()
    checkpoint = read_all(pair.simgs["disk0"])
    fd = os.open(p.file("disk0"), os.O_WRONLY)
    try:
        for off in range(0, HIDDEN, 4 * MiB):
            os.pwrite(fd, fill(0x44, 4 * MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    pair.settle()  # checkpoint mode: the secondary has it all (hidden full)
    expected = bytearray(checkpoint)
    for off, n in VM3:
        pwrite(s.file("disk0"), off, fill(SECONDARY_VM, n))
        expected[off:off + n] = fill(SECONDARY_VM, n)
    d = s.status()["disks"]["disk0"]
    assert d["hidden_bytes"] == HIDDEN and d["active_bytes"] == sum(n for _, n in VM3), d
    kill9(p, pair)
    until(lambda: not s.status()["peer_connected"], "the secondary to notice", pair, 10)
    return checkpoint, read_all(pair.simgs["disk0"]), bytes(expected)


def saved_bits(workdir: str) -> int:
    """How many of the failover's saved bitmaps are in the workdir."""
    try:
        return sum(f.endswith(".bits") for f in os.listdir(workdir))
    except FileNotFoundError:
        return 0


def start_failover(s):
    """`replfs failover MOUNT` in the background."""
    return subprocess.Popen([sys.executable, "-m", "replfs", "failover", s.path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)


def watch_commit(proc, workdir: str, timeout: float = 30.0) -> float | None:
    """Waits until the failover saved both overlays' bitmaps (its commit
    starts right after); returns that moment, or None if the failover
    finished before it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if saved_bits(workdir) == 2:
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.001)
    raise AssertionError(f"the failover saved no overlays within {timeout:g} s")


@pytest.fixture(scope="module")
def commit_window(tmp_path_factory):
    """Measured once: the seconds from the saved bitmaps' appearance (the
    commit starts) to their removal (it is done), in an uninterrupted
    failover of the same set-up; that failover gives the expected image."""
    reason = have_fuse()
    if reason:
        pytest.skip(reason)
    pair = Pair(tmp_path_factory.mktemp("calibrate"))
    try:
        _, _, expected = prepare_commit(pair, _proc.free_port(), FAILOVER_PRIMARY_ARGS)
        s = pair.secondary
        workdir = s.status()["workdir"]
        t0 = time.monotonic()
        proc = start_failover(s)
        t_bits = watch_commit(proc, workdir)
        deadline = time.monotonic() + 30
        while saved_bits(workdir) and time.monotonic() < deadline:
            time.sleep(0.001)
        t_done = time.monotonic()
        assert saved_bits(workdir) == 0, "the commit did not end within 30 s"
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert t_bits is not None, "the saved bitmaps were never seen"
        assert_same(read_all(pair.simgs["disk0"]), expected, "uninterrupted failover", pair)
        window = t_done - t_bits
        print(f"failover: {t_bits - t0:.3f} s to save the overlays, commit {window:.3f} s")
        yield max(window, 0.02)
    finally:
        pair.close()
        for m in pair.mounts:
            assert not _proc.mounted(m.path) and not m.alive()
        for img in (*pair.pimgs.values(), *pair.simgs.values()):
            os.unlink(img)


def daemon_of(cli) -> int | None:
    """The daemon a background `replfs secondary` command started (its child)."""
    try:
        with open(f"/proc/{cli.pid}/task/{cli.pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None


def crash_the_resumed_commit(pair: Pair, port: int, rng, sargs) -> None:
    """Restarts the secondary and SIGKILLs it again in the middle of the
    commit it resumes (held 2 s by the fault layer); its mount never came."""
    s = pair.secondary
    argv = [sys.executable, "-m", "replfs", "secondary", s.path, "--listen", addr(port),
            "--disk", f"disk0={pair.simgs['disk0']}", *sargs, "--log", s.log]
    cli = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True)
    try:
        pid = until(lambda: daemon_of(cli), "the restarted daemon", pair, 10)
        until(lambda: s.log_text().count(RESUMING) == 1, "the commit to resume", pair, 10)
        time.sleep(0.5 + rng.uniform(0, 0.5))  # the hidden commit, then the held write
        assert _proc.alive(pid) and not _proc.mounted(s.path), s.log_text()[-3000:]
        os.kill(pid, signal.SIGKILL)
        assert _proc.wait_gone(pid, 10)
        out, _ = cli.communicate(timeout=30)
        assert cli.returncode != 0 and "before the mount was ready" in out, out
    finally:
        stop_proc(cli)


@pytest.mark.parametrize("protocol,seed", both(range(5), (0, 3)))
def test_kill9_of_the_secondary_during_the_failover_commit(pair, commit_window, seed):
    """256 MiB in hidden, 38 MiB in active, the primary dead: `replfs
    failover` on the secondary, and kill -9 of the secondary in its commit,
    then a restart with the same arguments.

    Seeds 0-2 kill at seeded moments spread over the measured commit time
    (from the overlays' saved bitmaps appearing).  Seeds 3-4 hold the
    commit's last write for 2 s (fault layer) and kill while the image is
    half committed (hidden and the VM's first runs in, its last run not),
    checked before the kill; seed 4 also kills the restarted daemon in the
    middle of the commit it resumed.

    Restarted, the secondary is "failed-over" with exactly the checkpoint
    plus the VM's writes, or - killed before the commit began - refuses the
    failover with the reason over the untouched disk; never "failed-over"
    over a half-committed image.  A second failover is a no-op; the old
    primary restarted with the same arguments is refused (split brain: exit
    78, or with --allow-degraded-start degraded with that reason) and the
    secondary image, with the VM's writes after the failover, is unchanged."""
    rng = random.Random(2000 + seed)
    slow = seed >= 3
    sargs = SLOW_COMMIT_ARGS if slow else ()
    degraded_start = seed % 2 == 1
    pargs = FAILOVER_PRIMARY_ARGS + (("--allow-degraded-start",) if degraded_start else ())
    port = _proc.free_port()
    checkpoint, before, expected = prepare_commit(pair, port, pargs, sargs)
    s = pair.secondary
    simg = pair.simgs["disk0"]
    workdir = s.status()["workdir"]
    assert workdir == simg + ".replfs-work"

    proc = start_failover(s)
    try:
        t_bits = watch_commit(proc, workdir)
        if slow:
            assert t_bits is not None
            # Hidden and the VM's runs up to 160M are in; the last is held.
            until(lambda: pread(simg, 159 * MiB, MiB) == fill(SECONDARY_VM),
                  "the commit to reach the held write", pair, 10)
            time.sleep(rng.uniform(0, 0.5))
            assert pread(simg, 0, MiB) == checkpoint[:MiB]
            assert pread(simg, 270 * MiB, MiB) == checkpoint[270 * MiB:271 * MiB]
            when = "with the image half committed"
        else:
            delay = commit_window * (seed + rng.random()) / 3
            if t_bits is not None:
                time.sleep(max(0.0, t_bits + delay - time.monotonic()))
            when = f"{delay:.3f} s into the commit (measured: {commit_window:.3f} s)"
        kill9(s, pair)
        out, _ = proc.communicate(timeout=30)
    finally:
        stop_proc(proc)
    if slow:  # killed in the middle: the command did not report a failover
        assert "done" not in out, out
    if seed == 4:
        crash_the_resumed_commit(pair, port, rng, sargs)
    s = start_secondary_default_workdir(pair, port, *sargs)
    st = s.status()
    resumed = s.log_text().count(RESUMING)
    if st["state"] == "failed-over":
        outcome = f"failed-over, commit resumed {resumed} times"
        assert_same(read_all(simg), expected, f"seed {seed}, killed {when}: image after "
                    f"the restart", pair)
        assert saved_bits(workdir) == 0
    else:
        # Killed before the commit began: the disk is untouched and the
        # failover is refused, with the reason.
        outcome = "refused"
        assert not slow and resumed == 0, diag(pair)
        assert st["state"] == "inconsistent" and st["failover_ready"] is False, diag(pair)
        assert_same(read_all(simg), before, f"seed {seed}: refused, disk untouched", pair)
        r = replfs_cmd("failover", s.path, check=False)
        assert r.returncode == 1 and "cannot give back the last checkpoint" in r.stderr, \
            r.stdout + r.stderr
        assert state(s) == "inconsistent"
        assert_same(read_all(simg), before, "after the refused failover", pair)
        replfs_cmd("failover", s.path, "--force")
        expected = before  # the disk as it is
    if slow:
        assert resumed == (2 if seed == 4 else 1), s.log_text()[-3000:]
    print(f"seed {seed}: killed {when}: {outcome}")
    assert state(s) == "failed-over"
    assert_same(read_all(s.file("disk0")), expected, "secondary view", pair)

    # A second failover is a no-op.
    r = replfs_cmd("failover", s.path)
    assert "failed-over" in r.stdout
    assert_same(read_all(simg), expected, "after a second failover", pair)
    # The VM goes on, now on the image itself.
    pwrite(s.file("disk0"), 200 * MiB, fill(SECONDARY_VM, 2 * MiB), fsync=True)
    expected = expected[:200 * MiB] + fill(SECONDARY_VM, 2 * MiB) + expected[202 * MiB:]
    assert_same(read_all(simg), expected, "VM writes after the failover", pair)

    # The old primary, restarted with the same arguments: split brain.
    if degraded_start:
        p = pair.start_primary(*pargs, secondary=addr(port))
        st = p.status()
        assert st["state"] == "degraded" and "split brain" in (st["last_error"] or ""), \
            diag(pair)
        pwrite(p.file("disk0"), 200 * MiB, fill(PRIMARY, 4 * MiB), fsync=True)
        until(lambda: p.status()["reconnect"] == "off", "the primary to stop retrying",
              pair, 10)
        assert state(p) == "degraded" and "split brain" in p.status()["last_error"]
    else:
        mnt = pair.tmp / "mnt-primary"
        r = replfs_cmd("primary", mnt, "--secondary", addr(port), "--disk",
                       f"disk0={pair.pimgs['disk0']}", *pargs, "--log",
                       pair.tmp / "primary.log", check=False)
        assert r.returncode == 78 and "split brain" in r.stderr, r.stdout + r.stderr
        assert not _proc.mounted(mnt)
    assert state(s) == "failed-over"
    assert_same(read_all(simg), expected, "secondary image after the old primary came back",
                pair)
    assert_same(read_all(s.file("disk0")), expected, "secondary view at the end", pair)
    no_traceback(pair)
    pair.close()
    for img in (*pair.pimgs.values(), *pair.simgs.values()):
        os.unlink(img)
