"""The primary's link to a secondary over NBD: a control channel and one
data connection per disk.

Design note
-----------
A session is opened in two steps, so that nothing is written before the two
sides agreed: first the control channel (``NBD_OPT_X_REPLFS``, a
connection that stays in the option phase, :mod:`replfs.nbd.control`), on
which the primary compares generations; then, once that allows it, one NBD
client per disk (``open_peers``), whose sizes must match the local images.
A plain NBD server (qemu-nbd, nbdkit) answers the control option with
NBD_REP_ERR_UNSUP: the session then has no control channel and the primary
skips the generation check.  Either way the peers are ordinary block nodes
(:class:`~replfs.nbd.client.NBDClient`), so the mirrors neither know nor care.
With ``--tls-dir`` every connection of the session (control and data)
starts with NBD_OPT_STARTTLS and the primary's client certificate; a
secondary that does not offer TLS, or whose certificate the CA did not sign,
is not talked to at all (PeerUnavailable, retried like any unreachable peer:
a secondary being reconfigured comes back).
"""

from __future__ import annotations

import trio

from replfs.block.base import BlockNode
from replfs.errors import BlockError, PeerMismatch, PeerUnavailable
from replfs.nbd import proto as P
from replfs.nbd.client import ExportRefusedError, connect
from replfs.nbd.control import encode_message, open_control
from replfs.nbd.errors import ControlUnsupported


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


class NbdSession:
    def __init__(self, target: str, sizes: dict[str, int], timeout: float,
                 nursery: trio.Nursery, control, tls=None) -> None:
        self.target = target
        self.sizes = sizes
        self.timeout = timeout
        self.nursery = nursery
        self.control = control
        #: The primary's TLS credentials (replfs.nbd.tls.ClientTLS), or None.
        self.tls = tls
        self.clients: list[BlockNode] = []

    async def open_peers(self) -> dict[str, BlockNode]:
        host, port = split_target(self.target)
        peers = {}
        for name, size in self.sizes.items():
            try:
                # A replfs secondary (one with a control channel) admits this
                # connection as the export's writer only when it says so.
                claim = (encode_message({"op": "writer", "disk": name})
                         if self.control is not None else None)
                client = await connect(host, port, name, nursery=self.nursery,
                                       connect_timeout=self.timeout, claim=claim,
                                       tls=self.tls)
            except ExportRefusedError as exc:
                if exc.reply_type == P.NBD_REP_ERR_UNKNOWN:  # no such disk there
                    raise PeerMismatch(f"the secondary {self.target} refused disk {name}: "
                                       f"{exc}") from None
                raise PeerUnavailable(f"the secondary {self.target} refused disk {name} "
                                      f"for now: {exc}") from None
            except BlockError as exc:
                raise PeerUnavailable(f"cannot connect to the secondary {self.target} for "
                                      f"disk {name}: {exc}") from None
            self.clients.append(client)
            if client.size != size:
                raise PeerMismatch(f"disk {name}: size mismatch: the primary's image is "
                                   f"{size} bytes, the secondary's disk is {client.size} bytes")
            peers[name] = client
        return peers

    def abort(self) -> None:
        for c in self.clients:
            c.abort()
        if self.control is not None:
            self.control.abort()

    async def aclose(self) -> None:
        for c in self.clients:
            try:
                await c.aclose()
            except BlockError:
                pass
        if self.control is not None:
            await self.control.aclose()


def nbd_connector(sizes: dict[str, int], timeout: float, tls=None):
    """``connector(target, nursery)`` for :class:`PrimaryController`; with
    ``tls`` (a :class:`~replfs.nbd.tls.ClientTLS`) the control channel and
    every data connection start TLS first and never go on in plain text."""

    async def connector(target: str, nursery: trio.Nursery) -> NbdSession:
        host, port = split_target(target)
        try:
            control = await open_control(host, port, connect_timeout=timeout, nursery=nursery,
                                         tls=tls)
        except ControlUnsupported:
            control = None
        except BlockError as exc:
            raise PeerUnavailable(f"cannot connect to the secondary {target}: {exc}") from None
        return NbdSession(target, sizes, timeout, nursery, control, tls)

    return connector
