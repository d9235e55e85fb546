"""The checkpoint write protocol end to end: real daemons through the CLI,
real mounts, NBD over 127.0.0.1 (through tests/faultproxy.py where the link
must stall).  Pattern bytes: 0x11 base, 0x22 primary VM, 0x33 secondary VM."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time

import pytest

from tests import _proc
from tests.conftest import BASE, MiB, PRIMARY, SECONDARY_VM, pread, pwrite, read_all, replfs_cmd
from tests.faultproxy import FaultProxy
from tests.integration.test_replication import fill

pytestmark = pytest.mark.integration


@pytest.fixture
def protocol() -> str:
    return "checkpoint"


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_checkpoint_mode_replicates_and_pair_checkpoint_gives_equal_images(pair):
    pair.start({"a": 8 * MiB, "b": 4 * MiB})
    p, s = pair.primary, pair.secondary
    st = p.status()
    assert st["protocol"] == "checkpoint" and st["state"] == "replicating"
    assert s.status()["protocol"] == "checkpoint"
    rng = random.Random(3)
    for _ in range(50):
        name = rng.choice("ab")
        size = 8 * MiB if name == "a" else 4 * MiB
        pwrite(p.file(name), rng.randrange(0, size - 8192) & ~511, fill(PRIMARY, 8192))
    pwrite(s.file("a"), 0, fill(SECONDARY_VM, 4096))
    # The secondary alone refuses: it cannot know what is still queued.
    r = replfs_cmd("checkpoint", s.path, check=False)
    assert r.returncode == 1 and "--pair" in r.stderr and "queued" in r.stderr, r.stderr
    r = replfs_cmd("checkpoint", p.path, "--pair")
    assert "done" in r.stdout
    for name in ("a", "b"):
        assert read_all(pair.simgs[name]) == read_all(pair.pimgs[name])
        assert read_all(s.file(name)) == read_all(pair.pimgs[name])
    st = p.status()
    assert st["lag_bytes"] == 0 and st["last_checkpoint_drain_s"] is not None
    assert st["checkpoints"] == 1 and s.status()["checkpoints"] == 1
    assert st["state"] == "replicating" and st["last_error"] is None


def test_max_lag_back_pressure_on_a_stalled_link_keeps_memory_flat(pair):
    proxy = FaultProxy(("127.0.0.1", 0))
    try:
        port = _proc.free_port()
        proxy.upstream = ("127.0.0.1", port)
        pair.images({"disk0": 256 * MiB})
        pair.start_secondary(listen=f"127.0.0.1:{port}")
        p = pair.start_primary("--max-lag", "8M", "--timeout", "60",
                               secondary=f"127.0.0.1:{proxy.port}")
        s = pair.secondary
        proxy.stall()
        done: list[int] = []

        def writer():
            fd = os.open(p.file("disk0"), os.O_WRONLY)
            try:
                for i in range(200):  # 200 MiB: far beyond max-lag
                    os.pwrite(fd, fill(PRIMARY), i * MiB)
                    done.append(i)
            finally:
                os.close(fd)

        t = threading.Thread(target=writer)
        t.start()
        try:
            time.sleep(2.0)
            st = p.status()
            # the writes wait at max-lag: lag, not divergence; memory flat
            assert 4 <= len(done) <= 12, len(done)
            assert st["state"] == "replicating" and 8 * MiB <= st["lag_bytes"] <= 10 * MiB, st
            assert rss_kib(p.pid) < 100 * 1024
            proxy.resume()
            t.join(60)
            assert not t.is_alive() and len(done) == 200
        finally:
            proxy.resume()
            t.join(60)
        assert rss_kib(p.pid) < 100 * 1024 and rss_kib(s.pid) < 100 * 1024
        pair.checkpoint()
        assert read_all(pair.simgs["disk0"]) == read_all(pair.pimgs["disk0"])
        assert p.status()["state"] == "replicating" and p.status()["last_error"] is None
    finally:
        pair.close()
        proxy.close()


@pytest.mark.parametrize("mode", ["sync", "checkpoint"])
def test_qemu_nbd_secondary_pair_refused_and_sync_unchanged(pair, require_tool, mode):
    require_tool("qemu-nbd")
    pair.protocol = mode
    size = 8 * MiB
    pair.images({"disk0": size})
    port = _proc.free_port()
    argv = ["qemu-nbd", "--persistent", "--shared=4", "-f", "raw", "-x", "disk0",
            "-b", "127.0.0.1", "-p", str(port), pair.simgs["disk0"]]
    with open(pair.tmp / "qemu-nbd.log", "ab") as log:
        nbd = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    try:
        _proc.wait_port(port, nbd)
        p = pair.start_primary(secondary=f"127.0.0.1:{port}")
        assert p.status()["generation_check"].startswith("skipped")
        pwrite(p.file("disk0"), MiB, fill(PRIMARY), fsync=True)
        if mode == "sync":  # as today: the write is on both sides when it returns
            assert pread(pair.simgs["disk0"], MiB, MiB) == fill(PRIMARY)
        r = replfs_cmd("checkpoint", p.path, "--pair", check=False)
        assert r.returncode == 1 and "plain NBD" in r.stderr, r.stderr
        replfs_cmd("checkpoint", p.path)  # the flush barrier (checkpoint mode: the drain)
        assert read_all(pair.simgs["disk0"]) == read_all(pair.pimgs["disk0"])
        assert pread(pair.simgs["disk0"], 0, MiB) == fill(BASE)
        assert p.status()["state"] == "replicating"
        pair.primary.unmount()
    finally:
        nbd.kill()
        nbd.wait(10)
