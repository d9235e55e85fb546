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

The kernel's page cache is used for disk files (``keep_cache``): every write
passes through the daemon (no writeback cache), so the cache is coherent on
the primary; on the secondary the view's content changes under open files
only at a checkpoint or failover, and then :meth:`ReplfsOps.invalidate_disks`
drops it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time

import pyfuse3
import trio

from replfs.errors import BlockError
from replfs.fuse import control, fastwait

log = logging.getLogger("replfs.fs")

ROOT = pyfuse3.ROOT_INODE
CTL_DIR = 2
STATUS = 6
ACTIONS = {name.encode(): inode for name, inode in zip(control.ACTIONS, (3, 4, 5, 7, 8, 9))}
FIRST_DISK = 16

TIMEOUT = 3600.0  # attribute and entry cache: nothing here changes shape


class ReplfsOps(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, controller, disks: dict) -> None:
        """``disks``: NAME -> BlockNode the file serves."""
        super().__init__()
        self.ctl = controller
        self.names = list(disks)
        self.by_inode = {FIRST_DISK + i: disks[n] for i, n in enumerate(self.names)}
        self.inode_of = {n.encode(): FIRST_DISK + i for i, n in enumerate(self.names)}
        self.ctl_inodes = {v: k for k, v in ACTIONS.items()}
        self.mtime = time.time_ns()
        self._status_snapshots: dict[int, bytes] = {}
        self._next_fh = 1 << 20

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
        elif inode == STATUS:
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
            return list(ACTIONS.items()) + [(b"status", STATUS)]
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
        s.f_files = len(self.by_inode) + 6
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
            return pyfuse3.FileInfo(fh=inode, direct_io=True)
        if inode == STATUS:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                raise pyfuse3.FUSEError(errno.EACCES)
            self._next_fh += 1
            fh = self._next_fh
            self._status_snapshots[fh] = self.status_json()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        raise pyfuse3.FUSEError(errno.EISDIR if inode in (ROOT, CTL_DIR) else errno.ENOENT)

    async def read(self, fh, off, size):
        node = self.by_inode.get(fh)
        if node is None:
            data = self._status_snapshots.get(fh)
            if data is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            return data[off:off + size]
        if off >= node.size:
            return b""
        size = min(size, node.size - off)
        try:
            return await node.read(off, size)
        except Exception as exc:
            raise self._fuse_error("read", exc) from None

    async def write(self, fh, off, buf):
        node = self.by_inode.get(fh)
        if node is not None:
            try:
                await node.write(off, buf)
            except Exception as exc:
                raise self._fuse_error("write", exc) from None
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

    # -- status ------------------------------------------------------------
    def status_json(self) -> bytes:
        status = {**self.ctl.status(), "fuse": fastwait.statistics()}
        return (json.dumps(status, indent=2, sort_keys=True) + "\n").encode()

    async def invalidate_disks(self) -> None:
        """Drop the kernel's cached pages of every disk file (in a thread:
        the kernel may wait for reads that this process has to answer)."""
        for inode in self.by_inode:
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except OSError as exc:  # ENOENT: the kernel holds no such inode yet
                if exc.errno not in (errno.ENOENT,):
                    log.warning("invalidating disk inode %d failed: %s", inode, exc)
