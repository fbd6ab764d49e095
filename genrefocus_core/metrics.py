"""Evaluation metrics: PSNR, SSIM, Laplacian-variance sharpness, LVCorr and the K search (Eq. 5).

Conventions:

* Images are ``(B, C, H, W)`` floats whose values span ``data_range`` (1.0 for images in [0, 1]).
* Per-image metrics return a ``(B,)`` tensor on the inputs' device, in float32 (float64 for
  float64 inputs: half-precision inputs are promoted, never computed in half).
* ``target`` may have batch size 1; it is then compared with every image of ``pred``.
* SSIM follows Wang et al. 2004 with a Gaussian window, ``K1 = 0.01``, ``K2 = 0.03``, population
  (biased) local variances, each channel separately and averaged, over the *valid* region only
  (no padding: the SSIM map is ``(H - w + 1) x (W - w + 1)`` for window size ``w``). With the
  defaults this is the value of scikit-image's
  ``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=...)``, which filters with ``truncate=3.5`` (11 taps) and crops the border.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._checks import check_bchw, check_finite, check_number, check_same_batch_and_size
from .errors import GenRefocusInputError

__all__ = [
    "LUMA_REC601",
    "laplacian_variance",
    "lv_corr",
    "psnr",
    "search_k",
    "ssim",
]

logger = logging.getLogger(__name__)

#: Rec. 601 luma weights (R, G, B) used for the sharpness measure.
LUMA_REC601 = (0.299, 0.587, 0.114)

_SSIM_K1 = 0.01
_SSIM_K2 = 0.03
_METRICS = ("ssim", "psnr")


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_pair(pred: object, target: object) -> tuple[Tensor, Tensor]:
    """Check a prediction/target pair and return both in the working dtype, target broadcast."""
    pred = check_bchw("pred", pred)
    target = check_bchw("target", target)
    if target.shape[1] != pred.shape[1]:
        raise GenRefocusInputError(
            f"target must have the same channel count as pred ({pred.shape[1]}), got shape "
            f"{tuple(target.shape)}"
        )
    check_same_batch_and_size("pred", pred, "target", target)
    if target.device != pred.device:
        raise GenRefocusInputError(f"target must be on pred's device {pred.device}, got {target.device}")
    check_finite("pred", pred)
    check_finite("target", target)
    dtype = torch.promote_types(_work_dtype(pred), _work_dtype(target))
    return pred.to(dtype), target.to(dtype).expand_as(pred)


def psnr(pred: Tensor, target: Tensor, *, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio per image, ``10 * log10(data_range**2 / MSE)``.

    The mean squared error is taken over all channels and pixels of each image.

    Args:
        pred: ``(B, C, H, W)`` image(s).
        target: ``(B, C, H, W)`` or ``(1, C, H, W)`` reference, same channels and size as ``pred``.
        data_range: the span of valid values (1.0 for [0, 1] images, 255.0 for 8-bit); ``> 0``.

    Returns:
        ``(B,)`` PSNR in dB; ``+inf`` where ``pred`` equals ``target``.

    Raises:
        GenRefocusInputError: if a tensor is not a finite floating ``(B, C, H, W)``, the shapes do
            not match, or ``data_range <= 0``.

    Example:
        >>> x = torch.zeros(2, 3, 4, 4)
        >>> psnr(x + 0.1, x).round(decimals=3).tolist()
        [20.0, 20.0]
        >>> psnr(x, x).tolist()
        [inf, inf]
    """
    pred, target = _check_pair(pred, target)
    data_range = check_number("data_range", data_range, lo=0.0, lo_open=True)
    mse = (pred - target).square().mean(dim=(1, 2, 3))
    # data_range**2 / 0 -> +inf, log10(inf) = inf: identical images score +inf without a branch.
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(window_size: int, sigma: float) -> Tensor:
    """Normalised float64 Gaussian taps on the CPU (they become Python floats in the filter)."""
    r = (window_size - 1) / 2
    x = torch.arange(window_size, dtype=torch.float64) - r
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: Tensor, window: Tensor) -> Tensor:
    """Separable filter of ``(..., H, W)`` along H then W, no padding (valid region).

    Written as a weighted sum of shifted slices rather than a depthwise ``conv2d``: grouped
    convolutions are very slow on CPU (tens of ms for a tiny float64 input), the slices are not.
    """
    n = window.numel()
    taps = window.tolist()
    h = x.shape[-2] - n + 1
    y = taps[0] * x[..., 0:h, :]
    for i in range(1, n):
        y = y + taps[i] * x[..., i:i + h, :]
    w = x.shape[-1] - n + 1
    z = taps[0] * y[..., 0:w]
    for i in range(1, n):
        z = z + taps[i] * y[..., i:i + w]
    return z


