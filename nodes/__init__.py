"""The single registry of GenRefocus nodes."""

from .aperture import ApertureShape
from .camera import CameraSettings, KFromCamera
from .defocus import DefocusMapNode, FocusFromMask, FocusPoint
from .depth import DepthFromImage
from .depth_models import EstimateDepth
from .generative import BokehNet, DeblurNet, Refocus, TiledDenoise
from .loaders import DepthModelLoader, GenfocusModelLoader, ReadCameraExif
from .native import NativeModelLoader
from .render import ClassicalBokeh

NODES = [
    DepthFromImage,
    DepthModelLoader,
    EstimateDepth,
    FocusPoint,
    FocusFromMask,
    ReadCameraExif,
    CameraSettings,
    KFromCamera,
    DefocusMapNode,
    ApertureShape,
    ClassicalBokeh,
    GenfocusModelLoader,
    NativeModelLoader,
    TiledDenoise,
    DeblurNet,
    BokehNet,
    Refocus,
]

__all__ = ["NODES"]
