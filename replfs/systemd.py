"""systemd without libsystemd: the readiness notification and journald's log lines.

Two small protocols, both written down in sd_notify(3), sd-daemon(3) and
systemd.exec(5):

* **Notification** (``Type=notify``): the manager passes ``$NOTIFY_SOCKET``,
  the address of an ``AF_UNIX``/``SOCK_DGRAM`` socket; the service sends
  datagrams of newline-separated ``KEY=VALUE`` lines to it: ``READY=1`` once
  it serves, ``STATUS=...`` (free text shown by ``systemctl status``),
  ``STOPPING=1`` when it begins to shut down.  An address starting with
  ``@`` names a socket in the abstract namespace (the ``@`` stands for the
  leading NUL byte).
* **journald's stderr**: a service whose stderr is connected to the journal
  finds ``$JOURNAL_STREAM`` set to that stream's ``DEVICE:INODE``.  When it
  matches stderr (not merely inherited by a child whose stderr went
  elsewhere), log lines go without a timestamp of their own (the journal
  stamps every entry) and start with ``<N>``, the syslog priority.

Design note
-----------
The notifier never raises and never holds the daemon up: systemd's
notification is advice, a replfs mount must work the same without it.  The
socket is created once (at start-up, while the file descriptors are
plentiful) and each message is one ``sendto`` with a 1 s send timeout, so a
stalled manager costs the event loop at most that, never a hang.  Send
errors are logged once at debug level and ignored.

Only the ``-f`` daemon that the service manager started notifies; the
background daemon of ``replfs primary`` without ``-f`` is not the service's
main process (its parent, the CLI, exits once the mount is live), so it
uses ``--pid-file`` with ``Type=forking`` instead (see docs/user-guide.md).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("replfs.systemd")

#: Longest STATUS= text sent (systemctl shows one line; a datagram must fit).
MAX_STATUS = 400


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address that ``$NOTIFY_SOCKET``'s ``value`` names: a path,
    bytes for an abstract socket (``@name`` -> ``\\0name``), or None when
    unset, empty or of a kind this module does not speak (``vsock:...``)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify(3) messages to one socket.  Use :meth:`from_env`;
    every method is a no-op once :meth:`close` ran or if sending failed."""

    def __init__(self, address: str | bytes, *, timeout: float = 1.0) -> None:
        self.address = address
        self._sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout)
        self._warned = False
        self._last_status: str | None = None

    @classmethod
    def from_env(cls, environ=None) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or None if there is none."""
        environ = os.environ if environ is None else environ
        value = environ.get("NOTIFY_SOCKET")
        address = notify_address(value)
        if address is None:
            if value:
                log.warning("NOTIFY_SOCKET=%s: not a path nor an abstract socket; "
                            "systemd is not notified", value)
            return None
        return cls(address)

    def send(self, **fields) -> bool:
        """One datagram: ``send(READY=1, STATUS="...")`` -> ``READY=1\\nSTATUS=...``.
        Returns whether it was sent."""
        if self._sock is None:
            return False
        text = "\n".join(f"{k}={_one_line(str(v))}" for k, v in fields.items())
        try:
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.debug("NOTIFY_SOCKET: cannot send (%s); further failures are not "
                          "logged", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        self._last_status = status
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        """``STATUS=``, only if it differs from the last one sent."""
        if status == self._last_status:
            return False
        self._last_status = status
        return self.send(STATUS=status)

    def stopping(self, status: str = "stopping") -> bool:
        self._last_status = status
        return self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_STATUS else text[:MAX_STATUS - 3] + "..."


# -- journald ---------------------------------------------------------------------
def stderr_is_journal(environ=None, fd: int = 2) -> bool:
    """Whether ``fd`` (stderr) is the journal stream ``$JOURNAL_STREAM`` names."""
    environ = os.environ if environ is None else environ
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def priority(levelno: int) -> int:
    """The syslog priority of a :mod:`logging` level (sd-daemon(3)'s ``<N>``)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<6>replfs.replication: message``: the priority first, no timestamp
    and no pid (the journal records both).  Every line of a multi-line record
    (a traceback) carries the prefix, since the journal splits on newlines."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))
