"""A fault-injecting TCP proxy for tests: delay, stall, cut, truncate, black hole.

The primary connects to the proxy instead of the secondary::

    with FaultProxy(("127.0.0.1", secondary_port)) as proxy:
        start primary with --secondary 127.0.0.1:{proxy.port}
        proxy.stall()        # stop forwarding (both ways); bytes queue up
        proxy.resume()       # forward again (what was queued goes through)
        proxy.cut()          # close every connection at once (RST)
        proxy.delay = 0.2    # seconds added before forwarding each chunk
        proxy.truncate_after(n)  # forward n more bytes upstream, then cut
        proxy.blackhole()    # the link goes dark: everything sent is lost
        proxy.restore()      # the link is back: the connections that lost data are reset
        proxy.bytes_up, proxy.bytes_down, proxy.bytes_lost   # counters

A black hole is a pulled cable or a firewall that drops packets, as seen
from both ends: existing connections stay open but carry nothing more (what
either side sends is read and dropped, a close included); new connections
are accepted (the client's connect succeeds) but never reach the upstream, and
nothing comes back on them.  ``restore()`` resets (RST) every connection that
lived through the black hole: each lost bytes, so its stream cannot go on (as
TCP gives up once its retransmissions time out); new connections are
forwarded again.  Unlike ``stall()`` nothing queued is delivered later.

Threads, not trio: the proxy runs beside the code under test and must keep
working while the test thread blocks in a syscall.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time


class FaultProxy:
    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.delay = 0.0
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closing = threading.Event()
        self._dark = threading.Event()
        self._budget: int | None = None
        self._lock = threading.Lock()
        # (client, server); server is None for a connection accepted in a black hole
        self._pairs: list[tuple[socket.socket, socket.socket | None]] = []
        self._threads: list[threading.Thread] = []
        # A connection forwards only while the link's epoch is the one it was
        # opened in: blackhole() and restore() each start a new epoch.
        self._epoch = 0
        self.connections = 0
        self.bytes_up = 0     # forwarded client -> upstream
        self.bytes_down = 0   # forwarded upstream -> client
        self.bytes_lost = 0   # read and dropped by a black hole (both ways)
        self._spawn(self._accept_loop)

    # -- control ---------------------------------------------------------------
    def stall(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def truncate_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def blackhole(self) -> None:
        """The link goes dark (see the module's note)."""
        with self._lock:
            self._epoch += 1
            self._dark.set()

    def restore(self) -> None:
        """The link is back: reset every connection that lived through the
        black hole; new connections are forwarded again."""
        with self._lock:
            self._epoch += 1
            self._dark.clear()
        self.cut()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                if s is None:
                    continue
                try:  # RST rather than FIN: a cable pulled, not a clean close
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closing.set()
        self._forwarding.set()
        self.cut()
        self.listener.close()
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- machinery --------------------------------------------------------------
    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                r, _, _ = select.select([self.listener], [], [], 0.1)
                if not r:
                    continue
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                epoch, dark = self._epoch, self._dark.is_set()
                if dark:  # accepted, never connected upstream, nothing comes back
                    self._pairs.append((client, None))
                    self.connections += 1
            if dark:
                self._spawn(self._swallow, client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, server))
                self.connections += 1
            self._spawn(self._pump, client, server, True, epoch)
            self._spawn(self._pump, server, client, False, epoch)

    def _lost(self, epoch: int, nbytes: int) -> bool:
        """Whether data read on a connection of ``epoch`` is dropped (counted)."""
        with self._lock:
            if epoch == self._epoch and not self._dark.is_set():
                return False
            self.bytes_lost += nbytes
            return True

    def _swallow(self, sock: socket.socket) -> None:
        """A connection accepted in a black hole: read and drop until it ends."""
        try:
            while not self._closing.is_set():
                r, _, _ = select.select([sock], [], [], 0.1)
                if r:
                    data = sock.recv(1 << 16)
                    if not data:
                        return  # the close is lost too: restore() resets it
                    self._lost(-1, len(data))
        except (OSError, ValueError):
            pass

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool,
              epoch: int) -> None:
        shut = True
        try:
            while not self._closing.is_set():
                r, _, _ = select.select([src], [], [], 0.1)
                if not r:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    if self._lost(epoch, 0):
                        shut = False  # the close is lost too: restore() resets both
                    break
                while not self._forwarding.wait(0.1):
                    if self._closing.is_set():
                        return
                if self.delay:
                    time.sleep(self.delay)
                if self._lost(epoch, len(data)):
                    continue
                if upstream:
                    with self._lock:
                        if self._budget is not None:
                            if len(data) >= self._budget:
                                data = data[:self._budget]
                                self._budget = 0
                        budget_gone = self._budget == 0
                    dst.sendall(data)
                    with self._lock:
                        self.bytes_up += len(data)
                    if budget_gone:
                        self._budget = None
                        self.cut()
                        return
                else:
                    dst.sendall(data)
                    with self._lock:
                        self.bytes_down += len(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in (src, dst) if shut else ():
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
