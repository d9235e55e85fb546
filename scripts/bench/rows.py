"""What a system under test provides (``Row``), the raw-file row, and the row names."""

from __future__ import annotations

import os
import random

from replfs.units import MiB

ALL_ROWS = ["raw", "primary", "primary-ckpt", "primary-alone", "secondary", "primary-tls",
            "secondary-tls", "qemu-primary", "qemu-primary-nodelay", "qemu-secondary",
            "qemu-secondary-nodelay"]
#: What runs without --rows: the rows the issue's targets need (not the TLS rows, nor the
#: QEMU secondary with TCP_NODELAY: the view's I/O never crosses QEMU's NBD link).
DEFAULT_ROWS = ["raw", "primary", "primary-ckpt", "primary-alone", "secondary",
                "qemu-primary", "qemu-primary-nodelay", "qemu-secondary"]
ROW_TITLES = {
    "raw": "raw image file",
    "primary": "replfs primary (--protocol sync)",
    "primary-ckpt": "replfs primary, --protocol checkpoint",
    "primary-alone": "replfs primary after `replfs failover` on it (the FUSE stack alone)",
    "secondary": "replfs secondary view",
    "primary-tls": "replfs primary, the link over TLS (--tls-dir)",
    "secondary-tls": "replfs secondary view, the link over TLS",
    "qemu-primary": "QEMU primary, as shipped",
    "qemu-primary-nodelay": "QEMU primary, TCP_NODELAY forced (LD_PRELOAD shim, both QEMUs)",
    "qemu-secondary": "QEMU secondary, as shipped",
    "qemu-secondary-nodelay": "QEMU secondary, TCP_NODELAY forced",
}
#: The row each replfs row is compared with: QEMU as shipped ...
QEMU_PEER = {"primary": "qemu-primary", "secondary": "qemu-secondary",
             "primary-tls": "qemu-primary", "secondary-tls": "qemu-secondary",
             "primary-ckpt": "qemu-primary", "primary-alone": "qemu-primary"}
#: ... and QEMU with TCP_NODELAY forced on its sockets (the issue's fair comparison).
QEMU_NODELAY_PEER = {"primary": "qemu-primary-nodelay", "primary-tls": "qemu-primary-nodelay",
                     "primary-ckpt": "qemu-primary-nodelay",
                     "primary-alone": "qemu-primary-nodelay",
                     "secondary": "qemu-secondary-nodelay",
                     "secondary-tls": "qemu-secondary-nodelay"}
#: A TLS row and the same row in plain TCP (the TLS cost).
TLS_PLAIN = {"primary-tls": "primary", "secondary-tls": "secondary"}


class RowSkipped(Exception):
    """Raised by ``Row.setup`` when the row cannot run here (a missing tool or flag):
    the row is reported as skipped, with the reason, not as failed."""


class Row:
    """One system under test. ``setup`` returns the file fio runs on."""
    replicated = True

    def __init__(self, name: str, workdir: str, size: int) -> None:
        self.name = name
        self.dir = workdir
        self.size = size

    def make_image(self, path: str) -> str:
        """A fully allocated image holding the same data on every row and both hosts:
        a sparse one would let the secondary rows read holes (their warm-up writes land
        in the active overlay, and the checkpoint after it drops them)."""
        chunk = bytearray(random.Random(0).randbytes(MiB))
        with open(path, "wb") as f:
            for i in range(self.size // MiB):
                chunk[:8] = i.to_bytes(8, "little")
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return path

    def images(self) -> list[str]:
        """The image files behind the file under test (checked for holes after the
        warm-up: every row runs on fully written images)."""
        return []

    def prepare(self) -> None:
        """After the warm-up and its checkpoint, before the jobs (primary-alone fails
        over here)."""

    def procs(self) -> dict[str, int]:
        """role ("daemon": serves the file under test, "peer": the other side) -> pid."""
        return {}

    def reset(self) -> None:
        """After the warm-up: a checkpoint, so the overlays start empty."""

    def checkpoint(self) -> dict:
        raise NotImplementedError

    def dirty(self) -> dict:
        raise NotImplementedError

    def failover(self) -> dict:
        raise NotImplementedError

    def teardown(self) -> None:
        pass


class RawRow(Row):
    replicated = False

    def setup(self) -> str:
        self.path = self.make_image(os.path.join(self.dir, "raw.img"))
        return self.path

    def images(self) -> list[str]:
        return [self.path]
