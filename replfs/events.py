"""The mount's event stream: ``MOUNT/.replfs/events`` and ``replfs events``.

One JSON object per line, one line per change of the replication state, as
``drbdsetup events2`` prints them::

    {"time": 1718000000.123456, "event": "exists", "role": "primary", "state": "replicating", ...}
    {"time": 1718000003.5, "event": "peer", "peer_connected": false}
    {"time": 1718000003.5, "event": "error", "error": "disk disk0: the secondary's ..."}
    {"time": 1718000003.5, "event": "state", "state": "degraded", "previous": "replicating", ...}
    {"time": 1718000009.1, "event": "resync", "total_bytes": 4194304, "done_bytes": 1048576, ...}
    {"time": 1718000012.0, "event": "checkpoint", "checkpoints": 7, "last_checkpoint_at": ...}

``time`` is unix seconds (a float, UTC by definition), as the status file's
``last_checkpoint_at`` and ``degraded_since``.  ``event`` is one of
``exists`` (the first line of every reader: the state it joins in),
``state``, ``peer``, ``error``, ``checkpoint``, ``resync``, ``failover``,
``overflow``; the other fields are what changed.

Design note
-----------
:class:`EventHub` belongs to the controller, which publishes from its few
central points (a stage change, an error, a checkpoint, a peer coming or
going, resync progress at most once a second): never from the data path.
Publishing is synchronous and never waits: the line is encoded once and
appended to each reader's queue (:class:`Subscription`); with no reader it
costs a function call.  A reader that does not keep up must not hold the
daemon back nor make it grow without bound, so each queue holds at most
:data:`QUEUE_LIMIT` lines; when a new line does not fit, the queue is
emptied and replaced by an ``overflow`` line saying how many lines the
reader lost and a fresh ``exists`` line (the state at that moment, which the
lost lines led to), so that what the reader believes is right again; the
lines published after that follow as usual.  (events2 resynchronises the
same way, by a new initial dump.)  The line a reader is in the middle of is
never cut.

The reader's side (:func:`follow`, ``replfs events MOUNT``) is plain
blocking file reads: the FUSE file's reads block until there is a line.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import trio

#: Lines a reader may have pending before it loses them (see the design note).
QUEUE_LIMIT = 256

#: Every ``event`` value a line can have.
KINDS = ("exists", "state", "peer", "error", "checkpoint", "resync", "failover", "overflow")


def now() -> float:
    """Unix seconds, to the microsecond: the ``time`` of a line."""
    return round(time.time(), 6)


def encode(fields: dict) -> bytes:
    """One line: a JSON object and a newline (non-ASCII escaped, so a line
    never holds a raw newline)."""
    return (json.dumps(fields, separators=(", ", ": "), default=str) + "\n").encode()


class Subscription:
    """One reader's queue of lines, and the bytes of the line it is in the
    middle of (so reads of any size, one byte included, cut nothing)."""

    __slots__ = ("_hub", "_lost", "_pending", "_queue", "_synthetic", "_wake", "ended")

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._queue: deque[bytes] = deque()
        self._pending = b""
        self._lost = 0  # event lines lost and not yet reported by a line read
        self._synthetic = 0  # leading queue lines that are our overflow + exists
        self._wake = trio.Event()
        #: True once the stream is over: the reader gets what is left, then EOF.
        self.ended = False

    # -- the hub's side ----------------------------------------------------------
    def _push(self, line: bytes) -> None:
        queue = self._queue
        if len(queue) >= self._hub.limit:
            # Drop what is queued and this line; say so, then the state now
            # (which this line's change is part of).
            self._lost += len(queue) - self._synthetic + 1
            queue.clear()
            queue.append(encode({"time": now(), "event": "overflow", "dropped": self._lost,
                                 "queue_limit": self._hub.limit}))
            queue.append(self._hub.exists_line())
            self._synthetic = 2
        else:
            queue.append(line)
        self._wake.set()

    def end(self) -> None:
        """No more lines: a blocked read returns what is left, then EOF."""
        self.ended = True
        self._wake.set()

    # -- the reader's side -------------------------------------------------------
    def take(self, size: int) -> bytes:
        """Up to ``size`` bytes of the pending lines, without waiting; b""
        when there are none."""
        out = []
        while size > 0:
            if not self._pending:
                if not self._queue:
                    break
                self._pending = self._queue.popleft()
                if self._synthetic:
                    if self._synthetic == 2:  # the overflow line: reported
                        self._lost = 0
                    self._synthetic -= 1
            piece, self._pending = self._pending[:size], self._pending[size:]
            out.append(piece)
            size -= len(piece)
        return b"".join(out)

    def has_data(self) -> bool:
        return bool(self._pending or self._queue)

    async def wait(self) -> None:
        """Until there is something to take, or the stream ended."""
        while not (self.has_data() or self.ended):
            self._wake = trio.Event()
            await self._wake.wait()

    def close(self) -> None:
        """The reader is gone (the file's release)."""
        self.end()
        self._hub._subs.discard(self)


class EventHub:
    """Publish lines to every subscribed reader; see the module's design note.

    ``snapshot()`` gives the fields of an ``exists`` line (the current state);
    it is called for each new reader and after an overflow."""

    def __init__(self, snapshot: Callable[[], dict] | None = None, *,
                 limit: int = QUEUE_LIMIT) -> None:
        if limit < 4:
            raise ValueError("an events queue needs room for at least 4 lines")
        self._snapshot = snapshot or dict
        self._subs: set[Subscription] = set()
        self.limit = limit
        #: Lines published while at least one reader listened.
        self.published = 0

    @property
    def readers(self) -> int:
        return len(self._subs)

    def exists_line(self) -> bytes:
        return encode({"time": now(), "event": "exists", **self._snapshot()})

    def publish(self, event: str, **fields) -> None:
        """Send one line (``time``, ``event``, then ``fields``) to every reader."""
        if not self._subs:
            return
        line = encode({"time": now(), "event": event, **fields})
        self.published += 1
        for sub in self._subs:
            sub._push(line)

    def subscribe(self) -> Subscription:
        """A new reader; its first line describes the current state."""
        sub = Subscription(self)
        sub._queue.append(self.exists_line())
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """End every reader's stream (the mount goes away)."""
        for sub in list(self._subs):
            sub.end()
        self._subs.clear()


# -- the reader: `replfs events MOUNT` ------------------------------------------------
#: errnos of a read that mean the mount went away (daemon exited or killed).
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.EBADF, errno.ENOENT}


def follow(path: str, out=None, *, count: int | None = None) -> int:
    """Copy the event lines of ``path`` (``MOUNT/.replfs/events``) to ``out``
    as they come, each flushed at once; stop after ``count`` lines, at SIGINT
    or SIGTERM, or when the mount goes away.  Returns the lines written.

    Raises OSError if ``path`` cannot be opened (the caller says why)."""
    out = out if out is not None else sys.stdout
    written = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        buf = b""
        while count is None or written < count:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:
                if exc.errno in GONE:
                    break
                raise
            if not chunk:  # the daemon ended the stream: unmounting
                break
            buf += chunk
            while b"\n" in buf and (count is None or written < count):
                line, buf = buf.split(b"\n", 1)
                out.write(line.decode(errors="replace") + "\n")
                out.flush()
                written += 1
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term)
        try:
            os.close(fd)
        except OSError as exc:  # the close's FUSE flush, once the daemon has gone
            if exc.errno not in GONE:
                raise
    return written


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
