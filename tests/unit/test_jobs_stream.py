"""The checkpoint protocol's streamer, in process: a mirror over two raw
images (no sockets), the streamer between them.  What the lag counts, how a
cluster's written blocks are sent, and that a cluster queued whole before the
streamer started is sent whole."""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

from replfs.block.dirty import DirtyRecord
from replfs.block.mirror import Mirror
from replfs.block.raw import RawImage
from replfs.jobs.stream import Streamer

CS = 64 * 1024
SIZE = 16 * CS


class Pair:
    """A local and a peer image full of 0x11, a mirror with a dirty record."""

    def __init__(self, tmp_path) -> None:
        for name in ("local", "peer"):
            (tmp_path / f"{name}.img").write_bytes(b"\x11" * SIZE)
        self.local = RawImage(str(tmp_path / "local.img"))
        self.peer = RawImage(str(tmp_path / "peer.img"))
        self.errors: list[str] = []
        self.mirror = Mirror("d", self.local, self.peer, record=DirtyRecord(SIZE, CS),
                             on_peer_error=lambda m, why: self.errors.append(why))

    @asynccontextmanager
    async def streamer(self):
        """A started streamer (not running: :meth:`drain` runs it)."""
        s = Streamer([self.mirror], max_lag=1 << 30,
                     on_error=lambda m, why: self.errors.append(why))
        s.start()
        try:
            yield s
        finally:
            s.stop()
            self.local.close()
            self.peer.close()
        assert self.errors == []

    @staticmethod
    async def drain(s: Streamer) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.run)
            await s.drain()
            nursery.cancel_scope.cancel()

    async def images(self) -> tuple[bytes, bytes]:
        return await self.local.read(0, SIZE), await self.peer.read(0, SIZE)


def test_lag_counts_the_blocks_written(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.streamer() as s:
            for c in (1, 3, 5):  # 4 KiB random writes: 4 KiB each, not 64 KiB
                await pair.mirror.write(c * CS + 8192, b"\x22" * 4096)
            assert s.lag_bytes == 3 * 4096
            await pair.mirror.write(3 * CS + 8192, b"\x23" * 4096)  # the same block again
            assert s.lag_bytes == 3 * 4096
            await pair.mirror.write(7 * CS, b"\x24" * CS)  # a whole cluster
            assert s.lag_bytes == 3 * 4096 + CS
            await pair.drain(s)
            assert s.lag_bytes == 0 and pair.mirror.record.dirty_clusters == 0
            assert s.sent_bytes == 3 * 4096 + CS
            # rounds do not flush the peer; the drain does, once
            assert pair.peer.stats.flushes == 1 and s.flushes == 1
            local, peer = await pair.images()
            assert peer == local

    trio.run(main)


def test_a_cluster_dirty_before_the_start_is_sent_whole(tmp_path):
    # the peer differs over the whole of cluster 2, and the record says so
    # (a write made while degraded); a 4 KiB write into it after the
    # streamer started must not narrow what is sent to that block
    pair = Pair(tmp_path)

    async def main():
        await pair.peer.write(2 * CS, b"\x33" * CS)
        pair.mirror.record.mark(2 * CS, CS)
        async with pair.streamer() as s:
            assert s.lag_bytes == CS
            await pair.mirror.write(2 * CS + 4096, b"\x22" * 4096)
            assert s.lag_bytes == CS
            await pair.drain(s)
            local, peer = await pair.images()
            assert peer == local
            assert peer[2 * CS:3 * CS] == b"\x11" * 4096 + b"\x22" * 4096 + b"\x11" * (CS - 8192)

    trio.run(main)


def test_the_blocks_written_in_a_cluster_are_sent_as_their_runs(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.streamer() as s:
            base = 9 * CS
            await pair.mirror.write(base, b"\x22" * 8192)  # blocks 0-1
            await pair.mirror.write(base + 5 * 4096, b"\x23" * 4096)  # block 5
            await pair.mirror.write(base + CS - 4096, b"\x24" * 4096)  # the last block
            await pair.mirror.write(base + CS, b"\x25" * 4096)  # the next cluster's first
            assert s.lag_bytes == 5 * 4096
            q = s.queues["d"]
            ranges, nc, nb = q.ranges([(9, 11)])
            assert ranges == [(base, base + 8192), (base + 5 * 4096, base + 6 * 4096),
                              (base + CS - 4096, base + CS + 4096)]  # adjacent: merged
            assert (nc, nb) == (2, 5)
            # outside a round (no ``remarked``) nothing is cleared: the two
            # clusters stay queued, now whole (their masks were taken)
            q.sent([([(9, 11)], nc, nb)])
            assert pair.mirror.record.dirty_clusters == 2 and s.lag_bytes == 2 * CS

    trio.run(main)
