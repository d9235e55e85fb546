"""TLS for the NBD link: NBD_OPT_STARTTLS's I/O side.

Design note
-----------
The NBD document ("TLS support") upgrades a connection in place: the client
sends ``NBD_OPT_STARTTLS``, the server answers ``NBD_REP_ACK``, and from the
next byte on the same TCP stream carries TLS records, inside which option
haggling goes on.  The sans-IO core (``connection.py``) only parses the
plaintext on either side; this module does the rest:

* **Credentials** in QEMU's directory layout (``tls-creds-x509``'s ``dir``),
  so one directory serves replfs, qemu-nbd, qemu-img and nbdinfo
  (``tls-certificates=DIR``): ``ca-cert.pem``, ``server-cert.pem``,
  ``server-key.pem``, ``client-cert.pem``, ``client-key.pem`` and, when
  present, ``ca-crl.pem``.  Both sides verify: the server *requires* a client
  certificate signed by the CA (QEMU's ``verify-peer=on``), the client
  verifies the server's chain against the CA.  TLS 1.2 at least (the
  document: MUST support 1.2, older SHOULD NOT be on by default).
* **Host names**: QEMU and libnbd also check the server certificate against
  the host name they connected to.  replfs checks the chain by default and
  the name only when asked (:class:`ClientTLS` ``hostname``; the CLI's
  ``--tls-hostname``): a pair's CA is normally private to the pair, so any
  certificate it signed *is* the peer, and a secondary reached by an address
  that is not in its certificate (a NAT, a second interface) keeps working.
* **No layer when TLS is off.**  :class:`TLSSocket` has the methods of
  ``_sockio.FastSocket`` (``feed``, ``send_buffers``, ``send_cancellable``,
  ``send_nowait``, ``wait_readable``, ``close``, ``sock``, ``peer``), and a
  connection *replaces* its FastSocket by one after the STARTTLS reply; the
  server, the client and the control channel run the same code either way,
  and a plain connection never touches this module.
* **ssl.SSLObject over memory BIOs**, driven with the same trio low-level
  waits as FastSocket (not ``trio.SSLStream``, whose stream interface would
  need a second receive path): received ciphertext goes into the incoming
  BIO, plaintext comes out with ``read`` (straight into the core's payload
  buffer for large payloads, as ``recv_into`` does on a plain socket);
  outgoing plaintext is encrypted synchronously into the outgoing BIO, so a
  message is whole in the TLS stream before any wait.  One task at a time
  drains the outgoing BIO to the socket (``_draining``); another sender
  parks until it is done, so ciphertext never interleaves.  Draining is
  shielded from cancellation in ``send_buffers`` exactly as FastSocket's
  waits are (a reply is sent whole or the connection is closed).
* **Post-handshake records** (TLS 1.3 session tickets from a GnuTLS
  server, key updates) carry no NBD bytes: ``feed`` and ``wait_readable``
  keep reading until there is plaintext or the end of the stream.  Our
  server issues no tickets (``num_tickets = 0``): nothing reaches an idle
  control connection after the handshake.
* **Closing** sends close_notify when the stream is at a record boundary
  (nothing half-sent), as the document asks ("close down the TLS session,
  then close the TCP connection"); a TLS error or an end of stream without
  close_notify is an end of file for the core, which knows whether that end
  was clean.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass

import trio

from replfs.nbd._sockio import _STREAK, RECV_SIZE

__all__ = [
    "ClientTLS",
    "TLSConfigError",
    "TLSSocket",
    "client_context",
    "describe_ssl_error",
    "server_context",
    "start_client_tls",
    "start_server_tls",
    "CA_CERT",
    "SERVER_CERT",
    "SERVER_KEY",
    "CLIENT_CERT",
    "CLIENT_KEY",
    "CA_CRL",
]

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
#: Plaintext handed to ``SSLObject.write`` at once.
_WRITE_CHUNK = 256 * 1024


class TLSConfigError(ValueError):
    """A credentials directory that cannot be used; ``str()`` says why."""


@dataclass(frozen=True)
class ClientTLS:
    """What a client needs to start TLS: the context, and the name to check
    the server certificate against (None: the chain only, see the note)."""

    context: ssl.SSLContext
    hostname: str | None = None


def _path(tls_dir: str, name: str) -> str:
    path = os.path.join(tls_dir, name)
    if not os.path.isfile(path):
        raise TLSConfigError(
            f"TLS directory {tls_dir}: {name} is missing (QEMU's layout: {CA_CERT}, "
            f"{SERVER_CERT} and {SERVER_KEY} for a server, {CLIENT_CERT} and {CLIENT_KEY} "
            f"for a client)"
        )
    return path


def _load(ctx: ssl.SSLContext, tls_dir: str, cert: str, key: str) -> None:
    if not os.path.isdir(tls_dir):
        raise TLSConfigError(f"TLS directory {tls_dir}: not a directory")
    ca, certfile, keyfile = _path(tls_dir, CA_CERT), _path(tls_dir, cert), _path(tls_dir, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"TLS directory {tls_dir}: cannot load {CA_CERT}: {exc}") from None
    try:
        ctx.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"TLS directory {tls_dir}: cannot load {cert} with {key}: {exc}") from None
    crl = os.path.join(tls_dir, CA_CRL)
    if os.path.isfile(crl):
        try:
            ctx.load_verify_locations(cafile=crl)
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"TLS directory {tls_dir}: cannot load {CA_CRL}: {exc}") from None
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(tls_dir: str) -> ssl.SSLContext:
    """The server's context: its certificate, and a client certificate
    signed by the CA required.  Raises :class:`TLSConfigError`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load(ctx, tls_dir, SERVER_CERT, SERVER_KEY)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0  # no resumption: nothing to read after the handshake
    return ctx


