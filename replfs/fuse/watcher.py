"""A watcher that removes the mount if the daemon dies (kill -9).

Design note
-----------
``auto_unmount`` makes fusermount3 watch the daemon and unmount when it
dies, but fusermount3 3.14 unmounts only if its check of the mount fails
with ENOTCONN: when it looks while the kernel is still tearing the dead
daemon's connection down, the check fails with ECONNABORTED and it leaves a
dead mount behind (seen with strace, about one kill in 15-30 under load).
So the daemon also starts this small process: it waits for the daemon to go
(the end of a pipe only the daemon holds), then for up to ten seconds unmounts
the mount point while it is a *dead* replfs mount (access fails with ENOTCONN
or ECONNABORTED) - a live mount, a new daemon's, is never touched, and it
stops as soon as there is no dead mount.  After a clean exit the daemon says
so on the pipe and the watcher exits at once.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import time

GRACE = 10.0
#: What the daemon writes before it lets go at a clean exit: nothing to do.
CLEAN = b"."


def start(mount: str) -> int:
    """Start the watcher for ``mount``; returns the pipe's write end, which
    the daemon keeps open (close-on-exec) for its whole life; :func:`done`
    closes it after a clean exit."""
    r, w = os.pipe()
    os.set_inheritable(w, False)
    subprocess.Popen([sys.executable, "-m", "replfs.fuse.watcher", mount, str(r)],
                     pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    os.close(r)
    return w


def done(fd: int) -> None:
    """The daemon's clean exit: the watcher goes at once."""
    try:
        os.write(fd, CLEAN)
    finally:
        os.close(fd)


def _unescape(field: str) -> str:
    """/proc/self/mounts writes space, tab, newline and backslash as octal
    escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def replfs_mounted(path: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if fields[2] == "fuse.replfs" and _unescape(fields[1]) == path:
                    return True
    except (OSError, IndexError):
        pass
    return False


def dead(path: str) -> bool:
    """Access fails as it does on a mount whose daemon is gone."""
    try:
        os.listdir(path)  # (stat may still answer from the kernel's cache)
        return False
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def unmount_if_dead(path: str) -> bool:
    """Unmount ``path`` (lazily) if it is a dead replfs mount; True if it was."""
    if not (dead(path) and replfs_mounted(path)):
        return False
    subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True)
    return True


def main(argv: list[str]) -> int:
    mount, fd = os.path.realpath(argv[0]), int(argv[1])
    clean = False
    while data := os.read(fd, 1):  # EOF: the daemon is gone, however it went
        clean = clean or data == CLEAN
    if clean:
        return 0
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline and replfs_mounted(mount):
        if not unmount_if_dead(mount) and not dead(mount):
            break  # alive: a new daemon's mount, not ours
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
