"""Where an image's metadata file and a secondary disk's workdir live.

Design note
-----------
Both are a pure function of the image path (and an optional base directory),
so a restarted daemon finds the metadata of the last run without being told;
distinct images get distinct files, except for the collisions below.

``meta_path(image)``
  * with ``meta_dir``: ``<meta_dir>/<basename(image)>.replfs-meta`` (the
    operator chose the place; two images with one basename share a name
    there: see "Collisions");
  * a regular file (or a path that does not exist yet): beside it,
    ``<image>.replfs-meta``, so it moves and is backed up with the image,
    like DRBD's external metadata;
  * a block device, or any path under ``/dev`` (nothing may be created
    there): ``STATE_DIR/<image path, leading "/" dropped, "/" -> "_">``
    ``.replfs-meta``, e.g. ``/dev/vg0/disk1`` ->
    ``/var/lib/replfs/dev_vg0_disk1.replfs-meta``.  ``STATE_DIR`` is
    created on demand with mode 0700 (the files hold no secrets, but
    nobody else has business there).  The name is not injective:
    ``/dev/a_b`` and ``/dev/a/b`` collide.

``workdir_path(image)``: the same rules with the suffix ``.replfs-work`` (a
directory the caller creates; this function only creates ``STATE_DIR``).

Collisions: two images mapped to one name are caught by
:class:`replfs.meta.format.MetaFile` only when their sizes or cluster sizes
differ (``MetaError``) or they are open at once (its lock); two images of one
size used one after the other would share the file.  Nothing here can tell
them apart (the metadata records no image identity), so the CLI should refuse
two disks of one mount whose paths collide.

The image path is made absolute (``os.path.abspath``) but symlinks are NOT
resolved: ``/dev/disk/by-id/...`` is the stable name of a disk, the
``/dev/sdX`` it points to is not.  Costs: one ``stat`` of the image (and one
``mkdir`` the first time for a device).
"""

from __future__ import annotations

import os
import stat

#: Where the metadata and workdirs of block devices live.  A module constant so
#: that tests can point it elsewhere (monkeypatch ``paths.STATE_DIR``).
STATE_DIR = "/var/lib/replfs"

META_SUFFIX = ".replfs-meta"
WORK_SUFFIX = ".replfs-work"


def _is_device(image: str) -> bool:
    if image == "/dev" or image.startswith("/dev/"):
        return True
    try:
        return stat.S_ISBLK(os.stat(image).st_mode)
    except OSError:
        return False  # not there yet: a file to be created


def _place(image: str, base: str | None, suffix: str) -> str:
    image = os.path.abspath(os.fspath(image))
    if base is not None:
        return os.path.join(os.path.abspath(os.fspath(base)), os.path.basename(image) + suffix)
    if _is_device(image):
        os.makedirs(STATE_DIR, mode=0o700, exist_ok=True)
        return os.path.join(STATE_DIR, image[1:].replace("/", "_") + suffix)
    return image + suffix


def meta_path(image: str, meta_dir: str | None = None) -> str:
    """The absolute path of ``image``'s metadata file (see the module note)."""
    return _place(image, meta_dir, META_SUFFIX)


def workdir_path(image: str, base: str | None = None) -> str:
    """The absolute path of the default workdir of a secondary disk's overlays
    (a directory; never under /dev).  ``base`` plays the role of ``meta_dir``."""
    return _place(image, base, WORK_SUFFIX)
