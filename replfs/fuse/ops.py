"""The FUSE filesystem: one file per disk, plus the ``.replfs/`` control files.

Design note
-----------
The handlers are thin: a disk file passes reads and writes to its node (the
primary's :class:`~replfs.block.mirror.Mirror`, or the secondary's gated
view) and turns :class:`~replfs.errors.BlockError` into ``FUSEError(errno)``;
a control file runs one action of the controller through
:mod:`replfs.fuse.control`.  No replication logic lives here.

Layout (fixed inode numbers)::

    /               1
    /NAME           16 + i   one per disk, fixed size, read-write
    /.replfs/       2
        checkpoint  3        write 1: run the action; write() returns when done
        failover    4        (1, or "force")
        stop        5
        status      6        JSON, read-only
        connect     7        (1, or HOST:PORT)
        disconnect  8
        resync      9        (1, or "full")
        events      10       JSON lines, read-only, a stream (see below)
        metrics     11       Prometheus text format, read-only (:mod:`replfs.metrics`)
        verify      13       (1, "repair", "rate=100M", "repair rate=100M"; primary)
        reprotect   14       HOST:PORT (a failed-over secondary becomes its primary)

The kernel's page cache is used for disk files (``keep_cache``): every write
passes through the daemon (no writeback cache), so the cache is coherent on
the primary; on the secondary the view's content changes under open files
only at a checkpoint or failover, and then :meth:`ReplfsOps.invalidate_disks`
drops it.

The events file (:mod:`replfs.events`) is a stream: direct I/O and
non-seekable, each open file its own subscription to the controller's event
hub (the first line describes the current state), and a read blocks until
there is a line.  A blocked read holds one of pyfuse3's worker tasks (the
daemon runs a fixed number), so at most :data:`MAX_EVENT_READERS` events
files can be open at once (one more fails with EBUSY), which keeps the disks
served whatever the readers do.  A blocked read ends:

* with data, as soon as an event is published;
* with end of file when the daemon unmounts (:meth:`ReplfsOps.end_streams`,
  or the FUSE loop ending, which the read notices within
  :data:`STREAM_POLL` seconds), so that a reader never holds the exit up;
* with EINTR when its reader has a signal to take: pyfuse3 does not pass
  FUSE_INTERRUPT on (libfuse only marks the request), and once the kernel
  has sent a request even SIGKILL waits for its answer.  So every
  :data:`STREAM_POLL` seconds the read looks at the opener's pending signals
  in ``/proc`` (:func:`signal_pending`) and answers EINTR when one would
  interrupt it, as the FUSE protocol asks of an interrupted request.  A
  signal whose default is to stop or to be ignored does not count, so
  Ctrl-Z does not turn into a read error after ``fg``.  A reader other than
  the opener (an inherited descriptor) is not watched: its read ends at the
  next event or at the unmount.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import time

import pyfuse3
import trio

from replfs import metrics
from replfs.core.counters import Counters
from replfs.errors import BlockError
from replfs.fuse import control, fastwait

log = logging.getLogger("replfs.fs")

ROOT = pyfuse3.ROOT_INODE
CTL_DIR = 2
STATUS = 6
EVENTS = 10
METRICS = 11
ACTIONS = {name.encode(): inode for name, inode in zip(control.ACTIONS, (3, 4, 5, 7, 8, 9, 13, 14))}
FIRST_DISK = 16

TIMEOUT = 3600.0  # attribute and entry cache: nothing here changes shape

#: Events files open at once (each blocked read holds a FUSE worker task).
MAX_EVENT_READERS = 8
#: Seconds between a blocked events read's looks at signals and the unmount.
STREAM_POLL = 0.2


class DiskIO(Counters):
    """What went through one disk's file (the metrics' per-disk counters)."""

    __slots__ = ("bytes_read", "bytes_written", "reads", "writes")


class _Stream:
    """One open events file: its subscription and the opener's pid."""

    __slots__ = ("pid", "sub")

    def __init__(self, sub, pid: int) -> None:
        self.sub = sub
        self.pid = pid


