"""The mount daemon of either role: build the graph, mount, serve, clean up.

One trio run per daemon.  Start-up order: open the images; on the secondary,
listen on NBD; on the primary, connect to every export and compare sizes;
then mount with FUSE, and only then tell the waiting parent "ready" (so
``replfs primary ...`` returns once replication is set up, like sshfs).

Shut-down (``fusermount3 -u``, ``umount``, SIGTERM, SIGINT): the FUSE loop
ends, the images are flushed, NBD is disconnected cleanly (DISC), the
graph is closed and the overlays' scratch files are removed, exit 0.
``auto_unmount`` makes fusermount3 remove the mount if the daemon dies
without doing this.

The graphs are built in :mod:`replfs.block.graph`, the replication state is
the controllers' (:mod:`replfs.replication`); this module only orders their
lives.
"""

from __future__ import annotations

import contextlib
import logging
import signal

import pyfuse3
import trio

from replfs.block import raw
from replfs.block.graph import PrimaryGraph, SecondaryGraph
from replfs.config import MountConfig
from replfs.errors import BlockError, ReplfsError
from replfs.fuse import fastwait
from replfs.fuse.ops import ReplfsOps
from replfs.replication.primary import PrimaryController
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


async def _serve_fuse(ops: ReplfsOps, mount: str, role: str, ready, nursery) -> None:
    pyfuse3.init(ops, mount, fuse_options(role))
    if fastwait.install(fastwait.find_session_fd()):
        raw.set_contention_probe(fastwait.requests_waiting)
    else:
        log.warning("the stock pyfuse3 request wait is used (slower): %s",
                    fastwait.statistics()["reason"])
    try:
        nursery.start_soon(_signals)
        ready()
        await pyfuse3.main(min_tasks=MAX_TASKS, max_tasks=MAX_TASKS)
    finally:
        pyfuse3.close(unmount=True)


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        async for signum in sigs:
            log.info("signal %s: unmounting", signal.Signals(signum).name)
            fastwait.request_exit()
            pyfuse3.terminate()
            return


async def run_secondary(cfg: MountConfig, ready) -> None:
    from replfs.nbd.server import NBDServer

    ctl = SecondaryController()
    graph = SecondaryGraph(cfg.images, workdir=cfg.workdir, cluster_size=cfg.cluster_size,
                           faults=cfg.inject_faults, on_export_error=ctl.export_failed)
    ctl.attach(graph)
    server = NBDServer(graph.exports(), max_clients_per_export=1,
                       admit=ctl.admit_primary, on_clients_changed=ctl.clients_changed,
                       handshake_timeout=cfg.timeout)
    ctl.server = server
    ops = ReplfsOps(ctl, graph.views())
    ctl.on_view_changed = ops.invalidate_disks
    try:
        async with trio.open_nursery() as nursery:
            host, port = cfg.listen.host, cfg.listen.port
            try:
                bound = await nursery.start(server.serve, host, port)
            except OSError as exc:
                raise ReplfsError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            ctl.listen = f"{bound[0]}:{bound[1]}"
            log.info("secondary: NBD on %s, overlays in %s", ctl.listen, graph.workdir)
            await _serve_fuse(ops, cfg.mount, "secondary",
                              lambda: ready(ctl.listen), nursery)
            nursery.cancel_scope.cancel()
    finally:
        await ctl.shutdown()


async def run_primary(cfg: MountConfig, ready) -> None:
    from replfs.nbd.client import connect

    peer = cfg.secondary
    ctl = PrimaryController(str(peer), cfg.timeout)
    async with contextlib.AsyncExitStack() as stack:
        graph = PrimaryGraph(cfg.images, faults=cfg.inject_faults)
        stack.callback(graph.close)
        clients = await stack.enter_async_context(trio.open_nursery())
        peers = {}
        for name, image in cfg.images.items():
            try:
                client = await connect(peer.host, peer.port, name, nursery=clients,
                                       connect_timeout=cfg.timeout)
            except BlockError as exc:
                raise ReplfsError(
                    f"cannot connect to the secondary {peer} for disk {name}: {exc}") from None
            stack.push_async_callback(client.aclose)
            size = graph.local[name].size
            if client.size != size:
                raise ReplfsError(
                    f"disk {name}: size mismatch: primary image {image} is {size} bytes, "
                    f"the secondary's disk is {client.size} bytes")
            peers[name] = client
        ctl.attach(graph.mirror(peers, on_peer_error=ctl.peer_failed), cfg.images)
        ops = ReplfsOps(ctl, graph.disks)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ctl.watchdog)
                await _serve_fuse(ops, cfg.mount, "primary", lambda: ready(None), nursery)
                nursery.cancel_scope.cancel()
        finally:
            await ctl.shutdown()


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
