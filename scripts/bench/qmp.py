"""A minimal QMP client on a unix socket: one command at a time, events skipped."""

from __future__ import annotations

import json
import socket
import subprocess
import time


class QMPError(RuntimeError):
    pass


class QMP:
    """A minimal QMP client on a unix socket: one command at a time, events skipped."""

    def __init__(self, path: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + 20
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise QMPError(f"QMP socket {path}: QEMU did not come up "
                                   f"(exit status {proc.poll()})") from None
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        greeting = self._read()
        self.version = greeting.get("QMP", {}).get("version", {}).get("qemu", {})
        self.cmd("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.f.readline()
            if not line:
                raise QMPError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, command: str, args: dict | None = None):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        reply = self._read()
        if "error" in reply:
            raise QMPError(f"{command}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
