"""Exclusive images, QEMU's way (replfs/core/imagelock.py): a served image is
refused to QEMU's writers and to a second replfs, and replfs refuses an image
that QEMU (here qemu-nbd) writes."""

from __future__ import annotations

import hashlib
import subprocess

import pytest

from tests._proc import free_port, stop_pid, wait_port
from tests.conftest import MiB, make_image, replfs_cmd

pytestmark = pytest.mark.integration


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_qemu_io_cannot_write_an_image_replfs_serves(pair, require_tool):
    require_tool("qemu-io")
    pair.images({"disk0": MiB})
    pair.start_secondary()
    img = pair.simgs["disk0"]
    before = digest(img)
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", img],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "lock" in (r.stdout + r.stderr), r
    assert digest(img) == before
    # reading is still allowed (a VM's disk can be inspected)
    r = subprocess.run(["qemu-img", "info", "-f", "raw", img], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr


def test_a_second_replfs_on_the_same_image_is_refused(pair, tmp_path):
    pair.images({"disk0": MiB})
    pair.start_secondary()
    img = pair.simgs["disk0"]
    m = tmp_path / "second"
    m.mkdir()
    r = replfs_cmd("secondary", m, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
                   "--workdir", tmp_path / "w2", check=False)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("replfs: "), r.stderr
    assert "another replfs daemon serves this image" in lines[0], lines[0]
    assert pair.secondary.status()["state"] == "replicating"  # the first is unharmed


def test_replfs_refuses_an_image_qemu_nbd_writes(tmp_path, require_tool):
    require_tool("qemu-nbd")
    img = make_image(tmp_path / "q.img", MiB)
    port = free_port()
    proc = subprocess.Popen(["qemu-nbd", "--persistent", "-f", "raw", "-x", "d", "-b",
                             "127.0.0.1", "-p", str(port), img],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        m = tmp_path / "m"
        m.mkdir()
        r = replfs_cmd("secondary", m, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
                       "--workdir", tmp_path / "w", check=False)
        assert r.returncode == 1, r
        assert "another program" in r.stderr and "write" in r.stderr, r.stderr
    finally:
        stop_pid(proc.pid)
        proc.wait(timeout=10)
