"""What the trio NBD server and client share: sockets, receiving, counters.

Design note
-----------
Both ends of the replication link want the same socket treatment: Nagle off
(the NBD document, "Protocol phases": both sides SHOULD set TCP_NODELAY) and
big kernel buffers so a burst of VM writes never stalls on a full send
buffer.  Both also receive the same way (:meth:`FastSocket.feed`: bytes
from the socket into the sans-IO core, the rest of a large payload with
``recv_into`` straight into its final buffer).  Output is gathered as a
list of buffers and written with one ``send`` (small total: joined first, a
join of a few KiB is cheaper than an iovec) or ``sendmsg`` (large payloads:
never concatenated), looping over partial writes.  Both count requests the
same way (:class:`RequestStats`, the keys of their ``statistics()``).

The control channel (``control.py``) uses the same socket treatment: its
connection stays open, idle, for a whole pairing, and keepalive (below) is
what notices a peer host that died.  It sends with
:meth:`FastSocket.send_cancellable`, because a call's timeout must be able to
interrupt a send that the peer does not read; the channel is dropped
whenever that happens, so a half-sent message does no harm.

TLS (``tls.py``) is not a layer under this class: a connection that
negotiates NBD_OPT_STARTTLS replaces its ``FastSocket`` by a ``TLSSocket``
with the same methods, so a plain connection runs exactly this code.
"""

from __future__ import annotations

import socket

import trio

from replfs.core.counters import Counters

#: Requested SO_SNDBUF / SO_RCVBUF.  Linux doubles the value and caps it at
#: net.core.{w,r}mem_max; setting it switches autotuning off, so we only set
#: it when the cap allows at least this much.
SOCKET_BUFFER = 4 * 1024 * 1024
#: Below this total, output buffers are joined and sent with one ``send``.
JOIN_LIMIT = 64 * 1024
#: Most iovecs passed to one ``sendmsg`` (IOV_MAX is 1024 on Linux).
MAX_IOV = 256
#: Bytes asked for per ``recv``.
RECV_SIZE = 256 * 1024
#: Every this many receives in a row that found data waiting, one yields.
_STREAK = 8


class RequestStats(Counters):
    """Requests over one client's connection, or over all of a server's."""

    __slots__ = ("requests", "reads", "writes", "bytes_read", "bytes_written", "flushes", "errors")


def _sysctl(name: str) -> int:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


_CAPS = {socket.SO_SNDBUF: _sysctl("wmem_max"), socket.SO_RCVBUF: _sysctl("rmem_max")}


#: A peer whose host dies (no FIN, no RST) is noticed after about
#: KEEPIDLE + KEEPINTVL * KEEPCNT seconds of silence (10 s), or once data
#: has gone unacknowledged for USER_TIMEOUT_MS.
KEEPIDLE, KEEPINTVL, KEEPCNT = 5, 1, 5
USER_TIMEOUT_MS = 10_000


def tune_socket(sock) -> None:
    """TCP_NODELAY, keepalive and large buffers on a connected TCP socket
    (best effort)."""
    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPIDLE), ("TCP_KEEPINTVL", KEEPINTVL),
                        ("TCP_KEEPCNT", KEEPCNT), ("TCP_USER_TIMEOUT", USER_TIMEOUT_MS)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass
    for opt, cap in _CAPS.items():
        if cap >= SOCKET_BUFFER:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
            except OSError:
                pass


