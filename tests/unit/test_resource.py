"""Resource files (replfs/resource.py): parsing, errors with their line, host
picking, and the command lines of ``up``/``down`` (``--dry-run``).  No sockets,
no mounts."""

from __future__ import annotations

import shlex

import pytest

from replfs import cli, resource
from replfs.resource import (
    ResourceError,
    key_lines,
    load,
    local_host,
    mount_argv,
    parse,
)

GOOD = """\
# a pair
[resource]
name = "vm1"
timeout = 2.5
protocol = "sync"
resync_rate = "100M"
allow_degraded_start = true

[[disk]]
name = "disk0"
[disk.image]
alpha = "/images/vm1.img"
beta  = "/srv/vm1.img"

[[disk]]
name = "data"
image.alpha = "/images/data with space.img"
image.beta = "rel/data.img"

[host.alpha]
role = "primary"
address = "10.0.0.1:10809"
mount = "/run/replfs/vm1"
workdir = "/ignored/on/the/primary"

[host.beta]
role = "secondary"
address = "10.0.0.2:10809"
listen = "0.0.0.0:10809"
mount = "/run/replfs/vm1"
workdir = "/var/lib/replfs/vm1"
meta_dir = "meta"
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line number of the nth line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[nth - 1]


def write(tmp_path, text: str, name: str = "vm1.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- a good file -------------------------------------------------------------------------
def test_good_file(tmp_path):
    res = load(write(tmp_path, GOOD))
    assert res.name == "vm1" and res.protocol == "sync"
    assert set(res.hosts) == {"alpha", "beta"}
    assert res.primary().name == "alpha" and res.secondary().name == "beta"
    assert res.hosts["beta"].listen == "0.0.0.0:10809"
    assert res.hosts["alpha"].listen == "10.0.0.1:10809"  # defaults to the address
    assert [d.name for d in res.disks] == ["disk0", "data"]
    # Relative paths are relative to the file's directory.
    assert res.disks[1].images["beta"] == str(tmp_path / "rel" / "data.img")
    assert res.hosts["beta"].options["meta_dir"] == str(tmp_path / "meta")
    assert res.options == {"resource": {"timeout": 2.5, "resync_rate": "100M",
                                        "allow_degraded_start": True}, "tls": {}}


def test_name_defaults_to_the_file_name(tmp_path):
    text = GOOD.replace('name = "vm1"\n', "", 1)
    assert load(write(tmp_path, text, "web.toml")).name == "web"


def test_command_lines(tmp_path):
    res = load(write(tmp_path, GOOD))
    p = mount_argv(res, res.hosts["alpha"])
    assert p == ["primary", "/run/replfs/vm1", "--secondary", "10.0.0.2:10809",
                 "--disk", "disk0=/images/vm1.img",
                 "--disk", "data=/images/data with space.img",
                 "--timeout", "2.5", "--resync-rate", "100M", "--allow-degraded-start"]
    s = mount_argv(res, res.hosts["beta"], foreground=True)
    assert s == ["secondary", "/run/replfs/vm1", "--listen", "0.0.0.0:10809",
                 "--disk", "disk0=/srv/vm1.img",
                 "--disk", f"data={tmp_path}/rel/data.img",
                 "--timeout", "2.5", "--workdir", "/var/lib/replfs/vm1",
                 "--meta-dir", str(tmp_path / "meta"), "-f"]


def test_tls_and_allow(tmp_path):
    text = GOOD.replace("[[disk]]", '[tls]\ndir = "tls"\nhostname = "beta.example"\n'
                                    'insecure = false\n\n[[disk]]', 1)
    text = text.replace('meta_dir = "meta"', 'allow = ["10.0.0.1/32", "10.0.1.0/24"]')
    res = load(write(tmp_path, text))
    p = mount_argv(res, res.hosts["alpha"])
    assert p[-4:] == ["--tls-dir", str(tmp_path / "tls"), "--tls-hostname", "beta.example"]
    s = mount_argv(res, res.hosts["beta"])
    assert s[-6:] == ["--allow", "10.0.0.1/32", "--allow", "10.0.1.0/24",
                      "--tls-dir", str(tmp_path / "tls")]
    text = text.replace("insecure = false", "insecure = true")
    assert mount_argv(load(write(tmp_path, text)), res.hosts["beta"])[-1] == "--insecure"
    bad = text.replace('allow = ["10.0.0.1/32", "10.0.1.0/24"]', 'allow = "10.0.0.1/32"')
    with pytest.raises(ResourceError, match="host.beta.allow: expected a list of strings"):
        load(write(tmp_path, bad))
    bad = text.replace('hostname = "beta.example"', 'certs = "x"')
    with pytest.raises(ResourceError, match=r":\d+: tls.certs: unknown key \(known: dir, "
                                            r"hostname, insecure\)"):
        load(write(tmp_path, bad))


def test_every_option_is_a_flag_of_the_mount_commands():
    """The table names only flags that the CLI has, for the roles it says."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for opt in resource.OPTIONS:
        for role in opt.roles:
            assert opt.flag in sub.choices[role]._option_string_actions, (opt, role)


