"""The single registry of GenRefocus nodes."""

from .aperture import ApertureShape
from .defocus import DefocusMapNode, FocusFromMask, FocusPoint
from .depth import DepthFromImage
from .depth_models import EstimateDepth
from .loaders import DepthModelLoader
from .render import ClassicalBokeh

NODES = [
    DepthFromImage,
    DepthModelLoader,
    EstimateDepth,
    FocusPoint,
    FocusFromMask,
    DefocusMapNode,
    ApertureShape,
    ClassicalBokeh,
]

__all__ = ["NODES"]
