"""The dead-mount watcher reads /proc/self/mounts, whose mount points carry
octal escapes: a mount point with a space must still be recognised."""

from replfs.fuse.watcher import _unescape


def test_mount_points_are_unescaped():
    assert _unescape(r"/srv/vm\0401/disk") == "/srv/vm 1/disk"
    assert _unescape(r"/a\011b\012c\134d") == "/a\tb\nc\\d"
    assert _unescape("/plain/path") == "/plain/path"
