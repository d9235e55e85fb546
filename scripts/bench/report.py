"""The results as a table: IOPS, latency, CPU per operation, the ratios to the raw
row and to QEMU; checkpoint, failover, warm-up and memory."""

from __future__ import annotations

from replfs.units import human

from .fio import DISPLAY_ORDER, HEADLINE, JOBS, READ_JOBS, WRITE_JOBS
from .rows import QEMU_NODELAY_PEER, QEMU_PEER, ROW_TITLES, TLS_PLAIN


def ratios(results: dict) -> dict:
    rows = results["rows"]
    out = {"vs_raw": {}, "vs_qemu": {}, "vs_qemu_nodelay": {}, "vs_plain": {}, "vs_alone": {}}
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
    for key, peers in (("vs_qemu", QEMU_PEER), ("vs_qemu_nodelay", QEMU_NODELAY_PEER),
                       ("vs_alone", {"primary": "primary-alone",
                                     "primary-ckpt": "primary-alone"})):
        for mine, theirs in peers.items():
            a, b = rows.get(mine, {}), rows.get(theirs, {})
            for jid, fig in a.get("jobs", {}).items():
                other = b.get("jobs", {}).get(jid)
                if other and other["iops"]:
                    out[key].setdefault(mine, {})[jid] = fig["iops"] / other["iops"]
            # Times: below 1 = replfs is faster.  The checkpoint is the whole pair's
            # (primary + secondary, or one `pair` checkpoint).
            for what, k in (("checkpoint", "total_s"), ("failover", "failover_s")):
                x, y = a.get(what, {}).get(k), b.get(what, {}).get(k)
                if x is not None and y:
                    out[key].setdefault(mine, {})[what] = x / y
            # the checkpoint protocol's target: its checkpoint less the drain
            c, y = a.get("checkpoint", {}), b.get("checkpoint", {}).get("total_s")
            if c.get("drain_s") is not None and c.get("total_s") is not None and y:
                out[key].setdefault(mine, {})["checkpoint-less-drain"] = \
                    max(0.0, c["total_s"] - c["drain_s"]) / y
    return out


#: The issue's targets (section 3): (label, replfs row, job ids or a time, the
#: comparison's ratio key, goal, "min" (ratio >= goal) or "max" (ratio <= goal)).
_WRITE_TARGETS = [("randwrite-qd1-direct", "4 KiB randwrite QD1, libaio direct"),
                  ("randwrite-qd16", "4 KiB randwrite QD16, libaio direct"),
                  ("seqwrite", "1 MiB sequential write"),
                  ("write-fsync", "4 KiB write + fsync")]


