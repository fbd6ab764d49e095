"""Aperture shapes and their blur kernels (disc, n-blade polygon, presets, raster images).

OWNED BY: the physical-renderer work. Only the :class:`Aperture` description below is fixed; the
kernel functions are to be implemented here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .errors import GenRefocusInputError

__all__ = ["APERTURE_SHAPES", "Aperture"]

#: Shape names accepted by :class:`Aperture` (``"image"`` needs ``Aperture.image``).
APERTURE_SHAPES = ("disc", "polygon", "heart", "star", "triangle", "image")


@dataclass(frozen=True)
class Aperture:
    """Description of a lens aperture (the shape of an out-of-focus point light).

    Attributes:
        shape: one of :data:`APERTURE_SHAPES`.
        blades: number of diaphragm blades for ``"polygon"``, 3..16.
        rotation_deg: rotation of the shape, degrees, counter-clockwise as seen on screen.
        roundness: blade curvature for ``"polygon"``: 0 = straight blades, 1 = a circle.
        image: ``(h, w)`` float tensor in [0, 1], 1 = open, for ``"image"``; its bounding box
            centre is the optical axis.
        scaling: ``"equal_area"`` (kernel area = pi r^2, so every shape looks equally blurry at one
            radius) or ``"circumscribed"`` (farthest open point at r, as BokehMe's polygons).
        flip_foreground: rotate the shape by 180 degrees for blur in front of the focal plane, as a
            real lens does.
    """

    shape: str = "disc"
    blades: int = 6
    rotation_deg: float = 0.0
    roundness: float = 0.0
    image: Tensor | None = field(default=None, compare=False)
    scaling: str = "equal_area"
    flip_foreground: bool = True

    def __post_init__(self) -> None:
        if self.shape not in APERTURE_SHAPES:
            raise GenRefocusInputError(
                f"shape must be one of {', '.join(APERTURE_SHAPES)}, got {self.shape!r}"
            )
        if isinstance(self.blades, bool) or not isinstance(self.blades, int) or not 3 <= self.blades <= 16:
            raise GenRefocusInputError(f"blades must be an integer in 3..16, got {self.blades!r}")
        if not 0.0 <= float(self.roundness) <= 1.0:
            raise GenRefocusInputError(f"roundness must be in [0, 1], got {self.roundness!r}")
        if self.scaling not in ("equal_area", "circumscribed"):
            raise GenRefocusInputError(
                f"scaling must be 'equal_area' or 'circumscribed', got {self.scaling!r}"
            )
        if self.shape == "image":
            img = self.image
            if not isinstance(img, Tensor) or img.ndim != 2 or min(img.shape) < 1:
                got = tuple(img.shape) if isinstance(img, Tensor) else type(img).__name__
                raise GenRefocusInputError(f"image must be a 2-D (h, w) tensor for shape 'image', got {got}")
            if float(img.max()) <= 0.0:
                raise GenRefocusInputError(
                    "image must have open (non-zero) pixels: the aperture image is entirely black; "
                    "use white for open parts of the aperture"
                )
