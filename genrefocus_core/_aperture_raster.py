"""Raster (image) apertures: preparation, exact box-filter resampling and their caches.

Private helper of :mod:`genrefocus_core.aperture` (see its conventions). A user image is cropped
to its open bounding box, centred, capped at :data:`_RASTER_MAX` px (area averaging) and rotated
with supersampling; kernels are resampled from it with exact box-filter overlaps.
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_finite
from .errors import GenRefocusInputError

_RASTER_MAX = 512  # working resolution of raster apertures (long side of the open bounding box)
_ROT_SS = 4  # supersampling used to rotate a raster aperture




@dataclass(frozen=True)
class Raster:
    """A raster aperture ready for resampling: optical axis at ``(H/2, W/2)`` (pixel-edge units)."""

    data: Tensor  # (H, W) float64 coverage, rotated
    rc: float  # circumscribed radius (farthest corner of an open pixel, before rotation), raster px
    extent: float  # farthest corner of an open pixel of ``data``, raster px
    area: float  # summed coverage, raster px^2


def _overlaps(n_out: int, lo0: float, step: float, n_in: int) -> Tensor:
    """``(n_out, n_in)`` lengths of overlap of ``[lo0 + i*step, lo0 + (i+1)*step]`` with ``[j, j+1]``."""
    lo = lo0 + step * torch.arange(n_out, dtype=torch.float64)[:, None]
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    return (torch.minimum(lo + step, j + 1.0) - torch.maximum(lo, j)).clamp(min=0.0)


def _far_corner(data: Tensor) -> float:
    """Distance from the raster centre to the farthest corner of a pixel with coverage > 0."""
    h, w = data.shape
    iy, ix = (data > 0).nonzero(as_tuple=True)
    dy = torch.maximum((iy - h / 2.0).abs(), (iy + 1 - h / 2.0).abs())
    dx = torch.maximum((ix - w / 2.0).abs(), (ix + 1 - w / 2.0).abs())
    return float(torch.hypot(dx.double(), dy.double()).max())


def _rotate_raster(data: Tensor, rotation_deg: float) -> Tensor:
    """Rotate a centred raster counter-clockwise on screen, with supersampled area averaging."""
    quarter = rotation_deg / 90.0
    if quarter == round(quarter):
        return torch.rot90(data, k=round(quarter) % 4, dims=(0, 1))
    h, w = data.shape
    a = math.radians(rotation_deg)
    c, s = math.cos(a), math.sin(a)
    h2 = math.ceil(abs(w * s) + abs(h * c)) + 2
    w2 = math.ceil(abs(w * c) + abs(h * s)) + 2
    off = (torch.arange(_ROT_SS, dtype=torch.float64) + 0.5) / _ROT_SS
    xs = ((torch.arange(w2, dtype=torch.float64)[:, None] + off).reshape(-1) - w2 / 2.0)[None, :]
    out = torch.empty(h2, w2, dtype=torch.float64)
    flat = data.reshape(-1)
    rows = max(1, (1 << 18) // (w2 * _ROT_SS * _ROT_SS))
    for i0 in range(0, h2, rows):
        i1 = min(h2, i0 + rows)
        ys = ((torch.arange(i0, i1, dtype=torch.float64)[:, None] + off).reshape(-1) - h2 / 2.0)[:, None]
        # inverse rotation of the sample point (y down: a CCW turn on screen is clockwise in (x, y))
        sx = torch.floor(xs * c - ys * s + w / 2.0).long()
        sy = torch.floor(xs * s + ys * c + h / 2.0).long()
        ok = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
        vals = torch.where(ok, flat[(sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1))], 0.0)
        out[i0:i1] = vals.reshape(i1 - i0, _ROT_SS, w2, _ROT_SS).mean(dim=(1, 3))
    return out


def _prepare_raster(image: Tensor, rotation_deg: float) -> Raster:
    """Crop to the open bounding box, centre, cap the resolution (area averaging) and rotate."""
    img = image.detach().to(device="cpu", dtype=torch.float64)
    check_finite("image", img)
    lo, hi = float(img.min()), float(img.max())
    if lo < 0.0 or hi > 1.0:
        raise GenRefocusInputError(f"image must hold values in [0, 1], got range [{lo:.4g}, {hi:.4g}]")
    rows = (img > 0).any(dim=1).nonzero().flatten()
    cols = (img > 0).any(dim=0).nonzero().flatten()
    crop = img[int(rows[0]) : int(rows[-1]) + 1, int(cols[0]) : int(cols[-1]) + 1]
    rc = _far_corner(crop)
    area = float(crop.sum())
    h, w = crop.shape
    f = max(h, w) / _RASTER_MAX
    if f > 1.0:  # exact box-filter downscale, keeping the box centre at the grid centre
        h2, w2 = math.ceil(h / f), math.ceil(w / f)
        wy = _overlaps(h, (h2 - h / f) / 2.0, 1.0 / f, h2).T
        wx = _overlaps(w, (w2 - w / f) / 2.0, 1.0 / f, w2).T
        crop = wy @ crop @ wx.T
        rc, area = rc / f, area / f**2
    data = _rotate_raster(crop, rotation_deg)
    return Raster(data=data, rc=rc, extent=_far_corner(data), area=area)


def raster_coverage(raster: Raster, n: int, radius_px: float) -> Tensor:
    """``(n, n)`` float64 coverage of the raster scaled so its circumscribed radius is ``radius_px``."""
    s = radius_px / raster.rc  # kernel px per raster px
    h, w = raster.data.shape
    lo = -(n / 2.0) / s
    wy = _overlaps(n, lo + h / 2.0, 1.0 / s, h)
    wx = _overlaps(n, lo + w / 2.0, 1.0 / s, w)
    return ((wy @ raster.data @ wx.T) * s * s).clamp(0.0, 1.0)


_LOCK = threading.Lock()
_DIGESTS: dict[int, tuple[weakref.ref, int, str]] = {}
_RASTERS: OrderedDict[tuple[str, float], Raster] = OrderedDict()
_RASTERS_MAX = 8


def image_digest(image: Tensor) -> str:
    """Content hash of an aperture image, memoised per tensor object and version counter."""
    version = None if image.is_inference() else image._version
    with _LOCK:
        hit = _DIGESTS.get(id(image))
    if hit is not None and version is not None and hit[0]() is image and hit[1] == version:
        return hit[2]
    arr = image.detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.blake2b(repr(tuple(arr.shape)).encode(), digest_size=16)
    h.update(arr.numpy().tobytes())
    digest = h.hexdigest()
    if version is not None:  # inference tensors have no version counter: hash them every time
        key = id(image)
        ref = weakref.ref(image, lambda _r, key=key: _DIGESTS.pop(key, None))
        with _LOCK:
            _DIGESTS[key] = (ref, version, digest)
    return digest


def raster_for(digest: str, rotation_deg: float, image: Tensor) -> Raster:
    """The prepared raster of ``image`` (content hash ``digest``) rotated by ``rotation_deg``, cached."""
    key = (digest, rotation_deg)
    with _LOCK:
        raster = _RASTERS.get(key)
        if raster is not None:
            _RASTERS.move_to_end(key)
            return raster
    raster = _prepare_raster(image, rotation_deg)
    with _LOCK:
        _RASTERS[key] = raster
        while len(_RASTERS) > _RASTERS_MAX:
            _RASTERS.popitem(last=False)
    return raster


def clear_raster_caches() -> None:
    """Forget prepared rasters and image digests (for tests and benchmarks)."""
    with _LOCK:
        _RASTERS.clear()
        _DIGESTS.clear()
