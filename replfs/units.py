"""Byte sizes as people write them: one parser and one formatter, binary units only.

``parse_size`` reads ``4096``, ``512K``, ``64M``, ``1G``, ``1T`` (case does not
matter), also with a ``B`` or ``iB`` after the unit (``64MB``, ``64MiB``), a
fraction before it (``1.5G``, truncated to whole bytes) and blanks around it;
``K`` is 1024 bytes, never 1000.  ``human`` writes a byte count back the way
the benchmarks print it (``1 GiB``, ``1.5 MiB``, ``512 B``).
"""

from __future__ import annotations

import re
from fractions import Fraction

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864; raises ValueError for anything else than a size."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number, unit, suffix = m.group(1), m.group(2).upper(), (m.group(3) or "").upper()
    if not unit and (suffix == "IB" or "." in number):
        raise ValueError(f"not a size: {text!r} (a plain byte count is a whole number)")
    return int(Fraction(number) * UNITS[unit])


def human(n: float) -> str:
    """``human(3 << 29)`` -> ``"1.5 GiB"``: the largest unit it reaches, one decimal
    unless it is a whole number of that unit."""
    for unit, div in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= div:
            v = n / div
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"
