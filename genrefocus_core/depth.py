"""Depth maps: the ``DepthMap`` record that travels between stages, and conversions from images.

Depth estimators (Depth Pro, Depth Anything V2) will live here too; they are imported lazily so
this module stays light.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from torch import Tensor

from ._checks import check_bchw, check_finite, check_number
from .defocus import disparity_from_depth
from .errors import GenRefocusInputError

__all__ = ["DEPTH_INTERPRETATIONS", "DepthMap", "depth_map_from_image"]

logger = logging.getLogger(__name__)

#: How an external depth image is read: metres, relative disparity (near = 1), relative depth (near = 0).
DEPTH_INTERPRETATIONS = ("metric_depth", "relative_disparity", "relative_depth")


@dataclass(frozen=True)
class DepthMap:
    """A disparity map with its convention.

    Attributes:
        disparity: ``(B, 1, H, W)``, larger = nearer: 1/m when ``metric``, else relative in [0, 1].
        metric: True when ``disparity`` is metric (1/m), so K is in px*m as in Genfocus.
        depth_m: ``(B, 1, H, W)`` metric depth in metres when known, else None.
        focal_px: focal length in pixels of this image when known (Depth Pro estimates it).
        source: where the map came from (e.g. ``"image:metric_depth"``), for messages and previews.
    """

    disparity: Tensor
    metric: bool
    depth_m: Tensor | None = field(default=None, repr=False)
    focal_px: float | None = None
    source: str = "unknown"

    def __post_init__(self) -> None:
        check_bchw("disparity", self.disparity, 1)

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the map."""
        return int(self.disparity.shape[-2]), int(self.disparity.shape[-1])

    @property
    def batch_size(self) -> int:
        """Number of maps in the batch."""
        return int(self.disparity.shape[0])

    @property
    def unit(self) -> str:
        """Unit of ``disparity`` for messages: ``"1/m"`` or ``"relative"``."""
        return "1/m" if self.metric else "relative"


def _single_channel(image: Tensor, name: str) -> Tensor:
    """Channel 0 of a grey depth image, refusing colour-mapped (e.g. turbo) depth previews."""
    if image.shape[1] == 1:
        return image
    rgb = image[:, :3]
    spread = float((rgb.amax(dim=1) - rgb.amin(dim=1)).max())
    scale = max(float(rgb.abs().max()), 1e-12)
    if spread > 0.02 * scale:
        raise GenRefocusInputError(
            f"{name} must be a grey depth map (all colour channels equal), but its channels differ by up "
            f"to {spread:.3g}: it looks colour-mapped (e.g. a 'turbo' preview). Feed the raw grey depth "
            "output of the depth node instead"
        )
    return rgb[:, :1]


def depth_map_from_image(
    image: Tensor,
    interpretation: str,
    *,
    invert: bool = False,
    metric_scale: float = 1.0,
    focal_px: float | None = None,
) -> DepthMap:
    """Read an external depth image (e.g. another pack's depth output) as a :class:`DepthMap`.

    * ``"metric_depth"``: values are depth in metres times ``1 / metric_scale`` (so
      ``depth_m = value * metric_scale``); disparity = 1/depth (invalid depth: infinitely far, see
      :func:`~genrefocus_core.defocus.disparity_from_depth`). ``invert`` is not allowed.
    * ``"relative_disparity"``: near = bright (what most depth nodes output); min-max normalised
      per image to [0, 1].
    * ``"relative_depth"``: near = dark; min-max normalised, then ``1 - value``.

    ``invert`` flips a relative map (for depth nodes with the opposite convention). A flat relative
    map (max = min) is constant: everything at one distance.

    Args:
        image: ``(B, C, H, W)`` with C in 1, 3, 4 (grey; colour channels must be equal).
        interpretation: one of :data:`DEPTH_INTERPRETATIONS`.
        invert: flip near/far of a relative map.
        metric_scale: metres per unit of the image value for ``"metric_depth"``, ``> 0``.
        focal_px: focal length in px when known.

    Returns:
        A :class:`DepthMap` with ``(B, 1, H, W)`` disparity.

    Raises:
        GenRefocusInputError: bad shape, non-finite values, colour-mapped input, unknown
            interpretation, or ``invert`` with metric depth.

    Example:
        >>> img = torch.tensor([2.0, 4.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
        >>> depth_map_from_image(img, "metric_depth").disparity.flatten().tolist()
        [0.5, 0.25]
        >>> depth_map_from_image(img, "relative_depth").disparity.flatten().tolist()
        [1.0, 0.0]
    """
    check_bchw("image", image, (1, 3, 4))
    check_finite("image", image)
    if interpretation not in DEPTH_INTERPRETATIONS:
        raise GenRefocusInputError(
            f"interpretation must be one of {', '.join(DEPTH_INTERPRETATIONS)}, got {interpretation!r}"
        )
    v = _single_channel(image, "image")
    if interpretation == "metric_depth":
        if invert:
            raise GenRefocusInputError(
                "invert must be off for interpretation 'metric_depth' (metres have a fixed direction); "
                "if the map is near = bright, choose 'relative_disparity'"
            )
        metric_scale = check_number("metric_scale", metric_scale, lo=0.0, lo_open=True)
        depth_m = v * metric_scale
        return DepthMap(disparity_from_depth(depth_m), metric=True, depth_m=depth_m, focal_px=focal_px,
                        source="image:metric_depth")
    lo = v.amin(dim=(1, 2, 3), keepdim=True)
    hi = v.amax(dim=(1, 2, 3), keepdim=True)
    rng = hi - lo
    if bool((rng <= 0).any()):
        logger.warning("relative depth image is flat (one value everywhere): everything is at one distance")
    rel = (v - lo) / rng.clamp_min(1e-12)  # a flat map gives 0 everywhere
    if (interpretation == "relative_depth") != invert:
        rel = 1.0 - rel
    return DepthMap(rel, metric=False, focal_px=focal_px, source=f"image:{interpretation}")
