"""replfs's NBD server and client against real NBD peers over 127.0.0.1.

* our server (serving a RawImage) driven by qemu-io, qemu-img, nbdinfo,
  nbdsh and python3-libnbd;
* our client against qemu-nbd, ``nbdkit memory`` and ``nbdkit file``;
* server policies and robustness: client limit, malformed peers, fuzzing,
  shutdown, abort, flush ordering, error mapping.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import random
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from replfs.block.base import BlockNode
from replfs.block.raw import RawImage
from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd.client import ExportRefusedError, connect, open_client
from replfs.nbd.server import NBDServer

pytestmark = pytest.mark.integration

KiB, MiB = 1024, 1024 * 1024
SIZE = 64 * MiB
TIMEOUT = 60
# (offset, length): small, unaligned-ish, and larger than the server's
# inline limit (so it runs in a spawned task).
REGIONS = [(0, 64 * KiB), (MiB + 4096, 200 * KiB), (8 * MiB, 5 * MiB)]


def make_image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def expected_content(regions, byte: int, size: int = SIZE) -> bytearray:
    want = bytearray(size)
    for off, n in regions:
        want[off : off + n] = bytes([byte]) * n
    return want


class ServedImage:
    """Our NBDServer over a RawImage, in a trio loop on a background thread,
    so that blocking external tools can be run from the test body."""

    def __init__(self, path: Path, name: str = "disk", **server_kw):
        self.path = path
        self.name = name
        self.kw = server_kw
        self.changes: list[tuple[str, int]] = []
        self._started = threading.Event()
        self._error: BaseException | None = None

    def __enter__(self) -> "ServedImage":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self._started.wait(10):
            raise AssertionError("server thread did not start")
        if self._error:
            raise self._error
        return self

    def _run(self) -> None:
        async def main():
            self.node = RawImage(self.path)
            self.server = NBDServer(
                {self.name: self.node}, on_clients_changed=lambda n, c: self.changes.append((n, c)), **self.kw
            )
            self.token = trio.lowlevel.current_trio_token()
            try:
                async with trio.open_nursery() as nursery:
                    self.scope = nursery.cancel_scope
                    self.host, self.port = await nursery.start(self.server.serve, "127.0.0.1", 0)
                    self._started.set()
            finally:
                self.node.close()

        try:
            trio.run(main)
        except BaseException as exc:  # pragma: no cover - reported by __enter__/__exit__
            self._error = exc
            self._started.set()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.name}"

    def call(self, fn, *args):
        """Run ``fn(*args)`` in the server's trio thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    def __exit__(self, *exc) -> None:
        self.call(self.scope.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive(), "server thread did not stop"
        if self._error:
            raise self._error


def run(cmd: list[str], env=None, check=True, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


# -- peers: one adapter per real client ----------------------------------------------------
class QemuIo:
    tools = ("qemu-io",)

    def __init__(self, env, tmp_path):
        self.env = env

    def _io(self, uri, *cmds):
        args = ["qemu-io", "-f", "raw", uri]
        for c in cmds:
            args += ["-c", c]
        r = run(args, env=self.env)
        bad = [ln for ln in (r.stdout + r.stderr).splitlines() if "fail" in ln.lower() or "error" in ln.lower()]
        assert not bad, r.stdout + r.stderr
        return r

    def write(self, uri, regions, byte):
        cmds = []
        for i, (off, n) in enumerate(regions):
            cmds.append(f"write {'-f ' if i % 2 else ''}-P {byte:#x} {off} {n}")
        self._io(uri, *cmds, "flush")

    def verify(self, uri, regions, byte):
        self._io(uri, *[f"read -P {byte:#x} {off} {n}" for off, n in regions])

    def zero(self, uri, off, n):
        self._io(uri, f"write -z {off} {n}", f"read -P 0 {off} {n}")

    def trim(self, uri, off, n):
        self._io(uri, f"discard {off} {n}")


class NbdSh:
    tools = ("nbdsh",)

    def __init__(self, env, tmp_path):
        self.env = env

    def _sh(self, uri, code):
        run(["nbdsh", "-u", uri, "-c", code], env=self.env)

    def write(self, uri, regions, byte):
        code = "".join(f"h.pwrite(bytes([{byte}]) * {n}, {off})\n" for off, n in regions) + "h.flush()\n"
        self._sh(uri, code)

    def verify(self, uri, regions, byte):
        self._sh(uri, "".join(f"assert h.pread({n}, {off}) == bytes([{byte}]) * {n}\n" for off, n in regions))

    def zero(self, uri, off, n):
        self._sh(uri, f"h.zero({n}, {off})\nassert h.pread({n}, {off}) == bytes({n})\n")

    def trim(self, uri, off, n):
        self._sh(uri, f"h.trim({n}, {off})\n")


class LibNbd:
    """python3-libnbd in this process (asynchronous API: many commands in flight)."""

    tools = ()

    def __init__(self, env, tmp_path):
        try:
            import nbd
        except ImportError:
            pytest.skip("python3-libnbd is not importable (Debian: python3-libnbd)")
        self.nbd = nbd

    def _handle(self, uri):
        h = self.nbd.NBD()
        h.connect_uri(uri)
        return h

    def write(self, uri, regions, byte):
        h = self._handle(uri)
        try:
            # Pipeline 4 KiB writes over the first region, then the rest.
            off0, n0 = regions[0]
            buf = self.nbd.Buffer.from_bytearray(bytearray([byte]) * 4096)
            pending = {h.aio_pwrite(buf, off0 + i) for i in range(0, n0, 4096)}
            while pending:
                pending = {c for c in pending if not h.aio_command_completed(c)}
                if pending:
                    h.poll(-1)
            for off, n in regions[1:]:
                h.pwrite(bytes([byte]) * n, off, self.nbd.CMD_FLAG_FUA)
            h.flush()
        finally:
            h.shutdown()

    def verify(self, uri, regions, byte):
        h = self._handle(uri)
        try:
            for off, n in regions:
                assert h.pread(n, off) == bytes([byte]) * n
        finally:
            h.shutdown()

    def zero(self, uri, off, n):
        h = self._handle(uri)
        try:
            h.zero(n, off, self.nbd.CMD_FLAG_NO_HOLE)
            assert h.pread(n, off) == bytes(n)
        finally:
            h.shutdown()

    def trim(self, uri, off, n):
        h = self._handle(uri)
        try:
            h.trim(n, off)
        finally:
            h.shutdown()


class QemuImg:
    tools = ("qemu-img",)

    def __init__(self, env, tmp_path):
        self.env = env
        self.tmp = tmp_path

    def _source(self, regions, byte) -> str:
        path = self.tmp / f"source-{byte}.img"
        path.write_bytes(bytes(expected_content(regions, byte)))
        return str(path)

    def write(self, uri, regions, byte):
        run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", self._source(regions, byte), uri], env=self.env)

    def verify(self, uri, regions, byte):
        r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", self._source(regions, byte), uri], env=self.env)
        assert "identical" in r.stdout

    zero = None
    trim = None


PEERS = {"qemu-io": QemuIo, "nbdsh": NbdSh, "libnbd": LibNbd, "qemu-img": QemuImg}


@pytest.mark.parametrize("peer_name", list(PEERS))
def test_real_client_against_our_server(peer_name, tmp_path, require_tool, tool_env):
    peer_cls = PEERS[peer_name]
    require_tool(*peer_cls.tools)
    peer = peer_cls(tool_env, tmp_path)
    img = make_image(tmp_path / "disk.img")
    with ServedImage(img) as srv:
        peer.write(srv.uri, REGIONS, 0x22)
        peer.verify(srv.uri, REGIONS, 0x22)
        assert Path(img).read_bytes() == expected_content(REGIONS, 0x22)
        want = expected_content(REGIONS, 0x22)
        if peer.zero is not None:
            off, n = REGIONS[2][0] + 12345, 2 * MiB
            peer.zero(srv.uri, off, n)
            want[off : off + n] = bytes(n)
            off, n = REGIONS[1]
            peer.trim(srv.uri, off, n)
            want[off : off + n] = bytes(n)  # our RawImage punches holes
            assert Path(img).read_bytes() == want
        stats = srv.call(srv.server.statistics)
        assert stats["protocol_errors"] == 0 and stats["errors"] == 0
        assert stats["bytes_written"] >= sum(n for _, n in REGIONS)
    # every client connected, then left
    assert srv.changes and srv.changes[-1] == ("disk", 0)
    assert all(c in (0, 1) for _, c in srv.changes)


def test_metadata_seen_by_real_clients(tmp_path, require_tool, tool_env):
    require_tool("nbdinfo", "qemu-img")
    img = make_image(tmp_path / "disk.img", 3 * MiB + 512)
    with ServedImage(img) as srv:
        info = json.loads(run(["nbdinfo", "--json", srv.uri], env=tool_env).stdout)
        exp = info["exports"][0]
        assert info["protocol"] == "newstyle-fixed" and info["structured"] is False
        assert exp["export-size"] == 3 * MiB + 512
        assert exp["is_read_only"] is False
        assert exp["can_flush"] and exp["can_fua"] and exp["can_trim"] and exp["can_zero"]
        assert not exp["can_multi_conn"] and not exp["can_cache"] and not exp["can_fast_zero"]
        assert (exp["block_size_minimum"], exp["block_size_preferred"], exp["block_size_maximum"]) == (
            1,
            4096,
            32 * MiB,
        )
        listing = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{srv.port}"], env=tool_env).stdout
        assert [e["export-name"] for e in json.loads(listing)["exports"]] == ["disk"]
        qinfo = json.loads(run(["qemu-img", "info", "--output=json", srv.uri], env=tool_env).stdout)
        assert qinfo["virtual-size"] == 3 * MiB + 512


def test_read_only_server(tmp_path, require_tool, tool_env):
    require_tool("nbdinfo", "qemu-io")
    img = make_image(tmp_path / "disk.img", MiB)
    with ServedImage(img, read_only=True) as srv:
        exp = json.loads(run(["nbdinfo", "--json", srv.uri], env=tool_env).stdout)["exports"][0]
        assert exp["is_read_only"] is True
        r = run(["qemu-io", "-r", "-f", "raw", srv.uri, "-c", "read -P 0 0 64k"], env=tool_env)
        assert "read 65536/65536" in r.stdout

        async def force_write():
            with trio.fail_after(TIMEOUT):
                async with open_client("127.0.0.1", srv.port, "disk") as c:
                    assert c.read_only
                    with pytest.raises(BlockError) as info:
                        await c.write(0, b"x")
                    assert info.value.errno == errno.EPERM
                    c.read_only = False  # make the client send it anyway
                    for call in (c.write(0, b"x"), c.write_zeroes(0, 5), c.trim(0, 5)):
                        with pytest.raises(BlockError) as info:
                            await call
                        assert info.value.errno == errno.EPERM

        trio.run(force_write)
    assert Path(img).read_bytes() == bytes(MiB)


def test_unknown_export_named_in_real_client_errors(tmp_path, require_tool, tool_env):
    require_tool("qemu-io", "nbdinfo")
    img = make_image(tmp_path / "disk.img", MiB)
    with ServedImage(img) as srv:
        uri = f"nbd://127.0.0.1:{srv.port}/nope"
        r = run(["qemu-io", "-f", "raw", uri, "-c", "read 0 512"], env=tool_env, check=False)
        assert r.returncode != 0 and "no export named 'nope'" in r.stderr
        r = run(["nbdinfo", uri], env=tool_env, check=False)
        # libnbd maps NBD_REP_ERR_UNKNOWN to ENOENT and does not print our text
        assert r.returncode != 0 and "No such file or directory for export: nope" in r.stderr


# -- our client against real servers -------------------------------------------------------
SERVERS = {
    "qemu-nbd": (
        ("qemu-nbd",),
        lambda img: ["qemu-nbd", "--persistent", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", "{port}", str(img)],
        True,
    ),
    "qemu-nbd-discard": (
        ("qemu-nbd",),
        lambda img: ["qemu-nbd", "--persistent", "-f", "raw", "-x", "disk", "--discard=unmap", "--cache=none",
                     "-b", "127.0.0.1", "-p", "{port}", str(img)],
        True,
    ),
    "nbdkit-memory": (
        ("nbdkit",),
        lambda img: ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "{port}", "memory", str(SIZE)],
        False,
    ),
    "nbdkit-file": (
        ("nbdkit",),
        lambda img: ["nbdkit", "-f", "-i", "127.0.0.1", "-p", "{port}", "file", str(img)],
        True,
    ),
}


@pytest.mark.parametrize("kind", list(SERVERS))
def test_our_client_against_real_server(kind, tmp_path, require_tool, external_server):
    tools, argv, file_backed = SERVERS[kind]
    require_tool(*tools)
    img = make_image(tmp_path / "disk.img")
    port = external_server(argv(img))
    rng = random.Random(7)
    model = bytearray(SIZE)

    async def main():
        with trio.fail_after(TIMEOUT):
            async with open_client("127.0.0.1", port, "disk") as c:
                assert c.size == SIZE
                assert c.transmission_flags & P.NBD_FLAG_SEND_FLUSH
                # pipelined 4 KiB writes, replies matched by cookie
                blocks = rng.sample(range(SIZE // 4096), 256)

                async def put(b):
                    data = rng.randbytes(4096)
                    model[b * 4096 : (b + 1) * 4096] = data
                    await c.write(b * 4096, data)

                async with trio.open_nursery() as n:
                    for b in blocks:
                        n.start_soon(put, b)
                assert c.statistics()["in_flight"] == 0
                for b in blocks[:32]:
                    assert await c.read(b * 4096, 4096) == model[b * 4096 : (b + 1) * 4096]
                # unaligned, FUA, and a write larger than the 32 MiB request limit
                for off, n_, fua in ((123, 7777, False), (3 * MiB + 1, 70000, True), (20 * MiB, 40 * MiB, False)):
                    data = rng.randbytes(n_)
                    model[off : off + n_] = data
                    await c.write(off, data, fua=fua)
                    assert await c.read(off, n_) == data
                await c.write_zeroes(21 * MiB + 5, MiB)
                model[21 * MiB + 5 : 22 * MiB + 5] = bytes(MiB)
                assert await c.read(21 * MiB, 2 * MiB) == model[21 * MiB : 23 * MiB]
                await c.trim(30 * MiB, MiB)  # content afterwards is server-defined
                model[30 * MiB : 31 * MiB] = await c.read(30 * MiB, MiB)
                await c.flush()
                with pytest.raises(BlockError) as info:
                    await c.read(SIZE - 1, 2)
                assert info.value.errno == errno.EINVAL
                st = c.statistics()
                assert st["connected"] and st["errors"] == 0 and st["in_flight"] == 0
            assert not c.connected and c.statistics()["in_flight"] == 0

    trio.run(main)
    if file_backed:
        assert Path(img).read_bytes() == model


def test_our_client_refused_by_qemu_nbd(tmp_path, require_tool, external_server):
    require_tool("qemu-nbd")
    img = make_image(tmp_path / "disk.img", MiB)
    port = external_server(
        ["qemu-nbd", "--persistent", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", "{port}", str(img)]
    )

    async def main():
        with trio.fail_after(TIMEOUT):
            with pytest.raises(ExportRefusedError) as info:
                async with open_client("127.0.0.1", port, "nope"):
                    pass
            assert info.value.errno == errno.ENOENT
            assert "nope" in str(info.value) and "NBD_REP_ERR_UNKNOWN" in str(info.value)
            # the server is still fine
            async with open_client("127.0.0.1", port, "disk") as c:
                assert c.size == MiB

    trio.run(main)


def test_connect_errors(free_port):
    async def main():
        with trio.fail_after(TIMEOUT):
            with pytest.raises(BlockError) as info:
                async with open_client("127.0.0.1", free_port(), "x"):
                    pass
            assert info.value.errno == errno.ECONNREFUSED
            # a listener that never speaks: timeout
            listener = trio.socket.socket()
            await listener.bind(("127.0.0.1", 0))
            listener.listen()
            with listener:
                with pytest.raises(BlockError) as info:
                    await connect("127.0.0.1", listener.getsockname()[1], "x", connect_timeout=0.3)
                assert info.value.errno == errno.ETIMEDOUT

            # servers that hang up at once, or speak something else
            async def handler(stream, reply):
                async with stream:
                    await stream.send_all(reply)

            for reply, err, text in [(b"", errno.ECONNRESET, "closed the connection"),
                                     (b"HTTP/1.1 400 Bad Request\r\n\r\n", errno.EPROTO, "NBDMAGIC")]:
                async with trio.open_nursery() as n:
                    listeners = await n.start(
                        functools.partial(trio.serve_tcp, lambda st, r=reply: handler(st, r), 0, host="127.0.0.1")
                    )
                    port = listeners[0].socket.getsockname()[1]
                    with pytest.raises(BlockError, match=text) as info:
                        await connect("127.0.0.1", port, "x")
                    assert info.value.errno == err
                    n.cancel_scope.cancel()

    trio.run(main)


# -- server behaviour with our client, in one trio run ---------------------------------------
class MemNode(BlockNode):
    """A bytearray disk; optionally slow, failing, or recording its calls."""

    def __init__(self, size: int = 8 * MiB, name: str = "mem"):
        self.size = size
        self.name = name
        self.data = bytearray(size)
        self.log: list[tuple] = []
        self.gate: trio.Event | None = None  # writes wait for it when set
        self.delay = 0.0
        self.fail: dict[int, int] = {}  # offset -> errno

    async def _maybe(self, op, off):
        if off in self.fail:
            raise BlockError(self.fail[off], f"{self.name}: injected failure at {off}")
        if self.gate is not None and op == "write":
            await self.gate.wait()
        if self.delay and op == "write":
            await trio.sleep(self.delay)

    async def read(self, off, n):
        self.check_read(off, n)
        await self._maybe("read", off)
        return bytes(self.data[off : off + n])

    async def write(self, off, data, fua=False):
        self.check_write(off, len(data))
        self.log.append(("write-start", off, len(data)))
        await self._maybe("write", off)
        self.data[off : off + len(data)] = data
        self.log.append(("write-done", off, len(data), fua))

    async def write_zeroes(self, off, n, fua=False):
        self.check_write(off, n)
        await self._maybe("zero", off)
        self.data[off : off + n] = bytes(n)

    async def trim(self, off, n):
        self.check_write(off, n)
        self.data[off : off + n] = bytes(n)

    async def flush(self):
        self.log.append(("flush",))


async def wait_until(cond, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.005)


async def _serve(nursery, node, **kw):
    changes = []
    server = NBDServer({"disk": node}, on_clients_changed=lambda n, c: changes.append((n, c)), **kw)
    host, port = await nursery.start(server.serve, "127.0.0.1", 0)
    return server, port, changes


def test_second_client_refused_with_policy(tool_env):
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode()
                server, port, changes = await _serve(nursery, node, max_clients_per_export=1)
                async with open_client("127.0.0.1", port, "disk") as first:
                    await first.write(0, b"first")
                    with pytest.raises(ExportRefusedError) as info:
                        async with open_client("127.0.0.1", port, "disk"):
                            pass
                    assert info.value.errno == errno.EPERM
                    assert info.value.reply_type == P.NBD_REP_ERR_POLICY
                    assert "already has 1 client(s) connected (limit 1)" in str(info.value)
                    if shutil.which("qemu-io"):  # a real client shows our message too
                        r = await trio.run_process(
                            ["qemu-io", "-f", "raw", f"nbd://127.0.0.1:{port}/disk", "-c", "read 0 512"],
                            capture_stdout=True, capture_stderr=True, check=False, env=tool_env,
                        )
                        assert r.returncode != 0 and b"already has 1 client(s) connected" in r.stderr
                    # the refused attempts did not disturb the first client
                    assert await first.read(0, 5) == b"first"
                    assert server.clients("disk") == 1
                # once the first has gone, a new client is welcome
                await wait_until(lambda: server.clients("disk") == 0)
                async with open_client("127.0.0.1", port, "disk") as again:
                    assert await again.read(0, 5) == b"first"
                await wait_until(lambda: server.clients("disk") == 0)
                assert changes == [("disk", 1), ("disk", 0), ("disk", 1), ("disk", 0)]
                nursery.cancel_scope.cancel()

    trio.run(main)


def _handshake_bytes(name=b"disk") -> bytes:
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    return struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, P.NBD_OPT_GO, len(data)) + data


MALFORMED = {
    "bad-client-flags": struct.pack(">I", 0xFF),
    "bad-option-magic": struct.pack(">I", 3) + struct.pack(">QII", 0xDEADBEEF, P.NBD_OPT_GO, 0),
    "huge-option": struct.pack(">I", 3) + struct.pack(">QII", P.IHAVEOPT, 99, 1 << 30),
    "bad-request-magic": _handshake_bytes() + P.REQUEST.pack(0x12345678, 0, 0, 1, 0, 0),
    "oversized-write": _handshake_bytes() + P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, 1, 1, 0, 64 * MiB),
    "duplicate-cookie": _handshake_bytes()
    + P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, 3, 9, 0, 0) * 2,
}


async def _bad_peer(port: int, payload: bytes) -> bytes:
    """Send ``payload`` and read until the server closes; returns what came back."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = bytearray()
    async with stream:
        try:
            await stream.send_all(payload)
            while chunk := await stream.receive_some(65536):
                got += chunk
        except trio.BrokenResourceError:
            pass
    return bytes(got)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_peer_closes_only_its_connection(case, caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")

    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode()
                server, port, changes = await _serve(nursery, node)
                async with open_client("127.0.0.1", port, "disk") as good:
                    stop = trio.Event()
                    written = []

                    async def keep_writing():
                        i = 0
                        while not stop.is_set():
                            await good.write((i % 8192) * 512, bytes([i % 251 + 1]) * 512)
                            written.append(i)
                            i += 1
                            await trio.sleep(0)

                    async with trio.open_nursery() as n:
                        n.start_soon(keep_writing)
                        got = await _bad_peer(port, MALFORMED[case])
                        await trio.sleep(0.05)
                        stop.set()
                    assert got.startswith(struct.pack(">QQ", P.NBDMAGIC, P.IHAVEOPT))
                    assert written, "the good client made no progress"
                    for i in written[-8192:]:
                        assert await good.read((i % 8192) * 512, 512) == bytes([i % 251 + 1]) * 512
                assert server.protocol_errors == 1
                nursery.cancel_scope.cancel()

    trio.run(main)
    lines = [r for r in caplog.records if r.name == "replfs.nbd" and r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "protocol error" in lines[0].getMessage()


def _fuzz_request(rng: random.Random) -> bytes:
    """One request with random fields (never touching the good client's
    range, 4 MiB and up to 4 MiB + 2 MiB), sometimes corrupted."""
    length = rng.choice([0, 1, 512, 4096, 1 << 20, 1 << 31])
    cmd = rng.choice([0, 1, 1, 2, 3, 4, 5, 6, 7, rng.getrandbits(16)])
    off = rng.choice([0, 4096, rng.randrange(2 * MiB), 8 * MiB - 1, 1 << 62])
    magic = P.NBD_REQUEST_MAGIC if rng.random() < 0.95 else rng.getrandbits(32)
    out = P.REQUEST.pack(magic, rng.choice([0, 0, 1, 2, rng.getrandbits(16)]), cmd, rng.getrandbits(3), off, length)
    if cmd == 1 and length <= 4096:
        out += rng.randbytes(length if rng.random() < 0.8 else rng.randint(0, length))
    if rng.random() < 0.1:
        out = out[: rng.randint(0, len(out))]
    return out


def _fuzz_stream(rng: random.Random) -> bytes:
    """Random bytes shaped like NBD traffic: valid prefixes, random fields."""
    parts = []
    if rng.random() < 0.4:
        # A valid handshake, then requests.
        parts.append(_handshake_bytes() if rng.random() < 0.8 else struct.pack(">I", 3) + struct.pack(
            ">QII", P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 4) + b"disk")
        parts += [_fuzz_request(rng) for _ in range(rng.randint(0, 8))]
        return b"".join(parts)
    if rng.random() < 0.7:
        parts.append(struct.pack(">I", rng.choice([0, 1, 2, 3, 3, 3, rng.getrandbits(32)])))
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.randbytes(rng.randint(0, 40)))
        elif r < 0.7:
            opt = rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, rng.getrandbits(32)])
            data = rng.choice([b"disk", b"", rng.randbytes(rng.randint(0, 20))])
            if opt in (6, 7) and rng.random() < 0.7:
                infos = b"".join(struct.pack(">H", rng.randrange(5)) for _ in range(rng.randrange(3)))
                data = struct.pack(">I", len(data)) + data + struct.pack(">H", len(infos) // 2) + infos
            parts.append(struct.pack(">QII", P.IHAVEOPT, opt, len(data)) + data)
        else:
            parts.append(_fuzz_request(rng))
    return b"".join(parts)


def test_fuzz_server_with_random_peers_while_a_client_works():
    rng = random.Random(20240611)
    streams = [_fuzz_stream(rng) for _ in range(3000)]

    async def main():
        with trio.fail_after(TIMEOUT * 2):
            async with trio.open_nursery() as nursery:
                node = MemNode(8 * MiB)
                server, port, changes = await _serve(nursery, node, handshake_timeout=5)
                async with open_client("127.0.0.1", port, "disk") as good:
                    limiter = trio.CapacityLimiter(32)
                    done = 0

                    async def fuzz_one(payload):
                        nonlocal done
                        async with limiter:
                            stream = await trio.open_tcp_stream("127.0.0.1", port)
                            async with stream:
                                try:
                                    await stream.send_all(payload)
                                    # Half-close so the server sees EOF after the payload.
                                    await stream.send_eof()
                                    while await stream.receive_some(65536):
                                        pass
                                except (trio.BrokenResourceError, trio.ClosedResourceError):
                                    pass
                            done += 1

                    async def good_client():
                        for i in range(300):
                            await good.write(4 * MiB + i * 4096, bytes([i % 200 + 1]) * 4096)
                            await trio.sleep(0)

                    async with trio.open_nursery() as n:
                        n.start_soon(good_client)
                        for s in streams:
                            n.start_soon(fuzz_one, s)
                    assert done == len(streams)
                    for i in range(300):
                        assert await good.read(4 * MiB + i * 4096, 4096) == bytes([i % 200 + 1]) * 4096
                    st = server.statistics()
                    assert st["connections"] == 1  # only the good client is left
                    assert st["connections_total"] == len(streams) + 1
                    # most streams break the protocol somewhere; many got far
                    # enough to have requests answered
                    assert st["protocol_errors"] > len(streams) // 4
                    assert st["requests"] > 300 + len(streams) // 3
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_shutdown_refuses_new_clients_and_close_all_disconnects():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode()
                server, port, changes = await _serve(nursery, node)
                client = await connect("127.0.0.1", port, "disk", nursery=nursery)
                await client.write(0, b"abc")
                server.set_accepting(False)
                with pytest.raises(ExportRefusedError) as info:
                    await connect("127.0.0.1", port, "disk")
                assert info.value.errno == errno.ESHUTDOWN and "shutting down" in str(info.value)
                # existing client unaffected until close_all
                assert await client.read(0, 3) == b"abc"
                node.gate = trio.Event()  # hold the next write in the server

                async def blocked_write():
                    with pytest.raises(BlockError) as info:
                        await client.write(4096, b"x" * 8192)
                    assert info.value.errno == errno.ECONNRESET

                async with trio.open_nursery() as n:
                    n.start_soon(blocked_write)
                    await wait_until(lambda: ("write-start", 4096, 8192) in node.log)
                    assert client.statistics()["in_flight"] == 1
                    close = trio.Event()

                    async def closer():
                        await server.close_all()
                        close.set()

                    n.start_soon(closer)
                    await trio.sleep(0.05)
                    node.gate.set()  # let the server-side write finish
                    await close.wait()
                assert server.statistics()["connections"] == 0
                assert not client.connected
                with pytest.raises(BlockError) as info2:
                    await client.read(0, 1)
                assert info2.value.errno == errno.ECONNRESET
                server.set_accepting(True)
                async with open_client("127.0.0.1", port, "disk") as again:
                    assert await again.read(0, 3) == b"abc"
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_abort_fails_in_flight_requests_at_once():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode()
                node.gate = trio.Event()
                server, port, changes = await _serve(nursery, node)
                client = await connect("127.0.0.1", port, "disk", nursery=nursery)
                failures = []

                async def w(i):
                    try:
                        await client.write(i * 4096, b"y" * 4096)
                    except BlockError as exc:
                        failures.append(exc.errno)

                async with trio.open_nursery() as n:
                    for i in range(8):
                        n.start_soon(w, i)
                    # the first blocks the server (small writes run inline)
                    await wait_until(lambda: len(node.log) == 1)
                    assert client.statistics()["in_flight"] == 8
                    client.abort("test abort")
                assert failures == [errno.ESHUTDOWN] * 8
                with pytest.raises(BlockError, match="test abort") as info:
                    await client.flush()
                assert info.value.errno == errno.ESHUTDOWN
                node.gate.set()
                with trio.fail_after(5):
                    while server.statistics()["connections"]:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_flush_waits_for_earlier_writes_and_fua():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode(64 * MiB)
                node.delay = 0.02
                server, port, changes = await _serve(nursery, node, inline_max=64 * KiB)
                async with open_client("127.0.0.1", port, "disk") as c:
                    async with trio.open_nursery() as n:
                        for i in range(6):  # large -> spawned in the server, slow
                            n.start_soon(c.write, i * MiB, b"z" * MiB)
                        n.start_soon(c.write, 40 * MiB, b"f" * 4096, True)  # FUA -> spawned
                        await wait_until(lambda: c.statistics()["in_flight"] == 7)
                        n.start_soon(c.flush)
                flush_at = node.log.index(("flush",))
                done_before = [e for e in node.log[:flush_at] if e[0] == "write-done"]
                assert len(done_before) == 7, node.log
                assert ("write-done", 40 * MiB, 4096, True) in node.log
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_overlapping_writes_apply_in_order():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode(8 * MiB)
                node.delay = 0.01
                server, port, changes = await _serve(nursery, node, inline_max=64 * KiB)
                async with open_client("127.0.0.1", port, "disk") as c:
                    async with trio.open_nursery() as n:
                        n.start_soon(c.write, 0, b"A" * MiB)  # spawned (large)
                        await wait_until(lambda: ("write-start", 0, MiB) in node.log)
                        n.start_soon(c.write, 4096, b"B" * 4096)  # inline, overlaps
                    assert await c.read(4096, 4096) == b"B" * 4096
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_node_errors_map_to_errno():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode()
                node.fail = {0: errno.EIO, 512: errno.ENOSPC, 1024: errno.ENOENT, 1536: errno.EDQUOT,
                             2048: errno.ESHUTDOWN}
                server, port, changes = await _serve(nursery, node)
                async with open_client("127.0.0.1", port, "disk") as c:
                    for off, want in ((0, errno.EIO), (512, errno.ENOSPC), (1024, errno.EIO),
                                      (1536, errno.ENOSPC)):
                        with pytest.raises(BlockError) as info:
                            await c.write(off, b"q" * 10)
                        assert info.value.errno == want
                        assert "NBD_CMD_WRITE" in str(info.value)
                    with pytest.raises(BlockError) as info:
                        await c.read(0, 10)
                    assert info.value.errno == errno.EIO
                    assert await c.read(100, 5) == bytes(5)  # still working
                    # ESHUTDOWN from the server: the client disconnects softly.
                    with pytest.raises(BlockError) as info:
                        await c.write(2048, b"s")
                    assert info.value.errno == errno.ESHUTDOWN
                    with pytest.raises(BlockError):
                        await c.read(0, 1)
                    with trio.fail_after(5):
                        while c.connected:
                            await trio.sleep(0.01)
                assert server.statistics()["errors"] == 6
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_client_in_long_lived_nursery_survives_server_loss():
    """The primary's pattern: connect() into its own nursery; losing the
    server fails requests with ECONNRESET but never the nursery."""

    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as outer:
                async with trio.open_nursery() as server_nursery:
                    node = MemNode()
                    server, port, changes = await _serve(server_nursery, node)
                    client = await connect("127.0.0.1", port, "disk", nursery=outer)
                    await client.write(0, b"data")
                    server_nursery.cancel_scope.cancel()
                with pytest.raises(BlockError) as info:
                    with trio.fail_after(5):
                        while True:
                            await client.write(0, b"more")
                            await trio.sleep(0.01)
                assert info.value.errno == errno.ECONNRESET
                assert "nbd://127.0.0.1" in str(info.value)
                assert not client.connected and client.failure is not None
                await client.aclose()  # harmless after failure
                client.close()
            # the outer nursery ended normally: the client's tasks exited quietly

    trio.run(main)


def test_cancelled_request_does_not_break_the_connection():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                node = MemNode()
                node.gate = trio.Event()
                server, port, changes = await _serve(nursery, node)
                async with open_client("127.0.0.1", port, "disk") as c:
                    with trio.move_on_after(0.05) as scope:
                        await c.write(0, b"late")
                    assert scope.cancelled_caught
                    node.gate.set()  # its reply arrives later and is dropped
                    assert await c.read(0, 4) == b"late"
                    await c.write(8, b"next")
                    assert await c.read(8, 4) == b"next"
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_body_exception_passes_through_open_client_unwrapped():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                server, port, changes = await _serve(nursery, MemNode())
                with pytest.raises(KeyError):
                    async with open_client("127.0.0.1", port, "disk"):
                        raise KeyError("boom")
                with pytest.raises(ExportRefusedError):
                    async with open_client("127.0.0.1", port, "missing"):
                        pass
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_dynamic_exports():
    async def main():
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nodes = {"a": MemNode(MiB), "b": MemNode(2 * MiB)}
                server = NBDServer(nodes.get)
                host, port = await nursery.start(server.serve, "127.0.0.1", 0)
                async with open_client(host, port, "b") as c:
                    assert c.size == 2 * MiB
                with pytest.raises(ExportRefusedError, match="no export named 'c'"):
                    await connect(host, port, "c")
                nursery.cancel_scope.cancel()

    trio.run(main)