def ssim(pred: Tensor, target: Tensor, *, data_range: float = 1.0, window_size: int = 11,
         sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al. 2004) per image, Gaussian window, valid region.

    Local means, (biased) variances and covariance come from a normalised Gaussian window of
    ``window_size`` taps and standard deviation ``sigma``, applied without padding, so only windows
    lying fully inside the image count. With ``C1 = (0.01 * data_range)**2`` and
    ``C2 = (0.03 * data_range)**2`` the SSIM map is
    ``(2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x**2 + mu_y**2 + C1)(s_x**2 + s_y**2 + C2))``; it is
    averaged over the valid pixels of each channel and then over channels. Defaults reproduce
    scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``.

    Args:
        pred: ``(B, C, H, W)`` image(s), ``H`` and ``W`` at least ``window_size``.
        target: ``(B, C, H, W)`` or ``(1, C, H, W)`` reference, same channels and size as ``pred``.
        data_range: the span of valid values (1.0 for [0, 1] images); ``> 0``.
        window_size: odd number of Gaussian taps, ``>= 1``.
        sigma: Gaussian standard deviation in pixels; ``> 0``.

    Returns:
        ``(B,)`` SSIM in [-1, 1]; 1 for identical images. Differentiable.

    Raises:
        GenRefocusInputError: if a tensor is not a finite floating ``(B, C, H, W)``, the shapes do
            not match, the image is smaller than the window, or a scalar is out of range.

    Example:
        >>> x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> ssim(x, x).round(decimals=4).tolist()
        [1.0]
        >>> bool(ssim(x, 0.5 * x + 0.25) < 1.0)
        True
    """
    pred, target = _check_pair(pred, target)
    data_range = check_number("data_range", data_range, lo=0.0, lo_open=True)
    sigma = check_number("sigma", sigma, lo=0.0, lo_open=True)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1 \
            or window_size % 2 == 0:
        raise GenRefocusInputError(f"window_size must be an odd integer >= 1, got {window_size!r}")
    h, w = pred.shape[-2:]
    if h < window_size or w < window_size:
        raise GenRefocusInputError(
            f"pred must be at least window_size x window_size ({window_size}x{window_size}) pixels, "
            f"got {h}x{w} (HxW); lower window_size or use a larger image"
        )
    win = _gaussian_window(window_size, sigma)
    b, c = pred.shape[:2]
    # One filtering pass over the five local moments stacked along the channel axis.
    stats = _filter_valid(torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1), win)
    mu_x, mu_y, xx, yy, xy = stats.split(c, dim=1)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return smap.reshape(b, -1).mean(dim=1)


def laplacian_variance(image: Tensor) -> Tensor:
    """Sharpness: variance of the 3x3 Laplacian of the luminance over the valid region.

    Luminance is ``0.299 R + 0.587 G + 0.114 B`` (Rec. 601) for 3 channels, the channel itself for
    1. The Laplacian kernel is ``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` (OpenCV's ``Laplacian`` with
    ``ksize=1``), applied without padding, so the ``(H - 2) x (W - 2)`` interior is used; the
    variance is the population variance. Blur lowers it; this is the sharpness measure behind the
    Genfocus paper's controllability metric (see :func:`lv_corr`). The value scales with the square
    of the intensity scale (images in [0, 1] give values ``255**2`` times smaller than 8-bit ones).

    Args:
        image: ``(B, 1, H, W)`` or ``(B, 3, H, W)``, ``H, W >= 3``.

    Returns:
        ``(B,)`` non-negative variances.

    Raises:
        GenRefocusInputError: if ``image`` is not a finite floating ``(B, 1|3, H, W)`` of at least 3x3.

    Example:
        >>> x = torch.zeros(1, 1, 5, 5)
        >>> x[..., 2, 2] = 1.0
        >>> round(float(laplacian_variance(x)[0]), 4)  # Laplacian -4 once, 1 four times: 20 / 9
        2.2222
        >>> laplacian_variance(torch.full((1, 3, 5, 5), 0.7)).tolist()
        [0.0]
    """
    check_bchw("image", image, (1, 3))
    check_finite("image", image)
    if image.shape[-2] < 3 or image.shape[-1] < 3:
        raise GenRefocusInputError(f"image must be at least 3x3 pixels, got shape {tuple(image.shape)}")
    x = image.to(_work_dtype(image))
    if x.shape[1] == 3:
        weights = torch.tensor(LUMA_REC601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    # The 4-neighbour Laplacian [[0, 1, 0], [1, -4, 1], [0, 1, 0]] on the interior, as slices.
    lap = (x[..., :-2, 1:-1] + x[..., 2:, 1:-1] + x[..., 1:-1, :-2] + x[..., 1:-1, 2:]
           - 4.0 * x[..., 1:-1, 1:-1])
    return lap.flatten(1).var(dim=1, correction=0)


def _check_ks(ks: object, name: str = "ks") -> list[float]:
    if isinstance(ks, str | bytes) or not isinstance(ks, Sequence):
        raise GenRefocusInputError(f"{name} must be a sequence of numbers, got {type(ks).__name__}")
    return [check_number(f"{name}[{i}]", k) for i, k in enumerate(ks)]


def lv_corr(ks: Sequence[float], renders: Sequence[Tensor] | Tensor) -> float:
    """LVCorr: how well the sharpness of renders follows the blur strength K over a K sweep.

    ``LVCorr = -Pearson(K, laplacian_variance(render_K))`` over the renders of *one* image at
    several K. The sign is our choice, documented because it is easy to get wrong: the Genfocus
    paper (arXiv 2512.16923) reports LVCorr as higher-is-better for a renderer whose blur grows
    with K, but its exact formula was not available to us; since blur lowers the Laplacian
    variance, we negate the Pearson correlation so that a renderer whose sharpness falls linearly
    as K grows scores +1 and one that sharpens as K grows scores -1. Pearson measures *linear* agreement, so a
    monotone but strongly curved response scores a little below 1.

    Args:
        ks: the blur strengths, at least 3 distinct finite values (any order).
        renders: one render per K, as a ``(N, C, H, W)`` tensor or a sequence of ``N`` tensors of
            shape ``(1, C, H, W)`` or ``(C, H, W)``; ``C`` is 1 or 3, all the same shape.

    Returns:
        LVCorr in [-1, 1] as a Python float; NaN (with a warning logged) when the Laplacian
        variance is the same for every render, where the correlation is undefined.

    Raises:
        GenRefocusInputError: fewer than 3 distinct K, a count mismatch, or bad render tensors.

    Example:
        >>> x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> ks = [0.0, 2.0, 4.0, 6.0]
        >>> round(lv_corr(ks, [x * (1 - k / 10) ** 0.5 for k in ks]), 6)  # LapVar linear in K
        1.0
    """
    k_list = _check_ks(ks)
    if len(set(k_list)) < 3:
        raise GenRefocusInputError(f"ks must hold at least 3 distinct values, got {k_list}")
    if isinstance(renders, Tensor):
        stack = renders
    else:
        if isinstance(renders, str | bytes) or not isinstance(renders, Sequence):
            raise GenRefocusInputError(
                f"renders must be a tensor or a sequence of tensors, got {type(renders).__name__}"
            )
        items = []
        for i, r in enumerate(renders):
            if not isinstance(r, Tensor):
                raise GenRefocusInputError(f"renders[{i}] must be a torch.Tensor, got {type(r).__name__}")
            if r.ndim == 3:
                r = r.unsqueeze(0)
            if r.ndim != 4 or r.shape[0] != 1:
                raise GenRefocusInputError(
                    f"renders[{i}] must have shape (1, C, H, W) or (C, H, W), got {tuple(r.shape)}"
                )
            if i and (r.shape != items[0].shape or r.device != items[0].device):
                raise GenRefocusInputError(
                    f"renders[{i}] must match renders[0] in shape and device, got {tuple(r.shape)} on "
                    f"{r.device} vs {tuple(items[0].shape)} on {items[0].device}"
                )
            items.append(r)
        if not items:
            raise GenRefocusInputError("renders must not be empty")
        stack = torch.cat(items, dim=0)
    check_bchw("renders", stack, (1, 3))
    if stack.shape[0] != len(k_list):
        raise GenRefocusInputError(
            f"renders must hold one render per K ({len(k_list)}), got {stack.shape[0]}"
        )
    lv = laplacian_variance(stack).to(device="cpu", dtype=torch.float64)
    k = torch.tensor(k_list, dtype=torch.float64)
    kc = k - k.mean()
    lc = lv - lv.mean()
    denom = float(torch.sqrt((kc * kc).sum() * (lc * lc).sum()))
    # Relative test: float noise in an "unchanged" render must not produce a spurious correlation.
    if denom == 0.0 or float(lc.abs().max()) <= 1e-12 * max(float(lv.abs().max()), 1e-300):
        logger.warning("lv_corr: the Laplacian variance is the same for every K; LVCorr is undefined (NaN)")
        return float("nan")
    return -float((kc * lc).sum()) / denom


def search_k(render_fn: Callable[[float], Tensor], target: Tensor, ks: Sequence[float], *,
             metric: str = "ssim", data_range: float = 1.0, refine: bool = False,
             iterations: int = 10) -> tuple[float, list[float]]:
    """K search (Genfocus paper, Eq. 5): the K whose render best matches a target.

    Renders ``render_fn(k)`` for every ``k`` in ``ks`` and scores it against ``target`` with SSIM
    (default) or PSNR, averaged over the batch; the best score wins, the first K on ties. With
    ``refine=True`` a golden-section search then runs inside the bracket formed by the best grid
    K's neighbours in sorted order (assuming the score is unimodal there): ``iterations`` steps,
    ``iterations + 2`` more renders, the bracket shrinking by ``0.618**iterations``; the best K seen
    anywhere is returned, which may lie between grid values. An infinite grid score (an exact match
    under PSNR) skips the refinement.
    Runs under ``torch.no_grad()``.

    Args:
        render_fn: maps a K to a render ``(B, C, H, W)`` of ``target``'s shape (batch 1 allowed
            for either).
        target: ``(B, C, H, W)`` reference image(s).
        ks: candidate K values, at least 1 (at least 2 distinct with ``refine``), finite.
        metric: ``"ssim"`` or ``"psnr"``; higher is better for both.
        data_range: the span of valid values, passed to the metric; ``> 0``.
        refine: run the golden-section refinement.
        iterations: golden-section steps, ``>= 1``.

    Returns:
        ``(best_k, scores)``: the best K and the grid scores, ``scores[i]`` for ``ks[i]``.

    Raises:
        GenRefocusInputError: bad ``ks``, ``metric``, ``iterations``, target, or a render of the
            wrong shape.

    Example:
        >>> x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> best, scores = search_k(lambda k: x * k, x * 0.5, [0.25, 0.5, 1.0], metric="psnr")
        >>> best, scores[1]
        (0.5, inf)
    """
    if not callable(render_fn):
        raise GenRefocusInputError(f"render_fn must be callable, got {type(render_fn).__name__}")
    check_bchw("target", target)
    check_finite("target", target)
    k_list = _check_ks(ks)
    if not k_list:
        raise GenRefocusInputError("ks must hold at least one value, got []")
    if metric not in _METRICS:
        raise GenRefocusInputError(f"metric must be one of {_METRICS}, got {metric!r}")
    data_range = check_number("data_range", data_range, lo=0.0, lo_open=True)
    if not isinstance(refine, bool):
        raise GenRefocusInputError(f"refine must be a bool, got {refine!r}")
    if refine:
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise GenRefocusInputError(f"iterations must be an integer >= 1, got {iterations!r}")
        if len(set(k_list)) < 2:
            raise GenRefocusInputError(
                f"ks must hold at least 2 distinct values with refine=True, got {k_list}"
            )
    score_fn = ssim if metric == "ssim" else psnr

    def score(k: float) -> float:
        render = render_fn(k)
        if not isinstance(render, Tensor):
            raise GenRefocusInputError(
                f"render_fn({k}) must return a torch.Tensor, got {type(render).__name__}"
            )
        if render.shape[0] == 1 and target.shape[0] > 1:
            render = render.expand(target.shape[0], -1, -1, -1)
        try:
            values = score_fn(render, target, data_range=data_range)
        except GenRefocusInputError as e:
            raise GenRefocusInputError(f"render_fn({k}) gave an unusable render: {e}") from e
        return float(values.mean())

    with torch.no_grad():
        scores = [score(k) for k in k_list]
        best_i = max(range(len(k_list)), key=lambda i: (scores[i], -i))
        best_k, best_s = k_list[best_i], scores[best_i]
        logger.debug("search_k grid: best K %s (%s %.6g)", best_k, metric, best_s)
        if not refine or math.isinf(best_s):
            return best_k, scores

        grid = sorted(set(k_list))
        j = grid.index(best_k)
        a, b = grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)]
        inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        fc, fd = score(c), score(d)
        seen = [(fc, c), (fd, d)]
        for _ in range(iterations):
            if fc > fd:
                b, d, fd = d, c, fc
                c = b - inv_phi * (b - a)
                fc = score(c)
                seen.append((fc, c))
            else:
                a, c, fc = c, d, fd
                d = a + inv_phi * (b - a)
                fd = score(d)
                seen.append((fd, d))
        for s, k in seen:
            if s > best_s:
                best_s, best_k = s, k
        logger.debug("search_k refined: best K %s (%s %.6g)", best_k, metric, best_s)
    return best_k, scores
