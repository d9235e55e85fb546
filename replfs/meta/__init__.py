"""Persistent replication metadata: the formats that decide what data a user
gets after a restart - generation identifiers, the dirty record and its
activity log, the failed-over state, a commit's progress - each written
crash-safe before it takes effect.

* :mod:`replfs.meta.paths`: where an image's metadata file and a secondary
  disk's default workdir live (beside the image, in a meta dir, or under
  /var/lib/replfs for a block device).
* :mod:`replfs.meta.format`: :class:`~replfs.meta.format.MetaFile`, one
  sidecar file per image: a :class:`~replfs.meta.format.Header` (generations,
  role, flags), the activity log (hot extents) and the dirty bitmap, each in
  two checksummed A/B slots written alternately (pwrite + fdatasync), so a
  torn write never loses the previous record.

The continuous-replication logic (which uses these) lives in
:mod:`replfs.replication`."""
