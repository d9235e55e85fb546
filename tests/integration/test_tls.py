"""TLS on the NBD link (NBD_OPT_STARTTLS, QEMU's credentials layout), --allow,
--insecure, and the connect/disconnect log.

* In one trio run: our server and our client (data and control channel)
  with TLS; unauthenticated clients refused (plain NBD, no certificate,
  another CA's certificate); a TLS client against a server without TLS; the
  host name check; --allow at accept; the log lines.
* Real processes: qemu-io, qemu-img and nbdinfo as TLS clients of a replfs
  secondary; a replfs pair with TLS; a replfs primary replicating to
  ``qemu-nbd --tls-creds``; the CLI's refusals (exit 2).

The certificates come from tests/tlscerts.py (openssl), made once per session.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess

import pytest
import trio

from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd.client import ExportRefusedError, connect
from replfs.nbd.control import ControlRefused, open_control
from replfs.nbd.tls import ClientTLS, client_context, server_context
from tests.conftest import BASE, PRIMARY, MiB, make_image, pread, pwrite
from tests.integration.test_cli import fails
from tests.integration.test_replication import fill, wait_for
from tests.nbdserving import MemNode, serving, trio_test
from tests.tlscerts import have_openssl, make_tls_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """``good``: CA A with server and client pairs; ``other``: CA B, likewise;
    ``foreign_client``: trusts CA A but its client certificate is CA B's."""
    if not have_openssl():
        pytest.skip("openssl is not installed")
    base = tmp_path_factory.mktemp("tls")
    good = make_tls_dir(base / "good")
    other = make_tls_dir(base / "other", client_cn="intruder")
    foreign = base / "foreign_client"
    shutil.copytree(other, foreign)
    shutil.copy(os.path.join(good, "ca-cert.pem"), foreign / "ca-cert.pem")
    return {"good": good, "other": other, "foreign_client": str(foreign)}


