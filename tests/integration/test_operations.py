"""Operator-facing behaviour with real daemons: a hung daemon does not hang
`replfs status`; two secondaries cannot share a workdir's overlays; a stopped
degraded primary keeps why it degraded; an unresolvable --listen is bad input."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests import _proc
from tests.conftest import BASE, MiB, PRIMARY, pwrite, read_all, replfs_cmd

pytestmark = pytest.mark.integration



def test_status_gives_up_on_a_stopped_daemon(pair):
    pair.images({"disk0": MiB})
    s = pair.start_secondary()
    os.kill(s.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "replfs", "status", s.path, "--timeout", "1"],
                           capture_output=True, text=True, timeout=30)
        took = time.monotonic() - t0
    finally:
        os.kill(s.pid, signal.SIGCONT)
    assert r.returncode == 1, r
    assert r.stderr == f"replfs: {s.path}: the daemon did not answer within 1 s (stopped or hung?)\n"
    assert took < 10
    # and once it runs again, status answers
    r = replfs_cmd("status", s.path, "--timeout", "5")
    assert "replicating" in r.stdout or "secondary" in r.stdout


def test_status_timeout_must_be_positive(pair):
    r = replfs_cmd("status", "/", "--timeout", "0", check=False)
    assert r.returncode == 2 and "finite positive" in r.stderr


def test_a_second_secondary_on_the_same_workdir_and_disk_name_is_refused(pair, tmp_path):
    pair.start({"disk0": 4 * MiB})
    pwrite(pair.primary.file("disk0"), 0, bytes([PRIMARY]) * MiB, fsync=True)  # hidden now holds 0x11
    other_img = tmp_path / "other.img"
    other_img.write_bytes(b"\0" * 4 * MiB)
    mnt = tmp_path / "mnt-other"
    mnt.mkdir()
    r = replfs_cmd("secondary", mnt, "--listen", "127.0.0.1:0", "--workdir", tmp_path / "work",
                   "--disk", f"disk0={other_img}", "--log", tmp_path / "other.log", check=False)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("replfs: "), r.stderr
    assert f"pid {pair.secondary.pid}" in lines[0] and "--workdir" in lines[0], lines[0]
    assert not os.path.ismount(mnt)
    # the first secondary's hidden overlay is intact: failover gives back the
    # checkpoint (the base pattern), not zeros
    pair.primary.kill()
    pair.primary.wait_exit()
    pair.secondary.action("failover")
    assert read_all(pair.simgs["disk0"])[:MiB] == bytes([BASE]) * MiB


def test_stop_keeps_why_a_primary_degraded(pair):
    pair.start({"disk0": 4 * MiB})
    pair.secondary.kill()
    pair.secondary.wait_exit()
    pwrite(pair.primary.file("disk0"), 0, bytes([PRIMARY]) * 65536, fsync=True)
    st = pair.primary.status()
    assert st["state"] == "degraded"
    reason = st["last_error"]
    assert reason
    r = replfs_cmd("stop", pair.primary.path)
    assert "stopped" in r.stdout
    st = pair.primary.status()
    assert st["state"] == "stopped"
    assert st["last_error"] == reason
    assert st["disks"]["disk0"]["out_of_sync_bytes"] >= 65536


def test_an_unresolvable_listen_address_is_bad_input(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * MiB)
    (tmp_path / "m").mkdir()
    r = replfs_cmd("secondary", tmp_path / "m", "--listen", "nosuch.invalid:10809",
                   "--disk", f"d={img}", check=False)
    assert r.returncode == 2
    assert r.stderr.startswith("replfs: --listen nosuch.invalid:10809: cannot resolve")
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("seed", range(12))
def test_kill9_under_load_leaves_no_mount(pair, seed):
    """Seeded rounds: both CPUs busy (a spinning process per core) and the
    VM writing; a daemon is killed at a random moment; within 10 s its
    mount is gone without any command of ours."""
    rng = random.Random(seed)
    pair.start({"disk0": 8 * MiB}, primary_args=("--timeout", "1"))
    victim = pair.primary if rng.random() < 0.75 else pair.secondary
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 2)]
    stop = threading.Event()

    def writer() -> None:
        try:
            fd = os.open(pair.primary.file("disk0"), os.O_WRONLY)
        except OSError:
            return
        try:
            i = 0
            while not stop.is_set():
                os.pwrite(fd, bytes([PRIMARY]) * 65536, (i % 128) * 65536)
                if i % 8 == 0:
                    os.fsync(fd)
                i += 1
        except OSError:
            pass
        finally:
            try:
                os.close(fd)
            except OSError:
                pass

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(rng.uniform(0.05, 0.6))
        victim.kill(signal.SIGKILL)
        assert victim.wait_exit(15), f"daemon {victim.pid} survived SIGKILL"
        deadline = time.monotonic() + 10
        while _proc.mounted(victim.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _proc.mounted(victim.path), f"{victim.path} stays mounted 10 s after kill -9"
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        stop.set()
        t.join(timeout=30)


def test_two_disks_on_one_image_are_bad_input(tmp_path):
    img = tmp_path / "a.img"
    img.write_bytes(b"\0" * MiB)
    (tmp_path / "link.img").symlink_to(img)
    (tmp_path / "m").mkdir()
    for other in (img, tmp_path / "link.img"):
        r = replfs_cmd("secondary", tmp_path / "m", "--listen", "127.0.0.1:0",
                       "--disk", f"a={img}", "--disk", f"b={other}", check=False)
        assert r.returncode == 2, r
        assert r.stderr == f"replfs: --disk b={other}: disk 'a' serves the same image " \
                           f"(one image, one disk)\n"
    assert not _proc.mounted(tmp_path / "m")
