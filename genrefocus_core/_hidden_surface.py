"""Hidden-surface fill of the "physical" renderer: pull-push with harmonic relaxation.

Private helper of :mod:`genrefocus_core._physical_layers`. Behind its occluders a layer continues
with its own colours extrapolated and with the share of the hidden surface it had among the
nearby visible pixels; everything here works on small dense grids of cells.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Jacobi sweeps per pyramid level of the hidden-surface colour fill, from level RELAX_FROM on.
RELAX = 8
RELAX_FROM = 1




def box(x: Tensor, f: int) -> Tensor:
    """``f x f`` box average of ``(..., C, h, w)`` (``h``, ``w`` multiples of ``f``)."""
    if f == 1:
        return x
    if f == 2:  # four strided adds beat avg_pool2d's kernel at this factor on CPU
        out = (x[..., 0::2, 0::2] + x[..., 1::2, 0::2]).add_(x[..., 0::2, 1::2]).add_(x[..., 1::2, 1::2])
        return out.mul_(0.25)
    return F.avg_pool2d(x, f)


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
    """Jacobi sweeps of Laplace's equation: ``val = value + free * (mean of the 4 neighbours)``.

    The border is reflective (a missing neighbour counts as the cell itself).
    """
    if sweeps <= 0:
        return val
    quarter = free * 0.25
    for _ in range(sweeps):
        p = F.pad(val[None], (1, 1, 1, 1), mode="replicate")[0]
        nb = p[:, :-2, 1:-1] + p[:, 2:, 1:-1]
        nb += p[:, 1:-1, :-2]
        nb += p[:, 1:-1, 2:]
        val = torch.addcmul(value, quarter, nb)
    return val


def _pull_push(value: Tensor, weight: Tensor, relax: int = 0, relax_from: int = 1,
               groups: list[int] | None = None) -> Tensor:
    """Extrapolate ``value / weight`` everywhere (pull-push).

    ``value``: ``(C, h, w)`` premultiplied by its weight; ``weight``: ``(G, h, w)`` in [0, 1], channel
    ``c`` of ``value`` using ``weight[groups[c]]`` (default: ``G == 1`` or ``G == C``). Known cells
    keep their value; unknown ones take the weighted average of ever coarser neighbourhoods,
    blended in with bilinear weights. With ``relax > 0``, every level from ``relax_from`` (0 is the
    finest) then gets ``relax`` Jacobi sweeps of Laplace's equation over its holes: the fill tends
    to the harmonic one, which continues linear trends that plain pull-push flattens.
    """
    pick = None if groups is None else torch.tensor(groups, device=value.device)

    def per_channel(w: Tensor) -> Tensor:
        return w if pick is None else w.index_select(0, pick)

    levels = []
    c = value.shape[0]
    both = torch.cat([value, weight])  # halved together: one pass per level
    while max(both.shape[-2:]) > 1 and float(both[c:].amin()) <= 0.0:
        levels.append((both[:c], both[c:]))
        both = _halve(both)
    value, weight = both[:c], both[c:]
    weight = per_channel(weight)
    total = weight.sum(dim=(1, 2), keepdim=True)
    mean = value.sum(dim=(1, 2), keepdim=True) / total.clamp_min(1e-12)
    val = torch.where(weight > 0, value / weight.clamp_min(1e-12), mean)
    for depth, (value, weight) in enumerate(reversed(levels)):
        h, w = value.shape[-2:]
        up = F.interpolate(val[None], scale_factor=2, mode="bilinear", align_corners=False)[0, :, :h, :w]
        free = per_channel(1.0 - weight.clamp(0.0, 1.0))
        val = up.mul_(free).add_(value)
        if depth < len(levels) - relax_from:
            val = _relax(val, value, free, relax)
    return val


def dilate(mask: Tensor, radius: float) -> Tensor:
    """Binary ``(h, w)`` mask grown by at least ``radius`` cells (square), cheaply at a coarse grid."""
    if radius <= 0:
        return mask
    q = 1
    while radius / q > 4 and min(mask.shape) > 2 * q:
        q *= 2
    m = mask[None, None].to(torch.float32 if mask.device.type == "cpu" else torch.float16)
    if q > 1:
        m = F.max_pool2d(m, q, ceil_mode=True)
    k = math.ceil(radius / q) + (1 if q > 1 else 0)
    m = F.max_pool2d(m, 2 * k + 1, stride=1, padding=k)
    if q > 1:
        m = m.repeat_interleave(q, dim=2).repeat_interleave(q, dim=3)[..., :mask.shape[0], :mask.shape[1]]
    return m[0, 0] > 0


def fill_fields(coarse: Tensor, reach: float) -> Tensor:
    """Hidden-surface fields on a coarse grid: extrapolated colour and the hidden share.

    ``coarse``: ``(6, h, w)``, the layer's premultiplied RGBA, the fraction of each cell covered by
    its occluders and the fraction outside the image (unknown, like occluded cells). Behind the
    occluders the layer continues with its own colours extrapolated (pull-push with harmonic
    relaxation on its coarser levels) and with the share of the hidden surface it had among the
    nearby non-occluding pixels (1 behind a depth step, 0 behind a continuous depth ramp), up to
    ``reach`` cells from its own pixels. Returns ``(4, h, w)``: colour and share.
    """
    alpha, occ, outside = coarse[3:4], coarse[4:5], coarse[5:6]
    known = (1.0 - occ - outside).clamp_(0.0, 1.0)
    fields = _pull_push(coarse[:4], torch.cat([alpha, known]), relax=RELAX, relax_from=RELAX_FROM,
                        groups=[0, 0, 0, 1])
    fields[3:4].clamp_(0.0, 1.0).mul_(dilate(alpha[0] > 0, reach))
    return fields
