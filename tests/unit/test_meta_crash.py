"""replfs.meta.format under kill -9 at seeded random moments.

A child process (tests/meta_crash_child.py) loops writing headers, bitmaps
and activity-log records numbered by a counter, and reports each number on a
pipe once its call has returned.  We SIGKILL it after a seeded random delay
(0-30 ms after it opened the file), reopen the file and check, for each of
the three kinds, that what we read back is exactly one record that was
written, and no older than the last one reported durable: it is the last
reported one, or the one that was in flight.  Each seed runs three lives on
one file (create, kill, reopen and continue, kill, ...), so a file recovered
from a kill is killed again.  The bitmap is 2 MiB (1 TiB at 64 KiB): a kill
does tear its pwrite now and then (a write in place instead of A/B fails this
test in most runs); a 4 KiB header or AL pwrite is one page, which a kill
cannot tear (test_meta_format.py tears those by hand).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

from replfs.meta.format import MetaError, MetaFile
from tests import meta_crash_child as child

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = range(20)
LIVES = 3
MAX_DELAY = 0.030
KINDS = "HBA"


def read_lines(fd: int, deadline: float, buf: bytearray, until: bytes | None = None) -> bool:
    """Reads what the child printed into ``buf`` until ``deadline``, EOF, or
    (if ``until``) a line equal to it; returns whether the stream is still open."""
    while True:
        left = deadline - time.monotonic()
        if until is not None and until in buf.split(b"\n")[:-1]:
            return True
        if left <= 0:
            return True
        r, _, _ = select.select([fd], [], [], left)
        if r:
            data = os.read(fd, 65536)
            if not data:
                return False
            buf += data


def one_life(path: str, n0: int, delay: float) -> dict[str, int]:
    """Runs the child from counter ``n0``, kills it ``delay`` s after it is
    ready; returns the last number reported per kind (absent: none)."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.meta_crash_child", path, str(n0)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = bytearray()
        fd = proc.stdout.fileno()
        alive = read_lines(fd, time.monotonic() + 10, out, until=b"R")
        assert alive and b"R" in out.split(b"\n"), \
            f"child not ready: {proc.stderr.read().decode(errors='replace')}"
        read_lines(fd, time.monotonic() + delay, out)
        assert proc.poll() is None, f"child died: {proc.stderr.read().decode(errors='replace')}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        out += proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    last: dict[str, int] = {}
    for line in out.decode().splitlines():
        if line != "R":
            kind, n = line.split()
            last[kind] = int(n)   # each kind's numbers come in increasing order
    return last


def which(got, candidates: list[int], make) -> int | None:
    """The newest of ``candidates`` whose record ``make(n)`` equals ``got``."""
    for n in sorted(candidates, reverse=True):
        if make(n) == got:
            return n
    return None


def test_kill9_at_random_moments(tmp_path):
    reported = inflight = 0
    for seed in SEEDS:
        rng = random.Random(seed)
        path = str(tmp_path / f"seed{seed}.replfs-meta")
        known = dict.fromkeys(KINDS, 0)   # per kind: the number the file holds
        for life in range(LIVES):
            n0 = max(known.values()) + 1
            delay = rng.uniform(0, MAX_DELAY)
            last = one_life(path, n0, delay)
            where = f"seed {seed} life {life} (n0={n0}, delay={delay * 1000:.1f} ms, " \
                    f"reported {last})"
            try:
                with MetaFile.open(path, size=child.SIZE, cluster_size=child.CS,
                                   create=False) as m:
                    h = m.header
                    bits = m.read_bitmap()
                    al = m.read_al()
            except MetaError as e:
                pytest.fail(f"{where}: {e}")
            # Allowed: the last one reported durable, or the next one written after it.
            allowed = {k: [last[k], last[k] + 1] if k in last else [known[k], n0]
                       for k in KINDS}
            got = {
                "H": which(h, allowed["H"], lambda n, h=h: child.header_for(h, n)),
                "B": which(bits, allowed["B"], child.bits_for),
                "A": which(al, allowed["A"], child.al_for),
            }
            for k in KINDS:
                assert got[k] is not None, \
                    f"{where}: {k} read back is none of {allowed[k]} " \
                    f"(header checkpoint {h.checkpoint}, AL of {len(al)})"
                inflight += got[k] == allowed[k][1] and k in last
            reported += sum(last.values()) > 0
            known = got
        os.unlink(path)   # 4 MiB each; pytest keeps the last runs' tmp dirs
    # not vacuous: most lives saw durable writes before the kill
    assert reported >= len(SEEDS) * LIVES // 2, (reported, inflight)
