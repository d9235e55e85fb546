"""A raw image file (or block device) as a BlockNode.

Design note
-----------
Everything runs on the one trio thread, and a hop to a thread costs more
(~100 us with ``trio.to_thread``, less with :mod:`replfs.core.iothreads`)
than a 4 KiB ``pwrite`` into the page cache (~1 us).  So:

* I/O of at most ``inline_max`` bytes (1 MiB + 4 KiB by default: one FUSE
  request) is done inline with ``os.pread``/``os.pwrite``/``os.pwritev``:
  no await suspends there.  Measured on the replicated 1 MiB write path:
  inline 595 MB/s, threads above 256 KiB 405 MB/s;
* a read while other requests are queued (``set_contention_probe``: the
  daemon asks whether a FUSE request is waiting) must not block them on the
  disk.  It is served from the page cache if all of it is there
  (``preadv(RWF_NOWAIT)``); else it starts the disk read
  (``posix_fadvise(WILLNEED)`` of exactly its range, which returns at once),
  yields so that the other requests start theirs, and then reads.  The disk
  serves the batch concurrently, with no thread.  Cold 4 KiB reads at queue
  depth 16: 14.4k/s against 10.6k/s blocking inline (threads for the misses
  were slower still: 5.6k/s through ``trio.to_thread``);
* larger transfers, FUA writes and big hole punches go to
  :mod:`replfs.core.iothreads` (never abandoned on cancel, so buffers and
  the fd stay valid until the thread is done);
* ``fdatasync`` is inline when little was written since the last one
  (``INLINE_FLUSH_MAX``), which makes it cheap (write + fsync: 4 KiB then a
  flush); otherwise, and for a while after an inline one that was slow
  (``SLOW_FLUSH_S``), it goes to a thread so that a long sync does not
  stall the daemon.

``size`` is the file size at open time (``lseek(SEEK_END)``, so a block
device works too) and never changes.

``write_zeroes`` and ``trim`` punch a hole
(``fallocate(PUNCH_HOLE|KEEP_SIZE)`` through ctypes); both read back as
zeroes.  If the file system or device says EOPNOTSUPP (or the kernel
ENOSYS), we remember it and write zeroes instead.

FUA: ``pwritev(..., RWF_DSYNC)`` in a worker thread, falling back to write +
``fdatasync`` if the flag is refused.

Errors: every ``OSError`` becomes ``BlockError`` with the same errno; a short
read (the file shrank under us) is EIO.  A read-only image refuses writes
with EPERM (after the bounds check, which :class:`BlockNode` does).
``close()`` is idempotent; if a worker thread still uses the fd the close is
deferred until it returns, so the fd number is never reused under a running
syscall.

Small page-cache folios.  Since Linux 6.16 ext4 caches a file in large
folios (up to 2 MiB), and a 4 KiB buffered write into one costs the
kernel a walk of all its buffer heads (``ext4_block_write_begin``,
``block_commit_write``): measured here on 6.18, a 4 KiB ``pwrite`` took
13.3 us into a file read back with readahead, 8.2 us into one written in
1 MiB pieces, and 1.3-1.8 us into one written in 4-64 KiB pieces or read
with readahead off - on both daemons, for every VM write (the profile of
the checkpoint protocol had 38-44 % of each daemon's CPU there).  So an
image is opened with ``posix_fadvise(RANDOM)`` (reads, also
``WILLNEED``'s, fill order-0 folios), and a buffered write is issued in
pieces of at most ``WRITE_PIECE`` (the kernel sizes a new folio by the
write's length; 64 KiB pieces cost 4-8 % of page-cache bandwidth on 1 MiB
writes, far above what FUSE delivers).  Readahead off halved cold
sequential 128 KiB reads here (1976 -> 854 MB/s; the disk's read_ahead_kb
is 8 MiB), so ``_read`` does its own: a read that continues the previous
one (or falls in the window already asked for) keeps ``READAHEAD`` bytes
ahead with ``posix_fadvise(WILLNEED)``, which under ``RANDOM`` reads into
order-0 folios (1762 MB/s, and a 4 KiB write then costs 1.9 us, not 26).

Beyond the interface: ``writev`` (one ``pwritev`` of several buffers: the
overlay writes fill + data + fill with it), ``discard_all`` (the overlay's
``reclaim``), ``start_writeback`` (``can_writeback``: a bulk copy such as
the commit job asks the kernel to start writing each chunk back) and
``copy_from`` (a range of another image to the same offset here).

``copy_from`` is the secondary's copy-before-write (an old 64 KiB cluster
of the disk into the hidden overlay's file): ``os.copy_file_range``, so no
byte passes through Python and one syscall does it (a reflink where the
file system shares extents, XFS or btrfs; a copy in the kernel on ext4,
~15 % less than ``pread`` + ``pwrite`` here).  Inline up to ``inline_max``
like a write, else in an I/O thread.  When the kernel refuses it for these
two files (``EXDEV``: another file system; ``EOPNOTSUPP``/``EINVAL``: a
block device or a file system without it; ``ENOSYS``) the image remembers
it and copies with ``pread`` + ``pwrite`` from then on (an overlay only
ever copies from its one backing).  Other errors (``ENOSPC``, ``EIO``) are
the copy's and are raised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import time

import trio

from replfs.block.base import BlockNode
from replfs.core import iothreads
from replfs.core.counters import Counters
from replfs.core.imagelock import lock_image
from replfs.errors import BlockError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: Largest request done inline on the trio thread.
INLINE_MAX = 1024 * 1024 + 4096
#: Largest ``pwrite`` issued (see "Small page-cache folios" above).
WRITE_PIECE = 64 * 1024
#: How far ahead a sequential reader is read (ibid.); asked again when less
#: than half of it is left.
READAHEAD = 4 * 1024 * 1024
#: ``fdatasync`` runs inline (no thread hop, whose overhead is about what a
#: small sync takes here: ~85 us for 4 KiB) when at most this much was
#: written since the last flush...
INLINE_FLUSH_MAX = 256 * 1024
#: ...and no inline flush was slower than this lately; after one that was,
#: the next ``SLOW_FLUSH_PENALTY`` flushes go to a thread.
SLOW_FLUSH_S = 0.002
SLOW_FLUSH_PENALTY = 64
#: Zero-filling fallback writes this much at a time.
_ZERO_STEP = 1024 * 1024
#: ``copy_from`` without ``copy_file_range`` reads and writes this much at a time.
_COPY_STEP = 1024 * 1024
#: ``copy_file_range`` errors that mean "not for these files": fall back.
_COPY_UNSUPPORTED = frozenset((errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS))

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
try:
    _fallocate = _libc.fallocate64
except AttributeError:  # pragma: no cover - every glibc has it
    _fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
try:
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    _sync_file_range.restype = ctypes.c_int
except AttributeError:  # pragma: no cover - not glibc on Linux
    _sync_file_range = None
SYNC_FILE_RANGE_WRITE = 2


def _never() -> bool:
    return False


#: Returns True when other requests are waiting for this thread (the daemon
#: sets it: a FUSE request queued).  Then a read that would wait for the disk
#: starts its disk read and yields to them first (see the design note).
_contended = _never


def set_contention_probe(probe) -> None:
    global _contended
    _contended = probe or _never


def punch_hole(fd: int, offset: int, length: int) -> None:
    """``fallocate(PUNCH_HOLE|KEEP_SIZE)``; raises OSError."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pread_full(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            raise OSError(errno.EIO, f"short read: end of file at {offset + got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _pwrite_full(fd: int, offset: int, data) -> None:
    total = len(data) if type(data) is bytes else memoryview(data).nbytes
    if total > WRITE_PIECE:  # in pieces: small folios (module note)
        mv = memoryview(data).cast("B")
        for done in range(0, total, WRITE_PIECE):
            _pwrite_full(fd, offset + done, mv[done:done + WRITE_PIECE])
        return
    n = os.pwrite(fd, data, offset)
    if n == total:
        return
    mv = memoryview(data).cast("B")
    done = n
    while done < total:
        n = os.pwrite(fd, mv[done:], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing at {offset + done}")
        done += n


def _pwritev_full(fd: int, offset: int, buffers: list, flags: int = 0) -> None:
    total = sum(memoryview(b).nbytes for b in buffers)
    if total > WRITE_PIECE and not flags:  # in pieces: small folios (module note)
        for b in buffers:
            _pwrite_full(fd, offset, b)
            offset += memoryview(b).nbytes
        return
    n = os.pwritev(fd, buffers, offset, flags) if flags else os.pwritev(fd, buffers, offset)
    if n < total:  # rare: finish the rest with plain writes
        rest = b"".join(bytes(b) for b in buffers)[n:]
        _pwrite_full(fd, offset + n, rest)
        if flags:
            os.fdatasync(fd)


class RawStats(Counters):
    __slots__ = ("reads", "reads_overlapped", "readaheads", "writes", "zero_ops", "trims",
                 "flushes", "flushes_inline", "bytes_read", "bytes_written", "errors")


class RawImage(BlockNode):
    can_writeback = True

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        read_only: bool = False,
        name: str | None = None,
        inline_max: int = INLINE_MAX,
        lock: bool = False,
    ):
        """``lock``: take QEMU's image locks (``replfs.core.imagelock``): a
        served image is refused to other writers, and replfs refuses one
        that QEMU or another replfs writes."""
        self.path = os.fspath(path)
        self.name = name or os.path.basename(self.path) or self.path
        self.read_only = read_only
        self.inline_max = inline_max
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self._fd = os.open(self.path, flags)
        except OSError as e:
            raise BlockError.from_oserror(e, f"{self.name}: open {self.path}") from None
        try:
            if lock and not read_only:
                lock_image(self._fd, self.path)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
            try:  # small folios (module note); a hint: never fatal
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            except OSError:
                pass
        except OSError as e:
            os.close(self._fd)
            raise BlockError.from_oserror(e, f"{self.name}: size of {self.path}") from None
        except BaseException:
            os.close(self._fd)
            raise
        self._closed = False
        self._threads = 0
        self._punch_ok = True
        self._dsync_ok = hasattr(os, "RWF_DSYNC")
        self._nowait_ok = hasattr(os, "RWF_NOWAIT")
        self._copy_range_ok = hasattr(os, "copy_file_range")  # see copy_from
        self._unflushed = 0  # bytes written (or zeroed) since the last flush began
        self._seq_next = -1  # where the last read ended (sequential detection)
        self._ra_end = 0  # the end of what readahead asked for
        self._threaded_flushes = 0  # flushes still owed to a thread after a slow one
        self.stats = RawStats()

    @classmethod
    def create(cls, path, size: int, **kwargs) -> "RawImage":
        """Create (or truncate) a sparse file of ``size`` bytes and open it."""
        try:
            fd = os.open(os.fspath(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        except OSError as e:
            raise BlockError.from_oserror(e, f"create {path}") from None
        return cls(path, **kwargs)

    # -- plumbing -------------------------------------------------------------
    def _fdcheck(self) -> int:
        if self._closed:
            raise BlockError(errno.EBADF, f"{self.name}: image is closed")
        return self._fd

    def _fail(self, e: OSError, what: str) -> BlockError:
        self.stats.errors += 1
        return BlockError.from_oserror(e, f"{self.name}: {what}")

    def _writable_fd(self) -> int:
        """The fd, for a request that changes the image."""
        if self.read_only:
            raise BlockError(errno.EPERM, f"{self.name}: image is read-only")
        if self._closed:
            raise BlockError(errno.EBADF, f"{self.name}: image is closed")
        return self._fd

    async def _in_thread(self, fn, *args):
        self._hold()
        try:
            return await iothreads.run(fn, *args)
        finally:
            self._unhold()

    def _hold(self) -> None:
        """A thread is about to use the fd: ``close()`` defers to it."""
        self._threads += 1

    def _unhold(self) -> None:
        self._threads -= 1
        if self._closed and not self._threads and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pread_cached(self, fd: int, offset: int, length: int) -> bytes | None:
        """The data if the page cache holds all of it (``RWF_NOWAIT``), else None."""
        buf = bytearray(length)
        try:
            n = os.preadv(fd, [buf], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                self._nowait_ok = False  # this file system cannot say
                return None
            raise
        return bytes(buf) if n == length else None

    # -- I/O (the bounds are checked and empty requests dropped by BlockNode) --------
    def _track(self, fd: int, offset: int, end: int) -> None:
        """Note a read of ``[offset, end)``; keep ``READAHEAD`` ahead of a
        sequential reader (module note)."""
        ra_end = self._ra_end
        sequential = offset == self._seq_next or ra_end - READAHEAD <= offset < ra_end
        self._seq_next = end
        if not sequential:
            return
        if ra_end > end + 2 * READAHEAD:  # a window asked for elsewhere: start afresh
            ra_end = end
        if end <= ra_end - READAHEAD // 2:
            return
        start = max(end, ra_end)
        stop = min(start + READAHEAD, self.size)
        if stop > start:
            os.posix_fadvise(fd, start, stop - start, os.POSIX_FADV_WILLNEED)
            self.stats.readaheads += 1
            self._ra_end = stop

    def read_now(self, offset: int, length: int) -> bytes | None:
        """Inline ``pread`` (what :meth:`_read` does for requests up to
        ``inline_max``); None for larger ones (a thread reads them) and,
        while other requests are queued, for data the page cache lacks."""
        if length > self.inline_max or length <= 0 or offset < 0 or offset + length > self.size:
            return None
        fd = self._fdcheck()
        try:
            if self._nowait_ok and _contended():
                data = self._pread_cached(fd, offset, length)
                if data is None:
                    return None
                self._track(fd, offset, offset + length)
            else:
                self._track(fd, offset, offset + length)
                data = _pread_full(fd, offset, length)
        except OSError as e:
            raise self._fail(e, f"read of {length} bytes at {offset}") from None
        self.stats.reads += 1
        self.stats.bytes_read += length
        return data

    async def _read(self, offset: int, length: int) -> bytes:
        data = self.read_now(offset, length)
        if data is not None:
            return data
        fd = self._fdcheck()
        try:
            self._track(fd, offset, offset + length)
            if length > self.inline_max:
                data = await self._in_thread(_pread_full, fd, offset, length)
            else:
                # Other requests are queued and the page cache lacks some of
                # this: start the disk read (readahead of exactly this range,
                # asynchronous) and let the others start theirs before
                # waiting: the disk then serves them all at once.
                self.stats.reads_overlapped += 1
                os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
                await trio.lowlevel.cancel_shielded_checkpoint()
                data = _pread_full(self._fdcheck(), offset, length)
        except OSError as e:
            raise self._fail(e, f"read of {length} bytes at {offset}") from None
        self.stats.reads += 1
        self.stats.bytes_read += length
        return data

    async def _write(self, offset: int, data, fua: bool) -> None:
        length = len(data) if type(data) is bytes else memoryview(data).nbytes
        if fua or length > self.inline_max:
            return await self._writev(offset, [data], length, fua)
        # The hot path: a small write to the page cache, inline.
        fd = self._writable_fd()
        try:
            _pwrite_full(fd, offset, data)
        except OSError as e:
            raise self._fail(e, f"write of {length} bytes at {offset}") from None
        self.stats.writes += 1
        self.stats.bytes_written += length
        self._unflushed += length

    async def writev(self, offset: int, buffers: list, fua: bool = False) -> None:
        """Write the concatenation of ``buffers`` at ``offset`` (one pwritev)."""
        length = sum(memoryview(b).nbytes for b in buffers)
        self.check_write(offset, length)
        if length:
            await self._writev(offset, buffers, length, fua)

    async def _writev(self, offset: int, buffers: list, length: int, fua: bool) -> None:
        fd = self._writable_fd()
        try:
            if fua:
                await self._in_thread(self._write_fua, fd, offset, buffers)
            elif length <= self.inline_max:
                if len(buffers) == 1:
                    _pwrite_full(fd, offset, buffers[0])
                else:
                    _pwritev_full(fd, offset, buffers)
            else:
                await self._in_thread(_pwritev_full, fd, offset, buffers)
        except OSError as e:
            raise self._fail(e, f"write of {length} bytes at {offset}") from None
        self.stats.writes += 1
        self.stats.bytes_written += length
        self._unflushed += length

    def _write_fua(self, fd: int, offset: int, buffers: list) -> None:
        if self._dsync_ok:
            try:
                _pwritev_full(fd, offset, buffers, os.RWF_DSYNC)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                self._dsync_ok = False
        _pwritev_full(fd, offset, buffers)
        os.fdatasync(fd)

    def _zero_range(self, fd: int, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeroes (any thread)."""
        if self._punch_ok:
            try:
                punch_hole(fd, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY):
                    raise
                self._punch_ok = False
        zeros = bytes(min(length, _ZERO_STEP))
        done = 0
        while done < length:
            n = min(length - done, len(zeros))
            _pwrite_full(fd, offset + done, memoryview(zeros)[:n])
            done += n

    async def _zero(self, offset: int, length: int, fua: bool, what: str) -> None:
        fd = self._writable_fd()
        self._unflushed += length
        try:
            if length <= self.inline_max and not fua:
                self._zero_range(fd, offset, length)
            else:
                await self._in_thread(self._zero_range, fd, offset, length)
                if fua:
                    await self._in_thread(os.fdatasync, fd)
        except OSError as e:
            raise self._fail(e, f"{what} of {length} bytes at {offset}") from None

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        await self._zero(offset, length, fua, "write_zeroes")
        self.stats.zero_ops += 1

    async def _trim(self, offset: int, length: int) -> None:
        await self._zero(offset, length, False, "trim")
        self.stats.trims += 1

    async def copy_from(self, src: RawImage, offset: int, length: int) -> None:
        """Copy ``src``'s bytes ``[offset, offset+length)`` to the same offset
        of this image (see the module's note: ``copy_file_range``, or
        ``pread`` + ``pwrite`` where the kernel refuses it)."""
        self.check_write(offset, length)
        src.check_read(offset, length)
        if not length:
            return
        fd = self._writable_fd()
        src_fd = src._fdcheck()
        try:
            if length <= self.inline_max:
                self._copy_range(src_fd, fd, offset, length)
            else:
                src._hold()  # src's fd must outlive the thread's use too
                try:
                    await self._in_thread(self._copy_range, src_fd, fd, offset, length)
                finally:
                    src._unhold()
        except OSError as e:
            raise self._fail(e, f"copy of {length} bytes at {offset} from {src.name}") from None
        self.stats.writes += 1
        self.stats.bytes_written += length
        self._unflushed += length

    def _copy_range(self, src_fd: int, fd: int, offset: int, length: int) -> None:
        """The copy itself (any thread); raises OSError."""
        done = 0
        if self._copy_range_ok:
            try:
                while done < length:
                    at = offset + done
                    n = os.copy_file_range(src_fd, fd, length - done, at, at)
                    if n <= 0:
                        # "End of the source": a file that shrank, or one whose
                        # size the file system does not tell; the reads below
                        # say which (EIO at a real end of file).
                        break
                    done += n
                else:
                    return
            except OSError as e:
                if e.errno not in _COPY_UNSUPPORTED:
                    raise
                self._copy_range_ok = False  # and copy the rest by hand
        while done < length:
            n = min(length - done, _COPY_STEP)
            _pwrite_full(fd, offset + done, _pread_full(src_fd, offset + done, n))
            done += n

    async def start_writeback(self, offset: int, length: int) -> None:
        """Start writing ``[offset, offset+length)`` to the disk without
        waiting (``sync_file_range(WRITE)``): a bulk copy that calls this per
        chunk overlaps the disk's writing with its copying, and its final
        flush has little left to wait for.  A hint: errors are ignored (the
        flush reports them)."""
        if _sync_file_range is None or self.read_only or not length:
            return
        fd = self._fdcheck()
        await self._in_thread(_sync_file_range, fd, offset, length, SYNC_FILE_RANGE_WRITE)

    async def flush(self) -> None:
        fd = self._fdcheck()
        if self.read_only:
            return
        inline = self._unflushed <= INLINE_FLUSH_MAX and not self._threaded_flushes
        self._unflushed = 0
        try:
            if inline:
                t0 = time.monotonic()
                os.fdatasync(fd)
                self.stats.flushes_inline += 1
                if time.monotonic() - t0 > SLOW_FLUSH_S:
                    self._threaded_flushes = SLOW_FLUSH_PENALTY
            else:
                self._threaded_flushes = max(0, self._threaded_flushes - 1)
                await self._in_thread(os.fdatasync, fd)
        except OSError as e:
            self._unflushed = INLINE_FLUSH_MAX + 1  # the next one in a thread
            raise self._fail(e, "flush") from None
        self.stats.flushes += 1

    async def discard_all(self) -> None:
        """Drop every data block of a regular file (ftruncate to 0 and back to
        ``size``); cost is proportional to what was allocated."""
        fd = self._writable_fd()

        def reset():
            os.ftruncate(fd, 0)
            os.ftruncate(fd, self.size)

        try:
            await self._in_thread(reset)
        except OSError as e:
            raise self._fail(e, "discard_all") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._threads:
            os.close(self._fd)
            self._fd = -1

    def statistics(self) -> dict:
        return {"name": self.name, "size": self.size, **self.stats.as_dict()}
