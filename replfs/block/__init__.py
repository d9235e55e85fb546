"""Block layers: one small async interface, stacked (see base.py)."""

from replfs.block.base import BlockNode, Extent
from replfs.block.bitmap import ClusterBitmap
from replfs.block.cbw import CopyBeforeWrite
from replfs.block.fault import FaultLayer
from replfs.block.overlay import Overlay
from replfs.block.rangelock import RangeLock
from replfs.block.raw import RawImage
from replfs.block.secondary import SecondaryStack

__all__ = [
    "BlockNode",
    "ClusterBitmap",
    "CopyBeforeWrite",
    "Extent",
    "FaultLayer",
    "Overlay",
    "RangeLock",
    "RawImage",
    "SecondaryStack",
]
