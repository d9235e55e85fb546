"""QEMU's own block replication as rows: two QEMU processes (``-M none``, no VM),
the COLO block graph built over QMP, the top node of each side exported as a file
through QEMU's FUSE export."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from tests._proc import free_port, unmount

from . import CLUSTER
from .qmp import QMP, QMPError
from .rows import Row

NODELAY_NOTE = ("QEMU 7.2's NBD client does not set TCP_NODELAY on its socket, so with more "
                "than one request in flight (the QD16 jobs on qemu-primary) Nagle's algorithm "
                "and delayed ACKs hold requests back; qemu-* rows are QEMU as shipped, "
                "qemu-*-nodelay rows the same with TCP_NODELAY forced on both QEMUs' TCP "
                "sockets by an LD_PRELOAD shim (scripts/bench/nodelay.c).")
SHIM_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nodelay.c")


def build_shim(outdir: str) -> str:
    """Compiles nodelay.c into OUTDIR/nodelay.so (gcc, at run time); returns its path."""
    so = os.path.join(outdir, "nodelay.so")
    if not os.path.exists(so):
        r = subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", so, SHIM_SOURCE,
                            "-ldl"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"gcc nodelay.c failed: {r.stderr.strip()[-400:]}")
    return so


def start_qemu(argv: list[str], workdir: str, role: str, shim: str | None = None,
               stdout=None) -> tuple[subprocess.Popen, QMP]:
    """Starts ``qemu-system-x86_64 ARGV -qmp unix:WORKDIR/ROLE.qmp`` (its output in
    WORKDIR/qemu-ROLE.log unless STDOUT is given), the shim preloaded if given; returns
    the process and its QMP client."""
    sock = os.path.join(workdir, f"{role}.qmp")
    env = dict(os.environ)
    if shim:
        env["LD_PRELOAD"] = shim
        env["REPLFS_NODELAY_LOG"] = "1"
    logf = open(os.path.join(workdir, f"qemu-{role}.log"), "wb") if stdout is None else None
    proc = subprocess.Popen(
        ["qemu-system-x86_64", *argv, "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=logf or stdout, stderr=logf or subprocess.STDOUT,
        env=env, start_new_session=True)  # ^C reaches only this script, which cleans up
    if logf:
        logf.close()
    try:
        return proc, QMP(sock, proc)
    except Exception:
        stop_qemu(None, proc)
        raise


def stop_qemu(q: QMP | None, proc: subprocess.Popen | None) -> None:
    """``quit`` over QMP, then SIGTERM and SIGKILL if QEMU does not go."""
    if q is not None:
        try:
            q.cmd("quit")
        except Exception:
            pass
        q.close()
    if proc is not None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    pass


def build_secondary(s: QMP, simg: str, d: str, port: int, fuse_mnt: str | None) -> None:
    """QEMU's secondary: the disk exported over NBD (export ``disk0``); active -> hidden
    -> disk (qcow2 overlays created in D); replication (mode=secondary) under a quorum
    top node ``stop``, which is the secondary VM's disk (exported on FUSE_MNT if given)."""
    for ov in ("hidden", "active"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", simg, "-F", "raw",
                        os.path.join(d, f"{ov}.qcow2"), str(os.path.getsize(simg))],
                       check=True, capture_output=True, timeout=60)
    s.cmd("blockdev-add", {"driver": "raw", "node-name": "sdisk",
                           "file": {"driver": "file", "filename": simg}})
    s.cmd("nbd-server-start", {"addr": {"type": "inet",
                                        "data": {"host": "127.0.0.1", "port": str(port)}}})
    s.cmd("block-export-add", {"type": "nbd", "id": "nbd-disk0", "node-name": "sdisk",
                               "name": "disk0", "writable": True})
    s.cmd("blockdev-add", {"driver": "qcow2", "node-name": "hidden", "backing": "sdisk",
                           "file": {"driver": "file",
                                    "filename": os.path.join(d, "hidden.qcow2")}})
    s.cmd("blockdev-add", {"driver": "qcow2", "node-name": "active", "backing": "hidden",
                           "file": {"driver": "file",
                                    "filename": os.path.join(d, "active.qcow2")}})
    s.cmd("blockdev-add", {"driver": "replication", "node-name": "srep", "mode": "secondary",
                           "top-id": "stop", "file": "active"})
    s.cmd("blockdev-add", {"driver": "quorum", "node-name": "stop", "vote-threshold": 1,
                           "read-pattern": "fifo", "children": ["srep"]})
    if fuse_mnt:
        s.cmd("block-export-add", {"type": "fuse", "id": "fuse-s", "node-name": "stop",
                                   "mountpoint": fuse_mnt, "writable": True,
                                   "growable": False})
    s.cmd("xen-set-replication", {"enable": True, "primary": False})


