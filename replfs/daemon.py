"""The mount daemon of either role: build the graph, mount, serve, clean up.

One trio run per daemon.  Start-up order: open the images; on the secondary,
listen on NBD; on the primary, connect to every export and compare sizes;
then mount with FUSE, and only then tell the waiting parent "ready" (so
``replfs primary ...`` returns once replication is set up, like sshfs).

SIGHUP reopens the log file (logrotate); it does not unmount.

Under systemd (:mod:`replfs.systemd`): a ``-f`` daemon tells the manager
``READY=1`` once the mount is live, ``STATUS=`` whenever the state or the
peer changes, ``STOPPING=1`` when it begins to unmount; its log lines follow
journald's conventions when stderr is the journal.  ``--pid-file`` is
written once the mount is live and removed at exit (:class:`Lifecycle`).

Shut-down (``fusermount3 -u``, ``umount``, SIGTERM, SIGINT): the FUSE loop
ends, the images are flushed, NBD is disconnected cleanly (DISC), the
graph is closed and the overlays' scratch files are removed, exit 0.
``auto_unmount`` makes fusermount3 remove the mount if the daemon dies
without doing this, and :mod:`replfs.fuse.watcher` covers the case where
fusermount3 misses it.

The graphs are built in :mod:`replfs.block.graph`, the replication state is
the controllers' (:mod:`replfs.replication`); this module only orders their
lives.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import pyfuse3
import trio

from replfs import __version__, systemd
from replfs.block import raw
from replfs.block.graph import PrimaryGraph, SecondaryGraph
from replfs.config import MountConfig
from replfs.core.malloc import keep_freed_buffers
from replfs.errors import PeerUnavailable, ReplfsError
from replfs.fuse import fastwait
from replfs.fuse import watcher as watcher_mod
from replfs.fuse.ops import ReplfsOps
from replfs.meta.paths import workdir_path
from replfs.replication.link import nbd_connector
from replfs.replication.persist import DiskState
from replfs.replication.primary import PrimaryController, SplitBrain
from replfs.replication.secondary import SecondaryController
from replfs.replication.stage import ReplicationStage

log = logging.getLogger("replfs")

#: pyfuse3 worker tasks: requests of one file are served concurrently so that
#: the NBD pipeline stays full (queue depth > 1 reaches the secondary).  All
#: started up front: pyfuse3 otherwise spawns and retires workers as load
#: comes and goes, which measured 10 % (QD16 writes) to 30 % (QD16 reads)
#: slower here.
MAX_TASKS = 32
#: Read-only NBD observers per export of a secondary (qemu-img, nbdinfo,
#: backups reading the secondary disk while the primary replicates).
OBSERVERS = 8


def user_allow_other(conf: str = "/etc/fuse.conf") -> bool:
    """Whether fuse.conf lets non-root users mount with ``allow_other``."""
    try:
        with open(conf) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def fuse_options(role: str, uid: int | None = None, conf: str = "/etc/fuse.conf") -> set[str]:
    """The mount options.  ``allow_other`` lets the VM's user (libvirt's
    qemu user, say) open the disk files; fusermount3 refuses it to a non-root
    user unless fuse.conf says ``user_allow_other``, so such a user mounts
    without it (only that user can then open the files; logged at start)."""
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname=replfs-{role}", "subtype=replfs", "auto_unmount"}
    if (os.geteuid() if uid is None else uid) == 0 or user_allow_other(conf):
        opts.add("allow_other")
    return opts


async def _serve_fuse(ops: ReplfsOps, cfg: MountConfig, ctl, life: Lifecycle, nursery,
                      info: str | None = None) -> None:
    options = fuse_options(cfg.role)
    if "allow_other" not in options:
        log.warning("only uid %d can open the files of %s: allow_other needs "
                    "'user_allow_other' in /etc/fuse.conf for a non-root mount",
                    os.geteuid(), cfg.mount)
    pyfuse3.init(ops, cfg.mount, options)
    watcher = watcher_mod.start(cfg.mount)  # removes the mount if we are killed
    if fastwait.install(fastwait.find_session_fd()):
        raw.set_contention_probe(fastwait.requests_waiting)
    else:
        log.warning("the stock pyfuse3 request wait is used (slower): %s",
                    fastwait.statistics()["reason"])
    try:
        # Handlers first: a SIGTERM right after "ready" must unmount, not kill.
        await nursery.start(_signals, cfg.log, life, ops)
        life.ready(ctl, info)
        nursery.start_soon(life.follow_status, ops)
        await pyfuse3.main(min_tasks=MAX_TASKS, max_tasks=MAX_TASKS)
        life.stopping("unmounted")
    finally:
        pyfuse3.close(unmount=True)
        watcher_mod.done(watcher)


async def _signals(log_file: str | None, life: Lifecycle, ops: ReplfsOps, *,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM, SIGINT: unmount.  SIGHUP (logrotate): reopen the log file."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        task_status.started()
        async for signum in sigs:
            if signum == signal.SIGHUP:
                reopen_log(log_file)
                continue
            name = signal.Signals(signum).name
            log.info("signal %s: unmounting", name)
            life.stopping(f"{name}: unmounting")
            ops.end_streams()  # blocked readers of the events file get EOF
            fastwait.request_exit()
            pyfuse3.terminate()
            return


def reopen_log(path: str | None) -> None:
    """Point stdout and stderr (where the log goes) at ``path`` anew, so a
    rotated log file is let go; without a file (``-f`` on a terminal) there is
    nothing to reopen."""
    if path is None:
        log.info("SIGHUP: logging to stderr, no log file to reopen")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.error("SIGHUP: cannot reopen the log %s: %s", path, exc.strerror)
        return
    for target in (1, 2):
        os.dup2(fd, target)
    os.close(fd)
    log.info("SIGHUP: log reopened (%s)", path)


async def run_secondary(cfg: MountConfig, life: Lifecycle) -> None:
    from replfs.nbd.server import NBDServer

    ctl = SecondaryController(discard_my_data=cfg.discard_my_data)
    states = _open_states(cfg, tracking=False)
    try:
        workdir = cfg.workdir or workdir_path(cfg.disks[0].image)
        resume = SecondaryController.resume_of(states, workdir)
        graph = SecondaryGraph(cfg.images, workdir=cfg.workdir, cluster_size=cfg.cluster_size,
                               faults=cfg.inject_faults, on_export_error=ctl.export_failed,
                               before_first_write=ctl.before_first_write, resume=resume)
    except BaseException:
        for st in states.values():
            st.meta.close()
        raise
    ctl.attach(graph, states)
    server = NBDServer(graph.exports(), max_clients_per_export=1, observers=OBSERVERS,
                       admit=ctl.admit_primary, on_clients_changed=ctl.clients_changed,
                       control=ctl.control, handshake_timeout=cfg.timeout,
                       tls=_server_tls(cfg), allow=cfg.allow)
    ctl.server = server
    ops = ReplfsOps(ctl, graph.views(), mount=cfg.mount)
    ctl.on_view_changed = ops.invalidate_disks
    reprotected: list[PrimaryController] = []
    nursery = None

    async def become_primary(target: str) -> None:
        """Re-protect: a primary of ``target`` over the mirrors that recorded
        the VM's writes since the failover; the mount's files and the VM's
        I/O stay where they are, only the controller behind them changes."""
        sizes = {n: d.size for n, d in graph.disks.items()}
        pctl = PrimaryController(target, cfg.timeout,
                                 connector=nbd_connector(sizes, cfg.timeout,
                                                         tls=_client_tls(cfg)),
                                 reconnect_interval=cfg.reconnect_interval,
                                 resync_rate=cfg.resync_rate)
        mirrors = {n: d.view.child for n, d in graph.disks.items()}
        pctl.attach(mirrors, cfg.images, ctl.states)
        pctl.events = ctl.events  # readers of the events file follow the mount
        pctl.checkpoints, pctl.last_checkpoint_at = ctl.checkpoints, ctl.last_checkpoint_at
        pctl.stage = ReplicationStage.DEGRADED
        pctl.want_connected = False  # no retries behind the operator's back
        await nursery.start(pctl.run)
        for m in mirrors.values():
            m.set_peer_error_hook(pctl.peer_failed)
        try:
            await pctl.connect(target)
        except BaseException:
            with trio.CancelScope(shield=True):
                await pctl.abandon()
            for m in mirrors.values():
                m.set_peer_error_hook(ctl.no_peer)
            raise
        reprotected.append(pctl)
        ctl.hand_over()
        ops.ctl = pctl
        pctl.events.publish("reprotect", role="primary", secondary=target, state=pctl.state)
        log.info("reprotect: this mount is now the primary of %s (state %s)", target,
                 pctl.state)

    ctl.become_primary = become_primary
    try:
        for st in states.values():
            await st.start_run()
        await ctl.recover(frozenset(resume))
        async with trio.open_nursery() as nursery:
            host, port = cfg.listen.host, cfg.listen.port
            try:
                bound = await nursery.start(server.serve, host, port)
            except OSError as exc:
                raise ReplfsError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            ctl.listen = f"{bound[0]}:{bound[1]}"
            log.info("secondary: NBD on %s, overlays in %s, state %s", ctl.listen,
                     graph.workdir, ctl.state)
            await _serve_fuse(ops, cfg, ctl, life, nursery, ctl.listen)
            if reprotected:  # disconnect cleanly while the NBD clients' tasks run
                with trio.CancelScope(shield=True):
                    await reprotected[0].shutdown()
            nursery.cancel_scope.cancel()
    finally:
        if reprotected:
            with trio.CancelScope(shield=True):
                await reprotected[0].shutdown()
        await ctl.shutdown()


def _server_tls(cfg: MountConfig):
    """The secondary's TLS context (``--tls-dir``), or None."""
    if cfg.tls_dir is None:
        return None
    from replfs.nbd.tls import TLSConfigError, server_context

    try:
        return server_context(cfg.tls_dir)
    except TLSConfigError as exc:
        raise ReplfsError(str(exc)) from None


