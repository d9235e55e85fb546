"""The control channel between the primary and the secondary: replfs's
private NBD extension, ``NBD_OPT_X_REPLFS``.

Design note
-----------
Continuous replication needs a few calls besides the data path (reconnect,
resync, generation check, digests).  They travel on a connection of their
own, to the same NBD server, that never leaves option haggling: it never
sends NBD_OPT_GO, and each call is one option and its answer.

Why a private *option*: the NBD document ("Baseline") makes every server
answer an option it does not know with NBD_REP_ERR_UNSUP and keep
negotiating, so a plain server (qemu-nbd, nbdkit) simply says "unsupported"
and the client raises :class:`ControlUnsupported`; a private command or flag
in transmission would not be that safe.  The number is a third-party one,
not registered in the document: ``NBD_OPT_X_REPLFS = 0x52504C46`` ("RPLF").

Wire format (everything else is ordinary fixed newstyle negotiation):

* C: ``IHAVEOPT``, ``NBD_OPT_X_REPLFS``, length, then the request: one JSON
  object, UTF-8, at most :data:`~replfs.nbd.proto.MAX_CONTROL_PAYLOAD`
  (4 MiB; other options stay under 64 KiB).
* S, success: one option reply of type ``NBD_REP_X_REPLFS`` (0x52504C46,
  bit 31 clear) whose data is the answer, one JSON object of at most 4 MiB.
* S, refusal: one NBD_REP_ERR_* reply whose data is a UTF-8 message (at most
  4096 bytes, the document's string limit), e.g. NBD_REP_ERR_POLICY "split
  brain: ...".  The connection goes on either way.
* C: NBD_OPT_ABORT ends the connection politely (S: NBD_REP_ACK).

The server side is ``NBDServer(control=...)`` (``server.py``); this module
holds the message codec both sides use and the client:

``client = await open_control(host, port, connect_timeout=10.0, nursery=None, tls=None)``
    connects and does the handshake (within ``connect_timeout``; with
    ``tls``, NBD_OPT_STARTTLS and the TLS handshake first, so every call
    and answer is encrypted and the server has checked our certificate); a server
    without fixed newstyle negotiation cannot answer an unknown option, so it
    is reported as :class:`ControlUnsupported` at once.  With ``nursery`` a
    watcher task runs there that, between calls, notices the server hanging
    up or the link dying (keepalive, as on the data path) and marks the
    client failed (:attr:`ControlClient.failure`,
    :meth:`ControlClient.wait_closed`); without it a lost link shows at the
    next call.  The client is also an async context manager
    (``async with await open_control(...) as client``): leaving the block
    closes it politely, leaving it with an exception aborts it.

``await client.call(request, timeout=None) -> dict``
    one call; concurrent callers take turns (a lock: the protocol allows one
    option at a time).  Raises :class:`ControlUnsupported` (NBD_REP_ERR_UNSUP:
    a plain NBD server), :class:`ControlRefused` ``(code, message)``, or
    :class:`~replfs.errors.BlockError` when the link is lost (ECONNRESET;
    ETIMEDOUT when keepalive gave up on the peer) or the server breaks the
    protocol (EPROTO).  After
    either refusal the connection is still usable.  A request that is not a
    dict of JSON values raises TypeError or ValueError, one over 4 MiB
    ValueError, before anything is sent.  A call that times out once sent
    (BlockError ETIMEDOUT) or is cancelled once sent (later calls: ECANCELED)
    drops the connection, since its answer could still arrive and no other
    call may be sent before it; timing out while an earlier call still runs
    leaves the connection alone.

``client.abort()`` closes at once; ``await client.aclose()`` waits for a
call in progress, sends NBD_OPT_ABORT and waits briefly for the ACK.
"""

from __future__ import annotations

import errno
import json
import math
import ssl
from contextlib import asynccontextmanager
from typing import Self

import trio

from replfs.errors import BlockError
from replfs.nbd import proto as P
from replfs.nbd._events import ConnectionClosed, OptAbort, OptionError, OptPrivate, PrivateReply
from replfs.nbd.client import _errno_of, greet, open_connection
from replfs.nbd.connection import NEED_DATA, ClientConnection
from replfs.nbd.errors import ControlRefused, ControlUnsupported, ProtocolError
from replfs.nbd.tls import describe_ssl_error

__all__ = [
    "ControlClient",
    "ControlRefused",
    "ControlUnsupported",
    "decode_message",
    "encode_message",
    "fit_message",
    "open_control",
]

_LOST = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


