"""One file per pair: ``replfs up RES``, ``replfs down RES``, ``replfs status [RES]``.

A resource file (TOML) describes a replicated pair: its disks, its two hosts
with their roles, addresses and mount points, and the options of the mount
commands.  The same file lives on both hosts; each host picks its own part by
its host name (``socket.gethostname()``, or ``--host NAME``).  ``up`` turns the
local part into the argv of ``replfs primary`` / ``replfs secondary`` and runs
it through :func:`replfs.cli.main`, so every check of the command line applies
unchanged; ``down`` stops replication and unmounts.

Schema (docs/user-guide.md, "One file per pair", has a complete example)::

    [resource]   name, timeout, protocol, reconnect_interval, resync_rate,
                 allow_degraded_start
    [tls]        dir, hostname, insecure (optional)
    [[disk]]     name, image.HOST = PATH (one image per host)
    [host.NAME]  role, address, mount, listen, workdir, meta_dir, log, pid_file, allow

Design notes
------------
- **Table-driven options.**  :data:`OPTIONS` maps a key of the file to a flag
  of the mount commands and says which role takes it; adding an option of the
  CLI to the file is one line there.  The structural keys (``role``,
  ``address``, ``mount``, ``[[disk]]``) are checked by hand because they shape
  the command rather than add a flag to it.
- **Options of the other role are ignored, not refused.**  ``workdir`` on the
  primary host, say, is accepted and not used: so both hosts may carry the
  keys of both roles, and swapping the roles is an edit of the two ``role``
  lines.
- **Line numbers by a simple scan.**  ``tomllib`` gives the line of a syntax
  error (in its message) but keeps no positions for a parsed document; a
  semantic error (a missing or unknown key, a bad type, an unknown host) is
  located by scanning the text for table headers and ``key =`` lines.  The
  scan knows ``[table]``, ``[[array]]``, dotted keys and multi-line strings;
  a key inside an inline table or a multi-line array is reported at the line
  of the key that holds it, a missing key at its table's header.
- **Relative paths** in the file are taken relative to the file's directory,
  so a file and its images can move together (tests rely on it too).
- **down** is ``replfs stop`` (the secondary's final checkpoint makes a
  restarted secondary consistent, the primary flushes both sides), then
  ``fusermount3 -u`` (never lazy: a VM that still has a disk open keeps it, and
  ``down`` fails and says so), then a wait until the daemon has exited.  A
  resource that is not up is a quiet success, as ``drbdadm down``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from typing import Any

from replfs.errors import ReplfsError, UsageError

#: Where a bare resource name is looked up (``$REPLFS_CONFIG_DIR`` overrides).
CONFIG_DIR = "/etc/replfs"
ROLES = ("primary", "secondary")
PROTOCOLS = ("sync", "checkpoint")
#: How long ``down`` waits for the daemon to exit after the unmount.
DOWN_TIMEOUT = 60.0


class ResourceError(UsageError):
    """Bad input in a resource file: ``FILE:LINE: message`` (exit 2)."""

    def __init__(self, file: str, line: int | None, message: str):
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {message}")
        self.file, self.line, self.message = file, line, message


# -- the option table --------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    table: str          # "resource", "tls", or "host" (each host's own table)
    key: str            # the key in the file
    kind: str           # "float", "bool", "str", "path", "rate", "address", "list"
    flag: str           # the mount commands' flag
    roles: tuple[str, ...] = ROLES  # the commands that take it

    def argv(self, value) -> list[str]:
        if self.kind == "bool":
            return [self.flag] if value else []
        if self.kind == "list":
            return [a for v in value for a in (self.flag, str(v))]
        return [self.flag, _plain(value)]


#: Keys that become one flag of ``replfs primary`` / ``replfs secondary``.
OPTIONS: tuple[Option, ...] = (
    Option("resource", "timeout", "float", "--timeout"),
    Option("resource", "reconnect_interval", "float", "--reconnect-interval", ("primary",)),
    Option("resource", "resync_rate", "rate", "--resync-rate", ("primary",)),
    Option("resource", "allow_degraded_start", "bool", "--allow-degraded-start", ("primary",)),
    Option("host", "workdir", "path", "--workdir", ("secondary",)),
    Option("host", "meta_dir", "path", "--meta-dir"),
    Option("host", "log", "path", "--log"),
    Option("host", "pid_file", "path", "--pid-file"),
    Option("host", "allow", "list", "--allow", ("secondary",)),
    Option("tls", "dir", "path", "--tls-dir"),
    Option("tls", "hostname", "str", "--tls-hostname", ("primary",)),
    Option("tls", "insecure", "bool", "--insecure", ("secondary",)),
)

#: Keys checked by hand (they shape the command, or are not passed on).
RESOURCE_KEYS = {"name": "str", "protocol": "str"}
HOST_KEYS = {"role": "str", "address": "address", "mount": "path", "listen": "address"}
DISK_KEYS = {"name": "str", "image": "table"}
TOP_TABLES = ("resource", "disk", "host", "tls")
REQUIRED_TABLES = ("resource", "disk", "host")


def _plain(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


# -- the parsed resource -----------------------------------------------------------
@dataclass(frozen=True)
class Host:
    name: str
    role: str
    address: str
    mount: str                                # absolute
    listen: str                               # secondary: where it listens
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # host-table OPTIONS


@dataclass(frozen=True)
class Disk:
    name: str
    images: dict[str, str]                    # host name -> absolute image path


@dataclass(frozen=True)
class Resource:
    file: str
    name: str
    protocol: str
    hosts: dict[str, Host]
    disks: tuple[Disk, ...]
    options: dict[str, dict[str, Any]]        # table -> its OPTIONS that are set

    def primary(self) -> Host:
        return next(h for h in self.hosts.values() if h.role == "primary")

    def secondary(self) -> Host:
        return next(h for h in self.hosts.values() if h.role == "secondary")


# -- finding and reading the file ----------------------------------------------------
def config_dir() -> str:
    return os.environ.get("REPLFS_CONFIG_DIR") or CONFIG_DIR


def resolve(res: str) -> str:
    """RES is a path (it has a ``/`` or ends in ``.toml``) or a bare name,
    looked up as ``CONFIG_DIR/RES.toml``."""
    if "/" in res or res.endswith(".toml"):
        return res
    return os.path.join(config_dir(), f"{res}.toml")


def load(res: str) -> Resource:
    path = resolve(res)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        hint = "" if path == res else f" (resource {res!r} is looked up in {config_dir()})"
        raise UsageError(f"{path}: {exc.strerror}{hint}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ResourceError(path, line, "not UTF-8 text") from None
    return parse(text, path, default_name=os.path.splitext(os.path.basename(path))[0])


_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")


def parse(text: str, file: str = "<resource>", *, default_name: str = "resource") -> Resource:
    """Parse and check a resource file's text; :class:`ResourceError` says
    what is wrong and where."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        if m := _TOML_POS.search(msg):
            raise ResourceError(file, int(m.group(1)),
                                f"{msg[:m.start()]} (column {m.group(2)})") from None
        if m := _TOML_END.search(msg):
            raise ResourceError(file, max(1, len(text.splitlines())),
                                f"{msg[:m.start()]} (at the end of the file)") from None
        raise ResourceError(file, None, msg) from None
    return _Checker(text, file).resource(doc, default_name)


