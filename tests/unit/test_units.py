"""replfs.units: the one size parser (what scripts/bench, bench_scale and the demo
accepted before) and the byte formatter the benchmark report prints with."""

from __future__ import annotations

import pytest

from replfs.units import GiB, KiB, MiB, TiB, human, parse_size


@pytest.mark.parametrize("text, n", [
    ("0", 0),
    ("4096", 4096),
    ("512K", 512 * KiB),
    ("64M", 64 * MiB),
    ("1G", GiB),
    ("1T", TiB),
    ("64m", 64 * MiB),           # any case
    ("1t", TiB),
    ("64MB", 64 * MiB),          # a B or iB after the unit
    ("64MiB", 64 * MiB),
    ("64mib", 64 * MiB),
    ("1GiB", GiB),
    ("512B", 512),               # plain bytes, with a B
    ("1.5G", 3 * GiB // 2),      # a fraction before a unit
    ("0.5K", 512),
    (".5K", 512),
    ("2.M", 2 * MiB),
    ("1.1K", 1126),              # truncated to whole bytes, as float() did
    (" 1G\n", GiB),              # blanks around it
    ("1 G", GiB),
    ("1099511627776", TiB),      # exact, no float on the way
    ("123456789012345678K", 123456789012345678 * KiB),
])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", [
    "", " ", ".", "M", "G1", "-1M", "+1M", "1.5", "1.", ".5", "1e3K", "1_000", "1P", "1KK",
    "512iB", "inf", "nanG", "1/2G", "1 M B", "64MBB",
])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"),
    (1023, "1023 B"),
    (KiB, "1 KiB"),
    (1536, "1.5 KiB"),
    (64 * MiB, "64 MiB"),
    (GiB, "1 GiB"),
    (3 * GiB // 2, "1.5 GiB"),
    (TiB, "1 TiB"),
    (0.5 * MiB, "512 KiB"),
])
def test_human(n, text):
    assert human(n) == text


@pytest.mark.parametrize("text", ["512K", "64M", "1G", "1.5G", "1T", "4096"])
def test_round_trip(text):
    assert parse_size(human(parse_size(text)).replace(" ", "")) == parse_size(text)
