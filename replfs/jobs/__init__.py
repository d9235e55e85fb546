"""Background block jobs (QEMU's block jobs, DRBD's resync and verify): work
that runs beside the VM's I/O with progress and cancellation.

The home of the commit that failover runs today (:mod:`replfs.jobs.commit`),
and of resync and online verify as they land (continuous replication)."""
