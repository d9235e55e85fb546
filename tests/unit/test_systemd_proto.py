"""replfs.systemd (sd_notify datagrams, journald's log lines), the pid file, and
the unit templates in scripts/systemd/ (checked by ``systemd-analyze verify``)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from replfs import daemon, systemd

UNITS = Path(__file__).resolve().parents[2] / "scripts" / "systemd"


@pytest.fixture
def receiver():
    """A bound datagram socket (a short path: sun_path holds 108 bytes)."""
    d = Path(f"/tmp/replfs-notify-{uuid.uuid4().hex[:8]}")
    d.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(d / "n"))
    s.settimeout(5)
    try:
        yield s, str(d / "n")
    finally:
        s.close()
        shutil.rmtree(d)


# -- NOTIFY_SOCKET ------------------------------------------------------------------
def test_notify_address_forms():
    assert systemd.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert systemd.notify_address("@abstract/name") == b"\0abstract/name"
    assert systemd.notify_address("") is None
    assert systemd.notify_address(None) is None
    assert systemd.notify_address("vsock:2:1234") is None
    assert systemd.Notifier.from_env({}) is None
    assert systemd.Notifier.from_env({"NOTIFY_SOCKET": "relative/path"}) is None


def test_notifier_sends_datagrams_to_a_path(receiver):
    sock, path = receiver
    n = systemd.Notifier.from_env({"NOTIFY_SOCKET": path})
    try:
        assert n.ready("replicating, peer connected")
        assert sock.recv(4096) == b"READY=1\nSTATUS=replicating, peer connected"
        assert n.status("degraded: the secondary\nwent away")  # one line only
        assert sock.recv(4096) == b"STATUS=degraded: the secondary went away"
        assert not n.status("degraded: the secondary\nwent away")  # unchanged: not sent
        assert n.stopping("SIGTERM: unmounting")
        assert sock.recv(4096) == b"STOPPING=1\nSTATUS=SIGTERM: unmounting"
        assert n.status("x" * 1000)
        assert len(sock.recv(4096)) == len("STATUS=") + systemd.MAX_STATUS
    finally:
        n.close()
    assert not n.send(READY=1)  # closed: a no-op


def test_notifier_abstract_socket():
    name = f"replfs-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        n = systemd.Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        try:
            assert n.ready("replicating, peer not connected")
        finally:
            n.close()
        assert s.recv(4096) == b"READY=1\nSTATUS=replicating, peer not connected"


def test_notifier_never_raises_when_nobody_listens(tmp_path):
    n = systemd.Notifier(str(tmp_path / "nobody"))
    try:
        assert not n.ready("x")
        assert not n.stopping()
    finally:
        n.close()


# -- journald ------------------------------------------------------------------------
def test_stderr_is_journal_compares_device_and_inode(tmp_path):
    with open(tmp_path / "err", "wb") as f, open(tmp_path / "other", "wb") as g:
        st = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert systemd.stderr_is_journal(env, f.fileno())
        assert not systemd.stderr_is_journal(env, g.fileno())
        assert not systemd.stderr_is_journal({}, f.fileno())
        assert not systemd.stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())


@pytest.mark.parametrize("level, prio", [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2),
])
def test_journal_formatter_priorities(level, prio):
    rec = logging.LogRecord("replfs.replication", level, __file__, 1, "state %s", ("x",),
                            None)
    assert systemd.JournalFormatter().format(rec) == f"<{prio}>replfs.replication: state x"


def test_journal_formatter_prefixes_every_line():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("replfs", logging.ERROR, __file__, 1, "failed", (),
                                sys.exc_info())
    lines = systemd.JournalFormatter().format(rec).split("\n")
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)
    assert lines[0] == "<3>replfs: failed" and lines[-1] == "<3>ValueError: boom"


# -- the pid file ----------------------------------------------------------------------
def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_pid_file_written_whole_and_removed_only_if_ours(tmp_path):
    path = str(tmp_path / "replfs.pid")
    with open(path, "w") as f:
        f.write(f"{dead_pid()}\n")  # stale: replaced without a word
    daemon.write_pid_file(path)
    with open(path) as f:
        assert f.read() == f"{os.getpid()}\n"
    assert os.listdir(tmp_path) == ["replfs.pid"]  # no temporary file left
    daemon.remove_pid_file(path)
    assert not os.path.exists(path)
    daemon.remove_pid_file(path)  # gone already: fine

    with open(path, "w") as f:
        f.write(f"{os.getppid()}\n")  # someone else's: left alone
    daemon.remove_pid_file(path)
    assert os.path.exists(path)


def test_pid_file_in_a_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        daemon.write_pid_file(str(tmp_path / "nope" / "x.pid"))


# -- the unit templates ---------------------------------------------------------------
def _verify_runs() -> str | None:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.path.exists(exe):
        return "systemd-analyze is not installed (Debian package systemd)"
    r = subprocess.run([exe, "verify", "--man=no", "multi-user.target"], capture_output=True,
                       text=True, timeout=60, check=False)
    if r.returncode != 0:
        return f"systemd-analyze verify does not run in this container: {r.stderr.strip()}"
    return None


@pytest.mark.parametrize("template", ["replfs-primary@.service", "replfs-secondary@.service",
                                      "replfs@.service"])
def test_unit_templates_verify(tmp_path, template):
    reason = _verify_runs()
    if reason:
        pytest.skip(reason)
    shutil.copy(UNITS / template, tmp_path / template)
    instance = template.replace("@", "@vm0")
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / instance)],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr
    text = (UNITS / template).read_text()
    for line in ("Type=notify", "KillMode=mixed", "Restart=on-failure",
                 "RestartPreventExitStatus=2 78"):
        assert f"\n{line}\n" in text, line
    assert " -f\n" in text  # Type=notify needs the foreground daemon
