"""Defocus optics: disparity conventions, focus picking and circle-of-confusion maps.

Conventions (see ``docs`` in the README):

* ``disparity``: ``(B, 1, H, W)``, larger = nearer. Metric disparity is ``1 / depth_m`` in 1/m (the
  Genfocus convention, K in px*m); relative disparity is in [0, 1] with near = 1 (the BokehMe
  convention, K in px).
* ``coc``: signed circle-of-confusion *radius* in pixels, ``k * (disparity - focus_disparity)``:
  positive in front of the focal plane, negative behind it.
* ``defocus``: the Genfocus conditioning map ``clamp(|coc| / 100, 0, 1)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_bchw, check_finite, check_number
from .errors import GenRefocusInputError

__all__ = [
    "MAX_COC",
    "DefocusMap",
    "FocusTarget",
    "coc_preview",
    "defocus_condition_map",
    "defocus_map",
    "disparity_from_depth",
    "disparity_preview",
    "focus_disparity_center",
    "focus_disparity_from_mask",
    "focus_disparity_from_point",
    "mark_point",
    "median_disparity",
    "resize_like",
    "signed_coc",
]

logger = logging.getLogger(__name__)

#: CoC radius (px) that maps to 1.0 in the Genfocus conditioning map (official ``MAX_COC``).
MAX_COC = 100.0


def disparity_from_depth(depth_m: Tensor, *, invalid: str = "far") -> Tensor:
    """Metric disparity ``1 / depth`` (1/m) from metric depth (m).

    Policy for invalid depth (``depth <= 0``, ``+inf`` or NaN): with ``invalid="far"`` (default,
    the official Genfocus rule ``1 / FLT_MAX``) such pixels become disparity 0, i.e. infinitely far,
    and a warning with their count is logged; with ``invalid="error"`` they raise.

    Args:
        depth_m: ``(B, 1, H, W)`` depth in metres.
        invalid: ``"far"`` or ``"error"``.

    Returns:
        ``(B, 1, H, W)`` disparity in 1/m, ``>= 0``, dtype and device of ``depth_m``.

    Raises:
        GenRefocusInputError: bad shape, bad ``invalid`` value, or invalid depth with ``"error"``.

    Example:
        >>> disparity_from_depth(torch.tensor([2.0, 4.0, 0.0]).view(1, 1, 1, 3)).flatten().tolist()
        [0.5, 0.25, 0.0]
    """
    check_bchw("depth_m", depth_m, 1)
    if invalid not in ("far", "error"):
        raise GenRefocusInputError(f"invalid must be 'far' or 'error', got {invalid!r}")
    valid = torch.isfinite(depth_m) & (depth_m > 0)
    n_bad = int((~valid).sum())
    if n_bad:
        msg = f"{n_bad} of {depth_m.numel()} depth value(s) are <= 0, infinite or NaN"
        if invalid == "error":
            raise GenRefocusInputError(f"depth_m must be finite and > 0, got {msg}")
        logger.warning("%s; treating them as infinitely far (disparity 0)", msg)
    return torch.where(valid, 1.0 / torch.where(valid, depth_m, torch.ones_like(depth_m)),
                       torch.zeros_like(depth_m))


def resize_like(x: Tensor, size: tuple[int, int], *, mode: str = "bilinear") -> Tensor:
    """Resize a ``(B, C, h, w)`` map to ``size = (H, W)``; a no-op when already that size.

    ``"bilinear"`` uses half-pixel centres without antialiasing (OpenCV ``INTER_LINEAR``, as the
    official scripts resize ``.npy`` depth); ``"nearest"`` matches PIL/OpenCV NEAREST for masks.

    Example:
        >>> resize_like(torch.ones(1, 1, 2, 2), (4, 6)).shape
        torch.Size([1, 1, 4, 6])
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def median_disparity(values: Tensor) -> Tensor:
    """Median of a 1-D tensor, averaging the two middle values for even counts (``numpy.median``)."""
    s, _ = torch.sort(values.flatten())
    n = s.numel()
    return 0.5 * (s[(n - 1) // 2] + s[n // 2])


def focus_disparity_from_point(
    disparity: Tensor, x: float, y: float, *, image_size: tuple[int, int] | None = None
) -> Tensor:
    """Disparity under a focus point, one value per batch item.

    ``(x, y)`` are pixel coordinates in the caller's image of size ``image_size = (width, height)``
    (default: the disparity's own size). As in the official CLI they are scaled to the disparity
    grid with ``int(x * W / width)`` and the index is kept inside the grid, so ``x = width`` (the
    far edge) picks the last column.

    Args:
        disparity: ``(B, 1, H, W)``.
        x: horizontal coordinate in ``[0, width]`` px.
        y: vertical coordinate in ``[0, height]`` px.
        image_size: ``(width, height)`` of the image the point was picked in.

    Returns:
        ``(B,)`` focus disparities.

    Raises:
        GenRefocusInputError: bad shape or a point outside the image.

    Example:
        >>> d = torch.arange(6.0).view(1, 1, 2, 3)
        >>> focus_disparity_from_point(d, 2, 1).tolist()
        [5.0]
    """
    check_bchw("disparity", disparity, 1)
    h, w = disparity.shape[-2:]
    width, height = image_size if image_size is not None else (w, h)
    width = int(check_number("image_size[0] (width)", width, lo=1))
    height = int(check_number("image_size[1] (height)", height, lo=1))
    x = check_number("x", x)
    y = check_number("y", y)
    if not (0 <= x <= width and 0 <= y <= height):
        raise GenRefocusInputError(
            f"focus point (x, y) must lie inside the {width}x{height} image, got ({x:g}, {y:g})"
        )
    tx = min(max(int(x * w / width), 0), w - 1)
    ty = min(max(int(y * h / height), 0), h - 1)
    return disparity[:, 0, ty, tx].clone()


def focus_disparity_center(disparity: Tensor) -> Tensor:
    """Disparity at the centre pixel ``(W // 2, H // 2)`` (the official default focus), ``(B,)``.

    Example:
        >>> focus_disparity_center(torch.arange(9.0).view(1, 1, 3, 3)).tolist()
        [4.0]
    """
    check_bchw("disparity", disparity, 1)
    h, w = disparity.shape[-2:]
    return disparity[:, 0, h // 2, w // 2].clone()


def focus_disparity_from_mask(
    disparity: Tensor, mask: Tensor, *, threshold: float = 0.5, empty: str = "error"
) -> Tensor:
    """Median disparity inside a mask (the official "focus on this object" rule), ``(B,)``.

    The mask is resized to the disparity's size with NEAREST when sizes differ (as the official
    CLI does). Pixels with ``mask > threshold`` count; a mask covering every pixel gives the median
    of the whole map. A batch-1 mask applies to every item.

    Args:
        disparity: ``(B, 1, H, W)``.
        mask: ``(B, 1, h, w)`` or ``(1, 1, h, w)`` in [0, 1], white = in focus.
        threshold: pixels strictly above it are inside, in ``[0, 1)``.
        empty: what an empty mask does: ``"error"`` (default) or ``"all"`` (the official CLI's
            fallback: median of the whole map).

    Returns:
        ``(B,)`` focus disparities.

    Raises:
        GenRefocusInputError: bad shapes, batch mismatch, or an empty mask with ``empty="error"``.

    Example:
        >>> d = torch.tensor([[1.0, 2.0], [3.0, 9.0]]).view(1, 1, 2, 2)
        >>> m = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
        >>> focus_disparity_from_mask(d, m).tolist()
        [2.0]
    """
    check_bchw("disparity", disparity, 1)
    check_bchw("mask", mask, 1)
    threshold = check_number("threshold", threshold, lo=0.0, hi=1.0)
    if empty not in ("error", "all"):
        raise GenRefocusInputError(f"empty must be 'error' or 'all', got {empty!r}")
    b = disparity.shape[0]
    if mask.shape[0] not in (1, b):
        raise GenRefocusInputError(f"mask must have batch size 1 or {b}, got {mask.shape[0]}")
    m = resize_like(mask.to(disparity.dtype), tuple(disparity.shape[-2:]), mode="nearest")
    m = m.expand(b, -1, -1, -1) > threshold
    out = []
    for i in range(b):
        inside = disparity[i, 0][m[i, 0]]
        if inside.numel() == 0:
            if empty == "error":
                raise GenRefocusInputError(
                    f"mask must contain at least one pixel > {threshold:g} (batch item {i} is empty); "
                    "draw the subject to focus on in white, or focus with a point instead"
                )
            inside = disparity[i, 0]
        out.append(median_disparity(inside))
    return torch.stack(out)


def signed_coc(disparity: Tensor, focus_disparity: float | Tensor, k: float) -> Tensor:
    """Signed circle-of-confusion radius from disparity (the thin lens written in disparity).

    ``coc = k * (disparity - focus_disparity)``: positive in front of the focal plane, negative
    behind it, zero on it. BokehMe (relative disparity) and Genfocus (metric disparity, 1/m) both
    use this formula; ``k`` only means something together with its disparity convention.

    Args:
        disparity: ``(B, 1, H, W)``, larger = nearer; 1/m when metric.
        focus_disparity: the disparity rendered sharp, a float or a ``(B,)`` tensor, same unit.
        k: blur strength; ``>= 0``.

    Returns:
        Signed radii in pixels, ``(B, 1, H, W)``, on the device and dtype of ``disparity``.

    Raises:
        GenRefocusInputError: if ``disparity`` is not ``(B, 1, H, W)`` or a scalar is out of range.

    Example:
        >>> d = torch.linspace(0, 1, 5).view(1, 1, 1, 5)
        >>> signed_coc(d, focus_disparity=0.5, k=8.0).flatten().tolist()
        [-4.0, -2.0, 0.0, 2.0, 4.0]
    """
    check_bchw("disparity", disparity, 1)
    k = check_number("k", k, lo=0.0)
    if isinstance(focus_disparity, Tensor):
        fd = focus_disparity.to(disparity).flatten()
        if fd.numel() not in (1, disparity.shape[0]):
            raise GenRefocusInputError(
                f"focus_disparity must hold 1 or {disparity.shape[0]} values, got {fd.numel()}"
            )
        check_finite("focus_disparity", fd)
        fd = fd.view(-1, 1, 1, 1)
    else:
        fd = check_number("focus_disparity", focus_disparity)
    return k * (disparity - fd)


def defocus_condition_map(coc: Tensor, max_coc: float = MAX_COC) -> Tensor:
    """The official Genfocus conditioning map ``clamp(|coc| / max_coc, 0, 1)``, ``(B, 1, H, W)``.

    Example:
        >>> defocus_condition_map(torch.tensor([-50.0, 0.0, 250.0]).view(1, 1, 1, 3)).flatten().tolist()
        [0.5, 0.0, 1.0]
    """
    check_bchw("coc", coc, 1)
    max_coc = check_number("max_coc", max_coc, lo=0.0, lo_open=True)
    return (coc.abs() / max_coc).clamp(0.0, 1.0)


def mark_point(image: Tensor, x: float, y: float) -> Tensor:
    """A copy of ``image`` with a crosshair at the normalised point ``(x, y)``.

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        x: horizontal position in [0, 1] of the width (0 = left edge).
        y: vertical position in [0, 1] of the height (0 = top).

    Returns:
        ``(B, 3, H, W)``: white arms with a black outline, about 1/20 of the short side long (at
        least 6 px), and a gap in the middle so the focused pixel itself stays visible.

    Example:
        >>> out = mark_point(torch.full((1, 3, 40, 40), 0.5), 0.5, 0.5)
        >>> float(out[0, 0, 20, 20]), float(out[0, 0, 20, 24]), float(out[0, 0, 21, 24])  # centre, arm, edge
        (0.5, 1.0, 0.0)
    """
    check_bchw("image", image, 3)
    check_number("x", x, lo=0.0, hi=1.0)
    check_number("y", y, lo=0.0, hi=1.0)
    out = image.clone()
    h, w = image.shape[-2:]
    cx, cy = min(int(x * w), w - 1), min(int(y * h), h - 1)
    arm = max(6, min(h, w) // 20)
    gap = max(2, arm // 3)
    yy = torch.arange(h, device=image.device).view(h, 1)
    xx = torch.arange(w, device=image.device).view(1, w)
    dx, dy = (xx - cx).abs(), (yy - cy).abs()
    lines = ((dy == 0) & (dx >= gap) & (dx <= arm)) | ((dx == 0) & (dy >= gap) & (dy <= arm))
    lo, hi = gap - 1, arm + 1
    outline = ((dy <= 1) & (dx >= lo) & (dx <= hi)) | ((dx <= 1) & (dy >= lo) & (dy <= hi))
    out[:, :, outline] = 0.0
    out[:, :, lines] = 1.0
    return out


def coc_preview(coc: Tensor, max_radius: float | None = None) -> Tensor:
    """A colour preview of a signed CoC map: black in focus, orange in front, blue behind.

    Brightness is ``|coc| / max_radius`` (default: the map's own maximum, per image), so the preview
    reads well at any K.

    Args:
        coc: ``(B, 1, H, W)`` signed radii in px.
        max_radius: radius shown at full brightness; ``None`` = per-image maximum.

    Returns:
        ``(B, 3, H, W)`` in [0, 1].

    Example:
        >>> coc_preview(torch.tensor([-2.0, 0.0, 2.0]).view(1, 1, 1, 3))[0, 2, 0].tolist()  # blue
        [1.0, 0.0, 0.20000000298023224]
    """
    check_bchw("coc", coc, 1)
    if max_radius is None:
        scale = coc.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        scale = torch.as_tensor(check_number("max_radius", max_radius, lo=0.0, lo_open=True)).to(coc)
    mag = (coc.abs() / scale).clamp(0.0, 1.0)
    front = torch.tensor([1.0, 0.6, 0.2], dtype=coc.dtype, device=coc.device).view(1, 3, 1, 1)
    back = torch.tensor([0.2, 0.5, 1.0], dtype=coc.dtype, device=coc.device).view(1, 3, 1, 1)
    return mag * torch.where(coc >= 0, front, back)


def disparity_preview(disparity: Tensor) -> Tensor:
    """Per-image min-max normalised grey preview of a disparity map (near = white), ``(B, 3, H, W)``.

    Example:
        >>> disparity_preview(torch.tensor([1.0, 3.0]).view(1, 1, 1, 2))[0, 0].tolist()
        [[0.0, 1.0]]
    """
    check_bchw("disparity", disparity, 1)
    lo = disparity.amin(dim=(1, 2, 3), keepdim=True)
    hi = disparity.amax(dim=(1, 2, 3), keepdim=True)
    return ((disparity - lo) / (hi - lo).clamp_min(1e-12)).expand(-1, 3, -1, -1).clone()


@dataclass(frozen=True)
class FocusTarget:
    """Where to focus, resolved against a disparity map by :meth:`resolve`.

    Attributes:
        kind: ``"point"`` (``x``, ``y`` normalised to [0, 1] of the image width/height),
            ``"mask"`` (median disparity inside ``mask``), ``"center"`` or ``"disparity"``
            (``value`` directly, in the map's unit).
        x: normalised horizontal position for ``"point"``, 0 = left edge, 1 = right edge.
        y: normalised vertical position for ``"point"``, 0 = top, 1 = bottom.
        mask: ``(B, 1, h, w)`` in [0, 1] for ``"mask"`` (any size; resized NEAREST).
        threshold: mask pixels strictly above it count.
        value: focus disparity for ``"disparity"``.
    """

    kind: str = "center"
    x: float = 0.5
    y: float = 0.5
    mask: Tensor | None = field(default=None, compare=False, repr=False)
    threshold: float = 0.5
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("point", "mask", "center", "disparity"):
            raise GenRefocusInputError(
                f"kind must be one of point, mask, center, disparity, got {self.kind!r}"
            )
        if self.kind == "point":
            for name in ("x", "y"):
                check_number(name, getattr(self, name), lo=0.0, hi=1.0)
        if self.kind == "mask":
            if self.mask is None:
                raise GenRefocusInputError("mask must be given for a mask focus target")
            check_bchw("mask", self.mask, 1)
        if self.kind == "disparity":
            check_number("value", self.value)

    def resolve(self, disparity: Tensor) -> Tensor:
        """Focus disparity per batch item, ``(B,)``, for a ``(B, 1, H, W)`` disparity map."""
        if self.kind == "point":
            h, w = disparity.shape[-2:]
            return focus_disparity_from_point(disparity, self.x * w, self.y * h)
        if self.kind == "mask":
            return focus_disparity_from_mask(disparity, self.mask, threshold=self.threshold)
        if self.kind == "disparity":
            check_bchw("disparity", disparity, 1)
            return torch.full((disparity.shape[0],), float(self.value), dtype=disparity.dtype,
                              device=disparity.device)
        return focus_disparity_center(disparity)


@dataclass(frozen=True)
class DefocusMap:
    """A signed CoC map with everything that produced it (what travels between nodes).

    Attributes:
        coc: ``(B, 1, H, W)`` signed CoC radius in px (> 0 in front of focus).
        disparity: ``(B, 1, H, W)`` the disparity it was computed from.
        k: blur strength used.
        focus_disparity: ``(B,)`` focus disparity per item.
        metric: whether ``disparity`` is metric (1/m).
    """

    coc: Tensor
    disparity: Tensor
    k: float
    focus_disparity: Tensor
    metric: bool

    @property
    def max_radius(self) -> float:
        """Largest |CoC| in px over the batch."""
        return float(self.coc.abs().max())


def defocus_map(disparity: Tensor, focus: FocusTarget, k: float, *, metric: bool) -> DefocusMap:
    """Resolve the focus and compute the signed CoC map in one step.

    Args:
        disparity: ``(B, 1, H, W)``, larger = nearer.
        focus: where to focus.
        k: blur strength, ``>= 0`` (px*m for metric disparity, px for relative).
        metric: whether ``disparity`` is metric.

    Returns:
        A :class:`DefocusMap`.

    Example:
        >>> d = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
        >>> defocus_map(d, FocusTarget("point", x=0.5, y=0.0), 10.0, metric=False).coc.flatten().tolist()
        [-5.0, 0.0, 5.0]
    """
    check_bchw("disparity", disparity, 1)
    check_finite("disparity", disparity)
    fd = focus.resolve(disparity)
    return DefocusMap(signed_coc(disparity, fd, k), disparity, float(k), fd, bool(metric))
