"""replfs: replicated virtual-machine disks served as plain files through FUSE.

A re-build of QEMU's COLO block replication (block/replication.c) as a
standalone filesystem.  See docs/design.md for the layer graph.
"""

__version__ = "0.1.0"
