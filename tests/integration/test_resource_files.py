"""One file per pair, for real: ``replfs up``/``down``/``status`` on one machine,
the two hosts of ONE resource file picked with ``--host`` (both on 127.0.0.1,
different ports and mounts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests import _proc
from tests.conftest import BASE, PRIMARY, MiB, have_fuse, make_image, pread, pwrite

pytestmark = pytest.mark.integration

SIZE = 4 * MiB
OFF = MiB + 4096


def replfs(*argv, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "replfs", *map(str, argv)],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def ok(*argv, env=None) -> subprocess.CompletedProcess:
    r = replfs(*argv, env=env)
    assert r.returncode == 0, (argv, r.returncode, r.stdout, r.stderr)
    return r


RESOURCE = """\
[resource]
name = "t"
timeout = 5

[[disk]]
name = "disk0"
[disk.image]
alpha = "p.img"
beta = "s.img"

[host.alpha]
role = "primary"
address = "127.0.0.1:{pport}"
mount = "mnt-alpha"
log = "alpha.log"

[host.beta]
role = "secondary"
address = "127.0.0.1:{sport}"
mount = "mnt-beta"
workdir = "work"
log = "beta.log"
"""


@pytest.fixture
def res(tmp_path):
    """The resource file ``t.toml`` with its images; at teardown nothing of it
    may be left mounted or running (and is cleaned up if it is)."""
    reason = have_fuse()
    if reason:
        pytest.skip(reason)
    make_image(tmp_path / "p.img", SIZE)
    make_image(tmp_path / "s.img", SIZE)
    path = tmp_path / "t.toml"
    path.write_text(RESOURCE.format(pport=_proc.free_port(), sport=_proc.free_port()))
    pids: list[int] = []
    try:
        yield path, pids
    finally:
        mounts = [tmp_path / "mnt-alpha", tmp_path / "mnt-beta"]
        left = [str(m) for m in mounts if _proc.mounted(m)]
        running = [p for p in pids if _proc.alive(p)]
        for m in mounts:
            _proc.unmount(m)
        for pid in running:
            _proc.stop_pid(pid)
        assert not left, f"left mounted: {left}"
        assert not running, f"left running: {running}"


def our_lines(text: str, tmp_path) -> list[str]:
    return [line for line in text.splitlines() if str(tmp_path) in line]


def test_up_replicate_status_down(res, tmp_path):
    path, pids = res
    alpha, beta = tmp_path / "mnt-alpha", tmp_path / "mnt-beta"
    # The secondary first; `up` creates the mount points.
    r = ok("--host", "beta", "up", path)
    assert f"secondary mounted on {beta}" in r.stdout
    r = ok("up", path, "--host", "alpha")
    assert f"primary mounted on {alpha}" in r.stdout
    for m in (alpha, beta):
        assert _proc.mounted(m)
        pids.append(int(replfs("status", m, "--json").stdout.split('"pid": ')[1].split(",")[0]))

    pwrite(alpha / "disk0", OFF, bytes([PRIMARY]) * 8192, fsync=True)
    ok("checkpoint", alpha)
    ok("checkpoint", beta)
    assert pread(beta / "disk0", OFF, 8192) == bytes([PRIMARY]) * 8192
    assert pread(beta / "disk0", 0, 4096) == bytes([BASE]) * 4096

    # `status` with no argument lists both mounts (and maybe others' on this machine).
    r = replfs("status")
    ours = our_lines(r.stdout, tmp_path)
    assert any(line.startswith(f"primary {alpha}: replicating, peer connected")
               for line in ours), r.stdout
    assert any(line.startswith(f"secondary {beta}: replicating, peer connected")
               for line in ours), r.stdout
    assert not [line for line in ours if "not answering" in line]
    # `status RES`: this host's mount only; a bare name is found in $REPLFS_CONFIG_DIR.
    r = ok("status", "t", "--host", "beta", env={"REPLFS_CONFIG_DIR": str(tmp_path)})
    assert r.stdout.startswith(f"secondary {beta}: replicating")
    assert f"primary {alpha}" not in r.stdout

    # A second `up` is refused by the CLI's own check.
    r = replfs("--host", "alpha", "up", path)
    assert r.returncode == 2 and "already mounted" in r.stderr, r

    # Down: the primary first, then the secondary; each daemon exits.
    r = ok("--host", "alpha", "down", path)
    assert r.stdout.strip() == f"replfs: t: primary down on alpha ({alpha})"
    assert not _proc.mounted(alpha) and not _proc.alive(pids[0])
    r = ok("--host", "beta", "down", path)
    assert r.stdout.strip() == f"replfs: t: secondary down on beta ({beta})"
    assert not _proc.mounted(beta) and not _proc.alive(pids[1])
    assert not our_lines(replfs("status").stdout, tmp_path)
    # The primary's write is on the secondary's image, for good.
    assert pread(tmp_path / "s.img", OFF, 8192) == bytes([PRIMARY]) * 8192

    # Down again: quiet success.  Status of a resource that is down: exit 1.
    r = ok("--host", "beta", "down", path)
    assert "not up on beta" in r.stdout and not r.stderr
    r = replfs("status", path, "--host", "alpha")
    assert r.returncode == 1 and r.stderr.strip() == (
        f"replfs: t: not up on alpha (nothing mounted on {alpha})")

    # Up again from the same file: the pair comes back and replicates.
    ok("--host", "beta", "up", path)
    ok("--host", "alpha", "up", path)
    pids.extend(int(replfs("status", m, "--json").stdout.split('"pid": ')[1].split(",")[0])
                for m in (alpha, beta))
    assert pread(alpha / "disk0", OFF, 8192) == bytes([PRIMARY]) * 8192
    ok("--host", "beta", "down", path)  # the secondary first, this time
    ok("--host", "alpha", "down", path)
    assert not _proc.mounted(alpha) and not _proc.mounted(beta)


def test_down_of_a_busy_mount_fails_and_says_why(res, tmp_path):
    path, pids = res
    ok("--host", "beta", "up", path)
    beta = tmp_path / "mnt-beta"
    pids.append(int(replfs("status", beta, "--json").stdout.split('"pid": ')[1].split(",")[0]))
    with open(beta / "disk0", "rb"):  # a VM holds its disk open
        r = replfs("--host", "beta", "down", path)
        assert r.returncode == 1, r
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith(f"replfs: {beta}: cannot unmount"), r.stderr
        assert _proc.mounted(beta) and _proc.alive(pids[0])
    ok("--host", "beta", "down", path)
    assert not _proc.mounted(beta) and _proc.wait_gone(pids[0], 10)


def test_bad_files(tmp_path):
    (tmp_path / "bad.toml").write_text('[resource]\ntimeout = "soon"\n[[disk]]\n[host.a]\n')
    r = replfs("--host", "alpha", "up", tmp_path / "bad.toml")
    assert r.returncode == 2
    assert r.stderr == (f"replfs: {tmp_path}/bad.toml:2: resource.timeout: expected a "
                        f"number of seconds, got 'soon'\n")
    (tmp_path / "syntax.toml").write_text('[resource]\nname = "x"\n[host.a\n')
    r = replfs("down", tmp_path / "syntax.toml")
    assert r.returncode == 2
    assert r.stderr.startswith(f"replfs: {tmp_path}/syntax.toml:3: ") and \
        r.stderr.count("\n") == 1
    r = replfs("up", "missing", env={"REPLFS_CONFIG_DIR": str(tmp_path)})
    assert r.returncode == 2 and r.stderr.startswith(
        f"replfs: {tmp_path}/missing.toml: No such file or directory"), r.stderr
    # A good file whose image is missing: the mount command's own check, exit 2,
    # and the mount point `up` created is removed again.
    (tmp_path / "t.toml").write_text(RESOURCE.format(pport=1, sport=2))
    r = replfs("--host", "beta", "up", tmp_path / "t.toml")
    assert r.returncode == 2 and r.stderr == (
        f"replfs: image {tmp_path}/s.img: No such file or directory\n")
    assert not (tmp_path / "mnt-beta").exists()


def test_tls_and_allow_from_the_file(res, tmp_path):
    """The [tls] table and a host's `allow` reach the mount commands: the pair
    replicates over TLS, the secondary admitting only 127.0.0.1."""
    from tests import tlscerts

    if not tlscerts.have_openssl():
        pytest.skip("no openssl")
    path, pids = res
    tlscerts.make_tls_dir(tmp_path / "tls")
    text = path.read_text().replace("[[disk]]", '[tls]\ndir = "tls"\n\n[[disk]]', 1)
    path.write_text(text.replace('workdir = "work"', 'workdir = "work"\nallow = ["127.0.0.1/32"]'))
    r = ok("--dry-run", "--host", "beta", "up", path)
    assert f"--allow 127.0.0.1/32 --tls-dir {tmp_path}/tls" in r.stdout
    alpha, beta = tmp_path / "mnt-alpha", tmp_path / "mnt-beta"
    ok("--host", "beta", "up", path)
    pids.append(int(replfs("status", beta, "--json").stdout.split('"pid": ')[1].split(",")[0]))
    ok("--host", "alpha", "up", path)
    pids.append(int(replfs("status", alpha, "--json").stdout.split('"pid": ')[1].split(",")[0]))
    pwrite(alpha / "disk0", OFF, bytes([PRIMARY]) * 4096, fsync=True)
    ok("checkpoint", alpha)
    ok("checkpoint", beta)
    assert pread(beta / "disk0", OFF, 4096) == bytes([PRIMARY]) * 4096
    ok("--host", "alpha", "down", path)
    ok("--host", "beta", "down", path)
    assert not _proc.mounted(alpha) and not _proc.mounted(beta)
    assert _proc.wait_gone(pids[0], 10) and _proc.wait_gone(pids[1], 10)


@pytest.fixture
def replfs_on_system_path():
    """mount.fuse3 runs `replfs` with no PATH of ours (sh's default): where
    an operator's `pip install` puts it, /usr/local/bin.  Placed there for the
    test (a two-line script running this venv's replfs) unless one exists."""
    target = "/usr/local/bin/replfs"
    if os.path.lexists(target):
        yield
        return
    with open(target, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} -m replfs \"$@\"\n")
    os.chmod(target, 0o755)
    try:
        yield
    finally:
        os.unlink(target)


def test_mount_t_fuse_replfs(res, tmp_path, replfs_on_system_path):
    """The mount helper: `mount -t fuse.replfs RES MOUNT -o role=...,host=...`
    (mount(8) -> mount.fuse3 -> `replfs RES MOUNT -o ...`), as an fstab line
    with _netdev would; role= must agree with the file; umount works."""
    if not shutil.which("mount.fuse3"):
        pytest.skip("mount.fuse3 (package fuse3) is not installed")
    path, pids = res
    alpha, beta = tmp_path / "mnt-alpha", tmp_path / "mnt-beta"
    alpha.mkdir()
    beta.mkdir()

    def mount(*argv):
        return subprocess.run(["mount", *map(str, argv)], capture_output=True, text=True,
                              timeout=60)

    r = mount("-t", "fuse.replfs", path, beta, "-o", "role=primary,host=beta,_netdev")
    assert r.returncode != 0 and "not its primary" in r.stderr, r
    assert not _proc.mounted(beta)
    r = mount("-t", "fuse.replfs", path, beta, "-o", "role=secondary,host=beta,_netdev")
    assert r.returncode == 0, r.stderr
    r = mount("-t", "fuse.replfs", path, alpha, "-o", "role=primary,host=alpha,_netdev,nofail")
    assert r.returncode == 0, r.stderr
    for m in (alpha, beta):
        assert _proc.mounted(m)
        pids.append(int(replfs("status", m, "--json").stdout.split('"pid": ')[1].split(",")[0]))
    pwrite(alpha / "disk0", OFF, bytes([PRIMARY]) * 8192, fsync=True)
    ok("checkpoint", alpha)
    ok("checkpoint", beta)
    assert pread(beta / "disk0", OFF, 8192) == bytes([PRIMARY]) * 8192
    for m, pid in ((alpha, pids[0]), (beta, pids[1])):
        r = subprocess.run(["umount", str(m)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert _proc.wait_gone(pid, 20)
