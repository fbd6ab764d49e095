"""DeblurNet, BokehNet and the whole refocus on the native backend (a BFL-layout FLUX, e.g. ComfyUI's).

The same stages as :mod:`~genrefocus_core.genpipe` and :mod:`~genrefocus_core.pipeline` (resize,
official noise recipe, conditions, tiled Euler sampling, decode, 8-bit output, restore size), with
the transformer forward of :func:`~genrefocus_core.native_flux.native_flux_forward` and the VAE
behind a small :class:`LatentCodec` interface, so any VAE can serve: ComfyUI's ``VAE`` object
(``nodes/native.py``) or a diffusers ``AutoencoderKL`` (:class:`DiffusersVaeCodec`, used to
check the two backends against each other).

Differences from the reference backend that come from the *inputs*, not the maths (README "Which
backend?"): ComfyUI's VAE encodes to the posterior **mean** (official: a posterior sample), and
CONDITIONING from ComfyUI's FLUX text encoder pads T5 to 256 tokens (official: 512); the cached
prompt file holds the official 512-token embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from ._generation import (
    bokeh_batch,
    check_condition,
    check_token_grid,
    condition_tokens,
    deblur_batch,
    initial_latents,
    sampling_plan,
)
from ._stages import Backend, RefocusResult, run_stages
from .conditions import ConditionTokens, encode_condition, latent_image_ids, pack_latents, unpack_latents
from .defocus import DefocusMap, FocusTarget
from .depth import DepthMap
from .depth_models import DepthModel
from .errors import GenRefocusInputError, GenRefocusModelError
from .genpipe import ConditionInput, GenerationOptions, GenerationResult
from .models import ADAPTER_BOKEH, ADAPTER_DEBLUR, LORA_FILES
from .native_flux import AttentionFn, NativeLora, flux_dims, native_flux_forward
from .pipeline import DEFAULT_OPTIONS, check_inputs
from .prompts import PromptEmbedding
from .sampler import FLUX_DEV_SHIFT, FlowShift

__all__ = [
    "DiffusersVaeCodec",
    "LatentCodec",
    "NativeModels",
    "native_bokeh",
    "native_bokeh_image",
    "native_deblur",
    "native_deblur_image",
    "native_generate",
    "native_generate_from_tokens",
    "native_refocus",
]

logger = logging.getLogger(__name__)

OnStep = Callable[[int, int], None]


class LatentCodec(Protocol):
    """The VAE as the native backend needs it.

    ``encode(pixels, noise)``: VAE-range pixels ``(B, 3, H, W)`` float32 → **model-space** latents
    ``(B, C, H/8, W/8)`` (shifted and scaled, FLUX: ``(z - 0.1159) * 0.3611``); ``noise`` = the eps
    of a posterior sample, or None for the posterior mean (a codec may refuse to sample).
    ``decode(latents)``: model-space latents → image ``(B, 3, H, W)`` in [0, 1].
    """

    latent_channels: int

    def encode(self, pixels: Tensor, noise: Tensor | None = None) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


class DiffusersVaeCodec:
    """A diffusers ``AutoencoderKL`` as a :class:`LatentCodec` (mean or posterior sample, as upstream).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> class Vae(torch.nn.Module):  # the diffusers interface: 8x average pool -> mean, logvar 0
        ...     config = NS(scaling_factor=1.0, shift_factor=0.0, latent_channels=16)
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.ones(1))
        ...     def encode(self, x):
        ...         m = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]
        ...         return NS(latent_dist=NS(parameters=torch.cat([m, torch.zeros_like(m)], 1)))
        >>> DiffusersVaeCodec(Vae()).encode(torch.zeros(1, 3, 32, 48)).shape
        torch.Size([1, 16, 4, 6])
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.latent_channels = int(vae.config.latent_channels)

    def _device_dtype(self) -> tuple[torch.device, torch.dtype]:
        p = next(self.vae.parameters())
        return p.device, p.dtype

    def encode(self, pixels: Tensor, noise: Tensor | None = None) -> Tensor:
        device, dtype = self._device_dtype()
        x = pixels.to(device=device, dtype=dtype)
        h, w = x.shape[-2:]
        with torch.no_grad():
            tokens = encode_condition(self.vae, x, mode="mean" if noise is None else "sample", noise=noise)
        return unpack_latents(tokens, int(h), int(w))

    def decode(self, latents: Tensor) -> Tensor:
        device, dtype = self._device_dtype()
        z = (
            latents.to(device=device, dtype=dtype) / self.vae.config.scaling_factor
            + self.vae.config.shift_factor
        )
        with torch.no_grad():
            out = self.vae.decode(z, return_dict=False)[0]
        return (out.float() * 0.5 + 0.5).clamp(0, 1)