# -- messages ----------------------------------------------------------------------
def encode_message(message: dict) -> bytes:
    """A request or an answer on the wire: compact JSON, UTF-8.  Raises
    TypeError for anything but a dict of JSON values, ValueError for NaN or
    infinity (not JSON) and circular references.  The size is the caller's
    to check (against ``MAX_CONTROL_PAYLOAD``)."""
    if not isinstance(message, dict):
        raise TypeError(f"a control message is a dict, not {type(message).__name__}")
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_message(payload: bytes) -> dict:
    """The dict a request or an answer carries; ValueError when it is not
    one JSON object in UTF-8."""
    message = json.loads(bytes(payload).decode("utf-8"))  # both errors are ValueErrors
    if not isinstance(message, dict):
        raise ValueError(f"a control message is a JSON object, not {type(message).__name__}")
    return message


def fit_message(text: str) -> str:
    """``text`` as an option error may carry it: no NUL, at most 4096 UTF-8
    bytes (cut at a character, with "..."); anything shorter is unchanged."""
    text = str(text).replace("\0", "\\0")
    raw = text.encode("utf-8")
    if len(raw) <= P.MAX_STRING:
        return text
    return raw[: P.MAX_STRING - 3].decode("utf-8", "ignore") + "..."


# -- the client --------------------------------------------------------------------
class ControlClient:
    """One control connection, in option haggling (see the module's note).
    Build it with :func:`open_control`."""

    def __init__(self, sock, core: ClientConnection, *, host: str, port: int):
        self._sock = sock
        self._core = core
        self.host = host
        self.port = port
        self.name = f"nbd://{host}:{port} (control)"
        #: Held by the task that reads or writes the socket: a call, aclose,
        #: or the idle watcher.
        self._lock = trio.Lock()
        #: Tasks waiting for the lock to call or close (the watcher yields).
        self._callers = 0
        #: The watcher's wait for the socket, while it waits.
        self._idle_scope: trio.CancelScope | None = None
        self._failure: BlockError | None = None
        self._closed = trio.Event()
        self.calls = 0

    # -- state -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._failure is None

    @property
    def failure(self) -> BlockError | None:
        """Why the connection is unusable (None while it works)."""
        return self._failure

    async def wait_closed(self) -> None:
        """Returns once the connection has ended, for whatever reason."""
        await self._closed.wait()

    def _fail(self, exc: BlockError) -> None:
        """Mark the connection failed (the first reason stays) and close it."""
        if self._failure is None:
            self._failure = exc
        self._sock.close()  # wakes a task blocked on the socket
        self._closed.set()

    def _lost(self, exc: BaseException) -> None:
        """The link broke: ETIMEDOUT when the kernel gave up on the peer
        (keepalive, TCP_USER_TIMEOUT), EACCES for a TLS failure (the server
        refusing our certificate shows here with TLS 1.3), else ECONNRESET."""
        if isinstance(exc, ssl.SSLError):  # e.g. the server refused our certificate
            self._fail(BlockError(errno.EACCES, f"{self.name}: TLS failed: {describe_ssl_error(exc)}"))
            return
        err = errno.ETIMEDOUT if _errno_of(exc, errno.ECONNRESET) == errno.ETIMEDOUT else errno.ECONNRESET
        self._fail(BlockError(err, f"{self.name}: connection lost: {exc or type(exc).__name__}"))

    def _check(self) -> None:
        if self._failure is not None:
            raise BlockError(self._failure.errno, str(self._failure))

    # -- calls -------------------------------------------------------------------
    async def call(self, request: dict, *, timeout: float | None = None) -> dict:
        """Send ``request``, return the server's answer (see the module's
        note for the errors).  ``timeout`` (seconds; None: no limit) bounds
        the whole call, waiting for an earlier call included."""
        payload = encode_message(request)
        if len(payload) > P.MAX_CONTROL_PAYLOAD:
            raise ValueError(f"control request of {len(payload)} bytes exceeds {P.MAX_CONTROL_PAYLOAD}")
        sent = answered = False
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                async with self._turn():
                    self._check()
                    sent = True
                    await self._sock.send_cancellable(self._core.send_parts(OptPrivate(payload)))
                    ev = await self._next_event()
                    answered = True
            if scope.cancelled_caught:
                late = BlockError(errno.ETIMEDOUT, f"{self.name}: no answer within {timeout:g} s")
                if sent:
                    self._fail(late)
                raise late  # (still waiting for an earlier call: the connection is fine)
        except ProtocolError as exc:
            self._fail(BlockError(exc.errno_hint, f"{self.name}: protocol error: {exc}"))
        except _LOST as exc:
            self._lost(exc)
        finally:
            if sent and not answered:
                # Cancelled between sending and the answer: it could still come.
                self._fail(BlockError(errno.ECANCELED, f"{self.name}: a call was interrupted; connection dropped"))
        self._check()
        return self._result(ev)

    def _result(self, ev) -> dict:
        """The answer an event from the server stands for, or its error."""
        t = type(ev)
        if t is PrivateReply:
            try:
                answer = decode_message(ev.payload)
            except ValueError as exc:
                failure = BlockError(errno.EPROTO, f"{self.name}: the answer is not a JSON object: {exc}")
            else:
                self.calls += 1
                return answer
        elif t is OptionError:
            if ev.reply_type == P.NBD_REP_ERR_UNSUP:
                raise ControlUnsupported(ev.message)
            raise ControlRefused(ev.reply_type, ev.message)
        elif t is ConnectionClosed:
            failure = BlockError(errno.ECONNRESET, f"{self.name}: server closed the connection")
        else:  # pragma: no cover - the core returns nothing else here
            failure = BlockError(errno.EPROTO, f"{self.name}: unexpected answer {ev!r}")
        self._fail(failure)
        raise BlockError(failure.errno, str(failure))  # a copy: the stored one keeps no traceback

    async def _next_event(self):
        core = self._core
        while (ev := core.next_event()) is NEED_DATA:
            await self._sock.feed(core)
        return ev

    @asynccontextmanager
    async def _turn(self):
        """Hold the socket: wait for a call in progress and stop the idle
        watcher (it yields to every task counted in ``_callers``)."""
        self._callers += 1
        try:
            if self._idle_scope is not None:
                self._idle_scope.cancel()
            await self._lock.acquire()
        finally:
            self._callers -= 1
        try:
            yield
        finally:
            self._lock.release()

    # -- between calls -------------------------------------------------------------
    async def _watch(self) -> None:
        """While no call runs, wait for the socket: the server must be
        silent, so anything readable is a hang-up, a reset or a protocol
        error, and fails the client.  Never raises (but Cancelled)."""
        try:
            while self._failure is None:
                async with self._lock:
                    if self._callers or self._failure is not None:
                        continue  # trio's lock is fair: a waiting caller goes first
                    with trio.CancelScope() as self._idle_scope:
                        await self._sock.wait_readable()
                    self._idle_scope = None
                    if self._callers:
                        continue
                    await self._sock.feed(self._core)
                    self._result(self._core.next_event())
        except ProtocolError as exc:
            self._fail(BlockError(exc.errno_hint, f"{self.name}: protocol error: {exc}"))
        except BlockError:
            pass  # failed, by _result
        except _LOST as exc:
            self._lost(exc)
        finally:
            self._idle_scope = None

    # -- ending ------------------------------------------------------------------------
    def abort(self, reason: str = "connection aborted") -> None:
        """Close the connection now; a call in progress fails with ESHUTDOWN."""
        self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: {reason}"))

    async def aclose(self, timeout: float = 5.0) -> None:
        """Soft disconnect: wait for a call in progress, send NBD_OPT_ABORT,
        wait for the server's ACK (or its hang-up), close; all within
        ``timeout`` (then it just closes, failing a call still running with
        ESHUTDOWN).  Idempotent."""
        if self._failure is not None:
            return
        try:
            with trio.move_on_after(timeout):
                async with self._turn():
                    if self._failure is None:
                        await self._sock.send_cancellable(self._core.send_parts(OptAbort()))
                        await self._next_event()  # OptAck, or ConnectionClosed
        except (ProtocolError, *_LOST):
            pass
        finally:
            self._fail(BlockError(errno.ESHUTDOWN, f"{self.name}: closed"))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            await self.aclose()
        else:
            self.abort("control context left with an error")


