"""The ``replfs`` command.

Mount commands (``primary``, ``secondary``) check their input, then start the
daemon as a child process running in the foreground (``-f``) and wait on a
pipe until it says "ready" or why it could not start; so without ``-f`` the
command returns, exit 0, once the mount is live and replication is set up.

Action commands write to the control files; ``status`` reads the status file.
Every error is one line on stderr, ``replfs: ...``, with exit status 2 for bad
input and 1 for a failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import stat
import subprocess
import sys

from replfs import __version__
from replfs.config import DiskConfig, MountConfig, PeerConfig
from replfs.errors import ReplfsError, UsageError
from replfs.units import parse_size

EXIT_FAIL = 1
EXIT_USAGE = 2

#: Longest disk name, in bytes (a file name in the mount, an NBD export name).
MAX_NAME = 200


# -- parsing and checking input ------------------------------------------------
def parse_hostport(text: str, what: str) -> PeerConfig:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{what}: expected HOST:PORT, got {text!r}")
    return PeerConfig(host.strip("[]"), int(port))


def parse_disks(specs: list[str]) -> tuple[DiskConfig, ...]:
    disks: list[DiskConfig] = []
    seen: set[str] = set()
    for spec in specs:
        name, sep, image = spec.partition("=")
        if not sep or not name or not image:
            raise UsageError(f"--disk: expected NAME=IMAGE, got {spec!r}")
        if any(c in name for c in "/\0\n") or name.startswith("."):
            raise UsageError(f"--disk {spec!r}: a disk name must not contain '/', NUL or a "
                             f"newline, nor start with '.'")
        if len(name.encode()) > MAX_NAME:
            raise UsageError(f"--disk: the disk name is {len(name.encode())} bytes; at most "
                             f"{MAX_NAME} (it is a file name and an NBD export name)")
        if name in seen:
            raise UsageError(f"--disk {spec}: duplicate disk name {name!r}")
        seen.add(name)
        check_image(image)
        disks.append(DiskConfig(name, os.path.abspath(image)))
    if not disks:
        raise UsageError("at least one --disk NAME=IMAGE is needed")
    return tuple(disks)


def check_image(image: str) -> None:
    try:
        st = os.stat(image)
    except OSError as exc:
        raise UsageError(f"image {image}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"image {image}: is a directory, not a raw image file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise UsageError(f"image {image}: not a regular file or block device")
    if not os.access(image, os.R_OK | os.W_OK):
        raise UsageError(f"image {image}: not readable and writable")
    try:
        with open(image, "rb") as f:
            head = f.read(4)
            size = f.seek(0, os.SEEK_END)
    except OSError as exc:
        raise UsageError(f"image {image}: {exc.strerror}") from None
    if size == 0:
        raise UsageError(f"image {image}: is empty (0 bytes); a disk needs a size")
    if head == b"QFI\xfb":
        raise UsageError(f"image {image}: is a qcow2 image; replfs serves raw images "
                         f"(qemu-img convert -O raw {image} IMAGE.raw)")


def clear_dead_mount(mount: str) -> bool:
    """A replfs mount whose daemon died: unmount it (lazily).  True if it did."""
    from replfs.fuse.watcher import unmount_if_dead

    if not unmount_if_dead(os.path.realpath(mount)):
        return False
    print(f"replfs: {mount}: removed the mount of a replfs daemon that died", file=sys.stderr)
    return True


def check_mountpoint(mount: str) -> None:
    clear_dead_mount(mount)
    if not os.path.isdir(mount):
        raise UsageError(f"mountpoint {mount}: not a directory")
    if os.path.ismount(mount):
        raise UsageError(f"mountpoint {mount}: something is already mounted there")
    if os.listdir(mount):
        raise UsageError(f"mountpoint {mount}: not empty")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replfs",
        description="Replicated VM disks (COLO block replication) served as files through FUSE.")
    p.add_argument("--version", action="version", version=f"replfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def mount_args(sp):
        sp.add_argument("mount", metavar="MOUNT", help="an empty directory")
        sp.add_argument("--disk", action="append", default=[], metavar="NAME=IMAGE",
                        help="a raw image served as MOUNT/NAME (repeatable)")
        sp.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (logs on stderr)")
        sp.add_argument("--log", metavar="FILE",
                        help="log file of the background daemon "
                             "(default: /tmp/replfs-ROLE-MOUNTNAME.log)")
        sp.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="primary: how long a write waits for the secondary; "
                             "secondary: how long a primary's NBD handshake may take "
                             "(default 5)")
        sp.add_argument("--meta-dir", metavar="DIR",
                        help="where the images' replication metadata lives (default: "
                             "IMAGE.replfs-meta beside each image)")
        sp.add_argument("--inject-faults", metavar="SPEC", help=argparse.SUPPRESS)
        sp.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
        sp.add_argument("-v", "--verbose", action="store_true")

    sp = sub.add_parser("secondary", help="mount the secondary side (NBD server + view)")
    mount_args(sp)
    sp.add_argument("--listen", required=True, metavar="HOST:PORT",
                    help="where the primary connects (port 0 picks a free one)")
    sp.add_argument("--workdir", metavar="DIR",
                    help="where the hidden and active overlays live (default: "
                         "IMAGE.replfs-work beside the first image)")
    sp.add_argument("--cluster-size", type=int, default=64 * 1024, help=argparse.SUPPRESS)

    sp = sub.add_parser("primary", help="mount the primary side (replicates to a secondary)")
    mount_args(sp)
    sp.add_argument("--secondary", required=True, metavar="HOST:PORT",
                    help="the secondary's --listen address")
    sp.add_argument("--allow-degraded-start", action="store_true",
                    help="start even if the secondary is not reachable (degraded; it is "
                         "connected and resynced when it comes)")
    sp.add_argument("--reconnect-interval", type=float, default=5.0, metavar="SECONDS",
                    help="longest wait between reconnect tries while degraded (default 5)")
    sp.add_argument("--resync-rate", metavar="BYTES/s",
                    help="cap on a resync's rate, e.g. 100M (default: no cap)")

    for action, text in (("checkpoint", "run a checkpoint"),
                         ("failover", "fail over"),
                         ("stop", "stop replication in an orderly way"),
                         ("connect", "primary: connect to the secondary now"),
                         ("disconnect", "primary: drop the secondary, no retries"),
                         ("resync", "primary: resync the secondary now")):
        sp = sub.add_parser(action, help=f"{text} (echo 1 > MOUNT/.replfs/{action})")
        sp.add_argument("mount", metavar="MOUNT")
        if action == "failover":
            sp.add_argument("--force", action="store_true",
                            help="take the secondary disk as it is, even when it cannot "
                                 "give back the last checkpoint")
        elif action == "resync":
            sp.add_argument("--full", action="store_true",
                            help="every cluster, whatever the dirty record says")
        elif action == "connect":
            sp.add_argument("--secondary", metavar="HOST:PORT",
                            help="connect to this secondary instead")

    sp = sub.add_parser("status", help="show the state of a mount")
    sp.add_argument("mount", metavar="MOUNT")
    sp.add_argument("--json", action="store_true", help="print MOUNT/.replfs/status as is")
    sp.add_argument("--watch", action="store_true",
                    help="redraw until interrupted (a progress bar during a resync)")
    sp.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                    help="--watch: seconds between updates (default 1)")

    sp = sub.add_parser("demo", help="run the demo: both sides on loopback, scratch images")
    sp.add_argument("--dir", help="scratch directory (default: a new temporary one)")
    sp.add_argument("--size", default="64M", help="disk size (default 64M)")
    return p


# -- commands ------------------------------------------------------------------
def mount_config(args) -> MountConfig:
    """Check the mount command's arguments; the daemon's whole input."""
    disks = parse_disks(args.disk)
    check_mountpoint(args.mount)
    if not 0 < args.timeout < float("inf"):
        raise UsageError("--timeout must be a finite positive number of seconds")
    meta_dir = os.path.abspath(args.meta_dir) if args.meta_dir else None
    log_file = os.path.abspath(args.log) if args.log else None
    common = dict(role=args.command, mount=os.path.abspath(args.mount), disks=disks,
                  timeout=args.timeout, inject_faults=args.inject_faults, meta_dir=meta_dir,
                  log=log_file)
    if args.command == "primary":
        if not 0 < args.reconnect_interval < float("inf"):
            raise UsageError("--reconnect-interval must be a finite positive number of seconds")
        rate = None
        if args.resync_rate is not None:
            try:
                rate = parse_size(args.resync_rate.removesuffix("/s"))
            except ValueError:
                rate = 0
            if rate <= 0:
                raise UsageError(f"--resync-rate: expected bytes per second such as 100M, "
                                 f"got {args.resync_rate!r}")
        return MountConfig(**common, secondary=parse_hostport(args.secondary, "--secondary"),
                           allow_degraded_start=args.allow_degraded_start,
                           reconnect_interval=args.reconnect_interval, resync_rate=rate)
    cs = args.cluster_size
    if cs < 512 or cs & (cs - 1):
        raise UsageError("--cluster-size must be a power of two >= 512")
    if args.workdir is not None and os.path.exists(args.workdir) and \
            not os.path.isdir(args.workdir):
        raise UsageError(f"--workdir {args.workdir}: not a directory")
    return MountConfig(**common, listen=parse_hostport(args.listen, "--listen"),
                       workdir=args.workdir, cluster_size=cs)


def cmd_mount(args) -> int:
    cfg = mount_config(args)
    if args.foreground:
        return run_foreground(cfg, args.verbose, args.ready_fd)
    return spawn_background(cfg, args.log, args.argv)


def run_foreground(cfg: MountConfig, verbose: bool, fd: int | None) -> int:
    from replfs import daemon

    if cfg.log and not _stderr_is(cfg.log):  # -f on a terminal: no file to reopen
        cfg = dataclasses.replace(cfg, log=None)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s replfs-{cfg.role}[%(process)d] %(name)s: %(message)s")

    def ready(info):
        msg = f"ready {info or ''}".strip()
        if fd is not None:
            os.write(fd, msg.encode() + b"\n")
            os.close(fd)
        else:
            extra = f", NBD on {info}" if info else ""
            print(f"replfs: {cfg.role} mounted on {cfg.mount}{extra}",
                  file=sys.stderr, flush=True)

    try:
        daemon.run(cfg, ready)
    except (ReplfsError, OSError) as exc:
        text = str(exc) if isinstance(exc, ReplfsError) else f"{exc.strerror}: {exc.filename}"
        code = getattr(exc, "exit_code", EXIT_FAIL)
        if fd is not None:
            try:
                os.write(fd, f"error {code} {text}\n".encode())
            except OSError:
                pass
        print(f"replfs: {text}", file=sys.stderr)
        return code
    return 0


def _stderr_is(path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(2), os.stat(path))
    except OSError:
        return False


def spawn_background(cfg: MountConfig, log: str | None, cli_argv: list[str]) -> int:
    """Run this same command with ``-f`` in a new session; wait for "ready"."""
    log_path = log or f"/tmp/replfs-{cfg.role}-{os.path.basename(cfg.mount)}.log"
    argv = [sys.executable, "-m", "replfs", *cli_argv, "-f"]
    if not log:  # the daemon reopens it on SIGHUP: it must know its name
        argv += ["--log", log_path]
    rfd, wfd = os.pipe()
    argv += ["--ready-fd", str(wfd)]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                pass_fds=(wfd,), start_new_session=True, close_fds=True)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        line = r.readline().decode(errors="replace").strip()
    if line.startswith("ready"):
        info = line[len("ready"):].strip()
        extra = f", NBD on {info}" if info else ""
        print(f"replfs: {cfg.role} mounted on {cfg.mount}{extra} "
              f"(pid {proc.pid}, log {log_path})")
        return 0
    proc.wait()
    if line.startswith("error "):
        code, _, text = line[6:].partition(" ")
        print(f"replfs: {text}", file=sys.stderr)
        return int(code) if code.isdigit() else EXIT_FAIL
    else:
        print(f"replfs: the daemon exited with status {proc.returncode} before the "
              f"mount was ready; see {log_path}", file=sys.stderr)
    return EXIT_FAIL


def control_path(mount: str, name: str) -> str:
    path = os.path.join(mount, ".replfs", name)
    if not os.path.exists(path):
        raise UsageError(f"{mount}: not a replfs mount")
    return path


def read_status(mount: str) -> dict:
    with open(control_path(mount, "status"), "rb") as f:
        return json.loads(f.read())


def action_value(args) -> bytes:
    """What the command writes to its control file."""
    if getattr(args, "force", False):
        return b"force\n"
    if getattr(args, "full", False):
        return b"full\n"
    if getattr(args, "secondary", None):
        target = parse_hostport(args.secondary, "--secondary")
        return f"{target}\n".encode()
    return b"1\n"


def cmd_action(args) -> int:
    path = control_path(args.mount, args.command)
    value = action_value(args)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, value)
        finally:
            os.close(fd)
    except OSError as exc:
        reason = None
        try:
            st = read_status(args.mount)
            reason = st.get("action_error") or st.get("last_error")
        except (OSError, ValueError):
            pass
        print(f"replfs: {args.command} failed: {reason or os.strerror(exc.errno)}",
              file=sys.stderr)
        return EXIT_FAIL
    st = read_status(args.mount)
    print(f"replfs: {args.command} done; state {st['state']}")
    return 0


def cmd_status(args) -> int:
    if args.watch:
        from replfs.tools.watch import watch

        control_path(args.mount, "status")
        return watch(lambda: read_status(args.mount), args.interval)
    if args.json:
        with open(control_path(args.mount, "status"), "rb") as f:
            sys.stdout.write(f.read().decode())
        return 0
    st = read_status(args.mount)
    peer = "connected" if st.get("peer_connected") else "not connected"
    where = st.get("listen") or st.get("secondary") or ""
    print(f"{st['role']} {args.mount}: {st['state']}, peer {peer}"
          f"{' (' + where + ')' if where else ''}, {st['checkpoints']} checkpoints")
    if st.get("sync"):
        from replfs.tools.watch import sync_text

        print(f"  {sync_text(st['sync'])}")
    if st.get("last_error"):
        print(f"  last error: {st['last_error']}")
    if st.get("reconnect_error"):
        print(f"  last reconnect attempt: {st['reconnect_error']}")
    for name, d in st.get("disks", {}).items():
        oos = d.get("out_of_sync_bytes")
        print(f"  {name}: {d['size']} bytes, image {d['image']}"
              f"{f', {oos} bytes out of sync' if oos else ''}")
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    try:
        if args.command in ("primary", "secondary"):
            return cmd_mount(args)
        if args.command in ("checkpoint", "failover", "stop", "connect", "disconnect",
                            "resync"):
            return cmd_action(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "demo":
            from replfs.tools.demo import run_demo
            return run_demo(args)
    except UsageError as exc:
        print(f"replfs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ReplfsError as exc:
        print(f"replfs: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        print(f"replfs: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `replfs status | head`: the reader went away
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
