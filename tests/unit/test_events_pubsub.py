"""The event hub, the metrics page and the status timestamps, in process: no
FUSE, no sockets (the controllers run over the in-process pair of
tests/replpair.py)."""

from __future__ import annotations

import json
import os
import types

import pyfuse3
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from replfs import metrics
from replfs.events import EventHub, follow
from replfs.fuse import ops as ops_mod
from replfs.replication.stage import ReplicationStage
from tests.replpair import CL, PRIMARY, Pair, pattern, run


def lines(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines()]


def drain(sub, size: int = 1 << 16) -> bytes:
    out = b""
    while chunk := sub.take(size):
        out += chunk
    return out


# -- the hub ---------------------------------------------------------------------------
def test_a_reader_starts_with_the_current_state_then_gets_each_event():
    state = {"state": "replicating"}
    hub = EventHub(lambda: dict(state))
    hub.publish("state", state="nobody listens")  # no reader: not even encoded
    assert hub.published == 0
    sub = hub.subscribe()
    state["state"] = "degraded"
    hub.publish("error", error="disk d0: gone")
    hub.publish("state", state="degraded", previous="replicating")
    got = lines(drain(sub))
    assert [e["event"] for e in got] == ["exists", "error", "state"]
    assert got[0]["state"] == "replicating"  # as it was when the reader came
    assert got[1]["error"] == "disk d0: gone"
    assert all(isinstance(e["time"], float) for e in got)
    assert sub.take(100) == b""


def test_reads_of_one_byte_give_whole_lines_and_every_reader_its_own_copy():
    hub = EventHub(lambda: {"state": "replicating"})
    a, b = hub.subscribe(), hub.subscribe()
    hub.publish("checkpoint", checkpoints=1, text="ünïcode\nand a newline")
    one_by_one = b""
    while byte := a.take(1):
        assert len(byte) == 1
        one_by_one += byte
    assert one_by_one.split(b"\n", 1)[1] == drain(b).split(b"\n", 1)[1]  # the same event
    got = lines(one_by_one)
    assert got[1] == {**got[1], "event": "checkpoint", "checkpoints": 1,
                      "text": "ünïcode\nand a newline"}
    assert one_by_one.count(b"\n") == 2  # the newline in the text is escaped


def test_a_slow_reader_loses_lines_is_told_so_and_gets_the_state_again():
    state = {"state": "replicating"}
    hub = EventHub(lambda: dict(state), limit=4)
    slow, fast = hub.subscribe(), hub.subscribe()
    partial = slow.take(5)  # in the middle of its first line
    for i in range(12):
        if i == 9:
            state["state"] = "degraded"
        drain(fast)  # fast keeps up
        hub.publish("checkpoint", checkpoints=i + 1)
    assert lines(drain(fast))[-1]["checkpoints"] == 12
    rest = lines(partial + drain(slow))
    # 1-4 queued, 5 overflows (5 lost), 6-7 fit beside the two new lines, 8
    # overflows again (3 more lost), 9-10 fit, 11 overflows (3 more), 12 fits.
    assert [e["event"] for e in rest] == ["exists", "overflow", "exists", "checkpoint"]
    assert rest[1] == {**rest[1], "dropped": 11, "queue_limit": 4}
    assert rest[2]["state"] == "degraded"  # the state at the last loss
    assert rest[3]["checkpoints"] == 12  # and what came after it
    assert hub.readers == 2


def test_a_blocked_wait_wakes_on_an_event_and_at_the_end():
    hub = EventHub()

    async def main():
        sub = hub.subscribe()
        drain(sub)
        async with trio.open_nursery() as nursery:
            woke = []

            async def waiter():
                await sub.wait()
                woke.append(sub.take(1000))

            nursery.start_soon(waiter)
            await trio.sleep(0.01)
            assert woke == []
            hub.publish("peer", peer_connected=False)
        assert lines(woke[0])[0]["event"] == "peer"
        await trio.lowlevel.checkpoint()
        closer = hub.subscribe()
        drain(closer)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(closer.wait)
                await trio.sleep(0.01)
                hub.close()
        assert closer.ended and hub.readers == 0

    run(main, 5)


def test_a_closed_reader_gets_nothing_more():
    hub = EventHub()
    sub = hub.subscribe()
    sub.close()
    hub.publish("state", state="degraded")
    assert hub.readers == 0 and hub.published == 0


