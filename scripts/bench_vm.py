#!/usr/bin/env python3
"""The VM row: a real guest runs on the file, as users run it.

    .venv/bin/python scripts/bench_vm.py [--runs 5] [--runtime 5] [--size 1G]
                                         [--rows raw,primary,primary-ckpt,qemu] [--json F]

qemu-system-x86_64 (``-accel tcg``: /dev/kvm here is nested and guests stall under it;
the disk path is the same) boots a Debian kernel and a busybox initramfs built by
scripts/vm/build.py, with the disk attached as users attach it:
``-drive file=FILE,format=raw,if=virtio,cache=none,aio=native``.  In the guest, vmbench
(scripts/vm/vmbench.c, static) runs on /dev/vda, one request at a time, O_DIRECT:
1 MiB sequential writes, 4 KiB random writes, 4 KiB random writes + fdatasync, 4 KiB
random reads; one line per job; then the guest powers off.

Rows (fresh, fully written images of --size, the same data on both hosts, per boot):

  raw           the raw image file
  primary       MOUNT/disk0 of a replfs primary (--protocol sync), a replfs secondary on
                loopback, checkpointed before the boot
  primary-ckpt  the same with --protocol checkpoint (skipped, with a note, if this replfs
                has no such flag)
  qemu          QEMU's own block replication: the guest's QEMU is itself the primary
                (quorum over the raw image opened cache=none/aio=native, plus a
                replication mode=primary child over an NBD client; the graph built over
                QMP before the guest starts), a second QEMU (-M none) the secondary
                (NBD export, hidden and active qcow2 overlays), as scripts/bench does it
  qemu-nodelay  the same, both QEMUs with TCP_NODELAY forced by the LD_PRELOAD shim
                scripts/bench/nodelay.c (as shipped, a 1 MiB write over QEMU's NBD
                client waits for a delayed ACK: about 25 writes/s)

The rows alternate within each run (run 1: every row, run 2: every row, ...); the table
gives the median over the runs, the spread, and the ratios to raw and to QEMU.  CPU: the
guest QEMU's CPU time per run, and the storage daemons' (both replfs daemons; the QEMU
secondary); "stack CPU" = guest QEMU + daemons - the raw row's median guest QEMU CPU, the
cost of the storage path per guest run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from replfs.units import human  # noqa: E402
from scripts.bench import disk_size, log  # noqa: E402
from scripts.bench.report import print_notes  # noqa: E402
from scripts.bench.rows import RawRow, RowSkipped  # noqa: E402
from scripts.bench.rows_qemu import (build_primary, build_secondary,  # noqa: E402
                                     build_shim, start_qemu, stop_qemu)
from scripts.bench.rows_replfs import ReplfsRow  # noqa: E402
from scripts.bench.run import cpu_seconds  # noqa: E402
from scripts.vm.build import build as build_guest  # noqa: E402
from tests._proc import free_port  # noqa: E402

ROWS = ["raw", "primary", "primary-ckpt", "qemu", "qemu-nodelay"]
TITLES = {"raw": "raw image file", "primary": "replfs primary (--protocol sync)",
          "primary-ckpt": "replfs primary, --protocol checkpoint",
          "qemu": "QEMU replication (the guest's QEMU is the primary), as shipped",
          "qemu-nodelay": "the same, TCP_NODELAY forced on both QEMUs (nodelay.c)"}
JOBS = [("seqwrite", "1 MiB sequential write, direct"),
        ("randwrite", "4 KiB random write, direct, QD1"),
        ("randwrite-fsync", "4 KiB random write + fdatasync"),
        ("randread", "4 KiB random read, direct, QD1")]
DRIVE_OPTS = "format=raw,if=virtio,cache=none,aio=native"


def guest_argv(kernel: str, initrd: str, runtime: int, jobs: list[str]) -> list[str]:
    return ["-accel", "tcg", "-M", "pc", "-m", "256", "-smp", "1", "-nodefaults",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", kernel, "-initrd", initrd,
            "-append", f"console=ttyS0 quiet panic=-1 vmbench.runtime={runtime} "
                       f"vmbench.jobs={','.join(jobs)}"]


def parse_guest(text: str) -> dict:
    """The VMBENCH lines of the guest's console: job id -> figures."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("VMBENCH job="):
            continue
        kv = dict(f.split("=", 1) for f in line.split()[1:])
        out[kv["job"]] = {"ops": int(kv["ops"]), "bytes": int(kv["bytes"]),
                          "seconds": float(kv["secs"]), "iops": float(kv["iops"]),
                          "mbps": float(kv["mbps"]), "lat_us": float(kv["lat_us"])}
    return out


