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
import os
import signal
import stat
import math
import subprocess
import sys
import threading

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


def check_tls_dir(args) -> str | None:
    """``--tls-dir``: the credentials this role needs must load (exit 2)."""
    tls_dir = getattr(args, "tls_dir", None)
    hostname = getattr(args, "tls_hostname", None)
    if tls_dir is None:
        if hostname is not None:
            raise UsageError("--tls-hostname needs --tls-dir")
        return None
    from replfs.nbd import tls

    tls_dir = os.path.abspath(tls_dir)
    try:
        if args.command == "secondary":
            tls.server_context(tls_dir)
        else:
            tls.client_context(tls_dir, hostname)
    except tls.TLSConfigError as exc:
        raise UsageError(f"--tls-dir: {exc}") from None
    return tls_dir


def check_allow(specs) -> tuple[str, ...] | None:
    """``--allow CIDR`` (repeatable): networks, normalised (exit 2 if bad)."""
    if not specs:
        return None
    import ipaddress

    nets = []
    for spec in specs:
        try:
            nets.append(str(ipaddress.ip_network(spec.strip(), strict=False)))
        except ValueError:
            raise UsageError(f"--allow: expected an address or a network such as "
                             f"10.0.0.0/24, got {spec!r}") from None
    return tuple(nets)


def is_loopback_host(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (an empty
    host, 0.0.0.0 or :: is every interface: not loopback)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    addrs = {info[4][0].split("%", 1)[0] for info in infos}
    try:
        return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)
    except ValueError:
        return False


def check_link_security(listen: PeerConfig, tls_dir: str | None, insecure: bool) -> None:
    """Plain NBD lets anyone who reaches the port write the disk: off
    loopback it needs --tls-dir, or --insecure to say it is wanted."""
    if tls_dir is None and not insecure and not is_loopback_host(listen.host):
        raise UsageError(f"--listen {listen}: not a loopback address, and without --tls-dir "
                         f"anyone who can reach it could write the disk; give --tls-dir DIR "
                         f"(or --insecure on a network you trust)")


def check_listen_address(listen: PeerConfig) -> None:
    """A ``--listen`` host must resolve to an address of this machine's kind
    (a typo is bad input, exit 2; binding it is the daemon's business)."""
    import socket

    try:
        socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM,
                           flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--listen {listen.host}:{listen.port}: cannot resolve "
                         f"{listen.host!r}: {exc.strerror}") from None


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
        st = os.stat(image)
        same = [d.name for d in disks if _same_file(d.image, st)]
        if same:
            raise UsageError(f"--disk {spec}: disk {same[0]!r} serves the same image "
                             f"(one image, one disk)")
        disks.append(DiskConfig(name, os.path.abspath(image)))
    if not disks:
        raise UsageError("at least one --disk NAME=IMAGE is needed")
    return tuple(disks)


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        other = os.stat(path)
    except OSError:
        return False
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) or (
        stat.S_ISBLK(st.st_mode) and stat.S_ISBLK(other.st_mode) and st.st_rdev == other.st_rdev)


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