@dataclass
class NativeModels:
    """What a native Genfocus stage needs.

    Attributes:
        flux: BFL-layout FLUX module tree (ComfyUI: ``model_patcher.model.diffusion_model``).
        loras: adapter name → :class:`~genrefocus_core.native_flux.NativeLora` on ``device``/``dtype``.
        codec: the VAE (:class:`LatentCodec`).
        prompts: prompt name (``"deblur"``, ``"bokeh"``) → embedding.
        device: compute device.
        dtype: compute dtype (ComfyUI: the model's manual-cast or weight dtype).
        shift: scheduler shift constants.
        attention: attention kernel (None: torch SDPA).
        prepare: called before every denoise with the image-like tokens of one transformer call
            (ComfyUI: load the MODEL with that much working memory, after the VAE ran).
    """

    flux: Any
    loras: Mapping[str, NativeLora]
    codec: LatentCodec
    prompts: Mapping[str, PromptEmbedding]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    shift: FlowShift = FLUX_DEV_SHIFT
    attention: AttentionFn | None = None
    prepare: Callable[[int], None] | None = None


def _require(models: object, adapter: str | None = None, prompt: str | None = None) -> NativeModels:
    if not isinstance(models, NativeModels):
        raise GenRefocusInputError(f"models must be a NativeModels, got {type(models).__name__}")
    if adapter is not None and adapter not in models.loras:
        raise GenRefocusModelError(
            f"the LoRA adapter {adapter!r} is not loaded "
            f"(loaded: {', '.join(sorted(models.loras)) or 'none'}); "
            f"load {LORA_FILES.get(adapter, adapter)}"
        )
    if prompt is not None and prompt not in models.prompts:
        raise GenRefocusModelError(
            f"the prompt embedding {prompt!r} is missing (have: {sorted(models.prompts)}); use the "
            "GenRefocus prompt-embedding file or a CONDITIONING input"
        )
    return models


# ------------------------------------------------------------------------------------------------
# One image at the processed size
# ------------------------------------------------------------------------------------------------


def native_generate_from_tokens(
    models: NativeModels,
    latents: Tensor,
    conditions: Sequence[ConditionTokens],
    height: int,
    width: int,
    *,
    prompt: str,
    guidance: float,
    options: GenerationOptions = DEFAULT_OPTIONS,
    on_step: OnStep | None = None,
) -> GenerationResult:
    """Denoise given noise with given condition tokens, then decode (the native twin of
    :func:`~genrefocus_core.genpipe.generate_from_tokens`: same sigmas, tiling and blending).

    Args:
        models: the native weights.
        latents: ``(B, N, 64)`` packed initial noise, ``N = (H/16)*(W/16)``.
        conditions: condition streams on the same token grid.
        height: image height in px (multiple of 16).
        width: image width in px (multiple of 16).
        prompt: prompt name in ``models.prompts``.
        guidance: guidance embedding of text/image streams (ignored by a FLUX without one).
        options: sampler options.
        on_step: progress ``(done, total)`` per step and tile; may raise to interrupt.

    Returns:
        A :class:`~genrefocus_core.genpipe.GenerationResult`; ``decoded`` is ``2 * image - 1`` of the
        codec's (clamped) output, ``image`` is rounded to 8-bit levels like the official PNG.

    Raises:
        GenRefocusInputError: inconsistent sizes.
        GenRefocusModelError: a missing prompt or adapter.

    Example:
        >>> out = native_generate_from_tokens(models, noise_tokens, conds, 512, 768, prompt="deblur",
        ...                                   guidance=3.5)  # doctest: +SKIP
        >>> out.latents.shape  # doctest: +SKIP
        torch.Size([1, 1536, 64])
    """
    _require(models, prompt=prompt)
    h, w = check_token_grid(latents, conditions, height, width)
    cache = getattr(options, "condition_cache", None)
    if cache not in (None, "off"):
        raise GenRefocusInputError(
            f"condition_cache must be 'off' on the native backend (no condition K/V cache), got {cache!r}"
        )
    device, dtype = torch.device(models.device), models.dtype
    emb = models.prompts[prompt].to(device=device, dtype=dtype)
    plan = sampling_plan(options, models.shift, height, width, device)
    g = guidance if flux_dims(models.flux).guidance_embeds else None
    logger.info("native: %s", plan)

    def velocity(x: Tensor, ids: Tensor, conds: Sequence[ConditionTokens], t: Tensor) -> Tensor:
        return native_flux_forward(
            models.flux,
            x,
            ids,
            t,
            prompt_embeds=emb.prompt_embeds,
            pooled=emb.pooled,
            guidance=g,
            conditions=conds,
            loras=models.loras,
            attention=models.attention,
        )

    conditions = [
        c.with_tokens(c.tokens.to(device=device, dtype=dtype), c.ids.to(device)) for c in conditions
    ]
    tiles = plan.tiles
    if models.prepare is not None:
        per_call = tiles.tile_shape[0] * tiles.tile_shape[1] * options.tile_batch if tiles else h * w
        models.prepare(per_call * latents.shape[0] * (1 + len(conditions)))
    with torch.no_grad():
        latents = latents.to(device=device, dtype=dtype)
        ids = latent_image_ids(h, w, device=device)
        final = plan.denoise(velocity, latents, ids, conditions, on_step=on_step)
        image = models.codec.decode(unpack_latents(final, height, width)).float()
    image = torch.round(image.clamp(0, 1) * 255.0) / 255.0
    return GenerationResult(image, image * 2 - 1, final)


