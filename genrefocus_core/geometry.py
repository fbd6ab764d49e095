"""Pipeline geometry: inputs given at a photo's own size on the processed grid, and back (§3).

Generation runs at the processed size of :func:`~genrefocus_core.conditions.resize_for_generation`
(scaled with LANCZOS, centre-cropped to multiples of 16 px, or stretched up to them). Maps given at
the photo's geometry follow it here:

* ``"aligned"`` (GenRefocus default, fix #6 of official-pipeline.md §14): depth maps, masks and
  points go through the same scale and crop as the photo;
* ``"official"``: as the official CLI: stretched to the processed size, points scaled from the
  input size ignoring the crop.

:func:`restore_input_size` is the inverse of the resize and crop.
"""

from __future__ import annotations

import logging

import torch  # noqa: F401  (used by the doctests)
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bchw
from .conditions import ResizeInfo
from .defocus import FocusTarget, disparity_from_depth, resize_like
from .depth import DepthMap
from .errors import GenRefocusInputError

__all__ = [
    "GEOMETRIES",
    "depth_to_processed",
    "focus_to_processed",
    "frame_focus",
    "restore_input_size",
    "to_processed",
]

logger = logging.getLogger(__name__)

#: How inputs at the photo's geometry follow its resize and crop.
GEOMETRIES = ("aligned", "official")


def to_processed(x: Tensor, info: ResizeInfo, *, mode: str = "bilinear") -> Tensor:
    """Map a ``(B, C, h, w)`` map covering the input photo onto the processed grid (same scale + crop).

    The map is resized to the photo's scaled size (``mode``: ``"bilinear"`` for depth, as OpenCV
    ``INTER_LINEAR``; ``"nearest"`` for masks), then cropped like the photo.

    Args:
        x: ``(B, C, h, w)`` map of any size covering the same field of view as the photo.
        info: the photo's :class:`~genrefocus_core.conditions.ResizeInfo`.
        mode: ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``(B, C, H, W)`` at ``info.size``.

    Example:
        >>> from genrefocus_core.conditions import processed_size
        >>> info = processed_size(192, 128, 160)  # scaled to 160x106, crop rows 5..100
        >>> to_processed(torch.zeros(1, 1, 64, 96), info).shape
        torch.Size([1, 1, 96, 160])
    """
    check_bchw("x", x)
    if mode not in ("bilinear", "nearest"):
        raise GenRefocusInputError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    sw, sh = info.scaled_size
    left, top, fw, fh = info.crop
    x = resize_like(x, (sh, sw), mode=mode)
    return x[..., top : top + fh, left : left + fw]


def restore_input_size(image: Tensor, info: ResizeInfo) -> Tensor:
    """Map a processed-size image back to the input size: undo the crop, then the resize.

    The bands the centre crop removed are filled by repeating the edge pixels (they hold no
    generated content), then the scaled-size image is resized to the input size with antialiased
    bicubic interpolation and clamped to [0, 1]. A no-op when nothing was resized.

    Args:
        image: ``(B, C, H, W)`` at ``info.size``.
        info: the :class:`~genrefocus_core.conditions.ResizeInfo` of the forward resize.

    Returns:
        ``(B, C, h0, w0)`` at ``info.original_size``.

    Raises:
        GenRefocusInputError: if ``image`` is not at the processed size.

    Example:
        >>> from genrefocus_core.conditions import processed_size
        >>> info = processed_size(140, 90)  # stretched up to 144x96
        >>> restore_input_size(torch.rand(1, 3, 96, 144), info).shape
        torch.Size([1, 3, 90, 140])
    """
    check_bchw("image", image)
    w0, h0 = info.original_size
    sw, sh = info.scaled_size
    left, top, fw, fh = info.crop
    if tuple(image.shape[-2:]) != (fh, fw):
        raise GenRefocusInputError(
            f"image must be at the processed size {fh}x{fw} (HxW) to restore, got {tuple(image.shape[-2:])}"
        )
    x = image
    if (left, top, fw, fh) != (0, 0, sw, sh):
        x = F.pad(x, (left, sw - left - fw, top, sh - top - fh), mode="replicate")
    if (sw, sh) != (w0, h0):
        x = F.interpolate(x, size=(h0, w0), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x


def focus_to_processed(focus: FocusTarget, info: ResizeInfo, geometry: str) -> FocusTarget:
    """A focus target given on the input photo, expressed on the processed grid.

    ``"aligned"``: a point is moved through the scale and crop (a point in a cropped band goes to
    the nearest kept pixel, with a warning); a mask is resized (nearest) and cropped like the photo.
    ``"official"``: unchanged (the point scales from the input size, the mask is stretched).

    Example:
        >>> from genrefocus_core.conditions import processed_size
        >>> info = processed_size(192, 128, 160)  # scaled to 160x106, rows 5..100 kept
        >>> f = focus_to_processed(FocusTarget("point", x=0.5, y=0.5), info, "aligned")
        >>> round(f.y, 4)
        0.5
    """
    if geometry == "official":
        return focus  # points scale from the input size, masks are stretched (official CLI)
    sw, sh = info.scaled_size
    left, top, fw, fh = info.crop
    if focus.kind == "point":
        x = (focus.x * sw - left) / fw
        y = (focus.y * sh - top) / fh
        cx, cy = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
        if (cx, cy) != (x, y):
            logger.warning(
                "the focus point (%.3f, %.3f) lies in the band the centre crop removed; using the nearest "
                "kept pixel",
                focus.x,
                focus.y,
            )
        return FocusTarget("point", x=cx, y=cy)
    if focus.kind == "mask" and focus.mask is not None:
        mask = to_processed(focus.mask.float(), info, mode="nearest")
        return FocusTarget("mask", mask=mask, threshold=focus.threshold)
    return focus


def frame_focus(focus: FocusTarget, i: int) -> FocusTarget:
    """The focus target of frame ``i`` (a mask batch is sliced; other targets apply to every frame).

    Example:
        >>> frame_focus(FocusTarget("mask", mask=torch.ones(3, 1, 4, 4)), 1).mask.shape
        torch.Size([1, 1, 4, 4])
    """
    if focus.kind == "mask" and focus.mask is not None and focus.mask.shape[0] > 1:
        return FocusTarget("mask", mask=focus.mask[i : i + 1], threshold=focus.threshold)
    return focus


def depth_to_processed(depth: DepthMap, info: ResizeInfo, geometry: str) -> DepthMap:
    """A depth map of the input photo on the processed grid (bilinear; ``geometry`` as above).

    Metric depth is resized before taking 1/depth, as the official CLI does with ``.npy`` depth; a
    map already at the processed size is returned unchanged.

    Example:
        >>> from genrefocus_core.conditions import processed_size
        >>> d = DepthMap(torch.ones(1, 1, 64, 96), metric=True, depth_m=torch.ones(1, 1, 64, 96))
        >>> depth_to_processed(d, processed_size(192, 128), "official").size
        (128, 192)
    """
    size = info.size[1], info.size[0]
    if depth.size == size:
        return depth

    def resize(x: Tensor) -> Tensor:
        return resize_like(x, size) if geometry == "official" else to_processed(x, info)

    if depth.metric and depth.depth_m is not None:
        depth_m = resize(depth.depth_m)
        return DepthMap(disparity_from_depth(depth_m), True, depth_m, depth.focal_px, depth.source)
    return DepthMap(resize(depth.disparity), depth.metric, None, depth.focal_px, depth.source)
