"""Block layers: one small async interface, stacked (see base.py)."""

from replfs.block.base import BlockNode, Extent

__all__ = ["BlockNode", "Extent"]
