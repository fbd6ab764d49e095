"""Mode "physical" of :func:`genrefocus_core.renderer.render_bokeh`: a layered thin-lens renderer.

Model. The scene is what a pinhole camera saw: the all-in-focus image plus, per pixel, a signed
circle-of-confusion radius ``c = k * (d - d_f)`` (px, > 0 in front of the focal plane). A thin lens
averages, over the aperture, the colour of the first surface each ray meets; a point at ``c < 0``
spreads to the aperture shape scaled by ``|c|``, one at ``c > 0`` to the shape rotated 180 degrees.

Algorithm (per image of the batch).

1. Light: ``v = image ** gamma``; with ``highlight``, a smooth invertible curve (identity up to
   0.9, cubic above it, 1.0 -> 8.0) restores clipped highlights; it is inverted at the end, so
   untouched pixels round-trip exactly.
2. Radii ``lambda``: 0, +-1, +-2, then x1.3 per step up to the largest ``|c|``. A pixel with
   ``lambda[b+1] < c <= lambda[b]`` belongs to *bin* ``b`` with tent weight
   ``t = (c - lambda[b+1]) / (lambda[b] - lambda[b+1])``: its colour is blurred by
   ``t K(lambda[b]) + (1 - t) K(lambda[b+1])`` (kernels from ``aperture_kernel``), so the blur is a
   continuous function of ``c`` (no banding, no popping in ``k``).
3. Bins are composited front to back (largest ``c`` first) as premultiplied RGBA with the "over"
   operator: ``out += T * C_b``, ``T *= 1 - A_b``; finally ``out / (1 - T)``. Within a bin,
   depth order is ignored (its pixels add up); between bins it is exact for the two-plane cases
   of a thin lens with one plane in focus.
4. Hidden surfaces. A blurred layer needs the colour behind nearer objects (the pinhole never saw
   it): each bin is extended under nearer pixels up to the distance from which a ray can still
   reach it (the occluders' plus its own kernel radius). Under the next nearer bin (a continuous
   surface crossing a bin boundary) the extension is that bin's own pixels, weighted by how close
   they are, so depth ramps show no seams; under genuine occluders its colour is a pull-push
   extrapolation of the bin's visible pixels.
5. Cost. A bin whose smaller radius is ``r >= 2 r0`` (``r0`` = :data:`_R0` px) is processed at
   ``1/s`` resolution, ``s = 2 ** floor(log2(r / r0))``: area-downsampled, FFT-convolved with the
   kernel at ``r' / s`` (``r'`` shrunk so that the down/up-sampling blur keeps the second moment),
   composited with its neighbours of the same ``s`` at that resolution, then bilinearly upsampled
   once per group. Work per bin is limited to its bounding box (plus extension and kernel
   margins). Cost ~ O(HW) elementwise passes per full-resolution bin plus FFTs of the bins'
   boxes, nearly independent of the blur radius; memory O(HW).

Approximations: depth differences inside one bin are ignored (bins are 1 px wide near focus and
30 % of the radius beyond 2 px); the hidden-surface fill is a guess (exact only when the hidden
content continues smoothly); when two blurred planes overlap, layer compositing replaces the
thin lens's per-ray visibility by a product of per-layer coverages; monocular depth edges that
miss the colour edge by a pixel or two leave thin halos; image borders are handled by normalised
convolution (what lies beyond the frame is unknown).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .aperture import Aperture, aperture_kernel

__all__ = ["render_physical"]

logger = logging.getLogger(__name__)

#: Radii (px) of the first layers after 0; geometric growth by :data:`_RATIO` after the last one.
_FINE = (1.0, 2.0)
_RATIO = 1.3
#: Bins whose smaller radius is at least ``2 * _R0`` px are blurred at reduced resolution.
_R0 = 6.0
#: Highlight curve: identity up to _KNEE (linear light), cubic above, 1.0 -> _PEAK.
_KNEE = 0.9
_PEAK = 8.0
_CUBIC = (_PEAK - 1.0) / (1.0 - _KNEE) ** 3


# ----------------------------------------------------------------------------------------------
# Light: gamma and highlight curve
# ----------------------------------------------------------------------------------------------


def _expand_highlights(v: Tensor) -> Tensor:
    """Identity below the knee, ``v + a (v - knee)^3`` above (C2, increasing, 1 -> _PEAK)."""
    y = (v - _KNEE).clamp_min(0.0)
    return v + _CUBIC * y * y * y


def _compress_highlights(w: Tensor) -> Tensor:
    """Inverse of :func:`_expand_highlights` (Cardano's root, two Newton steps in float64)."""
    d = (w.double() - _KNEE).clamp_min(0.0)
    p = 1.0 / (3.0 * _CUBIC)
    q = d / (2.0 * _CUBIC)
    u = torch.pow(q + torch.sqrt(q * q + p**3), 1.0 / 3.0)
    y = u - p / u
    for _ in range(2):
        y = y - (y + _CUBIC * y**3 - d) / (1.0 + 3.0 * _CUBIC * y * y)
    return torch.where(w > _KNEE, (_KNEE + y).to(w.dtype), w)


# ----------------------------------------------------------------------------------------------
# Layer radii, kernels, FFT convolution
# ----------------------------------------------------------------------------------------------


def _magnitudes(limit: float) -> list[float]:
    """Layer radii 0, 1, 2, 2.6, ... up to the first one >= ``limit``."""
    mags = [0.0]
    while mags[-1] < limit:
        if len(mags) <= len(_FINE):
            mags.append(_FINE[len(mags) - 1])
        else:
            mags.append(mags[-1] * _RATIO)
    return mags


def _layer_radii(c_min: float, c_max: float) -> list[float]:
    """Signed layer radii, descending (front to back), covering ``[c_min, c_max]``."""
    pos = _magnitudes(c_max) if c_max > 0 else [0.0]
    neg = _magnitudes(-c_min) if c_min < 0 else [0.0]
    return [*reversed(pos), *(-m for m in neg[1:])]


def _level(r_small: float) -> int:
    """Downsampling factor for a bin whose smaller |radius| is ``r_small``."""
    if r_small < 2.0 * _R0:
        return 1
    return 2 ** math.floor(math.log2(r_small / _R0))


def _nice(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


class _Kernels:
    """Kernels and their spectra for one render (cached per radius, level and FFT size)."""

    def __init__(self, aperture: Aperture | None, dtype: torch.dtype, device: torch.device) -> None:
        self.aperture = aperture
        self.dtype = dtype
        self.device = device
        self._k: dict[tuple[float, int], Tensor] = {}
        self._f: dict[tuple[float, int, int, int], Tensor] = {}
        probe = aperture_kernel(aperture, 32.0)
        #: farthest kernel pixel relative to the radius (> 1 for equal-area shapes)
        self.extent = (probe.shape[-1] // 2 + 0.5) / 32.0

    def kernel(self, lam: float, s: int) -> Tensor:
        key = (lam, s)
        k = self._k.get(key)
        if k is None:
            r = abs(lam)
            if s > 1:
                # area-downsampling, the coarser kernel raster and bilinear upsampling add about
                # s^2/3 - 1/4 px^2 of variance per axis; a disc of radius r has r^2/4
                r = math.sqrt(max(r * r - 4.0 * (s * s / 3.0 - 0.25), 0.25 * r * r)) / s
            k = aperture_kernel(self.aperture, r, foreground=lam > 0, dtype=self.dtype, device=self.device)
            self._k[key] = k
        return k

    def half(self, lam: float, s: int) -> int:
        return self.kernel(lam, s).shape[-1] // 2

    def spectrum(self, lam: float, s: int, fh: int, fw: int) -> Tensor:
        key = (lam, s, fh, fw)
        spec = self._f.get(key)
        if spec is None:
            k = self.kernel(lam, s)
            n = k.shape[-1]
            pad = torch.zeros(fh, fw, dtype=self.dtype, device=self.device)
            pad[:n, :n] = k
            pad = torch.roll(pad, shifts=(-(n // 2), -(n // 2)), dims=(0, 1))
            spec = torch.fft.rfft2(pad)
            self._f[key] = spec
        return spec


def _convolve_pair(u: Tensor, v: Tensor, lam_u: float, lam_v: float, s: int, kernels: _Kernels,
                   margin: int) -> Tensor:
    """``K(lam_u) * u + K(lam_v) * v`` (linear convolution), output grown by ``margin`` per side.

    ``u``, ``v``: ``(4, h, w)``; returns ``(4, h + 2 margin, w + 2 margin)``.
    """
    h, w = u.shape[-2:]
    oh, ow = h + 2 * margin, w + 2 * margin
    delta_u, delta_v = kernels.half(lam_u, s) == 0, kernels.half(lam_v, s) == 0
    if delta_u and delta_v:
        return F.pad(u + v, (margin, margin, margin, margin))
    fh, fw = _nice(oh), _nice(ow)
    parts = [x for x, d in ((u, delta_u), (v, delta_v)) if not d]
    buf = torch.zeros(4 * len(parts), fh, fw, dtype=u.dtype, device=u.device)
    for i, x in enumerate(parts):
        buf[4 * i:4 * i + 4, margin:margin + h, margin:margin + w] = x
    spec = torch.fft.rfft2(buf)
    acc = None
    for i, (lam, d) in enumerate(((lam_u, delta_u), (lam_v, delta_v))):
        if d:
            continue
        j = i if not delta_u else 0
        term = spec[4 * j:4 * j + 4] * kernels.spectrum(lam, s, fh, fw)
        acc = term if acc is None else acc + term
    out = torch.fft.irfft2(acc, s=(fh, fw))[:, :oh, :ow]
    if delta_u:
        out[:, margin:margin + h, margin:margin + w] += u
    elif delta_v:
        out[:, margin:margin + h, margin:margin + w] += v
    return out


# ----------------------------------------------------------------------------------------------
# Hidden-surface fill
# ----------------------------------------------------------------------------------------------


def _pull_push(p: Tensor) -> Tensor:
    """Extrapolate premultiplied fields everywhere (pull-push).

    ``p``: ``(C, h, w)`` = premultiplied RGB, its alpha, then pairs (premultiplied value, weight)
    with weights <= 1. Returns ``(3 + (C - 4) // 2, h, w)``: RGB and the pairs' values, each
    un-premultiplied where known and filled from coarser levels elsewhere.
    """
    vals = torch.cat([p[0:3], p[4::2]])
    wts = torch.cat([p[3:4].expand(3, -1, -1), p[5::2]])
    levels = [(vals, wts)]
    while max(levels[-1][0].shape[-2:]) > 1 and float(levels[-1][1].amin()) <= 0.0:
        v, w = levels[-1]
        vw = F.avg_pool2d(torch.cat([v, w])[None], 2, ceil_mode=True)[0]
        levels.append((vw[:v.shape[0]], vw[v.shape[0]:]))
    v, w = levels[-1]
    mean = v.sum(dim=(1, 2), keepdim=True) / w.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    val = torch.where(w > 0, v / w.clamp_min(1e-12), mean)
    for v, w in reversed(levels[:-1]):
        up = F.interpolate(val[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
        val = v + (1.0 - w.clamp(0.0, 1.0)) * up[:, :v.shape[1], :v.shape[2]]
    return val


def _dilate(mask: Tensor, radius: float) -> Tensor:
    """Binary ``(h, w)`` mask grown by at least ``radius`` cells (square), cheaply at a coarse grid."""
    if radius <= 0:
        return mask
    q = 1
    while radius / q > 4 and min(mask.shape) > 2 * q:
        q *= 2
    m = mask[None, None].to(torch.float32 if mask.device.type == "cpu" else mask.dtype)
    if q > 1:
        m = F.max_pool2d(m, q, ceil_mode=True)
    k = math.ceil(radius / q) + (1 if q > 1 else 0)
    m = F.max_pool2d(m, 2 * k + 1, stride=1, padding=k)
    if q > 1:
        m = m.repeat_interleave(q, dim=2).repeat_interleave(q, dim=3)[..., :mask.shape[0], :mask.shape[1]]
    return m[0, 0] > 0


# ----------------------------------------------------------------------------------------------
# Bins
# ----------------------------------------------------------------------------------------------


@dataclass
class _Bin:
    index: int
    upper: float  # lambda[b]: radius at t = 1 (nearer end)
    lower: float  # lambda[b+1]
    level: int
    box: tuple[int, int, int, int]  # own pixels, full-res (y0, y1, x0, x1), exclusive ends


def _bins(beta: Tensor, radii: list[float]) -> list[_Bin]:
    """Non-empty bins with their own pixels' bounding boxes."""
    nb = len(radii) - 1
    h, w = beta.shape
    rows = torch.zeros(h, nb + 1, dtype=torch.uint8, device=beta.device).scatter_(1, beta, 1)[:, :nb]
    cols = torch.zeros(w, nb + 1, dtype=torch.uint8, device=beta.device).scatter_(1, beta.t(), 1)[:, :nb]
    rows_any, cols_any = rows.t().bool(), cols.t().bool()  # (nb, h), (nb, w)
    present = rows_any.any(dim=1).tolist()
    ar_h = torch.arange(h, device=beta.device)
    ar_w = torch.arange(w, device=beta.device)
    big = max(h, w) + 1
    y0 = torch.where(rows_any, ar_h, big).amin(dim=1).tolist()
    y1 = torch.where(rows_any, ar_h, -1).amax(dim=1).tolist()
    x0 = torch.where(cols_any, ar_w, big).amin(dim=1).tolist()
    x1 = torch.where(cols_any, ar_w, -1).amax(dim=1).tolist()
    out = []
    for b in range(nb):
        if not present[b]:
            continue
        up, lo = radii[b], radii[b + 1]
        out.append(_Bin(b, up, lo, _level(min(abs(up), abs(lo))), (y0[b], y1[b] + 1, x0[b], x1[b] + 1)))
    return out


@dataclass
class _Frame:
    """Per-image arrays, padded to a multiple of the coarsest level (padding = no surface)."""

    lin: Tensor  # (3, H, W) linear (expanded) colour
    beta: Tensor  # (H, W) int64 bin index; nb in the padding
    t: Tensor  # (H, W) tent weight towards the bin's upper radius
    c_max: float
    height: int
    width: int


def _bin_rgba(frame: _Frame, bin_: _Bin, kernels: _Kernels) -> tuple[tuple[int, int], Tensor]:
    """Blurred premultiplied RGBA of one bin at its level; returns (top-left cell, (4, h, w))."""
    s = bin_.level
    hp, wp = frame.beta.shape
    b = bin_.index
    lam_u, lam_v = bin_.upper, bin_.lower
    r_own = max(abs(lam_u), abs(lam_v))
    r_occ = max(frame.c_max, abs(lam_u) if lam_u < 0 else 0.0)
    reach = math.ceil((r_occ + r_own) * kernels.extent) + 2  # px from which hidden parts are seen
    y0, y1, x0, x1 = bin_.box
    # working box (where the bin or its extension may be), aligned to the level grid
    wy0, wx0 = max(0, y0 - reach) // s * s, max(0, x0 - reach) // s * s
    wy1 = min(hp, -(-(y1 + reach) // s) * s)
    wx1 = min(wp, -(-(x1 + reach) // s) * s)
    beta = frame.beta[wy0:wy1, wx0:wx1]
    t = frame.t[wy0:wy1, wx0:wx1]
    lin = frame.lin[:, wy0:wy1, wx0:wx1]
    dt = lin.dtype

    own = beta == b
    mt = torch.where(own, t, 0.0)
    mu = own.to(dt) - mt
    same = torch.where(beta == b - 1, 1.0 - t, 0.0)
    nearer = (beta < b).to(dt)
    parts = torch.cat([lin * mt, mt[None], lin * mu, mu[None], lin * same, same[None], nearer[None]])
    if s > 1:
        parts = F.avg_pool2d(parts[None], s)[0]
    u_own, v_own, s_part, n_frac = parts[0:4], parts[4:8], parts[8:12], parts[12]

    u, v = u_own, v_own
    if float(n_frac.amax()) > 0.0:
        support = (u_own[3] + v_own[3]) > 0
        ext = _dilate(support, reach / s).to(dt)
        # colour source: the bin's pixels and the adjacent nearer ones (same surface); the tent
        # weight of the extension continues that of the bin's own pixels
        src = torch.cat([u_own + v_own + s_part, u_own[3:4], u_own[3:4] + v_own[3:4]])
        if s == 1 and min(src.shape[-2:]) > 2:
            fill = _pull_push(F.avg_pool2d(src[None], 2, ceil_mode=True)[0])
            fill = F.interpolate(fill[None], scale_factor=2, mode="bilinear", align_corners=False)[0]
            fill = fill[:, :src.shape[1], :src.shape[2]]
        else:
            fill = _pull_push(src)
        a_fill = (n_frac - s_part[3]).clamp(0.0, 1.0)
        hidden = ext * (s_part + a_fill * torch.cat([fill[:3], torch.ones_like(fill[:1])]))
        t_ext = fill[3:4].clamp(0.0, 1.0)
        u = u_own + t_ext * hidden
        v = v_own + hidden - t_ext * hidden

    # trim to the content's bounding box before the FFT
    alpha_any = (u[3] + v[3]) > 0
    ys = torch.nonzero(alpha_any.any(dim=1)).flatten()
    xs = torch.nonzero(alpha_any.any(dim=0)).flatten()
    cy0, cy1 = int(ys[0]), int(ys[-1]) + 1
    cx0, cx1 = int(xs[0]), int(xs[-1]) + 1
    margin = max(kernels.half(lam_u, s), kernels.half(lam_v, s))
    rgba = _convolve_pair(u[:, cy0:cy1, cx0:cx1], v[:, cy0:cy1, cx0:cx1], lam_u, lam_v, s, kernels, margin)
    return (wy0 // s + cy0 - margin, wx0 // s + cx0 - margin), rgba


class _Canvas:
    """Front-to-back accumulator ``(colour, transmittance)`` on one level's grid."""

    def __init__(self, height: int, width: int, dtype: torch.dtype, device: torch.device) -> None:
        self.colour = torch.zeros(3, height, width, dtype=dtype, device=device)
        self.trans = torch.ones(1, height, width, dtype=dtype, device=device)
        self.touched: list[int] | None = None  # y0, y1, x0, x1 in cells

    def over(self, top_left: tuple[int, int], rgba: Tensor) -> None:
        """Composite ``rgba`` (premultiplied, behind everything so far) at ``top_left``."""
        hh, ww = self.trans.shape[-2:]
        y, x = top_left
        h, w = rgba.shape[-2:]
        ya, xa = max(0, y), max(0, x)
        yb, xb = min(hh, y + h), min(ww, x + w)
        if ya >= yb or xa >= xb:
            return
        src = rgba[:, ya - y:yb - y, xa - x:xb - x]
        tr = self.trans[:, ya:yb, xa:xb]
        self.colour[:, ya:yb, xa:xb] += tr * src[:3]
        tr.mul_(1.0 - src[3:4].clamp(0.0, 1.0))
        t_ = self.touched
        self.touched = [ya, yb, xa, xb] if t_ is None else [min(t_[0], ya), max(t_[1], yb),
                                                           min(t_[2], xa), max(t_[3], xb)]

    def merge_into(self, dst: _Canvas, s: int) -> None:
        """Upsample this level-``s`` canvas bilinearly and composite it (as one layer) into ``dst``."""
        if self.touched is None:
            return
        hh, ww = self.trans.shape[-2:]
        y0, y1, x0, x1 = self.touched
        ya, yb, xa, xb = max(0, y0 - 1), min(hh, y1 + 1), max(0, x0 - 1), min(ww, x1 + 1)
        rgba = torch.cat([self.colour[:, ya:yb, xa:xb], 1.0 - self.trans[:, ya:yb, xa:xb]])
        up = F.interpolate(rgba[None], scale_factor=s, mode="bilinear", align_corners=False)[0]
        dst.over((ya * s, xa * s), up)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _prepare(lin: Tensor, coc: Tensor) -> tuple[_Frame, list[float], list[_Bin]]:
    c_min, c_max = float(coc.amin()), float(coc.amax())
    radii = _layer_radii(c_min, c_max)
    nb = len(radii) - 1
    asc = torch.tensor(radii[::-1], dtype=coc.dtype, device=coc.device)
    i = torch.bucketize(coc, asc).clamp_(1, nb)  # asc[i-1] < c <= asc[i]
    lower, upper = asc[i - 1], asc[i]
    t = ((coc - lower) / (upper - lower)).clamp_(0.0, 1.0)
    beta = nb - i  # descending index: bin b = (radii[b+1], radii[b]]
    bins = _bins(beta, radii)
    smax = max(b.level for b in bins)
    h, w = coc.shape
    hp, wp = -(-h // smax) * smax, -(-w // smax) * smax
    if (hp, wp) != (h, w):
        lin = F.pad(lin, (0, wp - w, 0, hp - h))
        t = F.pad(t, (0, wp - w, 0, hp - h))
        beta = F.pad(beta, (0, wp - w, 0, hp - h), value=nb)
    return _Frame(lin, beta, t, max(c_max, 0.0), h, w), radii, bins


def _render_one(lin: Tensor, coc: Tensor, aperture: Aperture | None, steps: Callable[[], None]) -> Tensor:
    frame, _, bins = _prepare(lin, coc)
    kernels = _Kernels(aperture, lin.dtype, lin.device)
    hp, wp = frame.beta.shape
    full = _Canvas(hp, wp, lin.dtype, lin.device)
    group: _Canvas | None = None
    group_level = 1
    for bin_ in bins:
        if bin_.level != group_level:
            if group is not None:
                group.merge_into(full, group_level)
            group_level = bin_.level
            group = None
            if group_level > 1:
                group = _Canvas(hp // group_level, wp // group_level, lin.dtype, lin.device)
        top_left, rgba = _bin_rgba(frame, bin_, kernels)
        (group if group is not None else full).over(top_left, rgba)
        steps()
    if group is not None:
        group.merge_into(full, group_level)
    cover = 1.0 - full.trans
    out = torch.where(cover > 1e-6, full.colour / cover.clamp_min(1e-6), frame.lin)
    return out[:, :frame.height, :frame.width]


def render_physical(
    image: Tensor,
    disparity: Tensor,
    *,
    k: float,
    disp_focus: float,
    gamma: float,
    aperture: Aperture | None,
    highlight: bool,
    on_step: Callable[[int, int], None] | None,
) -> Tensor:
    """Layered, occlusion-aware thin-lens bokeh (inputs already validated by ``render_bokeh``).

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        disparity: ``(B, 1, H, W)``, same dtype and device, larger = nearer.
        k: blur strength (px per unit of disparity), ``>= 0``.
        disp_focus: disparity rendered sharp.
        gamma: light is ``image ** gamma`` while blurring.
        aperture: aperture shape, ``None`` = disc.
        highlight: restore clipped highlights with a smooth inverse tone curve.
        on_step: ``on_step(i, total)`` after each bin (summed over the batch).

    Returns:
        ``(B, 3, H, W)`` in [0, 1], dtype and device of ``image``.
    """
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    coc = (k * (disparity.to(work) - disp_focus))[:, 0]
    if k == 0.0 or float(coc.abs().amax()) == 0.0:
        return image.clone()
    lin = image.to(work).pow(gamma)
    if highlight:
        lin = _expand_highlights(lin)
    total = 0
    for i in range(image.shape[0]):
        radii = _layer_radii(float(coc[i].amin()), float(coc[i].amax()))
        total += len(radii) - 1  # upper bound; empty bins are reported when skipped
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)

    outs = []
    for i in range(image.shape[0]):
        before = done
        out = _render_one(lin[i], coc[i], aperture, step)
        radii = _layer_radii(float(coc[i].amin()), float(coc[i].amax()))
        while done - before < len(radii) - 1:  # report skipped (empty) bins too
            step()
        if highlight:
            out = _compress_highlights(out)
        outs.append(out.clamp(0.0, None).pow(1.0 / gamma).clamp(0.0, 1.0))
    return torch.stack(outs).to(image.dtype)
