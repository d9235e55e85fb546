"""The metadata file of one image: header, activity log, dirty bitmap.

Design note
-----------
Everything that decides what data a user gets after a restart (the data
generation and its history, the dirty bitmap, the hot extents of the
activity log, the failed-over state) lives in one sidecar file per image
(path: :mod:`replfs.meta.paths`), kept apart from the image so that images
stay raw and byte-comparable (DRBD's external metadata).  Callers persist a
state change here *before* it takes effect; this module makes each such
write atomic and durable.

Layout (offsets in bytes; ``nbytes = ceil(ceil(size / cluster_size) / 8)``,
``area = 4096 + round_up(nbytes, 4096)``)::

    0                 header slot A     4 KiB
    4096              header slot B     4 KiB
    8192              AL slot A         4 KiB
    12288             AL slot B         4 KiB
    16384             reserved, zero    48 KiB (later fixed-size records)
    65536             bitmap area A     area = 4 KiB descriptor + bits
    65536 + area      bitmap area B     area
    65536 + 2 * area  end of file

A 1 TiB image at 64 KiB clusters: 2 MiB of bits, a 4.07 MiB file.  The file
is preallocated (``posix_fallocate``, ``ftruncate`` where that is refused) at
creation and never changes size, so no write ever allocates or meets ENOSPC.

Every record (a header slot, an AL slot, a bitmap area) starts with the same
32 bytes, little-endian: ``magic[8] crc32:u32 version:u32 seq:u64
length:u32`` and 4 zero bytes.  ``crc32`` (zlib) covers everything after
itself: the rest of the 4 KiB slot, or for a bitmap area the rest of its
descriptor block plus the ``length`` bytes of bits.  ``seq`` numbers the
writes of one kind of record.  Payloads: a header slot holds the JSON of
:class:`Header` (at most 4064 bytes); an AL slot ``length / 4`` u32 extent
numbers, sorted, unique (capacity :data:`AL_CAPACITY` = 1016); a bitmap area
its bits right after the descriptor block, packed as
:class:`replfs.core.bitmap.ClusterBitmap` (bit i in byte i >> 3, position
i & 7, LSB first; bits past the last cluster are 0).

Crash-safety
  Each kind of record has two slots.  A write goes into the slot that does
  NOT hold the newest valid record, with ``seq`` = newest + 1, then
  ``fdatasync``; on open the valid record (magic, version, crc) with the
  highest ``seq`` wins.  So the newest durable record is never overwritten:
  a write torn or lost at any byte (a kill -9 between the pages of a large
  ``pwrite``, a power cut between sectors) leaves its slot invalid or old,
  and the previous record is read instead; once ``fdatasync`` has returned
  the new record is on stable storage and has the highest ``seq``.  Open
  checks the crc of both bitmap areas in full, so the slot a write goes into
  is never the only valid copy.  Both slots of a kind invalid is damage
  no crash makes: :class:`MetaError`, never a silent re-creation.  Creation
  is atomic too: the file is built and fsynced as ``<path>.tmp``, then
  hard-linked to ``<path>`` (no replace: a concurrent creator's file wins),
  and the directory fsynced; a crash leaves no file or a complete one (and a
  stale ``.tmp`` that the next creation reuses).  An ``OSError`` from a write
  leaves the in-memory state as before; the slot's outcome is then unknown
  (old or new record), exactly as for any write whose sync failed, and the
  next write of that kind goes into the same slot again.

  An ``flock`` (exclusive, non-blocking) on the open file keeps a second
  opener out (two daemons on one image): :class:`MetaError`.  The kernel
  drops it when the process dies.

Costs (``nbytes`` as above; all synchronous, on the calling thread)
  ===================  =====================================================
  ``write_header``     one 4 KiB ``pwrite`` + one ``fdatasync`` (plus a
                       JSON dump and a 4 KiB crc32: ~20 us)
  ``write_al``         one 4 KiB ``pwrite`` + one ``fdatasync``
  ``write_bitmap``     one ``pwritev`` of 4 KiB + nbytes + one ``fdatasync``;
                       crc32 over nbytes (2 MiB: ~1 ms)
  ``read_bitmap``      one ``pread`` of 4 KiB + nbytes, crc32 over it
  ``read_al``          one 4 KiB ``pread``
  ``header``           none (kept in memory; a copy is returned)
  ``open``             8 KiB + 8 KiB + 2 x (4 KiB + nbytes) read, crc32
                       over all of it; creation: one ``posix_fallocate`` of
                       the file, three 4 KiB writes, one ``fsync`` of the
                       file and one of its directory
  ===================  =====================================================
  The first write into each preallocated block also converts the extent
  (ext4 "unwritten" -> written), a journal commit inside that ``fdatasync``:
  once per block over the file's life.  Measured (ext4 on this test VM's
  virtual disk, whose flush is cheap; a real disk's flush dominates all of
  these): 1 TiB at 64 KiB: create 8 ms, open 1.7 ms, ``write_header`` 0.05 ms,
  ``write_al`` 0.07 ms, ``write_bitmap`` 2.4 ms, ``read_bitmap`` 1.4 ms.

Tested: tests/unit/test_meta_format.py (formats, fallbacks, torn records by
hand), tests/unit/test_meta_crash.py (a writer killed by SIGKILL at seeded
random moments; the 2 MiB bitmap write does get torn, and A/B survives it).

Threads: each kind of record has its own lock, so a bitmap write may run in
one thread while a header write runs in another.  ``close()`` must not race
a call in flight (the fd number could be reused under it).

Compatibility: :class:`Header` loads JSON with missing fields (their
defaults) and keeps unknown fields (a newer replfs wrote them) and writes
them back unchanged.  A record whose ``version`` is not :data:`VERSION` (crc
valid) is refused with :class:`MetaError`.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import fcntl
import json
import operator
import os
import secrets
import struct
import threading
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Self

from replfs.errors import ReplfsError

VERSION = 1
SLOT = 4096
#: magic crc32 version seq length (+4 zero bytes)
_REC = struct.Struct("<8sIIQI")
REC_HEAD = 32
_CRC_FROM = 12  # the crc covers the record from the version field on
MAX_JSON = SLOT - REC_HEAD
AL_CAPACITY = (SLOT - REC_HEAD) // 4
HISTORY_LEN = 4
FAILOVER_STATES = ("", "committing", "done")

HEADER_MAGIC = b"RPLFSHDR"
AL_MAGIC = b"RPLFSAL\0"
BITMAP_MAGIC = b"RPLFSBMP"

HEADER_OFF = 0
AL_OFF = 2 * SLOT
BITMAP_OFF = 64 * 1024


class MetaError(ReplfsError):
    """The metadata is damaged beyond recovery, belongs to another image, or
    is in use by another opener."""


def _random_generation() -> int:
    while True:
        v = secrets.randbits(64)
        if v:
            return v


@dataclass(kw_only=True)
class Header:
    """The replication state of one image.  Every field has a default except
    the three fixed at creation, so a file written before a field existed
    still loads.  Generations are random non-zero 64-bit ints; 0 = none."""

    node_id: str
    role: str = ""
    size: int
    cluster_size: int
    current: int = 0            # the data generation; 0 = just created
    bitmap_gen: int = 0         # the generation the bitmap tracks changes against
    history: list[int] = field(default_factory=list)   # newest first, <= 4
    peer_current: int = 0
    checkpoint: int = 0         # a counter
    clean: bool = True
    epoch_dirty: bool = False
    failover: str = ""          # "" | "committing" | "done"
    extra: dict = field(default_factory=dict)           # free-form, later features
    #: fields of a newer format that this one does not know: written back as read
    unknown: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def nclusters(self) -> int:
        """Clusters of the image (the last one may be short): the bitmap's bits."""
        return -(-self.size // self.cluster_size)

    def new_generation(self) -> int:
        """Pushes ``current`` (if non-zero) onto ``history`` (newest first, at
        most 4 kept) and sets a fresh random non-zero ``current``, distinct from
        the history; returns it.  In memory only: persist with ``write_header``."""
        if self.current:
            self.history = [self.current, *self.history][:HISTORY_LEN]
        new = _random_generation()
        while new in self.history:
            new = _random_generation()
        self.current = new
        return new

    def copy(self) -> Header:
        return copy.deepcopy(self)

    def to_json(self) -> bytes:
        d = dict(self.unknown)
        d.update((f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                 if f.name != "unknown")
        return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Header:
        d = json.loads(data)
        if not isinstance(d, dict):
            raise TypeError("header JSON is not an object")
        names = {f.name for f in dataclasses.fields(cls)} - {"unknown"}
        known = {k: v for k, v in d.items() if k in names}
        return cls(**known, unknown={k: v for k, v in d.items() if k not in names})

    def check(self) -> None:
        """``ValueError`` if a field is out of its range."""
        for name in ("current", "bitmap_gen", "peer_current"):
            v = getattr(self, name)
            if not 0 <= v < 1 << 64:
                raise ValueError(f"{name}={v!r}: not a 64-bit generation")
        if len(self.history) > HISTORY_LEN or not all(0 < v < 1 << 64 for v in self.history):
            raise ValueError(f"history={self.history!r}: at most {HISTORY_LEN} non-zero 64-bit ints")
        if self.failover not in FAILOVER_STATES:
            raise ValueError(f"failover={self.failover!r}: not one of {FAILOVER_STATES}")


# -- records ---------------------------------------------------------------------
def _record(magic: bytes, seq: int, payload: bytes = b"", length: int | None = None,
            tails=()) -> bytearray:
    """A 4 KiB block: the 32-byte head, ``payload``, zeroes; the crc covers the
    block after the crc field, then each of ``tails`` (a bitmap's bits).
    ``length`` defaults to ``len(payload)``."""
    rec = bytearray(SLOT)
    rec[REC_HEAD:REC_HEAD + len(payload)] = payload
    _REC.pack_into(rec, 0, magic, 0, VERSION, seq, len(payload) if length is None else length)
    crc = zlib.crc32(memoryview(rec)[_CRC_FROM:])
    for t in tails:
        crc = zlib.crc32(t, crc)
    struct.pack_into("<I", rec, 8, crc)
    return rec


def _unseal(rec, magic: bytes, what: str, tail_of=None) -> tuple[int, int] | None:
    """``(seq, length)`` if ``rec`` holds a valid record of ``magic``, else None.
    ``tail_of(length)`` gives the bytes after the block the crc also covers
    (None if they cannot be had).  A valid record of another version raises."""
    if len(rec) < SLOT:
        return None
    m, crc, version, seq, length = _REC.unpack_from(rec)
    if m != magic:
        return None
    tail = b""
    if tail_of is not None:
        tail = tail_of(length)
        if tail is None:
            return None
    elif length > SLOT - REC_HEAD:
        return None
    if zlib.crc32(tail, zlib.crc32(memoryview(rec)[_CRC_FROM:SLOT])) != crc:
        return None
    if version != VERSION:
        raise MetaError(f"{what}: format version {version}, this replfs reads {VERSION}")
    return seq, length


class _Slots:
    """The two slots of one kind of record and which holds the newest."""

    def __init__(self, what: str, offsets: tuple[int, int]):
        self.what = what
        self.offsets = offsets
        self.seq: list[int | None] = [None, None]   # seq of the valid record, per slot
        self.lock = threading.Lock()

    def newest(self) -> int:
        """Index of the slot holding the newest valid record."""
        a, b = self.seq
        if a is None and b is None:
            raise MetaError(f"{self.what}: both slots are invalid")
        if b is None or (a is not None and a > b):
            return 0
        return 1

    def target(self) -> tuple[int, int, int]:
        """``(index, offset, seq)`` for the next write."""
        i = self.newest()
        j = 1 - i
        return j, self.offsets[j], self.seq[i] + 1

    def done(self, index: int, seq: int) -> None:
        self.seq[index] = seq


def _layout(size: int, cluster_size: int) -> tuple[int, int, int]:
    """``(nbits, nbytes, area)`` of an image."""
    nbits = -(-size // cluster_size)
    nbytes = (nbits + 7) >> 3
    return nbits, nbytes, SLOT + -(-nbytes // SLOT) * SLOT


def file_size(size: int, cluster_size: int) -> int:
    """Bytes of the metadata file of an image of ``size`` at ``cluster_size``."""
    return BITMAP_OFF + 2 * _layout(size, cluster_size)[2]


def _pread_all(fd: int, n: int, off: int) -> bytes:
    out = os.pread(fd, n, off)
    while len(out) < n:
        more = os.pread(fd, n - len(out), off + len(out))
        if not more:
            break
        out += more
    return out


def _pwrite_all(fd: int, bufs: list, off: int) -> None:
    """One ``pwritev`` (a short one, rare, is finished with more)."""
    total = sum(len(b) for b in bufs)
    done = os.pwritev(fd, bufs, off)
    if done < total:
        rest = memoryview(b"".join(bytes(b) for b in bufs))[done:]
        while rest:
            n = os.pwrite(fd, rest, off + done)
            done += n
            rest = rest[n:]


def _lock(fd: int, path: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise MetaError(f"{path}: in use: another replfs daemon serves this image "
                            f"(its metadata is locked)") from None
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetaFile:
    """One image's metadata file.  Build with :meth:`open`."""

    def __init__(self, path: str, fd: int, size: int, cluster_size: int, created: bool):
        self.path = path
        self.size = size
        self.cluster_size = cluster_size
        self.created = created
        self.nbits, self.nbytes, area = _layout(size, cluster_size)
        self._fd = fd
        self._header: Header | None = None
        self._hdr = _Slots(f"{path}: header", (HEADER_OFF, HEADER_OFF + SLOT))
        self._al = _Slots(f"{path}: activity log", (AL_OFF, AL_OFF + SLOT))
        self._bm = _Slots(f"{path}: bitmap", (BITMAP_OFF, BITMAP_OFF + area))

    # -- open / create -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str, *, size: int, cluster_size: int, create: bool = True,
             lock: bool = True) -> MetaFile:
        """Opens the metadata file at ``path`` of an image of ``size`` bytes at
        ``cluster_size``, or creates it (``create``; ``.created`` then True).
        ``MetaError``: damaged beyond recovery, another image's (size or
        cluster size differ), or locked by another open (``lock``).
        ``FileNotFoundError`` if absent and not ``create``."""
        if size < 0 or cluster_size <= 0:
            raise ValueError(f"size={size}, cluster_size={cluster_size}")
        path = os.path.abspath(os.fspath(path))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise
            fd = cls._create(path, size, cluster_size, lock)
            if fd is None:  # another creator won the race: open its file
                return cls.open(path, size=size, cluster_size=cluster_size, create=False,
                                lock=lock)
            m = cls(path, fd, size, cluster_size, True)
        else:
            m = cls(path, fd, size, cluster_size, False)
        try:
            if lock and not m.created:
                _lock(fd, path)
            m._load()
        except BaseException:
            m.close()
            raise
        return m

    @classmethod
    def _create(cls, path: str, size: int, cluster_size: int, lock: bool) -> int | None:
        """Builds the file as ``<path>.tmp`` and links it in; the fd (locked),
        or None if ``path`` appeared meanwhile."""
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if lock:
                _lock(fd, tmp)
            os.ftruncate(fd, 0)
            os.fchmod(fd, 0o600)
            total = file_size(size, cluster_size)
            try:
                os.posix_fallocate(fd, 0, total)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
            os.ftruncate(fd, total)
            m = cls(path, fd, size, cluster_size, True)
            hdr = Header(node_id=secrets.token_hex(8), size=size, cluster_size=cluster_size)
            os.pwrite(fd, _record(HEADER_MAGIC, 1, hdr.to_json()), m._hdr.offsets[0])
            os.pwrite(fd, _record(AL_MAGIC, 1), m._al.offsets[0])
            # the bits are the file's zeroes: only the descriptor is written
            os.pwrite(fd, _record(BITMAP_MAGIC, 1, length=m.nbytes, tails=[bytes(m.nbytes)]),
                      m._bm.offsets[0])
            os.fsync(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                os.close(fd)
                os.unlink(tmp)
                return None
            except OSError:  # no hard links here: rename (replaces; creation is rare)
                os.rename(tmp, path)
            else:
                os.unlink(tmp)
            _fsync_dir(path)
            return fd
        except BaseException:
            try:
                os.close(fd)
            except OSError:
                pass
            raise

    def _load(self) -> None:
        fd = self._fd
        raw = _pread_all(fd, 2 * SLOT, HEADER_OFF)
        slots = [raw[:SLOT], raw[SLOT:]]
        found = [_unseal(s, HEADER_MAGIC, self._hdr.what) for s in slots]
        for i, f in enumerate(found):
            self._hdr.seq[i] = f and f[0]
        i = self._hdr.newest()
        _seq, length = found[i]
        try:
            h = Header.from_json(slots[i][REC_HEAD:REC_HEAD + length])
        except (ValueError, TypeError) as e:
            raise MetaError(f"{self.path}: header slot {'AB'[i]}: {e}") from None
        if h.size != self.size or h.cluster_size != self.cluster_size:
            raise MetaError(
                f"{self.path}: metadata of another image: it says size {h.size} and "
                f"cluster size {h.cluster_size}, the image has size {self.size} and "
                f"cluster size {self.cluster_size}")
        self._header = h
        need = file_size(self.size, self.cluster_size)
        have = os.fstat(fd).st_size
        if have < need:
            raise MetaError(f"{self.path}: truncated: {have} bytes, expected {need}")
        for i, off in enumerate(self._al.offsets):
            f = _unseal(_pread_all(fd, SLOT, off), AL_MAGIC, self._al.what)
            self._al.seq[i] = f and f[0]
        self._al.newest()
        for i in range(2):
            f = self._read_bitmap_area(i)
            self._bm.seq[i] = f and f[0]
        self._bm.newest()

    def _read_bitmap_area(self, i: int) -> tuple[int, int, bytes] | None:
        """``(seq, length, bits)`` of bitmap area ``i`` if valid."""
        buf = _pread_all(self._fd, SLOT + self.nbytes, self._bm.offsets[i])
        bits = memoryview(buf)[SLOT:]

        def tail_of(length):
            return bits if length == self.nbytes and len(bits) == length else None
        f = _unseal(buf, BITMAP_MAGIC, self._bm.what, tail_of)
        return f and (*f, bits)

    # -- header ---------------------------------------------------------------------------
    @property
    def header(self) -> Header:
        """A copy of the current header (change it, then ``write_header``)."""
        return self._header.copy()

    def write_header(self, h: Header) -> None:
        """Makes ``h`` the header, durably (one 4 KiB pwrite + fdatasync).
        ``ValueError`` if its size/cluster size differ from the file's, a field
        is out of range, or its JSON exceeds 4064 bytes."""
        if h.size != self.size or h.cluster_size != self.cluster_size:
            raise ValueError(f"header for size {h.size}/cluster {h.cluster_size} written "
                             f"into metadata of size {self.size}/cluster {self.cluster_size}")
        h.check()
        payload = h.to_json()
        if len(payload) > MAX_JSON:
            raise ValueError(f"header JSON is {len(payload)} bytes, at most {MAX_JSON}")
        stored = Header.from_json(payload)
        with self._hdr.lock:
            i, off, seq = self._hdr.target()
            self._write(self._hdr, i, seq, [_record(HEADER_MAGIC, seq, payload)], off)
            self._header = stored

    def update(self, **changes) -> Header:
        """``write_header`` of the current header with ``changes``; returns it."""
        h = dataclasses.replace(self.header, **changes)
        self.write_header(h)
        return h

    # -- activity log ----------------------------------------------------------------------
    def write_al(self, extents: Iterable[int]) -> None:
        """Makes ``extents`` (the whole set of hot extent numbers, u32) the
        activity log, durably (one 4 KiB pwrite + fdatasync).  ``ValueError``
        for more than :data:`AL_CAPACITY` distinct ones or one out of range."""
        ext = sorted({operator.index(e) for e in extents})
        if len(ext) > AL_CAPACITY:
            raise ValueError(f"{len(ext)} extents in the activity log, at most {AL_CAPACITY}")
        if ext and (ext[0] < 0 or ext[-1] >= 1 << 32):
            raise ValueError(f"extent numbers must be u32, got {ext[0]}..{ext[-1]}")
        payload = struct.pack(f"<{len(ext)}I", *ext)
        with self._al.lock:
            i, off, seq = self._al.target()
            self._write(self._al, i, seq, [_record(AL_MAGIC, seq, payload)], off)

    def read_al(self) -> list[int]:
        """The hot extents of the newest activity log record, sorted."""
        self._check_open()
        with self._al.lock:
            i = self._al.newest()
            rec = _pread_all(self._fd, SLOT, self._al.offsets[i])
            f = _unseal(rec, AL_MAGIC, self._al.what)
            if f is None or f[0] != self._al.seq[i]:
                raise MetaError(f"{self.path}: activity log slot {'AB'[i]} changed under us")
            return list(struct.unpack_from(f"<{f[1] // 4}I", rec, REC_HEAD))

    # -- bitmap ------------------------------------------------------------------------------
    def write_bitmap(self, bits) -> None:
        """Makes ``bits`` (packed, exactly ``nbytes``: ``ClusterBitmap.to_bytes()``)
        the bitmap, durably (one pwritev of 4 KiB + nbytes, one fdatasync).  Bits
        past ``nbits`` in the last byte are stored as 0."""
        mv = memoryview(bits).cast("B")
        if len(mv) != self.nbytes:
            raise ValueError(f"{len(mv)} bytes of bitmap, expected {self.nbytes}")
        bufs = [mv]
        if self.nbits & 7:
            bufs = [mv[:-1], bytes([mv[-1] & ((1 << (self.nbits & 7)) - 1)])]
        with self._bm.lock:
            i, off, seq = self._bm.target()
            desc = _record(BITMAP_MAGIC, seq, length=self.nbytes, tails=bufs)
            self._write(self._bm, i, seq, [desc, *bufs], off)

    def read_bitmap(self) -> bytes:
        """The packed bits of the newest bitmap (all zero for a new file)."""
        self._check_open()
        with self._bm.lock:
            i = self._bm.newest()
            f = self._read_bitmap_area(i)
            if f is None or f[0] != self._bm.seq[i]:
                raise MetaError(f"{self.path}: bitmap area {'AB'[i]} changed under us")
            return bytes(f[2])

    # -- common --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._fd < 0:
            raise ValueError(f"{self.path}: closed")

    def _write(self, slots: _Slots, i: int, seq: int, bufs: list, off: int) -> None:
        self._check_open()
        _pwrite_all(self._fd, bufs, off)
        os.fdatasync(self._fd)
        slots.done(i, seq)

    def close(self) -> None:
        """Closes the file (and drops the lock); idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetaFile({self.path!r}, size={self.size}, cluster_size={self.cluster_size})"
