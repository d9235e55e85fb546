"""The mount daemon of either role: build the graph, mount, serve, clean up.

One trio run per daemon.  Start-up order: open the images; on the secondary,
listen on NBD; on the primary, connect to every export and compare sizes;
then mount with FUSE, and only then tell the waiting parent "ready" (so
``replfs primary ...`` returns once replication is set up, like sshfs).

SIGHUP reopens the log file (logrotate); it does not unmount.

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

import pyfuse3
import trio

from replfs.block import raw
from replfs.block.graph import PrimaryGraph, SecondaryGraph
from replfs.config import MountConfig
from replfs.errors import ReplfsError
from replfs.fuse import fastwait
from replfs.fuse import watcher as watcher_mod
from replfs.fuse.ops import ReplfsOps
from replfs.meta.paths import workdir_path
from replfs.errors import PeerUnavailable
from replfs.replication.link import nbd_connector
from replfs.replication.persist import DiskState
from replfs.replication.primary import PrimaryController, SplitBrain
from replfs.replication.secondary import SecondaryController

log = logging.getLogger("replfs")

#: pyfuse3 worker tasks: requests of one file are served concurrently so that
#: the NBD pipeline stays full (queue depth > 1 reaches the secondary).  All
#: started up front: pyfuse3 otherwise spawns and retires workers as load
#: comes and goes, which measured 10 % (QD16 writes) to 30 % (QD16 reads)
#: slower here.
MAX_TASKS = 32


def fuse_options(role: str) -> set[str]:
    opts = set(pyfuse3.default_options)
    opts |= {f"fsname=replfs-{role}", "subtype=replfs", "auto_unmount", "allow_other"}
    return opts


async def _serve_fuse(ops: ReplfsOps, mount: str, role: str, ready, nursery,
                      log_file: str | None = None) -> None:
    pyfuse3.init(ops, mount, fuse_options(role))
    watcher = watcher_mod.start(mount)  # removes the mount if we are killed
    if fastwait.install(fastwait.find_session_fd()):
        raw.set_contention_probe(fastwait.requests_waiting)
    else:
        log.warning("the stock pyfuse3 request wait is used (slower): %s",
                    fastwait.statistics()["reason"])
    try:
        nursery.start_soon(_signals, log_file)
        ready()
        await pyfuse3.main(min_tasks=MAX_TASKS, max_tasks=MAX_TASKS)
    finally:
        pyfuse3.close(unmount=True)
        watcher_mod.done(watcher)


async def _signals(log_file: str | None) -> None:
    """SIGTERM, SIGINT: unmount.  SIGHUP (logrotate): reopen the log file."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            if signum == signal.SIGHUP:
                reopen_log(log_file)
                continue
            log.info("signal %s: unmounting", signal.Signals(signum).name)
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


async def run_secondary(cfg: MountConfig, ready) -> None:
    from replfs.nbd.server import NBDServer

    ctl = SecondaryController()
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
    server = NBDServer(graph.exports(), max_clients_per_export=1,
                       admit=ctl.admit_primary, on_clients_changed=ctl.clients_changed,
                       control=ctl.control, handshake_timeout=cfg.timeout)
    ctl.server = server
    ops = ReplfsOps(ctl, graph.views())
    ctl.on_view_changed = ops.invalidate_disks
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
            await _serve_fuse(ops, cfg.mount, "secondary",
                              lambda: ready(ctl.listen), nursery, cfg.log)
            nursery.cancel_scope.cancel()
    finally:
        await ctl.shutdown()


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


async def run_primary(cfg: MountConfig, ready) -> None:
    graph = PrimaryGraph(cfg.images, faults=cfg.inject_faults)
    try:
        states = _open_states(cfg, tracking=True)
    except BaseException:
        graph.close()
        raise
    sizes = {n: node.size for n, node in graph.local.items()}
    ctl = PrimaryController(str(cfg.secondary), cfg.timeout,
                            connector=nbd_connector(sizes, cfg.timeout),
                            reconnect_interval=cfg.reconnect_interval,
                            resync_rate=cfg.resync_rate)
    ctl.attach(graph.mirror({}, on_peer_error=ctl.peer_failed,
                            records={n: st.record for n, st in states.items()},
                            logs={n: st.al for n, st in states.items()}),
               cfg.images, states)
    ops = ReplfsOps(ctl, graph.disks)
    try:
        for st in states.values():
            await st.start_run()
        async with trio.open_nursery() as nursery:
            await nursery.start(ctl.run)
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
            await _serve_fuse(ops, cfg.mount, "primary", lambda: ready(None), nursery, cfg.log)
            # Unmounted: flush and say goodbye while the NBD clients' tasks
            # (in the controller's nursery) still run; then stop the rest.
            with trio.CancelScope(shield=True):
                await ctl.shutdown()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await ctl.shutdown()
        graph.close()


def run(cfg: MountConfig, ready) -> None:
    """Run the daemon of ``cfg.role`` until unmounted.  ``ready(info)`` is
    called once the mount is live."""
    main = run_primary if cfg.role == "primary" else run_secondary
    try:
        trio.run(main, cfg, ready)
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from group


def _first_leaf(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in groups; the CLI reports the underlying one."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
