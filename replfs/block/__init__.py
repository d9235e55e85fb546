"""Block layers: one small async interface (base.py), one module per layer,
and graph.py, which assembles each host's graph in one place."""

from replfs.block.base import BlockNode, Extent
from replfs.block.cbw import CopyBeforeWrite
from replfs.block.fault import FaultLayer
from replfs.block.overlay import Overlay
from replfs.block.raw import RawImage

__all__ = ["BlockNode", "CopyBeforeWrite", "Extent", "FaultLayer", "Overlay", "RawImage"]
