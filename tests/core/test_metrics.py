"""Tier 1: evaluation metrics — PSNR, SSIM, Laplacian variance, LVCorr and the K search."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genrefocus_core.errors import GenRefocusInputError
from genrefocus_core.metrics import laplacian_variance, lv_corr, psnr, search_k, ssim


def _gaussian_blur(x: torch.Tensor, sigma: float, radius: int = 12) -> torch.Tensor:
    """Test-local Gaussian blur (fixed support, reflect padding), smooth in ``sigma``."""
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    w = w / w.sum()
    c = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, w.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def _structured_image(seed: int = 0, size: int = 48, channels: int = 3) -> torch.Tensor:
    """A [0, 1] image with texture at several scales (mildly smoothed noise)."""
    g = torch.Generator().manual_seed(seed)
    x = _gaussian_blur(torch.rand(1, channels, size, size, generator=g), 1.0)
    return (x - x.min()) / (x.max() - x.min())


def _ssim_reference(x: np.ndarray, y: np.ndarray, *, data_range: float, window_size: int,
                    sigma: float) -> float:
    """Independent float64 SSIM of two ``(C, H, W)`` arrays, the way scikit-image computes it.

    scipy's ``gaussian_filter`` uses radius ``int(truncate * sigma + 0.5)``; ``truncate = r / sigma``
    gives exactly ``window_size = 2 r + 1`` taps. The border (``r`` pixels) is cropped afterwards, so
    the padding mode never enters the result: the valid region.
    """
    ndimage = pytest.importorskip("scipy.ndimage")
    r = (window_size - 1) // 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for xc, yc in zip(x, y, strict=True):
        def filt(a: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(a, sigma=sigma, truncate=r / sigma, mode="reflect")

        ux, uy = filt(xc), filt(yc)
        vx = filt(xc * xc) - ux * ux
        vy = filt(yc * yc) - uy * uy
        vxy = filt(xc * yc) - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
        values.append(s[r:s.shape[0] - r, r:s.shape[1] - r].mean())
    return float(np.mean(values))


# --- psnr -------------------------------------------------------------------------------------


def test_psnr_known_values():
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.8
    torch.testing.assert_close(psnr(x + 0.1, x), torch.full((2,), 20.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(x - 0.01, x), torch.full((2,), 40.0), atol=1e-3, rtol=0)
    # Error 0.2 on half of the pixels: MSE 0.02, PSNR 10 log10(50).
    y = x.clone()
    y[..., :4] += 0.2
    torch.testing.assert_close(psnr(y, x), torch.full((2,), 10 * math.log10(50)), atol=1e-4, rtol=0)
    # 8-bit range: the same relative error gives the same PSNR.
    torch.testing.assert_close(psnr(255 * x + 25.5, 255 * x, data_range=255.0), torch.full((2,), 20.0),
                               atol=1e-4, rtol=0)


def test_psnr_identical_is_inf_and_per_image():
    x = torch.rand(3, 1, 5, 6)
    y = x.clone()
    y[1] += 0.1
    out = psnr(y, x)
    assert out.shape == (3,)
    assert math.isinf(out[0]) and out[0] > 0 and math.isinf(out[2])
    assert abs(float(out[1]) - 20.0) < 1e-3


def test_psnr_target_batch_one_broadcasts():
    x = torch.rand(1, 3, 6, 6)
    preds = torch.cat([x + 0.1, x + 0.01])
    torch.testing.assert_close(psnr(preds, x), torch.tensor([20.0, 40.0]), atol=1e-3, rtol=0)


# --- ssim -------------------------------------------------------------------------------------


def test_ssim_identical_is_one():
    x = _structured_image(2)
    torch.testing.assert_close(ssim(x, x), torch.ones(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ssim(x.double(), x.double()), torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize(("window_size", "sigma", "data_range"),
                         [(11, 1.5, 1.0), (7, 1.0, 1.0), (11, 1.5, 2.0)])
def test_ssim_matches_independent_reference(window_size, sigma, data_range):
    pytest.importorskip("scipy")
    rng = np.random.default_rng(3)
    b, c, h, w = 3, 3, 32, 27
    target = rng.random((b, c, h, w))
    preds = [
        rng.random((c, h, w)),  # unrelated: SSIM near 0
        np.clip(target[1] + 0.1 * rng.standard_normal((c, h, w)), 0, 1),  # noisy copy
        0.6 * target[2] + 0.2,  # contrast and brightness change
    ]
    pred = np.stack(preds)
    expected = [_ssim_reference(pred[i], target[i], data_range=data_range, window_size=window_size,
                                sigma=sigma) for i in range(b)]
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        got = ssim(torch.from_numpy(pred).to(dtype), torch.from_numpy(target).to(dtype),
                   data_range=data_range, window_size=window_size, sigma=sigma)
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), expected, atol=tol, rtol=0)


def test_ssim_decreases_with_noise_and_is_symmetric():
    x = _structured_image(4)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=g)
    scores = [float(ssim(x + s * noise, x)) for s in (0.0, 0.02, 0.05, 0.1, 0.2)]
    assert all(a > b for a, b in itertools.pairwise(scores)), scores
    y = x + 0.05 * noise
    torch.testing.assert_close(ssim(x, y), ssim(y, x))


def test_ssim_batch_equals_individual_and_data_range_scales():
    a = torch.cat([_structured_image(6), _structured_image(7)])
    b = torch.cat([_structured_image(8), a[1:] * 0.9])
    batch = ssim(a, b)
    single = torch.cat([ssim(a[i:i + 1], b[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, single)
    torch.testing.assert_close(ssim(255 * a, 255 * b, data_range=255.0), batch, atol=1e-5, rtol=0)


def test_ssim_and_psnr_promote_half_inputs():
    x = _structured_image(9).half()
    assert ssim(x, x).dtype == torch.float32
    assert psnr(x + 0.1, x).dtype == torch.float32


def test_gradcheck_ssim_and_psnr():
    g = torch.Generator().manual_seed(10)
    x = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, 5, 6, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: ssim(p, y, window_size=3, sigma=1.0), (x,))
    assert torch.autograd.gradcheck(lambda p: psnr(p, y), (x,))


# --- laplacian_variance -----------------------------------------------------------------------


def test_laplacian_variance_blur_lowers_it():
    x = _structured_image(11)
    sharp = laplacian_variance(x)
    blurred = laplacian_variance(_gaussian_blur(x, 2.0))
    assert sharp.shape == (1,)
    assert float(blurred) < 0.2 * float(sharp)
    assert float(laplacian_variance(torch.full((2, 3, 6, 6), 0.3)).abs().max()) < 1e-12


def test_laplacian_variance_matches_opencv_on_rec601_luma():
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(2, 3, 20, 17, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    got = laplacian_variance(x)
    for i in range(2):
        rgb = x[i].numpy()
        gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        lap = cv2.Laplacian(gray, cv2.CV_64F)[1:-1, 1:-1]  # interior = the valid region
        assert abs(float(got[i]) - float(lap.var())) < 1e-12
    # One channel is used as is.
    gray = x[:, :1]
    torch.testing.assert_close(laplacian_variance(gray), laplacian_variance(gray.expand(-1, 3, -1, -1)))


# --- lv_corr ----------------------------------------------------------------------------------


def test_lv_corr_gaussian_blur_sweep_scores_high():
    x = _structured_image(13)
    ks = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    renders = [_gaussian_blur(x, s) for s in ks]
    lv = laplacian_variance(torch.cat(renders))
    assert torch.all(lv[1:] < lv[:-1])  # blur grows with K: sharpness falls strictly
    score = lv_corr(ks, renders)
    # Pearson is linear agreement; LapVar falls roughly like sigma**-4, so a monotone sweep scores < 1.
    assert 0.7 < score <= 1.0
    # Same value from a stacked tensor and from (C, H, W) items; equals -corrcoef(K, LapVar).
    assert lv_corr(ks, torch.cat(renders)) == pytest.approx(score, abs=1e-12)
    assert lv_corr(ks, [r[0] for r in renders]) == pytest.approx(score, abs=1e-12)
    assert score == pytest.approx(-np.corrcoef(ks, lv.double().numpy())[0, 1], abs=1e-9)
    # A renderer whose blur shrinks as K grows gets exactly the opposite score (equally spaced K).
    assert lv_corr(ks, renders[::-1]) == pytest.approx(-score, abs=1e-12)


def test_lv_corr_is_one_when_sharpness_falls_linearly_in_k():
    x = _structured_image(14)
    ks = [0.0, 1.0, 3.0, 4.0, 7.0]
    # Scaling contrast by sqrt(1 - k/10) makes LapVar exactly linear and decreasing in K.
    assert lv_corr(ks, [x * math.sqrt(1 - k / 10) for k in ks]) == pytest.approx(1.0, abs=1e-9)


def test_lv_corr_constant_sharpness_is_nan():
    x = _structured_image(15)
    assert math.isnan(lv_corr([1.0, 2.0, 3.0], [x, x, x]))


# --- search_k ---------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["ssim", "psnr"])
def test_search_k_recovers_blur_sigma(metric):
    x = _structured_image(16)
    target = _gaussian_blur(x, 1.7)
    ks = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    calls = []

    def render(s: float) -> torch.Tensor:
        calls.append(s)
        return _gaussian_blur(x, s)

    best, scores = search_k(render, target, ks, metric=metric)
    assert best == 1.5 and len(scores) == len(ks)
    assert scores.index(max(scores)) == 2
    assert calls == ks
    refined, scores_r = search_k(render, target, ks, metric=metric, refine=True, iterations=12)
    assert scores_r == scores
    assert abs(refined - 1.7) < 0.01
    assert len(calls) == 2 * len(ks) + 12 + 2  # grid twice, then iterations + 2 golden-section renders


def test_search_k_batched_target_and_exact_match():
    x = torch.cat([_structured_image(17), _structured_image(18)])
    best, scores = search_k(lambda s: _gaussian_blur(x, s), _gaussian_blur(x, 2.0), [1.0, 2.0, 3.0],
                            metric="psnr", refine=True)
    assert best == 2.0 and math.isinf(scores[1])  # an exact grid match needs no refinement


# --- exceptions -------------------------------------------------------------------------------


def test_input_errors():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(GenRefocusInputError, match="height and width"):
        psnr(x, torch.rand(1, 3, 16, 15))
    with pytest.raises(GenRefocusInputError, match="channel count"):
        ssim(x, torch.rand(1, 1, 16, 16))
    with pytest.raises(GenRefocusInputError, match="batch size"):
        psnr(torch.rand(2, 3, 16, 16), torch.rand(3, 3, 16, 16))
    with pytest.raises(GenRefocusInputError, match=r"data_range must be > 0"):
        psnr(x, x, data_range=0.0)
    with pytest.raises(GenRefocusInputError, match="window_size must be an odd integer"):
        ssim(x, x, window_size=4)
    with pytest.raises(GenRefocusInputError, match="at least window_size"):
        ssim(x[..., :8, :8], x[..., :8, :8])
    with pytest.raises(GenRefocusInputError, match="finite"):
        ssim(x, torch.full_like(x, float("nan")))
    with pytest.raises(GenRefocusInputError, match="floating-point"):
        psnr(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), x[..., :4, :4])
    with pytest.raises(GenRefocusInputError, match="channel"):
        laplacian_variance(torch.rand(1, 2, 8, 8))
    with pytest.raises(GenRefocusInputError, match="at least 3x3"):
        laplacian_variance(torch.rand(1, 1, 2, 8))
    with pytest.raises(GenRefocusInputError, match="at least 3 distinct"):
        lv_corr([1.0, 1.0, 2.0], [x, x, x])
    with pytest.raises(GenRefocusInputError, match="one render per K"):
        lv_corr([1.0, 2.0, 3.0], torch.rand(4, 3, 8, 8))
    with pytest.raises(GenRefocusInputError, match="must match renders"):
        lv_corr([1.0, 2.0, 3.0], [x, x, x[..., :8]])
    with pytest.raises(GenRefocusInputError, match="metric must be one of"):
        search_k(lambda k: x, x, [1.0], metric="lpips")
    with pytest.raises(GenRefocusInputError, match=r"render_fn\(1.0\) gave an unusable render"):
        search_k(lambda k: x[..., :8], x, [1.0])
    with pytest.raises(GenRefocusInputError, match="at least 2 distinct"):
        search_k(lambda k: x, x, [1.0], refine=True)
    with pytest.raises(GenRefocusInputError, match="iterations"):
        search_k(lambda k: x, x, [1.0, 2.0], refine=True, iterations=0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    a, b = _structured_image(19), _structured_image(20)
    for fn in (psnr, ssim):
        torch.testing.assert_close(fn(a.cuda(), b.cuda()).cpu(), fn(a, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(laplacian_variance(a.cuda()).cpu(), laplacian_variance(a),
                               atol=1e-7, rtol=1e-5)
