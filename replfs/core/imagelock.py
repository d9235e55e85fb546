"""Image locking as QEMU does it, so that replfs and QEMU refuse each other.

Design note
-----------
QEMU's file driver (``block/file-posix.c``) locks one byte per permission
with open-file-description (OFD) locks, which belong to the open file, not
the process:

* byte ``100 + p``: "I use permission p" (a read lock);
* byte ``200 + p``: "I do not let others have permission p" (a read lock);

with p = 0 consistent read, 1 write, 2 write-unchanged, 3 resize.  Before
taking them, a user checks that nobody denies what it uses (no lock on
``200 + p``) and nobody uses what it denies (no lock on ``100 + p``), by
asking for a write lock there (``F_OFD_GETLK``).  replfs serves an image as a
running VM's disk: it uses read and write, and denies write and resize to
others (reads stay allowed: ``qemu-img info`` works on a served image).  So
``qemu-io``/``qemu-img`` in their default (writing) mode refuse an image that
replfs serves, replfs refuses one QEMU or qemu-nbd writes (qemu-nbd shares
write but holds byte 101), and a second replfs refuses the first's.
"""

from __future__ import annotations

import fcntl
import os
import struct

from replfs.errors import ReplfsError

PERM_BASE, SHARED_BASE = 100, 200
READ, WRITE, WRITE_UNCHANGED, RESIZE = 0, 1, 2, 3
NAMES = {READ: "consistent read", WRITE: "write", WRITE_UNCHANGED: "write unchanged",
         RESIZE: "resize"}

#: struct flock on Linux x86-64/aarch64: short type, short whence, off_t start,
#: off_t len, pid_t pid (with padding).
_FLOCK = struct.Struct("hhxxxxqqixxxx")


class ImageLocked(ReplfsError):
    """Another program uses the image in a way replfs cannot share."""


def _lock(fd: int, cmd: int, kind: int, byte: int) -> int:
    """One fcntl on one byte; returns the l_type the kernel answered."""
    buf = _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0)
    out = fcntl.fcntl(fd, cmd, buf)
    return _FLOCK.unpack(out)[0]


def _held(fd: int, byte: int) -> bool:
    """Does another open file hold a lock on ``byte``?"""
    return _lock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def lock_image(fd: int, path: str, *, uses=(READ, WRITE), denies=(WRITE, RESIZE)) -> None:
    """Lock ``fd``'s file as QEMU would for ``uses`` and ``denies``, then
    check (as QEMU: two racing openers then both see each other and both
    refuse); raise :class:`ImageLocked` if another user conflicts (the caller
    closes ``fd``, which drops what was taken)."""
    for byte in [PERM_BASE + p for p in uses] + [SHARED_BASE + p for p in denies]:
        _lock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, byte)
    for p in uses:
        if _held(fd, SHARED_BASE + p):
            raise ImageLocked(f"image {path}: another program (a replfs daemon or QEMU) does "
                              f"not allow {NAMES[p]} access to it now")
    for p in denies:
        if _held(fd, PERM_BASE + p):
            raise ImageLocked(f"image {path}: another program (a replfs daemon or QEMU) has "
                              f"it open for {NAMES[p]}")
