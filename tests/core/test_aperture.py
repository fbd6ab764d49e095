"""Tests of genrefocus_core.aperture: shapes, scaling, continuity, orientation, raster apertures."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from genrefocus_core.aperture import (
    Aperture,
    aperture_from_image,
    aperture_kernel,
    aperture_mask,
    aperture_preview,
    polygon_radial,
)
from genrefocus_core.errors import GenRefocusInputError


def _heart_mask() -> torch.Tensor:
    return aperture_mask(Aperture("heart"), 256)


def _ring_cov(n: int, outer: float, inner: float, ss: int = 16) -> torch.Tensor:
    """Test-side reference: supersampled coverage of an annulus centred on the middle of ``n x n``."""
    off = (torch.arange(ss, dtype=torch.float64) + 0.5) / ss - 0.5
    t = (torch.arange(n, dtype=torch.float64)[:, None] + off).reshape(-1) - (n - 1) / 2
    rho = torch.hypot(t[:, None], t[None, :])
    inside = ((rho <= outer) & (rho >= inner)).to(torch.float64)
    return inside.reshape(n, ss, n, ss).mean(dim=(1, 3))


def _ring_image() -> torch.Tensor:
    return _ring_cov(200, 100.0, 60.0, ss=8).to(torch.float32)


SHAPES = {
    "disc": Aperture(),
    "hexagon": Aperture("polygon", blades=6),
    "rounded_pentagon": Aperture("polygon", blades=5, roundness=0.4, rotation_deg=17.0),
    "heart": Aperture("heart"),
    "star": Aperture("star"),
    "triangle": Aperture("triangle", scaling="circumscribed"),
    "image_heart": Aperture("image", image=_heart_mask(), rotation_deg=30.0),
}


def _pad(a: torch.Tensor, n: int) -> torch.Tensor:
    p = (n - a.shape[-1]) // 2
    return F.pad(a, (p, p, p, p))


def _diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.shape[-1], b.shape[-1])
    return _pad(a, n) - _pad(b, n)


def _support(k: torch.Tensor, rel: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets (dy, dx) from the centre of the pixels carrying mass."""
    c = (k.shape[-1] - 1) // 2
    iy, ix = (k > rel * k.max()).nonzero(as_tuple=True)
    return iy - c, ix - c


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("radius", [0.3, 0.8, 1.5, 2.5, 7.3, 20.0])
def test_kernel_sums_to_one_odd_nonnegative(name, radius):
    k = aperture_kernel(SHAPES[name], radius)
    assert k.ndim == 2 and k.shape[0] == k.shape[1] and k.shape[0] % 2 == 1
    assert k.dtype == torch.float32 and bool((k >= 0).all())
    assert abs(float(k.sum(dtype=torch.float64)) - 1.0) < 1e-5
    k64 = aperture_kernel(SHAPES[name], radius, dtype=torch.float64)
    assert abs(float(k64.sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("name", ["disc", "hexagon", "heart", "star"])
def test_equal_area_scaling(name):
    r = 20.0
    k = aperture_kernel(SHAPES[name], r)
    area = 1.0 / float(k.max())  # interior pixels hold 1/area; edge pixels their coverage fraction
    assert area == pytest.approx(math.pi * r * r, rel=0.03)


def test_circumscribed_polygon_farthest_pixel_and_orientation():
    r = 20.0
    k = aperture_kernel(Aperture("polygon", blades=6, scaling="circumscribed"), r)
    dy, dx = _support(k)
    assert r - 1.0 <= float(torch.hypot(dy.double(), dx.double()).max()) <= r + 0.5
    assert int(dy.min()) == -20  # a vertex points up
    apothem = r * math.cos(math.pi / 6)  # flat sides left and right
    assert int(dx.max()) == pytest.approx(apothem, abs=1.0)
    assert int(dx.min()) == pytest.approx(-apothem, abs=1.0)


def test_triangle_and_star_point_up_rotation_is_ccw_on_screen():
    r = 20.0
    dy, dx = _support(aperture_kernel(Aperture("triangle", scaling="circumscribed"), r))
    assert int(dy.min()) == -20 and int(dy.max()) == pytest.approx(r / 2, abs=1.0)
    # rotated 90 degrees counter-clockwise on screen, the vertex points left
    dy, dx = _support(aperture_kernel(Aperture("triangle", rotation_deg=90.0, scaling="circumscribed"), r))
    assert int(dx.min()) == -20 and int(dx.max()) == pytest.approx(r / 2, abs=1.0)
    # star: a tip up, two tips down at 54 degrees below the horizontal, a notch (~0.38 r) straight down
    dy, dx = _support(aperture_kernel(Aperture("star", scaling="circumscribed"), r))
    assert int(dy.min()) == -20 and int(dy.max()) == pytest.approx(r * math.sin(math.radians(54)), abs=1.0)
    assert int(dy[dx == 0].max()) == pytest.approx(0.382 * r, abs=1.0)


def test_heart_lobes_up():
    k = aperture_kernel(Aperture("heart"), 15.0).double()
    c = (k.shape[0] - 1) // 2
    rows = torch.arange(k.shape[0], dtype=torch.float64) - c
    assert float((k.sum(1) * rows).sum()) < -1.0  # mass centroid above the axis: lobes up
    width = (k > 1e-3 * k.max()).sum(1)
    rows_open = width.nonzero().flatten()
    top, bottom = int(rows_open[0]), int(rows_open[-1])
    quarter = (bottom - top) // 4
    assert int(width[top + quarter]) > 1.5 * int(width[bottom - quarter])  # round lobes, pointed bottom


@pytest.mark.parametrize("name", list(SHAPES))
def test_kernel_is_continuous_in_radius(name):
    """Lipschitz check: no jump anywhere, in particular at integer and half-integer radii."""
    ap = SHAPES[name]
    dr = 1e-3
    radii = [0.5 * i + d for i in range(17) for d in (-2e-3, 0.13, 0.31)]
    for r in (x for x in radii if x >= 0):
        a, b = aperture_kernel(ap, r), aperture_kernel(ap, r + dr)
        step = float(_diff(a, b).abs().max())
        # a smooth kernel moves by about dr * peak per dr; a popping pixel or sub-sample jumps by
        # (1/64 of a pixel) / area, 15x more than this bound
        assert step <= 6.0 * dr * float(a.max()) + 1e-7, (name, r, step)
    # and the brief's coarser form: 0.01 px steps over 0..8 px change the kernel little
    for r in torch.arange(0.0, 8.0, 0.37).tolist():
        step = float(_diff(aperture_kernel(ap, r), aperture_kernel(ap, r + 0.01)).abs().max())
        assert step < 0.03


def test_radius_zero_is_delta_and_tiny_radius_tends_to_delta():
    for ap in (None, Aperture("heart"), Aperture("star", scaling="circumscribed")):
        assert aperture_kernel(ap, 0.0).tolist() == [[1.0]]
        k = aperture_kernel(ap, 0.4)
        assert float(k[k.shape[0] // 2, k.shape[1] // 2]) == pytest.approx(1.0)
    k = aperture_kernel(None, 0.7)
    assert 0.3 < float(k.max()) < 1.0  # spreads smoothly into the neighbours above half a pixel


def test_foreground_flip():
    heart = Aperture("heart")
    back, front = aperture_kernel(heart, 9.0), aperture_kernel(heart, 9.0, foreground=True)
    torch.testing.assert_close(front, torch.flip(back, dims=(0, 1)))
    assert float((front - back).abs().max()) > 0.1 * float(back.max())  # a heart is not symmetric
    no_flip = Aperture("heart", flip_foreground=False)
    torch.testing.assert_close(aperture_kernel(no_flip, 9.0, foreground=True), back)
    torch.testing.assert_close(aperture_kernel(None, 9.0, foreground=True), aperture_kernel(None, 9.0))


def test_triangle_rotated_180_equals_flipped_triangle():
    flipped = aperture_kernel(Aperture("triangle"), 11.0, foreground=True)
    rotated = aperture_kernel(Aperture("triangle", rotation_deg=180.0), 11.0)
    torch.testing.assert_close(rotated, flipped, atol=1e-6, rtol=0)
    assert float((rotated - aperture_kernel(Aperture("triangle"), 11.0)).abs().max()) > 1e-3


def test_roundness_blends_polygon_to_disc():
    disc = aperture_mask(None, 101)
    areas = [float(aperture_mask(Aperture("polygon", blades=5, roundness=q), 101).sum())
             for q in (0.0, 0.5, 0.9)]
    assert areas[0] == pytest.approx(5 / 2 * math.sin(2 * math.pi / 5) * 50.5**2, rel=5e-3)
    assert areas[0] < areas[1] < areas[2] < float(disc.sum())
    round_poly = Aperture("polygon", blades=5, roundness=1.0, scaling="circumscribed")
    torch.testing.assert_close(aperture_kernel(round_poly, 12.5), aperture_kernel(None, 12.5))


def test_polygon_radial_matches_bokehme_formula():
    theta = torch.linspace(-math.pi, math.pi, 1001, dtype=torch.float64)
    for n, rot in ((3, 0.0), (6, 0.3), (9, -1.2)):
        theta0 = rot + math.pi / 2  # BokehMe's initAngle
        a = math.pi / 2 - math.pi / n
        phi = torch.remainder((theta + theta0).abs(), 2 * math.pi / n)
        ref = math.sin(a) / torch.sin(phi + a)
        torch.testing.assert_close(polygon_radial(theta, n, rot), ref)
    # the polygon it describes has the area of a regular n-gon: 0.5 * integral R^2 dtheta
    t = (torch.arange(20000, dtype=torch.float64) + 0.5) * (2 * math.pi / 20000)
    area = float(0.5 * (polygon_radial(t, 7) ** 2).sum() * (2 * math.pi / 20000))
    assert area == pytest.approx(7 / 2 * math.sin(2 * math.pi / 7), rel=1e-6)
    with pytest.raises(GenRefocusInputError, match="blades"):
        polygon_radial(t, 2)


def test_image_heart_matches_analytic_heart():
    img = Aperture("image", image=_heart_mask())
    for r in (6.0, 15.0):
        d = _diff(aperture_kernel(img, r), aperture_kernel(Aperture("heart"), r))
        assert float(d.abs().sum()) < 0.03, r  # both sum to 1: L1 distance, at most 2


def test_image_ring_matches_reference_ring():
    ring = Aperture("image", image=_ring_image())
    r = 10.0  # equal area: the ring (radii 1 and 0.6 of its outer radius) has area 0.64 pi R^2
    outer = r / math.sqrt(1 - 0.36)
    k = aperture_kernel(ring, r).double()
    ref = _ring_cov(k.shape[0], outer, 0.6 * outer)
    assert float(_diff(k, ref / ref.sum()).abs().sum()) < 0.03
    assert float(k[k.shape[0] // 2, k.shape[1] // 2]) == 0.0  # the hole stays open, centred


def test_image_rotation_agrees_with_analytic_rotation():
    heart = _heart_mask()  # the analytic heart is centred on its bounding box, as images are
    for rot in (90.0, -90.0, 33.0):
        img_k = aperture_kernel(Aperture("image", image=heart, rotation_deg=rot), 12.0)
        ana_k = aperture_kernel(Aperture("heart", rotation_deg=rot), 12.0)
        assert float(_diff(img_k, ana_k).abs().sum()) < 0.03, rot


def test_raster_resampling_is_area_averaged():
    """A 1-px line keeps its mass fraction at every output size (point sampling would drop or inflate it)."""
    img = torch.zeros(120, 120)
    img[:, :60] = 1.0
    img[:, 90] = 1.0
    ap = Aperture("image", image=img)
    expected = 120 / (120 * 60 + 120)
    for size in range(9, 40, 3):
        profile = aperture_mask(ap, size).double().sum(0)
        nz = (profile > 0).nonzero().flatten()
        gap = int(nz[(nz[1:] - nz[:-1] > 1).nonzero().flatten()[-1] + 1])  # first column of the line
        assert float(profile[gap:].sum() / profile.sum()) == pytest.approx(expected, rel=0.02), size


def test_image_apertures_are_cached_by_content():
    img = _ring_image()
    ap = Aperture("image", image=img)
    k1 = aperture_kernel(ap, 8.0)
    k1.zero_()  # the caller owns its copy
    assert float(aperture_kernel(ap, 8.0).sum()) == pytest.approx(1.0)
    img[80:120, 80:120] = 1.0  # fill the hole in place: the kernel must change
    assert float(aperture_kernel(ap, 8.0)[8, 8]) > 0.0


def test_aperture_mask_and_preview():
    m = aperture_mask(None, 64)
    assert m.shape == (64, 64) and m.dtype == torch.float32
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert float(m.sum()) == pytest.approx(math.pi * 32**2, rel=2e-3)
    torch.testing.assert_close(m, m.flip(0))  # centred on the centre of the square
    p = aperture_preview(Aperture("heart"))
    assert p.shape == (1, 3, 256, 256) and float(p.min()) == 0.0 and float(p.max()) == 1.0
    assert float(p[0, 0, 40:128].sum()) > float(p[0, 0, 128:216].sum())  # background: lobes up


def test_aperture_from_image_layouts():
    rgb = torch.zeros(1, 8, 8, 3)
    rgb[0, 2:6, 2:6] = torch.tensor([1.0, 0.0, 0.0])
    cov = aperture_from_image(rgb)
    assert cov.shape == (8, 8) and float(cov.max()) == pytest.approx(0.2126)
    assert float(aperture_from_image(rgb, threshold=0.1).sum()) == 16.0
    mask = torch.zeros(1, 8, 8)
    mask[0, 3, 3] = 0.5
    torch.testing.assert_close(aperture_from_image(mask), mask[0])
    torch.testing.assert_close(aperture_from_image(mask[0]), mask[0])
    torch.testing.assert_close(aperture_from_image(mask[0, :, :, None]), mask[0])


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(1, 8, 8), torch.zeros(8, 8, 3), torch.full((8, 8), 0.05)],
)
def test_aperture_from_image_all_black_raises(bad):
    with pytest.raises(GenRefocusInputError, match=r"^image .*open"):
        aperture_from_image(bad, threshold=0.1 if bad.max() > 0 else None)


def test_aperture_from_image_bad_inputs():
    with pytest.raises(GenRefocusInputError, match="image"):
        aperture_from_image(torch.ones(2, 8, 8, 3))  # a batch
    with pytest.raises(GenRefocusInputError, match=r"\[0, 1\]"):
        aperture_from_image(torch.full((4, 4), 2.0))
    with pytest.raises(GenRefocusInputError, match="finite"):
        aperture_from_image(torch.full((4, 4), float("nan")))
    with pytest.raises(GenRefocusInputError, match="floating"):
        aperture_from_image(torch.ones(4, 4, dtype=torch.uint8))


def test_bad_apertures_and_radii_raise():
    with pytest.raises(GenRefocusInputError, match="shape"):
        Aperture("hexagon")
    for blades in (2, 17, 6.0, True):
        with pytest.raises(GenRefocusInputError, match="blades"):
            Aperture("polygon", blades=blades)
    with pytest.raises(GenRefocusInputError, match="open"):
        Aperture("image", image=torch.zeros(8, 8))
    for radius in (-1.0, float("nan"), float("inf"), 5000.0, True):
        with pytest.raises(GenRefocusInputError, match="radius"):
            aperture_kernel(None, radius)
    with pytest.raises(GenRefocusInputError, match="rotation_deg"):
        aperture_kernel(Aperture("heart", rotation_deg=float("nan")), 3.0)
    with pytest.raises(GenRefocusInputError, match="aperture"):
        aperture_kernel("heart", 3.0)
    with pytest.raises(GenRefocusInputError, match="size"):
        aperture_mask(None, 0)


def test_large_kernel_is_fast():
    for ap in (Aperture("polygon", blades=7, rotation_deg=3.0), Aperture("star", rotation_deg=1.0)):
        t0 = time.perf_counter()
        k = aperture_kernel(ap, 100.0 + 1e-4)  # an uncached radius
        elapsed = time.perf_counter() - t0
        assert k.shape[0] >= 201
        assert elapsed < 0.5  # ~10 ms on 2 cores; the bound leaves room for a busy machine
