"""Named integer counters for a node's ``statistics()``.

Design note
-----------
A layer counts requests on its hot path, so a counter must cost no more than
the ``self.stats["writes"] += 1`` on a dict it replaces; a slot attribute
costs less, and a misspelt name fails at once (``AttributeError``) instead of
starting a new key.  A subclass lists its counters in ``__slots__``; that
order is the order of :meth:`Counters.as_dict`, i.e. of the status keys.
"""

from __future__ import annotations


class Counters:
    """Every name in a subclass's ``__slots__`` is an int counter, 0 at first."""

    __slots__ = ()

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
