"""Bad input on the command line: one line saying what is wrong, non-zero exit,
nothing left mounted or running."""

from __future__ import annotations

import os
import socket

import pytest

from tests.conftest import MiB, make_image, replfs_cmd

pytestmark = pytest.mark.integration


def fails(*argv, status=2, says=()):
    r = replfs_cmd(*argv, check=False)
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("replfs: "), r.stderr
    for word in says:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "a.img", MiB)


@pytest.fixture
def mnt(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    return str(d)


@pytest.mark.parametrize("disk, says", [
    ("noequals", "NAME=IMAGE"),
    ("=x.img", "NAME=IMAGE"),
    ("a/b={img}", "'/'"),
    (".hidden={img}", "'/'"),
    ("d=/nonexistent/x.img", "No such file"),
    ("d={dir}", "directory"),
])
def test_bad_disk_argument(tmp_path, img, mnt, disk, says):
    disk = disk.format(img=img, dir=tmp_path)
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", disk, says=[says])
    fails("primary", mnt, "--secondary", "127.0.0.1:1", "--disk", disk, says=[says])


def test_duplicate_names_and_bad_addresses(img, mnt):
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          "--disk", f"d={img}", says=["duplicate"])
    fails("secondary", mnt, "--listen", "nowhere", "--disk", f"d={img}", says=["HOST:PORT"])
    fails("primary", mnt, "--secondary", "127.0.0.1:99999", "--disk", f"d={img}",
          says=["HOST:PORT"])


def test_bad_mountpoint(tmp_path, img):
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    fails("secondary", full, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          says=["not empty"])
    fails("secondary", tmp_path / "nope", "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          says=["not a directory"])


def test_unreachable_secondary(img, mnt):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    fails("primary", mnt, "--secondary", f"127.0.0.1:{port}", "--disk", f"d={img}",
          status=75, says=["cannot connect", f"127.0.0.1:{port}"])
    assert not os.path.ismount(mnt)


def test_port_in_use(img, mnt):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        fails("secondary", mnt, "--listen", f"127.0.0.1:{port}", "--disk", f"d={img}",
              status=1, says=["cannot listen", str(port)])
    finally:
        s.close()
    assert not os.path.ismount(mnt)


def test_size_mismatch_and_unknown_export(pair, tmp_path):
    pair.images({"disk0": 2 * MiB})
    pair.start_secondary()
    listen = pair.secondary.status()["listen"]
    small = make_image(tmp_path / "small.img", MiB)
    m = tmp_path / "pm"
    m.mkdir()
    line = fails("primary", m, "--secondary", listen, "--disk", f"disk0={small}",
                 status=78, says=["size"])
    assert str(MiB) in line and str(2 * MiB) in line
    line = fails("primary", m, "--secondary", listen, "--disk", f"other={small}",
                 status=78, says=["other"])
    assert not os.path.ismount(m)
    # The secondary is unharmed by both attempts.
    assert pair.secondary.status()["state"] == "replicating"
    assert not pair.secondary.status()["peer_connected"]


def test_actions_on_a_non_mount(tmp_path):
    fails("checkpoint", tmp_path, status=2, says=["not a replfs mount"])
    fails("status", tmp_path, status=2, says=["not a replfs mount"])
