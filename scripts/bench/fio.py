"""The fio job table, one fio run, and the figures taken from fio's JSON."""

from __future__ import annotations

import json
import subprocess

PSYNC = {"ioengine": "psync", "direct": "0", "iodepth": "1"}
AIO1 = {"ioengine": "libaio", "direct": "1", "iodepth": "1"}
AIO16 = {"ioengine": "libaio", "direct": "1", "iodepth": "16"}
#: The headline job: how a VM (``cache=none,aio=native``) writes, one request at a time.
HEADLINE = "randwrite-qd1-direct"
#: (id, title, direction, fio options), in the order they run (the issue's order: the
#: sequential write first, then the 4 KiB writes, direct QD1 first; a checkpoint before
#: each write job, see run.py).  The table shows ``HEADLINE`` first (``DISPLAY_ORDER``).
WRITE_JOBS = [
    ("seqwrite", "1 MiB sequential write (psync)", "write", {"rw": "write", "bs": "1M", **PSYNC}),
    (HEADLINE, "4 KiB random write QD1 (libaio, direct)", "write",
     {"rw": "randwrite", "bs": "4k", **AIO1}),
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
DISPLAY_ORDER = [j for j in JOBS if j[0] == HEADLINE] + [j for j in JOBS if j[0] != HEADLINE]


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
