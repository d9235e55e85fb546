"""A fault-injecting TCP proxy for tests: delay, stall, cut, truncate.

The primary connects to the proxy instead of the secondary::

    with FaultProxy(("127.0.0.1", secondary_port)) as proxy:
        start primary with --secondary 127.0.0.1:{proxy.port}
        proxy.stall()        # stop forwarding (both ways); bytes queue up
        proxy.resume()       # forward again (what was queued goes through)
        proxy.cut()          # close every connection at once (RST)
        proxy.delay = 0.2    # seconds added before forwarding each chunk
        proxy.truncate_after(n)  # forward n more bytes upstream, then cut

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
        self._budget: int | None = None
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self.connections = 0
        self.bytes_up = 0
        self._spawn(self._accept_loop)

    # -- control ---------------------------------------------------------------
    def stall(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def truncate_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
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
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while not self._closing.is_set():
                r, _, _ = select.select([src], [], [], 0.1)
                if not r:
                    continue
                data = src.recv(1 << 16)
                if not data:
                    break
                while not self._forwarding.wait(0.1):
                    if self._closing.is_set():
                        return
                if self.delay:
                    time.sleep(self.delay)
                if upstream:
                    with self._lock:
                        if self._budget is not None:
                            if len(data) >= self._budget:
                                data = data[:self._budget]
                                self._budget = 0
                        budget_gone = self._budget == 0
                    dst.sendall(data)
                    self.bytes_up += len(data)
                    if budget_gone:
                        self._budget = None
                        self.cut()
                        return
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