# -- locating keys in the text -------------------------------------------------------
_HEADER = re.compile(r"^\s*(\[\[?)\s*(.+?)\s*(\]\]?)\s*(#.*)?$")
_KEYLINE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                      r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")
_KEYPART = re.compile(r"""\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*""")


def _split_key(text: str) -> list[str]:
    return [next(g for g in m.groups() if g is not None)
            for m in _KEYPART.finditer(text) if m.group(0).strip()]


def key_lines(text: str) -> dict[tuple, int]:
    """Map each key path of the document to the line it is defined on.
    Arrays of tables appear with their index: ``("disk", 1, "name")``."""
    lines: dict[tuple, int] = {}
    aot: dict[tuple, int] = {}     # array-of-tables path (without indices) -> last index
    current: tuple = ()
    in_string = None               # the delimiter of an open multi-line string
    for no, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        if m := _HEADER.match(line):
            keys = _split_key(m.group(2))
            is_aot = m.group(1) == "[["
            path: list = []
            for i, k in enumerate(keys):
                path.append(k)
                plain = tuple(keys[:i + 1])
                if is_aot and i == len(keys) - 1:
                    aot[plain] = aot.get(plain, -1) + 1
                    path.append(aot[plain])
                elif plain in aot:
                    path.append(aot[plain])
            current = tuple(path)
            for i in range(1, len(current) + 1):
                lines.setdefault(current[:i], no)
            continue
        if m := _KEYLINE.match(line):
            keys = _split_key(m.group(1))
            for i in range(1, len(keys) + 1):
                lines.setdefault(current + tuple(keys[:i]), no)
            rest = line[m.end():]
            for quote in ('"""', "'''"):
                if rest.count(quote) % 2:
                    in_string = quote
                    break
    return lines


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


