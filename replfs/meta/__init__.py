"""Persistent replication metadata (empty so far): the formats that decide
what data a user gets after a restart - generation identifiers, the dirty
record and its activity log, the failed-over state, a commit's progress -
each written crash-safe (write-then-rename or a checksummed journal).  The
continuous-replication work fills it."""