class FastSocket:
    """A connected stream socket driven with trio's low-level waits.

    Takes ownership of a trio socket.  ``send_buffers`` first tries a plain
    non-blocking ``send`` and only waits (``wait_writable``) when the kernel
    buffer is full, so sending a reply or request costs no trip through the
    trio scheduler.  Those waits are shielded from cancellation: a message is
    either sent whole or the socket is closed (a half-sent message would
    corrupt the stream).  :meth:`feed` (one receive step for a sans-IO core)
    waits with ``wait_readable`` when nothing is there; when data is there at
    once it returns without yielding, except that every ``_STREAK``-th such
    call in a row is a checkpoint, so a peer that keeps the socket full
    cannot starve other tasks.  :meth:`close` wakes any task blocked on the
    socket with ``trio.ClosedResourceError`` (``notify_closing``).
    """

    __slots__ = ("sock", "peer", "_streak")

    def __init__(self, trio_sock):
        self.sock = socket.socket(fileno=trio_sock.detach())
        self.sock.setblocking(False)
        self._streak = 0
        try:
            self.peer = self.sock.getpeername()
        except OSError:
            self.peer = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def setsockopt(self, *args) -> None:
        self.sock.setsockopt(*args)

    def close(self) -> None:
        if self.sock.fileno() != -1:
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()

    async def wait_readable(self) -> None:
        """Returns once a :meth:`feed` would not wait (data or end of file)."""
        self._check_open()
        await trio.lowlevel.wait_readable(self.sock)

    def send_nowait(self, data: bytes) -> None:
        """Best effort, never waits: whatever the kernel takes now (the
        client's parting NBD_CMD_DISC)."""
        self.sock.send(data)

    def _check_open(self) -> None:
        if self.sock.fileno() == -1:
            raise trio.ClosedResourceError("socket was closed")

    async def feed(self, core) -> None:
        """One receive step for a sans-IO core (``connection.py``): the rest
        of a large payload goes straight into the buffer the core offers
        (``recv_into``), anything else through ``receive_data``; end of file
        is fed as ``b""``.  Raises ``trio.ClosedResourceError`` once
        :meth:`close` was called, ``OSError`` when the peer resets."""
        view = core.payload_view()
        if view is None:
            core.receive_data(await self._recv(self.sock.recv, RECV_SIZE))
            return
        n = await self._recv(self.sock.recv_into, view)
        if n:
            core.payload_received(n)
        else:
            core.receive_data(b"")

    async def _recv(self, receive, arg):
        """``receive(arg)`` (``sock.recv`` or ``sock.recv_into``) once the
        socket is readable; a checkpoint every ``_STREAK``-th time in a row
        that data was there at once."""
        self._check_open()
        try:
            result = receive(arg)
        except BlockingIOError:
            pass
        else:
            self._streak += 1
            if self._streak >= _STREAK:
                self._streak = 0
                await trio.lowlevel.checkpoint()
            return result
        self._streak = 0
        sock = self.sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                return receive(arg)
            except BlockingIOError:
                pass

    async def send_buffers(self, bufs: list) -> None:
        """Write every buffer in ``bufs`` (in order).  Not a checkpoint when
        the kernel takes everything at once."""
        self._check_open()
        sock = self.sock
        if len(bufs) == 1:
            data = bufs[0]
        else:
            total = 0
            for b in bufs:
                total += len(b)
            if total > JOIN_LIMIT:
                await self._sendmsg_all(bufs)
                return
            data = b"".join(bufs)
        try:
            n = sock.send(data)
        except BlockingIOError:
            n = 0
        if n == len(data):
            return
        view = memoryview(data)
        with trio.CancelScope(shield=True):
            while n < len(view):
                await trio.lowlevel.wait_writable(sock)
                try:
                    n += sock.send(view[n:])
                except BlockingIOError:
                    pass

    async def send_cancellable(self, bufs: list) -> None:
        """Write every buffer in ``bufs``, cancellable while it waits: a
        cancelled send may leave a message half-written, so only for callers
        that then drop the connection (the control client)."""
        self._check_open()
        await self._sendmsg_loop(bufs)

    async def _sendmsg_all(self, bufs: list) -> None:
        with trio.CancelScope(shield=True):
            await self._sendmsg_loop(bufs)

    async def _sendmsg_loop(self, bufs: list) -> None:
        sock = self.sock
        bufs = [memoryview(b).cast("B") for b in bufs if len(b)]
        i = 0
        while i < len(bufs):
            batch = bufs[i : i + MAX_IOV]
            try:
                sent = sock.sendmsg(batch)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)
                continue
            for b in batch:
                if sent >= len(b):
                    sent -= len(b)
                    i += 1
                else:
                    bufs[i] = b[sent:]
                    break
            if i < len(bufs):
                await trio.lowlevel.wait_writable(sock)