def test_dry_run_up_prints_a_shell_quoted_command(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert cli.main(["--dry-run", "--host", "alpha", "up", path]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("replfs primary /run/replfs/vm1 --secondary 10.0.0.2:10809 ")
    assert "'data=/images/data with space.img'" in out
    assert shlex.split(out)[1:] == mount_argv(load(path), load(path).hosts["alpha"])
    # The options may also follow the verb; -f is passed on.
    assert cli.main(["up", path, "--host", "beta", "--dry-run", "-f"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("replfs secondary /run/replfs/vm1 --listen 0.0.0.0:10809 ")
    assert out.endswith(" -f")


def test_dry_run_down(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    assert cli.main(["--dry-run", "--host", "beta", "down", path]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "replfs stop /run/replfs/vm1", "fusermount3 -u /run/replfs/vm1"]


# -- picking the host ----------------------------------------------------------------------
def test_host_picking(tmp_path, monkeypatch):
    res = load(write(tmp_path, GOOD))
    monkeypatch.setattr(resource, "this_host", lambda: "beta")
    assert local_host(res).name == "beta"
    monkeypatch.setattr(resource, "this_host", lambda: "alpha.example.org")
    assert local_host(res).name == "alpha"  # the first label of a FQDN
    assert local_host(res, "beta").name == "beta"  # --host wins
    monkeypatch.setattr(resource, "this_host", lambda: "gamma")
    with pytest.raises(cli.UsageError, match=r"this host \(gamma\) is not one of its hosts "
                                             r"\(alpha, beta\); --host NAME"):
        local_host(res)
    with pytest.raises(cli.UsageError, match="--host delta: not a host"):
        local_host(res, "delta")


def test_unknown_host_from_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resource, "this_host", lambda: "gamma")
    path = write(tmp_path, GOOD)
    assert cli.main(["--dry-run", "up", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"replfs: {path}: this host (gamma)")


# -- finding the file ------------------------------------------------------------------------
def test_bare_name_is_looked_up_in_the_config_dir(tmp_path, monkeypatch, capsys):
    write(tmp_path, GOOD, "vm1.toml")
    monkeypatch.setenv("REPLFS_CONFIG_DIR", str(tmp_path))
    assert resource.resolve("vm1") == str(tmp_path / "vm1.toml")
    assert resource.resolve("./vm1") == "./vm1"
    assert resource.resolve("x.toml") == "x.toml"
    assert cli.main(["--dry-run", "--host", "alpha", "up", "vm1"]) == 0
    assert capsys.readouterr().out.startswith("replfs primary ")
    assert cli.main(["--dry-run", "--host", "alpha", "up", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"replfs: {tmp_path}/nope.toml: No such file or directory "
                   f"(resource 'nope' is looked up in {tmp_path})")
    monkeypatch.delenv("REPLFS_CONFIG_DIR")
    assert resource.resolve("vm1") == "/etc/replfs/vm1.toml"


# -- errors, each with its line ---------------------------------------------------------------
def edit(old: str, new: str, nth: int = 1) -> str:
    """GOOD with the nth occurrence of ``old`` replaced."""
    at = -1
    for _ in range(nth):
        at = GOOD.index(old, at + 1)
    return GOOD[:at] + new + GOOD[at + len(old):]


BAD = [
    # (the text, the line the error names (a substring of it), words of the message)
    (edit('timeout = 2.5', 'timeout = '), "timeout =", ["Invalid value", "column"]),
    (edit('[host.beta]', '[host.beta'), "[host.beta", ["column"]),
    (edit('timeout = 2.5', 'timeout = "2.5"'), "timeout =",
     ["resource.timeout", "expected a number", "'2.5'"]),
    (edit('timeout = 2.5', 'timeout = -1'), "timeout =", ["finite positive"]),
    (edit('allow_degraded_start = true', 'allow_degraded_start = "yes"'),
     "allow_degraded_start", ["true or false"]),
    (edit('protocol = "sync"', 'protocol = "async"'), "protocol =", ["not supported"]),
    (edit('timeout = 2.5', 'timeout = 2.5\ncolour = "red"'), "colour", [
        "resource.colour: unknown key", "known: allow_degraded_start"]),
    (edit('workdir = "/var/lib/replfs/vm1"', 'wrkdir = "/x"'), "wrkdir",
     ["host.beta.wrkdir: unknown key"]),
    (edit('role = "secondary"\n', ''), "[host.beta]", ["host.beta: missing key 'role'"]),
    (edit('role = "secondary"', 'role = "secundary"'), 'role = "secundary"',
     ['expected "primary" or "secondary"', "'secundary'"]),
    (edit('role = "secondary"', 'role = "primary"'), 'role = "primary"@2',
     ["two hosts are primary"]),
    (edit('address = "10.0.0.2:10809"', 'address = "10.0.0.2"'), 'address = "10.0.0.2"',
     ["host.beta.address", "HOST:PORT"]),
    (edit('mount = "/run/replfs/vm1"', 'mount = 7', 2), "mount = 7",
     ["host.beta.mount: expected a string, got 7"]),
    (edit('beta  = "/srv/vm1.img"', 'gamma = "/srv/vm1.img"'), "gamma =",
     ["disk[0].image.gamma: unknown host 'gamma'", "hosts: alpha, beta"]),
    (edit('image.beta = "rel/data.img"\n', ''), 'image.alpha', [
        "disk[1].image: no image for host 'beta'"]),
    (edit('name = "data"', 'name = "disk0"'), 'name = "disk0"@2',
     ["disk[1].name: duplicate disk name 'disk0'"]),
    (edit('name = "data"\n', ''), '[[disk]]@2', ["disk[1]: missing key 'name'"]),
    (edit('[host.beta]', '[host.gamma]\nrole = "secondary"\naddress = "h:1"\n'
                         'mount = "/m"\n[host.beta]'), '[host.beta]', [
        "a pair has two hosts; this file has 3: alpha, gamma, beta"]),
    (edit('[resource]', '[resources]'), '[resources]', ["resources: unknown key"]),
]


def expected_line(text: str, where: str) -> int:
    needle, _, nth = where.partition("@")
    return line_of(text, needle, int(nth or 1))


@pytest.mark.parametrize("text, where, words", BAD,
                         ids=[f"{i}-{w[0][:24]}" for i, (_, _, w) in enumerate(BAD)])
def test_errors_name_the_line(tmp_path, capsys, text, where, words):
    path = write(tmp_path, text)
    with pytest.raises(ResourceError) as info:
        load(path)
    line = expected_line(text, where)
    assert info.value.line == line, (str(info.value), line)
    for word in words:
        assert word in info.value.message, info.value.message
    # Through the CLI: one line, FILE:LINE, exit 2.
    assert cli.main(["--dry-run", "--host", "alpha", "up", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"replfs: {path}:{line}: "), err[0]


def test_whole_file_errors(tmp_path):
    with pytest.raises(ResourceError, match=r"^f.toml: missing \[resource\] table$"):
        parse("[[disk]]\nname='a'\nimage={}\n[host.a]\n", "f.toml")
    with pytest.raises(ResourceError, match=r":4: a pair has two hosts; this file has 1: a$"):
        parse('[resource]\n[[disk]]\nname="d"\n[host.a]\nrole="primary"\naddress="h:1"\n'
              'mount="/m"\n', "f.toml")
    with pytest.raises(ResourceError, match=r"f.toml:2: Illegal character"):
        parse('[resource]\nname = "x\n', "f.toml")
    with pytest.raises(ResourceError, match=r"f.toml:2: Unterminated string \(at the end"):
        parse('[resource]\nname = """x\n', "f.toml")
    with pytest.raises(ResourceError, match=r"f.toml:1: host: expected a table, got 3"):
        parse('host = 3\n[resource]\n[[disk]]\nname = "d"\n', "f.toml")


def test_not_utf8(tmp_path):
    path = tmp_path / "x.toml"
    path.write_bytes(b"[resource]\nname = '\xff'\n")
    with pytest.raises(ResourceError, match=r"x.toml:2: not UTF-8"):
        load(str(path))


# -- the line scan ---------------------------------------------------------------------------
def test_key_lines():
    text = ('a = 1\n[t]\nb.c = 2\n"q.k" = 3\ns = """\nx = 4\n"""\n[[arr]]\nn = 1\n'
            '[arr.sub]\nk = 1\n[[arr]]\nn = 2\n[arr.sub]  # c\nk = 2\n')
    lines = key_lines(text)
    assert lines[("a",)] == 1
    assert lines[("t", "b", "c")] == 3 and lines[("t", "b")] == 3
    assert lines[("t", "q.k")] == 4
    assert ("t", "x") not in lines  # inside a multi-line string
    assert lines[("arr", 0, "n")] == 9 and lines[("arr", 0, "sub", "k")] == 11
    assert lines[("arr", 1)] == 12 and lines[("arr", 1, "sub")] == 14
    assert lines[("arr", 1, "sub", "k")] == 15


# -- mounts on this host ----------------------------------------------------------------------
def test_replfs_mounts_from_mountinfo(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "90 22 0:50 / /run/replfs/vm1 rw,nosuid,nodev shared:1 - fuse.replfs replfs-primary "
        "rw,user_id=0\n"
        "91 22 0:51 / /mnt/with\\040space rw - fuse.replfs replfs-secondary rw\n"
        "92 22 0:52 / /mnt/sshfs rw - fuse.sshfs host: rw\n")
    assert resource.replfs_mounts(str(info)) == ["/run/replfs/vm1", "/mnt/with space"]


# -- the documented examples ---------------------------------------------------------------
def test_the_example_files_parse():
    root = __file__.rsplit("/tests/", 1)[0]
    res = load(f"{root}/docs/examples/pair.toml")
    assert mount_argv(res, res.hosts["alpha"]) == [
        "primary", "/run/replfs/vm1", "--secondary", "10.0.0.2:10809",
        "--disk", "disk0=/var/lib/images/vm1.img",
        "--disk", "data=/var/lib/images/vm1-data.img", "--timeout", "5.0",
        "--tls-dir", "/etc/replfs/tls"]
    with open(f"{root}/docs/user-guide.md") as f:
        guide = f.read()
    section = guide.split("### One file per pair", 1)[1]
    example = parse(section.split("```toml\n", 1)[1].split("```", 1)[0], "guide")
    assert example.disks == res.disks
    assert shlex.join(["replfs", *mount_argv(example, example.hosts["alpha"])]) in \
        " ".join(section.split())