async def _greet_fixed(sock, core: ClientConnection, where: str) -> None:
    if not await greet(sock, core, where) & P.NBD_FLAG_C_FIXED_NEWSTYLE:
        raise ControlUnsupported("the server does not offer fixed newstyle negotiation")


async def open_control(
    host: str,
    port: int,
    *,
    connect_timeout: float = 10.0,
    nursery: trio.Nursery | None = None,
    tls=None,
) -> ControlClient:
    """Connect to ``host:port`` and do the handshake; returns the
    :class:`ControlClient` (see the module's note).

    Raises :class:`~replfs.errors.BlockError` (ECONNREFUSED, ETIMEDOUT, ...)
    when the server cannot be reached, :class:`ControlUnsupported` when it
    cannot negotiate options at all.  Whether it knows the control option
    shows at the first call.  With ``tls`` (a
    :class:`~replfs.nbd.tls.ClientTLS`) the connection starts TLS first, as
    a data connection does, and every call travels inside it.
    """
    where = f"{'nbds' if tls is not None else 'nbd'}://{host}:{port} (control)"
    sock, core, _ = await open_connection(
        host, port, where, connect_timeout, lambda sock, core: _greet_fixed(sock, core, where), tls=tls
    )
    client = ControlClient(sock, core, host=host, port=port)
    if nursery is not None:
        nursery.start_soon(client._watch, name=f"nbd-control-watch {host}:{port}")
    return client
