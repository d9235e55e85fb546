"""What a system under test provides (``Row``), the raw-file row, and the row names."""

from __future__ import annotations

import os
import random

from replfs.units import MiB

ALL_ROWS = ["raw", "primary", "secondary", "primary-tls", "secondary-tls", "qemu-primary",
            "qemu-secondary"]
ROW_TITLES = {
    "raw": "raw image file",
    "primary": "replfs primary",
    "secondary": "replfs secondary view",
    "primary-tls": "replfs primary, the link over TLS (--tls-dir)",
    "secondary-tls": "replfs secondary view, the link over TLS",
    "qemu-primary": "QEMU primary",
    "qemu-secondary": "QEMU secondary",
}
#: The row each replfs row is compared with.
QEMU_PEER = {"primary": "qemu-primary", "secondary": "qemu-secondary",
             "primary-tls": "qemu-primary", "secondary-tls": "qemu-secondary"}
#: A TLS row and the same row in plain TCP (the TLS cost).
TLS_PLAIN = {"primary-tls": "primary", "secondary-tls": "secondary"}


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
        return self.make_image(os.path.join(self.dir, "raw.img"))