def _client_tls(cfg: MountConfig):
    """The primary's TLS credentials (``--tls-dir``), or None."""
    if cfg.tls_dir is None:
        return None
    from replfs.nbd.tls import TLSConfigError, client_context

    try:
        return client_context(cfg.tls_dir, cfg.tls_hostname)
    except TLSConfigError as exc:
        raise ReplfsError(str(exc)) from None


def _open_states(cfg: MountConfig, *, tracking: bool) -> dict[str, DiskState]:
    """Each image's metadata file (created beside it on the first run)."""
    states: dict[str, DiskState] = {}
    try:
        for d in cfg.disks:
            size = _image_size(d.image)
            states[d.name] = DiskState(d.name, d.image, size, cfg.cluster_size,
                                       meta_dir=cfg.meta_dir, tracking=tracking)
    except BaseException:
        for st in states.values():
            st.meta.close()
        raise
    return states


def _image_size(path: str) -> int:
    with open(path, "rb") as f:
        return f.seek(0, 2)


async def run_primary(cfg: MountConfig, life: Lifecycle) -> None:
    graph = PrimaryGraph(cfg.images, faults=cfg.inject_faults)
    try:
        states = _open_states(cfg, tracking=True)
    except BaseException:
        graph.close()
        raise
    sizes = {n: node.size for n, node in graph.local.items()}
    ctl = PrimaryController(str(cfg.secondary), cfg.timeout,
                            connector=nbd_connector(sizes, cfg.timeout, tls=_client_tls(cfg)),
                            reconnect_interval=cfg.reconnect_interval,
                            resync_rate=cfg.resync_rate, protocol=cfg.protocol,
                            max_lag=cfg.max_lag)
    ctl.attach(graph.mirror({}, on_peer_error=ctl.peer_failed,
                            records={n: st.record for n, st in states.items()},
                            logs={n: st.al for n, st in states.items()}),
               cfg.images, states)
    ops = ReplfsOps(ctl, graph.disks, mount=cfg.mount)
    try:
        for st in states.values():
            await st.start_run()
        async with trio.open_nursery() as nursery:
            await nursery.start(ctl.run)
            life.status(f"connecting to the secondary {cfg.secondary}")
            try:
                await ctl.connect_at_start()
            except PeerUnavailable as exc:
                if not cfg.allow_degraded_start:
                    raise
                ctl.start_degraded(f"started without the secondary: {exc}")
            except SplitBrain:
                if not cfg.allow_degraded_start:
                    raise
                ctl.start_degraded(ctl.last_error)
            await _serve_fuse(ops, cfg, ctl, life, nursery)
            # Unmounted: flush and say goodbye while the NBD clients' tasks
            # (in the controller's nursery) still run; then stop the rest.
            with trio.CancelScope(shield=True):
                await ctl.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await ctl.shutdown()
        graph.close()