class _Checker:
    def __init__(self, text: str, file: str):
        self.file = file
        self.lines = key_lines(text)

    def line(self, path: tuple) -> int | None:
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return self.lines[path[:n]]
        return None

    def fail(self, path: tuple, message: str):
        raise ResourceError(self.file, self.line(path), message)

    # -- values -----------------------------------------------------------------
    def value(self, path: tuple, value, kind: str):
        """Check one value's type (and form); returns it as the command wants it."""
        name = _dotted(path)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(path, f"{name}: expected a number of seconds, got {_show(value)}")
            if not 0 < value < float("inf"):
                self.fail(path, f"{name}: must be a finite positive number, got {value}")
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                self.fail(path, f"{name}: expected true or false, got {_show(value)}")
            return value
        if kind == "rate":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                self.fail(path, f"{name}: expected bytes per second such as \"100M\", "
                                f"got {_show(value)}")
            return str(value)
        if kind == "list":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(path, f"{name}: expected a list of strings, got {_show(value)}")
            return value
        if not isinstance(value, str):
            self.fail(path, f"{name}: expected a string, got {_show(value)}")
        if kind == "address":
            from replfs.cli import parse_hostport

            try:
                parse_hostport(value, name)
            except UsageError as exc:
                self.fail(path, str(exc))
        if kind == "path":
            if not value:
                self.fail(path, f"{name}: an empty path")
            value = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(self.file)),
                                                  os.path.expanduser(value)))
        return value

    def table(self, path: tuple, value) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"{_dotted(path)}: expected a table, got {_show(value)}")
        return value

    def known(self, path: tuple, table: dict, allowed) -> None:
        for key in table:
            if key not in allowed:
                self.fail(path + (key,), f"{_dotted(path + (key,))}: unknown key "
                                         f"(known: {', '.join(sorted(allowed))})")

    def need(self, path: tuple, table: dict, key: str):
        if key not in table:
            self.fail(path, f"{_dotted(path)}: missing key {key!r}")
        return table[key]

    # -- the document -------------------------------------------------------------
    def resource(self, doc: dict, default_name: str) -> Resource:
        self.known((), doc, TOP_TABLES)
        for key in REQUIRED_TABLES:
            if key not in doc:
                self.fail((), f"missing {'[[disk]]' if key == 'disk' else f'[{key}]'} "
                              f"table")
        options: dict[str, dict[str, Any]] = {}
        for tname in ("resource", "tls"):
            table = self.table((tname,), doc.get(tname, {}))
            opts = {o.key: o for o in OPTIONS if o.table == tname}
            self.known((tname,), table,
                       {**(RESOURCE_KEYS if tname == "resource" else {}), **opts})
            options[tname] = {k: self.value((tname, k), v, opts[k].kind)
                              for k, v in table.items() if k in opts}
        res = doc["resource"]
        name = self.value(("resource", "name"), res.get("name", default_name), "str")
        protocol = self.value(("resource", "protocol"), res.get("protocol", "sync"), "str")
        if protocol not in PROTOCOLS:
            self.fail(("resource", "protocol"), f"resource.protocol: {protocol!r} is not "
                      f"supported (only {', '.join(map(repr, PROTOCOLS))})")
        hosts = self.hosts(doc["host"])
        disks = self.disks(doc["disk"], hosts)
        return Resource(self.file, name, protocol, hosts, disks, options)

    def hosts(self, value) -> dict[str, Host]:
        table = self.table(("host",), value)
        opts = {o.key: o for o in OPTIONS if o.table == "host"}
        if len(table) != 2:
            where = ("host", list(table)[2]) if len(table) > 2 else ("host",)
            self.fail(where, f"a pair has two hosts; this file has {len(table)}"
                             f"{': ' + ', '.join(table) if table else ''}")
        hosts: dict[str, Host] = {}
        for hname, h in table.items():
            path = ("host", hname)
            h = self.table(path, h)
            self.known(path, h, {**HOST_KEYS, **opts})
            for key in ("role", "address", "mount"):
                self.need(path, h, key)
            role = self.value(path + ("role",), h["role"], "str")
            if role not in ROLES:
                self.fail(path + ("role",), f"{_dotted(path + ('role',))}: expected "
                          f"\"primary\" or \"secondary\", got {role!r}")
            if any(o.role == role for o in hosts.values()):
                self.fail(path + ("role",), f"{_dotted(path + ('role',))}: two hosts are "
                                            f"{role}; a pair has one primary and one secondary")
            address = self.value(path + ("address",), h["address"], "address")
            listen = self.value(path + ("listen",), h.get("listen", address), "address")
            hosts[hname] = Host(
                name=hname, role=role, address=address, listen=listen,
                mount=self.value(path + ("mount",), h["mount"], "path"),
                options={k: self.value(path + (k,), v, opts[k].kind)
                         for k, v in h.items() if k in opts})
        return hosts

    def disks(self, value, hosts: dict[str, Host]) -> tuple[Disk, ...]:
        if not isinstance(value, list) or not value:
            self.fail(("disk",), "disk: expected one or more [[disk]] tables")
        disks: list[Disk] = []
        seen: set[str] = set()
        for i, d in enumerate(value):
            path = ("disk", i)
            d = self.table(path, d)
            self.known(path, d, DISK_KEYS)
            name = self.value(path + ("name",), self.need(path, d, "name"), "str")
            if name in seen:
                self.fail(path + ("name",), f"{_dotted(path + ('name',))}: duplicate disk "
                                            f"name {name!r}")
            seen.add(name)
            ipath = path + ("image",)
            images = self.table(ipath, self.need(path, d, "image"))
            for hname in images:
                if hname not in hosts:
                    self.fail(ipath + (hname,), f"{_dotted(ipath + (hname,))}: unknown host "
                                                f"{hname!r} (hosts: {', '.join(hosts)})")
            for hname in hosts:
                if hname not in images:
                    self.fail(ipath, f"{_dotted(ipath)}: no image for host {hname!r}")
            disks.append(Disk(name, {h: self.value(ipath + (h,), p, "path")
                                     for h, p in images.items()}))
        return tuple(disks)


