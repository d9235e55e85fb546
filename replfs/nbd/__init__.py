"""NBD, the replication link between the primary and the secondary.

Design note
-----------
* :mod:`replfs.nbd.proto`      -- wire constants, struct layouts, errno mapping;
* :mod:`replfs.nbd.connection` -- sans-IO client and server state machines
  (bytes in, events out; no trio, no sockets), split as h11 is:
  :mod:`replfs.nbd.errors` (whose fault, and an errno hint),
  ``_events`` (one frozen dataclass per message) and ``_state`` (the states
  and the one transition table);
* :mod:`replfs.nbd.server` -- ``NBDServer``: the secondary exports block
  nodes with it;
* :mod:`replfs.nbd.client` -- ``NBDClient`` (a ``BlockNode``), ``connect`` and
  ``open_client``: the primary forwards every write with it;
* :mod:`replfs.nbd.control` -- the control channel, replfs's private
  extension ``NBD_OPT_X_REPLFS``: JSON calls on a connection that stays in
  option haggling (``open_control``; the server side is
  ``NBDServer(control=...)``).  A private option, because a plain NBD
  server answers it NBD_REP_ERR_UNSUP and carries on;
* ``_sockio`` -- what server and client share: socket treatment, the
  receive step, request counters.

The sans-IO API is re-exported here (``from replfs.nbd import
ServerConnection, Request, ...``).  Only fixed newstyle negotiation and
simple replies are spoken; see the NBD protocol document
(NetworkBlockDevice ``doc/proto.md``).  Importing this package imports
nothing heavy: the sans-IO modules stay usable without trio.
"""

from replfs.nbd._events import ClientFlags, ExportInfo, ExportList, Greeting, OptAck, OptionError  # handshake
from replfs.nbd._events import OptAbort, OptExportName, OptGo, OptInfo, OptInvalid, OptList, OptUnknown  # options
from replfs.nbd._events import OptPrivate, PrivateReply  # replfs's private extension
from replfs.nbd._events import BadRequest, ConnectionClosed, Disconnect, Reply, Request  # transmission
from replfs.nbd.connection import DIRECT_PAYLOAD_THRESHOLD, NEED_DATA, PAUSED, ClientConnection, ServerConnection
from replfs.nbd.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from replfs.nbd.errors import ControlError, ControlRefused, ControlUnsupported

__all__ = [
    "NEED_DATA", "PAUSED", "DIRECT_PAYLOAD_THRESHOLD", "ServerConnection", "ClientConnection",
    "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "ControlError", "ControlRefused", "ControlUnsupported",
    "ClientFlags", "ExportInfo", "ExportList", "Greeting", "OptAck", "OptionError",
    "OptAbort", "OptExportName", "OptGo", "OptInfo", "OptInvalid", "OptList", "OptUnknown",
    "OptPrivate", "PrivateReply",
    "BadRequest", "ConnectionClosed", "Disconnect", "Reply", "Request",
]
