"""The mount daemon of either role: build the graph, mount, serve, clean up.

One trio run per daemon.  Start-up order: open the images; on the secondary,
listen on NBD; on the primary, connect to every export and compare sizes;
then mount with FUSE, and only then tell the waiting parent "ready" (so
``replfs primary ...`` returns once replication is set up, like sshfs).

Shut-down (``fusermount3 -u``, ``umount``, SIGTERM, SIGINT): the FUSE loop
ends, the images are flushed, NBD is disconnected cleanly (DISC), the
overlays' scratch files are removed, exit 0.  ``auto_unmount`` makes
fusermount3 remove the mount if the daemon dies without doing this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile

import pyfuse3
import trio

from replfs import fuseloop
from replfs.block import raw
from replfs.block.fault import FaultLayer
from replfs.block.raw import RawImage
from replfs.errors import BlockError, ReplfsError
from replfs.fs import ReplfsOps
from replfs.gate import Gate
from replfs.primary import Primary, ReplicatedDisk
from replfs.secondary import Secondary, SecondaryDisk

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
    if fuseloop.install(fuseloop.find_session_fd()):
        raw.set_contention_probe(fuseloop.requests_waiting)
    else:
        log.warning("pyfuse3 %s: the stock request wait is used (slower)", pyfuse3.__version__)
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
            fuseloop.request_exit()
            pyfuse3.terminate()
            return


def _wrap_faults(node, spec: str | None):
    return FaultLayer(node, spec) if spec else node


async def run_secondary(args, ready) -> None:
    workdir = args.workdir
    remove_workdir = False
    if workdir is None:
        workdir = tempfile.mkdtemp(prefix=".replfs-", dir=os.path.dirname(
            os.path.abspath(args.disks[0][1])))
        remove_workdir = True
    else:
        os.makedirs(workdir, exist_ok=True)
    gate = Gate()
    disks = {}
    try:
        for name, image in args.disks:
            disks[name] = SecondaryDisk(name, image, workdir, gate,
                                        cluster_size=args.cluster_size,
                                        faults=args.inject_faults)
    except BaseException:
        for d in disks.values():
            d.close()
        if remove_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    ctl = Secondary(disks, gate, workdir, remove_workdir)
    from replfs.nbd.server import NBDServer

    server = NBDServer({n: d.export for n, d in disks.items()},
                       max_clients_per_export=1,
                       on_clients_changed=ctl.clients_changed)
    ctl.server = server
    ops = ReplfsOps(ctl, {n: d.view for n, d in disks.items()})
    ctl.on_view_changed = ops.invalidate_disks
    try:
        async with trio.open_nursery() as nursery:
            host, port = args.listen
            try:
                bound = await nursery.start(server.serve, host, port)
            except OSError as exc:
                raise ReplfsError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            ctl.listen = f"{bound[0]}:{bound[1]}"
            log.info("secondary: NBD on %s, overlays in %s", ctl.listen, workdir)
            await _serve_fuse(ops, args.mount, "secondary",
                              lambda: ready(ctl.listen), nursery)
            nursery.cancel_scope.cancel()
    finally:
        await ctl.shutdown()


async def run_primary(args, ready) -> None:
    from replfs.nbd.client import connect

    host, port = args.secondary
    async with contextlib.AsyncExitStack() as stack:
        locals_ = {}
        for name, image in args.disks:
            local = RawImage(image, name=f"{name}:primary-disk")
            stack.callback(local.close)
            locals_[name] = _wrap_faults(local, args.inject_faults)
        disks = {}
        clients = await stack.enter_async_context(trio.open_nursery())
        for name, image in args.disks:
            try:
                client = await connect(host, port, name, nursery=clients,
                                       connect_timeout=args.timeout)
            except BlockError as exc:
                raise ReplfsError(
                    f"cannot connect to the secondary {host}:{port} for disk {name}: "
                    f"{exc}") from None
            stack.push_async_callback(client.aclose)
            if client.size != locals_[name].size:
                raise ReplfsError(
                    f"disk {name}: size mismatch: primary image {image} is "
                    f"{locals_[name].size} bytes, the secondary's disk is {client.size} bytes")
            disks[name] = ReplicatedDisk(name, locals_[name], client,
                                         timeout=args.timeout, on_failure=None)
        ctl = Primary(disks, dict(args.disks), f"{host}:{port}")
        ops = ReplfsOps(ctl, disks)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ctl.watchdog)
                await _serve_fuse(ops, args.mount, "primary", lambda: ready(None), nursery)
                nursery.cancel_scope.cancel()
        finally:
            await ctl.shutdown()


def run(args, ready) -> None:
    """Run the daemon of ``args.role`` until unmounted.  ``ready(info)`` is
    called once the mount is live."""
    main = run_primary if args.role == "primary" else run_secondary
    try:
        trio.run(main, args, ready)
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from group


def _first_leaf(exc: BaseException) -> BaseException:
    """Nurseries wrap errors in groups; the CLI reports the underlying one."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
