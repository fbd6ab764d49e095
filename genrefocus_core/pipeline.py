"""The Genfocus pipeline: the only place where the stages are put in order (official-pipeline.md §1).

:func:`refocus` runs, for every frame of a batch::

    photo ──resize (§3)──► DeblurNet (§8) ──► all-in-focus (AIF)
    AIF ──depth model, or a given depth map (§10)──► disparity ──focus, K──► D_def
    AIF + D_def ──► BokehNet (§9) ──► refocused image

:func:`deblur_image` and :func:`bokeh_image` run the first and the second half on their own.
``k == 0`` returns the all-in-focus image and skips depth and BokehNet, as the official demo.
The order is written once, in :func:`~genrefocus_core._stages.run_stages`, which the native backend
(:mod:`~genrefocus_core.native_pipeline`) shares; this module gives it the reference backend.

Geometry (:mod:`~genrefocus_core.geometry`). Generation happens at the *processed size*
(multiples of 16 px, §3). Inputs given at the photo's own geometry (depth maps, focus points and
masks, the pre-deblurred image) follow the photo's resize and crop with ``geometry="aligned"``
(default, fix #6 of §14) or are stretched as by the official CLI with ``geometry="official"``;
both agree whenever nothing is cropped.

``restore_size=True`` maps ``image`` and ``aif`` back to the input size with
:func:`~genrefocus_core.geometry.restore_input_size` (the exact geometric inverse of the resize and
crop; the cropped bands, at most 15 px of the scaled image per side, repeat the edge pixels). Depth
and defocus maps stay at the processed size.

Weights: :func:`~genrefocus_core.models.load_genfocus_models` (both LoRAs resident at once).
With ``models.offload_device`` set (memory modes), the depth model waits there and comes to the
compute device only to estimate depth, and each stage moves the other stage's LoRA there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from functools import partial

import torch  # noqa: F401  (used by the doctests)
from torch import Tensor

from ._checks import check_bchw, check_finite, check_number
from ._stages import Backend, RefocusResult, run_stages
from .conditions import ResizeInfo, processed_size
from .defocus import DefocusMap, FocusTarget
from .depth import DepthMap
from .depth_models import DepthModel
from .errors import GenRefocusInputError, GenRefocusModelError
from .genpipe import GenerationOptions, GenfocusModels, bokeh, deblur
from .geometry import GEOMETRIES, restore_input_size
from .memory import execution_device_dtype
from .models import ADAPTER_BOKEH, ADAPTER_DEBLUR, ADAPTER_PRE_DEBLUR, LORA_FILES, load_genfocus_models

__all__ = [
    "ADAPTER_BOKEH",
    "ADAPTER_DEBLUR",
    "ADAPTER_PRE_DEBLUR",
    "DEFAULT_OPTIONS",
    "GEOMETRIES",
    "MAX_STEPS",
    "MIN_SIDE",
    "RefocusResult",
    "bokeh_image",
    "check_inputs",
    "deblur_image",
    "load_genfocus_models",
    "refocus",
    "restore_input_size",
]

logger = logging.getLogger(__name__)

#: Most sampler steps accepted (the demo offers 8-50; the official default is 28).
MAX_STEPS = 100
#: Smallest image side in px (one FLUX token is 16 px).
MIN_SIDE = 16
# Values of ``image`` outside [0, 1] by more than this are refused (e.g. a 0-255 image).
_RANGE_SLACK = 1e-3

#: The official sampler settings (28 steps, automatic tiling, the official noise recipe).
DEFAULT_OPTIONS = GenerationOptions()

OnStep = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------


def _has_adapter(models: GenfocusModels, name: str) -> bool:
    return name in (getattr(models.transformer, "peft_config", None) or {})


def _require(models: object, adapter: str, prompt: str) -> None:
    if not isinstance(models, GenfocusModels):
        raise GenRefocusInputError(f"models must be a GenfocusModels, got {type(models).__name__}")
    if not _has_adapter(models, adapter):
        loaded = sorted(getattr(models.transformer, "peft_config", None) or {}) or "none"
        raise GenRefocusModelError(
            f"the LoRA adapter {adapter!r} is not loaded (loaded: {loaded}); load {LORA_FILES[adapter]} "
            f"with load_genfocus_models()"
        )
    if prompt not in models.prompts:
        raise GenRefocusModelError(
            f"the cached prompt embedding {prompt!r} is missing (have: {sorted(models.prompts)}); use the "
            "GenRefocus prompt-embedding file"
        )


def _check_batch(name: str, n: int, b: int) -> None:
    if n not in (1, b):
        raise GenRefocusInputError(f"{name} must have batch size 1 or {b} (that of image), got {n}")


def check_inputs(
    image: Tensor,
    *,
    stage: str = "refocus",
    models: GenfocusModels | None = None,
    k: float = 20.0,
    options: GenerationOptions = DEFAULT_OPTIONS,
    depth_model: DepthModel | None = None,
    depth: DepthMap | None = None,
    defocus: DefocusMap | None = None,
    focus: FocusTarget | None = None,
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
    long_side: int = 0,
    geometry: str = "aligned",
) -> ResizeInfo:
    """Check every input of a pipeline run before any compute (diffusers' ``check_inputs`` style).

    Args:
        image: ``(B, 3, H, W)`` RGB in [0, 1], both sides ``>= 16`` px.
        stage: ``"deblur"``, ``"bokeh"`` (from an all-in-focus image) or ``"refocus"`` (both).
        models: the loaded weights (adapters and prompts the stage needs); None skips these checks.
        k: blur strength, ``>= 0``; 0 skips BokehNet.
        options: sampler options; ``steps`` in ``1..MAX_STEPS``.
        depth_model: a depth estimator run on the all-in-focus image.
        depth: a given depth map (any size; resized to the processed size).
        defocus: ``stage="bokeh"`` only: a CoC map at the image's input size or its processed size
            (replaces ``depth``, ``focus`` and ``k``).
        focus: where to focus (default: the centre); a mask has batch 1 or B.
        pre_deblurred: ``(1 or B, 3, h, w)`` pre-deblurred image for the pre-deblur DeblurNet.
        pre_deblur_variant: use the pre-deblur DeblurNet even without ``pre_deblurred``.
        long_side: 0 (keep) or the processed longer side in px, ``>= 16``.
        geometry: one of :data:`GEOMETRIES`.

    Returns:
        The :class:`~genrefocus_core.conditions.ResizeInfo` the run will use.

    Raises:
        GenRefocusInputError: a bad value, naming the parameter.
        GenRefocusModelError: a LoRA adapter or prompt embedding the stage needs is not loaded.

    Example:
        >>> check_inputs(torch.rand(1, 3, 90, 140), stage="deblur").size
        (144, 96)
        >>> check_inputs(torch.rand(1, 3, 8, 8), stage="deblur")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        GenRefocusInputError: image must be at least 16x16 px, got 8x8
    """
    if stage not in ("deblur", "bokeh", "refocus"):
        raise GenRefocusInputError(f"stage must be 'deblur', 'bokeh' or 'refocus', got {stage!r}")
    if isinstance(image, Tensor) and image.ndim == 4 and image.shape[1] != 3:
        raise GenRefocusInputError(
            f"image must be RGB with 3 channels (B, 3, H, W), got shape {tuple(image.shape)}"
        )
    check_bchw("image", image, 3)
    b, _, h, w = image.shape
    if h < MIN_SIDE or w < MIN_SIDE:
        raise GenRefocusInputError(f"image must be at least {MIN_SIDE}x{MIN_SIDE} px, got {h}x{w}")
    check_finite("image", image)
    lo, hi = float(image.min()), float(image.max())
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise GenRefocusInputError(
            f"image must hold values in [0, 1], got [{lo:.4g}, {hi:.4g}]; divide a 0-255 image by 255"
        )
    if not isinstance(options, GenerationOptions):
        raise GenRefocusInputError(f"options must be a GenerationOptions, got {type(options).__name__}")
    if not 1 <= options.steps <= MAX_STEPS:
        raise GenRefocusInputError(f"steps must be in 1..{MAX_STEPS}, got {options.steps}")
    if isinstance(long_side, bool) or not isinstance(long_side, int) or (0 < long_side < MIN_SIDE):
        raise GenRefocusInputError(
            f"long_side must be 0 (keep the size) or an integer >= {MIN_SIDE} px, got {long_side!r}"
        )
    if geometry not in GEOMETRIES:
        raise GenRefocusInputError(f"geometry must be one of {', '.join(GEOMETRIES)}, got {geometry!r}")
    info = processed_size(int(w), int(h), long_side)
    if stage != "bokeh":
        variant = pre_deblur_variant or pre_deblurred is not None
        if pre_deblurred is not None:
            check_bchw("pre_deblurred", pre_deblurred, 3)
            check_finite("pre_deblurred", pre_deblurred)
            _check_batch("pre_deblurred", pre_deblurred.shape[0], b)
        if models is not None:
            _require(models, ADAPTER_PRE_DEBLUR if variant else ADAPTER_DEBLUR, "deblur")
    elif pre_deblurred is not None or pre_deblur_variant:
        raise GenRefocusInputError("pre_deblurred must be None for the bokeh stage (the image is the AIF)")
    if stage == "deblur":
        return info
    if defocus is not None:
        if stage != "bokeh":
            raise GenRefocusInputError("defocus must be None for stage 'refocus'; give depth or depth_model")
        if not isinstance(defocus, DefocusMap):
            raise GenRefocusInputError(f"defocus must be a DefocusMap, got {type(defocus).__name__}")
        if depth is not None or depth_model is not None:
            raise GenRefocusInputError("give either defocus or depth/depth_model, not both")
        size = tuple(defocus.coc.shape[-2:])
        if size not in ((h, w), (info.size[1], info.size[0])):
            raise GenRefocusInputError(
                f"defocus must have the size of the all-in-focus image ({h}x{w}) or its processed size "
                f"({info.size[1]}x{info.size[0]}), got {size[0]}x{size[1]}; compute it from a depth map of "
                "the same image"
            )
        _check_batch("defocus", defocus.coc.shape[0], b)
        k = defocus.k
    check_number("k", k, lo=0.0)
    if k == 0:
        return info
    if defocus is None:
        if (depth is None) == (depth_model is None):
            raise GenRefocusInputError(
                "exactly one of depth_model and depth must be given when k > 0, got "
                f"{'both' if depth is not None else 'neither'}"
            )
        if depth_model is not None and not isinstance(depth_model, DepthModel):
            raise GenRefocusInputError(
                f"depth_model must be a DepthModel (load_depth_model), got {type(depth_model).__name__}"
            )
        if depth is not None:
            if not isinstance(depth, DepthMap):
                raise GenRefocusInputError(f"depth must be a DepthMap, got {type(depth).__name__}")
            check_finite("depth.disparity", depth.disparity)
            _check_batch("depth", depth.batch_size, b)
        if focus is not None:
            if not isinstance(focus, FocusTarget):
                raise GenRefocusInputError(f"focus must be a FocusTarget, got {type(focus).__name__}")
            if focus.kind == "mask" and focus.mask is not None:
                _check_batch("focus.mask", focus.mask.shape[0], b)
    if models is not None:
        _require(models, ADAPTER_BOKEH, "bokeh")
    return info


# ------------------------------------------------------------------------------------------------
# The reference backend's stages (the stage order itself: _stages.run_stages, shared with native_pipeline)
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _depth_in_use(models: GenfocusModels, depth_model: DepthModel) -> Iterator[None]:
    """The depth model on the transformer's compute device while it runs, else on ``offload_device``.

    Only with ``models.offload_device`` set (the memory modes' choice); otherwise it stays put.
    """
    if models.offload_device is None:
        yield
        return
    device, _ = execution_device_dtype(models.transformer)
    depth_model.to(device)
    try:
        yield
    finally:
        depth_model.to(models.offload_device)


def _park_depth(models: GenfocusModels, depth_model: DepthModel | None) -> None:
    """Move an idle depth model off the compute device before DeblurNet runs (offload_device set)."""
    if depth_model is not None and models.offload_device is not None:
        depth_model.to(models.offload_device)


def _backend(models: GenfocusModels) -> Backend:
    return Backend(
        check=partial(check_inputs, models=models),  # it checks the adapters and prompts too
        deblur=partial(deblur, models),
        bokeh=partial(bokeh, models),
        depth_in_use=partial(_depth_in_use, models),
        park_depth=partial(_park_depth, models),
    )


def deblur_image(
    image: Tensor,
    *,
    models: GenfocusModels,
    options: GenerationOptions = DEFAULT_OPTIONS,
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
    long_side: int = 0,
    geometry: str = "aligned",
    restore_size: bool = False,
    on_step: OnStep | None = None,
) -> RefocusResult:
    """DeblurNet on a photo: resize (§3), then an all-in-focus image per frame (§8).

    Args:
        image: ``(B, 3, H, W)`` blurry photo in [0, 1], sides ``>= 16`` px.
        models: weights with the DeblurNet LoRA (or the pre-deblur one for the variant).
        options: sampler options.
        pre_deblurred: ``(1 or B, 3, h, w)`` image from another deblurring method; selects the
            pre-deblur DeblurNet (:data:`ADAPTER_PRE_DEBLUR`).
        pre_deblur_variant: use the pre-deblur DeblurNet with a black pre-deblurred image.
        long_side: 0 = keep the size, else the processed longer side in px.
        geometry: how ``pre_deblurred`` (at the photo's size) follows the crop, see the module doc.
        restore_size: map the result back to the input size.
        on_step: ``on_step(done, total)`` per step and tile over the whole batch.

    Returns:
        A :class:`RefocusResult` with ``image == aif`` and no maps.

    Raises:
        GenRefocusInputError: bad inputs (see :func:`check_inputs`).
        GenRefocusModelError: the needed LoRA is not loaded.

    Example:
        >>> out = deblur_image(photo, models=models, long_side=1024, restore_size=True)  # doctest: +SKIP
        >>> out.image.shape == photo.shape  # doctest: +SKIP
        True
    """
    return run_stages(_backend(models), "deblur", image, options=options, pre_deblurred=pre_deblurred,
                      pre_deblur_variant=pre_deblur_variant, long_side=long_side, geometry=geometry,
                      restore_size=restore_size, on_step=on_step)


def bokeh_image(
    aif: Tensor,
    *,
    models: GenfocusModels,
    depth_model: DepthModel | None = None,
    depth: DepthMap | None = None,
    defocus: DefocusMap | None = None,
    focus: FocusTarget | None = None,
    k: float = 20.0,
    options: GenerationOptions = DEFAULT_OPTIONS,
    long_side: int = 0,
    geometry: str = "aligned",
    restore_size: bool = False,
    on_step: OnStep | None = None,
) -> RefocusResult:
    """BokehNet on an all-in-focus image: resize (§3), disparity, D_def, BokehNet per frame (§9, §10).

    The disparity comes from ``depth_model`` (run on the resized AIF), from ``depth`` (resized), or
    from a ready ``defocus`` map (its disparity, focus and K; at the AIF's input or processed size).

    Args:
        aif: ``(B, 3, H, W)`` all-in-focus image in [0, 1].
        models: weights with the BokehNet LoRA.
        depth_model: depth estimator.
        depth: depth map of the AIF (any size).
        defocus: a CoC map (replaces ``depth``, ``focus`` and ``k``).
        focus: where to focus (default: centre).
        k: blur strength (px*m for metric depth, as Genfocus; the demo's default is 20); 0 returns
            the AIF.
        options: sampler options.
        long_side: 0 = keep the size, else the processed longer side in px.
        geometry: see the module docstring.
        restore_size: map the results back to the input size.
        on_step: ``on_step(done, total)`` per step and tile (and per depth frame).

    Returns:
        A :class:`RefocusResult`.

    Raises:
        GenRefocusInputError: bad inputs (see :func:`check_inputs`).
        GenRefocusModelError: the BokehNet LoRA is not loaded.

    Example:
        >>> out = bokeh_image(aif, models=models, depth_model=depth_pro, k=20,
        ...                   focus=FocusTarget("point", x=0.4, y=0.5))  # doctest: +SKIP
        >>> float(out.defocus.max()) <= 1.0  # doctest: +SKIP
        True
    """
    return run_stages(_backend(models), "bokeh", aif, depth_model=depth_model, depth=depth, defocus=defocus,
                      focus=focus, k=k, options=options, long_side=long_side, geometry=geometry,
                      restore_size=restore_size, on_step=on_step)


def refocus(
    image: Tensor,
    *,
    models: GenfocusModels,
    depth_model: DepthModel | None = None,
    depth: DepthMap | None = None,
    focus: FocusTarget | None = None,
    k: float = 20.0,
    options: GenerationOptions = DEFAULT_OPTIONS,
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
    long_side: int = 0,
    geometry: str = "aligned",
    restore_size: bool = False,
    on_step: OnStep | None = None,
) -> RefocusResult:
    """The whole Genfocus pipeline on a photo: resize → DeblurNet → depth → D_def → BokehNet.

    Every frame of the batch is processed on its own, with the official noise recipe of
    ``options`` (the same noise for every frame). Depth comes from ``depth_model`` run on the
    all-in-focus image (as the official demo), or from ``depth`` (a map of the input photo, any
    size, resized bilinearly; metric depth is resized before taking 1/depth, as the official CLI
    does with ``.npy`` files). ``k == 0`` returns the all-in-focus image (no depth, no BokehNet).

    Args:
        image: ``(B, 3, H, W)`` photo in [0, 1], sides ``>= 16`` px.
        models: weights with the DeblurNet and BokehNet LoRAs.
        depth_model: depth estimator run on the all-in-focus image.
        depth: depth map of the photo instead of a model.
        focus: where to focus (point/mask given on the input photo; default: centre).
        k: blur strength, ``>= 0`` (px*m with metric depth; demo default 20, official CLI 15).
        options: sampler options (``steps`` in 1..100).
        pre_deblurred: optional pre-deblurred photo (pre-deblur DeblurNet).
        pre_deblur_variant: the pre-deblur DeblurNet with a black pre-deblurred image.
        long_side: 0 = keep the size, else the processed longer side in px.
        geometry: ``"aligned"`` or ``"official"`` (see the module docstring).
        restore_size: map ``image`` and ``aif`` back to the input size.
        on_step: ``on_step(done, total)`` per denoise step and tile, and per depth frame, over the
            whole batch; it may raise to interrupt (the models stay usable).

    Returns:
        A :class:`RefocusResult`.

    Raises:
        GenRefocusInputError: bad inputs, naming the parameter (see :func:`check_inputs`).
        GenRefocusModelError: a needed LoRA or prompt embedding is not loaded.

    Example:
        >>> models = load_genfocus_models("models/diffusers/FLUX.1-dev", ...)  # doctest: +SKIP
        >>> out = refocus(photo, models=models, depth=depth, focus=FocusTarget("point", x=0.3, y=0.6),
        ...               k=20)  # doctest: +SKIP
        >>> out.image.shape == out.aif.shape  # doctest: +SKIP
        True
    """
    return run_stages(_backend(models), "refocus", image, depth_model=depth_model, depth=depth, focus=focus,
                      k=k, options=options, pre_deblurred=pre_deblurred,
                      pre_deblur_variant=pre_deblur_variant, long_side=long_side, geometry=geometry,
                      restore_size=restore_size, on_step=on_step)