class ReplfsOps(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, controller, disks: dict, mount: str = "") -> None:
        """``disks``: NAME -> BlockNode the file serves; ``mount``: the mount
        point (the metrics' ``mount`` label)."""
        super().__init__()
        self.mount = mount
        self.ctl = controller
        self.names = list(disks)
        self.by_inode = {FIRST_DISK + i: disks[n] for i, n in enumerate(self.names)}
        self.inode_of = {n.encode(): FIRST_DISK + i for i, n in enumerate(self.names)}
        self.ctl_inodes = {v: k for k, v in ACTIONS.items()}
        self.mtime = time.time_ns()
        self._status_snapshots: dict[int, bytes] = {}
        self._next_fh = 1 << 20
        self.io = {inode: DiskIO() for inode in self.by_inode}
        self._streams: dict[int, _Stream] = {}
        self._streams_ended = False
        #: Open control files of CANCELLABLE actions: fh -> (inode, opener's pid).
        self._writers: dict[int, tuple[int, int]] = {}

    # -- attributes ---------------------------------------------------------
    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_nlink = 1
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mtime
        a.attr_timeout = a.entry_timeout = TIMEOUT
        a.st_blksize = 4096
        if inode in (ROOT, CTL_DIR):
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        elif inode in self.by_inode:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = self.by_inode[inode].size
        elif inode in self.ctl_inodes:
            a.st_mode = stat.S_IFREG | 0o200
            a.attr_timeout = 0
        elif inode in (STATUS, EVENTS, METRICS):
            a.st_mode = stat.S_IFREG | 0o444
            a.attr_timeout = 0
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_blocks = (a.st_size + 511) // 512
        return a

    def _children(self, inode: int) -> list[tuple[bytes, int]]:
        if inode == ROOT:
            return [(b".replfs", CTL_DIR)] + [(n.encode(), self.inode_of[n.encode()])
                                              for n in self.names]
        if inode == CTL_DIR:
            return list(ACTIONS.items()) + [(b"status", STATUS), (b"events", EVENTS),
                                            (b"metrics", METRICS)]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            return self._attr(ROOT)
        for child_name, inode in self._children(parent_inode):
            if child_name == name:
                return self._attr(inode)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            if inode in self.by_inode:
                if attr.st_size != self.by_inode[inode].size:
                    raise pyfuse3.FUSEError(errno.EPERM)
            elif inode not in self.ctl_inodes:  # `echo 1 > ctl` truncates first
                raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        total = sum(n.size for n in self.by_inode.values())
        s.f_blocks = total // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.by_inode) + 8
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories --------------------------------------------------------
    async def opendir(self, inode, ctx):
        self._children(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = self._children(fh)
        for i, (name, inode) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, name, self._attr(inode), i + 1):
                break

    async def releasedir(self, fh):
        pass

    # -- the namespace is fixed ---------------------------------------------
    async def _fixed(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EPERM)

    create = mkdir = mknod = unlink = rmdir = rename = link = symlink = _fixed

    # No extended attributes.  ENOSYS (not ENODATA) matters for speed: the
    # kernel asks getxattr("security.capability") before *every* write to see
    # whether to drop privileges, unless the file system once answered
    # ENOSYS; then it stops asking.  That halves the requests per write.
    async def _no_xattrs(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.ENOSYS)

    setxattr = getxattr = listxattr = removexattr = _no_xattrs

    # -- files --------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if inode in self.by_inode:
            if flags & os.O_TRUNC:  # a disk has a fixed size (truncate() is refused too)
                raise pyfuse3.FUSEError(errno.EPERM)
            return pyfuse3.FileInfo(fh=inode, keep_cache=True)
        if inode in self.ctl_inodes:
            if flags & os.O_ACCMODE == os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            if self.ctl_inodes[inode].decode() in control.CANCELLABLE:
                self._next_fh += 1  # its own fh: the writer's signals cancel the action
                self._writers[self._next_fh] = (inode, ctx.pid)
                return pyfuse3.FileInfo(fh=self._next_fh, direct_io=True)
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        if inode in (STATUS, EVENTS, METRICS):
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            if inode == EVENTS and (len(self._streams) >= MAX_EVENT_READERS
                                    or self._streams_ended):
                raise pyfuse3.FUSEError(errno.EBUSY)
            self._next_fh += 1
            fh = self._next_fh
            if inode == EVENTS:
                self._streams[fh] = _Stream(self.ctl.events.subscribe(), ctx.pid)
                return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False,
                                        nonseekable=True)
            self._status_snapshots[fh] = (self.status_json() if inode == STATUS
                                          else self.metrics_text())
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        raise pyfuse3.FUSEError(errno.EISDIR if inode in (ROOT, CTL_DIR) else errno.ENOENT)

    async def read(self, fh, off, size):
        node = self.by_inode.get(fh)
        if node is None:
            data = self._status_snapshots.get(fh)
            if data is None:
                stream = self._streams.get(fh)
                if stream is None:
                    raise pyfuse3.FUSEError(errno.EBADF)
                return await self._read_stream(stream, size)
            return data[off:off + size]
        if off >= node.size:
            return b""
        size = min(size, node.size - off)
        try:  # plain calls down the graph unless a layer must wait (BlockNode.read_now)
            data = node.read_now(off, size)
            if data is None:
                data = await node.read(off, size)
        except Exception as exc:
            raise self._fuse_error("read", exc) from None
        io = self.io[fh]
        io.reads += 1
        io.bytes_read += len(data)
        return data

    async def write(self, fh, off, buf):
        node = self.by_inode.get(fh)
        if node is not None:
            try:
                await node.write(off, buf)
            except Exception as exc:
                raise self._fuse_error("write", exc) from None
            io = self.io[fh]
            io.writes += 1
            io.bytes_written += len(buf)
            return len(buf)
        writer = self._writers.get(fh)
        if writer is not None:  # a long action: a signal to its writer cancels it
            await control.run_interruptible(self.ctl, self.ctl_inodes[writer[0]].decode(),
                                            bytes(buf), lambda: signal_pending(writer[1]),
                                            STREAM_POLL)
            return len(buf)
        action = self.ctl_inodes.get(fh)
        if action is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        await control.run(self.ctl, action.decode(), bytes(buf))
        return len(buf)

    async def fsync(self, fh, datasync):
        node = self.by_inode.get(fh)
        if node is not None:
            try:
                await node.flush()
            except Exception as exc:
                raise self._fuse_error("fsync", exc) from None

    def _fuse_error(self, op: str, exc: Exception) -> pyfuse3.FUSEError:
        """The edge: an errno for the kernel.  A BlockError carries its own;
        anything else is a bug, logged with its traceback, and the caller
        gets EIO instead of the daemon going down."""
        if isinstance(exc, BlockError):
            return pyfuse3.FUSEError(exc.errno)
        log.error("%s: unexpected error", op, exc_info=exc)
        return pyfuse3.FUSEError(errno.EIO)

    async def flush(self, fh):
        pass

    async def release(self, fh):
        self._status_snapshots.pop(fh, None)
        self._writers.pop(fh, None)
        stream = self._streams.pop(fh, None)
        if stream is not None:
            stream.sub.close()

    # -- the events stream --------------------------------------------------
    async def _read_stream(self, stream: _Stream, size: int) -> bytes:
        """The next bytes of the stream; waits for an event (see the module's
        notes for how a wait ends)."""
        sub = stream.sub
        while True:
            data = sub.take(size)
            if data:
                return data
            if sub.ended or self._streams_ended or _fuse_loop_ending():
                return b""
            if signal_pending(stream.pid):
                raise pyfuse3.FUSEError(errno.EINTR)
            with trio.move_on_after(STREAM_POLL):
                await sub.wait()

    def end_streams(self) -> None:
        """The daemon unmounts: every events read returns what is left, then
        end of file, and no events file opens any more."""
        self._streams_ended = True
        for stream in self._streams.values():
            stream.sub.end()

    # -- status ------------------------------------------------------------
    def status(self) -> dict:
        """The status file's dict: the controller's, the FUSE loop's
        statistics and what went through each disk's file."""
        return {**self.ctl.status(), "fuse": fastwait.statistics(),
                "io": {name: self.io[self.inode_of[name.encode()]].as_dict()
                       for name in self.names},
                "event_readers": len(self._streams)}

    def status_json(self) -> bytes:
        return (json.dumps(self.status(), indent=2, sort_keys=True) + "\n").encode()

    def metrics_text(self) -> bytes:
        return metrics.render(self.status(), self.mount)

    async def invalidate_disks(self) -> None:
        """Drop the kernel's cached pages of every disk file (in a thread:
        the kernel may wait for reads that this process has to answer)."""
        for inode in self.by_inode:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except OSError as exc:  # ENOENT: the kernel holds no such inode yet
                if exc.errno not in (errno.ENOENT,):
                    log.warning("invalidating disk inode %d failed: %s", inode, exc)


