"""Helpers for the integration tests: free ports, missing tools, external servers."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests import _proc


@pytest.fixture
def free_port():
    """``free_port()`` -> a TCP port on 127.0.0.1 nobody listens on (now)."""
    return _proc.free_port


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
        port = _proc.free_port()
        argv = [a.format(port=port) for a in argv]
        log = open(tmp_path / f"{os.path.basename(argv[0])}-{port}.log", "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        procs.append(proc)
        _proc.wait_port(port, proc, timeout)
        return port

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
