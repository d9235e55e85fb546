"""CLI defaults that operators tripped over (operator review C3)."""

from replfs.cli import default_log


def test_two_mounts_with_the_same_name_do_not_share_a_log():
    a, b = default_log("primary", "/srv/a/vm"), default_log("primary", "/srv/b/vm")
    assert a != b
    assert a.startswith("/tmp/replfs-primary-vm-") and a.endswith(".log")
    assert default_log("primary", "/srv/a/vm") == a  # stable across runs
