"""A thin trio NBD server around the sans-IO ``ServerConnection``.

Design note
-----------
The secondary host runs one :class:`NBDServer`; the primary's NBD client
connects to it and forwards every VM write.  Each accepted connection gets
its own nursery and one *reader* task that receives bytes
(:meth:`FastSocket.feed <replfs.nbd._sockio.FastSocket.feed>`, shared with
the client), feeds the sans-IO core and acts on the events.

* Cheap requests (READ / WRITE / TRIM / WRITE_ZEROES up to ``inline_max``
  bytes, no FUA) run inline in the reader, in arrival order: no task is
  spawned per small request.  FLUSH, FUA requests and large requests run in
  tasks of the connection nursery (at most ``max_inflight`` at once), so a
  slow fsync does not stall the stream.  A request overlapping a write that
  is still running in such a task waits for it first, so writes to the same
  bytes are applied in the order the client sent them.
* Each command has one handler (``_Conn._HANDLERS``, dispatched by
  :meth:`_Conn.execute`); a read-only export refuses the write commands
  once, before the handler, with EPERM (and advertises
  NBD_FLAG_READ_ONLY).
* "Ordering of messages and writes": a FLUSH calls the node's ``flush()``
  only after every write received before it has finished (inline writes
  have; spawned ones are awaited), which is stronger than the document's
  rule about writes already replied to.
* Replies go through one place: :meth:`_Conn.queue_reply` appends encoded
  replies to a list and :meth:`_Conn.flush_output` writes all pending ones
  with a single ``send``/``sendmsg`` (combining: whoever finds no send in
  progress sends everything queued, including replies queued meanwhile).
  The reader queues the replies of a whole received batch before sending.
  Sends are shielded from cancellation (a half-written reply would corrupt
  the stream); closing the socket (``close_all``) unblocks them.
* A :class:`~replfs.errors.BlockError` from the node becomes the NBD error
  value in the reply ("Error values").
* Malformed input (a RemoteProtocolError from the core) closes only that
  connection, with one log line on ``logging.getLogger("replfs.nbd")``.

Who may connect: transport limits here, policy outside
------------------------------------------------------
The server enforces only what belongs to the transport; whether a client
*should* be let in (the replication stage) is the caller's decision:

* ``admit(export_name, clients_now) -> str | None`` (the admission hook) is
  called for NBD_OPT_GO and NBD_OPT_EXPORT_NAME just before a client would
  enter transmission, with the number of clients already in transmission on
  that export.  None admits; a string refuses with NBD_REP_ERR_POLICY and
  that string as the message.  A hook that raises refuses too (and is
  logged).
* ``max_clients_per_export``: a transport limit, checked before the hook; a
  further client gets NBD_REP_ERR_POLICY with a message.
* ``set_accepting(False)`` is for the daemon's own shutdown only: every
  option but NBD_OPT_ABORT is answered NBD_REP_ERR_SHUTDOWN "server is
  shutting down" ("Termination of the session during option haggling").

NBD_OPT_EXPORT_NAME cannot carry an error: a refused one terminates the
session, and the message only reaches the log.

Writers and read-only observers
-------------------------------
With ``observers=N`` (N > 0) an export has two kinds of client.  A
*writer* is a connection that the control hook granted the role during
option haggling (its answer carried ``"writer": true``: the replicating
primary claims it before NBD_OPT_GO); ``max_clients_per_export``,
``admit`` and ``on_clients_changed`` concern writers only.  Every other
client that asks NBD_OPT_GO or NBD_OPT_EXPORT_NAME is an *observer*: it is
admitted read-only (its transmission flags carry NBD_FLAG_READ_ONLY, its
write commands fail with EPERM), at most N at once per export, whatever
the writer is doing.  NBD_OPT_INFO describes the export as a writer sees
it (writable): it only describes.  So ``qemu-img convert nbd://...`` or
``nbdinfo`` can read the secondary disk while the primary replicates, and
an anonymous client can never change it.  The claim identifies, it does
not authenticate: that is TLS's and ``--allow``'s job.  With
``observers=0`` (the default) every client is a writer, as before.

The control channel (replfs's private extension)
------------------------------------------------
``control(request, peer) -> dict`` (an async callable; None by default)
answers ``NBD_OPT_X_REPLFS``, the option the primary and the secondary talk
over besides the data path (reconnect, resync, generation check, digests;
the wire format is in ``control.py``).  It is a private *option* because a
plain server answers an option it does not know with NBD_REP_ERR_UNSUP and
carries on, so qemu-nbd and nbdkit stay usable as peers.  Without
``control`` this server does exactly that too.

* ``request`` is the decoded JSON object, ``peer`` the client's address as
  ``accept()`` gave it (``(host, port)`` for IPv4).  The returned dict goes
  back as ``NBD_REP_X_REPLFS``.  Raising :class:`~replfs.nbd.errors.ControlRefused`
  refuses with its code and message (verbatim; only a message over the
  protocol's 4096-byte string limit is cut); any other exception is answered
  NBD_REP_ERR_INVALID "internal error" and logged with its traceback; a
  request that is not a JSON object gets NBD_REP_ERR_INVALID, an answer
  over 4 MiB NBD_REP_ERR_TOO_BIG.  The connection goes on in every case.
* The handler is awaited in the connection's own task, during option
  haggling: a slow one (reading a disk for digests) delays only its
  connection.
* ``handshake_timeout`` does not run while the handler runs (that time is
  ours, not the client's), and a connection whose call has once succeeded
  is exempt from it for good: it is a control connection, open for the
  whole pairing; keepalive (``tune_socket``) notices a dead peer instead.
* No export is entered, so ``max_clients_per_export`` and ``admit`` do not
  apply; ``set_accepting(False)`` answers NBD_REP_ERR_SHUTDOWN as for any
  option, and ``close_all`` closes control connections too.

TLS, and who may connect
------------------------
* ``tls`` (an ``ssl.SSLContext`` from :func:`replfs.nbd.tls.server_context`)
  puts the server in the document's FORCEDTLS mode ("TLS support"): before
  TLS, NBD_OPT_STARTTLS and NBD_OPT_ABORT are the only options answered;
  every other one gets NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME (which
  cannot carry an error) ends the session.  After the ACK the connection's
  socket is replaced by a :class:`~replfs.nbd.tls.TLSSocket` (same methods:
  the rest of this module does not know), the context requires a client
  certificate signed by the CA, and a failed handshake closes the connection
  with one log line.  The control option is recognised only once TLS runs, so
  a client without a certificate cannot make the server buffer 4 MiB.
  Without ``tls`` NBD_OPT_STARTTLS is an unknown option (NBD_REP_ERR_UNSUP):
  nothing changes for plain connections.
* ``allow`` (networks, ``ipaddress.ip_network`` values or strings): a
  connection from any other address is closed at accept, before a byte is
  sent, and logged.  None: everyone may try.
* Every connection is logged when it is accepted and when it ends, with the
  peer's address (and, with TLS, its certificate's CN).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping

import trio

from replfs.block.base import BlockNode
from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd._events import ClientFlags, ExportInfo, ExportList, Greeting, OptAck, OptionError  # handshake
from replfs.nbd._events import OptAbort, OptExportName, OptGo, OptInfo, OptInvalid, OptList, OptUnknown  # options
from replfs.nbd._events import OptPrivate, PrivateReply  # replfs's private extension
from replfs.nbd._events import OptStartTLS  # TLS
from replfs.nbd._events import BadRequest, ConnectionClosed, Disconnect, Reply, Request  # transmission
from replfs.nbd._sockio import FastSocket, RequestStats, tune_socket
from replfs.nbd.tls import describe_ssl_error, start_server_tls
from replfs.nbd.connection import NEED_DATA, PAUSED, ServerConnection
from replfs.nbd.control import decode_message, encode_message, fit_message
from replfs.nbd.errors import ControlRefused, RemoteProtocolError

log = logging.getLogger("replfs.nbd")

__all__ = ["NBDServer"]

ExportsArg = Mapping[str, BlockNode] | Callable[[str], "BlockNode | None"]
#: ``admit(export_name, clients_now)``: None admits, a string refuses.
AdmitHook = Callable[[str, int], "str | None"]
#: ``await control(request, peer)``: the answer, or raise ControlRefused.
ControlHook = Callable[[dict, tuple], Awaitable[dict]]

_READ = P.NBD_CMD_READ
_WRITE = P.NBD_CMD_WRITE
_FLUSH = P.NBD_CMD_FLUSH
_TRIM = P.NBD_CMD_TRIM
_WRITE_ZEROES = P.NBD_CMD_WRITE_ZEROES
_FUA = P.NBD_CMD_FLAG_FUA
_INLINE_COMMANDS = frozenset({_READ, _WRITE, _TRIM, _WRITE_ZEROES})
_WRITE_COMMANDS = frozenset({_WRITE, _TRIM, _WRITE_ZEROES})
#: Pending reply bytes above which the reader stops reading (backpressure).
_OUTPUT_LIMIT = 16 * 1024 * 1024
#: A connection that ends with one of these just lost its client.
_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class NBDServer:
    """Serve block nodes over NBD (fixed newstyle, simple replies).

    ``exports`` maps export names to nodes, or is a callable returning the
    node for a name (None when unknown; NBD_OPT_LIST is then refused).
    ``admit(export_name, clients_now)`` decides whether a client may enter
    transmission (see the module's design note).
    ``on_clients_changed(export_name, count)`` is called (synchronously)
    whenever the number of clients in transmission on an export changes.
    ``control(request, peer)`` answers the control channel (see the design
    note; None: NBD_OPT_X_REPLFS is an unknown option here).
    """

    def __init__(
        self,
        exports: ExportsArg,
        *,
        read_only: bool = False,
        max_clients_per_export: int | None = None,
        admit: AdmitHook | None = None,
        on_clients_changed: Callable[[str, int], None] | None = None,
        inline_max: int = 1024 * 1024 + 4096,
        max_inflight: int = 64,
        handshake_timeout: float = 30.0,
        control: ControlHook | None = None,
        tls: ssl.SSLContext | None = None,
        allow=None,
        observers: int = 0,
    ):
        self._exports = exports
        self.read_only = read_only
        self.max_clients_per_export = max_clients_per_export
        self.admit = admit
        self.on_clients_changed = on_clients_changed
        self.inline_max = inline_max
        self.max_inflight = max_inflight
        self.handshake_timeout = handshake_timeout
        self.control = control
        #: The TLS context (FORCEDTLS), or None; see the design note.
        self.tls = tls
        #: Networks that may connect (None: any address).
        self.allow = None if allow is None else tuple(ipaddress.ip_network(n, strict=False) for n in allow)
        self.connections_refused = 0
        self.tls_failures = 0
        self.observers = observers
        self._observers: dict[str, int] = {}
        self._accepting = True
        self._conns: set[_Conn] = set()
        self._clients: dict[str, int] = {}
        self.address: tuple[str, int] | None = None
        # counters (see statistics())
        self.stats = RequestStats()
        self.connections_total = 0
        self.protocol_errors = 0
        self.control_calls = 0
        self.control_errors = 0

    # -- public API ----------------------------------------------------------------
    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status=trio.TASK_STATUS_IGNORED):
        """Listen on ``host:port`` and serve until cancelled.

        ``task_status.started((host, real_port))`` once listening (port 0
        picks a free port).
        """
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, type_, proto_, _, addr = infos[0]
        listener = trio.socket.socket(family, type_, proto_)
        with listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await listener.bind(addr)
            listener.listen(128)
            real_port = listener.getsockname()[1]
            self.address = (host, real_port)
            log.info("nbd: serving %s on %s:%d", self._describe_exports(), host, real_port)
            async with trio.open_nursery() as nursery:
                task_status.started((host, real_port))
                while True:
                    try:
                        sock, peer = await listener.accept()
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("nbd: accept failed: %s", exc)
                            await trio.sleep(0.1)
                            continue
                        raise
                    if self.allow is not None and not self._allowed(peer):
                        self.connections_refused += 1
                        log.warning("nbd: %s: connection refused: address not allowed (--allow)",
                                    _peer_text(peer))
                        sock.close()
                        continue
                    conn = _Conn(self, FastSocket(sock), peer)
                    log.info("nbd: %s: connected", conn.peer)
                    self._conns.add(conn)
                    self.connections_total += 1
                    nursery.start_soon(conn.run)

    def _allowed(self, peer) -> bool:
        """Whether ``peer`` (accept()'s address) is in one of ``allow``'s
        networks; an IPv4 client of an IPv6 listener counts as IPv4."""
        try:
            addr = ipaddress.ip_address(peer[0].split("%", 1)[0])
        except (ValueError, TypeError, IndexError):
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.allow)

    def set_accepting(self, accepting: bool) -> None:
        """False while the daemon shuts down: clients still negotiating get
        NBD_REP_ERR_SHUTDOWN.  Not for refusing clients by policy: that is
        the ``admit`` hook."""
        self._accepting = bool(accepting)

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def close_all(self) -> None:
        """Disconnect every client (hard disconnect) and wait until they are gone."""
        conns = list(self._conns)
        for conn in conns:
            conn.kill()
        for conn in conns:
            await conn.finished.wait()

    def clients(self, export_name: str) -> int:
        """Clients in transmission on ``export_name`` (writers, with observers on)."""
        return self._clients.get(export_name, 0)

    def observing(self, export_name: str) -> int:
        """Read-only observers in transmission on ``export_name``."""
        return self._observers.get(export_name, 0)

    def statistics(self) -> dict:
        return {
            "address": self.address,
            "accepting": self._accepting,
            "connections": len(self._conns),
            "connections_total": self.connections_total,
            "clients": dict(self._clients),
            "observers": dict(self._observers),
            **self.stats.as_dict(),
            "protocol_errors": self.protocol_errors,
            "in_flight": sum(c.core.in_flight for c in self._conns),
            "control_connections": sum(c.controlling for c in self._conns),
            "control_calls": self.control_calls,
            "control_errors": self.control_errors,
            "tls": self.tls is not None,
            "tls_failures": self.tls_failures,
            "connections_refused": self.connections_refused,
        }

    # -- helpers used by connections -------------------------------------------------
    def _describe_exports(self) -> str:
        if isinstance(self._exports, Mapping):
            return ", ".join(repr(n) for n in self._exports) or "no exports"
        return "dynamic exports"

    def _lookup(self, name: str) -> BlockNode | None:
        if isinstance(self._exports, Mapping):
            return self._exports.get(name)
        try:
            return self._exports(name)
        except KeyError:
            return None

    def _transmission_flags(self) -> int:
        flags = (
            P.NBD_FLAG_HAS_FLAGS
            | P.NBD_FLAG_SEND_FLUSH
            | P.NBD_FLAG_SEND_FUA
            | P.NBD_FLAG_SEND_TRIM
            | P.NBD_FLAG_SEND_WRITE_ZEROES
        )
        if self.read_only:
            flags |= P.NBD_FLAG_READ_ONLY
        return flags

    def _answer_option(self, conn: _Conn, ev):
        """The event answering one option received during the handshake."""
        t = type(ev)
        if t is OptAbort:
            return OptAck()
        if not self._accepting:
            return OptionError(P.NBD_REP_ERR_SHUTDOWN, "server is shutting down")
        if t is OptUnknown:
            return OptionError(P.NBD_REP_ERR_UNSUP, f"{P.option_name(ev.option)} is not supported")
        if t is OptInvalid:
            return OptionError(P.NBD_REP_ERR_INVALID, ev.reason)
        if t is OptList:
            if not isinstance(self._exports, Mapping):
                return OptionError(P.NBD_REP_ERR_POLICY, "this server does not list its exports")
            return ExportList(tuple(self._exports))
        # OptGo / OptInfo / OptExportName
        node = self._lookup(ev.name)
        if node is None:
            return OptionError(P.NBD_REP_ERR_UNKNOWN, f"no export named {ev.name!r}")
        flags = self._transmission_flags()
        if t is not OptInfo:
            observer = self.observers > 0 and not conn.writer
            refusal = self._observer_refusal(ev.name) if observer else self._refusal(ev.name)
            if refusal is not None:
                return OptionError(P.NBD_REP_ERR_POLICY, refusal)
            conn.enter(ev.name, node, observer=observer)
            if observer:
                flags |= P.NBD_FLAG_READ_ONLY
        return ExportInfo(
            node.size,
            flags,
            (P.MIN_BLOCK_SIZE, P.PREFERRED_BLOCK_SIZE, P.MAX_BLOCK_SIZE),
        )

    async def _answer_control(self, conn: _Conn, ev: OptPrivate):
        """The event answering one control call (``NBD_OPT_X_REPLFS``)."""
        answer = await self._call_control(conn, ev.payload)
        if type(answer) is OptionError:
            self.control_errors += 1
        else:
            self.control_calls += 1
        return answer

    async def _call_control(self, conn: _Conn, payload: bytes):
        if not self._accepting:
            return OptionError(P.NBD_REP_ERR_SHUTDOWN, "server is shutting down")
        try:
            request = decode_message(payload)
        except ValueError as exc:
            return OptionError(P.NBD_REP_ERR_INVALID, fit_message(f"control request: {exc}"))
        try:
            reply = await self.control(request, conn.address)
            if self.observers and reply.get("writer") is True:
                conn.writer = True
            answer = encode_message(reply)
        except ControlRefused as exc:
            return OptionError(exc.code, fit_message(exc.message))
        except Exception:
            log.exception("nbd: %s: control handler failed on %.200r", conn.peer, request)
            return OptionError(P.NBD_REP_ERR_INVALID, "internal error")
        if len(answer) > P.MAX_CONTROL_PAYLOAD:
            log.error("nbd: %s: control answer of %d bytes is over the limit", conn.peer, len(answer))
            return OptionError(
                P.NBD_REP_ERR_TOO_BIG, f"control answer of {len(answer)} bytes exceeds {P.MAX_CONTROL_PAYLOAD}"
            )
        return PrivateReply(answer)

    def _refusal(self, name: str) -> str | None:
        """Why a client may not enter transmission on ``name`` now, or None."""
        count = self._clients.get(name, 0)
        limit = self.max_clients_per_export
        if limit is not None and count >= limit:
            return f"export {name!r} already has {count} client(s) connected (limit {limit})"
        if self.admit is None:
            return None
        try:
            return self.admit(name, count)
        except Exception:
            log.exception("nbd: admit hook failed for export %r", name)
            return "admission check failed"

    def _observer_refusal(self, name: str) -> str | None:
        count = self._observers.get(name, 0)
        if count >= self.observers:
            return (f"export {name!r} already has {count} read-only observer(s) "
                    f"(limit {self.observers})")
        return None

    def _observer_count_changed(self, name: str, delta: int) -> None:
        count = self._observers.get(name, 0) + delta
        if count:
            self._observers[name] = count
        else:
            self._observers.pop(name, None)

    def _client_count_changed(self, name: str, delta: int) -> None:
        count = self._clients.get(name, 0) + delta
        if count:
            self._clients[name] = count
        else:
            self._clients.pop(name, None)
        if self.on_clients_changed is not None:
            try:
                self.on_clients_changed(name, count)
            except Exception:
                log.exception("nbd: on_clients_changed callback failed")


def _peer_text(peer) -> str:
    """``host:port`` (``[v6]:port``) of accept()'s address, for the log."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = peer[0]
        return f"[{host}]:{peer[1]}" if ":" in str(host) else f"{host}:{peer[1]}"
    return str(peer)


class _Conn:
    """One accepted connection."""

    def __init__(self, server: NBDServer, sock, peer):
        self.server = server
        self.sock = sock
        #: The client's address as accept() gave it (for the control hook).
        self.address = peer
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        # With TLS the control option is known only once TLS runs (start_tls).
        self.core = ServerConnection(control=server.control is not None and server.tls is None,
                                     tls=server.tls is not None)
        #: TLS runs on this connection (the socket is a TLSSocket).
        self.tls_active = False
        #: The client certificate's commonName, once TLS runs.
        self.tls_cn: str | None = None
        #: A control call has succeeded: exempt from handshake_timeout.
        self.controlling = False
        self.handshake_scope: trio.CancelScope | None = None
        self.node: BlockNode | None = None
        self.export_name: str | None = None
        self.finished = trio.Event()
        self.scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.read_only = server.read_only
        #: The control hook granted this connection the writer role.
        self.writer = False
        #: Entered transmission as a read-only observer.
        self.observer = False
        # output
        self.out: list = []
        self.out_bytes = 0
        self.sending = False
        self.broken = False
        self.drained = trio.Event()
        # spawned requests
        self.spawned = 0
        self.slot_free = trio.Event()
        #: cookie -> (offset, end, done event) of writes running in tasks.
        self.running_writes: dict[int, tuple[int, int, trio.Event]] = {}

    # -- lifecycle -----------------------------------------------------------------
    def kill(self) -> None:
        self.scope.cancel()
        self.sock.close()

    def enter(self, name: str, node: BlockNode, observer: bool = False) -> None:
        self.export_name = name
        self.node = node
        if observer:
            self.observer = self.read_only = True
            self.server._observer_count_changed(name, +1)
            log.info("nbd: %s: read-only observer of export %r", self.peer, name)
        else:
            self.server._client_count_changed(name, +1)

    async def run(self) -> None:
        server = self.server
        try:
            with self.scope:
                tune_socket(self.sock)
                if await self.negotiate():
                    failure = await self.serve_requests()
                    if failure is not None:
                        raise failure
                    await self.flush_output()
        except RemoteProtocolError as exc:
            server.protocol_errors += 1
            log.warning("nbd: %s: closing connection, protocol error: %s", self.peer, exc)
        except _LOST as exc:
            if not self.scope.cancel_called:
                log.info("nbd: %s: connection lost: %s", self.peer, exc)
        except Exception:
            # A bug must not take the whole server down.
            log.exception("nbd: %s: connection failed", self.peer)
        finally:
            self.sock.close()
            log.info("nbd: %s: disconnected", self.who())
            server._conns.discard(self)
            if self.export_name is not None:
                if self.observer:
                    server._observer_count_changed(self.export_name, -1)
                    log.info("nbd: %s: observer of export %r left", self.peer, self.export_name)
                else:
                    server._client_count_changed(self.export_name, -1)
            self.finished.set()

    async def negotiate(self) -> bool:
        """The handshake within ``handshake_timeout``; True once in transmission."""
        with trio.move_on_after(self.server.handshake_timeout) as self.handshake_scope:
            return await self.handshake()
        log.info("nbd: %s: handshake timed out", self.peer)
        return False

    async def serve_requests(self) -> BaseException | None:
        """Transmission until the client leaves; returns why reading stopped
        (None for a clean end) only once every spawned request has finished.

        Raising inside the nursery would cancel the spawned requests: they
        finish instead, and their replies are dropped (``broken``).
        """
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                await self.transmission()
            except (RemoteProtocolError, *_LOST) as exc:
                self.broken = True
                return exc
        return None

    # -- I/O -------------------------------------------------------------------------
    def queue_reply(self, cookie: int, error: int = 0, data=None) -> None:
        parts = self.core.send_parts(Reply(cookie, error, data))
        self.out.extend(parts)
        if data is not None:
            self.out_bytes += len(data)

    async def flush_output(self) -> None:
        """Send everything queued (combining; shielded from cancellation)."""
        if self.sending or not self.out:
            return
        self.sending = True
        try:
            # send_buffers is shielded where it waits: replies leave whole
            # or the connection is closed.
            while self.out and not self.broken:
                bufs = self.out
                self.out = []
                self.out_bytes = 0
                await self.sock.send_buffers(bufs)
        except _LOST:
            # The peer is gone: drop replies; the reader sees the end of
            # the stream, requests already running finish undisturbed.
            self.broken = True
            self.out = []
        finally:
            self.sending = False
            if not self.out:
                self.drained.set()
                self.drained = trio.Event()

    # -- handshake -------------------------------------------------------------------
    async def handshake(self) -> bool:
        core = self.core
        await self.sock.send_buffers([core.send(Greeting())])
        while True:
            ev = core.next_event()
            if ev is NEED_DATA:
                await self.sock.feed(core)
                continue
            t = type(ev)
            if t is ClientFlags:
                continue
            if t is ConnectionClosed:
                return False
            if ev is PAUSED:  # pragma: no cover - we always answer at once
                raise AssertionError("unanswered option")
            if t is OptStartTLS:
                if not await self.start_tls():
                    return False
                continue
            if self.server.tls is not None and not self.tls_active and t is not OptAbort:
                # FORCEDTLS ("TLS support"); NBD_OPT_EXPORT_NAME: the core ends the session.
                data = core.send(OptionError(P.NBD_REP_ERR_TLS_REQD,
                                             "TLS is required: start with NBD_OPT_STARTTLS "
                                             "(a replfs primary: --tls-dir)"))
                if data:
                    await self.sock.send_buffers([data])
                if core.closed:
                    log.info("nbd: %s: refused: NBD_OPT_EXPORT_NAME without TLS", self.peer)
                    return False
                continue
            if t is OptPrivate:
                await self.sock.send_buffers(core.send_parts(await self.control_call(ev)))
                continue
            if t not in (OptGo, OptInfo, OptExportName, OptList, OptAbort, OptUnknown, OptInvalid):
                raise AssertionError(f"unexpected handshake event {ev!r}")
            answer = self.server._answer_option(self, ev)
            data = core.send(answer)
            if data:
                await self.sock.send_buffers([data])
            if core.in_transmission:
                return True
            if core.closed:
                if t is OptExportName and type(answer) is OptionError:
                    log.info("nbd: %s: refused %r: %s", self.peer, ev.name, answer.message)
                return False

    def who(self) -> str:
        """The peer for the log: its address, and its certificate's CN."""
        return f"{self.peer} (CN={self.tls_cn})" if self.tls_active else self.peer

    async def start_tls(self) -> bool:
        """Answer NBD_OPT_STARTTLS: the ACK, then the TLS handshake; the
        socket becomes a TLSSocket.  False (logged) when the handshake
        fails: the session ends, "too late to continue without TLS"."""
        core = self.core
        if self.tls_active:
            await self.sock.send_buffers([core.send(OptionError(P.NBD_REP_ERR_INVALID, "TLS is already running"))])
            return True
        await self.sock.send_buffers([core.send(OptAck(P.NBD_OPT_STARTTLS))])
        try:
            self.sock = await start_server_tls(self.sock, self.server.tls, core.take_pending_bytes())
        except ssl.SSLError as exc:
            self.server.tls_failures += 1
            log.warning("nbd: %s: TLS handshake failed: %s", self.peer, describe_ssl_error(exc))
            return False
        self.tls_active = True
        self.tls_cn = self.sock.peer_cn
        core.control = self.server.control is not None
        log.info("nbd: %s: TLS (%s), client certificate CN=%s", self.peer, self.sock.version, self.tls_cn)
        return True

    async def control_call(self, ev: OptPrivate):
        """Answer one control call; the handshake timeout is off while the
        handler runs, and for good once a call has succeeded."""
        scope = self.handshake_scope
        deadline = scope.deadline
        scope.deadline = math.inf
        answer = await self.server._answer_control(self, ev)
        if type(answer) is PrivateReply and self.writer:
            scope.deadline = deadline  # a claim: the handshake goes on to NBD_OPT_GO
        elif type(answer) is PrivateReply:
            if not self.controlling:
                self.controlling = True
                log.info("nbd: %s: control connection", self.peer)
        else:
            scope.deadline = deadline
        return answer

    # -- transmission ------------------------------------------------------------------
    async def transmission(self) -> None:
        core = self.core
        stats = self.server.stats
        next_event = core.next_event
        inline_max = self.server.inline_max
        while True:
            # Events first: the handshake may have left requests buffered.
            while True:
                ev = next_event()
                if type(ev) is Request:
                    stats.requests += 1
                    cmd = ev.command
                    if cmd in _INLINE_COMMANDS and ev.length <= inline_max and not ev.flags & _FUA:
                        if self.running_writes:
                            await self.wait_overlapping(ev.offset, ev.length)
                        await self.execute(ev)
                    else:
                        await self.spawn(ev)
                elif ev is NEED_DATA:
                    break
                elif type(ev) is BadRequest:
                    stats.requests += 1
                    stats.errors += 1
                    self.queue_reply(ev.cookie, ev.error)
                elif type(ev) is Disconnect:
                    # "NBD_CMD_DISC": handle all outstanding requests, then
                    # close; the nursery waits for spawned ones.
                    await self.flush_output()
                    return
                elif type(ev) is ConnectionClosed:
                    return
                else:  # pragma: no cover
                    raise AssertionError(f"unexpected event {ev!r}")
            if self.out:
                await self.flush_output()
            while self.out_bytes > _OUTPUT_LIMIT and not self.broken:
                await self.drained.wait()
            await self.sock.feed(core)

    async def spawn(self, ev: Request) -> None:
        while self.spawned >= self.server.max_inflight:
            await self.slot_free.wait()
        self.spawned += 1
        waits = ()
        if self.running_writes:
            if ev.command == _FLUSH:
                waits = [done for (_, _, done) in self.running_writes.values()]
            else:
                waits = self.overlapping(ev.offset, ev.length)
        done = None
        if ev.command in _WRITE_COMMANDS:
            done = trio.Event()
            self.running_writes[ev.cookie] = (ev.offset, ev.offset + ev.length, done)
        self.nursery.start_soon(self.run_spawned, ev, waits, done)

    async def run_spawned(self, ev: Request, waits, done) -> None:
        try:
            for w in waits:
                await w.wait()
            await self.execute(ev)
        finally:
            if done is not None:
                del self.running_writes[ev.cookie]
                done.set()
            self.spawned -= 1
            self.slot_free.set()
            self.slot_free = trio.Event()
        await self.flush_output()

    def overlapping(self, offset: int, length: int) -> list:
        end = offset + length
        return [done for (start, stop, done) in self.running_writes.values() if start < end and offset < stop]

    async def wait_overlapping(self, offset: int, length: int) -> None:
        for done in self.overlapping(offset, length):
            await done.wait()

    async def execute(self, ev: Request) -> None:
        """Run one request against the node and queue its reply."""
        cmd = ev.command
        try:
            if self.read_only and cmd in _WRITE_COMMANDS:
                raise BlockError(errno.EPERM, "export is read-only")
            handler = self._HANDLERS.get(cmd)
            if handler is None:  # pragma: no cover - the core turns these into BadRequest
                raise BlockError(errno.EINVAL, f"unsupported {P.command_name(cmd)}")
            await handler(self, ev)
        except BlockError as exc:
            self.server.stats.errors += 1
            log.debug("nbd: %s: %s failed: %s", self.peer, P.command_name(cmd), exc)
            self.queue_reply(ev.cookie, P.errno_to_nbd(exc.errno))
        except Exception:
            self.server.stats.errors += 1
            log.exception("nbd: %s: %s raised an unexpected error", self.peer, P.command_name(cmd))
            self.queue_reply(ev.cookie, P.NBD_EIO)

    # -- one handler per command: run it on the node, queue the reply ------------------
    async def _read(self, ev: Request) -> None:
        data = self.node.read_now(ev.offset, ev.length)
        if data is None:
            data = await self.node.read(ev.offset, ev.length)
        if len(data) != ev.length:
            raise BlockError(errno.EIO, f"node returned {len(data)} bytes for a {ev.length}-byte read")
        stats = self.server.stats
        stats.reads += 1
        stats.bytes_read += ev.length
        self.queue_reply(ev.cookie, 0, data)

    async def _write(self, ev: Request) -> None:
        await self.node.write(ev.offset, ev.data, bool(ev.flags & _FUA))
        stats = self.server.stats
        stats.writes += 1
        stats.bytes_written += ev.length
        self.queue_reply(ev.cookie)

    async def _flush(self, ev: Request) -> None:
        await self.node.flush()
        self.server.stats.flushes += 1
        self.queue_reply(ev.cookie)

    async def _trim(self, ev: Request) -> None:
        await self.node.trim(ev.offset, ev.length)
        if ev.flags & _FUA:
            await self.node.flush()
        self.queue_reply(ev.cookie)

    async def _write_zeroes(self, ev: Request) -> None:
        await self.node.write_zeroes(ev.offset, ev.length, bool(ev.flags & _FUA))
        self.queue_reply(ev.cookie)

    _HANDLERS = {_READ: _read, _WRITE: _write, _FLUSH: _flush, _TRIM: _trim, _WRITE_ZEROES: _write_zeroes}
