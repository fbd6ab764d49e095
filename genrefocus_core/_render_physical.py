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
from collections.abc import Callable

import torch
from torch import Tensor

from ._physical_layers import R0, R0_SHAPED, TILE, Kernels, layer_radii, layer_tiles, level, prepare
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


def _render_one(lin: Tensor, coc: Tensor, aperture: Aperture | None, step: Callable[[], None]) -> Tensor:
    """Render one image: linear colour ``(3, H, W)`` and signed CoC ``(H, W)`` -> linear colour."""
    round_ = aperture is None or aperture.shape == "disc" or (
        aperture.shape == "polygon" and aperture.roundness == 1)
    r0 = R0 if round_ else R0_SHAPED
    frame = prepare(lin, coc, r0)
    kernels = Kernels(aperture, lin.dtype, lin.device)
    hp, wp = frame.beta.shape
    ny, nx = hp // TILE, wp // TILE
    # accumulators in tile-major layout: layers arrive as sparse sets of tiles
    num = lin.new_zeros(ny * nx, 3, TILE, TILE)
    cov = lin.new_zeros(ny * nx, 1, TILE, TILE)
    occ = lin.new_zeros(ny * nx, 1, TILE, TILE)  # blurred alphas of the layers two or more steps nearer
    previous: tuple[Tensor, Tensor] | None = None
    for index, lam in enumerate(frame.radii):
        placed = layer_tiles(frame, index, level(abs(lam), r0), kernels)
        current = None
        if placed is not None:
            slots, rgba = placed
            alpha = rgba[:, 3:4].clamp(0.0, 1.0)
            # additive occlusion: the adjacent nearer layer does not occlude (see module doc);
            # each slot appears once per call, so the indexed additions are deterministic
            weight = (1.0 - occ.index_select(0, slots)).clamp_(0.0, 1.0)
            num.index_add_(0, slots, weight * rgba[:, :3])
            cov.index_add_(0, slots, weight * alpha)
            current = (slots, alpha)
        if previous is not None:
            occ.index_add_(0, *previous)
        previous = current
        step()
    num = num.view(ny, nx, 3, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(3, hp, wp)
    cov = cov.view(ny, nx, 1, TILE, TILE).permute(2, 0, 3, 1, 4).reshape(1, hp, wp)
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
    total = sum(len(layer_radii(float(c.amin()), float(c.amax()))) for c in coc)
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
