"""Layers of the "physical" renderer: decomposition and blur of one layer.

Private helper of :mod:`genrefocus_core._render_physical` (see its module docstring for the
model). :func:`prepare` turns one image into layers of signed blur radius ``lambda``;
:func:`layer_tiles` returns a full-resolution layer blurred, as 64-px tiles, and
:func:`layer_window` a coarse layer blurred on its ``1/s`` grid, as one window. The surface
hidden behind a layer's occluders comes from :mod:`._hidden_surface`.

Work is sparse: a layer's content is computed on the full-resolution tiles that hold its pixels
or the surface hidden behind its occluders (the layers of real depth maps are thin bands along
depth contours); full-resolution layers are also blurred tile by tile (overlap-add FFT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._hidden_surface import box, dilate, fill_fields
from .aperture import Aperture, aperture_kernel

#: Radii (px) of the first layers after 0; geometric growth by :data:`RATIO` after the last one.
FINE = (0.5, 1.0, 2.0)
RATIO = 1.3
#: A layer of radius ``r >= 2 r0`` is blurred at ``1/s`` resolution, ``s = 2^floor(log2(r / r0))``,
#: so its kernel spans 4..8 px there (8..16 px for shaped apertures, to keep their outline).
R0 = 4.0
R0_SHAPED = 8.0
#: Tile side (px) of the sparse work and of the accumulators.
TILE = 64


# ----------------------------------------------------------------------------------------------
# Radii, levels, kernels
# ----------------------------------------------------------------------------------------------


def fine_radii(pixels: int) -> tuple[float, ...]:
    """First layer radii: 0.5 px (still sharp) is dropped above ~2 MP, where it is negligible."""
    return FINE if pixels <= 2_000_000 else FINE[1:]


def magnitudes(limit: float, fine: tuple[float, ...] = FINE) -> list[float]:
    """Layer radii 0, ``fine``..., then x``RATIO`` per step, up to the first one >= ``limit``."""
    mags = [0.0]
    while mags[-1] < limit:
        mags.append(fine[len(mags) - 1] if len(mags) <= len(fine) else mags[-1] * RATIO)
    return mags


def layer_radii(c_min: float, c_max: float, fine: tuple[float, ...] = FINE) -> list[float]:
    """Signed layer radii, descending (front to back), covering ``[c_min, c_max]``."""
    pos = magnitudes(c_max, fine) if c_max > 0 else [0.0]
    neg = magnitudes(-c_min, fine) if c_min < 0 else [0.0]
    return [*reversed(pos), *(-m for m in neg[1:])]


def level(radius: float, r0: float) -> int:
    """Downsampling factor of a layer of blur radius ``radius`` (px)."""
    if radius < 2.0 * r0:
        return 1
    return 2 ** math.floor(math.log2(radius / r0))


def _nice(n: int) -> int:
    """A fast FFT length >= ``n``: ``m * 2^k`` with ``m`` in 1, 3, 5, 7, 9 (odd lengths are slow)."""
    return min(m << max(0, math.ceil(math.log2(n / m))) for m in (1, 3, 5, 7, 9))


class Kernels:
    """Aperture kernels and their spectra for one render (cached per radius, level and FFT size)."""

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
            spec = torch.fft.fft2(torch.roll(pad, shifts=(-(n // 2), -(n // 2)), dims=(0, 1)))
            self._f[key] = spec
        return spec


def _convolve(x: Tensor, lam: float, s: int, kernels: Kernels) -> Tensor:
    """Linear convolution of ``x`` ``(..., C, h, w)`` with ``K(lam)``; each side grows by its half-size."""
    h, w = x.shape[-2:]
    r = kernels.half(lam, s)
    if r == 0:
        return x
    if r == 1:  # 3x3: nine shifted multiply-adds beat an FFT
        k = kernels.kernel(lam, s).tolist()
        out = x.new_zeros(*x.shape[:-2], h + 2, w + 2)
        for i in range(3):
            for j in range(3):
                if k[i][j] != 0.0:
                    out[..., i:i + h, j:j + w].add_(x, alpha=k[i][j])
        return out
    # the kernel is real: two real channels ride in one complex one (real and imaginary parts
    # do not mix), and complex FFTs both ways beat real-to-complex plus its slow inverse
    fh, fw = _nice(h + 2 * r), _nice(w + 2 * r)
    lead, c = x.shape[:-3], x.shape[-3]
    buf = torch.zeros(*lead, c // 2, fh, fw, 2, dtype=x.dtype, device=x.device)
    buf[..., r:r + h, r:r + w, :] = x.unflatten(-3, (c // 2, 2)).movedim(-3, -1)
    spec = torch.fft.fft2(torch.view_as_complex(buf))
    spec *= kernels.spectrum(lam, s, fh, fw)
    out = torch.view_as_real(torch.fft.ifft2(spec))[..., :h + 2 * r, :w + 2 * r, :]
    out = out.movedim(-1, -3).flatten(-4, -3)
    # FFT round-off spreads ~eps * max everywhere; where nothing was blurred it must stay zero
    # (a dark in-focus pixel raised to 1/gamma would show it). Layer content is non-negative, so
    # is its blur: anything below the round-off level, negative values included, is zero.
    tol = 16.0 * torch.finfo(x.dtype).eps * max(float(x.amax()), -float(x.amin()))
    return F.threshold_(out, tol, 0.0)


# ----------------------------------------------------------------------------------------------
# Frame: per-image decomposition
# ----------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """One image split into layers, padded to whole tiles (the padding holds no surface).

    A pixel between layers ``beta`` and ``beta + 1`` (its *bin*) belongs to layer ``beta`` with
    share ``t`` and to ``beta + 1`` with ``u = 1 - t``. Tiles carry its position ``q = beta + u`` on
    the layer axis instead: its share in layer ``l`` is the tent ``max(0, 1 - |q - l|)``.
    """

    lin: Tensor  # (3, H, W) linear colour
    beta: Tensor  # (H, W) int16 bin; nb + 1 in the padding (nb = len(radii) - 1 bins)
    tile_data: Tensor  # (H W / TILE^2, 4, TILE, TILE): q and the colour, tile-major (row-major tiles)
    radii: list[float]  # signed layer radii, descending
    r0: float
    boxes: list[tuple[int, int, int, int] | None]  # per bin: bounding box (y0, y1, x0, x1) or None
    presence: Tensor  # (nb, H / TILE, W / TILE) bool: bin has pixels in the full-resolution tile
    below: Tensor  # (nb, H / TILE, W / TILE) bool: a bin <= this one has pixels in the tile
    c_max: float
    height: int
    width: int
    fill_cell: int  # px per cell of the hidden-surface grid at full resolution (2 up to ~2 MP, then more)


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


def _tile_presence(beta: Tensor, nb: int) -> Tensor:
    """``(nb, H / TILE, W / TILE)``: which bins have pixels in each tile (``H``, ``W`` multiples of TILE)."""
    h, w = beta.shape
    ny, nx = h // TILE, w // TILE
    tile = (torch.arange(h, device=beta.device) // TILE).view(h, 1) * nx + (
        torch.arange(w, device=beta.device) // TILE).view(1, w)
    flat = torch.zeros(ny * nx * (nb + 1), dtype=torch.bool, device=beta.device)
    flat[(tile * (nb + 1) + beta.clamp(max=nb).long()).flatten()] = True
    return flat.view(ny, nx, nb + 1)[..., :nb].permute(2, 0, 1)


def prepare(lin: Tensor, coc: Tensor, r0: float) -> Frame:
    """Split an image (linear colour ``(3, H, W)``, signed CoC ``(H, W)``) into layers."""
    c_min, c_max = float(coc.amin()), float(coc.amax())
    radii = layer_radii(c_min, c_max, fine_radii(coc.numel()))
    nb = len(radii) - 1
    asc = torch.tensor(radii[::-1], dtype=coc.dtype, device=coc.device)
    i = torch.bucketize(coc, asc).clamp_(1, nb)  # asc[i-1] < c <= asc[i]
    lower, upper = asc[i - 1], asc[i]
    t = ((coc - lower) / (upper - lower)).clamp_(0.0, 1.0)
    beta = nb - i  # bin index in descending order: between radii[beta] and radii[beta + 1]
    boxes = _bin_boxes(beta, nb)
    h, w = coc.shape
    # the hidden-surface grid scales with the image, so that its guess does not depend on resolution
    fill_cell = 2 * 2 ** max(0, round(math.log2(max(h, w) / 1024)))
    grid = max(2 * TILE, fill_cell * max(level(abs(r), r0) for r in radii))
    hp, wp = -(-h // grid) * grid, -(-w // grid) * grid
    if (hp, wp) != (h, w):
        lin = F.pad(lin, (0, wp - w, 0, hp - h))
        t = F.pad(t, (0, wp - w, 0, hp - h))
        beta = F.pad(beta, (0, wp - w, 0, hp - h), value=nb + 1)
    presence = _tile_presence(beta, nb)
    below = presence.cummax(dim=0).values
    ny, nx = hp // TILE, wp // TILE
    # position on the layer axis; the padding sits at nb + 2, beyond every layer
    data = torch.cat([(1.0 - t).add_(beta)[None], lin])
    tile_data = data.view(4, ny, TILE, nx, TILE).permute(1, 3, 0, 2, 4).reshape(ny * nx, 4, TILE, TILE)
    return Frame(lin, beta.to(torch.int16), tile_data, radii, r0, boxes, presence, below,
                 max(c_max, 0.0), h, w, fill_cell)


def _occluder_share(q: Tensor, index: int, nb: int, out: Tensor) -> None:
    """Channels 4 and 5 of :func:`_content` into ``out`` ``(..., 2, h, w)``.

    A pixel at ``q <= index - 2`` lies in layers at least two nearer than ``index`` (they occlude
    it), between ``index - 2`` and ``index - 1`` partly (share ``index - 1 - q``); the padding
    beyond the image sits at ``nb + 2``.
    """
    occ = out[..., 0, :, :]
    occ.copy_(q).sub_(index - 1.0).neg_().clamp_(0.0, 1.0)
    out[..., 1, :, :] = q > nb + 1


def _content(q: Tensor, lin: Tensor, index: int, occluded: bool, nb: int) -> Tensor:
    """Layer content at full resolution: premultiplied RGBA (channels 0-3).

    With ``occluded``, two more channels: the pixels' share in layers at least two layers nearer
    (they occlude this one) and the padding beyond the image. Shapes: ``q`` (positions on the
    layer axis, see :class:`Frame`) ``(..., h, w)``, ``lin`` ``(..., 3, h, w)``; returns
    ``(..., 4 or 6, h, w)``.
    """
    x = lin.new_empty(*lin.shape[:-3], 6 if occluded else 4, *lin.shape[-2:])
    share = x[..., 3, :, :]
    torch.sub(q, float(index), out=share).abs_().neg_().add_(1.0).clamp_(min=0.0)  # the tent
    torch.mul(lin, share.unsqueeze(-3), out=x[..., :3, :, :])
    if occluded:
        _occluder_share(q, index, nb, x[..., 4:6, :, :])
    return x


def _own_tiles(frame: Frame, index: int) -> Tensor:
    """Full-resolution tiles that hold pixels of layer ``index`` (bins ``index - 1`` and ``index``)."""
    nb = len(frame.radii) - 1
    own = torch.zeros_like(frame.presence[0])
    for b in (index - 1, index):
        if 0 <= b < nb and frame.boxes[b] is not None:
            own |= frame.presence[b]
    return own


def _reach(frame: Frame, index: int, kernels: Kernels, own: Tensor) -> int:
    """Distance (px) from a layer's pixels up to which a hidden surface behind its occluders is seen.

    A ray sees a point hidden ``d`` px behind an occluder of blur ``r_o`` if ``d <= r_o + |lambda|``
    (about, scaled by the aperture's extent). ``r_o`` is the largest blur among the occluders near
    the layer's tiles (refined twice from the image-wide maximum); 0 when nothing occludes it.
    """
    if index < 2:
        return 0
    lam = abs(frame.radii[index])
    blur = [max(abs(frame.radii[b]), abs(frame.radii[b + 1])) for b in range(index - 1)]
    reach = math.ceil((max(frame.c_max, lam) + lam) * kernels.extent) + 2
    for _ in range(3):
        region = dilate(own, reach / TILE)
        present = (frame.presence[:index - 1] & region).flatten(1).any(dim=1).tolist()
        worst = max((r for r, p in zip(blur, present, strict=True) if p), default=None)
        if worst is None:
            return 0
        refined = math.ceil((worst + lam) * kernels.extent) + 2
        if refined >= reach:
            break
        reach = refined
    return reach


# ----------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------


def layer_tiles(frame: Frame, index: int, kernels: Kernels) -> tuple[Tensor, Tensor] | None:
    """Blurred premultiplied RGBA of full-resolution layer ``index``.

    The layer holds its share of the pixels on either side of it (tent weights) and, behind
    pixels at least two layers nearer (its occluders), an extrapolated hidden surface.

    Returns:
        ``(slots, tiles)``: indices ``(n,)`` into the frame's full-resolution ``TILE`` grid
        (row-major) and the layer's content there, ``(n, 4, TILE, TILE)``; ``None`` if empty.
    """
    if 2 * kernels.half(frame.radii[index], 1) <= TILE:
        return _layer_tiled(frame, index, kernels)
    placed = layer_window(frame, index, 1, kernels)
    return None if placed is None else window_to_tiles(placed[1], *placed[0], frame)


def window_to_tiles(window: Tensor, cy: int, cx: int, frame: Frame,
                    key: int | slice = 3) -> tuple[Tensor, Tensor] | None:
    """Cut a full-resolution window ``(C, h, w)`` (top-left ``cy``, ``cx``) into the frame's tiles.

    Tiles where channel(s) ``key`` are zero everywhere are dropped. Returns
    ``(slots, (n, C, TILE, TILE))`` or ``None``. A window already on the tile grid is cut without
    a copy of the whole window.
    """
    hp, wp = frame.beta.shape
    c, h, w = window.shape
    ya, xa, yb, xb = max(0, cy), max(0, cx), min(hp, cy + h), min(wp, cx + w)
    if ya >= yb or xa >= xb:
        return None
    ty0, tx0 = ya // TILE, xa // TILE
    ty1, tx1 = -(-yb // TILE), -(-xb // TILE)
    if (ya, xa, yb, xb) == (cy, cx, cy + h, cx + w) and cy % TILE == 0 and cx % TILE == 0 \
            and h % TILE == 0 and w % TILE == 0:
        buf = window
    else:
        buf = window.new_zeros(c, (ty1 - ty0) * TILE, (tx1 - tx0) * TILE)
        oy, ox = ty0 * TILE, tx0 * TILE
        buf[:, ya - oy:yb - oy, xa - ox:xb - ox] = window[:, ya - cy:yb - cy, xa - cx:xb - cx]
    tiles = buf.view(c, ty1 - ty0, TILE, tx1 - tx0, TILE).permute(1, 3, 0, 2, 4)
    sel = tiles[:, :, key]
    keep = torch.nonzero(sel.flatten(2).amax(dim=2) > 0)
    if len(keep) == 0:
        return None
    slots = (keep[:, 0] + ty0) * (wp // TILE) + keep[:, 1] + tx0
    return slots, tiles[keep[:, 0], keep[:, 1]]


def upsampled_tiles(coarse: Tensor, s: int, cy: int, cx: int, frame: Frame,
                    key: int | slice = 3) -> tuple[Tensor, Tensor] | None:
    """Bilinear ``x s`` upsampling of a level-``s`` window, produced directly as full-resolution tiles.

    ``coarse`` ``(C, h, w)`` has its top-left cell at ``(cy, cx)`` of the level-``s`` grid; the
    window must cover whole tiles (``cy``, ``cx``, ``h``, ``w`` multiples of ``TILE / s``) unless
    ``s > TILE``. Equal to ``F.interpolate(coarse, scale_factor=s, mode="bilinear")`` (edges
    clamped) cut by :func:`window_to_tiles`, without the full-resolution window: each tile is
    interpolated from its cells and a one-cell halo (the source positions, and so the weights, are
    the same). Tiles where channel(s) ``key`` are zero on all their cells are dropped.
    """
    if s > TILE:
        up = F.interpolate(coarse[None], scale_factor=s, mode="bilinear", align_corners=False)[0]
        return window_to_tiles(up, cy * s, cx * s, frame, key=key)
    a = TILE // s  # cells per tile side
    c, h, w = coarse.shape
    ny_w, nx_w = h // a, w // a
    padded = F.pad(coarse[None], (1, 1, 1, 1), mode="replicate")[0]  # clamped edges, as interpolate's
    hh, ww = padded.shape[-2:]
    windows = padded.as_strided((ny_w, nx_w, c, a + 2, a + 2), (a * ww, a, hh * ww, ww, 1))
    live = windows[:, :, key].flatten(2).amax(dim=2) > 0
    ky, kx = torch.nonzero(live, as_tuple=True)
    if len(ky) == 0:
        return None
    up = F.interpolate(windows[ky, kx], scale_factor=s, mode="bilinear", align_corners=False)
    nx = frame.beta.shape[1] // TILE
    return (cy // a + ky) * nx + cx // a + kx, up[:, :, s:s + TILE, s:s + TILE]


def _support(frame: Frame, index: int, kernels: Kernels) -> tuple[Tensor, Tensor, Tensor, int, bool] | None:
    """Full-resolution tiles of layer ``index``: those holding its pixels or its hidden surface.

    Returns ``(ty, tx, content, reach, occluded)``: tile rows and columns ``(n,)``, the layer's
    content there (:func:`_tile_content`), the reach of its hidden surface in px and whether
    anything occludes it; ``None`` if the layer is empty.
    """
    own = _own_tiles(frame, index)
    if not bool(own.any()):
        return None
    reach = _reach(frame, index, kernels, own)
    near = dilate(own, reach / TILE) & frame.below[index - 2] if reach > 0 else torch.zeros_like(own)
    occluded = bool(near.any())
    ty, tx = torch.nonzero(own | near, as_tuple=True)
    content = _tile_content(frame, ty * own.shape[1] + tx, index, occluded, own[ty, tx])
    return ty, tx, content, reach, occluded


def layer_window(frame: Frame, index: int, s: int, kernels: Kernels) -> tuple[tuple[int, int], Tensor] | None:
    """Blurred premultiplied RGBA of layer ``index`` on one window of the level-``s`` grid.

    The layer's content is computed at full resolution on the tiles that hold its pixels (or the
    surface hidden behind its occluders) and averaged down; the hidden surface and the blur are
    then computed on one window of the level-``s`` grid. Returns ``((top, left), (4, h, w))`` in
    cells of that grid (the window may reach past the image by the kernel's half-size), or
    ``None`` if empty.
    """
    support = _support(frame, index, kernels)
    if support is None:
        return None
    ty, tx, x, reach, occluded = support
    q = max(1, frame.fill_cell // s)  # hidden-surface cells, in cells of this grid
    k = max(1, (q * s) // TILE)  # the window spans whole hidden-surface cells
    y0, x0 = int(ty.min()) // k * k, int(tx.min()) // k * k
    nyw, nxw = -(-(int(ty.max()) + 1 - y0) // k) * k, -(-(int(tx.max()) + 1 - x0) // k) * k
    first = min(s, TILE)  # within the tiles first (less to scatter), then the rest on the window
    x = _scatter_tiles(box(x, first), (ty - y0) * nxw + (tx - x0), nyw, nxw)
    x = box(x, s // first)
    wy0, wx0 = y0 * TILE // s, x0 * TILE // s  # top-left cell of the window
    if occluded and float(x[4].amax()) > 0.0:
        part = fill_fields(box(x, q), reach / (q * s))
        if q > 1:
            part = F.interpolate(part[None], scale_factor=q, mode="bilinear", align_corners=False)[0]
        hidden = x[4:5] * part[3:4]
        x[:3].addcmul_(part[:3], hidden)
        x[3:4] += hidden
    x = x[:4]
    alpha_any = x[3] > 0
    ys = torch.nonzero(alpha_any.any(dim=1)).flatten()
    if len(ys) == 0:
        return None
    xs = torch.nonzero(alpha_any.any(dim=0)).flatten()
    cy0, cy1 = int(ys[0]), int(ys[-1]) + 1
    cx0, cx1 = int(xs[0]), int(xs[-1]) + 1
    r = kernels.half(frame.radii[index], s)
    rgba = _convolve(x[:, cy0:cy1, cx0:cx1], frame.radii[index], s, kernels)
    return (wy0 + cy0 - r, wx0 + cx0 - r), rgba


def _tile_content(frame: Frame, flat: Tensor, index: int, occluded: bool, own: Tensor) -> Tensor:
    """:func:`_content` of the full-resolution tiles ``flat`` (row-major tile indices).

    ``own`` ``(n,)`` bool marks the tiles that may hold the layer's pixels; the others (tiles
    only near the layer, for its hidden surface) get zero colour and alpha without computing them.
    """
    nb = len(frame.radii) - 1
    if bool(own.all()):
        data = frame.tile_data.index_select(0, flat)
        return _content(data[:, 0], data[:, 1:], index, occluded, nb)
    x = frame.tile_data.new_empty(len(flat), 6, TILE, TILE)
    mine = torch.nonzero(own).flatten()
    if len(mine):
        data = frame.tile_data.index_select(0, flat[mine])
        x.index_copy_(0, mine, _content(data[:, 0], data[:, 1:], index, True, nb))
    rest = torch.nonzero(~own).flatten()
    part = x.new_zeros(len(rest), 6, TILE, TILE)
    _occluder_share(frame.tile_data[:, 0].index_select(0, flat[rest]), index, nb, part[:, 4:6])
    x.index_copy_(0, rest, part)
    return x


def _layer_tiled(frame: Frame, index: int, kernels: Kernels) -> tuple[Tensor, Tensor] | None:
    """:func:`layer_tiles` at full resolution, on the tiles that hold the layer or its hidden surface."""
    lam = frame.radii[index]
    support = _support(frame, index, kernels)
    if support is None:
        return None
    ty, tx, x, reach, occluded = support
    ny, nx = frame.presence.shape[1:]
    if occluded and float(x[:, 4].amax()) > 0.0:
        y0, x0 = int(ty.min()), int(tx.min())
        _hidden_tiles(x, ty - y0, tx - x0, int(ty.max()) + 1 - y0, int(tx.max()) + 1 - x0, reach,
                      frame.fill_cell)
        # tiles behind a continuous surface get no hidden surface: nothing to blur there
        keep = torch.nonzero(x[:, 3].flatten(1).amax(dim=1) > 1e-3).flatten()
        if len(keep) < len(ty):
            x, ty, tx = x[keep], ty[keep], tx[keep]
    r = kernels.half(lam, 1)
    parts = _convolve(x[:, :4], lam, 1, kernels)  # (n, 4, T + 2r, T + 2r)
    if r == 0:
        return ty * nx + tx, parts
    # spread each patch over the 3 x 3 tiles around its own: body, edges and corners
    grid = torch.full((ny + 2, nx + 2), -1, dtype=torch.long, device=x.device)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            grid[ty + 1 + dy, tx + 1 + dx] = 0
    out_pos = torch.nonzero(grid >= 0)
    grid[out_pos[:, 0], out_pos[:, 1]] = torch.arange(len(out_pos), device=x.device)
    out = x.new_zeros(len(out_pos), 4, TILE, TILE)
    # the bodies first, copied onto their own (still empty) tiles; then the 2r-wide rims
    body = slice(r, TILE + r)
    out.index_copy_(0, grid[ty + 1, tx + 1], parts[:, :, body, body])
    pieces = ((-1, slice(0, r), slice(TILE - r, TILE)), (0, body, slice(0, TILE)),
              (1, slice(TILE + r, TILE + 2 * r), slice(0, r)))
    for dy, src_y, dst_y in pieces:
        for dx, src_x, dst_x in pieces:
            if dy == dx == 0:
                continue
            # one target per patch and pass (distinct indices): deterministic on every device, and
            # a gather-add-scatter beats index_add_ into a strided view on CPU
            out[grid[ty + 1 + dy, tx + 1 + dx], :, dst_y, dst_x] += parts[:, :, src_y, src_x]
    gy, gx = out_pos[:, 0] - 1, out_pos[:, 1] - 1
    inside = (gy >= 0) & (gy < ny) & (gx >= 0) & (gx < nx)
    return (gy * nx + gx)[inside], out[inside]


def _scatter_tiles(tiles: Tensor, flat: Tensor, nyw: int, nxw: int) -> Tensor:
    """Place tiles ``(n, C, t, t)`` at ``flat`` of an ``nyw x nxw`` grid: ``(C, nyw t, nxw t)``."""
    c, t = tiles.shape[1], tiles.shape[2]
    grid = tiles.new_zeros(nyw * nxw, c, t, t).index_copy_(0, flat, tiles)
    return grid.view(nyw, nxw, c, t, t).permute(2, 0, 3, 1, 4).reshape(c, nyw * t, nxw * t)


def _hidden_tiles(x: Tensor, ry: Tensor, rx: Tensor, nyw: int, nxw: int, reach: float, q: int) -> None:
    """Add the hidden surface to tiled layer content ``x`` ``(n, 6, T, T)`` (see :func:`_content`) in place.

    The fill is computed on a dense grid ``q`` times coarser over the window of the tiles (tiles
    not given count as empty, unoccluded cells), then read back per tile with a one-cell halo.
    ``reach`` is in pixels.
    """
    cells = TILE // q
    flat = ry * nxw + rx
    canvas = _scatter_tiles(box(x, q), flat, nyw, nxw)  # (6, nyw T/q, nxw T/q)
    fields = fill_fields(canvas, reach / q)
    padded = F.pad(fields[None], (1, 1, 1, 1), mode="replicate")[0]
    # overlapping (T/q + 2)-cell windows, one per tile, as a view; gather the tiles given
    c, hh, ww = padded.shape
    windows = padded.as_strided((nyw, nxw, c, cells + 2, cells + 2), (cells * ww, cells, hh * ww, ww, 1))
    part = F.interpolate(windows[ry, rx], scale_factor=q, mode="bilinear", align_corners=False)
    part = part[:, :, q:q + TILE, q:q + TILE]
    hidden = x[:, 4:5] * part[:, 3:4]
    x[:, :3].addcmul_(part[:, :3], hidden)
    x[:, 3:4] += hidden