# -- the metrics page ------------------------------------------------------------------
def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def value(fams, name, **labels):
    for fam in fams.values():
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(f"{name} {labels}")


def test_metrics_render_a_primary_status_in_the_text_format():
    status = {
        "role": "primary", "state": "syncing", "peer_connected": True, "checkpoints": 3,
        "last_checkpoint_at": 1718000000.5, "degraded_since": 1717999990.25,
        "replication_errors": 2, "sync": {"total_bytes": 8 << 20, "done_bytes": 1 << 20},
        "disks": {"d0": {"out_of_sync_bytes": 7 << 20}, 'we"ird': {"out_of_sync_bytes": 0}},
        "io": {"d0": {"reads": 4, "bytes_read": 16384, "writes": 2, "bytes_written": 8192},
               'we"ird': {"reads": 0, "bytes_read": 0, "writes": 0, "bytes_written": 0}},
    }
    text = metrics.render(status, "/mnt/vm 1")
    fams = families(text)
    m = {"mount": "/mnt/vm 1", "role": "primary"}
    assert value(fams, "replfs_state", state="syncing", **m) == 1
    assert value(fams, "replfs_state", state="replicating", **m) == 0
    assert value(fams, "replfs_state", state="degraded", **m) == 0
    assert value(fams, "replfs_peer_connected", **m) == 1
    assert value(fams, "replfs_checkpoints_total", **m) == 3
    assert fams["replfs_checkpoints"].type == "counter"
    assert value(fams, "replfs_replication_errors_total", **m) == 2
    assert value(fams, "replfs_last_checkpoint_timestamp_seconds", **m) == 1718000000.5
    assert value(fams, "replfs_degraded_since_timestamp_seconds", **m) == 1717999990.25
    assert value(fams, "replfs_resync_done_bytes", **m) == 1 << 20
    assert value(fams, "replfs_resync_size_bytes", **m) == 8 << 20
    assert value(fams, "replfs_disk_written_bytes_total", disk="d0", **m) == 8192
    assert value(fams, "replfs_disk_read_bytes_total", disk="d0", **m) == 16384
    assert value(fams, "replfs_disk_read_requests_total", disk="d0", **m) == 4
    assert value(fams, "replfs_disk_write_requests_total", disk="d0", **m) == 2
    assert value(fams, "replfs_dirty_bytes", disk="d0", **m) == 7 << 20
    assert value(fams, "replfs_dirty_bytes", disk='we"ird', **m) == 0  # escaped label
    assert b"# HELP replfs_state" in text and b"# TYPE replfs_state gauge" in text


def test_metrics_leave_out_timestamps_that_do_not_apply():
    status = {"role": "secondary", "state": "replicating", "peer_connected": True,
              "checkpoints": 0, "last_checkpoint_at": None, "degraded_since": None,
              "replication_errors": 0, "sync": None,
              "disks": {"d0": {"hidden_bytes": CL, "active_bytes": 0}}, "io": {}}
    fams = families(metrics.render(status, "/m"))
    assert "replfs_last_checkpoint_timestamp_seconds" not in fams
    assert "replfs_degraded_since_timestamp_seconds" not in fams
    assert value(fams, "replfs_resync_size_bytes") == 0
    assert value(fams, "replfs_overlay_bytes", disk="d0", overlay="hidden") == CL
    assert {s.labels["state"] for s in fams["replfs_state"].samples} == {
        "replicating", "syncing", "inconsistent", "failed-over", "stopped"}


# -- the controllers publish; the status has the timestamps -----------------------------
def test_the_primary_publishes_the_fault_the_degraded_state_and_checkpoints(tmp_path):
    pair = Pair(tmp_path, secondary_faults="write:EIO:count=1")
    seen: list[dict] = []

    async def main():
        async with pair.running():
            p = pair.primary
            assert p.status()["degraded_since"] is None  # replicating, peer connected
            sub = p.events.subscribe()
            await p.checkpoint()
            st = p.status()
            assert isinstance(st["last_checkpoint_at"], float)
            pair.reachable = False
            await pair.pdisk().write(0, pattern(PRIMARY, 4096))  # the secondary fails
            assert p.stage is ReplicationStage.DEGRADED
            st = p.status()
            assert isinstance(st["degraded_since"], float)
            assert st["degraded_since"] >= st["last_checkpoint_at"]
            assert st["replication_errors"] == 1
            seen.extend(lines(drain(sub)))

    run(main)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "exists" and seen[0]["state"] == "replicating"
    assert seen[0]["peer_connected"] is True and seen[0]["degraded_since"] is None
    cp = seen[kinds.index("checkpoint")]
    assert cp["checkpoints"] == 1 and isinstance(cp["last_checkpoint_at"], float)
    err = seen[kinds.index("error")]
    assert "d0" in err["error"]
    state = next(e for e in seen if e["event"] == "state" and e["state"] == "degraded")
    assert state["previous"] == "replicating" and isinstance(state["degraded_since"], float)
    peer = next(e for e in seen if e["event"] == "peer")
    assert peer["peer_connected"] is False


