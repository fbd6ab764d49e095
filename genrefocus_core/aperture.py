"""Aperture shapes and their blur kernels (disc, n-blade polygon, presets, raster images).

Conventions shared by every function here:

* **Image coordinates**: x to the right, y **down**; a kernel or mask is centred on its middle
  pixel (odd kernels) or on the centre of the square (masks), which is the optical axis.
* **Angles** ``theta = atan2(dy, dx)`` in those coordinates, so ``theta`` grows *clockwise* on
  screen and ``theta = -pi/2`` points up. ``Aperture.rotation_deg`` turns a shape
  *counter-clockwise* as seen on screen.
* **Unit shape**: every shape is drawn centred on its optical axis (for presets and images the
  centre of their bounding box) with its farthest open point at distance 1. Default orientations:
  polygons, the triangle and the 5-point star have a vertex pointing up; the heart has its lobes
  up and its point down.
* **Scaling** of a kernel of radius ``r`` px: ``"circumscribed"`` puts the farthest open point at
  ``r``; ``"equal_area"`` scales the unit shape by ``r * sqrt(pi / A)`` (``A`` its unit area), so
  the open area is ``pi * r**2``, the area of a disc of radius ``r``.
* **Rasterisation** is area averaging: analytic shapes are supersampled (each sub-sample itself
  anti-aliased over its own width, which makes kernels continuous in the radius) and box filtered;
  raster images are resampled with exact box-filter overlaps (never point or bilinear sampling).
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._aperture_raster import Raster, clear_raster_caches, image_digest, raster_coverage, raster_for
from ._checks import check_finite, check_number
from .errors import GenRefocusInputError

__all__ = [
    "APERTURE_SHAPES",
    "MAX_KERNEL_RADIUS",
    "Aperture",
    "aperture_from_image",
    "aperture_kernel",
    "aperture_mask",
    "aperture_preview",
    "polygon_radial",
]

logger = logging.getLogger(__name__)

#: Shape names accepted by :class:`Aperture` (``"image"`` needs ``Aperture.image``).
APERTURE_SHAPES = ("disc", "polygon", "heart", "star", "triangle", "image")

#: Largest blur radius in pixels :func:`aperture_kernel` builds a kernel for.
MAX_KERNEL_RADIUS = 4096.0


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


# ----------------------------------------------------------------------------------------------
# Geometry of the analytic shapes (unit shape: farthest open point at distance 1)
# ----------------------------------------------------------------------------------------------

_SS = 8  # kernel supersampling per axis
_EDGE_PX = 1.0  # pixels whose centre is farther than this from the outline are fully in or out
_BLEND_LO, _BLEND_HI = 1.0, 3.0  # radii (px) over which the shape fades in from a disc
_STAR_INNER = (3.0 - math.sqrt(5.0)) / 2.0  # notch radius of a regular pentagram (tips at 1)

# Heart = a square standing on a corner (|x| + |y| <= 1) with a disc of radius 1/sqrt(2) on the
# midpoint of each upper side. Its bounding box spans y in [-1, 1/2 + 1/sqrt(2)], so the optical
# axis (box centre) sits _HEART_YC above the square's centre; the farthest points are on the lobes.
_R_LOBE = math.sqrt(0.5)
_HEART_YC = (_R_LOBE - 0.5) / 2.0
_HEART_RC = math.hypot(0.5, 0.5 - _HEART_YC) + _R_LOBE
_HEART_AREA = (2.0 + math.pi / 2.0) / _HEART_RC**2


def polygon_radial(theta: Tensor, blades: int, rotation_rad: float = 0.0) -> Tensor:
    """Radial extent of a regular polygon with circumscribed radius 1, as a function of angle.

    ``R(theta) = cos(pi/n) / cos(((theta + pi/2 + rotation_rad) mod 2pi/n) - pi/n)``, the same
    curve as BokehMe's ``sin(a) / sin(phi + a)`` with ``a = pi/2 - pi/n`` and
    ``phi = (theta + theta0) mod 2pi/n``; BokehMe's ``initAngle`` ``theta0`` equals
    ``rotation_rad + pi/2``.

    Args:
        theta: angles in radians, any shape, measured in image coordinates (y down):
            ``theta = atan2(dy, dx)``, so it grows clockwise on screen and ``-pi/2`` points up.
        blades: number of sides ``n >= 3`` (large ``n`` approaches a circle).
        rotation_rad: counter-clockwise rotation on screen; at 0 a vertex points up (``theta = -pi/2``).

    Returns:
        Radii in ``[cos(pi/n), 1]``, shape and dtype of ``theta``: 1 towards a vertex,
        ``cos(pi/n)`` towards the middle of a side.

    Raises:
        GenRefocusInputError: if ``theta`` is not a floating tensor, ``blades`` is not an integer
            ``>= 3`` or ``rotation_rad`` is not finite.

    Example:
        >>> t = torch.tensor([-math.pi / 2, math.pi / 2])  # up (a vertex), down (a flat side)
        >>> [round(v, 4) for v in polygon_radial(t, 6).tolist()]
        [1.0, 1.0]
        >>> round(float(polygon_radial(torch.tensor([0.0]), 6)), 4)  # right: middle of a side
        0.866
    """
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        got = theta.dtype if isinstance(theta, Tensor) else type(theta).__name__
        raise GenRefocusInputError(f"theta must be a floating-point tensor, got {got}")
    if isinstance(blades, bool) or not isinstance(blades, int) or blades < 3:
        raise GenRefocusInputError(f"blades must be an integer >= 3, got {blades!r}")
    rotation_rad = check_number("rotation_rad", rotation_rad)
    return _star_radial(theta, blades, math.cos(math.pi / blades), rotation_rad)[0]


def _star_radial(theta: Tensor, points: int, inner: float, rotation: float) -> tuple[Tensor, Tensor]:
    """Radius and its derivative d/dtheta of a star with ``points`` tips at 1 and notches at ``inner``.

    Straight edges join each tip to the neighbouring notches; a regular n-gon is the star with
    ``inner = cos(pi/n)`` (the notches are the side midpoints).
    """
    beta = math.pi / points
    phi = torch.remainder(theta + (math.pi / 2 + rotation), 2 * beta)
    phi = beta - (phi - beta).abs()  # angle from the nearest tip, in [0, beta] (mirror symmetry)
    den = torch.sin(phi) + inner * torch.sin(beta - phi)
    rad = (inner * math.sin(beta)) / den
    slope = -rad * (torch.cos(phi) - inner * torch.cos(beta - phi)) / den
    return rad, slope


@dataclass(frozen=True)
class _Spec:
    """Hashable description of a unit shape (the kernel cache key)."""

    kind: str  # "disc", "radial", "heart" or "image"
    points: int = 0  # radial: number of tips
    inner: float = 1.0  # radial: notch radius
    roundness: float = 0.0  # radial: blend of the radius towards 1
    rotation: float = 0.0  # radians, counter-clockwise on screen ("image": degrees)
    area: float = math.pi  # open area of the unit shape
    extent: float = 1.0  # farthest point of the rasterised support (> 1 only for images)
    digest: str = ""  # image: content hash


_DISC = _Spec("disc")


def _shape_sd(spec: _Spec, x: Tensor, y: Tensor) -> Tensor:
    """Approximate signed distance (< 0 inside) to the outline of the unit shape at ``(x, y)``.

    Exact near straight and circular outlines; elsewhere a first-order estimate that never
    overstates the distance by much, which is all the edge classification needs.
    """
    if spec.kind == "disc":
        return torch.hypot(x, y) - 1.0
    if spec.kind == "radial":
        rad, slope = _star_radial(torch.atan2(y, x), spec.points, spec.inner, spec.rotation)
        if spec.roundness > 0.0:
            rad = (1.0 - spec.roundness) * rad + spec.roundness
            slope = (1.0 - spec.roundness) * slope
        # distance along the ray times the cosine between the ray and the outline's normal
        return (torch.hypot(x, y) - rad) * torch.rsqrt(1.0 + (slope / rad) ** 2)
    # heart, in "math" coordinates (y up), un-rotated, scaled to the square's half diagonal
    xm, ym = x, -y
    if spec.rotation != 0.0:
        c, s = math.cos(spec.rotation), math.sin(spec.rotation)
        xm, ym = xm * c + ym * s, ym * c - xm * s
    px = xm.abs() * _HEART_RC
    py = ym * _HEART_RC + _HEART_YC
    qx = ((px + py) * _R_LOBE).abs() - _R_LOBE
    qy = ((px - py) * _R_LOBE).abs() - _R_LOBE
    square = torch.hypot(qx.clamp(min=0.0), qy.clamp(min=0.0)) + torch.maximum(qx, qy).clamp(max=0.0)
    lobe = torch.hypot(px - 0.5, py - 0.5) - _R_LOBE
    return torch.minimum(square, lobe) / _HEART_RC


def _analytic_coverage(spec: _Spec, n: int, radius_px: float, ss: int) -> Tensor:
    """``(n, n)`` float64 coverage of the unit shape scaled by ``radius_px``, centred on the middle.

    Pixels near the outline are supersampled ``ss x ss``; each sub-sample is itself a linear ramp
    over its own width (``0.5 - sd * ss``), so coverage is a continuous function of the scale.
    """
    c = (n - 1) / 2.0
    coords = torch.arange(n, dtype=torch.float64) - c
    off = (torch.arange(ss, dtype=torch.float64) + 0.5) / ss - 0.5
    oy, ox = (t.reshape(1, -1) for t in torch.meshgrid(off, off, indexing="ij"))
    out = torch.empty(n, n, dtype=torch.float64)
    rows = max(1, (1 << 19) // n)
    for i0 in range(0, n, rows):
        ys = coords[i0 : i0 + rows, None].expand(-1, n)
        xs = coords[None, :].expand(ys.shape[0], -1)
        sd = _shape_sd(spec, xs / radius_px, ys / radius_px) * radius_px
        block = (sd < 0.0).to(torch.float64)
        edge = sd.abs() <= _EDGE_PX
        if bool(edge.any()):
            ex, ey = xs[edge][:, None] + ox, ys[edge][:, None] + oy
            sub = _shape_sd(spec, ex / radius_px, ey / radius_px) * radius_px
            block[edge] = (0.5 - sub * ss).clamp(0.0, 1.0).mean(dim=1)
        out[i0 : i0 + rows] = block
    return out


def _spec_of(aperture: Aperture | None) -> tuple[_Spec, Raster | None]:
    """Validate ``aperture`` and return its unit-shape description (and raster, for images)."""
    if aperture is None:
        return _DISC, None
    if not isinstance(aperture, Aperture):
        raise GenRefocusInputError(f"aperture must be an Aperture or None, got {type(aperture).__name__}")
    rot_deg = check_number("rotation_deg", aperture.rotation_deg) % 360.0
    rot = math.radians(rot_deg)
    shape = aperture.shape
    if shape == "disc":
        return _DISC, None
    if shape == "heart":
        return _Spec("heart", rotation=rot, area=_HEART_AREA), None
    if shape == "image":
        digest = image_digest(aperture.image)
        raster = raster_for(digest, rot_deg, aperture.image)
        area = raster.area / raster.rc**2
        return _Spec("image", rotation=rot_deg, digest=digest, area=area,
                     extent=raster.extent / raster.rc), raster
    if shape == "polygon":
        points, roundness = aperture.blades, float(aperture.roundness)
        inner = math.cos(math.pi / points)
    elif shape == "triangle":
        points, inner, roundness = 3, 0.5, 0.0
    else:  # star
        points, inner, roundness = 5, _STAR_INNER, 0.0
    if roundness >= 1.0:
        return _DISC, None
    area = _radial_area(points, inner, roundness)
    return _Spec("radial", points=points, inner=inner, roundness=roundness, rotation=rot, area=area), None


def _radial_area(points: int, inner: float, roundness: float) -> float:
    """Area of the unit star/polygon: ``points * integral_0^beta R(phi)^2 dphi`` (2*points mirror halves)."""
    beta = math.pi / points
    if roundness == 0.0:
        return points * inner * math.sin(beta)
    m = 4096
    phi = (torch.arange(m, dtype=torch.float64) + 0.5) * (beta / m) - math.pi / 2.0
    rad = (1.0 - roundness) * _star_radial(phi, points, inner, 0.0)[0] + roundness
    return float(points * (rad**2).sum() * (beta / m))


def _coverage(spec: _Spec, raster: Raster | None, n: int, radius_px: float, ss: int) -> Tensor:
    if raster is not None:
        return raster_coverage(raster, n, radius_px)
    return _analytic_coverage(spec, n, radius_px, ss)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_KERNELS: OrderedDict[tuple, Tensor] = OrderedDict()
_KERNELS_MAX_NUMEL = 1 << 24  # float64 entries kept in the cache (128 MiB)
_kernels_numel = 0


def _odd_size(extent: float) -> int:
    """Smallest odd ``n`` whose pixels (centred on the middle one) cover a disc of radius ``extent``."""
    return 2 * max(0, math.ceil(extent - 0.5 - 1e-9)) + 1


def _delta() -> Tensor:
    return torch.ones(1, 1, dtype=torch.float64)


def _normalised(spec: _Spec, raster: Raster | None, radius_px: float) -> Tensor:
    """Sum-normalised float64 kernel of the unit shape scaled by ``radius_px`` (circumscribed)."""
    ramp = 0.0 if raster is not None else 0.5 / _SS
    n = _odd_size(spec.extent * radius_px + ramp)
    if n == 1:
        return _delta()
    cov = _coverage(spec, raster, n, radius_px, _SS)
    total = float(cov.sum())
    return cov / total if total > 1e-12 else _delta()


def _pad_to(k: Tensor, n: int) -> Tensor:
    p = (n - k.shape[-1]) // 2
    return torch.nn.functional.pad(k, (p, p, p, p)) if p else k


def _build_kernel(spec: _Spec, raster: Raster | None, scaling: str, radius: float) -> Tensor:
    if radius == 0.0:
        return _delta()
    disc = _normalised(_DISC, None, radius) if spec is _DISC or radius < _BLEND_HI else None
    if spec is _DISC or radius <= _BLEND_LO:
        return disc
    scale = radius if scaling == "circumscribed" else radius * math.sqrt(math.pi / spec.area)
    shape = _normalised(spec, raster, scale)
    if disc is None:
        return shape
    # a shape a few pixels wide is meaningless: fade in from an anti-aliased disc (continuous in r)
    t = (radius - _BLEND_LO) / (_BLEND_HI - _BLEND_LO)
    n = max(disc.shape[-1], shape.shape[-1])
    return (1.0 - t) * _pad_to(disc, n) + t * _pad_to(shape, n)


def aperture_kernel(
    aperture: Aperture | None,
    radius: float,
    *,
    foreground: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Blur kernel (point spread function) of a point light at blur radius ``radius``.

    The shape is scaled by ``aperture.scaling`` (``"equal_area"``: open area ``pi * radius**2``;
    ``"circumscribed"``: farthest open point at ``radius``), rasterised with area averaging,
    centred on the middle pixel (the optical axis) and normalised to sum 1. The kernel is a
    continuous function of ``radius``: its size ``n = 2 * ceil(extent - 1/2) + 1`` grows by 2 with
    zero-valued borders. Below 1 px every shape is an anti-aliased disc (a delta for
    ``radius <= 0.5``); between 1 and 3 px the shape fades in linearly from that disc. Kernels
    are cached (up to 128 MiB); image apertures are keyed by a hash of their content.

    Args:
        aperture: the aperture; ``None`` is a disc.
        radius: blur (circle-of-confusion) radius in pixels, in ``[0, MAX_KERNEL_RADIUS]``.
        foreground: the point is in front of the focal plane; with ``aperture.flip_foreground``
            the kernel is rotated by 180 degrees, as a real lens shows it.
        dtype: floating dtype of the result.
        device: device of the result (``None``: CPU).

    Returns:
        ``(n, n)`` kernel, ``n`` odd, values ``>= 0`` summing to 1, a new tensor on ``device``.

    Raises:
        GenRefocusInputError: if ``radius`` is negative, not finite or above
            :data:`MAX_KERNEL_RADIUS`, ``aperture`` is not an :class:`Aperture`, its
            ``rotation_deg`` is not finite or its image holds values outside [0, 1].

    Example:
        >>> k = aperture_kernel(Aperture("polygon", blades=6), 5.0)
        >>> tuple(k.shape), round(float(k.sum()), 6)
        ((13, 13), 1.0)
        >>> aperture_kernel(None, 0.0).tolist()
        [[1.0]]
    """
    spec, raster = _spec_of(aperture)
    radius = check_number("radius", radius, lo=0.0)
    if radius > MAX_KERNEL_RADIUS:
        raise GenRefocusInputError(
            f"radius must be <= {MAX_KERNEL_RADIUS:g} px, got {radius:g}; such a blur is larger than any "
            "image the renderer accepts (lower k or downscale)"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise GenRefocusInputError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    flip = bool(foreground) and aperture is not None and aperture.flip_foreground and spec is not _DISC
    scaling = "circumscribed" if aperture is None else aperture.scaling
    key = (spec, scaling, radius)
    with _LOCK:
        kernel = _KERNELS.get(key)
        if kernel is not None:
            _KERNELS.move_to_end(key)
    if kernel is None:
        kernel = _build_kernel(spec, raster, scaling, radius)
        _remember(key, kernel)
    if flip:
        kernel = torch.flip(kernel, dims=(0, 1))
    return kernel.to(device=device, dtype=dtype, copy=True)


def _remember(key: tuple, kernel: Tensor) -> None:
    global _kernels_numel
    if kernel.numel() > _KERNELS_MAX_NUMEL // 8:
        return
    with _LOCK:
        if key in _KERNELS:
            return
        _KERNELS[key] = kernel
        _kernels_numel += kernel.numel()
        while _kernels_numel > _KERNELS_MAX_NUMEL:
            _kernels_numel -= _KERNELS.popitem(last=False)[1].numel()


def _clear_caches() -> None:
    """Forget cached kernels and rasters (for tests and benchmarks)."""
    global _kernels_numel
    with _LOCK:
        _KERNELS.clear()
        _kernels_numel = 0
    clear_raster_caches()


# ----------------------------------------------------------------------------------------------
# Masks, previews, user images
# ----------------------------------------------------------------------------------------------


def _check_size(name: str, size: object, lo: int, hi: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or not lo <= size <= hi:
        raise GenRefocusInputError(f"{name} must be an integer in {lo}..{hi}, got {size!r}")
    return size


def aperture_mask(aperture: Aperture | None, size: int, *, supersample: int = 8) -> Tensor:
    """Coverage of the aperture shape drawn to fit a square: farthest open point at ``size / 2``.

    The mask ignores ``aperture.scaling`` (it always fits the square, i.e. circumscribed radius
    ``size / 2``) and is centred on the centre of the square (the optical axis). Coverage is area
    averaged: analytic shapes by ``supersample x supersample`` sub-samples per pixel, images by
    exact box-filter resampling of their cropped, centred raster (``supersample`` is unused).

    Args:
        aperture: the aperture; ``None`` is a disc.
        size: side of the square in pixels, 1..8192.
        supersample: sub-samples per pixel and axis for analytic shapes, 1..32.

    Returns:
        ``(size, size)`` float32 coverage in [0, 1] (1 = open), on the CPU.

    Raises:
        GenRefocusInputError: on a bad ``size``/``supersample`` or an invalid aperture.

    Example:
        >>> m = aperture_mask(Aperture("disc"), 64)
        >>> round(float(m.sum()) / (math.pi * 32**2), 3)  # area of the inscribed disc
        1.0
    """
    spec, raster = _spec_of(aperture)
    size = _check_size("size", size, 1, 8192)
    ss = _check_size("supersample", supersample, 1, 32)
    return _mask(spec, raster, size, size / 2.0, ss).to(torch.float32)


def _mask(spec: _Spec, raster: Raster | None, size: int, radius_px: float, ss: int) -> Tensor:
    if raster is not None:
        return raster_coverage(raster, size, radius_px)
    return _analytic_coverage(spec, size, radius_px, ss)


def aperture_preview(aperture: Aperture | None, size: int = 256) -> Tensor:
    """A white bokeh ball of the aperture on black, as a background highlight looks (not flipped).

    Args:
        aperture: the aperture; ``None`` is a disc.
        size: side of the preview in pixels, 8..4096; the shape's farthest point is at 90 % of
            the half side.

    Returns:
        ``(1, 3, size, size)`` float32 image in [0, 1] on the CPU.

    Raises:
        GenRefocusInputError: on a bad ``size`` or an invalid aperture.

    Example:
        >>> p = aperture_preview(Aperture("star"), 32)
        >>> tuple(p.shape), float(p[0, :, 16, 16].min()), float(p[0, :, 0, 0].max())
        ((1, 3, 32, 32), 1.0, 0.0)
    """
    spec, raster = _spec_of(aperture)
    size = _check_size("size", size, 8, 4096)
    cov = _mask(spec, raster, size, 0.45 * size, 4).to(torch.float32)
    return cov.expand(1, 3, size, size).contiguous()


#: Rec. 709 luma weights used to turn an RGB aperture image into coverage.
_LUMA = (0.2126, 0.7152, 0.0722)


def aperture_from_image(image: Tensor, *, threshold: float | None = None) -> Tensor:
    """Coverage raster for ``Aperture(shape="image", image=...)`` from a user IMAGE or MASK.

    Luminance (Rec. 709) of RGB, times alpha for RGBA; a single channel is used as is. With a
    ``threshold`` the result is binary (``luminance > threshold``). White/1 = open. The shape is
    later cropped to its open (non-zero) bounding box, whose centre is the optical axis, so use
    ``threshold`` to drop faint background noise (e.g. JPEG artefacts).

    Args:
        image: float in [0, 1], ``(H, W)``, ``(1, H, W)`` (a MASK), ``(H, W, C)`` or
            ``(1, H, W, C)`` (an IMAGE) with ``C`` in 1, 3, 4. A 3-D tensor with a leading 1 is
            read as a MASK.
        threshold: optional cut in [0, 1).

    Returns:
        ``(H, W)`` float32 coverage in [0, 1] on the device of ``image``.

    Raises:
        GenRefocusInputError: on a bad shape, dtype, range or threshold, or if no pixel is open.

    Example:
        >>> rgba = torch.zeros(1, 4, 4, 4)
        >>> rgba[0, 1:3, 1:3] = 1.0
        >>> rgba[0, 1, 1, 3] = 0.0  # a transparent pixel is closed
        >>> aperture_from_image(rgba).sum().item()
        3.0
    """
    if not isinstance(image, Tensor):
        raise GenRefocusInputError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if not image.is_floating_point():
        raise GenRefocusInputError(f"image must be a floating-point tensor, got dtype {image.dtype}")
    shape = tuple(image.shape)
    x = image.detach()
    if x.ndim == 4 and x.shape[0] == 1 and x.shape[-1] in (1, 3, 4):
        x = x[0]
    elif x.ndim == 3 and x.shape[0] == 1:
        x = x[0, :, :, None]
    elif x.ndim == 2:
        x = x[:, :, None]
    elif not (x.ndim == 3 and x.shape[-1] in (1, 3, 4)):
        raise GenRefocusInputError(
            "image must be (H, W), (1, H, W), (H, W, C) or (1, H, W, C) with C in 1, 3, 4 "
            f"(one image, not a batch), got {shape}"
        )
    if min(x.shape[:2]) < 1:
        raise GenRefocusInputError(f"image must not be empty, got shape {shape}")
    check_finite("image", x)
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise GenRefocusInputError(f"image must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]")
    x = x.to(torch.float32)
    c = x.shape[-1]
    if c == 1:
        cov = x[..., 0]
    else:
        cov = x[..., 0] * _LUMA[0] + x[..., 1] * _LUMA[1] + x[..., 2] * _LUMA[2]
        if c == 4:
            cov = cov * x[..., 3]
    cov = cov.clamp(0.0, 1.0)  # luma weights sum to 1 up to rounding
    if threshold is not None:
        threshold = check_number("threshold", threshold, lo=0.0, hi=1.0)
        if threshold >= 1.0:
            raise GenRefocusInputError(f"threshold must be < 1, got {threshold!r}")
        cov = (cov > threshold).to(torch.float32)
    if float(cov.max()) <= 0.0:
        raise GenRefocusInputError(
            "image must have open (non-zero) pixels: the aperture image is entirely black"
            + (f" at threshold {threshold:g}" if threshold is not None else "")
            + "; use white for open parts of the aperture"
        )
    return cov.contiguous()
