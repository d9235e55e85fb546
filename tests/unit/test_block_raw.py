"""RawImage specifics (the generic behaviour is in the conformance suite)."""

import errno
import os
import tempfile
import threading

import pytest
import trio
import trio.testing

from replfs.block import raw as rawmod
from replfs.block.raw import RawImage
from replfs.errors import BlockError


def make(tmp_path, content: bytes, **kw) -> RawImage:
    p = tmp_path / "disk.img"
    p.write_bytes(content)
    return RawImage(p, **kw)


def test_size_and_create(tmp_path):
    img = RawImage.create(tmp_path / "new.img", 12345)
    assert img.size == 12345 and img.name == "new.img"
    assert os.stat(tmp_path / "new.img").st_blocks == 0  # sparse
    assert trio.run(img.read, 0, 12345) == bytes(12345)
    img.close()
    img.close()  # idempotent


def test_open_missing_file_is_blockerror(tmp_path):
    with pytest.raises(BlockError) as e:
        RawImage(tmp_path / "nope.img")
    assert e.value.errno == errno.ENOENT


def test_read_only_refuses_writes(tmp_path):
    img = make(tmp_path, b"x" * 4096, read_only=True)

    async def main():
        for fn, args in [
            (img.write, (0, b"y")),
            (img.write_zeroes, (0, 10)),
            (img.trim, (0, 10)),
            (img.writev, (0, [b"y", b"z"])),
            (img.discard_all, ()),
        ]:
            with pytest.raises(BlockError) as e:
                await fn(*args)
            assert e.value.errno == errno.EPERM
        await img.flush()
        assert await img.read(0, 4096) == b"x" * 4096

    trio.run(main)
    img.close()


def test_write_zeroes_and_trim_punch_holes(tmp_path):
    size = 4 * 1024 * 1024
    img = make(tmp_path, b"\x77" * size)
    before = os.stat(img.path).st_blocks

    async def main():
        await img.write_zeroes(0, 1024 * 1024)  # inline
        await img.trim(2 * 1024 * 1024, 2 * 1024 * 1024)  # threaded (> inline_max)
        await img.write_zeroes(1024 * 1024 + 10, 100, fua=True)
        assert await img.read(0, 1024 * 1024) == bytes(1024 * 1024)
        assert await img.read(1024 * 1024, 10) == b"\x77" * 10
        assert await img.read(1024 * 1024 + 10, 100) == bytes(100)
        assert await img.read(2 * 1024 * 1024 - 5, 10) == b"\x77" * 5 + bytes(5)

    trio.run(main)
    after = os.stat(img.path).st_blocks
    assert after < before - (2 * 1024 * 1024) // 512  # blocks really freed
    img.close()


def test_zero_fallback_when_punch_unsupported(tmp_path, monkeypatch):
    img = make(tmp_path, b"\x55" * 3_000_000)
    calls = []

    def no_punch(fd, off, length):
        calls.append((off, length))
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(rawmod, "punch_hole", no_punch)

    async def main():
        await img.write_zeroes(7, 2_500_000)  # several fallback steps, threaded
        await img.trim(2_900_000, 100)
        assert await img.read(0, 8) == b"\x55" * 7 + bytes(1)
        assert await img.read(2_500_000, 10) == bytes(7) + b"\x55" * 3
        assert await img.read(2_899_999, 102) == b"\x55" + bytes(100) + b"\x55"

    trio.run(main)
    assert len(calls) == 1  # remembered: not retried
    img.close()


