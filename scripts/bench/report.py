"""The results as a table: IOPS, latency, CPU per operation, the ratios to the raw
row and to QEMU; checkpoint, failover, warm-up and memory."""

from __future__ import annotations

from replfs.units import human

from .fio import JOBS
from .rows import QEMU_PEER, ROW_TITLES, TLS_PLAIN


def ratios(results: dict) -> dict:
    rows = results["rows"]
    out = {"vs_raw": {}, "vs_qemu": {}, "vs_plain": {}}
    raw = rows.get("raw", {}).get("jobs", {})
    for name, r in rows.items():
        for jid, fig in r.get("jobs", {}).items():
            if jid in raw and raw[jid]["iops"]:
                out["vs_raw"].setdefault(name, {})[jid] = fig["iops"] / raw[jid]["iops"]
    for mine, plain in TLS_PLAIN.items():
        a, b = rows.get(mine, {}).get("jobs", {}), rows.get(plain, {}).get("jobs", {})
        for jid, fig in a.items():
            if jid in b and b[jid]["iops"]:
                out["vs_plain"].setdefault(mine, {})[jid] = fig["iops"] / b[jid]["iops"]
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

    tls = [n for n in TLS_PLAIN if rat.get("vs_plain", {}).get(n)]
    if tls:
        print()
        print("TLS cost: IOPS of the row with the link over TLS / the same row in plain TCP")
        jids = [j[0] for j in JOBS if any(j[0] in rat["vs_plain"][n] for n in tls)]
        print(f"  {'row':15}" + "".join(f"{j[:14]:>15}" for j in jids))
        for n in tls:
            print(f"  {n:15}" + "".join(fmt(rat["vs_plain"][n].get(j), '.3f', 15)
                                       for j in jids))

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
