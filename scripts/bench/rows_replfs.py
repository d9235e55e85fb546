"""The replfs rows: a secondary and a primary on loopback, each a real mount made by
the CLI; the file under test is the primary's disk or the secondary's view of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests._proc import stop_pid, unmount, wait_gone

from . import REPO, log
from .rows import Row, RowSkipped

_HELP_CACHE: dict[str, str] = {}


def primary_help() -> str:
    """``replfs primary --help``, once per run (to see which flags this tree has)."""
    if "primary" not in _HELP_CACHE:
        r = subprocess.run([sys.executable, "-m", "replfs", "primary", "--help"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        _HELP_CACHE["primary"] = r.stdout
    return _HELP_CACHE["primary"]


def timed_write(path: str, value: str = "1") -> float:
    """``echo 1 > path``; returns the seconds the write took (it returns when done)."""
    t = time.monotonic()
    with open(path, "w") as f:
        f.write(value + "\n")
    return time.monotonic() - t


class ReplfsRow(Row):
    """A replfs pair on loopback; the name says which side's file is under test and how:
    ``primary``/``secondary`` (sync protocol), ``-tls`` (the link over TLS), ``-ckpt``
    (the primary with ``--protocol checkpoint``), ``primary-alone`` (the same primary,
    failed over after the warm-up: the FUSE stack alone, no replication)."""

    def __init__(self, name, workdir, size):
        super().__init__(name, workdir, size)
        self.side, _, variant = name.partition("-")  # "primary" | "secondary"
        self.tls = variant == "tls"
        self.protocol = "checkpoint" if variant == "ckpt" else "sync"
        self.alone = variant == "alone"
        self.smnt = os.path.join(workdir, "s")
        self.pmnt = os.path.join(workdir, "p")
        self.pids: dict[str, int] = {}

    def _replfs(self, *argv: str) -> None:
        r = subprocess.run([sys.executable, "-m", "replfs", *argv],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
        if r.returncode != 0:
            raise RuntimeError(f"replfs {argv[0]} failed: {(r.stderr or r.stdout).strip()}")

    def _status(self, mnt: str) -> dict:
        with open(os.path.join(mnt, ".replfs", "status")) as f:
            return json.load(f)

    def setup(self) -> str:
        proto = ()
        if self.protocol != "sync":
            if "--protocol" not in primary_help():
                raise RowSkipped("this replfs has no `replfs primary --protocol` yet")
            proto = ("--protocol", self.protocol)
        simg = self.make_image(os.path.join(self.dir, "s.img"))
        pimg = self.make_image(os.path.join(self.dir, "p.img"))
        os.mkdir(self.smnt)
        os.mkdir(self.pmnt)
        tls = ()
        if self.tls:  # one CA, a server and a client certificate (tests/tlscerts.py)
            from tests.tlscerts import make_tls_dir
            tls = ("--tls-dir", make_tls_dir(os.path.join(self.dir, "tls")))
        self._replfs("secondary", self.smnt, "--listen", "127.0.0.1:0",
                     "--disk", f"disk0={simg}", "--workdir", os.path.join(self.dir, "overlays"),
                     "--log", os.path.join(self.dir, "secondary.log"), *tls)
        st = self._status(self.smnt)
        self.pids["secondary"] = st["pid"]
        port = st["listen"].rsplit(":", 1)[1]
        self._replfs("primary", self.pmnt, "--secondary", f"127.0.0.1:{port}",
                     "--disk", f"disk0={pimg}", "--log", os.path.join(self.dir, "primary.log"),
                     *tls, *proto)
        self.pids["primary"] = self._status(self.pmnt)["pid"]
        self.imgs = [pimg, simg]
        return os.path.join(self.pmnt if self.side == "primary" else self.smnt, "disk0")

    def procs(self):
        other = "secondary" if self.side == "primary" else "primary"
        return {"daemon": self.pids.get(self.side), "peer": self.pids.get(other)}

    def images(self):
        return list(getattr(self, "imgs", []))

    def reset(self):
        self.checkpoint()

    def prepare(self):
        if self.alone:
            t = timed_write(os.path.join(self.pmnt, ".replfs", "failover"))
            st = self._status(self.pmnt)
            log(f"[{self.name}] primary failed over in {t:.3f} s: state {st['state']}")
            self.replicated = False  # no checkpoint, no failover timing: nothing to replicate

    def checkpoint(self):
        """sync: the primary's checkpoint (a flush barrier), then the secondary's (empties
        the overlays), as before.  checkpoint protocol: one ``pair`` checkpoint on the
        primary (drains the queue, then carries the checkpoint to the secondary; a
        secondary-alone checkpoint is refused in that mode), timed as a whole."""
        if self.protocol == "checkpoint":
            t = timed_write(os.path.join(self.pmnt, ".replfs", "checkpoint"), "pair")
            drain = self._status(self.pmnt).get("last_checkpoint_drain_s")
            return {"primary_s": t, "secondary_s": None, "total_s": t, "pair": True,
                    "drain_s": drain}
        tp = timed_write(os.path.join(self.pmnt, ".replfs", "checkpoint"))
        ts = timed_write(os.path.join(self.smnt, ".replfs", "checkpoint"))
        return {"primary_s": tp, "secondary_s": ts, "total_s": tp + ts}

    def dirty(self):
        d = self._status(self.smnt)["disks"]["disk0"]
        out = {"hidden_bytes": d["hidden_bytes"], "active_bytes": d["active_bytes"]}
        p = self._status(self.pmnt)
        lag = p.get("lag_bytes")
        if lag is None:
            lag = (p.get("disks", {}).get("disk0") or {}).get("lag_bytes")
        if lag is not None:
            out["lag_bytes"] = lag
        return out

    def failover(self):
        t = timed_write(os.path.join(self.smnt, ".replfs", "failover"))
        st = self._status(self.smnt)
        if st["state"] != "failed-over":
            raise RuntimeError(f"replfs failover: state {st['state']}: {st['last_error']}")
        return {"failover_s": t}

    def teardown(self):
        for role, mnt in (("primary", self.pmnt), ("secondary", self.smnt)):
            try:
                unmount(mnt)
            except Exception as exc:  # keep going: the other side must be cleaned too
                log(f"bench: unmounting {mnt}: {exc}")
            pid = self.pids.get(role)
            if pid and not wait_gone(pid, 20) and not stop_pid(pid):
                log(f"bench: warning: replfs {role} (pid {pid}) did not exit")
            unmount(mnt)
