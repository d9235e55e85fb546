#!/usr/bin/env python3
"""The replfs benchmark: one fio job set on every row, one table, a JSON copy.

Rows (each on fresh, fully allocated images of the same size and data, same warm-up):

  raw                   the raw image file on local disk
  primary               the replfs primary's file (--protocol sync), a replfs secondary
                        attached on loopback
  primary-ckpt          the same with --protocol checkpoint (skipped, with a note, if this
                        replfs has no such flag); its checkpoints are `pair` checkpoints
  primary-alone         the primary after `replfs failover` on it: the FUSE stack alone
  secondary             the replfs secondary's view, a replfs primary attached
  primary-tls           the primary row with the replication link over TLS (--tls-dir: NBD
  secondary-tls         STARTTLS, certificates verified on both sides); the report gives
                        the TLS cost (x plain) per job
  qemu-primary          QEMU's own block replication (quorum + replication + NBD client),
                        the primary's top node exported as a file (block-export-add type=fuse)
  qemu-primary-nodelay  the same, TCP_NODELAY forced on both QEMUs' TCP sockets
                        (LD_PRELOAD shim nodelay.c, compiled with gcc at run time)
  qemu-secondary        QEMU's secondary (NBD export of the disk, hidden and active qcow2
                        overlays, replication mode=secondary under a quorum), its top node
                        exported as a file; qemu-secondary-nodelay: with the shim

Per row: warm-up (write the whole file once, 1 MiB sequential, then a checkpoint so
the overlays are empty; the images are checked for holes), then each write job right
after a checkpoint (the headline: 4 KiB random write QD1, libaio direct), a timed
checkpoint (the dirty set is what the last write job left), the read jobs, a fixed
dirtying write (one 4 KiB write per 64 KiB cluster over the first quarter of the file),
then a timed failover commit.  At the end: the issue's targets with PASS/short.

Run:  .venv/bin/python scripts/bench [--size 1G] [--runtime 10] [--json out.json]
                                    [--rows raw,primary,primary-ckpt,...]
                                    [--jobs randwrite-qd1-direct,seqwrite,...]
      (from the repository root, .venv/bin/python -m scripts.bench ... is the same)
Read docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import os
import sys

# `python scripts/bench` runs this file as a plain script (no package, scripts/bench/
# as sys.path[0]): it then puts the repository root first on sys.path instead, and
# runs itself again as the package's __main__, the way `python -m scripts.bench` does
# from the repository root.  Either way the root is first on sys.path, for `replfs`
# and `tests._proc` whatever the current directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))
if not __package__:
    if sys.path and os.path.realpath(sys.path[0]) == os.path.realpath(_HERE):
        del sys.path[0]
    sys.path.insert(0, _REPO)
    import runpy

    runpy.run_module("scripts.bench", run_name="__main__", alter_sys=True)
    sys.exit(0)  # not reached: main() ends with sys.exit
if sys.path[:1] != [_REPO]:
    sys.path.insert(0, _REPO)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from . import disk_size, log  # noqa: E402
from .fio import JOBS  # noqa: E402
from .report import print_report, ratios, targets  # noqa: E402
from .rows import ALL_ROWS, DEFAULT_ROWS, ROW_TITLES  # noqa: E402
from .rows_qemu import FAILOVER_NOTE, NODELAY_NOTE  # noqa: E402
from .run import DROP_CACHES, run_row  # noqa: E402

TMPFS_MAGIC = 0x01021994


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="image size (default 1G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job (default 10)")
    ap.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    ap.add_argument("--reps", type=int, default=1,
                    help="run all the rows this many times, alternating (rows 1..n, then "
                         "again); the table gives the mean of the reps, the targets each "
                         "rep's ratio too (default 1)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help=f"comma-separated, in this order, of {','.join(ALL_ROWS)} "
                         f"(default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--jobs", default=",".join(j[0] for j in JOBS),
                    help="comma-separated job ids to run (default: all); the checkpoint "
                         "and failover are always timed")
    ap.add_argument("--dir", default="/var/tmp",
                    help="where the scratch images go (default /var/tmp; not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch images and logs")
    ap.add_argument("--drop-caches", choices=("row", "job", "none"), default="row",
                    help="when to drop the page cache (as root): once per row before its "
                         "warm-up (default: the jobs then run on the cache the warm-up "
                         "leaves, as a VM host does and as the issue's figure was taken), "
                         "before every job, or never")
    ap.add_argument("--no-drop-caches", dest="drop_caches", action="store_const",
                    const="none", help="the same as --drop-caches none")
    ap.add_argument("--no-job-checkpoints", dest="job_checkpoints", action="store_false",
                    help="no checkpoint before each write job (by default every write job "
                         "starts right after one, so copy-before-write copies real clusters)")
    args = ap.parse_args(argv)

    args.size_bytes = disk_size(ap, args.size)
    if args.runtime < 1:
        ap.error("--runtime must be at least 1")
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_ROWS]
    if bad or not names or len(set(names)) != len(names):
        ap.error(f"--rows: expected a list of {', '.join(ALL_ROWS)}")
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if not args.jobs or set(args.jobs) - {j[0] for j in JOBS}:
        ap.error(f"--jobs: expected a list of {', '.join(j[0] for j in JOBS)}")
    if args.drop_caches != "none" and not os.access(DROP_CACHES, os.W_OK):
        log(f"bench: note: {DROP_CACHES} is not writable (not root): page cache not dropped")
        args.drop_caches = "none"
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
        "command": [_command()] + (argv or sys.argv[1:]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": {"uname": " ".join(platform.uname()[:3]), "cpus": os.cpu_count(),
                 "load_before": round(load, 2)},
        "size": args.size_bytes, "runtime": args.runtime, "fio": fio_version,
        "qemu": None, "dir": base, "kept": args.keep,
        "jobs": [{"id": j[0], "title": j[1], "fio": j[3]} for j in JOBS],
        "drop_caches": args.drop_caches, "job_checkpoints": args.job_checkpoints,
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
    if any(n.endswith("-nodelay") for n in names) and not shutil.which("gcc"):
        ap.error("gcc is not installed: the -nodelay rows compile their LD_PRELOAD shim")

    per_row = len(args.jobs) * args.runtime + 20
    log(f"bench: {args.reps} x {len(names)} rows x {len(args.jobs)} jobs x {args.runtime} s; "
        f"about {args.reps * len(names) * per_row / 60:.0f} min plus warm-ups; images in {base}")
    t0 = time.monotonic()
    interrupted = False
    reps: list[dict] = []
    try:
        for i in range(args.reps):
            rows = {}
            reps.append(rows)
            for name in names:
                r = rows[name] = {"title": ROW_TITLES[name], "jobs": {}}
                if name.startswith("qemu-") and not results["qemu"]:
                    r.update(ok=False, skipped="qemu-system-x86_64 not installed")
                    continue
                if args.reps > 1 and name == names[0]:
                    log(f"bench: rep {i + 1}/{args.reps}")
                run_row(name, base, args, r)
                tag = f"{name}" + (f" (rep {i + 1})" if args.reps > 1 else "")
                for n in r.pop("notes", []):
                    results["notes"].append(f"{tag}: {n}")
                if r.get("skipped") and i == 0:
                    results["notes"].append(f"{name}: skipped: {r['skipped']}")
    except KeyboardInterrupt:
        interrupted = True
        results["notes"].append("interrupted: partial results")
        log("bench: interrupted")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - t0
    results["rows"] = merge_reps(reps)
    failed = [n for n, r in results["rows"].items() if r.get("error")]
    for n in failed:
        results["notes"].append(f"{n}: failed: {results['rows'][n]['error']}")
    results["notes"].append(
        {"job": "before each job: sync, then the page cache dropped (drop_caches=1); ",
         "row": "before each row's warm-up: sync, the page cache dropped (drop_caches=1); "
                "the jobs run on the cache the warm-up leaves; ",
         "none": "before each job: sync (the page cache is not dropped); "}[args.drop_caches] +
        ("a checkpoint before every write job (each starts on a fully written image with "
         "empty overlays: copy-before-write copies real clusters); "
         if args.job_checkpoints else "") +
        "psync jobs are buffered (a job's reads may hit the cache it fills); libaio jobs are O_DIRECT. Neither replfs nor QEMU 7.2's FUSE "
        "export uses a writeback cache: every write reaches the daemon before it returns.")
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    if len(reps) > 1:  # each rep's own ratio beside the mean's, as the issue reports them
        per_rep = []
        for rows in reps:
            one = {**results, "rows": rows}
            one["ratios"] = ratios(one)
            per_rep.append({(t["target"], t["mode"]): t["ratio"] for t in targets(one)})
        for t in results["targets"]:
            t["per_rep"] = [p.get((t["target"], t["mode"])) for p in per_rep]
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
        log(f"bench: JSON written to {args.json}")
    return 130 if interrupted else 1 if failed else 0


def merge_reps(reps: list[dict]) -> dict:
    """One row dict per row from the reps: rep 1's, with every job's figures, the
    checkpoint and the failover replaced by the mean over the reps that have them, and
    the reps themselves under ``reps`` (when there is more than one)."""
    if len(reps) == 1:
        return reps[0]
    out = {}
    for name, first in reps[0].items():
        all_ = [rows[name] for rows in reps if name in rows]
        r = {**first, "reps": all_}
        r["ok"] = all(x.get("ok") for x in all_)
        err = [x["error"] for x in all_ if x.get("error")]
        if err:
            r["error"] = "; ".join(err)
        r["jobs"] = {}
        for jid in first.get("jobs", {}):
            figs = [x["jobs"][jid] for x in all_ if jid in x.get("jobs", {})]
            r["jobs"][jid] = _mean_dicts(figs)
        for what in ("checkpoint", "failover", "warmup"):
            figs = [x[what] for x in all_ if x.get(what)]
            if figs:
                r[what] = _mean_dicts(figs)
        out[name] = r
    return out


def _mean_dicts(figs: list[dict]) -> dict:
    """The first dict, its numbers (not bools) replaced by their mean over FIGS."""
    out = dict(figs[0])
    for k, v in figs[0].items():
        vals = [f.get(k) for f in figs]
        if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                all(isinstance(x, (int, float)) for x in vals):
            out[k] = sum(vals) / len(vals)
    out["n_reps"] = len(figs)
    return out


def _command() -> str:
    """How this was started, relative to the current directory: ``scripts/bench``
    (run as a directory, or as ``-m scripts.bench``)."""
    path = sys.argv[0]
    if os.path.basename(path) == "__main__.py":
        path = os.path.dirname(path)
    return os.path.relpath(path, os.getcwd())


def _is_tmpfs(path: str) -> bool:
    try:
        out = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True,
                             text=True).stdout.strip()
        return int(out, 16) == TMPFS_MAGIC
    except (ValueError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(main())
