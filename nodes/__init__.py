"""The single registry of GenRefocus nodes."""

from .aperture import ApertureShape
from .defocus import DefocusMapNode, FocusFromMask, FocusPoint
from .depth import DepthFromImage
from .render import ClassicalBokeh

NODES = [DepthFromImage, FocusPoint, FocusFromMask, DefocusMapNode, ApertureShape, ClassicalBokeh]

__all__ = ["NODES"]
