#!/usr/bin/env python3
"""Builds the VM row's guest: a Debian kernel and a busybox initramfs with vmbench.

    .venv/bin/python scripts/vm/build.py [--cache DIR]     # prints the two paths

From Debian packages, downloaded with ``apt-get download`` into the cache directory
(default /var/tmp/replfs-vm-cache; nothing is installed): the kernel image package that
``linux-image-amd64`` depends on (its vmlinuz and the virtio modules), and
``busybox-static``.  ``vmbench.c`` (beside this file) is compiled with ``gcc -static``.
The initramfs (newc cpio, gzip) holds busybox, vmbench, the modules and ``init.sh`` as
/init; it runs the jobs named on the kernel command line on /dev/vda and powers off
(scripts/bench_vm.py boots it).  Outputs: CACHE/vmlinuz and CACHE/initrd.gz; a second
run reuses the downloads.

Design note: the cpio archive is written here (the newc format is a fixed ASCII
header per file) rather than with cpio(1), which Debian does not install by default;
the Debian package ships no modules.dep (depmod runs at install time), so the load
order is found here from each module's own ``depends=`` string, dependencies first.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import lzma
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
#: The modules the guest needs (Debian builds them as modules); what they depend on is
#: added, in load order, from each module's ``depends=`` (its .modinfo section).
MODULES = ["virtio_pci", "virtio_blk"]


def run(argv: list[str], cwd: str | None = None) -> str:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        sys.exit(f"build.py: {' '.join(argv)} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def download(cache: str, package: str) -> str:
    """The .deb of PACKAGE in CACHE, downloaded with apt-get download if missing."""
    found = glob.glob(os.path.join(cache, f"{package}_*.deb"))
    if not found:
        run(["apt-get", "download", package], cwd=cache)
        found = glob.glob(os.path.join(cache, f"{package}_*.deb"))
    if not found:
        sys.exit(f"build.py: apt-get download {package} gave no .deb")
    return sorted(found)[-1]


def kernel_package() -> str:
    """The versioned kernel image package linux-image-amd64 depends on."""
    for line in run(["apt-cache", "depends", "linux-image-amd64"]).splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    sys.exit("build.py: apt-cache depends linux-image-amd64 names no kernel image")


class Cpio:
    """A newc (SVR4, no CRC) cpio archive, written entry by entry."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, body: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        self.data += b"070701" + "".join(f"{v:08X}" for v in fields).encode()
        self.data += name.encode() + b"\0"
        self.data += b"\0" * (-len(self.data) % 4)
        self.data += body
        self.data += b"\0" * (-len(self.data) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, body: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, body)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.data)


def module_bodies(kdir: str) -> dict[str, str]:
    """Module name (``-`` read as ``_``) -> its file, for every module under KDIR."""
    out = {}
    for dirpath, _, files in os.walk(kdir):
        for f in files:
            for ext in (".ko", ".ko.xz"):
                if f.endswith(ext):
                    out[f[:-len(ext)].replace("-", "_")] = os.path.join(dirpath, f)
    return out


def _read_module(path: str) -> bytes:
    if path.endswith(".xz"):  # busybox insmod wants them plain
        with lzma.open(path) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def modules_in_order(kdir: str, wanted: list[str]) -> list[tuple[str, bytes]]:
    """WANTED and what they depend on, each once, dependencies first: (name, bytes)."""
    paths = module_bodies(kdir)
    done: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in paths:
            sys.exit(f"build.py: module {name} not found under {kdir}")
        body = _read_module(paths[name])
        i = body.find(b"\0depends=")
        deps = body[i + 9:body.index(b"\0", i + 1)].decode() if i >= 0 else ""
        for d in filter(None, deps.split(",")):
            visit(d.replace("-", "_"))
        done.append((name, body))

    for w in wanted:
        visit(w)
    return done


def build(cache: str) -> tuple[str, str]:
    os.makedirs(cache, exist_ok=True)
    kdeb = download(cache, kernel_package())
    bdeb = download(cache, "busybox-static")
    root = os.path.join(cache, "extract")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    run(["dpkg-deb", "-x", kdeb, root])
    run(["dpkg-deb", "-x", bdeb, root])
    vmlinuz = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
    moddirs = glob.glob(os.path.join(root, "lib", "modules", "*", "kernel"))
    if not vmlinuz or not moddirs:
        sys.exit(f"build.py: no vmlinuz or modules in {kdeb}")
    kernel = os.path.join(cache, "vmlinuz")
    shutil.copyfile(vmlinuz[0], kernel)

    helper = os.path.join(cache, "vmbench")
    run(["gcc", "-O2", "-Wall", "-static", "-o", helper, os.path.join(HERE, "vmbench.c")])

    a = Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules"):
        a.dir(d)
    with open(os.path.join(root, "bin", "busybox"), "rb") as f:
        a.file("bin/busybox", f.read(), 0o755)
    with open(helper, "rb") as f:
        a.file("bin/vmbench", f.read(), 0o755)
    with open(os.path.join(HERE, "init.sh"), "rb") as f:
        a.file("init", f.read(), 0o755)
    order = []
    for name, body in modules_in_order(moddirs[0], MODULES):
        a.file(f"lib/modules/{name}.ko", body)
        order.append(name)
    a.file("lib/modules/order", ("\n".join(order) + "\n").encode())
    initrd = os.path.join(cache, "initrd.gz")
    with gzip.open(initrd, "wb", compresslevel=6) as f:
        f.write(a.finish())
    shutil.rmtree(root, ignore_errors=True)
    return kernel, initrd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="/var/tmp/replfs-vm-cache",
                    help="where the packages, the kernel and the initramfs go")
    args = ap.parse_args(argv)
    for tool in ("apt-get", "dpkg-deb", "gcc"):
        if not shutil.which(tool):
            sys.exit(f"build.py: {tool} is not installed")
    kernel, initrd = build(os.path.abspath(args.cache))
    print(kernel)
    print(initrd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
