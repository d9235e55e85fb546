"""The events stream and the metrics page of real mounts.

Real daemons through the CLI, the primary's link through a FaultProxy
(tests/faultproxy.py) as in test_continuous.py; the faults are real (a
SIGKILLed secondary, a black-holed link).  Every wait is bounded; a reader
thread ends at the event it waits for, or at the daemon's exit.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BASE, PRIMARY, MiB, pread, pwrite
from tests.integration.test_continuous import Link, gone, state_is
from tests.integration.test_replication import fill, wait_for

pytestmark = pytest.mark.integration


class Reader:
    """A thread reading ``MOUNT/.replfs/events`` into ``events`` until an
    event satisfies ``until`` (or the stream ends), ``size`` bytes a read."""

    def __init__(self, path: str, until, size: int = 65536) -> None:
        self.path, self.until, self.size = path, until, size
        self.events: list[dict] = []
        self.reads: list[int] = []
        self.end: str | None = None
        self.fd = os.open(path, os.O_RDONLY)  # opened here: a failure is the test's
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(self.fd, self.size)
                self.reads.append(len(chunk))
                if not chunk:
                    self.end = "eof"
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    event = json.loads(line)
                    self.events.append(event)
                    if self.until(event):
                        self.end = "done"
                        return
        except OSError as exc:
            self.end = f"error {exc.errno}"
        finally:
            try:
                os.close(self.fd)
            except OSError as exc:  # the daemon has gone (after our EOF)
                if exc.errno not in (errno.ECONNABORTED, errno.ENOTCONN):
                    raise

    def wait(self, timeout: float = 30) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still reading after {timeout} s: {self.events}"

    def kinds(self) -> list[str]:
        return [e["event"] for e in self.events]

    def first(self, pred, after: int = 0) -> int:
        return next(i for i, e in enumerate(self.events) if i >= after and pred(e))


@pytest.fixture
def link(pair):
    lk = Link(pair)
    try:
        yield lk
    finally:
        lk.close()


def events_of(m) -> str:
    return m.ctl("events")


# -- faults show up in the stream --------------------------------------------------------
def test_a_killed_secondary_is_an_error_and_degraded_then_a_checkpoint_event(link):
    p, s = link.start({"disk0": 4 * MiB})
    seen_error = []

    def until(e):
        if e["event"] == "state" and e["state"] == "degraded":
            seen_error.append(e)
        return bool(seen_error) and e["event"] == "checkpoint"

    r = Reader(events_of(p), until)
    wait_for(lambda: r.events, 10, "the first line")
    assert r.events[0]["event"] == "exists"
    assert r.events[0]["state"] == "replicating" and r.events[0]["peer_connected"] is True
    assert r.events[0]["degraded_since"] is None

    gone(s)
    wait_for(lambda: seen_error, 10, "a degraded event")
    pwrite(p.file("disk0"), 0, fill(PRIMARY), fsync=True)  # recorded, resynced later
    link.secondary_again()
    link.settle()  # replicating on both sides, then a checkpoint on both
    r.wait()
    assert r.end == "done"

    kinds = r.kinds()
    err = r.first(lambda e: e["event"] == "error")
    degraded = r.first(lambda e: e["event"] == "state" and e["state"] == "degraded")
    assert "control connection ended" in r.events[err]["error"]
    assert r.events[degraded]["previous"] in ("replicating", "syncing")
    assert isinstance(r.events[degraded]["degraded_since"], float)
    assert r.first(lambda e: e["event"] == "peer" and e["peer_connected"] is False) < degraded
    back = r.first(lambda e: e["event"] == "state" and e["state"] == "replicating", degraded)
    assert r.first(lambda e: e["event"] == "state" and e["state"] == "syncing", degraded) < back
    assert r.first(lambda e: e["event"] == "resync" and e.get("done"), degraded) < back
    assert r.events[back]["degraded_since"] is None
    assert kinds[-1] == "checkpoint" and "checkpoint" in json.dumps(r.events[-1])
    st = p.status()
    assert st["last_checkpoint_at"] == r.events[-1]["last_checkpoint_at"]
    assert st["degraded_since"] is None and st["replication_errors"] >= 1
    assert all(isinstance(e["time"], float) for e in r.events)


def test_a_black_holed_link_degrades_the_primary_in_the_stream(link):
    p, _ = link.start({"disk0": 4 * MiB})
    r = Reader(events_of(p), lambda e: e["event"] == "state" and e["state"] == "degraded")
    wait_for(lambda: r.events, 10, "the first line")
    link.proxy.blackhole()
    pwrite(p.file("disk0"), 0, fill(PRIMARY, 4096))  # waits --timeout (2 s), then alone
    r.wait()
    err = r.first(lambda e: e["event"] == "error")
    assert "did not answer" in r.events[err]["error"] or "ended" in r.events[err]["error"]
    link.proxy.restore()
    wait_for(lambda: state_is(p, "replicating"), 30, "the primary to resync by itself")


# -- reads of any size; the CLI ---------------------------------------------------------
def test_one_byte_reads_give_whole_json_lines(link):
    _, s = link.start({"disk0": 4 * MiB})
    r = Reader(events_of(s), lambda e: e["event"] == "checkpoint", size=1)
    wait_for(lambda: r.events, 10, "the first line")
    assert r.events[0]["event"] == "exists" and r.events[0]["role"] == "secondary"
    s.action("checkpoint")
    r.wait()
    assert r.end == "done" and set(r.reads) == {1}
    assert r.events[-1]["checkpoints"] == 1


def test_replfs_events_count_and_once(link):
    p, _ = link.start({"disk0": 4 * MiB})
    cmd = [sys.executable, "-m", "replfs", "events", p.path]
    once = subprocess.run(cmd + ["--once"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert once.returncode == 0, once.stderr
    assert [json.loads(x)["event"] for x in once.stdout.splitlines()] == ["exists"]

    proc = subprocess.Popen(cmd + ["--count", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # line-buffered: here before the next event
        assert json.loads(first)["event"] == "exists"
        p.action("checkpoint")
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["event"] == "checkpoint"

    bad = subprocess.run(cmd + ["--count", "0"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("replfs:")


def test_a_blocked_reader_is_interruptible(link, require_tool):
    require_tool("cat")
    p, _ = link.start({"disk0": 4 * MiB})
    for argv, want in (([sys.executable, "-m", "replfs", "events", p.path], 0),
                       (["cat", events_of(p)], -signal.SIGINT)):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert json.loads(proc.stdout.readline())["event"] == "exists"
            time.sleep(0.5)  # blocked in read(2) in the kernel now
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
            assert time.monotonic() - t0 < 5
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        assert proc.returncode == want, (argv, proc.returncode)
    assert p.status()["event_readers"] == 0


def test_a_reader_blocked_at_unmount_ends_and_the_daemon_exits(link):
    p, _ = link.start({"disk0": 4 * MiB})
    cli = subprocess.Popen([sys.executable, "-m", "replfs", "events", p.path],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = Reader(events_of(p), lambda e: False)
    try:
        assert json.loads(cli.stdout.readline())["event"] == "exists"
        wait_for(lambda: r.events, 10, "the first line")
        time.sleep(0.3)
        p.kill(signal.SIGTERM)  # the daemon unmounts with both readers blocked
        assert p.wait_exit(15), "the daemon did not exit with a blocked events reader"
        cli.wait(timeout=10)
        r.wait(10)
    finally:
        if cli.poll() is None:
            cli.kill()
        cli.communicate()
    assert cli.returncode == 0
    assert r.end == "eof"
    wait_for(lambda: not os.path.ismount(p.path), 10, "the mount to go")


# -- metrics --------------------------------------------------------------------------------
def test_metrics_parse_and_count_what_the_test_did(link):
    p, s = link.start({"disk0": 4 * MiB})
    n = 3 * 65536
    pwrite(p.file("disk0"), 0, fill(PRIMARY, n), fsync=True)
    assert pread(p.file("disk0"), 2 * MiB, 4096) == fill(BASE, 4096)  # not in the cache
    p.action("checkpoint")
    with open(p.ctl("metrics"), "rb") as f:
        text = f.read().decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for sm in fam.samples:
            assert sm.labels["role"] == "primary" and "mount" in sm.labels
            samples[(sm.name, tuple(sorted((k, v) for k, v in sm.labels.items()
                                           if k not in ("mount", "role"))))] = sm.value
    disk = (("disk", "disk0"),)
    assert samples[("replfs_disk_written_bytes_total", disk)] == n
    assert samples[("replfs_disk_write_requests_total", disk)] >= 1
    assert samples[("replfs_disk_read_bytes_total", disk)] >= 4096
    assert samples[("replfs_dirty_bytes", disk)] == 0
    assert samples[("replfs_checkpoints_total", ())] == 1
    assert samples[("replfs_state", (("state", "replicating"),))] == 1
    assert samples[("replfs_state", (("state", "degraded"),))] == 0
    assert samples[("replfs_peer_connected", ())] == 1
    assert samples[("replfs_last_checkpoint_timestamp_seconds", ())] == \
        p.status()["last_checkpoint_at"]
    assert ("replfs_degraded_since_timestamp_seconds", ()) not in samples

    gone(s)
    wait_for(lambda: state_is(p, "degraded"), 10, "the primary to degrade")
    with open(p.ctl("metrics"), "rb") as f:
        fams = {f.name: f for f in text_string_to_metric_families(f.read().decode())}
    since = fams["replfs_degraded_since_timestamp_seconds"].samples[0].value
    assert abs(since - p.status()["degraded_since"]) < 1e-6 and since <= time.time()
    assert fams["replfs_replication_errors"].samples[0].value >= 1
    assert fams["replfs_peer_connected"].samples[0].value == 0