def run(cfg: MountConfig, ready, *, notify: bool = False) -> None:
    """Run the daemon of ``cfg.role`` until unmounted.  ``ready(info)`` is
    called once the mount is live.  ``notify``: tell systemd (if
    ``$NOTIFY_SOCKET`` is set; only the ``-f`` daemon a manager started)."""
    main = run_primary if cfg.role == "primary" else run_secondary
    life = Lifecycle(cfg, ready, systemd.Notifier.from_env() if notify else None)
    keep_freed_buffers()  # payload buffers reuse the heap (see replfs.core.malloc)
    log.info("replfs %s %s starting (pid %d): mount %s, disks %s", __version__, cfg.role,
             os.getpid(), cfg.mount, ", ".join(f"{d.name}={d.image}" for d in cfg.disks))
    try:
        trio.run(main, cfg, life)
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from group
    finally:
        life.close()
    log.info("%s exits (status 0): %s unmounted cleanly", cfg.role, cfg.mount)


class Lifecycle:
    """What the outside world is told about the daemon's life: the parent
    CLI's ``ready`` callback, the log's start/ready/exit lines, the pid file,
    and systemd's notifications.

    Design note
    -----------
    The ``STATUS=`` text follows the controller by polling its state, peer and
    last error once a second (:meth:`follow_status`) instead of a hook in the
    controllers: the text is for a human's ``systemctl status``, a second late
    is fine, and the controllers stay free of service-manager concerns.  The
    pid file is written before the parent is told "ready", so it exists when
    ``replfs primary`` (without ``-f``) returns.
    """

    #: Seconds between two looks at the controller for ``STATUS=``.
    STATUS_INTERVAL = 1.0

    def __init__(self, cfg: MountConfig, ready, notifier: systemd.Notifier | None) -> None:
        self.cfg = cfg
        self._ready = ready
        self.notifier = notifier
        self.pid_written = False
        self.is_stopping = False

    def status(self, text: str) -> None:
        if self.notifier is not None and not self.is_stopping:
            self.notifier.status(text)

    def ready(self, ctl, info: str | None) -> None:
        """The mount is live: pid file, log line, ``READY=1``, then the parent."""
        if self.cfg.pid_file:
            try:
                write_pid_file(self.cfg.pid_file)
            except OSError as exc:
                raise ReplfsError(f"--pid-file {self.cfg.pid_file}: {exc.strerror}") from None
            self.pid_written = True
        extra = f", NBD on {info}" if info else ""
        log.info("ready: %s mounted on %s%s, state %s", self.cfg.role, self.cfg.mount, extra,
                 ctl.state)
        if self.notifier is not None:
            self.notifier.ready(status_text(ctl))
        self._ready(info)

    async def follow_status(self, ops) -> None:
        """``STATUS=`` on every change of the state, the peer or the error
        (of the mount's controller: a re-protect changes it)."""
        if self.notifier is None:
            return
        while not self.is_stopping:
            await trio.sleep(self.STATUS_INTERVAL)
            self.status(status_text(ops.ctl))

    def stopping(self, why: str) -> None:
        """Shut-down begins (a signal, or the mount was removed): once."""
        if self.is_stopping:
            return
        self.is_stopping = True
        if self.notifier is not None:
            self.notifier.stopping(why)

    def close(self) -> None:
        """At exit, clean or not: the pid file goes, the notifier closes."""
        if self.pid_written:
            remove_pid_file(self.cfg.pid_file)
            self.pid_written = False
        if self.notifier is not None:
            self.notifier.close()