def build_primary(p: QMP, pimg: str, port: int, fuse_mnt: str | None,
                  direct: bool = False) -> None:
    """QEMU's primary: a quorum (vote-threshold 1) ``ptop`` over the local disk, plus a
    replication (mode=primary) child over an NBD client, added with x-blockdev-change;
    ``ptop`` exported on FUSE_MNT if given.  DIRECT: the local image opened as
    ``-drive cache=none,aio=native`` opens it (O_DIRECT, Linux AIO), for a guest."""
    f = {"driver": "file", "filename": pimg}
    if direct:
        f.update(aio="native", cache={"direct": True, "no-flush": False})
    p.cmd("blockdev-add", {"driver": "raw", "node-name": "pdisk", "file": f})
    p.cmd("blockdev-add", {"driver": "quorum", "node-name": "ptop", "vote-threshold": 1,
                           "read-pattern": "fifo", "children": ["pdisk"]})
    p.cmd("blockdev-add", {"driver": "replication", "node-name": "prep", "mode": "primary",
                           "file": {"driver": "nbd", "node-name": "nbd-client",
                                    "server": {"type": "inet", "host": "127.0.0.1",
                                               "port": str(port)},
                                    "export": "disk0"}})
    p.cmd("x-blockdev-change", {"parent": "ptop", "node": "prep"})
    if fuse_mnt:
        p.cmd("block-export-add", {"type": "fuse", "id": "fuse-p", "node-name": "ptop",
                                   "mountpoint": fuse_mnt, "writable": True,
                                   "growable": False})
    p.cmd("xen-set-replication", {"enable": True, "primary": True})
FAILOVER_NOTE = ("QEMU failover: x-colo-lost-heartbeat only acts inside a COLO migration, which "
                 "this set-up (no VM, no migration) does not have. The same secondary active "
                 "commit is started with xen-set-replication enable=false primary=false "
                 "failover=true (replication_stop_all(failover=true) -> commit_active_start); "
                 "that commit job is internal (not in query-jobs), so its end is found by polling "
                 "x-debug-query-block-graph until the replication node has no 'hidden disk' child.")


