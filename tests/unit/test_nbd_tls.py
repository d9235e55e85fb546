"""NBD_OPT_STARTTLS in the sans-IO cores, and the credentials directory
(replfs.nbd.tls), socket-free.  The TLS sessions themselves, against our
server, qemu-nbd, qemu-img and nbdinfo: tests/integration/test_tls.py."""

from __future__ import annotations

import os
import shutil
import ssl

import pytest

from replfs.nbd import NEED_DATA, PAUSED, ClientConnection, ServerConnection
from replfs.nbd import ClientFlags, ExportInfo, Greeting, OptAck, OptionError
from replfs.nbd import LocalProtocolError, OptGo, OptInvalid, OptPrivate, OptUnknown
from replfs.nbd import proto as P
from replfs.nbd._events import OptStartTLS
from replfs.nbd._state import State
from replfs.nbd import tls
from tests.tlscerts import have_openssl, make_tls_dir


def events(conn) -> list:
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA or ev is PAUSED:
            return out
        out.append(ev)


def greeted(*, tls_on=True, control=False):
    s, c = ServerConnection(tls=tls_on, control=control), ClientConnection()
    c.receive_data(s.send(Greeting()))
    assert events(c) == [Greeting()]
    s.receive_data(c.send(ClientFlags()))
    assert events(s) == [ClientFlags()]
    return s, c


def raw_option(option: int, data: bytes = b"") -> bytes:
    return P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data


# -- the cores -----------------------------------------------------------------------
@pytest.mark.parametrize("step", [None, 1, 3])
def test_starttls_round_trip_keeps_haggling(step):
    s, c = greeted()
    data = c.send(OptStartTLS())
    assert data == raw_option(P.NBD_OPT_STARTTLS)
    if step is None:
        s.receive_data(data)
        got = events(s)
    else:
        got = []
        for i in range(0, len(data), step):
            s.receive_data(data[i : i + step])
            got += events(s)
    assert got == [OptStartTLS()]
    assert s.next_event() is PAUSED
    reply = s.send(OptAck(P.NBD_OPT_STARTTLS))
    assert reply == P.OPTION_REPLY_HEADER.pack(P.OPTION_REPLY_MAGIC, P.NBD_OPT_STARTTLS, P.NBD_REP_ACK, 0)
    assert s.state is State.OPTIONS
    c.receive_data(reply)
    assert events(c) == [OptAck(P.NBD_OPT_STARTTLS)]
    assert c.state is State.OPTIONS
    # Haggling goes on (inside TLS, which the cores never see).
    s.receive_data(c.send(OptGo("disk")))
    assert events(s) == [OptGo("disk")]
    c.receive_data(s.send(ExportInfo(4096, 0)))
    assert events(c) == [ExportInfo(4096, P.NBD_FLAG_HAS_FLAGS)]
    assert s.in_transmission and c.in_transmission


def test_bytes_pipelined_after_starttls_belong_to_tls():
    s, c = greeted()
    hello = b"\x16\x03\x01 a TLS ClientHello"
    s.receive_data(c.send(OptStartTLS()) + hello)
    assert events(s) == [OptStartTLS()]
    ack = s.send(OptAck(P.NBD_OPT_STARTTLS))
    assert s.take_pending_bytes() == hello
    assert s.take_pending_bytes() == b""
    c.receive_data(ack + b"\x16\x03\x03 a ServerHello")
    assert c.next_event() == OptAck(P.NBD_OPT_STARTTLS)  # then the client stops parsing
    assert c.take_pending_bytes() == b"\x16\x03\x03 a ServerHello"
    assert c.next_event() is PAUSED


def test_take_pending_bytes_only_between_options():
    s, c = greeted()
    s.receive_data(c.send(OptStartTLS()))
    events(s)
    with pytest.raises(LocalProtocolError):
        s.take_pending_bytes()  # the option is not answered yet


def test_starttls_with_data_is_invalid_and_haggling_goes_on():
    s, _ = greeted()
    s.receive_data(raw_option(P.NBD_OPT_STARTTLS, b"x"))
    (ev,) = events(s)
    assert type(ev) is OptInvalid and ev.option == P.NBD_OPT_STARTTLS
    s.send(OptionError(P.NBD_REP_ERR_INVALID, ev.reason))
    assert s.state is State.OPTIONS