def _fuse_loop_ending() -> bool:
    """Whether the FUSE loop is ending: the daemon asked its workers to
    exit (SIGTERM, SIGINT), or the session's fd says the mount is gone.

    Design note: a stop-gap read of the installed fast wait's state, for a
    daemon that does not call :meth:`ReplfsOps.end_streams` when it begins
    to unmount; with the stock wait (no fast wait installed) only
    ``end_streams`` ends a blocked events read at a signal."""
    fw = fastwait._active  # private on purpose: see the design note
    if fw is None:
        return False
    return fw._exiting or bool(fw.events() & fastwait._GONE)


#: Signals whose default action does not end the process (stop, continue,
#: or ignored): pending with that default, they do not interrupt a read.
_HARMLESS_DEFAULT = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
                               signal.SIGCONT, signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH})
_HARMLESS_MASK = sum(1 << (int(s) - 1) for s in _HARMLESS_DEFAULT)


def signal_pending(pid: int) -> bool:
    """Whether a thread of the process of ``pid`` (a thread id, as FUSE
    gives it) has a pending signal that would interrupt a blocking read:
    not blocked, not ignored, and caught or fatal by default.  False if the
    process is gone or cannot be read."""
    if not pid:
        return False
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                fields = dict(line.split(b":", 1) for line in f.read().splitlines()
                              if line.startswith((b"SigPnd", b"ShdPnd", b"SigBlk", b"SigIgn",
                                                  b"SigCgt")))
            pending = int(fields[b"SigPnd"], 16) | int(fields[b"ShdPnd"], 16)
            blocked, ignored = int(fields[b"SigBlk"], 16), int(fields[b"SigIgn"], 16)
            caught = int(fields[b"SigCgt"], 16)
        except (OSError, KeyError, ValueError):
            continue
        live = pending & ~blocked & ~ignored
        if live & (caught | ~_HARMLESS_MASK):
            return True
    return False
