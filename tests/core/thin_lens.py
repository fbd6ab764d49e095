"""Test-only reference: an exact thin-lens renderer for scenes of planes (ray averaging).

Geometry (pinhole-image coordinates, y down). A surface point seen by the pinhole at pixel ``x``
has a signed circle-of-confusion radius ``c`` (px, > 0 in front of the focal plane). The thin-lens
ray from output pixel ``p`` through the normalised aperture point ``u`` (``|u| <= 1``) meets that
surface at ``x = p + c u``. The output is the aperture average of the colour of the first
surface whose opacity stops the ray (soft opacities composite front to back along the ray).

* :class:`Scene`: fronto-parallel planes, each with a constant ``c``, a colour texture and an
  opacity map, stored with a margin around the frame so rays may leave it. Rays are traced on a
  dense grid of aperture points (spacing ``1 / (density * max|c|)``, so adjacent rays land
  ``1 / density`` px apart on the most blurred plane) and looked up at the nearest texel: the
  textures are piecewise constant, as the renderer assumes. Rays that hit the same texels on
  every plane are merged, which makes the trace cheap.
* :func:`trace_tilted`: one tilted plane ``c(x) = a + g * y`` (a disparity ramp), traced per pixel
  with the exact ray-plane intersection ``c = (a + g p_y) / (1 - g u_y)``.

Both also give what a camera focused at infinity with a pinhole would record: the all-in-focus
image and the per-pixel ``c`` of the first surface (opacity >= 1/2), the renderer's inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def disc_samples(spacing: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """Aperture points ``(N, 2)`` as ``(u_y, u_x)`` on a square grid of ``spacing`` in the unit disc."""
    n = math.ceil(1.0 / spacing)
    g = torch.arange(-n, n + 1, dtype=dtype) * spacing
    uy, ux = torch.meshgrid(g, g, indexing="ij")
    inside = uy * uy + ux * ux <= 1.0
    return torch.stack([uy[inside], ux[inside]], dim=1)


@dataclass
class Plane:
    """A fronto-parallel plane: constant signed CoC ``coc``, ``colour`` ``(3, h, w)``, ``alpha`` ``(h, w)``.

    ``h = H + 2 * margin`` and ``w = W + 2 * margin`` for a frame of ``H x W`` pixels; texel
    ``(margin + i, margin + j)`` is seen by the pinhole at pixel ``(i, j)``.
    """

    coc: float
    colour: Tensor
    alpha: Tensor


@dataclass
class Scene:
    planes: list[Plane]
    margin: int

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.planes[0].alpha.shape
        return h - 2 * self.margin, w - 2 * self.margin

    def _ordered(self) -> list[Plane]:
        return sorted(self.planes, key=lambda p: -p.coc)

    def pinhole(self) -> tuple[Tensor, Tensor]:
        """All-in-focus image ``(3, H, W)`` and the CoC map ``(H, W)`` of the first surface."""
        h, w = self.size
        m = self.margin
        colour = torch.zeros(3, h, w, dtype=self.planes[0].colour.dtype)
        trans = torch.ones(h, w, dtype=colour.dtype)
        coc = torch.full((h, w), float("nan"), dtype=colour.dtype)
        for p in self._ordered():
            a = p.alpha[m:m + h, m:m + w]
            colour += trans * a * p.colour[:, m:m + h, m:m + w]
            coc = torch.where(torch.isnan(coc) & (a >= 0.5), torch.full_like(coc, p.coc), coc)
            trans = trans * (1.0 - a)
        last = self._ordered()[-1].coc
        return colour, torch.nan_to_num(coc, nan=last)

    def trace(self, density: float = 3.0) -> Tensor:
        """Thin-lens image ``(3, H, W)``, disc aperture, rays 1/density px apart at the largest blur."""
        h, w = self.size
        m = self.margin
        planes = self._ordered()
        cmax = max(abs(p.coc) for p in planes)
        if cmax == 0:
            return self.pinhole()[0]
        u = disc_samples(1.0 / (density * cmax))
        offs = torch.cat([torch.round(p.coc * u).long() for p in planes], dim=1)  # (N, 2 * planes)
        if int(offs.abs().max()) > m:
            raise ValueError(f"margin {m} is smaller than the largest ray offset {int(offs.abs().max())}")
        keys, inverse = torch.unique(offs, dim=0, return_inverse=True)
        weights = torch.zeros(len(keys), dtype=torch.float64).index_add_(
            0, inverse, torch.ones(len(u), dtype=torch.float64)) / len(u)
        out = torch.zeros(3, h, w, dtype=planes[0].colour.dtype)
        rows = torch.arange(h).view(1, h, 1) + m
        cols = torch.arange(w).view(1, 1, w) + m
        for key, wt in zip(keys.split(64), weights.split(64), strict=True):  # 64 ray bundles at a time
            colour = torch.zeros(3, len(key), h, w, dtype=out.dtype)
            trans = torch.ones(len(key), h, w, dtype=out.dtype)
            for i, p in enumerate(planes):
                iy = rows + key[:, 2 * i].view(-1, 1, 1)
                ix = cols + key[:, 2 * i + 1].view(-1, 1, 1)
                a = p.alpha[iy, ix]
                colour += trans * a * p.colour[:, iy, ix]
                trans = trans * (1.0 - a)
            out += (colour * wt.to(out.dtype).view(1, -1, 1, 1)).sum(dim=1)
        return out


def trace_tilted(texture: Tensor, a: float, g: float, margin: int,
                 density: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    """Thin-lens image of one tilted plane with CoC ``c(y) = a + g * y`` at pinhole pixel row ``y``.

    Args:
        texture: ``(3, H + 2 margin, W + 2 margin)`` colour of the plane as the pinhole sees it.
        a, g: CoC (px) at row 0 and its change per row; ``|g| < 1``.
        margin: texels around the frame.
        density: rays per px on the blurriest part of the plane.

    Returns:
        ``(thin_lens, all_in_focus, coc)``: ``(3, H, W)``, ``(3, H, W)``, ``(H, W)``.
    """
    h, w = texture.shape[1] - 2 * margin, texture.shape[2] - 2 * margin
    ys = torch.arange(h, dtype=torch.float64)
    coc_rows = a + g * ys
    cmax = float(coc_rows.abs().max()) / (1.0 - abs(g))
    u = disc_samples(1.0 / (density * max(cmax, 1e-9)))
    flat = texture.reshape(3, -1)
    wt = texture.shape[2]
    py = ys.view(1, h, 1)
    px = torch.arange(w, dtype=torch.float64).view(1, 1, w)
    out = torch.zeros(3, h, w, dtype=torch.float64)
    for chunk in u.split(256):
        uy, ux = chunk[:, 0].view(-1, 1, 1), chunk[:, 1].view(-1, 1, 1)
        c = (a + g * py) / (1.0 - g * uy)
        iy = torch.round(py + c * uy).long() + margin
        ix = torch.round(px + c * ux).long() + margin
        if int(iy.min()) < 0 or int(ix.min()) < 0 or int(iy.max()) >= texture.shape[1] or int(ix.max()) >= wt:
            raise ValueError("margin too small for the ray offsets")
        idx = (iy * wt + ix).reshape(-1)
        out += flat[:, idx].reshape(3, len(chunk), h, w).to(torch.float64).sum(dim=1)
    out /= len(u)
    aif = texture[:, margin:margin + h, margin:margin + w]
    return out.to(texture.dtype), aif, coc_rows.view(h, 1).expand(h, w).to(texture.dtype)
