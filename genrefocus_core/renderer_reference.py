"""Brute-force reference of BokehMe's classical scatter renderer (slow; tests and benchmarks only).

A plain, independent transcription of the algorithm in ``docs/renderer.md`` §1 (BokehMe,
``JuewenPeng/BokehMe`` at 8b3ed55, ``classical_renderer/scatter.py`` and ``scatter_ex.py``): every
source pixel visits every tap of its square window of half-size ``floor(r) + 1`` and adds BokehMe's
weight there, ``O(H W r^2)`` work. It shares no accumulation code with the fast renderer
(:mod:`genrefocus_core._render_bokehme`), so it serves as the oracle in tests and as the baseline
in ``bench/renderer.py``. Use ``render_bokeh(..., mode="bokehme")`` for real work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_number, check_render_inputs
from .errors import GenRefocusInputError

__all__ = ["scatter_reference"]


def _polygon_rho(radius: Tensor, dy: int, dx: int, poly_sides: int, init_angle: float) -> Tensor:
    # parity: BokehMe scatter_ex.py -- rho = r sin(a) / sin(phi + a), a = pi/2 - pi/n,
    # phi = |atan2(dy, dx) + initAngle| mod 2pi/n, evaluated in the working precision.
    t = torch.tensor([float(dy), float(dx)], dtype=radius.dtype)
    ang1 = 2.0 * math.pi / poly_sides
    ang2 = math.pi / 2.0 - math.pi / poly_sides
    phi = torch.remainder((torch.atan2(t[0], t[1]) + init_angle).abs(), ang1)
    return radius * math.sin(ang2) / torch.sin(phi + ang2).to(radius.device)


def scatter_reference(
    image: Tensor,
    disparity: Tensor,
    *,
    k: float,
    disp_focus: float,
    gamma: float,
    highlight: bool = False,
    poly_sides: int | None = None,
    init_angle: float = math.pi / 2.0,
) -> Tensor:
    """BokehMe's classical renderer by brute-force scatter: slow, for tests and benchmarks only.

    Every source pixel ``q`` with ``r = |k (d_q - d_f)|`` adds, at every offset ``(dy, dx)`` of the
    square ``[-(floor(r)+1), floor(r)+1]**2`` that lands inside the image, the weight
    ``(0.5 + 0.5 tanh(4 (rho - delta))) / (r**2 + 0.2)`` (``delta`` the offset length, ``rho = r``
    or BokehMe's polygon extent) to ``W`` and that weight times ``I_q**gamma`` to ``C``. The result
    is ``(C / W)**(1/gamma)`` clamped to [0, 1]. Sources are processed in groups of equal window
    size, vectorised over the group, one offset at a time.

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        disparity: ``(B, 1, H, W)`` or ``(1, 1, H, W)``, larger = nearer.
        k: blur strength, ``>= 0``.
        disp_focus: disparity rendered sharp.
        gamma: power in [1, 5].
        highlight: BokehMe demo's highlight boost before the power.
        poly_sides: ``None`` for BokehMe's circular ``scatter.py``; an integer ``n >= 3`` for the
            n-gon of ``scatter_ex.py``.
        init_angle: ``scatter_ex.py``'s ``initAngle`` in radians (``pi/2``: a vertex points up).

    Returns:
        ``(B, 3, H, W)`` in [0, 1]; float64 inputs are rendered in float64, others in float32, and
        the result has the dtype of ``image``.

    Raises:
        GenRefocusInputError: on bad shapes, non-finite values or out-of-range scalars.

    Example:
        >>> img = torch.full((1, 3, 6, 6), 0.25)
        >>> disp = torch.linspace(0, 1, 6).view(1, 1, 1, 6).expand(1, 1, 6, 6)
        >>> out = scatter_reference(img, disp, k=3.0, disp_focus=0.5, gamma=2.0)
        >>> bool(torch.allclose(out, img, atol=1e-6))
        True
    """
    k, disp_focus, gamma = check_render_inputs(image, disparity, k, disp_focus, gamma)
    init_angle = check_number("init_angle", init_angle)
    if poly_sides is not None and (isinstance(poly_sides, bool) or not isinstance(poly_sides, int)
                                   or poly_sides < 3):
        raise GenRefocusInputError(f"poly_sides must be None or an integer >= 3, got {poly_sides!r}")

    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    img = image.to(dtype)
    b, _, h, w = img.shape
    disp = disparity.to(dtype).expand(b, 1, h, w)
    if highlight:
        # parity: BokehMe demo.py --highlight (threshold 220/255, ratio 0.4), before the power
        out_of_focus = torch.tanh(200.0 * ((disp - disp_focus) ** 2 - 0.01)).clamp(0.0, 1.0)
        bright = torch.tanh(10.0 * (img - 220.0 / 255.0)).clamp(0.0, 1.0)
        img = img * (1.0 + 0.4 * out_of_focus * bright)
    src = img.pow(gamma).permute(1, 0, 2, 3).reshape(3, -1)
    # parity: demo.py hands the classical renderer (K (d - d_f) / 10) * 10 (its networks' unit change).
    defocus = (k * (disp - disp_focus) / 10.0 * 10.0).reshape(-1)

    cum_c = torch.zeros(3, b * h * w, dtype=dtype, device=img.device)
    cum_w = torch.zeros(b * h * w, dtype=dtype, device=img.device)
    bi, yi, xi = torch.meshgrid(torch.arange(b, device=img.device), torch.arange(h, device=img.device),
                                torch.arange(w, device=img.device), indexing="ij")
    bi, yi, xi = bi.reshape(-1), yi.reshape(-1), xi.reshape(-1)
    radius_all = defocus.abs()
    half_all = torch.floor(radius_all).long() + 1
    for half in torch.unique(half_all).tolist():
        sel = torch.nonzero(half_all == half).squeeze(1)
        radius = radius_all[sel]
        denom = radius * radius + 0.2
        colour = src[:, sel]
        sb, sy, sx = bi[sel], yi[sel], xi[sel]
        for dy in range(-half, half + 1):
            ty = sy + dy
            for dx in range(-half, half + 1):
                tx = sx + dx
                inside = (ty >= 0) & (ty < h) & (tx >= 0) & (tx < w)
                dist = math.sqrt(float(dy * dy + dx * dx))
                rho = radius if poly_sides is None else _polygon_rho(radius, dy, dx, poly_sides, init_angle)
                weight = (0.5 + 0.5 * torch.tanh(4.0 * (rho - dist))) / denom
                weight = torch.where(inside, weight, torch.zeros_like(weight))
                target = (sb * h + ty.clamp(0, h - 1)) * w + tx.clamp(0, w - 1)
                cum_w.index_add_(0, target, weight)
                cum_c.index_add_(1, target, colour * weight)
    bokeh = (cum_c / cum_w).view(3, b, h, w).permute(1, 0, 2, 3)
    return bokeh.pow(1.0 / gamma).clamp(0.0, 1.0).to(image.dtype)
