"""`replfs verify` with real daemons: an equal pair exits 0; a cluster changed
behind replfs's back in the secondary's image (plain os.open/pwrite: the OFD
image locks are advisory) exits 1 naming that range; --repair exits 0 and
leaves the images equal byte for byte after a checkpoint; fio writing during
the verify raises no false alarm; against qemu-nbd (no control channel) the
verify reads the data over NBD.  Pattern bytes: 0x11 base, 0x22 primary,
0x33 a change nobody replicated."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import PRIMARY, MiB, pwrite, read_all, replfs_cmd

pytestmark = pytest.mark.integration

KiB = 1024
CL = 64 * KiB
BEHIND = 0x33


def poke(path: str, offset: int, data: bytes) -> None:
    """Change an image behind replfs's back (and past the page cache's doubt)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def ranges(stdout: str) -> list[tuple[str, int, int]]:
    """The ``DISK START LENGTH`` lines of `replfs verify`."""
    out = []
    for line in stdout.splitlines():
        if not line.startswith("replfs:"):
            disk, start, length = line.split()
            out.append((disk, int(start), int(length)))
    return out


def test_an_equal_pair_exits_0(pair):
    pair.start({"disk0": 16 * MiB, "disk1": 4 * MiB})
    pwrite(pair.primary.file("disk0"), 3 * MiB, bytes([PRIMARY]) * MiB, fsync=True)
    r = replfs_cmd("verify", pair.primary.path, check=False)
    assert r.returncode == 0, r
    assert ranges(r.stdout) == [] and "0 differing ranges" in r.stdout, r.stdout
    v = pair.primary.status()["verify"]
    assert v["state"] == "done" and v["method"] == "digests", v
    assert v["checked_bytes"] == v["total_bytes"] == 20 * MiB
    assert pair.primary.status()["state"] == "replicating"
    assert "verify done" in replfs_cmd("status", pair.primary.path).stdout


def test_a_changed_cluster_is_named_and_repair_makes_the_images_equal(pair):
    pair.start({"disk0": 16 * MiB})
    simg, pimg = pair.simgs["disk0"], pair.pimgs["disk0"]
    pwrite(pair.primary.file("disk0"), 0, bytes([PRIMARY]) * MiB, fsync=True)
    poke(simg, 5 * MiB + 100, bytes([BEHIND]) * 10)              # inside one cluster
    poke(simg, 9 * MiB - 10, bytes([BEHIND]) * 20)               # across two clusters
    r = replfs_cmd("verify", pair.primary.path, check=False)
    assert r.returncode == 1, r
    want = [("disk0", 5 * MiB, CL), ("disk0", 9 * MiB - CL, 2 * CL)]
    assert ranges(r.stdout) == want, r.stdout
    assert "2 differing ranges" in r.stdout
    assert read_all(simg) != read_all(pimg)  # a plain verify changes nothing

    r = replfs_cmd("verify", pair.primary.path, "--repair", "--rate", "64M", check=False)
    assert r.returncode == 0, r
    assert ranges(r.stdout) == want and "repaired" in r.stdout, r.stdout
    v = pair.primary.status()["verify"]
    assert v["repaired"] is True and v["repaired_bytes"] == 3 * CL and v["rate_limit"] == 64 * MiB
    pair.checkpoint()
    assert read_all(simg) == read_all(pimg)
    assert replfs_cmd("verify", pair.primary.path, check=False).returncode == 0


