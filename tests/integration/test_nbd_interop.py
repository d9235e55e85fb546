"""replfs's NBD server and client against real NBD peers over 127.0.0.1.

* our server (serving a RawImage) driven by qemu-io, qemu-img, nbdinfo,
  nbdsh and python3-libnbd;
* our client against qemu-nbd, ``nbdkit memory`` and ``nbdkit file``;
* the control channel (NBD_OPT_X_REPLFS, replfs's private extension): real
  servers answer it "unsupported" and carry on; real clients work beside an
  open control connection to our server.

Our server's own behaviour with our client (admission, malformed peers,
fuzzing, shutdown, abort, ordering, error mapping) is in
test_nbd_server_behaviour.py.
"""

from __future__ import annotations

import errno
import functools
import json
import random
import subprocess
import threading
from pathlib import Path

import pytest
import trio

from replfs.block.raw import RawImage
from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd._state import State
from replfs.nbd.client import ExportRefusedError, connect, open_client
from replfs.nbd.control import ControlUnsupported, open_control
from replfs.nbd.server import NBDServer
from tests.nbdserving import TIMEOUT, trio_run

pytestmark = pytest.mark.integration

KiB, MiB = 1024, 1024 * 1024
SIZE = 64 * MiB
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
        # a real client honours NBD_FLAG_READ_ONLY (ours: test_nbd_server_behaviour.py)
        r = run(["qemu-io", "-f", "raw", srv.uri, "-c", "write 0 512"], env=tool_env, check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr
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

    trio_run(main)
    if file_backed:
        assert Path(img).read_bytes() == model


def test_our_client_refused_by_qemu_nbd(tmp_path, require_tool, external_server):
    require_tool("qemu-nbd")
    img = make_image(tmp_path / "disk.img", MiB)
    port = external_server(
        ["qemu-nbd", "--persistent", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", "{port}", str(img)]
    )

    async def main():
        with pytest.raises(ExportRefusedError) as info:
            async with open_client("127.0.0.1", port, "nope"):
                pass
        assert info.value.errno == errno.ENOENT
        assert "nope" in str(info.value) and "NBD_REP_ERR_UNKNOWN" in str(info.value)
        # the server is still fine
        async with open_client("127.0.0.1", port, "disk") as c:
            assert c.size == MiB

    trio_run(main)


def test_connect_errors(free_port):
    async def main():
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

    trio_run(main)


# -- the control channel (NBD_OPT_X_REPLFS) and real peers ----------------------------------
@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit-memory"])
def test_control_against_real_server_is_unsupported(kind, tmp_path, require_tool, external_server):
    tools, argv, _ = SERVERS[kind]
    require_tool(*tools)
    port = external_server(argv(make_image(tmp_path / "disk.img")))

    async def main():
        ctl = await open_control("127.0.0.1", port)
        for _ in range(2):  # "unsupported", and the negotiation goes on
            with pytest.raises(ControlUnsupported) as info:
                await ctl.call({"op": "hello"})
            assert info.value.code == P.NBD_REP_ERR_UNSUP
            assert ctl.connected
        await ctl.aclose()  # NBD_OPT_ABORT, answered with NBD_REP_ACK
        assert ctl._core.state is State.CLOSED and ctl.failure.errno == errno.ESHUTDOWN
        # the server is still fine
        async with open_client("127.0.0.1", port, "disk") as c:
            await c.write(0, b"after")
            assert await c.read(0, 5) == b"after"

    trio_run(main)


def test_real_clients_beside_an_open_control_connection(tmp_path, require_tool, tool_env):
    require_tool("qemu-io", "nbdinfo")
    img = make_image(tmp_path / "disk.img", MiB)

    async def echo(request, peer):
        return {"echo": request}

    with ServedImage(img, control=echo, handshake_timeout=1.0) as srv:

        async def main():
            async with await open_control("127.0.0.1", srv.port) as ctl:
                assert await ctl.call({"n": 1}) == {"echo": {"n": 1}}
                r = await trio.run_process(["qemu-io", "-f", "raw", srv.uri, "-c", "write -P 0x5a 0 64k",
                                            "-c", "read -P 0x5a 0 64k"], capture_stdout=True, env=tool_env)
                assert b"read 65536/65536" in r.stdout
                r = await trio.run_process(["nbdinfo", "--json", srv.uri], capture_stdout=True, env=tool_env)
                assert json.loads(r.stdout)["exports"][0]["export-size"] == MiB
                await trio.sleep(1.2)  # past the handshake timeout: a control connection stays
                assert await ctl.call({"n": 2}) == {"echo": {"n": 2}}

        trio_run(main)
        stats = srv.call(srv.server.statistics)
        assert stats["protocol_errors"] == 0 and stats["control_calls"] == 2
    assert Path(img).read_bytes()[: 64 * KiB] == b"\x5a" * (64 * KiB)
