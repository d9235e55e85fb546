"""Keep freed payload buffers in the heap instead of giving them back.

Design note
-----------
A daemon's payloads are short-lived buffers of 4 KiB to 1 MiB: a FUSE write,
an NBD request's data, a cluster read back to be sent.  With glibc's default
tuning a buffer of 128 KiB or more is, at first, its own ``mmap``; once one
is freed the threshold rises, but the top of the heap is still trimmed
(``M_TRIM_THRESHOLD``) whenever a burst ends.  Either way the next buffer is
fresh memory, and the kernel faults in and zeroes every one of its pages
before Python copies the payload into it.  ``perf`` on the secondary during
1 MiB sequential writes (checkpoint protocol) had 20 % of its CPU in page
faults (``exc_page_fault``, ``clear_page_erms``, memcg charging): 1.5-1.7 ms
of CPU per MiB; with the settings below, 0.7-0.8 ms, and the pair went from
about 400 to 550 MiB/s.

So each daemon, at start, tells glibc (``mallopt``) to serve buffers up to
:data:`MMAP_THRESHOLD` from the heap and to keep up to
:data:`TRIM_THRESHOLD` of free memory at its top.  This costs no memory
that the daemon did not already use at its peak (what is kept was in use
once: the RSS stays at its high-water mark instead of dipping after a burst).
Not glibc (musl): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap (the largest FUSE or NBD
#: payload the daemons handle in one piece is 1 MiB plus a header).
MMAP_THRESHOLD = 4 * 1024 * 1024
#: Free memory at the heap's top beyond this is returned to the kernel.
TRIM_THRESHOLD = 32 * 1024 * 1024


def keep_freed_buffers() -> bool:
    """Apply the settings above; True if the C library took both."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
