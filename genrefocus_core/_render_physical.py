"""Mode "physical" of :func:`genrefocus_core.renderer.render_bokeh`: a layered thin-lens renderer.

Model. The scene is what a pinhole camera saw: the all-in-focus image plus, per pixel, a signed
circle-of-confusion radius ``c = k * (d - d_f)`` (px, > 0 in front of the focal plane). A thin
lens averages, over the aperture, the colour of the first surface each ray meets: a point at
``c < 0`` spreads to the aperture shape scaled by ``|c|``, one at ``c > 0`` to that shape rotated
by 180 degrees; a sharp foreground hides the blurred background completely, a blurred foreground
turns semi-transparent and shows what the pinhole could not see behind it.

Algorithm (per image of the batch; the per-layer work lives in :mod:`._physical_layers`).

1. Light: ``v = image ** gamma``; with ``highlight``, a smooth invertible curve (identity up to
   0.9, cubic above, 1 -> 8) restores clipped highlights and is inverted at the end, so
   untouched pixels round-trip exactly.
2. Layers at signed radii ``lambda``: 0, +-0.5, +-1, +-2, then x1.3 per step up to the largest
   ``|c|`` (0.5 is dropped above 2 MP). A pixel between ``lambda[b+1]`` and ``lambda[b]`` goes to
   both with tent weights, so its blur ``t K(lambda[b]) + (1 - t) K(lambda[b+1])`` (kernels from
   :func:`~genrefocus_core.aperture.aperture_kernel`) is continuous in ``c``: no banding, no
   popping as ``k`` changes.
3. Layers are accumulated front to back, additively: layer ``l`` counts with weight
   ``clamp(1 - O_l, 0, 1)``, ``O_l`` the sum of the blurred alphas of the layers at least two
   steps nearer; the result is normalised by the accumulated coverage. The adjacent layer never
   occludes: a surface crossing from one layer to the next is continuous (a thin lens sees a
   tilted plane without self-occlusion) and a pixel shared by two layers must not hide itself;
   two or more steps apart the layers behave as foreground over background, which is exact for
   a thin lens when either is in focus.
4. Hidden surfaces. Behind its occluders a layer continues up to the distance from which a ray
   can still see it (the occluders' plus its own blur radius): its colour is extrapolated
   (pull-push with harmonic relaxation) and its share of the hidden surface is the one it had
   among the nearby visible pixels, 1 behind a depth step and 0 behind a continuous depth ramp
   (a ramp hides nothing).
5. Cost. A layer of radius ``r >= 2 r0`` (``r0`` = 4 px, 8 px for shaped apertures, halved above
   2 MP) is blurred at ``1/s`` resolution, ``s = 2^floor(log2(r / r0))``, with the kernel at
   ``r' / s`` (``r'`` keeps the second moment of the down/up-sampled blur); runs of such coarse
   layers are accumulated on their finest grid and upsampled once, a sharp occluder in front
   staying sharp through the ratio of exact to downsampled transmittance. Full-resolution layers
   are processed on the 64-px tiles that hold them (depth maps make thin contour bands), with an
   overlap-add FFT (two channels per complex FFT). Per layer the work is proportional to the
   area it covers, plus FFTs whose size does not depend on the radius; memory is O(HW).

Approximations: depth differences within one layer step are ignored (0.5-1 px near focus, 30 %
of the radius beyond 2 px); the hidden surface is a guess (exact only where it continues what is
visible); where two blurred layers overlap, layering multiplies average coverages instead of
following each ray, which blurs the correlation between what a ray passes in front and behind;
monocular depth edges that miss the colour edge by a pixel or two leave thin halos; beyond the
frame nothing is known, so borders are renormalised (normalised convolution).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ._physical_layers import (
    R0,
    R0_SHAPED,
    TILE,
    Frame,
    Kernels,
    fine_radii,
    layer_radii,
    layer_tiles,
    layer_window,
    level,
    prepare,
    upsampled_tiles,
    window_to_tiles,
)
from .aperture import Aperture

__all__ = ["render_physical"]

logger = logging.getLogger(__name__)

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


class _Accumulator:
    """Front-to-back additive accumulation on the full-resolution tile grid.

    ``num`` and ``cov`` sum each layer's premultiplied colour and alpha weighted by
    ``clamp(1 - occ)``, where ``occ`` sums the blurred alphas of the layers at least two steps
    nearer (the adjacent layer never occludes: a surface crossing from one layer to the next is
    continuous, and a pixel shared by two layers must not hide itself).
    """

    def __init__(self, frame: Frame, like: Tensor) -> None:
        hp, wp = frame.beta.shape
        self.frame = frame
        self.grid = (hp // TILE, wp // TILE)
        n = self.grid[0] * self.grid[1]
        self.num = like.new_zeros(n, 3, TILE, TILE)
        self.cov = like.new_zeros(n, 1, TILE, TILE)
        self.occ = like.new_zeros(n, 1, TILE, TILE)
        self.pending: tuple[Tensor, Tensor] | None = None  # the previous layer's alpha tiles

    def add(self, slots: Tensor, rgba: Tensor, gain: Tensor | None = None) -> None:
        """Add tiles (each slot once: the indexed additions are deterministic on every device)."""
        weight = (1.0 - self.occ.index_select(0, slots)).clamp_(0.0, 1.0)
        if gain is not None:
            weight = weight * gain
        self.num.index_add_(0, slots, weight * rgba[:, :3])
        self.cov.index_add_(0, slots, weight * rgba[:, 3:4])

    def step(self, current: tuple[Tensor, Tensor] | None) -> None:
        """End of a layer: the previous one starts occluding; ``current`` becomes pending."""
        if self.pending is not None:
            self.occ.index_add_(0, *self.pending)
        self.pending = current

    def image(self) -> Tensor:
        ny, nx = self.grid
        hp, wp = ny * TILE, nx * TILE
        num = self.num.view(ny, nx, 3, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(3, hp, wp)
        cov = self.cov.view(ny, nx, 1, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(1, hp, wp)
        out = torch.where(cov > 1e-6, num / cov.clamp_min(1e-6), self.frame.lin)
        return out[:, :self.frame.height, :self.frame.width]

    def occ_image(self) -> Tensor:
        ny, nx = self.grid
        return self.occ.view(ny, nx, 1, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(1, ny * TILE, nx * TILE)


class _Group:
    """A run of consecutive coarse layers, accumulated on the grid of level ``s`` (their finest).

    Within the group the same additive rule runs at level ``s``; what the layers before the group
    occlude enters twice: downsampled here (``before``), and exactly at full resolution when the
    group is merged, through the ratio of the exact to the downsampled transmittance (a sharp
    foreground stays sharp in front of a coarse background).
    """

    def __init__(self, acc: _Accumulator, s: int) -> None:
        self.acc = acc
        self.s = s
        occ = acc.occ_image()
        self.before = F.avg_pool2d(occ[None], s)[0]
        #: nothing occludes the group yet: exact and downsampled transmittance are both 1 at merge
        #: (the layer just before it, if pending, only enters the group's own occlusion)
        self.front = not bool(self.before.any())
        self.num = occ.new_zeros(3, *self.before.shape[-2:])
        self.cov = torch.zeros_like(self.before)
        self.occ = torch.zeros_like(self.before)
        self.pending: tuple[tuple[slice, slice], Tensor] | None = None
        self.box: list[int] | None = None
        if acc.pending is not None:  # the layer just before the group, brought to this grid
            slots, alpha = acc.pending
            ny, nx = acc.grid
            full = occ.new_zeros(ny * nx, 1, TILE, TILE).index_copy_(0, slots, alpha)
            full = full.view(ny, nx, 1, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(1, ny * TILE, nx * TILE)
            alpha = F.avg_pool2d(full[None], s)[0]
            self.pending = ((slice(None), slice(None)), alpha)
            acc.pending = None
            rows = torch.nonzero(alpha[0].amax(dim=1) > 0).flatten()
            cols = torch.nonzero(alpha[0].amax(dim=0) > 0).flatten()
            if len(rows):  # it joins the group's occlusion: merge its region too
                self.box = [int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1]

    def add(self, placed: tuple[tuple[int, int], Tensor] | None, s: int) -> None:
        """Composite a layer blurred on the level-``s`` grid (``s >= self.s``)."""
        current = None
        if placed is not None:
            (cy, cx), rgba = placed
            if s > self.s:  # bilinear upsampling to this grid: pad one empty cell per side
                f = s // self.s
                rgba = F.interpolate(F.pad(rgba, (1, 1, 1, 1))[None], scale_factor=f, mode="bilinear",
                                     align_corners=False)[0]
                cy, cx = (cy - 1) * f, (cx - 1) * f
            hh, ww = self.cov.shape[-2:]
            h, w = rgba.shape[-2:]
            ya, xa, yb, xb = max(0, cy), max(0, cx), min(hh, cy + h), min(ww, cx + w)
            if ya < yb and xa < xb:
                rgba = rgba[:, ya - cy:yb - cy, xa - cx:xb - cx]
                win = (slice(ya, yb), slice(xa, xb))
                alpha = rgba[3:4].clamp(0.0, 1.0)
                weight = (1.0 - self.before[:, win[0], win[1]] - self.occ[:, win[0], win[1]]).clamp_(0.0, 1.0)
                self.num[:, win[0], win[1]].addcmul_(weight, rgba[:3])
                self.cov[:, win[0], win[1]].addcmul_(weight, alpha)
                current = (win, alpha)
                b = self.box
                self.box = [ya, yb, xa, xb] if b is None else [min(b[0], ya), max(b[1], yb),
                                                                 min(b[2], xa), max(b[3], xb)]
        if self.pending is not None:
            win, alpha = self.pending
            self.occ[:, win[0], win[1]] += alpha
        self.pending = current

    def merge(self, final: bool = False) -> None:
        """Bring the group to full resolution and into the accumulator (``final``: no layer follows)."""
        acc, s = self.acc, self.s
        last = self.pending
        if self.box is not None:
            hh, ww = self.cov.shape[-2:]
            # the box and one empty cell around it, widened to whole full-resolution tiles (beyond
            # the empty cell the upsampled layer is zero either way)
            a = max(1, TILE // s)
            y0, y1 = max(0, self.box[0] - 1) // a * a, min(hh, -(-(self.box[1] + 1) // a) * a)
            x0, x1 = max(0, self.box[2] - 1) // a * a, min(ww, -(-(self.box[3] + 1) // a) * a)
            win = (slice(None), slice(y0, y1), slice(x0, x1))
            # nothing before the group: exact and downsampled transmittance are both 1; nothing
            # after it: its coverage occludes nothing
            parts = [self.num[win], self.cov[win]]
            if not final:
                parts.append(self.occ[win])
            if not self.front:
                parts.append(self.before[win])
            tiles = upsampled_tiles(torch.cat(parts), s, y0, x0, acc.frame, key=slice(3, 5 - final))
            if tiles is not None:
                slots, t = tiles
                if self.front:
                    acc.num.index_add_(0, slots, t[:, :3])
                    acc.cov.index_add_(0, slots, t[:, 3:4])
                else:
                    exact = (1.0 - acc.occ.index_select(0, slots)).clamp_(0.0, 1.0)
                    approx = (1.0 - t[:, -1:]).clamp_(0.0, 1.0)
                    gain = torch.where(approx > 1e-3, exact / approx.clamp_min(1e-3), 0.0)
                    acc.num.index_add_(0, slots, gain * t[:, :3])
                    acc.cov.index_add_(0, slots, gain * t[:, 3:4])
                if not final:
                    acc.occ.index_add_(0, slots, t[:, 4:5])
        acc.pending = None
        if last is not None:  # the group's last layer occludes from the layer after the next on
            (ys, xs), alpha = last
            full = torch.zeros_like(self.cov)
            full[:, ys, xs] = alpha
            ya, xa = ys.start or 0, xs.start or 0
            window = full[:, ys, xs]
            up = F.interpolate(F.pad(window, (1, 1, 1, 1))[None], scale_factor=s, mode="bilinear",
                               align_corners=False)[0]
            acc.pending = window_to_tiles(up, (ya - 1) * s, (xa - 1) * s, acc.frame, key=0)


def _render_one(lin: Tensor, coc: Tensor, aperture: Aperture | None, step: Callable[[], None]) -> Tensor:
    """Render one image: linear colour ``(3, H, W)`` and signed CoC ``(H, W)`` -> linear colour."""
    round_ = aperture is None or aperture.shape == "disc" or (
        aperture.shape == "polygon" and aperture.roundness == 1)
    # above ~2 MP a few-pixel blur is a small one: coarse grids start earlier (down to r0 / 2)
    scale = min(1.0, max(0.5, math.sqrt(2.0e6 / coc.numel())))
    r0 = (R0 if round_ else R0_SHAPED) * scale
    frame = prepare(lin, coc, r0)
    kernels = Kernels(aperture, lin.dtype, lin.device)
    acc = _Accumulator(frame, lin)
    group: _Group | None = None
    levels = [level(abs(lam), r0) for lam in frame.radii]
    for index in range(len(frame.radii)):
        s = levels[index]
        if group is not None and s == 1:
            group.merge()
            group = None
        if s == 1:
            placed = layer_tiles(frame, index, kernels)
            current = None
            if placed is not None:
                slots, rgba = placed
                rgba[:, 3:4].clamp_(0.0, 1.0)  # a fresh tensor: clamped in place
                acc.add(slots, rgba)
                current = (slots, rgba[:, 3:4])
            acc.step(current)
        else:
            if group is None:  # a run of coarse layers, accumulated on the finest grid among them
                end = next((j for j in range(index, len(levels)) if levels[j] == 1), len(levels))
                group = _Group(acc, min(levels[index:end]))
            group.add(layer_window(frame, index, s, kernels), s)
        step()
    if group is not None:
        group.merge(final=True)
    return acc.image()


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

    Example:
        >>> img = torch.zeros(1, 3, 32, 32)
        >>> img[..., 16, 16] = 1.0
        >>> out = render_physical(img, torch.zeros(1, 1, 32, 32), k=6.0, disp_focus=1.0, gamma=1.0,
        ...                       aperture=None, highlight=False, on_step=None)
        >>> round(float(out.sum() / img.sum()), 3), float(out.max()) < 0.05  # spread, energy kept
        (1.0, True)
    """
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    coc = (k * (disparity.to(work) - disp_focus))[:, 0]
    if k == 0.0 or float(coc.abs().amax()) == 0.0:
        return image.clone()
    lin = image.to(work).pow(gamma)
    if highlight:
        lin = _expand_highlights(lin)
    fine = fine_radii(coc[0].numel())
    total = sum(len(layer_radii(float(c.amin()), float(c.amax()), fine)) for c in coc)
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
