"""One row from start to end: warm-up, the write jobs, a timed checkpoint, the read
jobs, a timed failover; the CPU time and peak RSS of the processes behind the file."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from replfs.units import KiB, human

from . import CLUSTER, log
from .fio import PSYNC, READ_JOBS, WRITE_JOBS, fio_figures, run_fio
from .rows import RawRow, Row
from .rows_qemu import QemuRow
from .rows_replfs import ReplfsRow

CLK_TCK = os.sysconf("SC_CLK_TCK")
DROP_CACHES = "/proc/sys/vm/drop_caches"
ROW_CLASSES = {"raw": RawRow, "primary": ReplfsRow, "secondary": ReplfsRow,
               "primary-tls": ReplfsRow, "secondary-tls": ReplfsRow,
               "qemu-primary": QemuRow, "qemu-secondary": QemuRow}


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
