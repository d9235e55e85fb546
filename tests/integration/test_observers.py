"""Read-only observers of a secondary's export (replfs/nbd/server.py,
"Writers and read-only observers"): while the primary replicates, other NBD
clients read the secondary disk read-only; their writes fail with EPERM; the
primary, which identifies itself, is the only writer."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import threading

import pytest

from tests.conftest import BASE, MiB, pwrite, read_all

pytestmark = pytest.mark.integration

SIZE = 8 * MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def url(pair) -> str:
    return f"nbd://{pair.secondary.status()['listen']}/disk0"



def test_a_second_reader_reads_the_secondary_disk_while_the_primary_writes(pair, tmp_path,
                                                                           require_tool,
                                                                           tool_env):
    require_tool("qemu-img")
    pair.start({"disk0": SIZE})
    pfile = pair.primary.file("disk0")
    pwrite(pfile, 0, b"\x22" * MiB, fsync=True)
    pair.checkpoint()
    out = tmp_path / "copy.img"
    # While a writer keeps the primary busy, a whole-disk read through NBD
    # (qemu-img is the observer) equals what the secondary disk held: the
    # writes under way land in clusters the copy has already passed or has
    # not reached; both are the primary's bytes, pattern 0x22 or the base.
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(7)
        while not stop.is_set():
            off = rng.randrange(0, SIZE // 4096) * 4096
            pwrite(pfile, off, b"\x22" * 4096, fsync=True)

    t = threading.Thread(target=writer)
    t.start()
    try:
        r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url(pair), str(out)],
                           capture_output=True, text=True, timeout=60, env=tool_env)
    finally:
        stop.set()
        t.join()
    assert r.returncode == 0, r.stderr
    copied = read_all(out)
    assert len(copied) == SIZE
    assert copied[:MiB] == b"\x22" * MiB
    assert set(copied) <= {0x22, BASE}
    # the primary was never disturbed: still replicating, and after a
    # checkpoint the secondary disk equals the primary image byte for byte
    assert pair.primary.status()["state"] == "replicating"
    pair.checkpoint()
    assert sha(read_all(pair.pimgs["disk0"])) == sha(read_all(pair.simgs["disk0"]))
    # now nothing writes: a second copy is exact
    r = subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", url(pair), str(out)],
                       capture_output=True, text=True, timeout=60, env=tool_env)
    assert r.returncode == 0, r.stderr
    assert sha(read_all(out)) == sha(read_all(pair.simgs["disk0"]))


def test_an_observer_cannot_write(pair, require_tool, tool_env):
    require_tool("qemu-io")
    pair.start({"disk0": SIZE})
    before = sha(read_all(pair.simgs["disk0"]))
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", url(pair)],
                       capture_output=True, text=True, timeout=30, env=tool_env)
    # qemu reads NBD_FLAG_READ_ONLY and will not even open the export for
    # writing (libnbd's test below sends the write and gets EPERM)
    assert r.returncode != 0 and "Permission denied" in r.stdout + r.stderr, r
    assert sha(read_all(pair.simgs["disk0"])) == before
    assert pair.primary.status()["state"] == "replicating"
    # the primary's own writes still reach the secondary
    pwrite(pair.primary.file("disk0"), 0, b"\x22" * 4096, fsync=True)
    pair.checkpoint()
    assert read_all(pair.simgs["disk0"])[:4096] == b"\x22" * 4096


def test_libnbd_sees_read_only_on_go_and_writable_on_info(pair, tool_env):
    nbd = pytest.importorskip("nbd")
    pair.start({"disk0": SIZE})
    h = nbd.NBD()
    h.connect_uri(url(pair))
    assert h.is_read_only()
    assert h.get_size() == SIZE
    assert h.pread(4096, 0) == bytes([BASE]) * 4096
    # libnbd would refuse the write itself: let it through to the server
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error) as err:
        h.pwrite(b"\x55" * 4096, 0)
    assert err.value.errno == "EPERM" and "command failed" in err.value.string, err.value
    h.shutdown()
    # NBD_OPT_INFO (what nbdinfo --list asks) describes the export as the primary sees it
    r = subprocess.run(["nbdinfo", "--json", "--list", f"nbd://{pair.secondary.status()['listen']}"],
                       capture_output=True, text=True, timeout=30, env=tool_env)
    assert r.returncode == 0, r.stderr
    exports = {e["export-name"]: e for e in json.loads(r.stdout)["exports"]}
    assert exports["disk0"]["is_read_only"] is False


def test_an_anonymous_client_cannot_write_when_no_primary_is_connected(pair, require_tool,
                                                                       tool_env):
    require_tool("qemu-io")
    pair.images({"disk0": SIZE})
    pair.start_secondary()
    before = sha(read_all(pair.simgs["disk0"]))
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 4096", url(pair)],
                       capture_output=True, text=True, timeout=30, env=tool_env)
    assert r.returncode != 0 and "Permission denied" in r.stdout + r.stderr, r
    assert sha(read_all(pair.simgs["disk0"])) == before
    # and the primary still pairs afterwards
    pair.start_primary()
    assert pair.primary.status()["state"] == "replicating"
