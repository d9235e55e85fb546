"""A pipelining trio NBD client that is itself a :class:`BlockNode`.

Design note
-----------
The primary host keeps one :class:`NBDClient` connected to the secondary and
hands it every VM write, so it behaves like any other block layer: the I/O
methods raise only :class:`~replfs.errors.BlockError`.

* A block layer like any other: the base class checks bounds and skips
  zero-length requests; this class overrides only ``_read`` / ``_write`` /
  ``_write_zeroes`` / ``_trim`` (and ``flush``), which split, emulate and
  count (below).  ``can_abort`` is True: :meth:`abort` drops the connection
  at once.
* Pipelining: any number of tasks may call ``read``/``write``/... at once.
  Each request gets a fresh cookie (the document's "handle") and a small
  ``_Pending`` record; one *reader* task parses replies with the sans-IO
  :class:`~replfs.nbd.connection.ClientConnection` and wakes the caller whose
  cookie came back (replies may arrive in any order, "Transmission").
  Callers park with ``trio.lowlevel.wait_task_rescheduled`` (no Event per
  request).
* Sending: with nothing else in flight the caller writes its request itself
  (lowest latency at queue depth 1).  Otherwise it appends the encoded
  request to an output list and wakes a *writer* task, which sends
  everything queued with one ``send``/``sendmsg``: at queue depth 16 the
  requests that callers produce in one scheduler round leave in one system
  call.  Sends are shielded from cancellation (a half-sent request would
  corrupt the stream); :meth:`abort` unblocks them by closing the socket.
* Failure: a lost connection or a protocol error from the server fails
  every request in flight with ``BlockError(ECONNRESET, <cause>)`` and every
  later request at once (a LocalProtocolError, our own mistake, does the
  same with its ``errno_hint``).  :meth:`abort` (synchronous) closes the
  socket immediately and fails what is in flight with ``ESHUTDOWN``.
  :meth:`aclose` waits for the requests in flight, sends NBD_CMD_DISC and
  closes ("Terminating the transmission phase": a soft disconnect).
* Negotiation: NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, falling back to
  NBD_OPT_EXPORT_NAME if the server answers NBD_REP_ERR_UNSUP.  A refusal
  raises :class:`ExportRefusedError` carrying the server's message; a
  protocol error raises ``BlockError(errno_hint)`` (EPROTO for the server's
  fault, EINVAL for ours, e.g. an export name too long to send).
  :func:`open_connection` (connect, tune, negotiate within the timeout, map
  the failures) and :func:`greet` are shared with the control client
  (``control.py``).
  With ``tls`` (:class:`~replfs.nbd.tls.ClientTLS`) NBD_OPT_STARTTLS is the
  first option and its TLS handshake replaces the FastSocket by a TLSSocket
  before anything else is said (:func:`start_tls`); a server that refuses
  STARTTLS is left at once (no plain-text fallback: the document's answer
  to downgrade attacks), and a certificate refused either way is EACCES.
  Requests larger than the server's maximum block size are split; features
  the server does not advertise are emulated (FUA -> write + flush,
  WRITE_ZEROES -> writes of zeroes, TRIM -> write zeroes, so a trimmed range
  reads back as zeroes as the BlockNode contract says).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from contextlib import asynccontextmanager

import trio

from replfs.block.base import BlockNode
from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd._events import ClientFlags, ExportInfo, OptAbort, OptExportName, OptGo, OptionError  # handshake
from replfs.nbd._events import ConnectionClosed, Disconnect, Reply, Request  # transmission
from replfs.nbd._events import OptPrivate, PrivateReply  # replfs's private option
from replfs.nbd._events import OptAck, OptStartTLS  # TLS
from replfs.nbd._sockio import FastSocket, RequestStats, tune_socket
from replfs.nbd._state import State
from replfs.nbd.tls import describe_ssl_error, start_client_tls
from replfs.nbd.connection import NEED_DATA, ClientConnection
from replfs.nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

log = logging.getLogger("replfs.nbd")

__all__ = ["NBDClient", "ExportRefusedError", "connect", "open_client"]

_ZERO_CHUNK = 1024 * 1024
#: Longest TRIM sent at once (its length field is 32 bits and it has no payload).
_TRIM_CHUNK = 1 << 30

_REFUSAL_ERRNO = {
    P.NBD_REP_ERR_UNKNOWN: errno.ENOENT,
    P.NBD_REP_ERR_POLICY: errno.EPERM,
    P.NBD_REP_ERR_SHUTDOWN: errno.ESHUTDOWN,
    P.NBD_REP_ERR_TLS_REQD: errno.EPERM,
    P.NBD_REP_ERR_INVALID: errno.EINVAL,
}


class ExportRefusedError(BlockError):
    """The server refused the export; ``str()`` includes the server's text."""

    def __init__(self, err: int, message: str, reply_type: int | None = None):
        super().__init__(err, message)
        self.reply_type = reply_type


