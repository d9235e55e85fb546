"""Process, port and mount helpers shared by the tests and the benchmarks.

Plain functions on PIDs and paths, no pytest: ``scripts/bench``, bench_nbd.py and
bench_scale.py import this module too, with the repository root put on ``sys.path``.
Nothing here signals a process by name, only by the PID it is given.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time


# -- processes -------------------------------------------------------------------
def alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie (read from /proc, so it also
    works for a daemon that is not our child)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float, interval: float = 0.02) -> bool:
    """Waits up to ``timeout`` seconds for ``pid`` to exit; returns whether it did."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


STOP_SIGNALS = ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


def stop_pid(pid: int, steps=STOP_SIGNALS) -> bool:
    """Ends one process by its PID: each (signal, grace seconds) of ``steps`` in
    turn until it is gone (default SIGTERM, then SIGKILL).  Returns whether it is."""
    for sig, grace in steps:
        if not alive(pid):
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if wait_gone(pid, grace):
            return True
    return not alive(pid)


# -- ports -----------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Waits until something accepts on 127.0.0.1:``port``; raises RuntimeError if
    ``proc`` exits first or nothing listens after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with status {proc.returncode} "
                               "before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# -- mounts ----------------------------------------------------------------------
def mounted(path) -> bool:
    """Whether something is mounted on ``path`` (a directory, or a regular file for
    QEMU's FUSE exports).  Reads /proc/self/mounts, so unlike os.path.ismount it
    also sees a FUSE mount whose daemon has died."""
    path = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                mp = line.split()[1].encode().decode("unicode_escape")  # \040 for a space
                if mp == path:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def unmount(path, lazy: bool = True, timeout: float = 30) -> None:
    """``fusermount3 -u path`` if something is mounted there; with ``lazy``, then
    ``fusermount3 -u -z`` if the mount is busy or its daemon is stuck."""
    path = str(path)
    if not mounted(path):
        return
    r = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True,
                       timeout=timeout)
    if lazy and r.returncode != 0 and mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=timeout)