def test_oserror_keeps_errno(tmp_path, monkeypatch):
    img = make(tmp_path, bytes(8192))

    def failing(*args):
        raise OSError(errno.EIO, "Input/output error")

    async def main():
        monkeypatch.setattr(os, "pwrite", failing)
        with pytest.raises(BlockError) as e:
            await img.write(0, b"abc")
        assert e.value.errno == errno.EIO and "disk.img" in str(e.value)
        monkeypatch.undo()

        def nospace(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pread", nospace)
        with pytest.raises(BlockError) as e:
            await img.read(0, 10)
        assert e.value.errno == errno.ENOSPC
        monkeypatch.undo()

        monkeypatch.setattr(os, "fdatasync", failing)
        with pytest.raises(BlockError) as e:
            await img.flush()
        assert e.value.errno == errno.EIO
        monkeypatch.undo()

    trio.run(main)
    assert img.statistics()["errors"] == 3
    img.close()


def test_short_read_is_eio(tmp_path):
    img = make(tmp_path, b"a" * 8192)
    os.truncate(img.path, 100)  # shrinks under us

    async def main():
        with pytest.raises(BlockError) as e:
            await img.read(0, 8192)
        assert e.value.errno == errno.EIO

    trio.run(main)
    img.close()


def test_fua_paths(tmp_path, monkeypatch):
    img = make(tmp_path, bytes(65536))

    async def main():
        await img.write(100, b"fua", fua=True)
        assert await img.read(100, 3) == b"fua"
        # pwritev(RWF_DSYNC) refused: falls back to write + fdatasync.
        real = os.pwritev

        def no_flags(fd, bufs, off, *flags):
            if flags and flags[0]:
                raise OSError(errno.EOPNOTSUPP, "nope")
            return real(fd, bufs, off)

        monkeypatch.setattr(os, "pwritev", no_flags)
        await img.write(200, b"again", fua=True)
        assert await img.read(200, 5) == b"again"
        assert img._dsync_ok is False

    trio.run(main)
    img.close()


def test_statistics_and_closed(tmp_path):
    img = make(tmp_path, bytes(65536))

    async def main():
        await img.write(0, b"x" * 100)
        await img.read(0, 50)
        await img.flush()
        s = img.statistics()
        assert s["writes"] == 1 and s["bytes_written"] == 100
        assert s["reads"] == 1 and s["bytes_read"] == 50 and s["flushes"] == 1
        img.close()
        with pytest.raises(BlockError) as e:
            await img.read(0, 1)
        assert e.value.errno == errno.EBADF

    trio.run(main)


def test_flush_inline_when_little_is_dirty_else_in_a_thread(tmp_path, monkeypatch):
    img = make(tmp_path, bytes(4 * rawmod.INLINE_FLUSH_MAX))
    where: list[str] = []
    real = os.fdatasync

    def spy(fd):
        where.append("trio" if threading.current_thread() is threading.main_thread()
                     else "thread")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    # The choice is what is tested, not this disk's speed: no sync is "slow"
    # until the test says so (a loaded host takes > 2 ms for the first one).
    monkeypatch.setattr(rawmod, "SLOW_FLUSH_S", 60.0)

    async def main():
        await img.write(0, b"x" * 4096)
        await img.flush()  # 4 KiB since the last flush: inline
        await img.write(0, b"y" * (rawmod.INLINE_FLUSH_MAX + 1))
        await img.flush()  # too much dirty data: a thread
        await img.trim(0, 2 * rawmod.INLINE_FLUSH_MAX)
        await img.flush()  # a big hole punch counts too
        await img.flush()  # nothing since: inline
        monkeypatch.setattr(rawmod, "SLOW_FLUSH_S", -1.0)  # every sync is "slow"
        await img.flush()  # inline, found slow...
        for _ in range(rawmod.SLOW_FLUSH_PENALTY):
            await img.flush()  # ...so these go to a thread
        monkeypatch.setattr(rawmod, "SLOW_FLUSH_S", 60.0)
        await img.flush()  # and then inline again

    trio.run(main)
    assert where == (["trio", "thread", "thread", "trio", "trio"]
                     + ["thread"] * rawmod.SLOW_FLUSH_PENALTY + ["trio"])
    s = img.statistics()
    assert s["flushes"] == len(where) and s["flushes_inline"] == where.count("trio")
    img.close()


def test_contended_reads_overlap_misses_and_return_the_data(tmp_path):
    """With requests waiting, a read missing the page cache starts its disk
    read and yields before waiting; a cached one is served at once.  Both
    return the right bytes."""
    content = bytes(range(256)) * 64 * 16  # 256 KiB
    img = make(tmp_path, content)
    if not img._nowait_ok:
        pytest.skip("RWF_NOWAIT is not available")
    fd = os.open(tmp_path / "disk.img", os.O_RDONLY)
    rawmod.set_contention_probe(lambda: True)
    try:
        os.fdatasync(img._fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict: a cold read

        async def main():
            got = {}

            async def read(off):
                got[off] = await img.read(off, 4096)

            async with trio.open_nursery() as nursery:
                for off in range(0, len(content), 64 * 1024):
                    nursery.start_soon(read, off)
            for off, data in got.items():
                assert data == content[off:off + 4096]
            assert await img.read(0, 4096) == content[:4096]  # cached now

        trio.run(main)
    finally:
        rawmod.set_contention_probe(None)
        os.close(fd)
    s = img.statistics()
    assert s["reads"] == 5
    assert 1 <= s["reads_overlapped"] <= 4  # the misses (eviction is best effort)
    img.close()


def test_start_writeback_is_a_harmless_hint(tmp_path):
    img = make(tmp_path, bytes(1 << 20))
    ro = RawImage(tmp_path / "disk.img", read_only=True)

    assert img.can_writeback and img.children() == {}

    async def main():
        await img.write(4096, b"w" * 8192)
        await img.start_writeback(0, 1 << 20)
        await img.start_writeback(0, 0)
        await ro.start_writeback(0, 1 << 20)  # read-only: nothing to do
        assert await img.read(4096, 8192) == b"w" * 8192
        await img.flush()

    trio.run(main)
    img.close()
    ro.close()


def test_writev_is_one_write_with_the_same_checks(tmp_path):
    img = make(tmp_path, bytes(8192), inline_max=4096)

    async def main():
        await img.writev(10, [b"ab", bytearray(b"cd"), memoryview(b"xef")[1:]])
        await img.writev(4000, [b"t" * 3000, b"u" * 1000])  # > inline_max: a thread
        await img.writev(8192, [])  # empty at the end: a no-op
        with pytest.raises(BlockError) as e:
            await img.writev(8190, [b"ab", b"c"])
        assert e.value.errno == errno.ENOSPC
        assert await img.read(8, 10) == b"\0\0abcdef\0\0"
        assert await img.read(4000, 4000) == b"t" * 3000 + b"u" * 1000
        assert img.statistics()["writes"] == 2

    trio.run(main)
    img.close()


def test_close_during_threaded_io_is_deferred(tmp_path, monkeypatch):
    img = make(tmp_path, bytes(1 << 20), inline_max=0)
    release = threading.Event()
    real = rawmod._pwritev_full

    def slow(fd, off, bufs, *flags):
        release.wait(10)
        return real(fd, off, bufs, *flags)

    monkeypatch.setattr(rawmod, "_pwritev_full", slow)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(img.write, 0, b"z" * (1 << 20))
            await trio.testing.wait_all_tasks_blocked()
            img.close()  # a worker thread still uses the fd
            assert img._fd >= 0
            release.set()
        assert img._fd == -1

    trio.run(main)
    with open(tmp_path / "disk.img", "rb") as f:
        assert f.read(4) == b"zzzz"


def test_block_device_style_size(tmp_path):
    # Size comes from lseek(SEEK_END), which is what a block device needs.
    img = make(tmp_path, b"q" * 1000)
    assert img.size == 1000
    img.close()


# -- copy_from: copy_file_range, and pread + pwrite where the kernel refuses it ---------
def _other_fs_dir(tmp_path):
    """A directory on another file system than ``tmp_path`` (tmpfs), or skip."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or not os.access(shm, os.W_OK) \
            or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no writable /dev/shm on another file system than the test's tmp dir")
    return shm


@pytest.mark.parametrize("inline_max", [1 << 20, 0])  # inline, and in an I/O thread
def test_copy_from_copies_the_range_at_the_same_offset(tmp_path, inline_max):
    content = os.urandom(256 * 1024)
    src = make(tmp_path, content)
    dst = RawImage.create(tmp_path / "dst.img", len(content), inline_max=inline_max)

    async def main():
        with trio.fail_after(10):
            await dst.copy_from(src, 4096, 64 * 1024)
            await dst.copy_from(src, 200_000, 1)
            await dst.copy_from(src, 0, 0)  # empty: nothing
        want = bytearray(len(content))
        want[4096 : 4096 + 65536] = content[4096 : 4096 + 65536]
        want[200_000] = content[200_000]
        assert await dst.read(0, len(content)) == want
        assert dst._copy_range_ok  # same file system: the kernel copied

    trio.run(main)
    assert dst.stats.writes == 2 and dst.stats.bytes_written == 65537
    src.close()
    dst.close()
    assert src._fd == -1 and dst._fd == -1


@pytest.mark.parametrize("inline_max", [1 << 20, 0])
def test_copy_from_falls_back_across_file_systems(tmp_path, inline_max):
    # copy_file_range between two file systems fails with EXDEV (Linux >= 5.19):
    # the image then copies with pread + pwrite, and remembers it.
    shm = _other_fs_dir(tmp_path)
    content = os.urandom(3 * 1024 * 1024 + 5)  # > the fallback's 1 MiB step
    src = make(tmp_path, content)
    fd, path = tempfile.mkstemp(dir=shm, prefix="replfs-test-")
    os.close(fd)
    try:
        dst = RawImage.create(path, len(content), inline_max=inline_max)

        async def main():
            with trio.fail_after(10):
                await dst.copy_from(src, 1, len(content) - 2)
                assert await dst.read(0, len(content)) == b"\0" + content[1:-1] + b"\0"
                assert not dst._copy_range_ok
                await dst.copy_from(src, 0, 1)  # straight to the fallback now
                assert (await dst.read(0, 1)) == content[:1]

        trio.run(main)
        dst.close()
    finally:
        os.unlink(path)
    src.close()


def test_copy_from_checks_and_errors(tmp_path):
    src = make(tmp_path, b"s" * 8192)
    ro = RawImage.create(tmp_path / "ro.img", 8192)
    ro.close()
    ro = RawImage(tmp_path / "ro.img", read_only=True)
    dst = RawImage.create(tmp_path / "dst.img", 4096)

    async def main():
        with pytest.raises(BlockError) as e:
            await ro.copy_from(src, 0, 4096)
        assert e.value.errno == errno.EPERM
        with pytest.raises(BlockError) as e:  # past this image's end
            await dst.copy_from(src, 4096, 1)
        assert e.value.errno == errno.ENOSPC
        big = RawImage.create(tmp_path / "big.img", 3 * 4096)
        with pytest.raises(BlockError) as e:  # past the source's end
            await big.copy_from(src, 8000, 1000)
        assert e.value.errno == errno.EINVAL
        src.close()
        with pytest.raises(BlockError) as e:
            await big.copy_from(src, 0, 10)
        assert e.value.errno == errno.EBADF
        big.close()

    trio.run(main)
    ro.close()
    dst.close()


@pytest.mark.parametrize("inline_max", [rawmod.INLINE_MAX, 4096])
def test_large_writes_go_in_pieces_and_land_whole(tmp_path, monkeypatch, inline_max):
    # a write larger than WRITE_PIECE is issued as several pwrite calls (the
    # kernel then keeps the page cache in small folios); the bytes land as one
    size = 3 * rawmod.WRITE_PIECE + 1000
    img = make(tmp_path, b"\x11" * (size + 8192), inline_max=inline_max)
    calls = []
    real = os.pwrite
    monkeypatch.setattr(rawmod.os, "pwrite",
                        lambda fd, d, o: calls.append(len(d)) or real(fd, d, o))
    data = bytes(range(256)) * (size // 256) + b"\x22" * (size % 256)

    async def main():
        await img.write(100, data)
        await img.writev(100 + size, [bytearray(b"\x33" * 5000), memoryview(b"\x44" * 3000)])
        assert await img.read(0, 100) == b"\x11" * 100
        assert await img.read(100, size) == data
        assert await img.read(100 + size, 8000) == b"\x33" * 5000 + b"\x44" * 3000
        assert await img.read(100 + size + 8000, 92) == b"\x11" * 92

    trio.run(main)
    img.close()
    assert max(calls) <= rawmod.WRITE_PIECE and calls[:4] == [rawmod.WRITE_PIECE] * 3 + [1000]


def test_sequential_reads_read_ahead_and_random_ones_do_not(tmp_path, monkeypatch):
    # readahead is off on the fd (small folios); a sequential reader gets
    # WILLNEED READAHEAD bytes ahead, asked again when half of it is read
    ra = rawmod.READAHEAD
    size = 12 * ra
    img = make(tmp_path, bytes(size))
    asked = []
    real = os.posix_fadvise

    def fadvise(fd, off, n, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            asked.append((off, n))
        return real(fd, off, n, advice)

    monkeypatch.setattr(rawmod.os, "posix_fadvise", fadvise)
    step = 128 * 1024

    async def main():
        await img.read(ra, step)  # a first read: nothing known yet
        assert asked == []
        for off in range(0, 2 * ra, step):  # a sequential pass from 0
            await img.read(off, step)
        assert asked[0] == (2 * step, ra), asked  # at the second read: READAHEAD past it
        assert all(b[0] == a[0] + a[1] for a, b in zip(asked, asked[1:])), asked  # contiguous
        assert len(asked) == 3  # 2 x READAHEAD read: asked at 0.06, 0.5 and 1.5 x READAHEAD
        asked.clear()
        for off in (7 * ra, 17 * 4096, 5 * ra + 8192, 5 * 4096):  # random: none
            await img.read(off, 4096)
        assert asked == []
        for off in range(0, 3 * step, step):  # a second pass from 0 reads ahead again
            await img.read(off, step)
        assert asked and asked[0] == (2 * step, ra)
        assert img.statistics()["readaheads"] == 3 + len(asked)

    trio.run(main)
    img.close()
