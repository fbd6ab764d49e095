"""Mode ``"bokehme"`` of the classical renderer: BokehMe's scatter renderer, fast and deterministic.

Reproduces the classical half of BokehMe (Peng et al., CVPR 2022; ``JuewenPeng/BokehMe`` at 8b3ed55,
``classical_renderer/scatter.py``, ``scatter_ex.py``, ``demo.py``) as specified in
``docs/renderer.md`` §1, in plain PyTorch on any device:

* signed radius ``D = k * (d - d_f)`` px, ``r = |D|``; every source pixel spreads over the square
  window of half-size ``floor(r) + 1`` with weight
  ``w = (0.5 + 0.5 * tanh(4 * (rho - delta))) / (r**2 + 0.2)``, where ``delta`` is the tap's
  distance and ``rho = r`` (disc) or ``rho = r * polygon_radial(angle)`` (n-gon, circumscribed,
  no area correction);
* output ``(sum w * I**gamma / sum w) ** (1 / gamma)``, clamped to [0, 1]; optional highlight boost
  before the power.

Algorithm (the brute-force scatter's result, a fraction of its work, no per-pixel Python loop):

1. Sources are sorted by radius bin (bins of ``1/16`` px; a stable sort, so pixels inside a bin
   stay in raster order and the scatters below stay cache friendly).
2. For every window offset ``(dy, dx)`` the sources that need an explicit tap there form one
   contiguous run of bins: their window contains the offset (``r >= max(|dy|, |dx|) - 1``, exact,
   as integers are bin edges) and their weight at that distance is neither saturated nor
   negligible. Their weighted values go to the shifted targets with one ``index_add_`` per offset
   into padded accumulators (no bounds tests; the padding is cropped, as BokehMe skips taps
   outside the image). Within one call no two sources hit the same target, so the result does not
   depend on the order of additions, on CUDA as well. The eight mirror images of a disc offset
   share their weights (computed once). Offsets whose sources fill much of the image (the small
   ones, which every window reaches) are cheaper as masked whole-row shifted adds, in strips of
   rows that stay in cache; a cost model picks one of the two per offset group.
3. For ``r >= 5`` px, where ``rho - delta >= 1.5`` px the tanh edge has saturated (weight within
   ``6e-6`` of the constant ``1 / (r**2 + 0.2)``; a bias that scales a source's C and W alike):
   that *interior* is added as per-row spans, start and end marks in a float64 difference buffer
   that one prefix sum along the rows turns into the spans, ``O(r)`` per source instead of
   ``O(r**2)``. Taps with ``rho - delta < -2`` px weigh less than ``1.1e-7`` of a full tap and are
   skipped (BokehMe's float32 ``tanhf`` rounds them to 0 from about 2.25 px). Only a ring about
   3.5 px wide around each disc edge is computed tap by tap. float64 inputs use 4.6 px margins
   (errors below 1e-16).

Accuracy: against a float64 brute-force scatter, the float32 result is off by ~7e-8 on average
(the float32 brute force by ~2e-6: it accumulates 10^3 taps per pixel in float32). Work is about
``7 pi r`` taps plus ``4 r`` span marks per source (BokehMe: ``(2r + 3)**2`` taps); memory
``O(HW)``. On CPU the scattered taps run in chunks below torch's intra-op grain on
``min(4, torch.get_num_threads())`` Python threads, each with its own accumulator, summed in a
fixed order: no OpenMP barrier per small op (which stalls when other processes share the cores),
and bitwise reproducible for a given thread count.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ._checks import check_bchw, check_finite
from .aperture import Aperture, polygon_radial
from .errors import GenRefocusInputError

__all__ = ["bokehme_disparity", "bokehme_init_angle", "highlight_boost", "render_bokehme"]

logger = logging.getLogger(__name__)

# BokehMe demo.py's unit change between its networks and the classical renderer.
_DEFOCUS_SCALE = 10.0

#: BokehMe's demo highlight rule (``--highlight``): threshold and gain.
HIGHLIGHT_THRESHOLD = 220.0 / 255.0
HIGHLIGHT_RATIO = 0.4

# Radius bins per pixel; a power of two so that integer radii are exact bin edges.
_BINS_PER_PX = 16
# Saturation margins (px) in float32. Interior: 0.5 + 0.5 tanh(4 m) = 1 - e^(-8 m), within 6e-6 of 1
# for m = 1.5 (a bias that scales C and W alike). Outside: taps with rho - delta < -2 weigh < 1.1e-7
# of a full tap and are skipped (BokehMe's float32 tanh rounds to exactly -1 from about 2.25 px).
# float64 uses 4.6 px on both sides (e^(-36.8) < 1e-16).
_MARGIN_IN_F32 = 1.5
_MARGIN_OUT_F32 = 2.0
_MARGIN_F64 = 4.6
# Sources per task of the CPU tap loop: below torch's intra-op grain (32768 elements for the
# 4-channel product), so the small ops run serially inside each worker thread.
_CPU_CHUNK = 8000
# Rough CPU costs (ns) that pick whole-image shifted adds over scattered index_add_ for an offset
# group: per scattered tap; per pixel for the masked weights; per pixel and member for the add.
_SPARSE_COST = 5.0
# Smallest radius (px) whose saturated interior is added as spans; smaller windows are all taps.
_SPAN_MIN_RADIUS = 5.0
# Bytes of 4-channel values per strip of the dense (whole-image) adds: about an L2 cache.
_STRIP_BYTES = 1 << 20
_DENSE_WEIGHT_COST = 1.5
_DENSE_ADD_COST = 1.0


def bokehme_init_angle(rotation_deg: float) -> float:
    """BokehMe's polygon ``initAngle`` (radians) for our ``Aperture.rotation_deg``.

    BokehMe puts a vertex at image angle ``atan2(dy, dx) = -initAngle`` (y down), i.e. at
    ``initAngle`` counter-clockwise from the +x axis as seen on screen; its default ``pi/2`` points a
    vertex up. Our ``rotation_deg`` turns the shape counter-clockwise on screen from "vertex up", so
    ``initAngle = pi/2 + radians(rotation_deg)`` (the convention of
    :func:`genrefocus_core.aperture.polygon_radial`).

    Args:
        rotation_deg: counter-clockwise rotation on screen, degrees.

    Returns:
        ``initAngle`` in radians.

    Example:
        >>> round(bokehme_init_angle(0.0), 6), round(bokehme_init_angle(90.0), 6)
        (1.570796, 3.141593)
    """
    return math.pi / 2.0 + math.radians(float(rotation_deg))


def bokehme_disparity(raw: Tensor) -> Tensor:
    """BokehMe demo's disparity read: a 16-bit disparity map to 8 bits, then min-max to [0, 1].

    BokehMe's ``demo.py`` reads its 16-bit disparity PNGs with OpenCV's ``IMREAD_GRAYSCALE``, which
    returns 8-bit values ``v >> 8`` (checked against OpenCV 4 and 5), and then normalises each map to
    [0, 1]. Parity with its renders needs the same 256 levels.

    Args:
        raw: ``(B, 1, H, W)`` floating tensor of 16-bit values in [0, 65535] (integers as floats),
            larger = nearer.

    Returns:
        ``(B, 1, H, W)`` disparity in [0, 1] with at most 256 levels, each map min-max normalised
        on its own; device and dtype of ``raw``.

    Raises:
        GenRefocusInputError: if ``raw`` is not a floating ``(B, 1, H, W)`` tensor, holds values
            outside [0, 65535] or non-finite values, or a map is constant after the 8-bit
            quantisation (nothing to normalise; values below 256 all become 0).

    Example:
        >>> raw = torch.tensor([0.0, 255.0, 256.0, 65535.0]).view(1, 1, 1, 4)
        >>> [round(v, 4) for v in bokehme_disparity(raw).flatten().tolist()]
        [0.0, 0.0, 0.0039, 1.0]
    """
    check_bchw("raw", raw, 1)
    check_finite("raw", raw)
    lo, hi = float(raw.min()), float(raw.max())
    if lo < 0.0 or hi > 65535.0:
        raise GenRefocusInputError(f"raw must hold 16-bit values in [0, 65535], got [{lo:.6g}, {hi:.6g}]")
    q = torch.floor(raw / 256.0)
    qmin = q.amin(dim=(1, 2, 3), keepdim=True)
    qmax = q.amax(dim=(1, 2, 3), keepdim=True)
    span = qmax - qmin
    if bool((span <= 0).any()):
        raise GenRefocusInputError(
            "raw must not be constant after 8-bit quantisation (v >> 8), got a map with a single level; "
            "pass 16-bit values (0..65535), not 8-bit ones"
        )
    return (q - qmin) / span


def _polygon_of(aperture: Aperture | None) -> tuple[int, float] | None:
    """``(blades, initAngle)`` for a polygon aperture, ``None`` for a disc; raise for other shapes."""
    if aperture is None or aperture.shape == "disc":
        return None
    if aperture.shape != "polygon":
        raise GenRefocusInputError(
            f"aperture.shape must be 'disc' or 'polygon' in bokehme mode (BokehMe's renderer knows only "
            f"discs and regular polygons), got {aperture.shape!r}; use mode='physical' for other shapes"
        )
    if float(aperture.roundness) != 0.0:
        raise GenRefocusInputError(
            f"aperture.roundness must be 0 in bokehme mode (BokehMe's polygons have straight blades), "
            f"got {aperture.roundness!r}; use mode='physical' for rounded blades"
        )
    return aperture.blades, bokehme_init_angle(aperture.rotation_deg)


def highlight_boost(image: Tensor, disparity: Tensor, disp_focus: float) -> Tensor:
    """BokehMe demo's ``--highlight`` boost: brighten clipped highlights in out-of-focus areas.

    Factor ``1 + 0.4 * m1 * m2`` per pixel and channel, ``m1 = clip(tanh(200 ((d - d_f)^2 - 0.01)), 0,
    1)`` (out of focus), ``m2 = clip(tanh(10 (I - 220/255)), 0, 1)`` (bright). Applied before the
    gamma power; the result may exceed 1.

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        disparity: ``(B, 1, H, W)``, same unit as ``disp_focus``.
        disp_focus: in-focus disparity.

    Returns:
        ``(B, 3, H, W)`` boosted image, values in [0, 1.4].

    Example:
        >>> img = torch.tensor([0.5, 1.0]).view(1, 1, 1, 2).expand(1, 3, 1, 2)
        >>> d = torch.zeros(1, 1, 1, 2)
        >>> [round(v, 3) for v in highlight_boost(img, d, 0.5)[0, 0, 0].tolist()]  # only the bright one
        [0.5, 1.352]
    """
    m1 = torch.tanh(200.0 * ((disparity - disp_focus).square() - 0.01)).clamp(0.0, 1.0)
    m2 = torch.tanh(10.0 * (image - HIGHLIGHT_THRESHOLD)).clamp(0.0, 1.0)
    return image * (1.0 + HIGHLIGHT_RATIO * (m1 * m2))


_Grid = list[list[float]]
_IntGrid = list[list[int]]
_Group = tuple[int, int, list[tuple[int, int]]]


def _offset_tables(big: int, polygon: tuple[int, float] | None, m_in: float, m_out: float,
                   nbins: int) -> tuple[_Grid, _Grid, _IntGrid, _IntGrid]:
    """Per offset of the ``(2 big + 1)**2`` window grid: distance, polygon factor, explicit/interior bins.

    Bin ``b`` holds radii in ``[b, b + 1) / _BINS_PER_PX``. For offset ``(dy, dx)`` with distance
    ``delta`` and polygon factor ``g`` (1 for a disc), a source is *interior* (saturated weight,
    added as a span) from bin ``k_in`` on (lower edge ``>= (delta + m_in) / g`` and
    ``>= _SPAN_MIN_RADIUS``), and *explicit* in bins ``[k_ex, k_in)``: its window contains the offset
    (``r >= cheb - 1``, exact as integers are bin edges) and its bin's upper edge exceeds
    ``(delta - m_out) / g`` (farther taps weigh < 1e-7 of a full tap).
    """
    ax = torch.arange(-big, big + 1, dtype=torch.float64)
    dy, dx = torch.meshgrid(ax, ax, indexing="ij")
    delta = torch.sqrt(dy * dy + dx * dx)
    cheb = torch.maximum(dy.abs(), dx.abs())
    if polygon is None:
        g = torch.ones_like(delta)
    else:
        blades, init_angle = polygon
        g = polygon_radial(torch.atan2(dy, dx), blades, init_angle - math.pi / 2.0)
    s = float(_BINS_PER_PX)
    k_in = torch.ceil((delta + m_in) / g * s).clamp(min=_SPAN_MIN_RADIUS * s, max=nbins)
    k_ex = torch.maximum((cheb - 1.0) * s, torch.floor((delta - m_out) / g * s)).clamp(min=0.0, max=nbins)
    k_ex = torch.minimum(k_ex, k_in)
    return delta.tolist(), g.tolist(), k_ex.long().tolist(), k_in.long().tolist()


def _offset_groups(big: int, polygon: tuple[int, float] | None) -> list[_Group]:
    """Offsets that share their tap weights: the 8 mirror images of a disc offset; single polygon offsets."""
    if polygon is not None:
        return [(dy, dx, [(dy, dx)]) for dy in range(-big, big + 1) for dx in range(-big, big + 1)]
    groups = []
    for a in range(big + 1):
        for c in range(a, big + 1):
            mem = {(sy * a, sx * c) for sy in (-1, 1) for sx in (-1, 1)}
            mem |= {(sy * c, sx * a) for sy in (-1, 1) for sx in (-1, 1)}
            groups.append((a, c, sorted(mem)))
    return groups


def _cpu_workers(device: torch.device) -> int:
    """Worker threads for the tap loop: one per intra-op thread on CPU (at most 4), one on GPUs."""
    if device.type != "cpu":
        return 1
    return max(1, min(4, torch.get_num_threads()))


class _Progress:
    """Counts finished steps per worker; worker 0 (the calling thread) reports to ``on_step``."""

    def __init__(self, on_step: Callable[[int, int], None] | None, total: int, workers: int) -> None:
        self.on_step, self.total = on_step, max(1, total)
        self.every = max(1, self.total // 100)
        self.done = [0] * workers

    def step(self, wid: int = 0) -> None:
        self.done[wid] += 1
        if wid == 0 and self.on_step is not None and sum(self.done) % self.every == 0:
            self.on_step(min(sum(self.done), self.total), self.total)

    def finish(self) -> None:
        if self.on_step is not None:
            self.on_step(self.total, self.total)


def _scatter(lin: Tensor, radius: Tensor, polygon: tuple[int, float] | None,
             on_step: Callable[[int, int], None] | None) -> Tensor:
    """Normalised-scatter sums ``(B, 4, H, W)``: channels 0-2 ``sum w * lin``, channel 3 ``sum w``.

    Accumulators are padded by the largest window half-size ``big`` on every side, so that no tap
    needs a bounds test (taps landing in the padding are dropped at the end, as BokehMe skips
    them). Channels are interleaved as two complex numbers per pixel, ``(C0 + i C1, C2 + i W)``,
    so that one serial 1-D ``index_add_`` adds all four sums of a tap at neighbouring addresses.
    """
    b, _, h, w = lin.shape
    dtype, device = lin.dtype, lin.device
    f32 = dtype == torch.float32
    m_in, m_out = (_MARGIN_IN_F32, _MARGIN_OUT_F32) if f32 else (_MARGIN_F64, _MARGIN_F64)
    rmax = float(radius.max())
    big = math.floor(rmax) + 1
    hp, wp = h + 2 * big, w + 2 * big
    plane = hp * wp
    n = b * h * w

    r = radius.reshape(n)
    inv_den = torch.reciprocal(r.square().add_(0.2)).view(b, h, w, 1)
    # Per source: (I^gamma * w0, w0) with w0 = 1 / (r^2 + 0.2), the saturated (interior) tap weight.
    vals = torch.empty(b, h, w, 4, dtype=dtype, device=device)
    torch.mul(lin.permute(0, 2, 3, 1), inv_den, out=vals[..., :3])
    vals[..., 3:] = inv_den
    vals = vals.view(n, 4)
    del inv_den
    nbins = math.floor(rmax * _BINS_PER_PX) + 1
    bins = torch.floor(r * _BINS_PER_PX).to(torch.int32).clamp_(0, nbins - 1)
    counts = torch.bincount(bins, minlength=nbins)
    bin_start = [0, *torch.cumsum(counts, 0).tolist()]  # bins [k0, k1) hold bin_start[k1] - bin_start[k0]

    delta_l, g_l, k_ex_l, k_in_l = _offset_tables(big, polygon, m_in, m_out, nbins)
    side = 2 * big + 1
    has_spans = any(k < nbins for row in k_in_l for k in row)

    # An offset group whose sources fill much of the strips of rows they occur in is cheaper as
    # shifted adds of those strips (whole rows, masked weights) than as scattered index_add_:
    # small offsets, which every window reaches.
    rows = max(1, min(h, _STRIP_BYTES // (16 * w * b))) if device.type == "cpu" else h
    strip_y = list(range(0, h, rows))
    row_lo = bins.view(b, h, w).amin(dim=(0, 2))
    row_hi = bins.view(b, h, w).amax(dim=(0, 2))
    s_lo = torch.stack([row_lo[y:y + rows].min() for y in strip_y]).view(1, -1).long()
    s_hi = torch.stack([row_hi[y:y + rows].max() for y in strip_y]).view(1, -1).long()
    s_px = torch.tensor([b * w * (min(h, y + rows) - y) for y in strip_y], dtype=torch.float64)
    groups = _offset_groups(big, polygon)
    k_lo_g = torch.tensor([k_ex_l[dy + big][dx + big] for dy, dx, _ in groups], dtype=torch.long)
    k_hi_g = torch.tensor([k_in_l[dy + big][dx + big] for dy, dx, _ in groups], dtype=torch.long)
    overlap = (s_hi.cpu() >= k_lo_g.view(-1, 1)) & (s_lo.cpu() < k_hi_g.view(-1, 1))
    strip_px = (overlap.double() * s_px).sum(dim=1).tolist()
    overlap_l = overlap.tolist()
    strip_lo, strip_hi = s_lo.view(-1).tolist(), s_hi.view(-1).tolist()
    dense: list[tuple[int, int, float, float, list[tuple[int, int]], list[bool]]] = []
    sparse: list[tuple[int, int, float, float, list[tuple[int, int]]]] = []
    for gi, (dy0, dx0, members) in enumerate(groups):
        i, j = dy0 + big, dx0 + big
        k_lo, k_hi = k_ex_l[i][j], k_in_l[i][j]
        cnt = bin_start[k_hi] - bin_start[k_lo]
        if cnt <= 0:
            continue
        m = len(members)
        item = (k_lo, k_hi, 8.0 * delta_l[i][j], g_l[i][j], members)
        if cnt * _SPARSE_COST * m > strip_px[gi] * (_DENSE_WEIGHT_COST + _DENSE_ADD_COST * m):
            dense.append((*item, overlap_l[gi]))
        else:
            sparse.append(item)

    # Sources that sparse groups or spans need, sorted by bin (stable: raster order inside a bin).
    k_need = min([it[0] for it in sparse] + [min(min(row) for row in k_in_l) if has_spans else nbins])
    base = bin_start[min(k_need, nbins)]
    order = torch.nonzero(bins >= k_need).squeeze(1)
    order = order[torch.sort(bins[order], stable=True).indices]
    del bins
    # 0.5 + 0.5 tanh(4 t) == sigmoid(8 t); 8 r - 8 delta rounds exactly like 8 (r - delta)
    r8_s = r.index_select(0, order).mul_(8.0)
    vals_s = vals.index_select(0, order)
    x = order % w
    t = order // w
    pos_s = (t // h) * plane + (t % h) * wp + x  # target of (dy, dx): pos + (big + dy) * wp + big + dx
    idx_s = (pos_s.unsqueeze(1) * 2 + torch.arange(2, device=device)).reshape(-1)
    del order, x, t, pos_s

    workers = _cpu_workers(device)
    chunk = _CPU_CHUNK if device.type == "cpu" else n
    tasks: list[tuple[int, int, float, float, list[int]]] = []
    for k_lo, k_hi, d8, g, members in sparse:
        lo, hi = bin_start[k_lo] - base, bin_start[k_hi] - base
        offs = [2 * ((big + dy) * wp + big + dx) for dy, dx in members]
        tasks.extend((c0, min(hi, c0 + chunk), d8, g, offs) for c0 in range(lo, hi, chunk))
    strips = strip_y if dense else []
    progress = _Progress(on_step, (side if has_spans else 0) + len(strips) + len(tasks), workers)

    # 1) Interior spans -> first accumulator (float64 difference marks + row prefix sums).
    if has_spans:
        acc0 = _interior_spans(vals_s, idx_s, bin_start, base, k_in_l, nbins, b, hp, wp, progress)
        acc0 = torch.view_as_complex(acc0.to(dtype).view(-1, 2))
    else:
        acc0 = torch.zeros(b * plane * 2, dtype=lin.dtype.to_complex(), device=device)
    accs = [acc0] + [torch.zeros_like(acc0) for _ in range(workers - 1)]

    # 2) Dense offset groups: masked weights over the whole image, added at each member's shift,
    # in strips of rows so that a strip's values and the accumulator rows it reaches stay in cache.
    acc_img = torch.view_as_real(acc0).view(b, hp, wp, 4)
    r8_img = r.view(b, h, w) * 8.0
    vals_img = vals.view(b, h, w, 4)
    for si, y0 in enumerate(strips):
        y1 = min(h, y0 + rows)
        r8 = r8_img[:, y0:y1]
        for k_lo, k_hi, d8, g, members, present in dense:
            if not present[si]:
                continue
            x = (torch.mul(r8, g).sub_(d8) if polygon is not None else torch.sub(r8, d8)).sigmoid_()
            if k_lo > strip_lo[si] or k_hi <= strip_hi[si]:
                # bin >= k  <=>  16 r >= k  <=>  8 r >= k / 2, exact in floating point
                x.masked_fill_((r8 < 0.5 * k_lo) | (r8 >= 0.5 * k_hi), 0.0)
            v = vals_img[:, y0:y1] * x.unsqueeze(-1)
            for dy, dx in members:
                acc_img[:, big + dy + y0:big + dy + y1, big + dx:big + dx + w].add_(v)
        progress.step()
    del acc_img, r8_img, vals_img, r, vals

    # 3) Other explicit taps (ring of width m_in + m_out around each disc edge, windows of small r),
    # split over worker threads with their own accumulators, summed in a fixed order at the end.
    _sparse_taps(tasks, accs, r8_s, vals_s, idx_s, polygon is not None, progress)
    progress.finish()

    acc = accs[0]
    for extra in accs[1:]:
        acc += extra
    out = torch.view_as_real(acc).view(b, hp, wp, 4)[:, big:big + h, big:big + w].permute(0, 3, 1, 2)
    # True sums are >= 0; drop float residue so that the 1/gamma root never sees a negative.
    return out.clamp(min=0.0)


def _interior_spans(vals_s: Tensor, idx_s: Tensor, bin_start: list[int], base: int, k_in_l: _IntGrid,
                    nbins: int, b: int, hp: int, wp: int, progress: _Progress) -> Tensor:
    """Interior (saturated) taps as row spans: ``(b * hp * wp * 4,)`` float64 sums, channels interleaved.

    For row offset ``dy`` a source's interior is ``{dx : k_in(dy, dx) <= bin}``; a span starts at
    ``dx`` where ``k_in(dy, dx) <= bin < k_in(dy, dx - 1)`` and ends after ``dx`` where
    ``k_in(dy, dx) <= bin < k_in(dy, dx + 1)``. Marks are float64 because a row's running sum
    cancels the +/- marks of many sources.
    """
    side = len(k_in_l)
    marks = torch.zeros(b * hp * wp * 2, dtype=torch.complex128, device=vals_s.device)
    vals64 = torch.view_as_complex(vals_s.to(torch.float64).view(-1, 2, 2)).reshape(-1)
    for i in range(side):
        row = k_in_l[i]
        for j in range(side):
            kin = row[j]
            if kin >= nbins:
                continue
            lo = bin_start[kin] - base
            left = row[j - 1] if j > 0 else nbins
            right = row[j + 1] if j + 1 < side else nbins
            for edge, shift, sign in ((left, 0, 1.0), (right, 1, -1.0)):
                hi = bin_start[edge] - base if edge > kin else lo
                if hi > lo:
                    off = 2 * (i * wp + j + shift)
                    marks[off:].index_add_(0, idx_s[2 * lo:2 * hi], vals64[2 * lo:2 * hi], alpha=sign)
        progress.step()
    return torch.view_as_real(marks).view(b, hp, wp, 4).cumsum_(dim=2).view(-1)


def _sparse_taps(tasks: list[tuple[int, int, float, float, list[int]]], accs: list[Tensor], r8_s: Tensor,
                 vals_s: Tensor, idx_s: Tensor, is_polygon: bool, progress: _Progress) -> None:
    """Scattered explicit taps: task ``(c0, c1, 8 delta, g, offsets)`` adds sources ``c0:c1`` at each offset.

    Worker ``k`` runs tasks ``k, k + W, ...`` into ``accs[k]`` (worker 0 on the calling thread).
    """
    workers = len(accs)
    stop = threading.Event()

    def run(wid: int) -> None:
        acc = accs[wid]
        mine = tasks[wid::workers]
        size = max((t[1] - t[0] for t in mine), default=0)
        xbuf = torch.empty(size, dtype=r8_s.dtype, device=r8_s.device)
        vbuf = torch.empty(size, 4, dtype=r8_s.dtype, device=r8_s.device)
        for c0, c1, d8, g, offs in mine:
            if stop.is_set():
                return
            cnt = c1 - c0
            x = xbuf[:cnt]
            if is_polygon:
                torch.mul(r8_s[c0:c1], g, out=x).sub_(d8)
            else:
                torch.sub(r8_s[c0:c1], d8, out=x)
            x.sigmoid_()
            v = vbuf[:cnt]
            torch.mul(vals_s[c0:c1], x.unsqueeze(1), out=v)
            src = torch.view_as_complex(v.view(cnt, 2, 2)).view(2 * cnt)
            idx = idx_s[2 * c0:2 * c1]
            for off in offs:
                acc[off:].index_add_(0, idx, src)
            progress.step(wid)

    if workers == 1:
        run(0)
        return
    with ThreadPoolExecutor(max_workers=workers - 1) as pool:
        futures = [pool.submit(run, wid) for wid in range(1, workers)]
        try:
            run(0)
        except BaseException:
            stop.set()
            raise
        finally:
            for fut in futures:
                if stop.is_set():
                    fut.exception()
                else:
                    fut.result()


def render_bokehme(
    image: Tensor,
    disparity: Tensor,
    *,
    k: float,
    disp_focus: float,
    gamma: float,
    aperture: Aperture | None = None,
    highlight: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> Tensor:
    """BokehMe's classical scatter renderer (``docs/renderer.md`` §1), exact to float rounding.

    Inputs are assumed validated by :func:`genrefocus_core.renderer.render_bokeh` (shapes, ranges,
    radius no larger than the image); only the aperture is checked here. The disparity convention is
    BokehMe's: larger = nearer, typically min-max normalised (see :func:`bokehme_disparity`).

    Polygon apertures follow BokehMe's ``scatter_ex.py``: circumscribed (vertices on the circle of
    radius ``|D|``), no area correction, no foreground flip; ``Aperture.scaling`` and
    ``Aperture.flip_foreground`` do not apply in this mode. ``rotation_deg = 0`` puts a vertex up
    (BokehMe's default ``initAngle = pi/2``, see :func:`bokehme_init_angle`).

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        disparity: ``(B, 1, H, W)``, same device and dtype as ``image``.
        k: blur strength, radius in px per unit of disparity, ``>= 0``.
        disp_focus: disparity rendered sharp.
        gamma: power in [1, 5]: render on ``image**gamma``, return ``result**(1/gamma)``.
        aperture: ``None`` or shape ``"disc"`` (BokehMe's ``scatter.py``) or ``"polygon"`` with
            ``roundness = 0`` (``scatter_ex.py``).
        highlight: apply BokehMe demo's highlight boost before the power (:func:`highlight_boost`).
        on_step: optional ``on_step(i, total)`` progress callback, called up to ~100 times.

    Returns:
        ``(B, 3, H, W)`` rendered image in [0, 1], device and dtype of ``image`` (float16/bfloat16
        inputs are rendered in float32).

    Raises:
        GenRefocusInputError: for an aperture other than a disc or a straight-bladed polygon.

    Example:
        >>> img = torch.rand(1, 3, 12, 12)
        >>> disp = torch.linspace(0, 1, 12).view(1, 1, 1, 12).expand(1, 1, 12, 12)
        >>> out = render_bokehme(img, disp, k=6.0, disp_focus=0.5, gamma=4.0)
        >>> out.shape, bool(out.min() >= 0) and bool(out.max() <= 1)
        (torch.Size([1, 3, 12, 12]), True)
    """
    polygon = _polygon_of(aperture)
    cdtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    img = image.to(cdtype)
    disp = disparity.to(cdtype).expand(img.shape[0], 1, -1, -1)
    if highlight:
        img = highlight_boost(img, disp, disp_focus)
    lin = img.pow(gamma)
    # parity: BokehMe demo.py computes K (d - d_f) / defocus_scale for its networks and the classical
    # renderer gets that times defocus_scale (10) again; the float32 round trip moves some radii by
    # an ulp, which decides the window size floor(r) + 1 where r lands on an integer.
    radius = (k * (disp - disp_focus) / _DEFOCUS_SCALE * _DEFOCUS_SCALE).abs()
    sums = _scatter(lin, radius, polygon, on_step)
    out = (sums[:, :3] / sums[:, 3:]).pow(1.0 / gamma).clamp(0.0, 1.0)
    return out.to(image.dtype)
