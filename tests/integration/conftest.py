"""Helpers for the integration tests: free ports, missing tools, external servers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture
def free_port():
    """``free_port()`` -> a TCP port on 127.0.0.1 nobody listens on (now)."""
    return _free_port


@pytest.fixture
def require_tool():
    """``require_tool("qemu-nbd", ...)`` skips the test naming the missing tool."""

    def check(*tools):
        for tool in tools:
            if shutil.which(tool) is None:
                pytest.skip(f"{tool} is not installed (scripts/setup.sh installs it)")

    return check


@pytest.fixture
def tool_env():
    """Environment for external tools: Debian's python3 first on PATH (nbdsh
    runs ``python3`` and needs python3-libnbd)."""
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:/bin:" + env.get("PATH", "")
    return env


@pytest.fixture
def external_server(tmp_path):
    """``external_server(argv_with_{port}) -> port``: starts a server process,
    waits until it listens, and kills it (by its own PID) at teardown."""
    procs: list[subprocess.Popen] = []

    def start(argv: list[str], timeout: float = 10.0) -> int:
        port = _free_port()
        argv = [a.format(port=port) for a in argv]
        log = open(tmp_path / f"{os.path.basename(argv[0])}-{port}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        procs.append(proc)
        _wait_port(port, proc, timeout)
        return port

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