def _show(value) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


# -- this host's part ----------------------------------------------------------------
def this_host() -> str:
    return socket.gethostname()


def local_host(res: Resource, name: str | None = None) -> Host:
    """The host this command runs for: ``name`` (``--host``), else this
    machine's host name, or its first label (``alpha`` for ``alpha.example.org``)."""
    if name is not None:
        if name not in res.hosts:
            raise UsageError(f"{res.file}: --host {name}: not a host of this resource "
                             f"(hosts: {', '.join(res.hosts)})")
        return res.hosts[name]
    full = this_host()
    for candidate in (full, full.split(".", 1)[0]):
        if candidate in res.hosts:
            return res.hosts[candidate]
    raise UsageError(f"{res.file}: this host ({full}) is not one of its hosts "
                     f"({', '.join(res.hosts)}); --host NAME picks one")


def mount_argv(res: Resource, host: Host, *, foreground: bool = False,
               verbose: bool = False) -> list[str]:
    """The ``replfs primary|secondary`` argv (without ``replfs``) of ``host``."""
    argv = [host.role, host.mount]
    if host.role == "primary":
        argv += ["--secondary", res.secondary().address]
        if res.protocol != "sync":
            argv += ["--protocol", res.protocol]
    else:
        argv += ["--listen", host.listen]
    for d in res.disks:
        argv += ["--disk", f"{d.name}={d.images[host.name]}"]
    for opt in OPTIONS:
        if host.role not in opt.roles:
            continue
        values = host.options if opt.table == "host" else res.options.get(opt.table, {})
        if opt.key in values:
            argv += opt.argv(values[opt.key])
    if foreground:
        argv.append("-f")
    if verbose:
        argv.append("-v")
    return argv


