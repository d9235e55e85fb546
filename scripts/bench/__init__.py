"""The replfs fio benchmark (run it as ``.venv/bin/python scripts/bench``), by concern:

``__main__``     options, the run over the rows, the JSON copy
``run``          one row: warm-up (and its checks), a checkpoint before each write job,
                the jobs, checkpoint, failover; CPU and RSS per process
``fio``          the fio job table, running fio, the figures taken from its JSON
``rows``         ``Row`` (what a system under test provides) and the raw-file row
``rows_replfs``  a replfs primary and secondary on loopback
``rows_qemu``    QEMU's own block replication, its graph built over QMP (also used by
                scripts/bench_vm.py, where the guest's QEMU is the primary)
``nodelay.c``    the LD_PRELOAD shim of the qemu-*-nodelay rows (TCP_NODELAY forced),
                compiled with gcc at run time into the scratch directory
``qmp``          a minimal QMP client
``report``       the ratios, the issue's targets (PASS/short) and the printed table

Process and mount helpers come from ``tests/_proc.py``, sizes from ``replfs.units``.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLUSTER = 64 << 10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def disk_size(ap, text: str) -> int:
    """``--size`` in bytes: a whole number of MiB, at least 16M (else ``ap.error``)."""
    from replfs.units import MiB, parse_size
    try:
        size = parse_size(text)
    except ValueError:
        ap.error(f"--size: bad size {text!r}")
    if size < 16 * MiB or size % MiB:
        ap.error("--size must be a whole number of MiB, at least 16M")
    return size
