"""``MOUNT/.replfs/metrics``: the mount's counters in Prometheus' text format.

For node_exporter's textfile collector (copy the file into its directory
atomically, e.g. every 15 s from a timer; the user guide has the lines).
Every metric has the labels ``mount`` and ``role``; per-disk ones ``disk``:

==========================================  =======  ==============================================
``replfs_state{state=...}``                 gauge    1 for the current stage, 0 for the role's others
``replfs_peer_connected``                   gauge    1 while the peer is connected
``replfs_disk_read_bytes_total``            counter  bytes read through ``MOUNT/NAME``
``replfs_disk_written_bytes_total``         counter  bytes written through ``MOUNT/NAME``
``replfs_disk_read_requests_total``         counter  read requests
``replfs_disk_write_requests_total``        counter  write requests
``replfs_replication_errors_total``         counter  replication errors recorded (``last_error``)
``replfs_checkpoints_total``                counter  checkpoints run since the daemon started
``replfs_last_checkpoint_timestamp_seconds``  gauge  unix time of the last one (absent before one)
``replfs_resync_done_bytes``                gauge    bytes a running resync has done (0: none runs)
``replfs_resync_size_bytes``                gauge    bytes it has to do in all (0: none runs)
``replfs_degraded_since_timestamp_seconds``  gauge   unix time since when not replicating with
                                                     the peer connected (absent while it is)
``replfs_dirty_bytes``                      gauge    primary: bytes out of sync with the secondary
``replfs_overlay_bytes{overlay=...}``       gauge    secondary: bytes in the hidden/active overlays
==========================================  =======  ==============================================

Design note
-----------
The values come from one status snapshot (the same dict as the status
file), taken when the file is opened, so the page is consistent and the
counters cost nothing until somebody reads them.  The text is produced by
prometheus-client's own exposition (``generate_latest``) from a private
``CollectorRegistry`` holding one custom collector, so the escaping and the
format are the library's, not ours.  A timestamp that does not apply is left
out rather than given as 0: ``time() - replfs_degraded_since_timestamp_seconds``
then has no value instead of a huge one.  The resync gauges are not named
``..._total`` because that suffix is reserved for counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from replfs.replication.stage import Role, stages

#: The ``Content-Type`` of :func:`render`'s text (for anyone serving it over HTTP).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class StatusCollector:
    """A prometheus-client collector over one status snapshot."""

    def __init__(self, status: dict, mount: str) -> None:
        self.status = status
        self.mount = mount

    def collect(self) -> Iterator[Metric]:
        st = self.status
        role = st["role"]
        base = ["mount", "role"]
        lv = [self.mount, role]

        state = GaugeMetricFamily("replfs_state", "The replication stage (1: the current one).",
                                  labels=base + ["state"])
        for stage in stages(Role(role)):
            state.add_metric(lv + [stage.value], 1.0 if stage.value == st["state"] else 0.0)
        yield state

        yield _one(GaugeMetricFamily, "replfs_peer_connected",
                   "Whether the peer (secondary, or primary) is connected.", base, lv,
                   1.0 if st.get("peer_connected") else 0.0)
        yield _one(CounterMetricFamily, "replfs_replication_errors",
                   "Replication errors recorded since the daemon started.", base, lv,
                   st.get("replication_errors", 0))
        yield _one(CounterMetricFamily, "replfs_checkpoints",
                   "Checkpoints run since the daemon started.", base, lv,
                   st.get("checkpoints", 0))
        if st.get("last_checkpoint_at") is not None:
            yield _one(GaugeMetricFamily, "replfs_last_checkpoint_timestamp_seconds",
                       "Unix time of the last checkpoint.", base, lv, st["last_checkpoint_at"])
        if st.get("degraded_since") is not None:
            yield _one(GaugeMetricFamily, "replfs_degraded_since_timestamp_seconds",
                       "Unix time since which the mount is not replicating with its peer "
                       "connected.", base, lv, st["degraded_since"])
        sync = st.get("sync") or {}
        yield _one(GaugeMetricFamily, "replfs_resync_done_bytes",
                   "Bytes the running resync has done (0 when none runs).", base, lv,
                   sync.get("done_bytes", 0))
        yield _one(GaugeMetricFamily, "replfs_resync_size_bytes",
                   "Bytes the running resync has to do in all (0 when none runs).", base, lv,
                   sync.get("total_bytes", 0))

        dl = base + ["disk"]
        io = st.get("io") or {}
        for name, field, help_ in (
                ("replfs_disk_read_bytes", "bytes_read", "Bytes read through the disk's file."),
                ("replfs_disk_written_bytes", "bytes_written",
                 "Bytes written through the disk's file."),
                ("replfs_disk_read_requests", "reads", "Read requests on the disk's file."),
                ("replfs_disk_write_requests", "writes", "Write requests on the disk's file.")):
            fam = CounterMetricFamily(name, help_, labels=dl)
            for disk, counts in io.items():
                fam.add_metric(lv + [disk], counts.get(field, 0))
            yield fam

        disks = st.get("disks") or {}
        if role == Role.PRIMARY.value:
            dirty = GaugeMetricFamily("replfs_dirty_bytes",
                                      "Bytes of the disk out of sync with the secondary.",
                                      labels=dl)
            for disk, d in disks.items():
                dirty.add_metric(lv + [disk], d.get("out_of_sync_bytes", 0))
            yield dirty
        else:
            overlay = GaugeMetricFamily(
                "replfs_overlay_bytes", "Bytes held in the disk's overlays since the last "
                "checkpoint (hidden: the primary's changes; active: the VM's).",
                labels=dl + ["overlay"])
            for disk, d in disks.items():
                for which in ("hidden", "active"):
                    overlay.add_metric(lv + [disk, which], d.get(f"{which}_bytes", 0))
            yield overlay


def _one(cls, name: str, help_: str, labels: list[str], values: list[str], value) -> Metric:
    fam = cls(name, help_, labels=labels)
    fam.add_metric(values, float(value))
    return fam


def render(status: dict, mount: str) -> bytes:
    """The text exposition of ``status`` (the status file's dict, plus
    ``io``: per disk ``reads``, ``bytes_read``, ``writes``, ``bytes_written``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status, mount))
    return generate_latest(registry)