@pytest.mark.parametrize("seed", range(3))
def test_fio_writing_during_the_verify_raises_no_false_alarm(pair, require_tool, tmp_path,
                                                             seed):
    """fio's 4 KiB random writes over the whole disk while several verifies
    (rate-capped so that they overlap many writes) walk it: every one exits
    0; once fio is done and a checkpoint ran, the images are equal."""
    require_tool("fio")
    rng = random.Random(seed)
    size = 64 * MiB
    pair.start({"disk0": size})
    with open(tmp_path / "fio.log", "wb") as log:  # fio has its own copy of the fd
        fio = subprocess.Popen(
            ["fio", f"--name=v{seed}", f"--filename={pair.primary.file('disk0')}",
             "--rw=randwrite", "--bs=4k", f"--size={size}", "--ioengine=psync", "--direct=1",
             "--time_based", "--runtime=60", "--thread", "--allow_file_create=0",
             f"--randseed={seed + 1}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        before = pair.primary.status()["disks"]["disk0"]["writes"]
        for _ in range(100):
            if pair.primary.status()["disks"]["disk0"]["writes"] > before + 50:
                break
            time.sleep(0.05)
        assert fio.poll() is None, (tmp_path / "fio.log").read_text()
        rechecked = 0
        for _ in range(3):
            rate = rng.choice(["48M", "64M", "96M"])
            r = replfs_cmd("verify", pair.primary.path, "--rate", rate, check=False)
            assert r.returncode == 0, (r, pair.primary.status()["verify"])
            v = pair.primary.status()["verify"]
            assert v["differences"] == [] and v["state"] == "done"
            rechecked += v["rechecked_bytes"]
        writes = pair.primary.status()["disks"]["disk0"]["writes"]
        assert writes > before + 200, (before, writes)
        assert fio.poll() is None, (tmp_path / "fio.log").read_text()
    finally:
        if fio.poll() is None:
            fio.kill()
        fio.wait(timeout=10)
    pair.checkpoint()
    assert read_all(pair.simgs["disk0"]) == read_all(pair.pimgs["disk0"])
    print(f"seed {seed}: {rechecked // CL} clusters re-checked under the range lock")


def test_a_plain_nbd_secondary_is_verified_by_reading(pair, require_tool, external_server):
    require_tool("qemu-nbd")
    pair.images({"disk0": 16 * MiB})
    simg, pimg = pair.simgs["disk0"], pair.pimgs["disk0"]
    port = external_server(["qemu-nbd", "--persistent", "--shared=4", "-f", "raw",
                            "-x", "disk0", "-b", "127.0.0.1", "-p", "{port}", simg])
    p = pair.start_primary(secondary=f"127.0.0.1:{port}")
    assert p.status()["generation_check"].startswith("skipped")
    r = replfs_cmd("verify", p.path, check=False)
    assert r.returncode == 0, r
    assert p.status()["verify"]["method"] == "read" and "by reading" in r.stdout

    poke(simg, 7 * MiB + 1, bytes([BEHIND]))
    r = replfs_cmd("verify", p.path, check=False)
    assert r.returncode == 1 and ranges(r.stdout) == [("disk0", 7 * MiB, CL)], r
    r = replfs_cmd("verify", p.path, "--repair", check=False)
    assert r.returncode == 0, r
    p.action("checkpoint")  # NBD FLUSH to qemu-nbd
    assert read_all(simg) == read_all(pimg)
    assert replfs_cmd("verify", p.path, check=False).returncode == 0


def test_refusals_and_bad_input(pair):
    pair.start({"disk0": 4 * MiB})
    r = replfs_cmd("verify", pair.secondary.path, check=False)
    assert r.returncode == 1 and "run it on the primary" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("replfs: ")
    r = replfs_cmd("verify", pair.primary.path, "--rate", "fast", check=False)
    assert r.returncode == 2 and r.stderr.startswith("replfs: --rate"), r
    with pytest.raises(OSError):
        pair.primary.action("verify", b"sometimes\n")
    assert "verify: unknown value" in pair.primary.status()["action_error"]
    replfs_cmd("disconnect", pair.primary.path)
    r = replfs_cmd("verify", pair.primary.path, check=False)
    assert r.returncode == 1 and "no secondary" in r.stderr, r


def test_ctrl_c_cancels_the_verify(pair):
    """The control file's write blocks in the kernel until the daemon answers;
    Ctrl-C on `replfs verify` asks the daemon to cancel, which answers it."""
    pair.start({"disk0": 32 * MiB})
    proc = subprocess.Popen([sys.executable, "-m", "replfs", "verify", pair.primary.path,
                             "--rate", "8M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 10
        while (pair.primary.status().get("verify") or {}).get("state") != "running":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == 130 and "verify cancelled" in err, (proc.returncode, out, err)
    v = pair.primary.status()["verify"]
    assert v["state"] == "cancelled" and v["checked_bytes"] < v["total_bytes"], v
    assert pair.primary.status()["state"] == "replicating"
    assert replfs_cmd("verify", pair.primary.path, check=False).returncode == 0

    # the same from a shell: `echo rate=8M > MOUNT/.replfs/verify`, then SIGINT
    sh = subprocess.Popen(["sh", "-c", f"echo rate=8M > {pair.primary.ctl('verify')}"])
    try:
        deadline = time.monotonic() + 10
        while pair.primary.status()["verify"]["state"] != "running":
            assert time.monotonic() < deadline and sh.poll() is None
            time.sleep(0.05)
        sh.send_signal(signal.SIGINT)
        assert sh.wait(timeout=10) != 0
    finally:
        if sh.poll() is None:
            sh.kill()
            sh.wait(timeout=10)
    assert pair.primary.status()["verify"]["state"] == "cancelled"
