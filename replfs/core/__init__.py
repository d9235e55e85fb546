"""Primitives that are not block layers: the cluster bitmap, the range lock,
the I/O thread pool, the statistics counters.  No module here knows about
replication or FUSE."""
