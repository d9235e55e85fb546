"""What a mount is asked to be: frozen dataclasses that the CLI builds from
its arguments (checked there) and the daemon consumes.  No argparse
namespace leaves ``cli.py``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DiskConfig:
    name: str    # MOUNT/NAME, and the NBD export name
    image: str   # absolute path of the raw image (a file or a block device)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class MountConfig:
    role: str                      # "primary" | "secondary"
    mount: str                     # absolute path of the mount point
    disks: tuple[DiskConfig, ...]
    #: primary: how long a request waits for the secondary, and how long the
    #: connect may take; secondary: how long a connecting primary's NBD
    #: handshake may take.
    timeout: float = 5.0
    secondary: PeerConfig | None = None   # primary: where the secondary listens
    listen: PeerConfig | None = None      # secondary: where to listen
    workdir: str | None = None            # secondary: hidden and active overlays
    cluster_size: int = 64 * 1024         # secondary: copy-before-write granularity
    inject_faults: str | None = None      # tests: a FaultLayer spec below the images
    meta_dir: str | None = None           # where metadata files live (default: beside images)
    reconnect_interval: float = 5.0       # primary: longest wait between reconnect tries
    resync_rate: float | None = None      # primary: bytes/s cap of a resync (None: no cap)
    protocol: str = "sync"                # primary: "sync" | "checkpoint" (write protocol)
    max_lag: int = 64 * 1024 * 1024       # primary, checkpoint protocol: bytes queued at most
    allow_degraded_start: bool = False    # primary: start without a reachable secondary
    discard_my_data: bool = False         # secondary: its own writes give way to the primary
    log: str | None = None                # the log file, reopened on SIGHUP (None: stderr)
    tls_dir: str | None = None            # X.509 credentials, QEMU's layout (None: no TLS)
    tls_hostname: str | None = None       # primary: check the secondary's certificate name
    insecure: bool = False                # secondary: plain NBD on a non-loopback address
    allow: tuple[str, ...] | None = None  # secondary: networks that may connect (None: any)
    pid_file: str | None = None           # the daemon's pid, once the mount is live

    @property
    def images(self) -> dict[str, str]:
        return {d.name: d.image for d in self.disks}