def native_generate(
    models: NativeModels,
    conditions: Sequence[ConditionInput],
    *,
    prompt: str,
    guidance: float,
    noise_generator: torch.Generator,
    condition_generator: torch.Generator,
    noise: Tensor | None = None,
    options: GenerationOptions = DEFAULT_OPTIONS,
    on_step: OnStep | None = None,
) -> GenerationResult:
    """One image: draw the noise, encode the conditions in list order, denoise, decode.

    Draw order as :func:`~genrefocus_core.genpipe.generate`: the noise ``(1, C, H/8, W/8)`` from
    ``noise_generator`` (unless given), then, with ``options.condition_latent == "sample"``, one
    posterior eps per condition from ``condition_generator`` (the codec must be able to sample).

    Raises:
        GenRefocusInputError: no or mis-sized conditions, a bad noise shape.
        GenRefocusModelError: a missing adapter or prompt, or a codec that cannot sample.

    Example:
        >>> g = torch.Generator().manual_seed(42)
        >>> conds = [ConditionInput(photo, "deblurring")]  # doctest: +SKIP
        >>> out = native_generate(models, conds, prompt="deblur", guidance=3.5, noise_generator=g,
        ...                       condition_generator=g)  # doctest: +SKIP
    """
    _require(models, prompt=prompt)
    if not conditions:
        raise GenRefocusInputError("conditions must hold at least one condition, got none")
    device, dtype = torch.device(models.device), models.dtype
    height, width = (int(s) for s in conditions[0].pixels.shape[-2:])
    for i, c in enumerate(conditions):
        check_condition(i, c, height, width)
        _require(models, adapter=c.adapter)
    shape = (1, flux_dims(models.flux).in_channels // 4, height // 8, width // 8)
    latents = initial_latents(noise, shape, noise_generator, device, dtype)

    def encode(x: Tensor, eps: Tensor | None) -> Tensor:
        return pack_latents(models.codec.encode(x, eps).to(device=device, dtype=dtype))

    channels = models.codec.latent_channels
    tokens = condition_tokens(conditions, encode, channels, options, condition_generator, device, dtype)
    return native_generate_from_tokens(
        models,
        latents,
        tokens,
        height,
        width,
        prompt=prompt,
        guidance=guidance,
        options=options,
        on_step=on_step,
    )


def native_deblur(
    models: NativeModels,
    image: Tensor,
    *,
    adapter: str = ADAPTER_DEBLUR,
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
    options: GenerationOptions = DEFAULT_OPTIONS,
    on_step: OnStep | None = None,
) -> GenerationResult:
    """DeblurNet at the processed size (the native twin of :func:`~genrefocus_core.genpipe.deblur`).

    Args:
        models: native weights with ``adapter``.
        image: ``(B, 3, H, W)`` in [0, 1], H and W multiples of 16.
        adapter: adapter of the DeblurNet LoRA.
        pre_deblurred: ``(B or 1, 3, h, w)`` in [0, 1]; implies the pre-deblur variant.
        pre_deblur_variant: two conditions (pre-deblurred at column +32, black if absent).
        options: sampler options.
        on_step: progress per image.

    Returns:
        A :class:`~genrefocus_core.genpipe.GenerationResult`.

    Raises:
        GenRefocusModelError: the adapter or the ``"deblur"`` prompt is missing.

    Example:
        >>> aif = native_deblur(models, photo_512x768).image  # doctest: +SKIP
    """
    variant = pre_deblur_variant or pre_deblurred is not None
    return deblur_batch(partial(native_generate, models), image, torch.device(models.device), adapter=adapter,
                        pre_deblurred=pre_deblurred, variant=variant, options=options, on_step=on_step)


def native_bokeh(
    models: NativeModels,
    image: Tensor,
    defocus: Tensor,
    *,
    adapter: str = ADAPTER_BOKEH,
    noise: Tensor | None = None,
    options: GenerationOptions = DEFAULT_OPTIONS,
    on_step: OnStep | None = None,
) -> GenerationResult:
    """BokehNet at the processed size (the native twin of :func:`~genrefocus_core.genpipe.bokeh`).

    Args:
        models: native weights with ``adapter``.
        image: ``(B, 3, H, W)`` all-in-focus image in [0, 1].
        defocus: ``(B or 1, 1 or 3, H, W)`` D_def map in [0, 1], fed to the VAE as is (float).
        adapter: adapter of the BokehNet LoRA.
        noise: explicit initial noise ``(1, 16, H/8, W/8)`` for every item.
        options: sampler options.
        on_step: progress per image.

    Returns:
        A :class:`~genrefocus_core.genpipe.GenerationResult`.

    Raises:
        GenRefocusModelError: the adapter or the ``"bokeh"`` prompt is missing.

    Example:
        >>> out = native_bokeh(models, aif, d_def).image  # doctest: +SKIP
    """
    return bokeh_batch(partial(native_generate, models), image, defocus, torch.device(models.device),
                       adapter=adapter, noise=noise, options=options, on_step=on_step)


# ------------------------------------------------------------------------------------------------
# Photos at any size (resize, frames, restore): the native twins of pipeline.py
# ------------------------------------------------------------------------------------------------


def _backend(models: NativeModels) -> Backend:
    return Backend(
        check=check_inputs,  # without the models: _require checks them, once the stage is known to run
        deblur=partial(native_deblur, models),
        bokeh=partial(native_bokeh, models),
        require=partial(_require, models),
        report_depth=False,
    )


def native_deblur_image(
    image: Tensor,
    *,
    models: NativeModels,
    options: GenerationOptions = DEFAULT_OPTIONS,
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
    long_side: int = 0,
    geometry: str = "aligned",
    restore_size: bool = False,
    on_step: OnStep | None = None,
) -> RefocusResult:
    """DeblurNet on a photo of any size (the native twin of :func:`~genrefocus_core.pipeline.deblur_image`).

    Raises:
        GenRefocusInputError: bad inputs (see :func:`~genrefocus_core.pipeline.check_inputs`).
        GenRefocusModelError: the needed LoRA or prompt is missing.

    Example:
        >>> out = native_deblur_image(photo, models=models, restore_size=True)  # doctest: +SKIP
        >>> out.image.shape == photo.shape  # doctest: +SKIP
        True
    """
    return run_stages(_backend(models), "deblur", image, options=options, pre_deblurred=pre_deblurred,
                      pre_deblur_variant=pre_deblur_variant, long_side=long_side, geometry=geometry,
                      restore_size=restore_size, on_step=on_step)


def native_bokeh_image(
    aif: Tensor,
    *,
    models: NativeModels,
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
    """BokehNet on an all-in-focus image (the native twin of :func:`~genrefocus_core.pipeline.bokeh_image`).

    Raises:
        GenRefocusInputError: bad inputs (see :func:`~genrefocus_core.pipeline.check_inputs`).
        GenRefocusModelError: the BokehNet LoRA or prompt is missing.

    Example:
        >>> out = native_bokeh_image(aif, models=models, defocus=coc_map)  # doctest: +SKIP
    """
    return run_stages(_backend(models), "bokeh", aif, depth_model=depth_model, depth=depth, defocus=defocus,
                      focus=focus, k=k, options=options, long_side=long_side, geometry=geometry,
                      restore_size=restore_size, on_step=on_step)


def native_refocus(
    image: Tensor,
    *,
    models: NativeModels,
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
    """Resize → DeblurNet → depth → D_def → BokehNet (twin of :func:`~genrefocus_core.pipeline.refocus`).

    ``k == 0`` returns the all-in-focus image. ``depth`` (``RefocusResult.depth``) is not reported.

    Raises:
        GenRefocusInputError: bad inputs (see :func:`~genrefocus_core.pipeline.check_inputs`).
        GenRefocusModelError: a needed LoRA or prompt is missing.

    Example:
        >>> out = native_refocus(photo, models=models, depth=depth, k=20.0,
        ...                      focus=FocusTarget("point", x=0.3, y=0.6))  # doctest: +SKIP
    """
    return run_stages(_backend(models), "refocus", image, depth_model=depth_model, depth=depth, focus=focus,
                      k=k, options=options, pre_deblurred=pre_deblurred,
                      pre_deblur_variant=pre_deblur_variant, long_side=long_side, geometry=geometry,
                      restore_size=restore_size, on_step=on_step)