def client_context(tls_dir: str, hostname: str | None = None) -> ClientTLS:
    """The client's credentials: its certificate, the server's chain checked
    against the CA, and its name against ``hostname`` when given.  Raises
    :class:`TLSConfigError`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _load(ctx, tls_dir, CLIENT_CERT, CLIENT_KEY)
    ctx.check_hostname = hostname is not None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ClientTLS(ctx, hostname)


def describe_ssl_error(exc: BaseException) -> str:
    """One line for a TLS failure: OpenSSL's reason and, for a refused
    certificate, why (without the ``(_ssl.c:NNN)`` tail)."""
    detail = getattr(exc, "verify_message", None)
    reason = getattr(exc, "reason", None)
    if reason and detail:
        return f"{reason}: {detail}"
    text = str(exc)
    if "(_ssl.c:" in text:
        text = text[: text.rindex("(_ssl.c:")].rstrip()
    return text or type(exc).__name__


def subject_cn(cert: dict | None) -> str | None:
    """The commonName of a certificate as ``getpeercert()`` gives it."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class TLSSocket:
    """A TLS session on a connected socket, with FastSocket's interface
    (see the module's note).  Built by :func:`start_server_tls` /
    :func:`start_client_tls`, which take over the FastSocket's socket."""

    __slots__ = ("sock", "peer", "peer_cn", "version", "_obj", "_in", "_out", "_unsent",
                 "_draining", "_lot", "_plain", "_eof", "_streak", "_open")

    def __init__(self, fast, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO):
        self.sock = fast.sock
        self.peer = fast.peer
        #: The peer certificate's commonName (after the handshake).
        self.peer_cn: str | None = None
        #: The TLS version in use (after the handshake).
        self.version: str | None = None
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._unsent: memoryview | None = None
        self._draining = False
        self._lot = trio.lowlevel.ParkingLot()
        self._plain = b""
        self._eof = False
        self._streak = 0
        self._open = False  # the handshake is done

    # -- FastSocket's small methods -------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def _check_open(self) -> None:
        if self.sock.fileno() == -1:
            raise trio.ClosedResourceError("socket was closed")

    def close(self) -> None:
        """close_notify when nothing is half-sent (best effort), then close."""
        if self.sock.fileno() == -1:
            return
        if self._open and not self._draining and self._unsent is None and not self._out.pending:
            try:
                self._obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # SSLWantReadError: the peer's close_notify is not awaited
            try:
                self._send_some()
            except OSError:
                pass
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    # -- receiving ------------------------------------------------------------------
    async def _fill(self) -> None:
        """Ciphertext from the socket into the incoming BIO (end of file
        too); waits only when nothing is there.  Every ``_STREAK``-th
        receive in a row that did not wait is a checkpoint (as FastSocket)."""
        self._check_open()
        sock = self.sock
        try:
            data = sock.recv(RECV_SIZE)
        except BlockingIOError:
            self._streak = 0
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(RECV_SIZE)
                    break
                except BlockingIOError:
                    pass
            waited = True
        else:
            waited = False
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        if not waited:
            self._streak += 1
            if self._streak >= _STREAK:
                self._streak = 0
                await trio.lowlevel.checkpoint()

    async def feed(self, core) -> None:
        """One receive step for a sans-IO core, as ``FastSocket.feed``: the
        rest of a large payload is decrypted straight into the core's
        buffer; end of the TLS stream is fed as ``b""``."""
        if self._plain:
            data, self._plain = self._plain, b""
            core.receive_data(data)
            return
        if self._eof:
            core.receive_data(b"")
            return
        view = core.payload_view()
        obj = self._obj
        while True:
            try:
                if view is None:
                    data = obj.read(RECV_SIZE)
                    if not data:
                        self._eof = True
                    core.receive_data(data)
                else:
                    n = obj.read(len(view), view)
                    if n:
                        core.payload_received(n)
                    else:
                        self._eof = True
                        core.receive_data(b"")
                return
            except ssl.SSLWantReadError:
                self._flush_nowait()  # e.g. a key update's answer
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True
                core.receive_data(b"")
                return

    async def wait_readable(self) -> None:
        """Returns once :meth:`feed` would not wait: plaintext or the end of
        the stream (post-handshake records alone do not count)."""
        while not self._plain and not self._eof:
            try:
                self._plain = self._obj.read(RECV_SIZE)
                if not self._plain:
                    self._eof = True
            except ssl.SSLWantReadError:
                self._flush_nowait()
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                self._eof = True

    # -- sending --------------------------------------------------------------------
    def _encrypt(self, bufs) -> None:
        write = self._obj.write
        for b in bufs:
            view = memoryview(b).cast("B")
            pos, end = 0, len(view)
            while pos < end:
                pos += write(view[pos : pos + _WRITE_CHUNK])

    def _send_some(self) -> bool:
        """Send pending ciphertext until the kernel stops taking it; True
        once everything has gone."""
        sock = self.sock
        while True:
            if self._unsent is None:
                if not self._out.pending:
                    return True
                self._unsent = memoryview(self._out.read())
            try:
                n = sock.send(self._unsent)
            except BlockingIOError:
                return False
            if n >= len(self._unsent):
                self._unsent = None
            else:
                self._unsent = self._unsent[n:]

    def _flush_nowait(self) -> None:
        if not self._draining and (self._unsent is not None or self._out.pending):
            self._send_some()

    async def _drain(self, shield: bool) -> None:
        """Send every pending ciphertext byte; one drainer at a time (a
        second one parks, then sends whatever the first left)."""
        with trio.CancelScope(shield=shield):
            while self._draining:
                await self._lot.park()
            self._check_open()
            if self._send_some():
                return
            self._draining = True
            try:
                while not self._send_some():
                    await trio.lowlevel.wait_writable(self.sock)
            finally:
                self._draining = False
                self._lot.unpark_all()

    async def send_buffers(self, bufs: list) -> None:
        """Encrypt and write every buffer (in order); shielded waits, as
        ``FastSocket.send_buffers``."""
        self._check_open()
        self._encrypt(bufs)
        if self._draining or not self._send_some():
            await self._drain(shield=True)

    async def send_cancellable(self, bufs: list) -> None:
        """As :meth:`send_buffers`, cancellable while it waits (then the
        caller drops the connection)."""
        self._check_open()
        self._encrypt(bufs)
        await self._drain(shield=False)

    def send_nowait(self, data: bytes) -> None:
        """Best effort, never waits (the client's parting NBD_CMD_DISC)."""
        self._encrypt([data])
        self._flush_nowait()

    # -- the handshake ----------------------------------------------------------------
    async def _handshake(self) -> None:
        obj = self._obj
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._drain(shield=False)
                    await self._fill()
            await self._drain(shield=False)
        except ssl.SSLError:
            try:  # the alert that tells the peer why
                self._flush_nowait()
            except OSError:
                pass
            raise
        self._open = True
        self.version = obj.version()
        self.peer_cn = subject_cn(obj.getpeercert())


async def _start(fast, ctx: ssl.SSLContext, pending: bytes, *, server_side: bool,
                 hostname: str | None = None) -> TLSSocket:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=hostname)
    if pending:
        incoming.write(pending)
    tls = TLSSocket(fast, obj, incoming, outgoing)
    await tls._handshake()
    return tls


async def start_server_tls(fast, ctx: ssl.SSLContext, pending: bytes = b"") -> TLSSocket:
    """The server's TLS handshake on ``fast`` (a FastSocket, right after the
    STARTTLS ACK went out); ``pending``: bytes the core had buffered beyond
    the option.  Raises ``ssl.SSLError`` (an OSError) when it fails; the
    caller closes the socket either way on failure."""
    return await _start(fast, ctx, pending, server_side=True)


async def start_client_tls(fast, tls: ClientTLS, pending: bytes = b"") -> TLSSocket:
    """The client's TLS handshake on ``fast`` after the server's ACK."""
    return await _start(fast, tls.context, pending, server_side=False, hostname=tls.hostname)