# -- mounts on this host -------------------------------------------------------------
FSTYPE = "fuse.replfs"   # daemon.fuse_options: subtype=replfs


def _unescape(field: str) -> str:
    raw = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]),
                 field.encode(errors="surrogateescape"))
    return raw.decode(errors="surrogateescape")


def replfs_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The mount points of every replfs mount in this mount namespace."""
    found: list[str] = []
    with open(mountinfo, errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            fields = left.split()
            if sep and len(fields) >= 5 and right.split()[:1] == [FSTYPE]:
                found.append(_unescape(fields[4]))
    return found


# -- the commands ----------------------------------------------------------------------
def _pick(args) -> tuple[Resource, Host]:
    res = load(args.resource)
    return res, local_host(res, getattr(args, "host", None))


def cmd_up(args) -> int:
    res, host = _pick(args)
    argv = mount_argv(res, host, foreground=args.foreground, verbose=args.verbose)
    if args.dry_run:
        print(shlex.join(["replfs", *argv]))
        return 0
    from replfs import cli

    created = not os.path.lexists(host.mount)
    if created:  # /run/replfs/RES does not survive a reboot
        try:
            os.makedirs(host.mount)
        except OSError as exc:
            raise UsageError(f"mountpoint {host.mount}: {exc.strerror}") from None
    code = cli.main(argv)
    if code != 0 and created:
        try:
            os.rmdir(host.mount)  # only if still empty and not mounted on
        except OSError:
            pass
    return code


def cmd_down(args) -> int:
    from replfs import cli

    res, host = _pick(args)
    mount = os.path.realpath(host.mount)
    if args.dry_run:
        print(shlex.join(["replfs", "stop", mount]))
        print(shlex.join(["fusermount3", "-u", mount]))
        return 0
    if mount not in replfs_mounts():
        print(f"replfs: {res.name}: not up on {host.name} (nothing mounted on {mount})")
        return 0
    if cli.clear_dead_mount(mount):
        return 0
    try:
        pid = cli.read_status(mount).get("pid")
    except (OSError, ValueError, ReplfsError):  # hung, or going: stop and unmount anyway
        pid = None

    def stop() -> None:
        fd = os.open(os.path.join(mount, ".replfs", "stop"), os.O_WRONLY)
        try:
            os.write(fd, b"1\n")
        finally:
            os.close(fd)

    try:
        cli.bounded(mount, stop, DOWN_TIMEOUT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EINVAL: stopped or failed over already
            print(f"replfs: {mount}: stop: {os.strerror(exc.errno)}; unmounting anyway",
                  file=sys.stderr)
    except ReplfsError as exc:  # hung: the unmount still ends it
        print(f"replfs: stop: {exc}; unmounting anyway", file=sys.stderr)
    r = subprocess.run(["fusermount3", "-u", mount], check=False, capture_output=True,
                       text=True)
    if r.returncode != 0 and mount in replfs_mounts():
        why = r.stderr.strip().rpartition(": ")[2] or f"exit status {r.returncode}"
        raise ReplfsError(f"{mount}: cannot unmount ({why}); replication is stopped, the "
                          f"disks stay served (is a VM still using them?)")
    if pid is not None and not _wait_gone(pid, DOWN_TIMEOUT):
        raise ReplfsError(f"{mount}: unmounted, but the daemon (pid {pid}) has not exited "
                          f"after {DOWN_TIMEOUT:g} s")
    print(f"replfs: {res.name}: {host.role} down on {host.name} ({mount})")
    return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def cmd_status(args) -> int:
    """``status`` with no argument (every replfs mount here) or with a RES."""
    import copy

    from replfs import cli

    def for_mount(mount: str):
        one = copy.copy(args)
        one.mount = mount
        return one

    if args.mount is not None:
        res, host = _pick(argparse.Namespace(resource=args.mount,
                                             host=getattr(args, "host", None)))
        mount = os.path.realpath(host.mount)
        if mount not in replfs_mounts():
            raise ReplfsError(f"{res.name}: not up on {host.name} (nothing mounted on "
                              f"{mount})")
        return cli.cmd_status(for_mount(mount))
    if args.watch:
        raise UsageError("status --watch needs a MOUNT or a resource")
    mounts = replfs_mounts()
    if args.json:
        import json

        out: dict[str, Any] = {}
        for m in mounts:
            try:
                out[m] = json.loads(cli.read_status_bytes(m, args.timeout))
            except (OSError, ValueError, ReplfsError) as exc:
                out[m] = {"error": _why(exc)}
        print(json.dumps(out, indent=2))
        return 0
    if not mounts:
        print("no replfs mounts")
        return 0
    code = 0
    for m in mounts:
        try:
            cli.cmd_status(for_mount(m))
        except (OSError, ValueError, ReplfsError) as exc:
            print(f"? {m}: not answering ({_why(exc)})")
            code = cli.EXIT_FAIL
    return code


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)


# -- the mount helper ------------------------------------------------------------------
#: Generic mount(8) and FUSE options a helper is handed and has nothing to do with.
IGNORED_MOUNT_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "atime", "noatime", "relatime",
    "strictatime", "lazytime", "sync", "async", "allow_other", "default_permissions"})


def mount_helper(argv: list[str]) -> int:
    """``mount -t fuse.replfs RES MOUNT -o role=...,host=...`` (and an fstab
    line ``RES MOUNT fuse.replfs role=primary,_netdev 0 0``): mount.fuse3
    runs ``replfs RES MOUNT -o OPTIONS``.  ``host=NAME`` picks the host as
    ``--host`` does; ``role=`` must agree with the file (a safety check: an
    fstab line written for the primary never starts a secondary); MOUNT must
    be the host's mount point in the file, or replaces it.  Then it is
    ``replfs up RES``: the mount command returns once the mount is live."""
    if len(argv) < 2:
        raise UsageError("mount helper: expected RES MOUNT [-o OPTIONS]")
    res_name, mount, rest = argv[0], argv[1], argv[2:]
    opts: list[str] = []
    while rest:
        if rest[0] == "-o" and len(rest) > 1:
            opts += [o for o in rest[1].split(",") if o]
            rest = rest[2:]
        elif rest[0].startswith("-o") and len(rest[0]) > 2:
            opts += [o for o in rest[0][2:].split(",") if o]
            rest = rest[1:]
        else:
            raise UsageError(f"mount helper: unexpected argument {rest[0]!r} "
                             f"(usage: RES MOUNT -o role=primary|secondary[,host=NAME])")
    role = host_name = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key == "role":
            if value not in ("primary", "secondary"):
                raise UsageError(f"mount helper: role={value!r}: primary or secondary")
            role = value
        elif key == "host":
            host_name = value
        elif key in IGNORED_MOUNT_OPTIONS or key.startswith("x-"):
            continue
        else:
            raise UsageError(f"mount helper: unknown option {opt!r} (replfs takes role= and "
                             f"host=; the rest goes in the resource file)")
    res = load(res_name)
    host = local_host(res, host_name)
    if role is not None and role != host.role:
        raise UsageError(f"{res.file}: host {host.name} is the {host.role} of {res.name}, "
                         f"not its {role} (role={role} in the mount options)")
    mount = os.path.abspath(mount)
    if os.path.realpath(mount) != os.path.realpath(host.mount):
        host = dataclasses.replace(host, mount=mount)
    from replfs import cli

    return cli.main(mount_argv(res, host))