def check_pid_file(path: str) -> str:
    """``--pid-file``: its directory must exist (the file is written only once
    the mount is live; fail before that)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise UsageError(f"--pid-file {path}: is a directory")
    if not os.path.isdir(os.path.dirname(path)):
        raise UsageError(f"--pid-file {path}: no directory {os.path.dirname(path)}")
    return path


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite positive number of seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="replfs",
        description="Replicated VM disks (COLO block replication) served as files through FUSE.")
    p.add_argument("--version", action="version", version=f"replfs {__version__}")
    p.add_argument("--dry-run", action="store_true",
                   help="up, down: print the commands instead of running them")
    p.add_argument("--host", metavar="NAME",
                   help="up, down, status RES: act as this host of the resource file "
                        "(default: this machine's host name)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def mount_args(sp):
        sp.add_argument("mount", metavar="MOUNT", help="an empty directory")
        sp.add_argument("--disk", action="append", default=[], metavar="NAME=IMAGE",
                        help="a raw image served as MOUNT/NAME (repeatable)")
        sp.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground (logs on stderr)")
        sp.add_argument("--log", metavar="FILE",
                        help="log file of the background daemon "
                             "(default: /tmp/replfs-ROLE-MOUNTNAME-HASH.log, HASH from the "
                             "mount's full path)")
        sp.add_argument("--pid-file", metavar="FILE",
                        help="write the daemon's pid here once the mount is live "
                             "(removed at exit)")
        sp.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="primary: how long a write waits for the secondary; "
                             "secondary: how long a primary's NBD handshake may take "
                             "(default 5)")
        sp.add_argument("--meta-dir", metavar="DIR",
                        help="where the images' replication metadata lives (default: "
                             "IMAGE.replfs-meta beside each image)")
        sp.add_argument("--tls-dir", metavar="DIR",
                        help="TLS on the NBD link, X.509 files in QEMU's layout: ca-cert.pem, "
                             "server-cert.pem + server-key.pem (secondary), client-cert.pem + "
                             "client-key.pem (primary); both sides verify the other's "
                             "certificate against the CA")
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
    sp.add_argument("--discard-my-data", action="store_true",
                    help="this image's own writes since the last common generation (a "
                         "failover's, an old primary's) are overwritten by the primary's "
                         "resync: the way out of a split brain")
    sp.add_argument("--allow", action="append", metavar="CIDR",
                    help="only these source networks may connect, e.g. 10.0.0.7/32 "
                         "(repeatable; others are closed at once and logged)")
    sp.add_argument("--insecure", action="store_true",
                    help="listen on a non-loopback address without --tls-dir (plain NBD: "
                         "anyone who can reach the port can write the disk)")

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
    sp.add_argument("--protocol", choices=("sync", "checkpoint"), default="sync",
                    help="sync (default): a write completes when both sides have it; "
                         "checkpoint: when the local image has it, the secondary gets it "
                         "by the next checkpoint (`checkpoint --pair` drains)")
    sp.add_argument("--max-lag", metavar="BYTES", default="64M",
                    help="checkpoint protocol: bytes queued for the secondary before "
                         "writes wait (default 64M)")
    sp.add_argument("--tls-hostname", metavar="NAME",
                    help="with --tls-dir: also check that the secondary's certificate "
                         "names NAME (default: the CA's signature only)")

    for action, text in (("checkpoint", "run a checkpoint"),
                         ("failover", "fail over"),
                         ("stop", "stop replication in an orderly way"),
                         ("connect", "primary: connect to the secondary now"),
                         ("disconnect", "primary: drop the secondary, no retries"),
                         ("resync", "primary: resync the secondary now"),
                         ("reprotect", "failed-over secondary: become the primary of a new "
                                       "secondary (HOST:PORT), the VM running on")):
        sp = sub.add_parser(action, help=f"{text} (echo 1 > MOUNT/.replfs/{action})")
        sp.add_argument("mount", metavar="MOUNT")
        if action == "checkpoint":
            sp.add_argument("--pair", action="store_true",
                            help="on the primary: drain it, then checkpoint the secondary "
                                 "over the replication link, one cut for all disks")
        elif action == "failover":
            sp.add_argument("--force", action="store_true",
                            help="take the secondary disk as it is, even when it cannot "
                                 "give back the last checkpoint")
        elif action == "resync":
            sp.add_argument("--full", action="store_true",
                            help="every cluster, whatever the dirty record says")
        elif action == "connect":
            sp.add_argument("--secondary", metavar="HOST:PORT",
                            help="connect to this secondary instead")
        elif action == "reprotect":
            sp.add_argument("--secondary", metavar="HOST:PORT", required=True,
                            help="the new secondary (usually the old primary, restarted "
                                 "with `replfs secondary` on its image)")

    sp = sub.add_parser("verify", help="primary: compare every cluster with the secondary "
                                       "while the VM runs (echo 1 > MOUNT/.replfs/verify); "
                                       "exit 0 when equal, 1 when not")
    sp.add_argument("mount", metavar="MOUNT")
    sp.add_argument("--rate", metavar="BYTES/s",
                    help="cap on the bytes compared per second, e.g. 100M (default: no cap)")
    sp.add_argument("--repair", action="store_true",
                    help="copy the differing clusters to the secondary; exit 0 once every "
                         "difference is repaired")

    for verb, text in (("up", "start this host's side of a resource file"),
                       ("down", "stop and unmount this host's side of a resource file")):
        sp = sub.add_parser(verb, help=f"{text} (RES: a .toml path or a name in /etc/replfs)")
        sp.add_argument("resource", metavar="RES")
        sp.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                        help="print the commands instead of running them")
        sp.add_argument("--host", metavar="NAME", default=argparse.SUPPRESS,
                        help="act as this host of the file (default: the host name)")
        if verb == "up":
            sp.add_argument("-f", "--foreground", action="store_true",
                            help="stay in the foreground (for systemd)")
            sp.add_argument("-v", "--verbose", action="store_true")

    sp = sub.add_parser("status", help="show the state of a mount (default: every one)")
    sp.add_argument("mount", metavar="MOUNT|RES", nargs="?",
                    help="a mount point or a resource (default: every replfs mount here)")
    sp.add_argument("--host", metavar="NAME", default=argparse.SUPPRESS)
    sp.add_argument("--json", action="store_true", help="print MOUNT/.replfs/status as is")
    sp.add_argument("--timeout", type=_positive_seconds, default=STATUS_TIMEOUT,
                    metavar="SECONDS",
                    help=f"give up when the daemon does not answer within SECONDS "
                         f"(default {STATUS_TIMEOUT:g}); exit 1")
    sp.add_argument("--watch", action="store_true",
                    help="redraw until interrupted (a progress bar during a resync)")
    sp.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                    help="--watch: seconds between updates (default 1)")

    sp = sub.add_parser("events", help="print a mount's events as they happen, one JSON "
                                       "object a line (MOUNT/.replfs/events)")
    sp.add_argument("mount", metavar="MOUNT")
    sp.add_argument("--count", type=int, metavar="N",
                    help="exit after N lines (the first describes the current state)")
    sp.add_argument("--once", action="store_true",
                    help="print the current state (one line) and exit; same as --count 1")

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
    pid_file = check_pid_file(args.pid_file) if args.pid_file else None
    common = dict(role=args.command, mount=os.path.abspath(args.mount), disks=disks,
                  timeout=args.timeout, inject_faults=args.inject_faults, meta_dir=meta_dir,
                  log=log_file, pid_file=pid_file)
    common["tls_dir"] = check_tls_dir(args)
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
        try:
            max_lag = parse_size(args.max_lag)
        except ValueError:
            max_lag = 0
        if max_lag <= 0:
            raise UsageError(f"--max-lag: expected a size such as 64M, got {args.max_lag!r}")
        return MountConfig(**common, secondary=parse_hostport(args.secondary, "--secondary"),
                           protocol=args.protocol, max_lag=max_lag,
                           allow_degraded_start=args.allow_degraded_start,
                           reconnect_interval=args.reconnect_interval, resync_rate=rate,
                           tls_hostname=getattr(args, "tls_hostname", None))
    cs = args.cluster_size
    if cs < 512 or cs & (cs - 1):
        raise UsageError("--cluster-size must be a power of two >= 512")
    if args.workdir is not None and os.path.exists(args.workdir) and \
            not os.path.isdir(args.workdir):
        raise UsageError(f"--workdir {args.workdir}: not a directory")
    listen = parse_hostport(args.listen, "--listen")
    check_listen_address(listen)
    insecure = bool(getattr(args, "insecure", False))
    check_link_security(listen, common["tls_dir"], insecure)
    return MountConfig(**common, listen=listen, workdir=args.workdir, cluster_size=cs,
                       insecure=insecure, allow=check_allow(getattr(args, "allow", None)),
                       discard_my_data=args.discard_my_data)


def cmd_mount(args) -> int:
    cfg = mount_config(args)
    if args.foreground:
        return run_foreground(cfg, args.verbose, args.ready_fd)
    return spawn_background(cfg, args.log, args.argv)


def run_foreground(cfg: MountConfig, verbose: bool, fd: int | None) -> int:
    from replfs import daemon

    if cfg.log and not _stderr_is(cfg.log):  # -f on a terminal: no file to reopen
        cfg = dataclasses.replace(cfg, log=None)
    daemon.setup_logging(cfg.role, verbose)  # journald's form when stderr is the journal

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
        daemon.run(cfg, ready, notify=fd is None)  # systemd: only a real -f daemon
    except (ReplfsError, OSError) as exc:
        text = str(exc) if isinstance(exc, ReplfsError) else f"{exc.strerror}: {exc.filename}"
        code = getattr(exc, "exit_code", EXIT_FAIL)
        if fd is not None:
            try:
                os.write(fd, f"error {code} {text}\n".encode())
            except OSError:
                pass
        print(daemon.failure_line(text), file=sys.stderr)
        return code
    return 0


def _stderr_is(path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(2), os.stat(path))
    except OSError:
        return False


def spawn_background(cfg: MountConfig, log: str | None, cli_argv: list[str]) -> int:
    """Run this same command with ``-f`` in a new session; wait for "ready"."""
    log_path = log or default_log(cfg.role, cfg.mount)
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


def default_log(role: str, mount: str) -> str:
    """``/tmp/replfs-ROLE-NAME-HASH.log``: the mount's name for people, a hash
    of its whole path so that two mounts named alike never share a log."""
    import hashlib

    tag = hashlib.sha256(os.path.abspath(mount).encode()).hexdigest()[:8]
    return f"/tmp/replfs-{role}-{os.path.basename(mount)}-{tag}.log"


def control_path(mount: str, name: str) -> str:
    path = os.path.join(mount, ".replfs", name)
    if not os.path.exists(path):
        raise UsageError(f"{mount}: not a replfs mount")
    return path


#: How long ``status`` and the action commands wait for a daemon's answer.
STATUS_TIMEOUT = 10.0


class DaemonHung(ReplfsError):
    """The daemon did not answer a read of its own mount in time."""


def bounded(mount: str, fn, timeout: float | None):
    """``fn()`` (which touches ``mount``) within ``timeout`` seconds.

    A read of a FUSE mount whose daemon is stopped (SIGSTOP) or hung blocks
    in the kernel, and not even the lookup of the file can be bounded from
    the same thread: the call runs in a daemon thread, and a caller that
    gives up leaves it there (:func:`main` then exits with ``os._exit``;
    the kernel's FUSE wait is killable, so the process does go).
    """
    if timeout is None:
        return fn()
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            result["error"] = exc

    t = threading.Thread(target=run, name="replfs-status", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        _HUNG.append(t)
        raise DaemonHung(f"{mount}: the daemon did not answer within {timeout:g} s "
                         f"(stopped or hung?)")
    if "error" in result:
        exc = result.pop("error")
        try:
            raise exc
        finally:
            exc = None
    return result["value"]


_HUNG: list[threading.Thread] = []


def read_status_bytes(mount: str, timeout: float | None = STATUS_TIMEOUT) -> bytes:
    def read() -> bytes:
        with open(control_path(mount, "status"), "rb") as f:
            return f.read()

    return bounded(mount, read, timeout)


def read_status(mount: str, timeout: float | None = STATUS_TIMEOUT) -> dict:
    return json.loads(read_status_bytes(mount, timeout))


def action_value(args) -> bytes:
    """What the command writes to its control file."""
    if getattr(args, "force", False):
        return b"force\n"
    if getattr(args, "full", False):
        return b"full\n"
    if getattr(args, "pair", False):
        return b"pair\n"
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
    try:
        state = f"state {read_status(args.mount)['state']}"
    except (OSError, ValueError, ReplfsError):
        # done, and the daemon went away right after (or stopped answering)
        state = "the daemon is no longer answering"
    print(f"replfs: {args.command} done; {state}")
    return 0


def cmd_status(args) -> int:
    if args.watch:
        from replfs.tools.watch import watch

        control_path(args.mount, "status")
        return watch(lambda: read_status(args.mount), args.interval)
    if args.json:
        sys.stdout.write(read_status_bytes(args.mount, args.timeout).decode())
        return 0
    st = read_status(args.mount, args.timeout)
    peer = "connected" if st.get("peer_connected") else "not connected"
    # the secondary's own address is where it listens; the primary's is its peer's
    where = (f"listening on {st['listen']}" if st.get("listen") and st["role"] == "secondary"
             else st.get("secondary") or "")
    n = st["checkpoints"]
    print(f"{st['role']} {args.mount}: {st['state']}, peer {peer}"
          f"{' (' + where + ')' if where else ''}, {n} checkpoint{'' if n == 1 else 's'}")
    if st.get("sync"):
        from replfs.tools.watch import sync_text

        print(f"  {sync_text(st['sync'])}")
    if st.get("verify"):
        from replfs.tools.watch import verify_text

        print(f"  {verify_text(st['verify'])}")
    if st.get("last_error"):
        print(f"  last error: {st['last_error']}")
    if st.get("reconnect_error"):
        print(f"  last reconnect attempt: {st['reconnect_error']}")
    for name, d in st.get("disks", {}).items():
        oos = d.get("out_of_sync_bytes")
        print(f"  {name}: {d['size']} bytes, image {d['image']}"
              f"{f', {oos} bytes out of sync' if oos else ''}")
    return 0


def cmd_verify(args) -> int:
    """``replfs verify MOUNT [--rate R] [--repair]``: run the verify (the
    control file's write returns when it is done), print the differing
    ranges from the status, one ``DISK START LENGTH`` line each (bytes), and
    a summary.  Exit 0 when equal (or, with ``--repair``, once every
    difference is repaired), 1 when not or when the verify failed."""
    words = ["repair"] if args.repair else []
    if args.rate is not None:
        try:
            rate = parse_size(args.rate.removesuffix("/s"))
        except ValueError:
            rate = 0
        if rate <= 0:
            raise UsageError(f"--rate: expected bytes per second such as 100M, got "
                             f"{args.rate!r}")
        words.append(f"rate={rate}")
    path = control_path(args.mount, "verify")
    done = threading.Event()
    shower = None
    if sys.stderr.isatty():
        shower = threading.Thread(target=_show_verify, args=(args.mount, done), daemon=True)
        shower.start()
    outcome: dict = {}

    def run() -> None:  # the write returns when the verify is done
        try:
            _write_control(path, (" ".join(words) or "1").encode() + b"\n")
        except OSError as exc:
            outcome["error"] = exc

    # The write blocks in the kernel until the daemon answers, and Python
    # takes Ctrl-C in the main thread: the write runs in a thread, and Ctrl-C
    # here is passed on to that thread, where the daemon sees it pending and
    # cancels the verify (fuse/control.py: run_interruptible).
    writer = threading.Thread(target=run, name="replfs-verify", daemon=True)
    writer.start()
    try:
        while writer.is_alive():
            writer.join(0.2)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, lambda *_: None)  # caught: pending, and harmless here
        try:
            signal.pthread_kill(writer.ident, signal.SIGINT)
        except (ProcessLookupError, TypeError):  # the write just ended
            pass
        writer.join(10)
        if writer.is_alive():
            _HUNG.append(writer)
        print("replfs: verify cancelled", file=sys.stderr)
        return 130
    finally:
        done.set()
        if shower is not None:
            shower.join(2)
    if "error" in outcome:
        reason = None
        try:
            st = read_status(args.mount)
            reason = st.get("action_error") or st.get("last_error")
        except (OSError, ValueError, ReplfsError):
            pass
        print(f"replfs: verify failed: {reason or os.strerror(outcome['error'].errno)}",
              file=sys.stderr)
        return EXIT_FAIL
    v = read_status(args.mount).get("verify") or {}
    for disk, start, length in v.get("differences", []):
        print(f"{disk} {start} {length}")
    from replfs.tools.watch import verify_text
    from replfs.units import human

    n = v.get("differences_count", 0)
    listed = len(v.get("differences", []))
    if n > listed:
        print(f"replfs: ... and {n - listed} more differing ranges (the first {listed} "
              f"are listed)")
    took = (v.get("finished_at") or 0) - (v.get("started_at") or 0)
    extra = f", {human(v.get('difference_bytes', 0))} in all" if n else ""
    how = "digests" if v.get("method") == "digests" else "reading the secondary"
    print(f"replfs: {verify_text(v)}{extra} ({took:.1f} s, by {how})")
    return 0 if n == 0 or v.get("repaired") else EXIT_FAIL


def _write_control(path: str, value: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value)
    finally:
        os.close(fd)


def _show_verify(mount: str, done: threading.Event) -> None:
    """A progress line on the terminal (stderr) while the verify runs."""
    from replfs.tools.watch import verify_text

    shown = False
    while not done.wait(1.0):
        try:
            v = read_status(mount, timeout=2.0).get("verify") or {}
        except (OSError, ValueError, ReplfsError):
            continue
        if v.get("state") == "running":
            sys.stderr.write(f"\r\x1b[K{verify_text(v)}")
            sys.stderr.flush()
            shown = True
    if shown:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()


def cmd_events(args) -> int:
    """``replfs events MOUNT``: the event lines, each flushed as it comes;
    exit 0 at SIGINT/SIGTERM, when the mount goes away, or after --count."""
    from replfs.events import follow

    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be a positive number of lines, got {args.count}")
    count = 1 if args.once else args.count
    follow(control_path(args.mount, "events"), count=count)
    return 0


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if _HUNG:  # a thread is stuck on a hung mount: do not wait for it at exit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except OSError:
                pass
        os._exit(code)
    return code


def _commands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions
            if isinstance(action, argparse._SubParsersAction) for name in action.choices}


def _main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser()
    if len(argv) >= 2 and not argv[0].startswith("-") and argv[0] not in _commands(parser):
        # mount.fuse3's convention (mount -t fuse.replfs RES MOUNT -o ...); a
        # mistyped command (no -o, no such resource) gets argparse's message
        from replfs import resource

        helper = any(a.startswith("-o") for a in argv[2:])
        try:
            helper = helper or os.path.isfile(resource.resolve(argv[0]))
        except UsageError:
            pass
        if not helper:
            parser.parse_args(argv)  # exits 2: invalid choice
        try:
            return resource.mount_helper(argv)
        except UsageError as exc:
            print(f"replfs: {exc}", file=sys.stderr)
            return EXIT_USAGE
    args = parser.parse_args(argv)
    args.argv = list(argv)
    try:
        if args.command in ("primary", "secondary"):
            return cmd_mount(args)
        if args.command in ("checkpoint", "failover", "stop", "connect", "disconnect",
                            "resync", "reprotect"):
            return cmd_action(args)
        if args.command == "verify":
            return cmd_verify(args)
        if args.command == "status":
            if args.mount is None or not os.path.isdir(args.mount):
                from replfs.resource import cmd_status as status_of_resources
                return status_of_resources(args)  # every mount, or a resource's
            return cmd_status(args)
        if args.command in ("up", "down"):
            from replfs import resource
            return resource.cmd_up(args) if args.command == "up" else resource.cmd_down(args)
        if args.command == "events":
            return cmd_events(args)
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
