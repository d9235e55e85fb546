#!/usr/bin/env python3
"""The replfs benchmark: one fio job set on every row, one table, a JSON copy.

Rows (each on fresh, fully allocated images of the same size and data, same warm-up):

  raw             the raw image file on local disk
  primary         the replfs primary's file, a replfs secondary attached on loopback
  secondary       the replfs secondary's view, a replfs primary attached
  qemu-primary    QEMU's own block replication (quorum + replication + NBD client),
                  the primary's top node exported as a file (block-export-add type=fuse)
  qemu-secondary  QEMU's secondary (NBD export of the disk, hidden and active qcow2
                  overlays, replication mode=secondary under a quorum), its top node
                  exported as a file

Per row: warm-up (write the whole file once, 1 MiB sequential, then a checkpoint so
the overlays are empty), the write jobs, a timed checkpoint (the dirty set is what the
write jobs left), the read jobs, a fixed dirtying write (one 4 KiB write per 64 KiB
cluster over the first quarter of the file), then a timed failover commit.

Run:  .venv/bin/python scripts/bench.py [--size 1G] [--runtime 10] [--json out.json]
                                        [--rows raw,primary,secondary,qemu-primary,qemu-secondary]
                                        [--jobs seqwrite,randwrite-qd1,...]
Read docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
TMPFS_MAGIC = 0x01021994
CLUSTER = 64 * KiB

ALL_ROWS = ["raw", "primary", "secondary", "qemu-primary", "qemu-secondary"]
ROW_TITLES = {
    "raw": "raw image file",
    "primary": "replfs primary",
    "secondary": "replfs secondary view",
    "qemu-primary": "QEMU primary",
    "qemu-secondary": "QEMU secondary",
}
#: The row each replfs row is compared with.
QEMU_PEER = {"primary": "qemu-primary", "secondary": "qemu-secondary"}

PSYNC = {"ioengine": "psync", "direct": "0", "iodepth": "1"}
AIO16 = {"ioengine": "libaio", "direct": "1", "iodepth": "16"}
WRITE_JOBS = [
    ("seqwrite", "1 MiB sequential write (psync)", "write", {"rw": "write", "bs": "1M", **PSYNC}),
    ("randwrite-qd1", "4 KiB random write QD1 (psync)", "write",
     {"rw": "randwrite", "bs": "4k", **PSYNC}),
    ("randwrite-qd16", "4 KiB random write QD16 (libaio, direct)", "write",
     {"rw": "randwrite", "bs": "4k", **AIO16}),
    ("write-fsync", "4 KiB write + fsync (psync, fsync=1)", "write",
     {"rw": "write", "bs": "4k", "fsync": "1", **PSYNC}),
]
READ_JOBS = [
    ("seqread", "1 MiB sequential read (psync)", "read", {"rw": "read", "bs": "1M", **PSYNC}),
    ("randread-qd1", "4 KiB random read QD1 (psync)", "read",
     {"rw": "randread", "bs": "4k", **PSYNC}),
    ("randread-qd16", "4 KiB random read QD16 (libaio, direct)", "read",
     {"rw": "randread", "bs": "4k", **AIO16}),
]
JOBS = WRITE_JOBS + READ_JOBS

NODELAY_NOTE = ("QEMU 7.2's NBD client does not set TCP_NODELAY on its socket, so with more "
                "than one request in flight (the QD16 jobs on qemu-primary) Nagle's algorithm "
                "and delayed ACKs hold requests back; QEMU is reported as shipped.")
FAILOVER_NOTE = ("QEMU failover: x-colo-lost-heartbeat only acts inside a COLO migration, which "
                 "this set-up (no VM, no migration) does not have. The same secondary active "
                 "commit is started with xen-set-replication enable=false primary=false "
                 "failover=true (replication_stop_all(failover=true) -> commit_active_start); "
                 "that commit job is internal (not in query-jobs), so its end is found by polling "
                 "x-debug-query-block-graph until the replication node has no 'hidden disk' child.")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t[-1:] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def human(n: float) -> str:
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


# -- processes -------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of the whole process (all threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_pid(pid: int, what: str) -> None:
    """Ends one process this script started: SIGTERM, then SIGKILL."""
    if not alive(pid):
        return
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if wait_gone(pid, grace):
            return
    log(f"bench: warning: {what} (pid {pid}) did not exit")


def mounted(path: str) -> bool:
    """Whether something is mounted on path (a directory, or a file for QEMU's exports)."""
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


def unmount(path: str) -> None:
    """fusermount3 -u, then -u -z if the mount is busy or its daemon is stuck."""
    if not mounted(path):
        return
    r = subprocess.run(["fusermount3", "-u", path], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 and mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, timeout=30)


def timed_write(path: str, value: str = "1") -> float:
    """``echo 1 > path``; returns the seconds the write took (it returns when done)."""
    t = time.monotonic()
    with open(path, "w") as f:
        f.write(value + "\n")
    return time.monotonic() - t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fio ----------------------------------------------------------------------------
def run_fio(name: str, filename: str, size: int, params: dict, time_based: int | None,
            cap: float, extra: dict | None = None) -> dict:
    args = ["fio", f"--name={name}", f"--filename={filename}", f"--size={size}",
            "--output-format=json", "--lat_percentiles=1", "--fallocate=none",
            "--invalidate=1", "--end_fsync=0"]
    if time_based:
        args += ["--time_based", f"--runtime={time_based}"]
    else:
        args += [f"--runtime={int(cap)}"]  # a bound, not a target: stops early only if slow
    for k, v in {**params, **(extra or {})}.items():
        args.append(f"--{k}={v}")
    limit = (time_based or cap) + 120
    r = subprocess.run(args, capture_output=True, text=True, timeout=limit)
    out = r.stdout[r.stdout.find("{"):] if "{" in r.stdout else ""
    if r.returncode != 0 or not out:
        raise RuntimeError(f"fio {name} failed (status {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-400:]}")
    job = json.loads(out)["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio {name}: error {job['error']}")
    return job


def fio_figures(job: dict, direction: str) -> dict:
    d = job[direction]
    lat = d.get("lat_ns") or {}
    pct = lat.get("percentile") or d.get("clat_ns", {}).get("percentile") or {}
    return {
        "iops": d["iops"],
        "mbps": d["bw_bytes"] / 1e6,
        "ops": d["total_ios"],
        "bytes": d["io_bytes"],
        "seconds": d["runtime"] / 1000,
        "lat_mean_us": lat.get("mean", 0) / 1000,
        "lat_p99_us": pct.get("99.000000", 0) / 1000,
    }


# -- QMP ------------------------------------------------------------------------------
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


# -- rows -----------------------------------------------------------------------------
class Row:
    """One system under test. ``setup`` returns the file fio runs on."""
    replicated = True

    def __init__(self, name: str, workdir: str, size: int) -> None:
        self.name = name
        self.dir = workdir
        self.size = size

    def make_image(self, path: str) -> str:
        """A fully allocated image holding the same data on every row and both hosts:
        a sparse one would let the secondary rows read holes (their warm-up writes land
        in the active overlay, and the checkpoint after it drops them)."""
        chunk = bytearray(random.Random(0).randbytes(MiB))
        with open(path, "wb") as f:
            for i in range(self.size // MiB):
                chunk[:8] = i.to_bytes(8, "little")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return path

    def procs(self) -> dict[str, int]:
        """role ("daemon": serves the file under test, "peer": the other side) -> pid."""
        return {}

    def reset(self) -> None:
        """After the warm-up: a checkpoint, so the overlays start empty."""

    def checkpoint(self) -> dict:
        raise NotImplementedError

    def dirty(self) -> dict:
        raise NotImplementedError

    def failover(self) -> dict:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class RawRow(Row):
    replicated = False

    def setup(self) -> str:
        return self.make_image(os.path.join(self.dir, "raw.img"))


class ReplfsRow(Row):
    def __init__(self, name, workdir, size):
        super().__init__(name, workdir, size)
        self.side = name  # "primary" | "secondary"
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
        simg = self.make_image(os.path.join(self.dir, "s.img"))
        pimg = self.make_image(os.path.join(self.dir, "p.img"))
        os.mkdir(self.smnt)
        os.mkdir(self.pmnt)
        self._replfs("secondary", self.smnt, "--listen", "127.0.0.1:0",
                     "--disk", f"disk0={simg}", "--workdir", os.path.join(self.dir, "overlays"),
                     "--log", os.path.join(self.dir, "secondary.log"))
        st = self._status(self.smnt)
        self.pids["secondary"] = st["pid"]
        port = st["listen"].rsplit(":", 1)[1]
        self._replfs("primary", self.pmnt, "--secondary", f"127.0.0.1:{port}",
                     "--disk", f"disk0={pimg}", "--log", os.path.join(self.dir, "primary.log"))
        self.pids["primary"] = self._status(self.pmnt)["pid"]
        return os.path.join(self.pmnt if self.side == "primary" else self.smnt, "disk0")

    def procs(self):
        other = "secondary" if self.side == "primary" else "primary"
        return {"daemon": self.pids.get(self.side), "peer": self.pids.get(other)}

    def reset(self):
        self.checkpoint()

    def checkpoint(self):
        tp = timed_write(os.path.join(self.pmnt, ".replfs", "checkpoint"))
        ts = timed_write(os.path.join(self.smnt, ".replfs", "checkpoint"))
        return {"primary_s": tp, "secondary_s": ts}

    def dirty(self):
        d = self._status(self.smnt)["disks"]["disk0"]
        return {"hidden_bytes": d["hidden_bytes"], "active_bytes": d["active_bytes"]}

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
            if pid and not wait_gone(pid, 20):
                stop_pid(pid, f"replfs {role}")
            unmount(mnt)


class QemuRow(Row):
    def __init__(self, name, workdir, size):
        super().__init__(name, workdir, size)
        self.side = name.removeprefix("qemu-")
        self.qemu: dict[str, subprocess.Popen] = {}
        self.qmp: dict[str, QMP] = {}
        self.smnt = os.path.join(workdir, "s.fuse")
        self.pmnt = os.path.join(workdir, "p.fuse")
        self.version = None

    def _start(self, role: str) -> QMP:
        sock = os.path.join(self.dir, f"{role}.qmp")
        logf = open(os.path.join(self.dir, f"qemu-{role}.log"), "wb")
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-M", "none", "-nodefaults", "-display", "none",
             "-name", f"replfs-bench-{role}", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            start_new_session=True)  # ^C reaches only this script, which cleans up in order
        logf.close()
        self.qemu[role] = proc
        q = self.qmp[role] = QMP(sock, proc)
        self.version = q.version
        return q

    def setup(self) -> str:
        d, size = self.dir, self.size
        simg = self.make_image(os.path.join(d, "s.img"))
        pimg = self.make_image(os.path.join(d, "p.img"))
        for ov in ("hidden", "active"):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", simg, "-F", "raw",
                            os.path.join(d, f"{ov}.qcow2"), str(size)],
                           check=True, capture_output=True, timeout=60)
        for mp in (self.smnt, self.pmnt):
            open(mp, "w").close()  # a FUSE export mounts over an existing regular file
        port = free_port()

        # The secondary: disk exported over NBD; active -> hidden -> disk; replication
        # (mode=secondary) under a quorum top node, which is the secondary VM's disk.
        s = self._start("secondary")
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
        s.cmd("block-export-add", {"type": "fuse", "id": "fuse-s", "node-name": "stop",
                                   "mountpoint": self.smnt, "writable": True,
                                   "growable": False})
        s.cmd("xen-set-replication", {"enable": True, "primary": False})

        # The primary: quorum (vote-threshold 1) over the local disk, plus a
        # replication (mode=primary) child over an NBD client, added with x-blockdev-change.
        p = self._start("primary")
        p.cmd("blockdev-add", {"driver": "raw", "node-name": "pdisk",
                               "file": {"driver": "file", "filename": pimg}})
        p.cmd("blockdev-add", {"driver": "quorum", "node-name": "ptop", "vote-threshold": 1,
                               "read-pattern": "fifo", "children": ["pdisk"]})
        p.cmd("blockdev-add", {"driver": "replication", "node-name": "prep", "mode": "primary",
                               "file": {"driver": "nbd", "node-name": "nbd-client",
                                        "server": {"type": "inet", "host": "127.0.0.1",
                                                   "port": str(port)},
                                        "export": "disk0"}})
        p.cmd("x-blockdev-change", {"parent": "ptop", "node": "prep"})
        p.cmd("block-export-add", {"type": "fuse", "id": "fuse-p", "node-name": "ptop",
                                   "mountpoint": self.pmnt, "writable": True,
                                   "growable": False})
        p.cmd("xen-set-replication", {"enable": True, "primary": True})
        return self.pmnt if self.side == "primary" else self.smnt

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
        return {"primary_s": tp, "secondary_s": ts}

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
            q, proc = self.qmp.get(role), self.qemu.get(role)
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
        for mp in (self.pmnt, self.smnt):
            unmount(mp)  # only if QEMU died without removing its export