def status_text(ctl) -> str:
    """One line for ``systemctl status``: the state, the peer, why if degraded."""
    state = ctl.state
    if state in ("degraded", "inconsistent") and ctl.last_error:
        return f"{state}: {ctl.last_error}"
    peer = "peer connected" if ctl.peer_connected else "peer not connected"
    return f"{state}, {peer}"


# -- the pid file ----------------------------------------------------------------------
def write_pid_file(path: str) -> None:
    """Our pid in ``path``, whole or not at all (a temporary file, renamed).

    Design note: whatever ``path`` held is replaced, a stale file of a dead
    daemon as well as a live daemon's (the user named the same file for two
    mounts; that one's file is lost, which is logged).  Refusing would turn a
    left-over file into a failed start, which is worse under systemd.
    """
    old = _read_pid(path)
    if old is not None and old != os.getpid() and _pid_alive(old):
        log.warning("--pid-file %s: named the running process %d; replaced", path, old)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_pid_file(path: str) -> None:
    """Remove ``path`` if it still holds our pid (another daemon may have
    taken it over since)."""
    if _read_pid(path) != os.getpid():
        return
    try:
        os.unlink(path)
    except OSError as exc:
        log.warning("--pid-file %s: cannot remove it: %s", path, exc.strerror)


def _read_pid(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- logging ---------------------------------------------------------------------------
def setup_logging(role: str, verbose: bool) -> None:
    """The daemon's log on stderr: journald's form (``<6>name: message``) when
    stderr is the journal, else with a timestamp and the pid."""
    handler = logging.StreamHandler(sys.stderr)
    if systemd.stderr_is_journal():
        handler.setFormatter(systemd.JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s replfs-{role}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def failure_line(text: str) -> str:
    """The daemon's last line when it fails: ``replfs: TEXT``, marked as an
    error (``<3>``) when stderr is the journal."""
    return f"{'<3>' if systemd.stderr_is_journal() else ''}replfs: {text}"


def _first_leaf(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in groups; the CLI reports the underlying one."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