def test_without_tls_starttls_is_an_unknown_option():
    s, c = greeted(tls_on=False)
    s.receive_data(c.send(OptStartTLS()))
    assert events(s) == [OptUnknown(P.NBD_OPT_STARTTLS)]
    with pytest.raises(LocalProtocolError):
        s.send(OptAck(P.NBD_OPT_STARTTLS))


def test_client_reads_a_refusal_of_starttls():
    s, c = greeted(tls_on=False)
    s.receive_data(c.send(OptStartTLS()))
    events(s)
    c.receive_data(s.send(OptionError(P.NBD_REP_ERR_UNSUP, "no TLS here")))
    assert events(c) == [OptionError(P.NBD_REP_ERR_UNSUP, "no TLS here", P.NBD_OPT_STARTTLS)]
    assert c.state is State.OPTIONS


def test_tls_required_answers_and_export_name_ends_the_session():
    s, c = greeted()
    s.receive_data(c.send(OptGo("disk")))
    events(s)
    c.receive_data(s.send(OptionError(P.NBD_REP_ERR_TLS_REQD, "TLS first")))
    (ev,) = events(c)
    assert ev.reply_type == P.NBD_REP_ERR_TLS_REQD and ev.reply_name == "NBD_REP_ERR_TLS_REQD"
    # NBD_OPT_EXPORT_NAME cannot carry the error: the session ends.
    s.receive_data(raw_option(P.NBD_OPT_EXPORT_NAME, b"disk"))
    events(s)
    assert s.send(OptionError(P.NBD_REP_ERR_TLS_REQD, "TLS first")) == b""
    assert s.closed


def test_control_option_recognised_only_once_switched_on():
    """The server enables the control option after TLS: before, it is an
    unknown option under the ordinary 64 KiB limit."""
    s, c = greeted(control=False)
    s.receive_data(c.send(OptPrivate(b"{}")))
    assert events(s) == [OptUnknown(P.NBD_OPT_X_REPLFS, b"{}")]
    s.send(OptionError(P.NBD_REP_ERR_TLS_REQD, "TLS first"))
    s.control = True
    s.receive_data(raw_option(P.NBD_OPT_X_REPLFS, b"{}"))
    assert events(s) == [OptPrivate(b"{}")]


def test_a_bare_ack_answers_only_abort_or_starttls():
    s, c = greeted()
    s.receive_data(c.send(OptGo("disk")))
    events(s)
    with pytest.raises(LocalProtocolError):
        s.send(OptAck(P.NBD_OPT_STARTTLS))


# -- the credentials directory -----------------------------------------------------------
@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    if not have_openssl():
        pytest.skip("openssl is not installed")
    return make_tls_dir(tmp_path_factory.mktemp("tls"))


def test_contexts_verify_both_ways(creds):
    server = tls.server_context(creds)
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    client = tls.client_context(creds)
    assert client.context.verify_mode == ssl.CERT_REQUIRED and not client.context.check_hostname
    named = tls.client_context(creds, "localhost")
    assert named.context.check_hostname and named.hostname == "localhost"


@pytest.mark.parametrize("missing, role", [
    ("ca-cert.pem", "server"), ("server-cert.pem", "server"), ("server-key.pem", "server"),
    ("client-cert.pem", "client"), ("client-key.pem", "client"),
])
def test_a_missing_file_is_named(creds, tmp_path, missing, role):
    d = tmp_path / "d"
    shutil.copytree(creds, d)
    os.unlink(d / missing)
    build = tls.server_context if role == "server" else tls.client_context
    with pytest.raises(tls.TLSConfigError, match=missing):
        build(str(d))


def test_bad_files_and_directories(creds, tmp_path):
    with pytest.raises(tls.TLSConfigError, match="not a directory"):
        tls.server_context(str(tmp_path / "nope"))
    d = tmp_path / "d"
    shutil.copytree(creds, d)
    shutil.copy(d / "client-key.pem", d / "server-key.pem")  # a key of another certificate
    with pytest.raises(tls.TLSConfigError, match="server-cert.pem"):
        tls.server_context(str(d))
    (d / "ca-cert.pem").write_text("not a certificate\n")
    with pytest.raises(tls.TLSConfigError, match="ca-cert.pem"):
        tls.client_context(str(d))


def test_subject_cn_and_error_text():
    cert = {"subject": ((("organizationName", "x"),), (("commonName", "primary-a"),))}
    assert tls.subject_cn(cert) == "primary-a"
    assert tls.subject_cn(None) is None
    exc = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required (_ssl.c:2580)")
    assert "(_ssl.c" not in tls.describe_ssl_error(exc)
