"""Bad input on the command line: one line saying what is wrong, non-zero exit,
nothing left mounted or running."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from tests.conftest import MiB, make_image, replfs_cmd
from tests.integration.test_replication import wait_for

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
    ("a\nb={img}", "newline"),
    ("x" * 201 + "={img}", "at most 200"),
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


def test_empty_and_qcow2_images_are_refused(tmp_path, mnt):
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", f"d={empty}",
          says=["empty", "0 bytes"])
    qcow = tmp_path / "q.qcow2"
    qcow.write_bytes(b"QFI\xfb" + bytes(MiB - 4))
    fails("primary", mnt, "--secondary", "127.0.0.1:1", "--disk", f"d={qcow}",
          says=["qcow2", "qemu-img convert"])


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_timeout_must_be_finite_and_positive(img, mnt, value):
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          "--timeout", value, says=["--timeout"])


def test_version():
    r = replfs_cmd("--version")
    assert r.stdout.strip().startswith("replfs ") and r.stdout.strip()[7:8].isdigit()


def test_sighup_reopens_the_log_and_keeps_the_mount(pair, tmp_path):
    pair.images({"disk0": MiB})
    pair.start_secondary()
    s = pair.secondary
    log = s.log
    rotated = f"{log}.1"
    os.rename(log, rotated)
    os.kill(s.status()["pid"], signal.SIGHUP)
    wait_for(lambda: os.path.exists(log), what="the log to be reopened")
    assert s.status()["state"] == "replicating"       # still mounted and serving

    def text(path):
        with open(path) as f:
            return f.read()

    wait_for(lambda: "SIGHUP: log reopened" in text(log), what="the reopen to be logged")
    assert "unmounting" not in text(rotated) + text(log)