class VmQemu:
    """The qemu row: a QEMU -M none secondary, and the guest's QEMU as the primary."""

    def __init__(self, workdir: str, size: int, shim: str | None = None) -> None:
        self.dir, self.size, self.shim = workdir, size, shim
        self.procs: dict = {}
        self.qmps: dict = {}

    def setup(self, mk) -> None:
        simg = mk(os.path.join(self.dir, "s.img"))
        self.pimg = mk(os.path.join(self.dir, "p.img"))
        self.port = free_port()
        proc, q = start_qemu(["-M", "none", "-nodefaults", "-display", "none",
                              "-name", "replfs-vm-secondary"], self.dir, "secondary",
                             self.shim)
        self.procs["secondary"], self.qmps["secondary"] = proc, q
        build_secondary(q, simg, self.dir, self.port, None)

    def start_guest(self, argv: list[str], console) -> subprocess.Popen:
        proc, q = start_qemu([*argv, "-S", "-name", "replfs-vm-guest"], self.dir, "guest",
                             self.shim, stdout=console)
        self.procs["guest"], self.qmps["guest"] = proc, q
        build_primary(q, self.pimg, self.port, None, direct=True)
        q.cmd("device_add", {"driver": "virtio-blk-pci", "drive": "ptop", "id": "vda"})
        q.cmd("cont")
        return proc

    def teardown(self) -> None:
        for role in ("guest", "secondary"):
            stop_qemu(self.qmps.pop(role, None), self.procs.pop(role, None))


def one_boot(name: str, base: str, args, kernel: str, initrd: str) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"vm-{name}-", dir=base)
    res: dict = {"row": name}
    console_path = os.path.join(workdir, "console.log")
    row = qrow = None
    guest = None
    try:
        t = time.monotonic()
        argv = guest_argv(kernel, initrd, args.runtime, args.jobs)
        daemons: dict[str, int] = {}
        if name == "raw":
            row = RawRow(name, workdir, args.size_bytes)
            drive = row.setup()
        elif name.startswith("qemu"):
            shim = build_shim(workdir) if name == "qemu-nodelay" else None
            qrow = VmQemu(workdir, args.size_bytes, shim)
            qrow.setup(RawRow(name, workdir, args.size_bytes).make_image)
            daemons["secondary"] = qrow.procs["secondary"].pid
            drive = None
        else:
            row = ReplfsRow(name, workdir, args.size_bytes)
            drive = row.setup()
            row.reset()  # a checkpoint: empty overlays, the images full of real data
            daemons = {k: v for k, v in row.pids.items() if v}
        res["setup_s"] = time.monotonic() - t
        before = {k: cpu_seconds(p) for k, p in daemons.items()}
        t = time.monotonic()
        with open(console_path, "wb") as console:
            if qrow is not None:
                guest = qrow.start_guest(argv, console)
            else:
                guest = subprocess.Popen(
                    ["qemu-system-x86_64", *argv, "-name", "replfs-vm-guest",
                     "-drive", f"file={drive},{DRIVE_OPTS}"],
                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                    start_new_session=True)
            limit = 120 + len(args.jobs) * args.runtime * 3
            # The guest QEMU's CPU: sampled while it lives (/proc goes with the process).
            gcpu = 0.0
            while guest.poll() is None:
                if time.monotonic() - t > limit:
                    raise RuntimeError(f"the guest did not power off within {limit} s")
                c = cpu_seconds(guest.pid)
                gcpu = c if c is not None else gcpu
                time.sleep(0.1)
        res["guest_s"] = time.monotonic() - t
        res["guest_cpu_s"] = gcpu
        after = {k: cpu_seconds(p) for k, p in daemons.items()}
        res["daemon_cpu_s"] = sum(after[k] - before[k] for k in daemons
                                  if after[k] is not None and before[k] is not None)
        with open(console_path, errors="replace") as f:
            text = f.read()
        res["jobs"] = parse_guest(text)
        if name == "qemu-nodelay":  # the shim must have acted on both sides of the link
            with open(os.path.join(workdir, "qemu-secondary.log"), errors="replace") as f:
                if "nodelay: TCP_NODELAY set" not in text + f.read():
                    raise RuntimeError("the TCP_NODELAY shim did not act")
        if "VMBENCH-END ok" not in text or set(args.jobs) - set(res["jobs"]):
            tail = " | ".join(text.strip().splitlines()[-5:])
            raise RuntimeError(f"the guest did not complete its jobs: {tail}")
        res["ok"] = True
    except RowSkipped as exc:
        res.update(ok=False, skipped=str(exc))
    except Exception as exc:
        res.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    finally:
        if guest is not None and guest.poll() is None:
            guest.kill()
            guest.wait()
        if qrow is not None:
            qrow.teardown()
        if row is not None:
            row.teardown()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return res