ROW_CLASSES = {"raw": RawRow, "primary": ReplfsRow, "secondary": ReplfsRow,
               "qemu-primary": QemuRow, "qemu-secondary": QemuRow}


# -- running one row --------------------------------------------------------------------
DROP_CACHES = "/proc/sys/vm/drop_caches"


def drop_caches(enabled: bool) -> None:
    """Writes back and drops the page cache, so that every job of every row starts
    cold: the raw image, and the images behind replfs and QEMU alike."""
    os.sync()
    if enabled:
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")


def run_job(row: Row, path: str, size: int, runtime: int, job, drop: bool) -> dict:
    jid, title, direction, params = job
    drop_caches(drop)
    pids = {k: v for k, v in row.procs().items() if v}
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    fj = run_fio(jid, path, size, params, runtime, cap=runtime)
    res = fio_figures(fj, direction)
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    res["cpu_s"] = {}
    for k in pids:
        if before[k] is not None and after[k] is not None:
            res["cpu_s"][k] = after[k] - before[k]
            res[f"{k}_cpu_us_per_op"] = (after[k] - before[k]) * 1e6 / max(res["ops"], 1)
    return res


def run_row(name: str, base: str, args, result: dict) -> None:
    workdir = tempfile.mkdtemp(prefix=f"{name}-", dir=base)
    row = ROW_CLASSES[name](name, workdir, args.size_bytes)
    size, runtime = args.size_bytes, args.runtime
    try:
        t = time.monotonic()
        path = row.setup()
        result["setup_s"] = time.monotonic() - t
        result["file"] = path
        if isinstance(row, QemuRow):
            result["qemu_version"] = row.version

        # Warm-up: the whole file once (so reads read real data), then a checkpoint.
        log(f"[{name}] warm-up: writing {human(size)} sequentially")
        cap = max(120, 12 * runtime)
        drop_caches(args.drop_caches)
        wj = run_fio("warmup", path, size, {"rw": "write", "bs": "1M", **PSYNC, "end_fsync": "1"},
                     None, cap=cap)
        w = fio_figures(wj, "write")
        result["warmup"] = {"seconds": w["seconds"], "mbps": w["mbps"], "bytes": w["bytes"],
                            "complete": w["bytes"] >= size}
        if w["bytes"] < size:
            result.setdefault("notes", []).append(
                f"warm-up stopped after {cap} s with {human(w['bytes'])} of {human(size)} written")
        if row.replicated:
            row.reset()

        def run_jobs(jobs):
            for job in jobs:
                if job[0] not in args.jobs:
                    continue
                log(f"[{name}] {job[1]}")
                r = result["jobs"][job[0]] = run_job(row, path, size, runtime, job,
                                                     args.drop_caches)
                log(f"[{name}]   {r['iops']:.0f} IOPS, {r['mbps']:.1f} MB/s")

        run_jobs(WRITE_JOBS)

        if row.replicated:
            dirty = row.dirty()
            c = row.checkpoint()
            result["checkpoint"] = {**dirty, **c}
            log(f"[{name}] checkpoint: dirty hidden {human(dirty['hidden_bytes'] or 0)}, "
                f"active {human(dirty['active_bytes'] or 0)}: {c['secondary_s']:.3f} s "
                f"(primary side {c['primary_s']:.3f} s)")

        run_jobs(READ_JOBS)

        if row.replicated:
            # A fixed dirty set for the failover: one 4 KiB write per 64 KiB cluster
            # over the first quarter of the file.
            span = max(CLUSTER, size // 4 // CLUSTER * CLUSTER)
            log(f"[{name}] failover: dirtying one 4 KiB block per 64 KiB over {human(span)}")
            run_fio("dirty", path, span, {"rw": f"write:{CLUSTER - 4 * KiB}", "bs": "4k",
                                          **PSYNC}, None, cap=cap)
            dirty = row.dirty()
            f = row.failover()
            result["failover"] = {**dirty, **f}
            log(f"[{name}] failover: dirty hidden {human(dirty['hidden_bytes'] or 0)}, "
                f"active {human(dirty['active_bytes'] or 0)}: {f['failover_s']:.3f} s")

        result["max_rss_kib"] = {k: vm_hwm_kib(p) for k, p in row.procs().items() if p}
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"[{name}] FAILED: {result['error']}")
        try:
            result["max_rss_kib"] = {k: vm_hwm_kib(p) for k, p in row.procs().items() if p}
        except Exception:
            pass
    finally:
        t = time.monotonic()
        row.teardown()
        result["teardown_s"] = time.monotonic() - t
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


