"""NBD, the replication link between the primary and the secondary.

Design note
-----------
* :mod:`replfs.nbd.proto`  -- wire constants, struct layouts, errno mapping;
* :mod:`replfs.nbd.core`   -- sans-IO client and server state machines
  (bytes in, events out; no trio, no sockets);
* :mod:`replfs.nbd.server` -- ``NBDServer``: the secondary exports block
  nodes with it;
* :mod:`replfs.nbd.client` -- ``NBDClient`` (a ``BlockNode``), ``connect`` and
  ``open_client``: the primary forwards every write with it.

Only fixed newstyle negotiation and simple replies are spoken; see the NBD
protocol document (NetworkBlockDevice ``doc/proto.md``).  This package
imports nothing heavy: ``replfs.nbd.core`` stays usable without trio.
"""
