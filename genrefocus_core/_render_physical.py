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
_FINE = (0.5, 1.0, 2.0)
#: Tile size (cells) of the sparse overlap-add FFT convolution.
_TILE = 64
#: Jacobi sweeps per pyramid level of the hidden-surface colour fill.
_RELAX = 8
_RATIO = 1.3
#: A layer of radius ``r >= 2 r0`` is blurred at ``1/s`` resolution, ``s = 2^floor(log2(r / r0))``,
#: so its kernel spans 4..8 px there (8..16 px for shaped apertures, to keep their outline).
_R0 = 4.0
_R0_SHAPED = 8.0
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


def _level(radius: float, r0: float) -> int:
    """Downsampling factor of a layer of blur radius ``radius`` (px)."""
    if radius < 2.0 * r0:
        return 1
    return 2 ** math.floor(math.log2(radius / r0))


def _nice(n: int) -> int:
    """A fast real-FFT length >= ``n``: ``m * 2^k`` with ``m`` in 1, 3, 5, 7, 9 (odd lengths are slow)."""
    return min(m << max(0, math.ceil(math.log2(n / m))) for m in (1, 3, 5, 7, 9))


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


def _convolve(x: Tensor, lam: float, s: int, kernels: _Kernels, margin: int) -> Tensor:
    """Linear convolution of ``x`` ``(C, h, w)`` with ``K(lam)`` at level ``s``, grown by ``margin``."""
    h, w = x.shape[-2:]
    half = kernels.half(lam, s)
    if half <= 1:
        out = F.pad(x, (margin, margin, margin, margin)) if half == 0 else None
        if out is None:  # 3x3: nine shifted multiply-adds beat an FFT
            k = kernels.kernel(lam, s).tolist()
            out = x.new_zeros(x.shape[0], h + 2 * margin, w + 2 * margin)
            o = margin - 1
            for i in range(3):
                for j in range(3):
                    if k[i][j] != 0.0:
                        out[:, o + i:o + i + h, o + j:o + j + w].add_(x, alpha=k[i][j])
        return out
    oh, ow = h + 2 * margin, w + 2 * margin
    tile = _TILE
    ny, nx = -(-h // tile), -(-w // tile)
    if ny * nx > 1:
        # overlap-add over the tiles that hold anything: layers are often thin contour bands
        c = x.shape[0]
        xp = F.pad(x, (0, nx * tile - w, 0, ny * tile - h))
        tiles = xp.view(c, ny, tile, nx, tile).permute(1, 3, 0, 2, 4)  # (ny, nx, C, T, T)
        active = torch.nonzero(tiles[:, :, 3].flatten(2).amax(dim=2) > 0)
        if len(active) * 2 <= ny * nx:
            p = _nice(tile + 2 * margin)
            buf = x.new_zeros(len(active), c, p, p)
            buf[:, :, margin:margin + tile, margin:margin + tile] = tiles[active[:, 0], active[:, 1]]
            spec = torch.fft.rfft2(buf)
            spec *= kernels.spectrum(lam, s, p, p)
            parts = torch.fft.irfft2(spec, s=(p, p))[:, :, :tile + 2 * margin, :tile + 2 * margin]
            out = x.new_zeros(c, ny * tile + 2 * margin, nx * tile + 2 * margin)
            for (ty, tx), part in zip(active.tolist(), parts, strict=True):
                out[:, ty * tile:(ty + 1) * tile + 2 * margin, tx * tile:(tx + 1) * tile + 2 * margin] += part
            return out[:, :oh, :ow]
    fh, fw = _nice(oh), _nice(ow)
    buf = torch.zeros(x.shape[0], fh, fw, dtype=x.dtype, device=x.device)
    buf[:, margin:margin + h, margin:margin + w] = x
    spec = torch.fft.rfft2(buf)
    spec *= kernels.spectrum(lam, s, fh, fw)
    return torch.fft.irfft2(spec, s=(fh, fw))[:, :oh, :ow]


# ----------------------------------------------------------------------------------------------
# Hidden-surface fill
# ----------------------------------------------------------------------------------------------


def _halve(x: Tensor) -> Tensor:
    """Smooth 2x decimation of ``(C, h, w)``: separable [1, 3, 3, 1] / 8 filter, stride 2.

    Its support straddles cell borders, so what is known near the edge of a hole reaches the
    coarser cells over the hole (a box filter would stop at power-of-two boundaries). Beyond the
    array everything is empty (zero).
    """
    for dim in (1, 2):
        n = x.shape[dim]
        half = (n + 1) // 2

        def sl(start: int, stop: int | None = None, step: int = 2, d: int = dim) -> tuple[slice, ...]:
            return (slice(None),) * d + (slice(start, stop, step),)

        out = x[sl(0)].mul(3.0)
        out[sl(0, n // 2, 1)] += x[sl(1)].mul(3.0)
        if half > 1:
            out[sl(1, None, 1)] += x[sl(1, 2 * half - 2)]
            out[sl(0, half - 1, 1)] += x[sl(2)][sl(0, half - 1, 1)]
        x = out.mul_(0.125)
    return x


def _relax(val: Tensor, value: Tensor, free: Tensor, sweeps: int) -> Tensor:
    """Jacobi sweeps of Laplace's equation where ``free > 0`` (``val = value + free * mean of 4 neighbours``).

    The border is reflective (a missing neighbour counts as the cell itself).
    """
    for _ in range(sweeps):
        nb = val.clone()
        nb[:, 1:] = val[:, :-1]
        nb[:, :-1] += val[:, 1:]
        nb[:, -1] += val[:, -1]
        nb[:, :, 1:] += val[:, :, :-1]
        nb[:, :, 0] += val[:, :, 0]
        nb[:, :, :-1] += val[:, :, 1:]
        nb[:, :, -1] += val[:, :, -1]
        val = nb.mul_(0.25).mul_(free).add_(value)
    return val


def _pull_push(value: Tensor, weight: Tensor, relax: int = 0, groups: list[int] | None = None) -> Tensor:
    """Extrapolate ``value / weight`` everywhere (pull-push).

    ``value``: ``(C, h, w)`` premultiplied by its weight; ``weight``: ``(G, h, w)`` in [0, 1], channel
    ``c`` of ``value`` using ``weight[groups[c]]`` (default: ``G == 1`` or ``G == C``). Known cells
    keep their value; unknown ones take the weighted average of ever coarser neighbourhoods,
    blended in with bilinear weights. With ``relax > 0``, every level but the finest then gets
    ``relax`` Jacobi sweeps of Laplace's equation over its holes: the fill tends to the harmonic
    one, which continues linear trends that plain pull-push flattens.
    """
    pick = None if groups is None else torch.tensor(groups, device=value.device)

    def per_channel(w: Tensor) -> Tensor:
        return w if pick is None else w.index_select(0, pick)

    levels = []
    while max(value.shape[-2:]) > 1 and float(weight.amin()) <= 0.0:
        levels.append((value, weight))
        value, weight = _halve(value), _halve(weight)
    weight = per_channel(weight)
    total = weight.sum(dim=(1, 2), keepdim=True)
    mean = value.sum(dim=(1, 2), keepdim=True) / total.clamp_min(1e-12)
    val = torch.where(weight > 0, value / weight.clamp_min(1e-12), mean)
    for depth, (value, weight) in enumerate(reversed(levels)):
        h, w = value.shape[-2:]
        up = F.interpolate(val[None], scale_factor=2, mode="bilinear", align_corners=False)[0, :, :h, :w]
        free = per_channel(1.0 - weight.clamp(0.0, 1.0))
        val = up.mul_(free).add_(value)
        if depth < len(levels) - 1:
            val = _relax(val, value, free, relax)
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
# Layers
# ----------------------------------------------------------------------------------------------


@dataclass
class _Frame:
    """Per-image arrays, padded to a multiple of the coarsest level (padding = no surface)."""

    lin: Tensor  # (3, H, W) linear (expanded) colour
    beta: Tensor  # (H, W) int64: the pixel lies between layers beta and beta + 1; huge in the padding
    t: Tensor  # (H, W) share of the pixel in layer beta (the nearer one)
    u: Tensor  # (H, W) 1 - t, its share in layer beta + 1
    radii: list[float]  # signed layer radii, descending
    boxes: list[tuple[int, int, int, int] | None]  # per bin: bounding box (y0, y1, x0, x1) or None
    c_max: float
    height: int
    width: int


def _bin_boxes(beta: Tensor, nb: int) -> list[tuple[int, int, int, int] | None]:
    """Bounding box of each bin's pixels (``None`` when empty)."""
    h, w = beta.shape
    rows = torch.zeros(h, nb, dtype=torch.uint8, device=beta.device).scatter_(1, beta, 1).t().bool()
    cols = torch.zeros(w, nb, dtype=torch.uint8, device=beta.device).scatter_(1, beta.t(), 1).t().bool()
    ar_h = torch.arange(h, device=beta.device)
    ar_w = torch.arange(w, device=beta.device)
    big = max(h, w) + 1
    stats = torch.stack([
        torch.where(rows, ar_h, big).amin(dim=1), torch.where(rows, ar_h, -1).amax(dim=1),
        torch.where(cols, ar_w, big).amin(dim=1), torch.where(cols, ar_w, -1).amax(dim=1),
    ]).t().tolist()
    return [(y0, y1 + 1, x0, x1 + 1) if y1 >= 0 else None for y0, y1, x0, x1 in stats]


def _union(a: tuple[int, int, int, int] | None, b: tuple[int, int, int, int] | None):
    if a is None:
        return b
    if b is None:
        return a
    return (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _prepare(lin: Tensor, coc: Tensor, r0: float) -> _Frame:
    c_min, c_max = float(coc.amin()), float(coc.amax())
    radii = _layer_radii(c_min, c_max)
    nb = len(radii) - 1
    asc = torch.tensor(radii[::-1], dtype=coc.dtype, device=coc.device)
    i = torch.bucketize(coc, asc).clamp_(1, nb)  # asc[i-1] < c <= asc[i]
    lower, upper = asc[i - 1], asc[i]
    t = ((coc - lower) / (upper - lower)).clamp_(0.0, 1.0)
    beta = nb - i  # bin index in descending order: between radii[beta] and radii[beta + 1]
    boxes = _bin_boxes(beta, nb)
    grid = 2 * max(_level(abs(r), r0) for r in radii)
    h, w = coc.shape
    hp, wp = -(-h // grid) * grid, -(-w // grid) * grid
    if (hp, wp) != (h, w):
        lin = F.pad(lin, (0, wp - w, 0, hp - h))
        t = F.pad(t, (0, wp - w, 0, hp - h))
        beta = F.pad(beta, (0, wp - w, 0, hp - h), value=nb + 2)
    beta = beta.to(torch.int16)  # comparisons stream less memory
    u = 1.0 - t
    return _Frame(lin, beta, t, u, radii, boxes, max(c_max, 0.0), h, w)


def _downsample(x: Tensor, s: int) -> Tensor:
    """Area average by ``s`` (a power of two dividing the size) of ``(C, h, w)``."""
    while s > 1:
        x = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]).mul_(0.25)
        s //= 2
    return x


def _upsample(x: Tensor, s: int, shape: tuple[int, int]) -> Tensor:
    """Bilinear ``x s`` upsampling of ``(C, h, w)``, cropped to ``shape``."""
    if s == 1:
        return x
    up = F.interpolate(x[None], scale_factor=s, mode="bilinear", align_corners=False)[0]
    return up[:, :shape[0], :shape[1]]


def _add_hidden_surface(x: Tensor, reach: float) -> None:
    """Add to a layer the surface hidden by its occluders, in place.

    ``x``: ``(5, h, w)``, the layer's premultiplied RGBA and the fraction of each cell covered by its
    occluders (``h``, ``w`` even). Behind the occluders the layer continues with its own colours
    extrapolated (pull-push with harmonic relaxation) and with the share of the hidden surface it
    had among the nearby non-occluding pixels (1 behind a depth step, 0 behind a continuous depth
    ramp), up to ``reach`` cells from its own pixels. Both are smooth guesses, computed on a grid
    twice as coarse.
    """
    coarse = (x[:, 0::2, 0::2] + x[:, 1::2, 0::2]).add_(x[:, 0::2, 1::2]).add_(x[:, 1::2, 1::2]).mul_(0.25)
    alpha, occ_c = coarse[3:4], coarse[4:5]
    near = _dilate(alpha[0] > 0, reach / 2)
    need = (occ_c[0] > 0) & near
    rows = torch.nonzero(need.any(dim=1)).flatten()
    if len(rows) == 0:
        return
    cols = torch.nonzero(need.any(dim=0)).flatten()
    fields = _pull_push(coarse[:4], torch.cat([alpha, 1.0 - occ_c]), relax=_RELAX, groups=[0, 0, 0, 1])
    fields[3:4].clamp_(0.0, 1.0)
    fields[3:4] *= near
    # back to the layer's grid over the needed region only (one coarse cell of margin)
    hc, wc = need.shape
    y0, y1 = max(0, int(rows[0]) - 1), min(hc, int(rows[-1]) + 2)
    x0, x1 = max(0, int(cols[0]) - 1), min(wc, int(cols[-1]) + 2)
    part = F.interpolate(fields[None, :, y0:y1, x0:x1], scale_factor=2, mode="bilinear",
                         align_corners=False)[0]
    ys, xs = slice(2 * y0, 2 * y1), slice(2 * x0, 2 * x1)
    hidden = x[4:5, ys, xs] * part[3:4]
    x[:3, ys, xs].addcmul_(part[:3], hidden)
    x[3:4, ys, xs] += hidden


def _layer_rgba(frame: _Frame, index: int, s: int,
                kernels: _Kernels) -> tuple[tuple[int, int], Tensor] | None:
    """Blurred premultiplied RGBA of layer ``index`` at level ``s``: (top-left cell, ``(4, h, w)``).

    The layer holds its share of the pixels on either side of it (tent weights) and, behind
    pixels at least two layers nearer (which occlude it), an extrapolated hidden surface.
    """
    lam = frame.radii[index]
    nb = len(frame.radii) - 1
    own_box = _union(frame.boxes[index] if index < nb else None,
                     frame.boxes[index - 1] if index > 0 else None)
    if own_box is None:
        return None
    hp, wp = frame.beta.shape
    r_occ = max(frame.c_max, -lam)
    reach = math.ceil((r_occ + abs(lam)) * kernels.extent) + 2  # px from which hidden parts are seen
    y0, y1, x0, x1 = own_box
    grown = (y0 - reach, y1 + reach, x0 - reach, x1 + reach)
    occluded = any(
        b is not None and b[0] < grown[1] and grown[0] < b[1] and b[2] < grown[3] and grown[2] < b[3]
        for b in frame.boxes[:max(0, index - 1)]
    )
    m = reach if occluded else 0
    g = 2 * s  # even number of cells: the hidden-surface fill halves the grid
    wy0, wx0 = max(0, y0 - m) // g * g, max(0, x0 - m) // g * g
    wy1, wx1 = min(hp, -(-(y1 + m) // g) * g), min(wp, -(-(x1 + m) // g) * g)
    beta = frame.beta[wy0:wy1, wx0:wx1]
    lin = frame.lin[:, wy0:wy1, wx0:wx1]
    t = frame.t[wy0:wy1, wx0:wx1]

    x = lin.new_empty(5 if occluded else 4, wy1 - wy0, wx1 - wx0)
    share = torch.where(beta == index, t, torch.where(beta == index - 1, frame.u[wy0:wy1, wx0:wx1], 0.0))
    torch.mul(lin, share, out=x[:3])
    x[3] = share
    if occluded:
        # occlusion weight: the pixel's part in layers at least two layers nearer than this one
        x[4] = torch.where(beta <= index - 3, 1.0, torch.where(beta == index - 2, t, 0.0))
    x = _downsample(x, s)
    if occluded:
        if float(x[4].amax()) > 0.0:
            _add_hidden_surface(x, reach / s)
        x = x[:4]
    alpha_any = x[3] > 0
    ys = torch.nonzero(alpha_any.any(dim=1)).flatten()
    if len(ys) == 0:
        return None
    xs = torch.nonzero(alpha_any.any(dim=0)).flatten()
    cy0, cy1 = int(ys[0]), int(ys[-1]) + 1
    cx0, cx1 = int(xs[0]), int(xs[-1]) + 1
    margin = kernels.half(lam, s)
    rgba = _convolve(x[:, cy0:cy1, cx0:cx1], lam, s, kernels, margin)
    return (wy0 // s + cy0 - margin, wx0 // s + cx0 - margin), rgba


def _render_one(lin: Tensor, coc: Tensor, aperture: Aperture | None, step: Callable[[], None]) -> Tensor:
    """Render one image: linear colour ``(3, H, W)`` and signed CoC ``(H, W)`` -> linear colour."""
    round_ = aperture is None or aperture.shape == "disc" or (
        aperture.shape == "polygon" and aperture.roundness == 1)
    r0 = _R0 if round_ else _R0_SHAPED
    frame = _prepare(lin, coc, r0)
    kernels = _Kernels(aperture, lin.dtype, lin.device)
    hp, wp = frame.beta.shape
    num = lin.new_zeros(3, hp, wp)
    cov = lin.new_zeros(1, hp, wp)
    occ = lin.new_zeros(1, hp, wp)  # blurred alphas of the layers two or more steps nearer
    previous: tuple[tuple[slice, slice], Tensor] | None = None
    for index, lam in enumerate(frame.radii):
        s = _level(abs(lam), r0)
        placed = _layer_rgba(frame, index, s, kernels)
        current = None
        if placed is not None:
            (cy, cx), rgba = placed
            if s > 1:  # bilinear upsampling on the global grid: pad one empty cell per side
                rgba = F.interpolate(F.pad(rgba, (1, 1, 1, 1))[None], scale_factor=s, mode="bilinear",
                                     align_corners=False)[0]
                cy, cx = (cy - 1) * s, (cx - 1) * s
            h, w = rgba.shape[-2:]
            ya, xa, yb, xb = max(0, cy), max(0, cx), min(hp, cy + h), min(wp, cx + w)
            if ya < yb and xa < xb:
                rgba = rgba[:, ya - cy:yb - cy, xa - cx:xb - cx]
                win = (slice(ya, yb), slice(xa, xb))
                alpha = rgba[3:4].clamp(0.0, 1.0)
                # additive occlusion: the adjacent nearer layer does not occlude (see module doc)
                weight = (1.0 - occ[:, win[0], win[1]]).clamp_(0.0, 1.0)
                num[:, win[0], win[1]].addcmul_(weight, rgba[:3])
                cov[:, win[0], win[1]].addcmul_(weight, alpha)
                current = (win, alpha)
        if previous is not None:
            win, alpha = previous
            occ[:, win[0], win[1]] += alpha
        previous = current
        step()
    out = torch.where(cov > 1e-6, num / cov.clamp_min(1e-6), frame.lin)
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
        on_step: ``on_step(i, total)`` after each layer (counted over the whole batch).

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
    total = sum(len(_layer_radii(float(c.amin()), float(c.amax()))) for c in coc)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if on_step is not None:
            on_step(done, total)

    outs = []
    for i in range(image.shape[0]):
        out = _render_one(lin[i], coc[i], aperture, step)
        if highlight:
            out = _compress_highlights(out)
        outs.append(out.clamp(0.0, None).pow(1.0 / gamma).clamp(0.0, 1.0))
    return torch.stack(outs).to(image.dtype)