def targets(results: dict) -> list[dict]:
    """Each target row of the issue's table, with its measured ratio and PASS/short.

    Design note: the QEMU side of a target is QEMU with TCP_NODELAY forced when that row
    ran (the issue calls it the fair comparison), else QEMU as shipped; both ratios are
    kept, ``against`` says which one judged.  A missing row gives no line (nothing is
    judged that was not measured)."""
    rat, rows = results["ratios"], results["rows"]
    out = []

    def qemu_ratio(row, what):
        nd = rat["vs_qemu_nodelay"].get(row, {}).get(what)
        sh = rat["vs_qemu"].get(row, {}).get(what)
        return (nd, "QEMU nodelay") if nd is not None else (sh, "QEMU as shipped"), sh, nd

    def add(label, mode, row, what, goal, sense, vs="qemu"):
        if vs == "qemu":
            (r, against), shipped, nodelay = qemu_ratio(row, what)
        else:
            r, against, shipped, nodelay = rat[vs].get(row, {}).get(what), \
                {"vs_alone": "primary-alone", "vs_raw": "raw"}[vs], None, None
        if r is None:
            return
        ok = r >= goal if sense == "min" else r <= goal
        out.append({"target": label, "mode": mode, "row": row, "what": what,
                    "goal": f"{'>=' if sense == 'min' else '<='} {goal:g}x {against}",
                    "ratio": r, "vs_shipped": shipped, "vs_nodelay": nodelay,
                    "against": against, "verdict": "PASS" if ok else "short"})

    for jid, label in _WRITE_TARGETS:
        add(label, "sync", "primary", jid, 1.0, "min")
        add(label, "checkpoint", "primary-ckpt", jid, 1.5, "min")
    for jid, label in _WRITE_TARGETS + [(j[0], j[1]) for j in WRITE_JOBS
                                        if j[0] not in dict(_WRITE_TARGETS)]:
        add(f"{label}: the FUSE stack alone", "checkpoint", "primary-ckpt", jid, 0.8, "min",
            vs="vs_alone")
    for jid, title, _, _ in READ_JOBS:
        for row in ("primary", "secondary"):
            add(f"{title}, {'view' if row == 'secondary' else row}", "sync", row, jid, 1.0,
                "min")
        add(f"{title}, primary vs raw (where FUSE allows)", "sync", "primary", jid, 0.8,
            "min", vs="vs_raw")
    add("checkpoint after a dirtying run", "sync", "primary", "checkpoint", 1.0, "max")
    c = rows.get("primary-ckpt", {}).get("checkpoint", {})
    if c.get("drain_s") is not None:  # the goal: <= QEMU's + the drain, reported
        add(f"checkpoint after a dirtying run, less its drain ({c['total_s']:.3f} s, "
            f"drain {c['drain_s']:.3f} s)", "checkpoint", "primary-ckpt",
            "checkpoint-less-drain", 1.0, "max")
    else:
        add("checkpoint after a dirtying run (drain included"
            + (f": {c['total_s']:.3f} s" if c.get("total_s") is not None else "") + ")",
            "checkpoint", "primary-ckpt", "checkpoint", 1.0, "max")
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
        print(f"  {name:22} {ROW_TITLES[name]}{extra}")
    print()
    print("figures: IOPS and MB/s (10^6 B/s); lat = mean and 99th percentile latency per I/O;")
    print("CPU µs/op = CPU time of the daemon serving the file (and of its peer) / operations;")
    print("x raw = IOPS / raw row's IOPS; x QEMU = replfs row / its QEMU row as shipped (same")
    print("job), x Q-nd = / the QEMU row with TCP_NODELAY forced (qemu-*-nodelay).")
    hl = [(n, r["jobs"][HEADLINE]["iops"]) for n, r in rows.items()
          if HEADLINE in r.get("jobs", {})]
    if hl:
        print()
        print(f"Headline, {dict((j[0], j[1]) for j in JOBS)[HEADLINE]}: "
              + ", ".join(f"{n} {v:.0f}" for n, v in hl) + " IOPS")
    head = (f"  {'row':22}{'IOPS':>10}{'MB/s':>9}{'lat µs':>9}{'p99 µs':>9}"
            f"{'CPU µs/op':>11}{'peer µs/op':>11}{'x raw':>8}{'x QEMU':>8}{'x Q-nd':>8}")
    for jid, title, _, _ in DISPLAY_ORDER:
        if not any(jid in r.get("jobs", {}) for r in rows.values()):
            continue
        print()
        print(title)
        print(head)
        for name, r in rows.items():
            f = r.get("jobs", {}).get(jid)
            if not f:
                continue
            print(f"  {name:22}{f['iops']:>10.0f}{f['mbps']:>9.1f}{f['lat_mean_us']:>9.1f}"
                  f"{f['lat_p99_us']:>9.1f}"
                  f"{fmt(f.get('daemon_cpu_us_per_op'), '.1f', 11)}"
                  f"{fmt(f.get('peer_cpu_us_per_op'), '.1f', 11)}"
                  f"{fmt(rat['vs_raw'].get(name, {}).get(jid), '.3f', 8)}"
                  f"{fmt(rat['vs_qemu'].get(name, {}).get(jid), '.2f', 8)}"
                  f"{fmt(rat['vs_qemu_nodelay'].get(name, {}).get(jid), '.2f', 8)}")

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
        print("(ckpt s = the secondary's, prim. s = the primary's; a checkpoint-protocol row")
        print("has one `pair` checkpoint, drain included, in prim. s; lag = what was queued")
        print("before it; x QEMU on the sum of both, below 1 = replfs faster)")
        print(f"  {'row':22}{'hidden':>10}{'active':>10}{'lag':>9}{'ckpt s':>9}{'prim. s':>9}"
              f"{'x QEMU':>8}   {'hidden':>10}{'active':>10}{'failover s':>11}{'x QEMU':>8}")
        for name in rep:
            c, f = rows[name].get("checkpoint", {}), rows[name].get("failover", {})
            q = rat["vs_qemu"].get(name, {})
            hb = lambda v: "-" if v is None else human(v)  # noqa: E731
            print(f"  {name:22}{hb(c.get('hidden_bytes')):>10}{hb(c.get('active_bytes')):>10}"
                  f"{hb(c.get('lag_bytes')):>9}"
                  f"{fmt(c.get('secondary_s'), '.3f', 9)}{fmt(c.get('primary_s'), '.3f', 9)}"
                  f"{fmt(q.get('checkpoint'), '.2f', 8)}   "
                  f"{hb(f.get('hidden_bytes')):>10}{hb(f.get('active_bytes')):>10}"
                  f"{fmt(f.get('failover_s'), '.3f', 11)}{fmt(q.get('failover'), '.2f', 8)}")

    print()
    print("Warm-up and memory (max RSS = VmHWM of the daemon serving the file / of its peer)")
    print(f"  {'row':22}{'warm-up s':>10}{'MB/s':>9}{'setup s':>9}{'RSS MiB':>9}{'peer MiB':>9}")
    for name, r in rows.items():
        if not r.get("warmup"):
            continue
        w, m = r["warmup"], r.get("max_rss_kib", {})
        mib = lambda k: None if m.get(k) is None else m[k] / 1024  # noqa: E731
        print(f"  {name:22}{w['seconds']:>10.1f}{w['mbps']:>9.1f}{fmt(r.get('setup_s'), '.1f', 9)}"
              f"{fmt(mib('daemon'), '.1f', 9)}{fmt(mib('peer'), '.1f', 9)}")

    tg = results.get("targets") or []
    if tg:
        print()
        print("Targets (issue 13, section 3): measured ratio, judged against QEMU with TCP_NODELAY")
        print("forced when that row ran (x Q-nd), else QEMU as shipped (x QEMU)")
        reps = any(t.get("per_rep") for t in tg)
        if reps:
            print("(ratio: of the means over the reps; per rep: each rep's own ratio)")
        print(f"  {'target':66}{'mode':>11}{'ratio':>7}{'x QEMU':>8}{'x Q-nd':>8}  {'goal':28}"
              f"{'verdict':8}" + ("  per rep" if reps else ""))
        for t in tg:
            pr = ", ".join("-" if v is None else f"{v:.2f}" for v in t.get("per_rep") or [])
            print(f"  {t['target'][:66]:66}{t['mode']:>11}{t['ratio']:>7.2f}"
                  f"{fmt(t['vs_shipped'], '.2f', 8)}{fmt(t['vs_nodelay'], '.2f', 8)}  "
                  f"{t['goal']:28}{t['verdict']:8}" + (f"  {pr}" if reps else ""))
    print_notes(results)


def print_notes(results: dict) -> None:
    """The notes and the total time that end a report (also bench_vm.py's)."""
    if results["notes"]:
        print()
        print("Notes")
        for n in results["notes"]:
            print(f"  - {n}")
    print(f"\ntotal time {results['elapsed_s']:.0f} s")
