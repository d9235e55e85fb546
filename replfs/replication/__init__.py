"""Replication: the stage of each host and what it allows (``stage``), and
the controllers of the two roles (``primary``, ``secondary``) over the block
graphs that :mod:`replfs.block.graph` builds."""
