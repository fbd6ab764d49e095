"""Tests of mode "bokehme": BokehMe's classical scatter renderer (fast path vs brute-force oracle)."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import genrefocus_core._render_bokehme as bokehme_module
from genrefocus_core._render_bokehme import (
    bokehme_disparity,
    bokehme_init_angle,
    highlight_boost,
    render_bokehme,
)
from genrefocus_core.aperture import Aperture, polygon_radial
from genrefocus_core.errors import GenRefocusInputError
from genrefocus_core.renderer import render_bokeh
from genrefocus_core.renderer_reference import scatter_reference

SCENE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "bokehme-examples"
D_F = 90.0 / 255.0


def _scene(h: int = 40, w: int = 56, batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image and a smooth disparity in [0, 1] with noise and a depth step."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(batch, 3, h, w, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 0.5 + 0.35 * torch.sin(5 * xx + 1.0) * torch.cos(3 * yy)
    base = torch.where(xx > 0.6, base + 0.15, base)
    disp = (base + 0.05 * torch.rand(batch, 1, h, w, generator=g)).clamp(0, 1)
    return img, disp


def _with_integer_radii(disp: torch.Tensor, k: float, d_f: float) -> torch.Tensor:
    """Put radii exactly on, and one float step either side of, integers on a third of the pixels."""
    r = k * (disp - d_f)
    n = torch.round(r)
    on = d_f + n / k
    flat = disp.clone().view(-1)
    idx = torch.arange(flat.numel())
    for m, nudge in ((0, 0.0), (1, 1e-6), (2, -1e-6)):
        sel = idx % 9 == m
        flat[sel] = (on.view(-1)[sel] + nudge).clamp(0, 1)
    return flat.view_as(disp)


@pytest.mark.parametrize("k", [5.0, 19.0, 36.0])  # r_max about 3, 8 and 15 px
def test_disc_matches_brute_force(k):
    img, disp = _scene()
    disp = _with_integer_radii(disp, k, 0.45)
    rmax = k * float((disp - 0.45).abs().max())
    assert rmax > 2.5
    fast = render_bokehme(img, disp, k=k, disp_focus=0.45, gamma=4.0)
    ref = scatter_reference(img, disp, k=k, disp_focus=0.45, gamma=4.0)
    assert (fast - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("path", ["scattered", "whole-image"])
@pytest.mark.parametrize("aperture", [None, Aperture(shape="polygon", blades=5, rotation_deg=10.0)])
def test_both_tap_paths_match_brute_force(monkeypatch, path, aperture):
    # Each offset group is added either by scattered index_add_ or by whole-image shifted adds,
    # chosen by a cost model; force one path for every group.
    monkeypatch.setattr(bokehme_module, "_SPARSE_COST", 0.0 if path == "scattered" else 1e9)
    img, disp = _scene(seed=9)
    fast = render_bokehme(img, disp, k=25.0, disp_focus=0.5, gamma=4.0, aperture=aperture)
    sides = None if aperture is None else 5
    ref = scatter_reference(img, disp, k=25.0, disp_focus=0.5, gamma=4.0, poly_sides=sides,
                            init_angle=bokehme_init_angle(10.0))
    assert (fast - ref).abs().max() <= 1e-5


@pytest.mark.parametrize(("blades", "rotation"), [(5, 0.0), (6, 20.0), (6, -75.0)])
def test_polygon_matches_brute_force(blades, rotation):
    img, disp = _scene(seed=1)
    ap = Aperture(shape="polygon", blades=blades, rotation_deg=rotation)
    fast = render_bokehme(img, disp, k=30.0, disp_focus=0.5, gamma=3.0, aperture=ap)
    ref = scatter_reference(img, disp, k=30.0, disp_focus=0.5, gamma=3.0, poly_sides=blades,
                            init_angle=bokehme_init_angle(rotation))
    assert (fast - ref).abs().max() <= 1e-5
    disc = render_bokehme(img, disp, k=30.0, disp_focus=0.5, gamma=3.0)
    assert (fast - disc).abs().max() > 1e-2  # the shape really changes the render


def test_highlight_matches_brute_force_and_brightens():
    img, disp = _scene(seed=2)
    img = img.clamp(0.6, 1.0)  # many highlights above 220/255
    fast = render_bokehme(img, disp, k=20.0, disp_focus=0.5, gamma=4.0, highlight=True)
    ref = scatter_reference(img, disp, k=20.0, disp_focus=0.5, gamma=4.0, highlight=True)
    assert (fast - ref).abs().max() <= 1e-5
    plain = render_bokehme(img, disp, k=20.0, disp_focus=0.5, gamma=4.0)
    assert float((fast - plain).mean()) > 1e-3


def test_float64_matches_brute_force_tightly():
    img, disp = _scene(h=24, w=30, seed=3)
    img, disp = img.double(), disp.double()
    fast = render_bokehme(img, disp, k=25.0, disp_focus=0.5, gamma=2.0)
    ref = scatter_reference(img, disp, k=25.0, disp_focus=0.5, gamma=2.0)
    assert fast.dtype == torch.float64
    assert (fast - ref).abs().max() <= 1e-10


def test_polygon_extent_matches_bokehme_formula():
    # BokehMe scatter_ex.py: sin(a) / sin(phi + a), a = pi/2 - pi/n, phi = |theta + theta0| mod 2pi/n.
    theta = torch.linspace(-math.pi, math.pi, 721, dtype=torch.float64)
    for blades, rot in ((5, 0.0), (6, 33.0), (7, -120.0)):
        a = math.pi / 2 - math.pi / blades
        phi = torch.remainder((theta + bokehme_init_angle(rot)).abs(), 2 * math.pi / blades)
        expected = math.sin(a) / torch.sin(phi + a)
        got = polygon_radial(theta, blades, math.radians(rot))
        assert torch.allclose(got, expected, atol=1e-12)
    # rotation 0: a vertex points up (theta = -pi/2 in image coordinates, y down)
    assert float(polygon_radial(torch.tensor([-math.pi / 2]), 5, 0.0)) == pytest.approx(1.0)
    assert float(polygon_radial(torch.tensor([math.pi / 2]), 5, 0.0)) == pytest.approx(math.cos(math.pi / 5))


def test_constant_image_is_unchanged():
    img = torch.full((1, 3, 30, 34), 0.37)
    _, disp = _scene(30, 34)
    for ap in (None, Aperture(shape="polygon", blades=6)):
        out = render_bokehme(img, disp, k=30.0, disp_focus=0.5, gamma=4.0, aperture=ap)
        assert (out - img).abs().max() <= 1e-5


def test_zero_k_is_bokehmes_3x3_kernel():
    # r = 0 everywhere: window half-size 1, weight 2.5 on the pixel itself and the tanh tails of the
    # disc edge on its neighbours; normalised (zero weight outside the image).
    img, disp = _scene(20, 24, seed=4)
    gamma = 2.5
    d = torch.tensor([[math.sqrt(2), 1.0, math.sqrt(2)], [1.0, 0.0, 1.0], [math.sqrt(2), 1.0, math.sqrt(2)]])
    kern = ((0.5 + 0.5 * torch.tanh(-4.0 * d)) / 0.2).view(1, 1, 3, 3)
    lin = img.pow(gamma)
    num = F.conv2d(lin.view(3, 1, 20, 24), kern, padding=1).view(1, 3, 20, 24)
    den = F.conv2d(torch.ones(1, 1, 20, 24), kern, padding=1)
    expected = (num / den).pow(1 / gamma)
    out = render_bokehme(img, disp, k=0.0, disp_focus=0.5, gamma=gamma)
    assert (out - expected).abs().max() <= 1e-5
    # Up to the gamma round trip it is nearly the image: the 8 neighbours get 0.28 % in all.
    flat = render_bokehme(img, disp, k=0.0, disp_focus=0.5, gamma=1.0)
    assert (flat - img).abs().max() < 3e-3


def test_batch_equals_singles_and_is_deterministic():
    img, disp = _scene(batch=2, seed=5)
    both = render_bokehme(img, disp, k=20.0, disp_focus=0.5, gamma=4.0)
    for i in range(2):
        one = render_bokehme(img[i:i + 1], disp[i:i + 1], k=20.0, disp_focus=0.5, gamma=4.0)
        assert (both[i:i + 1] - one).abs().max() <= 1e-6
    again = render_bokehme(img, disp, k=20.0, disp_focus=0.5, gamma=4.0)
    assert torch.equal(both, again)


def test_render_bokeh_dispatches_and_reports_progress():
    img, disp = _scene(seed=6)
    steps: list[tuple[int, int]] = []
    out = render_bokeh(img, disp, k=20.0, disp_focus=0.5, gamma=4.0, mode="bokehme",
                       on_step=lambda i, n: steps.append((i, n)))
    ref = scatter_reference(img, disp, k=20.0, disp_focus=0.5, gamma=4.0)
    assert (out - ref).abs().max() <= 1e-5
    assert steps and steps[-1][0] == steps[-1][1]
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(steps))


@pytest.mark.parametrize("shape", ["heart", "star", "triangle"])
def test_unsupported_aperture_points_to_physical_mode(shape):
    img, disp = _scene(12, 12)
    with pytest.raises(GenRefocusInputError, match="physical"):
        render_bokeh(img, disp, k=5.0, disp_focus=0.5, mode="bokehme", aperture=Aperture(shape=shape))
    with pytest.raises(GenRefocusInputError, match="physical"):
        render_bokehme(img, disp, k=5.0, disp_focus=0.5, gamma=2.0,
                       aperture=Aperture(shape="polygon", blades=6, roundness=0.5))


def test_highlight_rule():
    img = torch.tensor([0.5, 220 / 255, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    far = highlight_boost(img, torch.zeros(1, 1, 1, 3), 0.5)
    near = highlight_boost(img, torch.full((1, 1, 1, 3), 0.5), 0.5)
    assert torch.equal(near, img)  # in focus: untouched
    assert far[0, 0, 0, 0] == img[0, 0, 0, 0] and far[0, 0, 0, 1] == img[0, 0, 0, 1]  # below threshold
    assert float(far[0, 0, 0, 2]) == pytest.approx(1.0 + 0.4 * math.tanh(10 * (1 - 220 / 255)), rel=1e-6)


def test_bokehme_disparity_matches_opencv_grayscale_read(tmp_path):
    cv2 = pytest.importorskip("cv2")
    g = torch.Generator().manual_seed(7)
    raw16 = (torch.rand(33, 47, generator=g) * 65535).round().to(torch.int32).numpy().astype(np.uint16)
    raw16[0, 0], raw16[0, 1] = 0, 65535
    path = str(tmp_path / "d.png")
    assert cv2.imwrite(path, raw16)
    gray = cv2.imread(path, cv2.IMREAD_GRAYSCALE).astype(np.float32)  # BokehMe demo.py's read
    expected = (gray - gray.min()) / (gray.max() - gray.min())
    unchanged = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert unchanged.dtype == np.uint16
    got = bokehme_disparity(torch.from_numpy(unchanged.astype(np.float32))[None, None])
    assert np.array_equal(got[0, 0].numpy(), expected)


def test_bokehme_disparity_rejects_bad_input():
    with pytest.raises(GenRefocusInputError, match="65535"):
        bokehme_disparity(torch.full((1, 1, 2, 2), 70000.0))
    with pytest.raises(GenRefocusInputError, match="constant"):
        bokehme_disparity(torch.tensor([0.0, 100.0, 255.0, 7.0]).view(1, 1, 2, 2))  # all < 256


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10.0 * math.log10(255.0**2 / mse)


@pytest.mark.slow
def test_scene21_matches_bokehmes_shipped_render():
    if not SCENE.is_dir():
        pytest.skip("../shared/data/bokehme-examples is not present beside the checkout")
    from PIL import Image

    rgb = np.asarray(Image.open(SCENE / "21.jpg").convert("RGB"))
    raw = np.asarray(Image.open(SCENE / "21.png"))
    assert raw.dtype == np.uint16 and raw.max() > 255  # a real 16-bit map
    ref = np.asarray(Image.open(SCENE / "reference_outputs" / "21" / "bokeh_classical.jpg").convert("RGB"))
    img = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    disp = bokehme_disparity(torch.from_numpy(raw.astype(np.float32))[None, None])
    out = render_bokeh(img, disp, k=60.0, disp_focus=D_F, gamma=4.0, mode="bokehme")
    out8 = np.clip(np.round(out[0].permute(1, 2, 0).numpy() * 255.0), 0, 255).astype(np.uint8)
    assert _psnr(out8, ref) >= 45.0
    # Encoded as demo.py did (JPEG quality 95), the render lands close to BokehMe's own file.
    buf = io.BytesIO()
    Image.fromarray(out8).save(buf, format="JPEG", quality=95)
    enc = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert _psnr(enc, ref) >= 70.0


@pytest.mark.gpu
def test_cuda_matches_cpu():
    img, disp = _scene(batch=2, seed=8)
    ap = Aperture(shape="polygon", blades=6, rotation_deg=10.0)
    for aperture in (None, ap):
        cpu = render_bokehme(img, disp, k=30.0, disp_focus=0.5, gamma=4.0, aperture=aperture)
        gpu = render_bokehme(img.cuda(), disp.cuda(), k=30.0, disp_focus=0.5, gamma=4.0, aperture=aperture)
        assert (gpu.cpu() - cpu).abs().max() <= 1e-5
        again = render_bokehme(img.cuda(), disp.cuda(), k=30.0, disp_focus=0.5, gamma=4.0, aperture=aperture)
        assert torch.equal(gpu, again)