def summarize(results: dict) -> dict:
    """Per row and job: the median IOPS over the runs that completed, min, max."""
    out: dict = {}
    for name in results["rows"]:
        runs = [r for r in results["runs"] if r["row"] == name and r.get("ok")]
        s = out[name] = {"runs": len(runs), "jobs": {}}
        if not runs:
            continue
        for jid, _ in JOBS:
            v = [r["jobs"][jid]["iops"] for r in runs if jid in r["jobs"]]
            m = [r["jobs"][jid]["mbps"] for r in runs if jid in r["jobs"]]
            if v:
                s["jobs"][jid] = {"iops": statistics.median(v), "min": min(v), "max": max(v),
                                  "mbps": statistics.median(m)}
        s["guest_cpu_s"] = statistics.median(r["guest_cpu_s"] for r in runs)
        s["daemon_cpu_s"] = statistics.median(r["daemon_cpu_s"] for r in runs)
    raw_guest = out.get("raw", {}).get("guest_cpu_s")
    for s in out.values():
        if raw_guest is not None and "guest_cpu_s" in s:
            s["stack_cpu_s"] = s["guest_cpu_s"] + s["daemon_cpu_s"] - raw_guest
    return out


def print_table(results: dict) -> None:
    summ = results["summary"]
    print()
    print(f"VM row: {human(results['size'])} disk, {results['runtime']} s per guest job, "
          f"{results['runs_asked']} runs alternating, -accel tcg, -drive ...,{DRIVE_OPTS}")
    for name in results["rows"]:
        print(f"  {name:13} {TITLES[name]} ({summ[name]['runs']} runs completed)")
    print("median IOPS over the runs (min-max); x raw, x QEMU: ratio of the medians")
    for jid, title in JOBS:
        if jid not in results["jobs"]:
            continue
        print()
        print(title)
        print(f"  {'row':13}{'IOPS':>9}{'MB/s':>9}{'min':>9}{'max':>9}{'x raw':>8}{'x QEMU':>8}"
              f"{'x Q-nd':>8}")
        ref = {n: summ.get(n, {}).get("jobs", {}).get(jid, {}).get("iops")
               for n in ("raw", "qemu", "qemu-nodelay")}

        def x(f, n, name):
            ok = ref[n] and not (n != "raw" and name in ("raw", "qemu", "qemu-nodelay"))
            return f"{f['iops'] / ref[n]:8.2f}" if ok else f"{'-':>8}"
        for name in results["rows"]:
            f = summ[name]["jobs"].get(jid)
            if not f:
                continue
            print(f"  {name:13}{f['iops']:>9.0f}{f['mbps']:>9.1f}{f['min']:>9.0f}"
                  f"{f['max']:>9.0f}{x(f, 'raw', name)}{x(f, 'qemu', name)}"
                  f"{x(f, 'qemu-nodelay', name)}")
    print()
    print("CPU per guest run, medians (s): guest QEMU; storage daemons (replfs: both daemons;")
    print("qemu: its secondary); stack = guest QEMU + daemons - raw's guest QEMU")
    print(f"  {'row':13}{'guest':>9}{'daemons':>9}{'stack':>9}{'x QEMU':>8}{'x Q-nd':>8}")
    qs = {n: summ.get(n, {}).get("stack_cpu_s") for n in ("qemu", "qemu-nodelay")}
    for name in results["rows"]:
        s = summ[name]
        if "guest_cpu_s" not in s:
            continue
        st = s.get("stack_cpu_s")
        line = f"  {name:13}{s['guest_cpu_s']:>9.1f}{s['daemon_cpu_s']:>9.1f}"
        line += f"{st:>9.1f}" if st is not None else f"{'-':>9}"
        for n in ("qemu", "qemu-nodelay"):
            mine = st is not None and (qs[n] or 0) > 0 and name.startswith("primary")
            line += f"{st / qs[n]:>8.2f}" if mine else f"{'-':>8}"
        print(line)
    print_notes(results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="1G", help="disk size (default 1G)")
    ap.add_argument("--runtime", type=int, default=5, help="seconds per guest job (default 5)")
    ap.add_argument("--runs", type=int, default=5, help="runs, the rows alternating (default 5)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"of {','.join(ROWS)}")
    ap.add_argument("--jobs", default=",".join(j for j, _ in JOBS),
                    help=f"of {','.join(j for j, _ in JOBS)}")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory (not tmpfs)")
    ap.add_argument("--cache", default="/var/tmp/replfs-vm-cache",
                    help="the guest's packages, kernel and initramfs (scripts/vm/build.py)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch images and logs")
    args = ap.parse_args(argv)
    args.size_bytes = disk_size(ap, args.size)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if not rows or set(rows) - set(ROWS) or len(set(rows)) != len(rows):
        ap.error(f"--rows: expected a list of {', '.join(ROWS)}")
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not args.jobs or set(args.jobs) - {j for j, _ in JOBS}:
        ap.error(f"--jobs: expected a list of {', '.join(j for j, _ in JOBS)}")
    if args.runs < 1 or args.runtime < 1:
        ap.error("--runs and --runtime must be at least 1")
    for tool in ("qemu-system-x86_64", "qemu-img", "gcc", "fusermount3"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils "
                     "gcc fuse3)")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    log("bench_vm: building the guest (scripts/vm/build.py)")
    kernel, initrd = build_guest(args.cache)
    base = tempfile.mkdtemp(prefix="replfs-benchvm-", dir=args.dir)
    results = {"command": ["scripts/bench_vm.py"] + (argv or sys.argv[1:]),
               "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "load_before": round(os.getloadavg()[0], 2), "size": args.size_bytes,
               "runtime": args.runtime, "runs_asked": args.runs, "rows": rows,
               "jobs": args.jobs, "runs": [], "notes": [],
               "qemu": subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                      text=True, check=False).stdout.splitlines()[0]}
    if results["load_before"] > 1.0:
        results["notes"].append(f"load average was {results['load_before']} at the start")
    t0 = time.monotonic()
    rc = 0
    skipped: set[str] = set()
    try:
        for i in range(args.runs):
            for name in rows:
                if name in skipped:
                    continue
                log(f"bench_vm: run {i + 1}/{args.runs}: {name}")
                r = one_boot(name, base, args, kernel, initrd)
                r["run"] = i + 1
                results["runs"].append(r)
                if r.get("skipped"):
                    skipped.add(name)
                    results["notes"].append(f"{name}: skipped: {r['skipped']}")
                elif not r.get("ok"):
                    rc = 1
                    results["notes"].append(f"{name}, run {i + 1}: failed: {r['error']}")
                else:
                    log("bench_vm:   " + ", ".join(f"{j} {f['iops']:.0f}"
                                                  for j, f in r["jobs"].items()) + " IOPS")
    except KeyboardInterrupt:
        rc = 130
        results["notes"].append("interrupted: partial results")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t0
    results["summary"] = summarize(results)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