def no_cert_client(tls_dir: str) -> ClientTLS:
    """Trusts the CA, has no certificate of its own."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(os.path.join(tls_dir, "ca-cert.pem"))
    return ClientTLS(ctx)


async def echo(request: dict, peer: tuple) -> dict:
    return {"echo": request}


# -- in process: our server, our client ---------------------------------------------------
@trio_test()
async def test_data_and_control_channel_over_tls(certs, caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")
    node = MemNode(8 * MiB)
    creds = client_context(certs["good"])
    async with serving({"disk": node}, tls=server_context(certs["good"]), control=echo) as srv:
        async with srv.client(tls=creds) as c:
            # Large (payload decrypted straight into the core's buffer) and small.
            await c.write(0, fill(PRIMARY, 3 * MiB))
            await c.write(5 * MiB + 7, b"\x33" * 100, fua=True)
            assert await c.read(0, 3 * MiB) == fill(PRIMARY, 3 * MiB)
            # Pipelined: many requests in flight on the TLS stream at once.
            async with trio.open_nursery() as n:
                for i in range(32):
                    n.start_soon(c.write, 4 * MiB + i * 4096, bytes([i]) * 4096)
            for i in range(32):
                assert await c.read(4 * MiB + i * 4096, 4096) == bytes([i]) * 4096
            await c.flush()
        assert node.data[: 3 * MiB] == fill(PRIMARY, 3 * MiB)
        assert node.data[5 * MiB + 7 : 5 * MiB + 107] == b"\x33" * 100
        ctl = await srv.control(tls=creds)
        assert await ctl.call({"op": "a"}) == {"echo": {"op": "a"}}
        await trio.sleep(0.2)  # idle: the watcher waits on the TLS stream
        assert ctl.connected
        assert await ctl.call({"op": "b", "blob": "x" * (2 * MiB)}) == {"echo": {"op": "b", "blob": "x" * (2 * MiB)}}
        await ctl.aclose()
        st = srv.server.statistics()
        assert st["tls"] is True and st["control_calls"] == 2 and st["tls_failures"] == 0
    text = caplog.text
    assert "client certificate CN=replfs-primary" in text
    assert "(CN=replfs-primary): disconnected" in text
    assert ": connected" in text


@trio_test()
async def test_plain_clients_are_refused(certs, caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")
    node = MemNode(MiB)
    async with serving({"disk": node}, tls=server_context(certs["good"]), control=echo) as srv:
        # NBD_OPT_GO without TLS: NBD_REP_ERR_TLS_REQD.
        with pytest.raises(ExportRefusedError) as info:
            await connect(srv.host, srv.port, "disk", connect_timeout=5)
        assert info.value.reply_type == P.NBD_REP_ERR_TLS_REQD
        # The control channel too.
        ctl = await open_control(srv.host, srv.port, connect_timeout=5)
        with pytest.raises(ControlRefused) as refused:
            await ctl.call({"op": "hello"})
        assert refused.value.code == P.NBD_REP_ERR_TLS_REQD
        ctl.abort()
        # NBD_OPT_EXPORT_NAME cannot be refused with an error: the session ends.
        stream = await trio.open_tcp_stream(srv.host, srv.port)
        async with stream:
            greeting = await stream.receive_some(P.GREETING.size)
            assert len(greeting) == P.GREETING.size
            await stream.send_all(P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)
                                  + P.OPTION_HEADER.pack(P.IHAVEOPT, P.NBD_OPT_EXPORT_NAME, 4) + b"disk")
            assert await stream.receive_some(1024) == b""
        assert node.log == []
        assert srv.server.clients("disk") == 0
    assert "NBD_OPT_EXPORT_NAME without TLS" in caplog.text


@trio_test()
async def test_clients_without_a_good_certificate_are_refused(certs, caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")
    node = MemNode(MiB)
    async with serving({"disk": node}, tls=server_context(certs["good"]), control=echo) as srv:
        # No client certificate: the server refuses the handshake.
        with pytest.raises(BlockError) as info:
            await connect(srv.host, srv.port, "disk", connect_timeout=5, tls=no_cert_client(certs["good"]))
        assert info.value.errno == errno.EACCES and "TLS failed" in str(info.value)
        # A client certificate from another CA (it trusts our server, though).
        # In TLS 1.3 the client's handshake ends before the server has checked
        # its certificate: the refusal shows at the first call.
        with pytest.raises(BlockError) as info:
            ctl = await open_control(srv.host, srv.port, connect_timeout=5,
                                     tls=client_context(certs["foreign_client"]))
            try:
                await ctl.call({"op": "hello"}, timeout=5)
            finally:
                ctl.abort()
        assert info.value.errno == errno.EACCES and "TLS" in str(info.value)
        # A client of another CA altogether refuses our server's certificate.
        with pytest.raises(BlockError) as info:
            await connect(srv.host, srv.port, "disk", connect_timeout=5, tls=client_context(certs["other"]))
        assert info.value.errno == errno.EACCES and "CERTIFICATE_VERIFY_FAILED" in str(info.value)
        with trio.fail_after(5):
            while srv.server.statistics()["tls_failures"] < 3:
                await trio.sleep(0.01)
        assert node.log == []
    assert caplog.text.count("TLS handshake failed") == 3


@trio_test()
async def test_tls_client_does_not_fall_back_to_plain(certs):
    async with serving({"disk": MemNode(MiB)}, control=echo) as srv:
        with pytest.raises(BlockError) as info:
            await connect(srv.host, srv.port, "disk", connect_timeout=5, tls=client_context(certs["good"]))
        assert info.value.errno == errno.EPROTONOSUPPORT
        assert "does not offer TLS" in str(info.value) and "NBD_REP_ERR_UNSUP" in str(info.value)


@trio_test()
async def test_host_name_check_when_asked(certs):
    async with serving({"disk": MemNode(MiB)}, tls=server_context(certs["good"])) as srv:
        async with srv.client(tls=client_context(certs["good"], "localhost")) as c:
            assert await c.read(0, 4) == bytes(4)
        with pytest.raises(BlockError) as info:
            await connect(srv.host, srv.port, "disk", connect_timeout=5,
                          tls=client_context(certs["good"], "elsewhere.example"))
        assert info.value.errno == errno.EACCES and "elsewhere.example" in str(info.value)


@trio_test()
async def test_allow_closes_other_addresses_at_accept(caplog):
    caplog.set_level(logging.INFO, logger="replfs.nbd")
    async with serving({"disk": MemNode(MiB)}, allow=["10.0.0.0/8", "::1/128"]) as srv:
        with pytest.raises(BlockError):
            await connect(srv.host, srv.port, "disk", connect_timeout=5)
        assert srv.server.statistics()["connections_refused"] == 1
        assert srv.server.statistics()["connections_total"] == 0
    assert "address not allowed (--allow)" in caplog.text and "127.0.0.1" in caplog.text
    async with serving({"disk": MemNode(MiB)}, allow=["127.0.0.0/8"]) as srv:
        async with srv.client() as c:
            await c.write(0, b"ok")
        assert srv.server.statistics()["connections_refused"] == 0


# -- real processes ----------------------------------------------------------------------
def tool(argv, env, check=True, timeout=60):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"{argv[0]} -> {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def qemu_tls(tls_dir: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir}"]


def test_qemu_tools_and_nbdinfo_read_a_tls_secondary(pair, certs, require_tool, tool_env, tmp_path):
    require_tool("qemu-io", "qemu-img", "nbdinfo")
    pair.images({"disk0": 4 * MiB})
    s = pair.start_secondary("--tls-dir", certs["good"])
    port = int(s.status()["listen"].rsplit(":", 1)[1])
    opts = f"driver=nbd,host=127.0.0.1,port={port},export=disk0,tls-creds=tls0"
    r = tool(["qemu-io", *qemu_tls(certs["good"]), "-r", "--image-opts", opts,
              "-c", "read -P 0x11 0 1M"], tool_env)
    assert "read 1048576/1048576" in r.stdout and "Pattern verification failed" not in r.stdout
    r = tool(["qemu-img", "info", *qemu_tls(certs["good"]), "--image-opts", opts], tool_env)
    assert str(4 * MiB) in r.stdout
    out = tmp_path / "copy.raw"
    tool(["qemu-img", "convert", *qemu_tls(certs["good"]), "--image-opts", opts, "-O", "raw", str(out)], tool_env)
    assert pread(out, 0, 4 * MiB) == bytes([BASE]) * (4 * MiB)
    r = tool(["nbdinfo", f"nbds://127.0.0.1:{port}/disk0?tls-certificates={certs['good']}"], tool_env)
    assert str(4 * MiB) in r.stdout
    # Without TLS, or with another CA's credentials, nothing gets through.
    plain = f"driver=nbd,host=127.0.0.1,port={port},export=disk0"
    assert tool(["qemu-io", "-r", "--image-opts", plain, "-c", "read 0 4k"], tool_env, check=False).returncode != 0
    assert tool(["nbdinfo", f"nbd://127.0.0.1:{port}/disk0"], tool_env, check=False).returncode != 0
    r = tool(["qemu-io", *qemu_tls(certs["other"]), "-r", "--image-opts", opts, "-c", "read 0 4k"],
             tool_env, check=False)
    assert r.returncode != 0
    r = tool(["nbdinfo", f"nbds://127.0.0.1:{port}/disk0?tls-certificates={certs['foreign_client']}"],
             tool_env, check=False)
    assert r.returncode != 0
    log = s.log_text()
    assert "TLS (TLSv1." in log and "client certificate CN=replfs-primary" in log
    assert "TLS handshake failed" in log
    assert "(CN=replfs-primary): disconnected" in log


def test_replfs_pair_over_tls(pair, certs):
    pair.images({"disk0": 8 * MiB})
    s = pair.start_secondary("--tls-dir", certs["good"])
    p = pair.start_primary("--tls-dir", certs["good"], "--tls-hostname", "localhost")
    wait_for(lambda: s.status()["peer_connected"], what="peer")
    assert p.status()["generation_check"] == "ok"  # the control channel went over TLS
    pwrite(p.file("disk0"), MiB, fill(PRIMARY), fsync=True)
    assert pread(pair.simgs["disk0"], MiB, MiB) == fill(PRIMARY)
    pair.checkpoint()
    assert pread(s.file("disk0"), MiB, MiB) == fill(PRIMARY)
    log = s.log_text()
    assert log.count("client certificate CN=replfs-primary") >= 2  # control + data
    assert "control connection" in log


def test_primary_and_secondary_disagreeing_on_tls_do_not_talk(pair, certs, tmp_path):
    pair.images({"disk0": 4 * MiB})
    s = pair.start_secondary("--tls-dir", certs["good"])
    listen = s.status()["listen"]
    m = tmp_path / "pm"
    m.mkdir()
    fails("primary", m, "--secondary", listen, "--disk", f"disk0={pair.pimgs['disk0']}",
                 status=1, says=["TLS is required", "--tls-dir"])
    fails("primary", m, "--secondary", listen, "--disk", f"disk0={pair.pimgs['disk0']}",
          "--tls-dir", certs["other"], status=75, says=["TLS failed", "CERTIFICATE_VERIFY_FAILED"])
    assert not os.path.ismount(m)
    assert not s.status()["peer_connected"]
    assert pread(pair.simgs["disk0"], 0, MiB) == fill(BASE)


def test_tls_primary_refuses_a_plain_secondary(pair, certs):
    pair.images({"disk0": 4 * MiB})
    pair.start_secondary()
    with pytest.raises(AssertionError) as info:
        pair.start_primary("--tls-dir", certs["good"])
    assert "does not offer TLS" in str(info.value)


def test_primary_replicates_to_qemu_nbd_with_tls(certs, external_server, require_tool, tmp_path):
    require_tool("qemu-nbd")
    from tests.conftest import Mount, have_fuse, replfs_cmd

    reason = have_fuse()
    if reason:
        pytest.skip(reason)
    simg = make_image(tmp_path / "s.img", 4 * MiB)
    pimg = make_image(tmp_path / "p.img", 4 * MiB)
    port = external_server(["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={certs['good']}",
                            "--tls-creds", "tls0", "--persistent", "--shared=4", "-f", "raw", "-x", "disk0",
                            "-b", "127.0.0.1", "-p", "{port}", simg])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = Mount(mnt, tmp_path / "primary.log")
    try:
        replfs_cmd("primary", mnt, "--secondary", f"127.0.0.1:{port}", "--disk", f"disk0={pimg}",
                   "--tls-dir", certs["good"], "--log", m.log)
        m.pid = m.status()["pid"]
        assert m.status()["peer_connected"] is True
        assert m.status()["generation_check"].startswith("skipped")
        pwrite(m.file("disk0"), 2 * MiB, fill(PRIMARY), fsync=True)
        assert pread(simg, 2 * MiB, MiB) == fill(PRIMARY)
        assert pread(simg, 0, MiB) == fill(BASE)
    finally:
        m.unmount()
    assert not m.alive()


# -- the command line ----------------------------------------------------------------------
@pytest.fixture
def img(tmp_path):
    return make_image(tmp_path / "a.img", MiB)


@pytest.fixture
def mnt(tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    return str(d)


@pytest.mark.parametrize("listen", ["0.0.0.0:10809", "[::]:10809"])
def test_non_loopback_listen_needs_tls_or_insecure(img, mnt, listen):
    line = fails("secondary", mnt, "--listen", listen, "--disk", f"d={img}", says=["--tls-dir", "--insecure"])
    assert "loopback" in line
    assert not os.path.ismount(mnt)


def test_insecure_starts_on_all_interfaces(pair):
    pair.images({"disk0": MiB})
    s = pair.start_secondary("--insecure", listen="0.0.0.0:0")
    assert s.status()["listen"].startswith("0.0.0.0:")


def test_bad_tls_and_allow_arguments(img, mnt, tmp_path, certs):
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          "--tls-dir", tmp_path / "nope", says=["--tls-dir", "not a directory"])
    client_only = make_tls_dir(tmp_path / "client-only", server=False, ca_from=certs["good"])
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          "--tls-dir", client_only, says=["server-cert.pem"])
    server_only = make_tls_dir(tmp_path / "server-only", client=False, ca_from=certs["good"])
    fails("primary", mnt, "--secondary", "127.0.0.1:1", "--disk", f"d={img}",
          "--tls-dir", server_only, says=["client-cert.pem"])
    fails("primary", mnt, "--secondary", "127.0.0.1:1", "--disk", f"d={img}",
          "--tls-hostname", "x", says=["--tls-hostname needs --tls-dir"])
    fails("secondary", mnt, "--listen", "127.0.0.1:0", "--disk", f"d={img}",
          "--allow", "10.0.0.300/8", says=["--allow", "10.0.0.300/8"])
    assert not os.path.ismount(mnt)


def test_allow_on_a_secondary(pair):
    pair.images({"disk0": 4 * MiB})
    s = pair.start_secondary("--allow", "192.0.2.0/24")
    with pytest.raises(AssertionError):
        pair.start_primary()
    assert "address not allowed (--allow)" in s.log_text()
    pair.primary = None
