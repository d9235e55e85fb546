"""``replfs status MOUNT --watch``: the state, and a resync's or a verify's progress, live.

On a terminal a rich progress bar is redrawn in place (rich's ``Live``);
otherwise one plain line is printed per change, so that a log or a pipe gets
something readable.  It ends on Ctrl-C (exit 130) or when the mount goes
away (exit 1).
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from replfs.units import human


def sync_text(sync: dict) -> str:
    """A resync's progress in words."""
    total, done = sync.get("total_bytes") or 0, sync.get("done_bytes") or 0
    text = f"resync {human(done)} of {human(total)} ({100 * done // max(total, 1)} %)"
    if sync.get("rate_bytes_per_s"):
        text += f", {human(sync['rate_bytes_per_s'])}/s"
    if sync.get("eta_s") is not None:
        text += f", eta {sync['eta_s']:g} s"
    return text


def verify_text(v: dict) -> str:
    """A verify's progress, or its result, in words."""
    total, done = v.get("total_bytes") or 0, v.get("checked_bytes") or 0
    n = v.get("differences_count") or 0
    ranges = f"{n} differing range{'' if n == 1 else 's'}"
    if v.get("state") != "running":
        text = f"verify {v.get('state')}: {human(done)} compared, {ranges}"
        if n and v.get("repaired"):
            text += ", repaired"
        if v.get("error"):
            text += f" ({v['error']})"
        return text
    text = f"verify {human(done)} of {human(total)} ({100 * done // max(total, 1)} %)"
    if v.get("rate_bytes_per_s"):
        text += f", {human(v['rate_bytes_per_s'])}/s"
    if v.get("eta_s") is not None:
        text += f", eta {v['eta_s']:g} s"
    return f"{text}, {ranges} so far"


def summary(st: dict) -> str:
    """One line: state, peer, sync progress, last error."""
    peer = "connected" if st.get("peer_connected") else "not connected"
    parts = [f"{st.get('role')}: {st.get('state')}", f"peer {peer}"]
    oos = sum(d.get("out_of_sync_bytes", 0) for d in st.get("disks", {}).values())
    if oos:
        parts.append(f"out of sync {human(oos)}")
    if st.get("sync"):
        parts.append(sync_text(st["sync"]))
    if (st.get("verify") or {}).get("state") == "running":
        parts.append(verify_text(st["verify"]))
    if st.get("last_error"):
        parts.append(f"last error: {st['last_error']}")
    return ", ".join(parts)


def watch(read_status, interval: float = 1.0, out=None) -> int:
    """Poll ``read_status()`` until interrupted; see the module's note."""
    out = out or sys.stdout
    try:
        if out.isatty():
            return _live(read_status, interval, out)
        return _plain(read_status, interval, out)
    except KeyboardInterrupt:
        return 130


def _plain(read_status, interval: float, out) -> int:
    last = None
    while True:
        try:
            line = summary(read_status())
        except (OSError, ValueError) as exc:
            print(f"replfs: the mount went away: {exc}", file=sys.stderr)
            return 1
        if line != last:
            print(time.strftime("%H:%M:%S"), line, file=out, flush=True)
            last = line
        time.sleep(interval)


def _live(read_status, interval: float, out) -> int:
    console = Console(file=out)
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.percentage:>3.0f} %"), TimeRemainingColumn(),
                        console=console)
    task = progress.add_task("resync", total=1, visible=False)
    with Live(progress, console=console, refresh_per_second=4) as live:
        while True:
            try:
                st = read_status()
            except (OSError, ValueError) as exc:
                live.console.print(f"replfs: the mount went away: {exc}")
                return 1
            sync = st.get("sync") or {}
            total, done = sync.get("total_bytes") or 0, sync.get("done_bytes", 0)
            verify = st.get("verify") or {}
            if not sync and verify.get("state") == "running":  # the bar shows the verify
                total, done = verify.get("total_bytes") or 0, verify.get("checked_bytes", 0)
            progress.update(task, description=summary(st), total=max(total, 1),
                            completed=done, visible=True)
            time.sleep(interval)