def test_the_secondary_publishes_checkpoint_peer_and_failover(tmp_path):
    pair = Pair(tmp_path)
    seen: list[dict] = []

    async def main():
        async with pair.running():
            s = pair.secondary
            sub = s.events.subscribe()
            assert s.status()["degraded_since"] is None
            await s.checkpoint()
            pair.reachable = False
            await s.failover()
            assert isinstance(s.status()["degraded_since"], float)
            seen.extend(lines(drain(sub)))

    run(main)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "exists" and seen[0]["role"] == "secondary"
    assert "checkpoint" in kinds and "failover" in kinds
    assert {"event": "peer", "peer_connected": False}.items() <= seen[
        kinds.index("peer")].items()
    assert any(e["event"] == "state" and e["state"] == "failed-over" for e in seen)


# -- the events file's handlers, without a mount -----------------------------------------
def test_the_events_file_streams_one_byte_reads_and_ends_at_unmount(tmp_path):
    pair = Pair(tmp_path)

    async def main():
        async with pair.running():
            fs = ops_mod.ReplfsOps(pair.primary, {"d0": pair.pdisk()}, mount="/m")
            ctx = types.SimpleNamespace(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())
            info = await fs.open(ops_mod.EVENTS, os.O_RDONLY, ctx)
            assert info.direct_io and info.nonseekable
            first = b""
            while not first.endswith(b"\n"):
                first += await fs.read(info.fh, 0, 1)
            assert json.loads(first)["event"] == "exists"

            got = []

            async def reader():
                got.append(await fs.read(info.fh, 0, 4096))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await trio.sleep(ops_mod.STREAM_POLL * 2)  # blocked, and still blocked
                assert got == []
                await pair.primary.checkpoint()
            assert json.loads(got[0])["event"] == "checkpoint"

            others = [await fs.open(ops_mod.EVENTS, os.O_RDONLY, ctx)
                      for _ in range(ops_mod.MAX_EVENT_READERS - 1)]
            with pytest.raises(pyfuse3.FUSEError) as busy:
                await fs.open(ops_mod.EVENTS, os.O_RDONLY, ctx)
            assert busy.value.errno == 16  # EBUSY
            for o in others:
                await fs.release(o.fh)

            async with trio.open_nursery() as nursery:
                got.clear()
                nursery.start_soon(reader)
                await trio.sleep(0.05)
                fs.end_streams()
            assert got == [b""]  # end of file
            await fs.release(info.fh)
            assert pair.primary.events.readers == 0

            m = await fs.open(ops_mod.METRICS, os.O_RDONLY, ctx)
            page = await fs.read(m.fh, 0, 1 << 20)
            await fs.release(m.fh)
            fams = families(page)
            assert value(fams, "replfs_checkpoints_total", mount="/m", role="primary") == 1

    run(main)


def test_signal_pending_is_false_for_a_process_taking_its_signals():
    assert ops_mod.signal_pending(os.getpid()) is False
    assert ops_mod.signal_pending(0) is False
    assert ops_mod.signal_pending(2 ** 22 + 12345) is False  # no such process


def test_follow_copies_lines_and_stops_after_count(tmp_path):
    path = tmp_path / "events"
    path.write_bytes(b'{"event": "exists"}\n{"event": "state"}\n{"event": "peer"}\n')
    out = tmp_path / "out"
    with open(out, "w") as f:
        assert follow(str(path), f, count=2) == 2
    assert out.read_text() == '{"event": "exists"}\n{"event": "state"}\n'
    with open(out, "w") as f:
        assert follow(str(path), f) == 3  # end of file: the mount went away
