"""One row from start to end: warm-up, the write jobs, a timed checkpoint, the read
jobs, a timed failover; the CPU time and peak RSS of the processes behind the file.

Design note (issue 13, reconciling this bench with the side-by-side figure): every write
job starts right after a checkpoint, on images checked to be fully written, so the
secondary's copy-before-write copies real 64 KiB clusters in every write job.  Before,
the 1 MiB sequential write ran first and left every cluster in the hidden overlay, so
the 4 KiB jobs after it paid no copy-before-write (they measured a "sparse-like" pair).
The page cache is dropped once per row by default (``--drop-caches row``): the jobs run
on the cache the warm-up leaves, as a VM host does and as the figure was taken by hand.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from replfs.units import KiB, human

from . import CLUSTER, log
from .fio import PSYNC, READ_JOBS, WRITE_JOBS, fio_figures, run_fio
from .rows import RawRow, Row, RowSkipped
from .rows_qemu import QemuRow
from .rows_replfs import ReplfsRow

CLK_TCK = os.sysconf("SC_CLK_TCK")
DROP_CACHES = "/proc/sys/vm/drop_caches"
ROW_CLASSES = {"raw": RawRow, "primary": ReplfsRow, "secondary": ReplfsRow,
               "primary-tls": ReplfsRow, "secondary-tls": ReplfsRow,
               "primary-ckpt": ReplfsRow, "primary-alone": ReplfsRow,
               "qemu-primary": QemuRow, "qemu-secondary": QemuRow,
               "qemu-primary-nodelay": QemuRow, "qemu-secondary-nodelay": QemuRow}


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


def drop_caches(enabled: bool) -> None:
    """Writes back and drops the page cache, so that every job of every row starts
    cold: the raw image, and the images behind replfs and QEMU alike."""
    os.sync()
    if enabled:
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")


def holes(path: str) -> int:
    """Bytes of PATH that are holes (0: fully allocated), found with SEEK_DATA/SEEK_HOLE."""
    size, off, data = os.path.getsize(path), 0, 0
    with open(path, "rb") as f:
        fd = f.fileno()
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after off
                break
            off = os.lseek(fd, start, os.SEEK_HOLE)
            data += off - start
    return size - data


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
        drop_caches(args.drop_caches != "none")
        per_job_drop = args.drop_caches == "job"
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
            # The figure: a fully written image after a checkpoint, so that the
            # secondary's copy-before-write copies real 64 KiB clusters (a sparse image
            # makes it cheap).  Check it instead of assuming it.
            d = row.dirty()
            result["after_warmup"] = d
            if d.get("hidden_bytes") or d.get("active_bytes"):
                result.setdefault("notes", []).append(
                    f"the overlays were not empty after the warm-up's checkpoint: {d}")
        sparse = {img: holes(img) for img in row.images()}
        result["image_holes"] = sparse
        for img, h in sparse.items():
            if h:
                result.setdefault("notes", []).append(
                    f"{os.path.basename(img)} has {human(h)} of holes after the warm-up")
        row.prepare()

        def run_jobs(jobs):
            for job in jobs:
                if job[0] not in args.jobs:
                    continue
                ck = None
                if job[2] == "write" and row.replicated and args.job_checkpoints:
                    ck = row.checkpoint()  # every write job starts after a checkpoint
                log(f"[{name}] {job[1]}")
                r = result["jobs"][job[0]] = run_job(row, path, size, runtime, job,
                                                     per_job_drop)
                if ck is not None:
                    r["checkpoint_before"] = ck
                log(f"[{name}]   {r['iops']:.0f} IOPS, {r['mbps']:.1f} MB/s")

        run_jobs(WRITE_JOBS)

        if row.replicated:
            dirty = row.dirty()
            c = row.checkpoint()
            result["checkpoint"] = {**dirty, **c}
            lag = f", lag {human(dirty['lag_bytes'])}" if dirty.get("lag_bytes") else ""
            log(f"[{name}] checkpoint: dirty hidden {human(dirty['hidden_bytes'] or 0)}, "
                f"active {human(dirty['active_bytes'] or 0)}{lag}: {c['total_s']:.3f} s "
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
    except RowSkipped as exc:
        result["ok"] = False
        result["skipped"] = str(exc)
        log(f"[{name}] skipped: {exc}")
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
