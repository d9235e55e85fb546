"""Under a service manager: READY=1/STATUS=/STOPPING=1 on $NOTIFY_SOCKET from real
``-f`` daemons, journald's log lines when stderr is $JOURNAL_STREAM, and --pid-file
in both modes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests import _proc
from tests.conftest import MiB, have_fuse, make_image, replfs_cmd
from tests.integration.test_replication import wait_for

pytestmark = pytest.mark.integration

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


@pytest.fixture
def fuse():
    reason = have_fuse()
    if reason:
        pytest.skip(reason)


class Listener:
    """The manager's side of NOTIFY_SOCKET: a bound datagram socket."""

    def __init__(self, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.dir: Path | None = None
        if abstract:
            name = f"replfs-test-{uuid.uuid4().hex}"
            self.sock.bind(b"\0" + name.encode())
            self.env = "@" + name
        else:  # a short path: sun_path holds 108 bytes, pytest's tmp_path may not fit
            self.dir = Path(f"/tmp/replfs-notify-{uuid.uuid4().hex[:8]}")
            self.dir.mkdir()
            self.sock.bind(str(self.dir / "notify"))
            self.env = str(self.dir / "notify")
        self.seen: list[dict[str, str]] = []

    def next(self, timeout: float = 20.0) -> dict[str, str]:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        msg = dict(line.split("=", 1) for line in data.split("\n"))
        self.seen.append(msg)
        return msg

    def until(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {key}={value or '...'} within {timeout} s; "
                                     f"got {self.seen}")
            try:
                msg = self.next(left)
            except TimeoutError:
                continue
            if key in msg and (value is None or msg[key] == value):
                return msg

    def close(self) -> None:
        self.sock.close()
        if self.dir is not None:
            shutil.rmtree(self.dir)


@pytest.fixture
def listeners():
    made: list[Listener] = []

    def make(abstract: bool = False) -> Listener:
        made.append(Listener(abstract))
        return made[-1]

    try:
        yield make
    finally:
        for lst in made:
            lst.close()


class Foreground:
    """``replfs ROLE MOUNT ... -f`` as a service manager runs it."""

    def __init__(self, tmp_path, role: str, argv: list, env: dict) -> None:
        self.mount = tmp_path / f"mnt-{role}"
        self.mount.mkdir(exist_ok=True)
        self.stderr_path = tmp_path / f"{role}.stderr"
        with open(self.stderr_path, "wb") as err:
            full_env = {**os.environ, **env}
            if "JOURNAL_STREAM" in env and env["JOURNAL_STREAM"] == "{stderr}":
                st = os.fstat(err.fileno())
                full_env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replfs", role, str(self.mount), *map(str, argv), "-f"],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=full_env)

    def status(self) -> dict:
        with open(self.mount / ".replfs" / "status", "rb") as f:
            return json.loads(f.read())

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        """Signal the daemon and wait for its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            _proc.stop_pid(self.proc.pid)
            self.proc.wait(timeout=10)
        _proc.unmount(self.mount)


@pytest.fixture
def foreground(tmp_path, fuse):
    started: list[Foreground] = []

    def start(role: str, *argv, **env) -> Foreground:
        started.append(Foreground(tmp_path, role, list(argv), env))
        return started[-1]

    try:
        yield start
    finally:
        for fg in reversed(started):
            fg.cleanup()
        for fg in started:
            assert not _proc.mounted(fg.mount), f"{fg.mount} left mounted"


def test_notify_ready_status_stopping(tmp_path, foreground, listeners):
    simg = make_image(tmp_path / "s.img", 2 * MiB)
    pimg = make_image(tmp_path / "p.img", 2 * MiB)
    pid_file = tmp_path / "primary.pid"

    sn = listeners(abstract=False)
    sec = foreground("secondary", "--listen", "127.0.0.1:0", "--workdir", tmp_path / "work",
                     "--disk", f"d={simg}", NOTIFY_SOCKET=sn.env)
    msg = sn.until("READY")
    st = sec.status()  # READY=1 only once the mount answers
    assert st["state"] == "replicating" and st["pid"] == sec.proc.pid
    assert msg == {"READY": "1", "STATUS": "replicating, peer not connected"}
    assert all("READY" not in m for m in sn.seen[:-1])

    pn = listeners(abstract=True)
    pri = foreground("primary", "--secondary", st["listen"], "--disk", f"d={pimg}",
                     "--pid-file", pid_file, NOTIFY_SOCKET=pn.env)
    msg = pn.until("READY")
    assert pri.status()["state"] == "replicating"
    assert msg["STATUS"] == "replicating, peer connected"
    assert pn.seen[0] == {"STATUS": f"connecting to the secondary {st['listen']}"}
    assert pid_file.read_text() == f"{pri.proc.pid}\n"  # before READY=1 already

    # The secondary's status follows: its primary came.
    sn.until("STATUS", "replicating, peer connected")

    # SIGTERM: STOPPING=1, a clean unmount, exit 0, the pid file gone.
    os.kill(pri.proc.pid, signal.SIGTERM)
    msg = pn.until("STOPPING")
    assert msg == {"STOPPING": "1", "STATUS": "SIGTERM: unmounting"}
    assert pri.proc.wait(timeout=30) == 0
    assert not pid_file.exists()
    assert not _proc.mounted(pri.mount)
    sn.until("STATUS", "replicating, peer not connected")

    # An unmount from outside (fusermount3 -u) stops the daemon too: STOPPING=1.
    subprocess.run(["fusermount3", "-u", str(sec.mount)], check=True, timeout=30)
    assert sn.until("STOPPING")["STATUS"] == "unmounted"
    assert sec.proc.wait(timeout=30) == 0


def test_background_daemon_does_not_notify(tmp_path, fuse, listeners):
    """Without -f the CLI's child is not the service's main process: it stays quiet
    (Type=forking with --pid-file is the way for it)."""
    img = make_image(tmp_path / "s.img", MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid_file = tmp_path / "s.pid"
    n = listeners()
    env = {**os.environ, "NOTIFY_SOCKET": n.env}
    r = subprocess.run([sys.executable, "-m", "replfs", "secondary", str(mnt), "--listen",
                        "127.0.0.1:0", "--workdir", str(tmp_path / "work"), "--disk",
                        f"d={img}", "--log", str(tmp_path / "s.log"), "--pid-file",
                        str(pid_file)],
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert r.returncode == 0, r.stderr
        with open(mnt / ".replfs" / "status", "rb") as f:
            pid = json.loads(f.read())["pid"]
        assert pid_file.read_text() == f"{pid}\n"  # the daemon's, not the CLI's
        n.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            n.sock.recv(4096)
    finally:
        _proc.unmount(mnt, lazy=False)
        if not _proc.wait_gone(pid, 20):
            _proc.stop_pid(pid)
        _proc.unmount(mnt)
    assert not pid_file.exists()


def test_journald_lines_have_priorities_and_no_timestamps(tmp_path, foreground):
    img = make_image(tmp_path / "s.img", MiB)
    sec = foreground("secondary", "--listen", "127.0.0.1:0", "--workdir", tmp_path / "work",
                     "--disk", f"d={img}", JOURNAL_STREAM="{stderr}")
    wait_for(lambda: "ready:" in sec.stderr(), timeout=20, what="the ready line")
    assert sec.status()["state"] == "replicating"
    assert sec.stop() == 0
    lines = [line for line in sec.stderr().splitlines() if line.strip()]
    logged = [line for line in lines if line.startswith("<")]
    assert logged, lines
    for line in logged:
        assert re.match(r"<[2-7]>replfs[.\w]*: ", line), line
        assert not TIMESTAMP.search(line), line
    text = "\n".join(logged)
    assert re.search(r"^<6>replfs: replfs \S+ secondary starting \(pid \d+\)", text, re.MULTILINE)
    assert re.search(r"^<6>replfs: ready: secondary mounted on ", text, re.MULTILINE)
    assert "<6>replfs: signal SIGTERM: unmounting" in text
    assert re.search(r"^<6>replfs: secondary exits \(status 0\)", text, re.MULTILINE)


def test_journald_failure_line_is_an_error(tmp_path, fuse, foreground):
    img = make_image(tmp_path / "p.img", MiB)
    port = _proc.free_port()  # nothing listens there
    pri = foreground("primary", "--secondary", f"127.0.0.1:{port}", "--disk", f"d={img}",
                     JOURNAL_STREAM="{stderr}")
    assert pri.proc.wait(timeout=60) == 75
    last = pri.stderr().strip().splitlines()[-1]
    assert last.startswith("<3>replfs: ") and f"127.0.0.1:{port}" in last, last


def test_without_journal_stream_lines_keep_timestamps(tmp_path, foreground):
    img = make_image(tmp_path / "s.img", MiB)
    sec = foreground("secondary", "--listen", "127.0.0.1:0", "--workdir", tmp_path / "work",
                     "--disk", f"d={img}", JOURNAL_STREAM="1:1")  # another stream's
    wait_for(lambda: "ready:" in sec.stderr(), timeout=20, what="the ready line")
    assert sec.stop() == 0
    ready = [line for line in sec.stderr().splitlines() if "ready:" in line]
    assert ready and TIMESTAMP.match(ready[0]) and not ready[0].startswith("<"), ready


def test_pid_file_background_stale_and_bad(pair, tmp_path):
    pair.images({"disk0": MiB})
    spid = tmp_path / "secondary.pid"
    ppid = tmp_path / "primary.pid"
    gone = subprocess.Popen(["true"])
    gone.wait()
    ppid.write_text(f"{gone.pid}\n")  # stale: replaced
    s = pair.start_secondary("--pid-file", spid)
    p = pair.start_primary("--pid-file", ppid)
    assert spid.read_text() == f"{s.pid}\n"
    assert ppid.read_text() == f"{p.pid}\n"
    p.unmount()
    s.unmount()
    assert not spid.exists() and not ppid.exists()

    r = replfs_cmd("secondary", s.path, "--listen", "127.0.0.1:0", "--disk",
                   f"disk0={pair.simgs['disk0']}", "--pid-file", tmp_path / "no" / "x.pid",
                   check=False)
    assert r.returncode == 2 and r.stderr.startswith("replfs: --pid-file "), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_notify_status_follows_degraded_and_recovery(tmp_path, foreground, listeners):
    simg = make_image(tmp_path / "s.img", 2 * MiB)
    pimg = make_image(tmp_path / "p.img", 2 * MiB)
    port = _proc.free_port()
    pn = listeners(abstract=True)
    pri = foreground("primary", "--secondary", f"127.0.0.1:{port}", "--disk", f"d={pimg}",
                     "--allow-degraded-start", "--reconnect-interval", "0.5",
                     NOTIFY_SOCKET=pn.env)
    msg = pn.until("READY")
    assert msg["STATUS"].startswith("degraded: "), msg
    assert f"127.0.0.1:{port}" in msg["STATUS"]
    assert pri.status()["state"] == "degraded"

    foreground("secondary", "--listen", f"127.0.0.1:{port}", "--workdir", tmp_path / "work",
               "--disk", f"d={simg}")
    pn.until("STATUS", "replicating, peer connected", timeout=30)
    assert pri.status()["state"] == "replicating"
    assert pri.stop() == 0
    assert pn.until("STOPPING")