class _Pending:
    """One request in flight: who waits for it, and how it ended."""

    __slots__ = ("task", "done", "error", "data", "exc")

    def __init__(self):
        self.task = None
        self.done = False
        self.error = 0
        self.data = None
        self.exc = None

    def abort(self, raise_cancel):
        """``wait_task_rescheduled``'s abort function: a cancelled caller
        stops waiting; the request stays on the wire and its reply is
        dropped."""
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class _Batch:
    """Several requests in flight, one waiter (:meth:`NBDClient.write_batch`):
    the reader counts the replies down and wakes the task at the last."""

    __slots__ = ("task", "left", "error", "exc", "done")

    def __init__(self, n: int):
        self.task = None
        self.done = False  # set by a connection failure (as on _Pending)
        self.left = n
        self.error = 0
        self.exc = None

    def abort(self, raise_cancel):
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class NBDClient(BlockNode):
    """One negotiated NBD connection.  Build it with :func:`connect` or
    :func:`open_client`; the reader and writer tasks must be running (see
    :meth:`start`) for requests to complete."""

    can_abort = True

    def __init__(self, sock, core: ClientConnection, info: ExportInfo, *, host: str, port: int, export_name: str):
        self._sock = sock
        self._core = core
        self.host = host
        self.port = port
        self.export_name = export_name
        self.name = f"nbd://{host}:{port}/{export_name}"
        self.size = info.size
        self.transmission_flags = info.transmission_flags
        bmin, bpref, bmax = info.block_size or (1, P.PREFERRED_BLOCK_SIZE, P.MAX_BLOCK_SIZE)
        #: (minimum, preferred, maximum) block size in force.
        self.block_size = (max(bmin, 1), bpref, bmax)
        self._min_block = max(bmin, 1)
        self._max_request = max(min(bmax, P.MAX_BLOCK_SIZE), self._min_block)
        if self._min_block > 1:
            self._max_request -= self._max_request % self._min_block
        self.read_only = bool(info.transmission_flags & P.NBD_FLAG_READ_ONLY)
        self._waiters: dict[int, _Pending] = {}
        self._next_cookie = 1
        self._out: list = []
        self._sending = False
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._drained: trio.Event | None = None
        self._failure: BlockError | None = None
        self._closing = False
        self._started = False
        self.stats = RequestStats()

    # -- lifecycle -----------------------------------------------------------------
    def start(self, nursery: trio.Nursery) -> None:
        """Start the reader and writer tasks in ``nursery`` (once).

        Neither task ever raises: a lost connection is reported through the
        requests.  Both end when the connection closes.
        """
        if self._started:
            raise RuntimeError("NBDClient already started")
        self._started = True
        nursery.start_soon(self._reader, name=f"nbd-reader {self.name}")
        nursery.start_soon(self._writer, name=f"nbd-writer {self.name}")

    @property
    def connected(self) -> bool:
        return self._failure is None

    @property
    def failure(self) -> BlockError | None:
        """Why the connection is unusable (None while it works)."""
        return self._failure

    def abort(self, reason: str = "connection aborted") -> None:
        """Close the connection now; requests in flight fail with ESHUTDOWN."""
        self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: {reason}"))

    def close(self) -> None:
        """Best-effort NBD_CMD_DISC without waiting, then close (idempotent)."""
        if self._failure is None and not self._sending and not self._out and not self._waiters:
            try:
                self._sock.send_nowait(self._core.send(Disconnect()))
            except (OSError, ProtocolError):
                pass
        self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: client closed"))

    async def aclose(self) -> None:
        """Soft disconnect: wait for requests in flight, send NBD_CMD_DISC, close."""
        if self._failure is None:
            self._closing = True
            try:
                while self._waiters and self._failure is None:
                    self._drained = trio.Event()
                    await self._drained.wait()
                if self._failure is None and not self._core.disconnect_sent:
                    self._out.extend(self._core.send_parts(Disconnect()))
                if self._failure is None:
                    await self._flush_out()
            finally:
                self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: client closed"))

    def _fail(self, exc: BlockError) -> None:
        """Mark the connection failed, close the socket, fail every waiter."""
        if self._failure is None:
            self._failure = exc
        self._sock.close()  # notifies tasks blocked on the socket
        waiters = self._waiters
        self._waiters = {}
        for p in waiters.values():
            p.exc = exc
            p.done = True
            if p.task is not None:
                trio.lowlevel.reschedule(p.task)
                p.task = None
        self._writer_lot.unpark_all()
        if self._drained is not None:
            self._drained.set()

    # -- background tasks ---------------------------------------------------------------
    async def _reader(self) -> None:
        core = self._core
        sock = self._sock
        reschedule = trio.lowlevel.reschedule
        try:
            while self._failure is None:
                waiters = self._waiters
                while True:
                    ev = core.next_event()
                    if type(ev) is Reply:
                        p = waiters.pop(ev.cookie, None)
                        if p is None:  # pragma: no cover - core checks cookies
                            continue
                        if type(p) is _Batch:
                            p.left -= 1
                            if ev.error and not p.error:
                                p.error = ev.error
                            if not p.left and p.task is not None:
                                reschedule(p.task)
                                p.task = None
                            continue
                        p.error = ev.error
                        p.data = ev.data
                        p.done = True
                        if p.task is not None:
                            reschedule(p.task)
                            p.task = None
                        if ev.error == P.NBD_ESHUTDOWN:
                            # "If the client receives an NBD_ESHUTDOWN error it
                            # MUST initiate a soft disconnect."
                            self._closing = True
                    elif ev is NEED_DATA:
                        break
                    elif type(ev) is ConnectionClosed:
                        if self._closing:
                            self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: disconnected"))
                        else:
                            self._fail(BlockError(errno.ECONNRESET, f"{self.name}: server closed the connection"))
                        return
                    else:  # pragma: no cover
                        raise RemoteProtocolError(f"unexpected event {ev!r}")
                if not waiters:
                    if self._drained is not None:
                        self._drained.set()
                    if self._closing and self._failure is None and not self._sending:
                        self._shutdown_disc()
                await sock.feed(core)
        except RemoteProtocolError as exc:
            log.warning("nbd: %s: protocol error from server: %s", self.name, exc)
            self._fail(BlockError(errno.ECONNRESET, f"{self.name}: protocol error from server: {exc}"))
        except LocalProtocolError as exc:  # our own mistake broke the core
            self._fail(BlockError(exc.errno_hint, f"{self.name}: {exc}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(BlockError(errno.ECONNRESET, f"{self.name}: connection lost: {exc}"))
        finally:
            if self._failure is None:
                self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: client stopped"))

    def _shutdown_disc(self) -> None:
        if not self._core.disconnect_sent:
            self._out.extend(self._core.send_parts(Disconnect()))
            self._writer_lot.unpark()

    async def _writer(self) -> None:
        lot = self._writer_lot
        try:
            while self._failure is None:
                if self._out and not self._sending:
                    await self._flush_out()
                else:
                    await lot.park()
        finally:
            if self._failure is None:
                self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: client stopped"))

    async def _flush_out(self) -> None:
        """Send everything queued (combining; shielded from cancellation)."""
        if self._sending:
            return
        self._sending = True
        try:
            # send_buffers is shielded where it waits: a request is sent
            # whole or the connection fails.
            while self._out and self._failure is None:
                bufs = self._out
                self._out = []
                await self._sock.send_buffers(bufs)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail(BlockError(errno.ECONNRESET, f"{self.name}: connection lost while sending: {exc}"))
        finally:
            self._sending = False

    # -- one request -------------------------------------------------------------------
    def _check_usable(self) -> None:
        """Raise unless a request may be queued now (started, not failed, not closing)."""
        if not self._started:
            raise RuntimeError(f"{self.name}: NBDClient.start(nursery) was not called")
        if self._failure is not None:
            raise BlockError(self._failure.errno, str(self._failure))
        if self._closing:
            raise BlockError(errno.ESHUTDOWN, f"{self.name}: client is disconnecting")

    async def _request(self, command: int, flags: int, offset: int, length: int, data=None):
        p = await self._send(command, flags, offset, length, data)
        return await self._wait(p, command, offset, length)

    async def _send(self, command: int, flags: int, offset: int, length: int,
                    data=None) -> _Pending:
        """Queue one request and send it (unless a send is under way, which
        takes it along); :meth:`_wait` for its reply."""
        self._check_usable()
        cookie = self._next_cookie
        self._next_cookie = cookie + 1
        try:
            parts = self._core.send_parts(Request(command, flags, cookie, offset, length, data))
        except LocalProtocolError as exc:
            # Our own mistake broke the core for good, and so the connection.
            self._fail(BlockError(exc.errno_hint, f"{self.name}: {exc}"))
            raise BlockError(self._failure.errno, str(self._failure)) from exc
        p = _Pending()
        waiters = self._waiters
        waiters[cookie] = p
        self.stats.requests += 1
        self._out += parts
        if len(waiters) == 1 and not self._sending:
            await self._flush_out()
        else:
            self._writer_lot.unpark()
        return p

    async def _wait(self, p: _Pending, command: int, offset: int, length: int):
        if not p.done:
            p.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(p.abort)
        if p.exc is not None:
            raise BlockError(p.exc.errno, str(p.exc))
        if p.error:
            self.stats.errors += 1
            err = P.nbd_to_errno(p.error)
            raise BlockError(
                err,
                f"{self.name}: {P.command_name(command)} of {length} bytes at {offset} failed: "
                f"{os.strerror(err)}",
            )
        return p.data

    # -- a request sent now, its reply awaited later (the sync protocol's overlap) ---
    async def begin_write(self, offset: int, data, fua: bool = False):
        """Send a write now; :meth:`end` awaits its reply.  None when the
        write is not one plain request (beyond the server's largest, or FUA
        the server cannot do): then :meth:`write` it.  Design note: the
        mirror sends a write to the peer before it writes the local image,
        so the two overlap (QEMU's quorum issues both children at once)."""
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        length = len(data)
        if not 0 < length <= self._max_request or offset < 0 or offset + length > self.size:
            return None
        flags = self._check_write(offset, length, fua)
        if fua and not flags:
            return None
        p = await self._send(P.NBD_CMD_WRITE, flags, offset, length, data)
        stats = self.stats
        stats.writes += 1
        stats.bytes_written += length
        return (p, P.NBD_CMD_WRITE, offset, length)

    async def begin_flush(self):
        """Send NBD_CMD_FLUSH now (:meth:`end` awaits it); None if the server
        has no flush (then there is nothing to wait for)."""
        if not self.transmission_flags & P.NBD_FLAG_SEND_FLUSH:
            if self._failure is not None:
                raise BlockError(self._failure.errno, str(self._failure))
            return None
        p = await self._send(P.NBD_CMD_FLUSH, 0, 0, 0)
        self.stats.flushes += 1
        return (p, P.NBD_CMD_FLUSH, 0, 0)

    async def end(self, started) -> None:
        """Wait for what :meth:`begin_write` / :meth:`begin_flush` sent;
        raises as :meth:`write` / :meth:`flush` would."""
        await self._wait(*started)

    async def write_batch(self, items: list) -> None:
        """Write every ``(offset, data)`` of ``items`` (each at most the
        server's largest request): all requests go out in one send and one
        wait covers their replies, so a batch of small writes costs about
        one write's overhead here.  The first error is raised (the others
        may have landed).  Design note: for the checkpoint protocol's
        streamer, which sends many small, unrelated writes at once."""
        if not items:
            return
        self._check_usable()
        flags = []
        for offset, data in items:  # all checked before any is queued
            length = len(data)
            if offset < 0 or offset + length > self.size:
                raise BlockError(errno.EINVAL, f"{self.name}: a batched write of {length} bytes "
                                               f"at {offset} is beyond the disk's {self.size}")
            if length > self._max_request:
                raise BlockError(errno.EINVAL, f"{self.name}: a batched write of {length} "
                                               f"bytes exceeds {self._max_request}")
            flags.append(self._check_write(offset, length))
        batch = _Batch(len(items))
        waiters, out, core = self._waiters, self._out, self._core
        total = 0
        try:
            for (offset, data), fl in zip(items, flags):
                cookie = self._next_cookie
                self._next_cookie = cookie + 1
                out += core.send_parts(Request(P.NBD_CMD_WRITE, fl, cookie, offset, len(data),
                                               data))
                waiters[cookie] = batch
                total += len(data)
        except LocalProtocolError as exc:
            self._fail(BlockError(exc.errno_hint, f"{self.name}: {exc}"))
            raise BlockError(self._failure.errno, str(self._failure)) from exc
        n = len(items)
        stats = self.stats
        stats.requests += n
        stats.writes += n
        stats.bytes_written += total
        if not self._sending:
            await self._flush_out()
        else:
            self._writer_lot.unpark()
        if batch.left and batch.exc is None:
            batch.task = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(batch.abort)
        if batch.exc is not None:
            raise BlockError(batch.exc.errno, str(batch.exc))
        if batch.error:
            stats.errors += 1
            err = P.nbd_to_errno(batch.error)
            raise BlockError(err, f"{self.name}: a batched write failed: {os.strerror(err)}")

    def _check_aligned(self, offset: int, length: int) -> None:
        m = self._min_block
        if m > 1 and (offset % m or length % m):
            raise BlockError(
                errno.EINVAL,
                f"{self.name}: request at {offset} of {length} bytes is not aligned to the "
                f"server's minimum block size {m}",
            )

    def _check_write(self, offset: int, length: int, fua: bool = False) -> int:
        """Refuse what the server would refuse anyway; returns the command
        flags: FUA when asked for and the server can do it (otherwise 0, and
        a caller that asked for FUA flushes afterwards)."""
        if self.read_only:
            raise BlockError(errno.EPERM, f"{self.name}: export is read-only")
        self._check_aligned(offset, length)
        if fua and self.transmission_flags & P.NBD_FLAG_SEND_FUA:
            return P.NBD_CMD_FLAG_FUA
        return 0

    # -- BlockNode interface (the base class checks bounds and skips length 0) -----------
    async def _read(self, offset: int, length: int) -> bytes:
        self._check_aligned(offset, length)
        limit = self._max_request
        if length <= limit:
            data = await self._request(P.NBD_CMD_READ, 0, offset, length)
        else:
            pieces = []
            for off in range(offset, offset + length, limit):
                pieces.append(await self._request(P.NBD_CMD_READ, 0, off, min(limit, offset + length - off)))
            data = b"".join(pieces)
        stats = self.stats
        stats.reads += 1
        stats.bytes_read += length
        return data if type(data) is bytes else bytes(data)

    async def _write(self, offset: int, data, fua: bool) -> None:
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        length = len(data)
        flags = self._check_write(offset, length, fua)
        limit = self._max_request
        if length <= limit:
            await self._request(P.NBD_CMD_WRITE, flags, offset, length, data)
        else:
            view = memoryview(data)
            for pos in range(0, length, limit):
                chunk = view[pos : pos + limit]
                await self._request(P.NBD_CMD_WRITE, flags, offset + pos, len(chunk), chunk)
        stats = self.stats
        stats.writes += 1
        stats.bytes_written += length
        if fua and not flags:
            await self.flush()

    async def _write_zeroes(self, offset: int, length: int, fua: bool) -> None:
        flags = self._check_write(offset, length, fua)
        if not self.transmission_flags & P.NBD_FLAG_SEND_WRITE_ZEROES:
            zeroes = bytes(min(length, _ZERO_CHUNK))
            for off in range(offset, offset + length, len(zeroes)):
                n = min(len(zeroes), offset + length - off)
                await self._write(off, zeroes[:n] if n < len(zeroes) else zeroes, fua)
            return
        limit = self._max_request
        for off in range(offset, offset + length, limit):
            await self._request(P.NBD_CMD_WRITE_ZEROES, flags, off, min(limit, offset + length - off))
        if fua and not flags:
            await self.flush()

    async def _trim(self, offset: int, length: int) -> None:
        self._check_write(offset, length)
        if not self.transmission_flags & P.NBD_FLAG_SEND_TRIM:
            await self._write_zeroes(offset, length, False)
            return
        step = _TRIM_CHUNK - _TRIM_CHUNK % self._min_block
        for off in range(offset, offset + length, step):
            await self._request(P.NBD_CMD_TRIM, 0, off, min(step, offset + length - off))

    async def flush(self) -> None:
        if self.transmission_flags & P.NBD_FLAG_SEND_FLUSH:
            await self._request(P.NBD_CMD_FLUSH, 0, 0, 0)
            self.stats.flushes += 1
        elif self._failure is not None:
            raise BlockError(self._failure.errno, str(self._failure))

    def statistics(self) -> dict:
        return {
            "peer": f"{self.host}:{self.port}",
            "export": self.export_name,
            "connected": self._failure is None,
            "failure": None if self._failure is None else str(self._failure),
            "size": self.size,
            "transmission_flags": self.transmission_flags,
            **self.stats.as_dict(),
            "in_flight": len(self._waiters),
        }


# -- connecting ----------------------------------------------------------------------
def _errno_of(exc: BaseException, default: int) -> int:
    """The errno of an OSError, looking inside trio's 'all attempts failed'."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                err = _errno_of(sub, 0)
                if err:
                    return err
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return default


async def _next(core: ClientConnection, sock, where: str, closed_ok: bool = False):
    while True:
        ev = core.next_event()
        if type(ev) is ConnectionClosed and not closed_ok:
            raise BlockError(errno.ECONNRESET, f"{where}: server closed the connection during negotiation")
        if ev is not NEED_DATA:
            return ev
        await sock.feed(core)


async def greet(sock, core: ClientConnection, where: str) -> int:
    """Read the greeting, answer with every client flag the server offers;
    returns those flags.  Once done (e.g. before STARTTLS) it only returns
    them."""
    if core.state is not State.GREETING:
        return core.client_flags
    greeting = await _next(core, sock, where)
    hflags = greeting.handshake_flags
    cflags = 0
    if hflags & P.NBD_FLAG_FIXED_NEWSTYLE:
        cflags |= P.NBD_FLAG_C_FIXED_NEWSTYLE
    if hflags & P.NBD_FLAG_NO_ZEROES:
        cflags |= P.NBD_FLAG_C_NO_ZEROES
    await sock.send_buffers([core.send(ClientFlags(cflags))])
    return cflags


async def _claim(sock, core: ClientConnection, claim: bytes, export_name: str, where: str) -> None:
    """Send replfs's private option ``claim`` (an encoded control request,
    e.g. the primary identifying itself as the export's writer) before
    NBD_OPT_GO.  A server that does not know the option (NBD_REP_ERR_UNSUP:
    qemu-nbd, nbdkit) is fine; any other error refuses the export."""
    await sock.send_buffers(core.send_parts(OptPrivate(claim)))
    ev = await _next(core, sock, where)
    if type(ev) is PrivateReply:
        return
    if type(ev) is OptionError and ev.reply_type == P.NBD_REP_ERR_UNSUP:
        return
    if type(ev) is not OptionError:
        raise RemoteProtocolError(f"unexpected answer to replfs's option: {ev!r}")
    await _refused(sock, core, ev, export_name, where)


async def _refused(sock, core: ClientConnection, ev: OptionError, export_name: str, where: str):
    """The server refused the export with ``ev``: disconnect softly
    ("Termination of the session during option haggling"; mandatory after
    NBD_REP_ERR_SHUTDOWN), then raise :class:`ExportRefusedError`."""
    try:
        await sock.send_buffers([core.send(OptAbort())])
    except (OSError, trio.BrokenResourceError, ProtocolError):
        pass
    err = _REFUSAL_ERRNO.get(ev.reply_type, errno.EIO)
    text = f": {ev.message}" if ev.message else ""
    raise ExportRefusedError(
        err, f"{where}: server refused export {export_name!r} ({ev.reply_name}){text}", ev.reply_type
    )


async def _negotiate(sock, core: ClientConnection, export_name: str, where: str,
                     claim: bytes | None = None) -> ExportInfo:
    cflags = await greet(sock, core, where)
    if cflags & P.NBD_FLAG_C_FIXED_NEWSTYLE:
        if claim is not None:
            await _claim(sock, core, claim, export_name, where)
        await sock.send_buffers([core.send(OptGo(export_name, (P.NBD_INFO_BLOCK_SIZE,)))])
        ev = await _next(core, sock, where)
        if type(ev) is ExportInfo:
            return ev
        if type(ev) is OptionError and ev.reply_type != P.NBD_REP_ERR_UNSUP:
            await _refused(sock, core, ev, export_name, where)
        if type(ev) is not OptionError:
            raise RemoteProtocolError(f"unexpected answer to NBD_OPT_GO: {ev!r}")
    # Fallback: the server does not know NBD_OPT_GO.
    await sock.send_buffers([core.send(OptExportName(export_name))])
    ev = await _next(core, sock, where, closed_ok=True)
    if type(ev) is ExportInfo:
        return ev
    raise ExportRefusedError(
        errno.ENOENT, f"{where}: server closed the connection on export {export_name!r} (unknown or refused)"
    )


async def connect(
    host: str,
    port: int,
    export_name: str = "",
    *,
    nursery: trio.Nursery | None = None,
    connect_timeout: float = 10.0,
    claim: bytes | None = None,
    tls=None,
) -> NBDClient:
    """Connect and negotiate ``export_name``; returns the :class:`NBDClient`.

    With ``nursery`` the client's reader and writer tasks are started there
    (they never raise; they end when the connection closes).  Without it,
    call ``client.start(nursery)`` before the first request.

    Raises :class:`BlockError` (ECONNREFUSED, ETIMEDOUT, ...) when the server
    cannot be reached and :class:`ExportRefusedError` (a BlockError) when it
    refuses the export.  With ``tls`` (a :class:`~replfs.nbd.tls.ClientTLS`)
    the connection starts TLS before any other option and fails (EACCES,
    EPROTONOSUPPORT) rather than go on in plain text.
    """
    where = f"{'nbds' if tls is not None else 'nbd'}://{host}:{port}/{export_name}"
    sock, core, info = await open_connection(
        host, port, where, connect_timeout, lambda sock, core: _negotiate(sock, core, export_name, where, claim),
        tls=tls,
    )
    client = NBDClient(sock, core, info, host=host, port=port, export_name=export_name)
    if nursery is not None:
        client.start(nursery)
    return client


async def start_tls(sock, core: ClientConnection, tls, where: str):
    """Greet, send NBD_OPT_STARTTLS as the first option and do the TLS
    handshake; returns the :class:`~replfs.nbd.tls.TLSSocket` that replaces
    ``sock``.  A server that refuses TLS is left (the document: a client that
    only wants TLS SHOULD terminate the session): BlockError
    EPROTONOSUPPORT; a failed handshake raises ``ssl.SSLError``."""
    if not await greet(sock, core, where) & P.NBD_FLAG_C_FIXED_NEWSTYLE:
        raise BlockError(errno.EPROTONOSUPPORT, f"{where}: the server cannot negotiate TLS "
                                                f"(no fixed newstyle negotiation)")
    await sock.send_buffers([core.send(OptStartTLS())])
    ev = await _next(core, sock, where)
    if type(ev) is OptionError:
        text = f": {ev.message}" if ev.message else ""
        raise BlockError(errno.EPROTONOSUPPORT, f"{where}: the server does not offer TLS "
                                                f"({ev.reply_name}{text}); not going on in plain text")
    if type(ev) is not OptAck:
        raise RemoteProtocolError(f"unexpected answer to NBD_OPT_STARTTLS: {ev!r}")
    return await start_client_tls(sock, tls, core.take_pending_bytes())


async def open_connection(host: str, port: int, where: str, connect_timeout: float, negotiate,
                          tls=None):
    """Connect, tune the socket and run ``await negotiate(sock, core)``, all
    within ``connect_timeout``; returns ``(sock, core, what negotiate
    returned)``.  Failures close the socket and become :class:`BlockError`
    (what ``negotiate`` raises itself passes through).  With ``tls`` (a
    :class:`~replfs.nbd.tls.ClientTLS`) the connection starts TLS first
    (:func:`start_tls`) and ``negotiate`` gets the TLS socket; a TLS failure
    (a certificate refused either way) is BlockError EACCES."""
    sock = None
    try:
        with trio.fail_after(connect_timeout):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except socket.gaierror as exc:  # its errno is an EAI_* code, not an errno
                raise BlockError(errno.EHOSTUNREACH, f"{where}: cannot resolve "
                                 f"{host!r}: {exc.strerror}") from exc
            except OSError as exc:
                err = _errno_of(exc, errno.ECONNREFUSED)
                raise BlockError(err, f"{where}: cannot connect: {os.strerror(err)}") from exc
            sock = FastSocket(stream.socket)
            tune_socket(sock)
            core = ClientConnection()
            if tls is not None:
                plain = sock
                try:
                    sock = await start_tls(sock, core, tls, where)
                except BaseException:
                    plain.close()
                    raise
            result = await negotiate(sock, core)
    except trio.TooSlowError:
        if sock is not None:
            sock.close()
        raise BlockError(errno.ETIMEDOUT, f"{where}: no answer within {connect_timeout:g} s") from None
    except ProtocolError as exc:
        sock.close()
        raise BlockError(exc.errno_hint, f"{where}: handshake failed: {exc}") from exc
    except ssl.SSLError as exc:
        sock.close()
        raise BlockError(errno.EACCES, f"{where}: TLS failed: {describe_ssl_error(exc)}") from exc
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if sock is not None:
            sock.close()
        err = _errno_of(exc, errno.ECONNRESET)
        raise BlockError(err, f"{where}: handshake failed: {exc}") from exc
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock, core, result


@asynccontextmanager
async def open_client(host: str, port: int, export_name: str = "", *, connect_timeout: float = 10.0, tls=None):
    """``async with open_client(...) as client:`` -- a connected client whose
    tasks live in a private nursery.  Leaving the block normally disconnects
    cleanly (:meth:`NBDClient.aclose`); leaving it with an exception aborts.

    Errors from connecting, and from the body, propagate unchanged (not
    wrapped in an exception group).
    """
    client = await connect(host, port, export_name, connect_timeout=connect_timeout, tls=tls)
    body_exc = None
    async with trio.open_nursery() as nursery:
        client.start(nursery)
        try:
            yield client
        except BaseException as exc:
            # Re-raised below, outside the nursery, so that it is not
            # wrapped in an ExceptionGroup.
            body_exc = exc
            client.abort("client context left with an error")
        else:
            await client.aclose()
        finally:
            client.abort("client context closed")
    if body_exc is not None:
        try:
            raise body_exc
        finally:
            body_exc = None
