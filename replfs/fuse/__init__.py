"""The FUSE edge: ``ops`` (the handlers), ``control`` (the control files'
values, dispatch and errno mapping), ``fastwait`` (a cheaper request wait
inside pyfuse3's worker loop, version-gated)."""