# -- output ----------------------------------------------------------------------------------
def ratios(results: dict) -> dict:
    rows = results["rows"]
    out = {"vs_raw": {}, "vs_qemu": {}}
    raw = rows.get("raw", {}).get("jobs", {})
    for name, r in rows.items():
        for jid, fig in r.get("jobs", {}).items():
            if jid in raw and raw[jid]["iops"]:
                out["vs_raw"].setdefault(name, {})[jid] = fig["iops"] / raw[jid]["iops"]
    for mine, theirs in QEMU_PEER.items():
        a, b = rows.get(mine, {}), rows.get(theirs, {})
        for jid, fig in a.get("jobs", {}).items():
            other = b.get("jobs", {}).get(jid)
            if other and other["iops"]:
                out["vs_qemu"].setdefault(mine, {})[jid] = fig["iops"] / other["iops"]
        for what, key in (("checkpoint", "secondary_s"), ("failover", "failover_s")):
            x, y = a.get(what, {}).get(key), b.get(what, {}).get(key)
            if x is not None and y:
                out["vs_qemu"].setdefault(mine, {})[what] = x / y
    return out


def fmt(v, spec: str, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    return format(v, spec).rjust(width)


def print_report(results: dict) -> None:
    rows = results["rows"]
    rat = results["ratios"]
    h = results["host"]
    print()
    print(f"replfs benchmark: {human(results['size'])} images, {results['runtime']} s per job, "
          f"{results['fio']}, {h['cpus']} CPUs, load {h['load_before']} before")
    if results.get("qemu"):
        print(f"QEMU: {results['qemu']}")
    print(f"scratch images in {results['dir']}" + ("" if results["kept"] else " (removed)"))
    for name in rows:
        r = rows[name]
        extra = "" if r.get("ok") else \
            f"   ** {r.get('skipped') or r.get('error') or 'interrupted'}"
        print(f"  {name:15} {ROW_TITLES[name]}{extra}")
    print()
    print("figures: IOPS and MB/s (10^6 B/s); lat = mean and 99th percentile latency per I/O;")
    print("CPU µs/op = CPU time of the daemon serving the file (and of its peer) / operations;")
    print("x raw = IOPS / raw row's IOPS; x QEMU = replfs row / its QEMU row (same job).")
    head = (f"  {'row':15}{'IOPS':>10}{'MB/s':>9}{'lat µs':>9}{'p99 µs':>9}"
            f"{'CPU µs/op':>11}{'peer µs/op':>11}{'x raw':>8}{'x QEMU':>8}")
    for jid, title, _, _ in JOBS:
        if not any(jid in r.get("jobs", {}) for r in rows.values()):
            continue
        print()
        print(title)
        print(head)
        for name, r in rows.items():
            f = r.get("jobs", {}).get(jid)
            if not f:
                continue
            print(f"  {name:15}{f['iops']:>10.0f}{f['mbps']:>9.1f}{f['lat_mean_us']:>9.1f}"
                  f"{f['lat_p99_us']:>9.1f}"
                  f"{fmt(f.get('daemon_cpu_us_per_op'), '.1f', 11)}"
                  f"{fmt(f.get('peer_cpu_us_per_op'), '.1f', 11)}"
                  f"{fmt(rat['vs_raw'].get(name, {}).get(jid), '.3f', 8)}"
                  f"{fmt(rat['vs_qemu'].get(name, {}).get(jid), '.2f', 8)}")

    rep = [n for n, r in rows.items() if r.get("checkpoint") or r.get("failover")]
    if rep:
        print()
        print("Checkpoint (after the write jobs; dirty = bytes held in the overlays) and failover")
        print("(active commit, after one 4 KiB write per 64 KiB over the first quarter of the file)")
        print(f"  {'row':15}{'hidden':>10}{'active':>10}{'ckpt s':>9}{'prim. s':>9}{'x QEMU':>8}"
              f"   {'hidden':>10}{'active':>10}{'failover s':>11}{'x QEMU':>8}")
        for name in rep:
            c, f = rows[name].get("checkpoint", {}), rows[name].get("failover", {})
            q = rat["vs_qemu"].get(name, {})
            hb = lambda v: "-" if v is None else human(v)  # noqa: E731
            print(f"  {name:15}{hb(c.get('hidden_bytes')):>10}{hb(c.get('active_bytes')):>10}"
                  f"{fmt(c.get('secondary_s'), '.3f', 9)}{fmt(c.get('primary_s'), '.3f', 9)}"
                  f"{fmt(q.get('checkpoint'), '.2f', 8)}   "
                  f"{hb(f.get('hidden_bytes')):>10}{hb(f.get('active_bytes')):>10}"
                  f"{fmt(f.get('failover_s'), '.3f', 11)}{fmt(q.get('failover'), '.2f', 8)}")

    print()
    print("Warm-up and memory (max RSS = VmHWM of the daemon serving the file / of its peer)")
    print(f"  {'row':15}{'warm-up s':>10}{'MB/s':>9}{'setup s':>9}{'RSS MiB':>9}{'peer MiB':>9}")
    for name, r in rows.items():
        if not r.get("warmup"):
            continue
        w, m = r["warmup"], r.get("max_rss_kib", {})
        mib = lambda k: None if m.get(k) is None else m[k] / 1024  # noqa: E731
        print(f"  {name:15}{w['seconds']:>10.1f}{w['mbps']:>9.1f}{fmt(r.get('setup_s'), '.1f', 9)}"
              f"{fmt(mib('daemon'), '.1f', 9)}{fmt(mib('peer'), '.1f', 9)}")

    if results["notes"]:
        print()
        print("Notes")
        for n in results["notes"]:
            print(f"  - {n}")
    print(f"\ntotal time {results['elapsed_s']:.0f} s")


# -- main ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    ap.add_argument("--rows", default=",".join(ALL_ROWS),
                    help=f"comma-separated, in this order (default {','.join(ALL_ROWS)})")
    ap.add_argument("--jobs", default=",".join(j[0] for j in JOBS),
                    help="comma-separated job ids to run (default: all); the checkpoint "
                         "and failover are always timed")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the scratch images go (default /var/tmp; not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch images and logs")
    ap.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                    help="do not drop the page cache before each job (done by default, as root)")
    args = ap.parse_args(argv)

    try:
        args.size_bytes = parse_size(args.size)
    except ValueError:
        ap.error(f"--size: bad size {args.size!r}")
    if args.size_bytes < 16 * MiB or args.size_bytes % MiB:
        ap.error("--size must be a whole number of MiB, at least 16M")
    if args.runtime < 1:
        ap.error("--runtime must be at least 1")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_ROWS]
    if bad or not names or len(set(names)) != len(names):
        ap.error(f"--rows: expected a list of {', '.join(ALL_ROWS)}")
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not args.jobs or set(args.jobs) - {j[0] for j in JOBS}:
        ap.error(f"--jobs: expected a list of {', '.join(j[0] for j in JOBS)}")
    if args.drop_caches and not os.access(DROP_CACHES, os.W_OK):
        log(f"bench: note: {DROP_CACHES} is not writable (not root): page cache not dropped")
        args.drop_caches = False
    for tool in ("fio", "fusermount3"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (run scripts/setup.sh)")

    os.makedirs(args.dir, exist_ok=True)
    if _is_tmpfs(args.dir):
        log(f"bench: warning: {args.dir} is tmpfs; the raw row will not measure a disk")
    base = tempfile.mkdtemp(prefix="replfs-bench-", dir=args.dir)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    fio_version = subprocess.run(["fio", "--version"], capture_output=True,
                                 text=True).stdout.strip()
    load = os.getloadavg()[0]
    results = {
        "command": [os.path.relpath(sys.argv[0], os.getcwd())] + (argv or sys.argv[1:]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"uname": " ".join(platform.uname()[:3]), "cpus": os.cpu_count(),
                 "load_before": round(load, 2)},
        "size": args.size_bytes, "runtime": args.runtime, "fio": fio_version,
        "qemu": None, "dir": base, "kept": args.keep,
        "jobs": [{"id": j[0], "title": j[1], "fio": j[3]} for j in JOBS],
        "rows": {}, "notes": [],
    }
    if load > 1.0:
        results["notes"].append(f"load average was {load:.2f} at the start: figures may be noisy")
    qemu = shutil.which("qemu-system-x86_64")
    qemu_rows = [n for n in names if n.startswith("qemu-")]
    if qemu_rows:
        if not qemu or not shutil.which("qemu-img"):
            results["notes"].append(
                "qemu-system-x86_64 (or qemu-img) is not installed: QEMU rows skipped "
                "(apt-get install qemu-system-x86 qemu-utils)")
        else:
            results["qemu"] = subprocess.run([qemu, "--version"], capture_output=True,
                                             text=True).stdout.splitlines()[0]
            results["notes"] += [NODELAY_NOTE, FAILOVER_NOTE]

    per_row = len(args.jobs) * args.runtime + 15
    log(f"bench: {len(names)} rows x {len(args.jobs)} jobs x {args.runtime} s; about "
        f"{len(names) * per_row / 60:.0f} min plus warm-ups; images in {base}")
    t0 = time.monotonic()
    interrupted = False
    try:
        for name in names:
            r = results["rows"][name] = {"title": ROW_TITLES[name], "jobs": {}}
            if name.startswith("qemu-") and not results["qemu"]:
                r.update(ok=False, skipped="qemu-system-x86_64 not installed")
                continue
            run_row(name, base, args, r)
            for n in r.pop("notes", []):
                results["notes"].append(f"{name}: {n}")
    except KeyboardInterrupt:
        interrupted = True
        results["notes"].append("interrupted: partial results")
        log("bench: interrupted")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t0
    failed = [n for n, r in results["rows"].items() if r.get("error")]
    for n in failed:
        results["notes"].append(f"{n}: failed: {results['rows'][n]['error']}")
    results["notes"].append(
        ("before each job: sync, then the page cache dropped (drop_caches=1); "
         if args.drop_caches else "before each job: sync (the page cache is not dropped); ") +
        "psync jobs are buffered (a job's reads may hit the cache it fills); libaio jobs are O_DIRECT. Neither replfs nor QEMU 7.2's FUSE "
        "export uses a writeback cache: every write reaches the daemon before it returns.")
    results["ratios"] = ratios(results)
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        log(f"bench: JSON written to {args.json}")
    return 130 if interrupted else 1 if failed else 0


def _is_tmpfs(path: str) -> bool:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True,
                             text=True).stdout.strip()
        return int(out, 16) == TMPFS_MAGIC
    except (ValueError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
