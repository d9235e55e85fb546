"""The checkpoint protocol's streamer, in process: a mirror over two raw
images (no sockets), the streamer between them.  What the lag counts, and
that a cluster queued whole before the streamer started is sent whole."""

from __future__ import annotations

import trio

from replfs.block.dirty import DirtyRecord
from replfs.block.mirror import Mirror
from replfs.block.raw import RawImage
from replfs.jobs.stream import Streamer

CS = 64 * 1024
SIZE = 16 * CS


def make(tmp_path, base: bytes = b"\x11", *, peer_base: bytes | None = None):
    for name, b in (("local", base), ("peer", peer_base or base)):
        (tmp_path / f"{name}.img").write_bytes(b * SIZE)
    local = RawImage(str(tmp_path / "local.img"))
    peer = RawImage(str(tmp_path / "peer.img"))
    record = DirtyRecord(SIZE, CS)
    errors = []
    mirror = Mirror("d", local, peer, record=record,
                    on_peer_error=lambda m, why: errors.append(why))
    return mirror, local, peer, errors


async def read_all(node) -> bytes:
    return await node.read(0, SIZE)


def test_lag_counts_the_blocks_written(tmp_path):
    mirror, local, peer, errors = make(tmp_path)

    async def main():
        s = Streamer([mirror], max_lag=1 << 30, on_error=lambda m, why: errors.append(why))
        s.start()
        try:
            for c in (1, 3, 5):  # 4 KiB random writes: 4 KiB each, not 64 KiB
                await mirror.write(c * CS + 8192, b"\x22" * 4096)
            assert s.lag_bytes == 3 * 4096
            await mirror.write(3 * CS + 8192, b"\x23" * 4096)  # the same block again
            assert s.lag_bytes == 3 * 4096
            await mirror.write(7 * CS, b"\x24" * CS)  # a whole cluster
            assert s.lag_bytes == 3 * 4096 + CS
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.run)
                await s.drain()
                nursery.cancel_scope.cancel()
            assert s.lag_bytes == 0 and mirror.record.dirty_clusters == 0
            assert s.sent_bytes == 3 * 4096 + CS
            # rounds do not flush the peer; the drain does, once
            assert peer.stats.flushes == 1 and s.flushes == 1
            assert await read_all(peer) == await read_all(local)
        finally:
            s.stop()
            local.close()
            peer.close()

    trio.run(main)
    assert errors == []


def test_a_cluster_dirty_before_the_start_is_sent_whole(tmp_path):
    # the peer differs over the whole of cluster 2, and the record says so
    # (a write made while degraded); a 4 KiB write into it after the
    # streamer started must not narrow what is sent to that block
    mirror, local, peer, errors = make(tmp_path)

    async def main():
        await peer.write(2 * CS, b"\x33" * CS)
        mirror.record.mark(2 * CS, CS)
        s = Streamer([mirror], max_lag=1 << 30, on_error=lambda m, why: errors.append(why))
        s.start()
        try:
            assert s.lag_bytes == CS
            await mirror.write(2 * CS + 4096, b"\x22" * 4096)
            assert s.lag_bytes == CS
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.run)
                await s.drain()
                nursery.cancel_scope.cancel()
            assert await read_all(peer) == await read_all(local)
            assert (await read_all(peer))[2 * CS:3 * CS] == \
                b"\x11" * 4096 + b"\x22" * 4096 + b"\x11" * (CS - 8192)
        finally:
            s.stop()
            local.close()
            peer.close()

    trio.run(main)
    assert errors == []


def test_the_blocks_written_in_a_cluster_are_sent_as_their_runs(tmp_path):
    mirror, local, peer, errors = make(tmp_path)

    async def main():
        s = Streamer([mirror], max_lag=1 << 30, on_error=lambda m, why: errors.append(why))
        s.start()
        try:
            base = 9 * CS
            await mirror.write(base, b"\x22" * 8192)  # blocks 0-1
            await mirror.write(base + 5 * 4096, b"\x23" * 4096)  # block 5
            await mirror.write(base + CS - 4096, b"\x24" * 4096)  # the last block
            await mirror.write(base + CS, b"\x25" * 4096)  # the next cluster's first
            assert s.lag_bytes == 5 * 4096
            q = s.queues["d"]
            ranges, nc, nb = q.ranges([(9, 11)])
            assert ranges == [(base, base + 8192), (base + 5 * 4096, base + 6 * 4096),
                              (base + CS - 4096, base + CS + 4096)]  # adjacent: merged
            assert (nc, nb) == (2, 5)
            # outside a round (no ``remarked``) nothing is cleared: the two
            # clusters stay queued, now whole (their masks were taken)
            q.sent([([(9, 11)], nc, nb)])
            assert mirror.record.dirty_clusters == 2 and s.lag_bytes == 2 * CS
        finally:
            s.stop()
            local.close()
            peer.close()

    trio.run(main)
    assert errors == []
