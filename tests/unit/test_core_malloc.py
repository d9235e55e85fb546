"""replfs.core.malloc: freed payload buffers are reused, not faulted in afresh."""

import subprocess
import sys

import pytest

# Minor page faults taken by 50 rounds of what a daemon does with payloads:
# a burst of eight 1 MiB buffers in flight, then all freed (in a fresh
# interpreter each time).
_CHILD = """
import resource, sys
from replfs.core.malloc import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
src = bytearray(b"\\x22" * (1 << 20))
def burst():
    bufs = [bytes(src) for _ in range(8)]
    del bufs
for _ in range(5):  # warm up: the heap grows to its working size
    burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       timeout=60, check=True)
    return int(r.stdout.strip())


def test_freed_buffers_are_reused_without_page_faults():
    tuned = _faults("tuned")
    default = _faults("default")
    if default < 400 * 64:  # this C library reuses them anyway: nothing to show
        pytest.skip(f"the default malloc took only {default} faults for 400 MiB of buffers")
    # 400 buffers of 256 pages each; reusing the heap takes next to none
    assert tuned < 400, (tuned, default)