class QemuRow(Row):
    def __init__(self, name, workdir, size):
        super().__init__(name, workdir, size)
        base = name.removesuffix("-nodelay")
        self.nodelay = base != name
        self.side = base.removeprefix("qemu-")
        self.qemu: dict[str, subprocess.Popen] = {}
        self.qmp: dict[str, QMP] = {}
        self.smnt = os.path.join(workdir, "s.fuse")
        self.pmnt = os.path.join(workdir, "p.fuse")
        self.version = None
        self.shim = None
        self.imgs: list[str] = []

    def _start(self, role: str) -> QMP:
        proc, q = start_qemu(["-M", "none", "-nodefaults", "-display", "none",
                              "-name", f"replfs-bench-{role}"], self.dir, role, self.shim)
        self.qemu[role] = proc
        self.qmp[role] = q
        self.version = q.version
        return q

    def images(self):
        return list(self.imgs)

    def setup(self) -> str:
        d = self.dir
        if self.nodelay:
            self.shim = build_shim(d)
        simg = self.make_image(os.path.join(d, "s.img"))
        pimg = self.make_image(os.path.join(d, "p.img"))
        self.imgs = [pimg, simg]
        for mp in (self.smnt, self.pmnt):
            open(mp, "w").close()  # a FUSE export mounts over an existing regular file
        port = free_port()
        build_secondary(self._start("secondary"), simg, d, port, self.smnt)
        build_primary(self._start("primary"), pimg, port, self.pmnt)
        if self.nodelay:
            self.check_shim()
        return self.pmnt if self.side == "primary" else self.smnt

    def check_shim(self) -> None:
        """The shim must have set TCP_NODELAY on the NBD connection on both sides."""
        for role in ("primary", "secondary"):
            with open(os.path.join(self.dir, f"qemu-{role}.log"), errors="replace") as f:
                if "nodelay: TCP_NODELAY set" not in f.read():
                    raise RuntimeError(f"the TCP_NODELAY shim did not act in QEMU's {role}")

    def procs(self):
        other = "secondary" if self.side == "primary" else "primary"
        return {"daemon": self.qemu[self.side].pid if self.side in self.qemu else None,
                "peer": self.qemu[other].pid if other in self.qemu else None}

    def reset(self):
        self.checkpoint()
        # Dirty bitmaps on the overlays: bytes written to each since the last
        # checkpoint, 64 KiB granules (QEMU's counterpart of hidden_bytes/active_bytes).
        for node in ("hidden", "active"):
            self.qmp["secondary"].cmd("block-dirty-bitmap-add", {
                "node": node, "name": "bench", "granularity": CLUSTER})

    def checkpoint(self):
        t = time.monotonic()
        self.qmp["primary"].cmd("xen-colo-do-checkpoint")
        tp = time.monotonic() - t
        t = time.monotonic()
        self.qmp["secondary"].cmd("xen-colo-do-checkpoint")
        ts = time.monotonic() - t
        self._clear_bitmaps()
        return {"primary_s": tp, "secondary_s": ts, "total_s": tp + ts}

    def _bitmap_counts(self) -> dict:
        out = {}
        for n in self.qmp["secondary"].cmd("query-named-block-nodes", {"flat": True}):
            for bm in n.get("dirty-bitmaps") or []:
                if bm.get("name") == "bench" and n.get("node-name") in ("hidden", "active"):
                    out[n["node-name"]] = bm["count"]
        return out

    def _clear_bitmaps(self):
        for node in self._bitmap_counts():
            self.qmp["secondary"].cmd("block-dirty-bitmap-clear",
                                      {"node": node, "name": "bench"})

    def dirty(self):
        c = self._bitmap_counts()
        return {"hidden_bytes": c.get("hidden"), "active_bytes": c.get("active")}

    def _srep_children(self, s: QMP) -> list[tuple[str, str]]:
        g = s.cmd("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in g["nodes"]}
        return [(e["name"], names.get(e["child"])) for e in g["edges"]
                if names.get(e["parent"]) == "srep"]

    def failover(self):
        s = self.qmp["secondary"]
        for node in ("hidden", "active"):  # keep the commit free of extras
            try:
                s.cmd("block-dirty-bitmap-remove", {"node": node, "name": "bench"})
            except QMPError:
                pass
        t = time.monotonic()
        s.cmd("xen-set-replication", {"enable": False, "primary": False, "failover": True})
        deadline = t + 600
        while True:
            children = self._srep_children(s)
            if not any(name == "hidden disk" for name, _ in children):
                break  # replication_done(): the active commit has finished
            if ("file", "active") in children:
                raise RuntimeError("QEMU failover: the active commit failed "
                                   f"({s.cmd('query-xen-replication-status')})")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU failover: the active commit did not end in 600 s")
            time.sleep(0.005)
        elapsed = time.monotonic() - t
        s.cmd("nbd-server-stop")  # as docs/block-replication.txt says, after failover
        return {"failover_s": elapsed}

    def teardown(self):
        for role in ("primary", "secondary"):  # the primary first: it holds the NBD client
            stop_qemu(self.qmp.get(role), self.qemu.get(role))
        for mp in (self.smnt, self.pmnt):
            unmount(mp)  # only if QEMU died without removing its export
