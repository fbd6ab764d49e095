"""DeblurNet and BokehNet generation on the multi-stream FLUX core (official-pipeline.md §3-§9).

* :func:`resize_for_generation`: the official input resize/crop to multiples of 16 px (§3).
* :func:`deblur`: the all-in-focus image from a blurry photo (DeblurNet, guidance 3.5, optional
  pre-deblurred condition at column offset +32).
* :func:`bokeh`: the refocused image from an all-in-focus image and the Genfocus defocus map
  ``D_def`` in [0, 1] (BokehNet, guidance 1.0).
* :func:`generate_from_tokens`: the sampler + decode on given noise and condition tokens (what the
  Level A parity test injects).

Random draws: ``noise="reference"`` reproduces the official scripts exactly (DeblurNet: one RNG
seeded 42 draws the noise, then every condition's VAE posterior sample; BokehNet: noise from an
RNG seeded 1234, posterior samples from an RNG seeded 42) without touching torch's global RNG.
``noise="seeded"`` draws the noise from a CPU generator seeded ``seed`` (device independent) and
the posterior samples from ``seed + 1`` (or uses the posterior mean).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_bchw, check_finite
from ._generation import (
    BOKEH_GUIDANCE,
    BOKEH_NOISE_SEED,
    CONDITION_SEED,
    DEBLUR_GUIDANCE,
    PRE_DEBLUR_DELTA,
    ConditionInput,
    GenerationResult,
    bokeh_batch,
    check_condition,
    check_token_grid,
    condition_tokens,
    deblur_batch,
    initial_latents,
    sampling_plan,
)
from .condition_cache import CONDITION_CACHE_MODES, ConditionCache
from .conditions import (
    ConditionTokens,
    ResizeInfo,
    decode_latents,
    encode_condition,
    latent_image_ids,
    processed_size,
    resize_for_generation,
)
from .errors import GenRefocusInputError
from .flux_lora import flux_forward
from .memory import execution_device_dtype, place_adapters, should_tile_vae, vae_tiling
from .prompts import PromptEmbedding
from .sampler import FLUX_DEV_SHIFT, FlowShift

__all__ = [
    "BOKEH_GUIDANCE",
    "BOKEH_NOISE_SEED",
    "CONDITION_SEED",
    "DEBLUR_GUIDANCE",
    "FAST_OPTIONS",
    "PRE_DEBLUR_DELTA",
    "VAE_TILE",
    "ConditionInput",
    "GenerationOptions",
    "GenerationResult",
    "GenfocusModels",
    "ResizeInfo",
    "bokeh",
    "deblur",
    "generate",
    "generate_from_tokens",
    "processed_size",
    "resize_for_generation",
]

logger = logging.getLogger(__name__)

# DEBLUR_GUIDANCE, BOKEH_GUIDANCE, CONDITION_SEED, BOKEH_NOISE_SEED, PRE_DEBLUR_DELTA, ConditionInput and
# GenerationResult live in ._generation (shared with the native backend) and are re-exported here.
#: VAE tile side in px when the VAE runs tiled (``vae_tiling``), overlap 1/4.
VAE_TILE = 1024


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


@dataclass
class GenfocusModels:
    """The weights a Genfocus stage needs (loaded once, both LoRAs resident on the transformer).

    Attributes:
        transformer: diffusers ``FluxTransformer2DModel`` with the adapters of :func:`flux_lora.load_lora`.
        vae: diffusers ``AutoencoderKL`` (FLUX VAE).
        prompts: cached prompt embeddings by name (``"deblur"``, ``"bokeh"``).
        shift: scheduler shift constants.
        condition_cache: the default of :attr:`GenerationOptions.condition_cache` (fast mode chosen
            at load time; ``"off"`` = exact).
        offload_device: where idle weights wait (the other stage's LoRA, the depth model between
            its uses); ``None`` leaves them where they are.
    """

    transformer: nn.Module
    vae: Any
    prompts: Mapping[str, PromptEmbedding]
    shift: FlowShift = FLUX_DEV_SHIFT
    condition_cache: str = "off"
    offload_device: torch.device | None = None


@dataclass(frozen=True)
class GenerationOptions:
    """Sampler options (defaults = the official scripts).

    Attributes:
        steps: Euler steps (official 28; the demo allows 8-50).
        tiling: ``"auto"`` (official rule), ``"on"`` or ``"off"``.
        tile_size: tile side in px, a multiple of 16 (official 512).
        tile_batch: tiles per transformer forward.
        tile_overlap: overlap of neighbouring tiles as a fraction of the tile side, in [0, 0.5)
            (official 1/8: 64 px of 512; overlap tokens = ``int(tile_tokens * tile_overlap)``).
        noise: ``"reference"`` (official RNG recipe) or ``"seeded"``.
        seed: seed of ``"seeded"`` mode.
        condition_latent: ``"sample"`` (official posterior sample) or ``"mean"``.
        keep_condition_deltas: keep position offsets in tiles (fix #2; official drops them).
        mu: ``"full"`` (official: from the full image's tokens), ``"clamped"`` (tokens clamped to
            the scheduler's [base, max] range) or ``"tile"`` (a tile's tokens when tiled).
        condition_cache: fast mode: ``"off"`` (exact, parity), ``"on"`` / ``"cpu"`` (condition K/V
            recorded at the first step and replayed, per tile chunk, kept on the device or in host
            memory; an approximation, see :mod:`~genrefocus_core.condition_cache`), or ``None``
            (the models' default, :attr:`GenfocusModels.condition_cache`).
        vae_tiling: ``"auto"`` (tiled above 2 MP), ``"on"`` or ``"off"``: VAE encode/decode in
            1024 px tiles (bounded deviation, memory independent of the image size).
    """

    steps: int = 28
    tiling: str = "auto"
    tile_size: int = 512
    tile_batch: int = 4
    tile_overlap: float = 0.125
    noise: str = "reference"
    seed: int = 0
    condition_latent: str = "sample"
    keep_condition_deltas: bool = False
    mu: str = "full"
    condition_cache: str | None = None
    vae_tiling: str = "auto"

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("tile_batch", 1), ("tile_size", 16), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise GenRefocusInputError(f"{name} must be an integer >= {lo}, got {v!r}")
        if isinstance(self.tile_overlap, bool) or not isinstance(self.tile_overlap, int | float) or not (
            0.0 <= self.tile_overlap < 0.5
        ):
            raise GenRefocusInputError(
                f"tile_overlap must be a fraction in [0, 0.5), got {self.tile_overlap!r}"
            )
        if self.tile_size % 16:
            raise GenRefocusInputError(f"tile_size must be a multiple of 16 px, got {self.tile_size}")
        for name, allowed in (
            ("tiling", ("auto", "on", "off")),
            ("noise", ("reference", "seeded")),
            ("condition_latent", ("sample", "mean")),
            ("mu", ("full", "clamped", "tile")),
            ("vae_tiling", ("auto", "on", "off")),
        ):
            if getattr(self, name) not in allowed:
                raise GenRefocusInputError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.condition_cache is not None and self.condition_cache not in CONDITION_CACHE_MODES:
            raise GenRefocusInputError(
                f"condition_cache must be one of {', '.join(CONDITION_CACHE_MODES)} or None, "
                f"got {self.condition_cache!r}"
            )


#: The fast mode: 12 steps (0.43x the FLOPs of 28) with the condition K/V cache (0.23x in all; an
#: approximation of the parity path, see README "Memory and fast modes").
FAST_OPTIONS = GenerationOptions(steps=12, condition_cache="on")


def _prompt(models: GenfocusModels, name: str, device: torch.device, dtype: torch.dtype) -> PromptEmbedding:
    if name not in models.prompts:
        raise GenRefocusInputError(
            f"prompt {name!r} must be among the loaded prompt embeddings {sorted(models.prompts)}"
        )
    return models.prompts[name].to(device=device, dtype=dtype)


def _model_device_dtype(models: GenfocusModels) -> tuple[torch.device, torch.dtype]:
    return execution_device_dtype(models.transformer)


def generate_from_tokens(
    models: GenfocusModels,
    latents: Tensor,
    conditions: Sequence[ConditionTokens],
    height: int,
    width: int,
    *,
    prompt: str,
    guidance: float,
    options: GenerationOptions = GenerationOptions(),
    on_step: Callable[[int, int], None] | None = None,
    trace: dict[str, Any] | None = None,
) -> GenerationResult:
    """Denoise given initial noise with given condition tokens, then decode (§5, §7).

    Args:
        models: the weights.
        latents: ``(B, N, 64)`` packed initial noise, ``N = (H/16)*(W/16)``.
        conditions: condition streams on the same token grid.
        height: image height in px (multiple of 16).
        width: image width in px (multiple of 16).
        prompt: prompt name in ``models.prompts``.
        guidance: guidance embedding of text/image streams.
        options: sampler options.
        on_step: progress callback ``(done, total)`` per step and tile.
        trace: if a dict, filled with the intermediate tensors (fixture names).

    Returns:
        A :class:`GenerationResult`.

    Raises:
        GenRefocusInputError: inconsistent sizes.
    """
    h, w = check_token_grid(latents, conditions, height, width)
    device, dtype = _model_device_dtype(models)
    emb = _prompt(models, prompt, device, dtype)
    plan = sampling_plan(options, models.shift, height, width, device)
    logger.info("generating %s", plan)

    def velocity(
        x: Tensor,
        ids: Tensor,
        conds: Sequence[ConditionTokens],
        t: Tensor,
        condition_cache: ConditionCache | None = None,
    ) -> Tensor:
        return flux_forward(
            models.transformer,
            x,
            ids,
            t,
            prompt_embeds=emb.prompt_embeds,
            pooled=emb.pooled,
            guidance=guidance,
            conditions=conds,
            condition_cache=condition_cache,
        )

    cache_mode = options.condition_cache if options.condition_cache is not None else models.condition_cache
    if models.offload_device is not None:
        place_adapters(models.transformer, {c.adapter for c in conditions}, device, models.offload_device)

    record = trace is not None
    outs: list[Tensor] = []
    lats: list[Tensor] = []

    def on_velocity(i: int, v: Tensor, x: Tensor) -> None:
        outs.append(v.detach().clone())
        lats.append(x.detach().clone())

    latents = latents.to(device=device, dtype=dtype)
    ids = latent_image_ids(h, w, device=device)
    with torch.no_grad():
        final = plan.denoise(
            velocity,
            latents,
            ids,
            conditions,
            on_step=on_step,
            on_velocity=on_velocity if record else None,
            condition_cache=cache_mode,
        )
        with vae_tiling(models.vae, should_tile_vae(height, width, options.vae_tiling), VAE_TILE):
            z, decoded = decode_latents(models.vae, final, height, width)
    image = (decoded.float() * 0.5 + 0.5).clamp(0, 1)
    image = torch.round(image * 255.0) / 255.0
    if trace is not None:
        trace.update(
            {
                "init_latents": latents,
                "latent_image_ids": ids,
                "scheduler_sigmas": plan.sigmas,
                "step_timesteps": plan.sigmas[:-1] * 1000.0,
                "step_model_output": torch.stack(outs),
                "step_latents": torch.stack(lats),
                "vae_decode_input": z,
                "vae_decode_output": decoded,
            }
        )
        for i, c in enumerate(conditions):
            trace[f"cond{i}_tokens"], trace[f"cond{i}_ids"] = c.tokens, c.ids
    return GenerationResult(image, decoded, final)


def generate(
    models: GenfocusModels,
    conditions: Sequence[ConditionInput],
    *,
    prompt: str,
    guidance: float,
    noise_generator: torch.Generator,
    condition_generator: torch.Generator,
    noise: Tensor | None = None,
    options: GenerationOptions = GenerationOptions(),
    on_step: Callable[[int, int], None] | None = None,
    trace: dict[str, Any] | None = None,
) -> GenerationResult:
    """One image: draw the noise, encode the conditions (in list order), denoise, decode.

    Draw order (bit parity with upstream when both generators are seeded as the scripts do): the
    initial noise ``(1, 16, H/8, W/8)`` from ``noise_generator`` (unless ``noise`` is given), then
    one posterior eps per condition from ``condition_generator``.

    Args:
        models: the weights.
        conditions: at least one, all of the processed size ``(1, 3, H, W)``.
        prompt: prompt name.
        guidance: guidance embedding value.
        noise_generator: RNG of the initial noise.
        condition_generator: RNG of the posterior samples (may be the same object).
        noise: explicit initial noise ``(1, 16, H/8, W/8)`` (e.g. the demo's cached noise).
        options: sampler options.
        on_step: progress callback.
        trace: optional dict filled with intermediates.

    Returns:
        A :class:`GenerationResult` for one image.
    """
    if not conditions:
        raise GenRefocusInputError("conditions must hold at least one condition, got none")
    device, dtype = _model_device_dtype(models)
    height, width = conditions[0].pixels.shape[-2:]
    for i, c in enumerate(conditions):
        check_bchw(f"conditions[{i}].pixels", c.pixels, 3)
        check_condition(i, c, height, width)
    shape = (1, models.transformer.config.in_channels // 4, height // 8, width // 8)
    latents = initial_latents(noise, shape, noise_generator, device, dtype)

    def encode(x: Tensor, eps: Tensor | None) -> Tensor:
        x = x.to(device=device, dtype=dtype)
        return encode_condition(models.vae, x, mode=options.condition_latent, noise=eps)

    tiled_vae = should_tile_vae(height, width, options.vae_tiling)
    with torch.no_grad(), vae_tiling(models.vae, tiled_vae, VAE_TILE):
        channels = models.vae.config.latent_channels
        tokens = condition_tokens(conditions, encode, channels, options, condition_generator, device, dtype)
    if trace is not None:
        trace.update({f"cond{i}_input": c.pixels for i, c in enumerate(conditions)})
    return generate_from_tokens(
        models,
        latents,
        tokens,
        height,
        width,
        prompt=prompt,
        guidance=guidance,
        options=options,
        on_step=on_step,
        trace=trace,
    )


def deblur(
    models: GenfocusModels,
    image: Tensor,
    *,
    adapter: str = "deblurring",
    pre_deblurred: Tensor | None = None,
    pre_deblur_variant: bool = False,
    options: GenerationOptions = GenerationOptions(),
    on_step: Callable[[int, int], None] | None = None,
    trace: dict[str, Any] | None = None,
) -> GenerationResult:
    """DeblurNet: an all-in-focus image from a blurry one at the processed size (§8).

    Conditions: ``[blurry]`` (delta 0), or for the pre-deblur variant ``[pre-deblurred at column
    +32, blurry]`` — the pre-deblurred image LANCZOS-resized to the image size, black if absent.

    Args:
        models: the weights (``adapter`` loaded).
        image: ``(B, 3, H, W)`` in [0, 1], H and W multiples of 16 (see :func:`resize_for_generation`).
        adapter: adapter name of the DeblurNet LoRA (the pre-deblur variant has its own weights).
        pre_deblurred: ``(B or 1, 3, h, w)`` in [0, 1]; implies the pre-deblur variant.
        pre_deblur_variant: use the two-condition variant (black pre-deblur image if none given).
        options: sampler options.
        on_step: progress callback ``(done, total)``, per image.
        trace: optional dict filled with intermediates (batch 1).

    Returns:
        A :class:`GenerationResult`; ``image`` is 8-bit-rounded like the official PNG.

    Raises:
        GenRefocusInputError: bad shapes or sizes not multiples of 16.
    """
    check_bchw("image", image, 3)
    check_finite("image", image)
    _check_size16("image", image)
    device, _ = _model_device_dtype(models)
    variant = pre_deblur_variant or pre_deblurred is not None
    if pre_deblurred is not None:
        check_bchw("pre_deblurred", pre_deblurred, 3)
        if pre_deblurred.shape[0] not in (1, image.shape[0]):
            raise GenRefocusInputError(
                f"pre_deblurred must have batch size 1 or {image.shape[0]}, got {pre_deblurred.shape[0]}"
            )
    run = partial(generate, models, trace=trace)
    return deblur_batch(run, image, device, adapter=adapter, pre_deblurred=pre_deblurred, variant=variant,
                        options=options, on_step=on_step)


def bokeh(
    models: GenfocusModels,
    image: Tensor,
    defocus: Tensor,
    *,
    adapter: str = "bokeh",
    noise: Tensor | None = None,
    options: GenerationOptions = GenerationOptions(),
    on_step: Callable[[int, int], None] | None = None,
    trace: dict[str, Any] | None = None,
) -> GenerationResult:
    """BokehNet: the refocused image from an all-in-focus image and the defocus map (§9).

    Conditions ``[AIF, D_def]``; the map is replicated to 3 channels and fed to the VAE in [0, 1]
    as float (``No_preprocess``), never quantised.

    Args:
        models: the weights (``adapter`` loaded).
        image: ``(B, 3, H, W)`` all-in-focus image in [0, 1] (the official pipeline uses DeblurNet's
            8-bit output), H and W multiples of 16.
        defocus: ``(B or 1, 1 or 3, H, W)`` Genfocus map ``clamp(|K (disp - f)| / 100, 0, 1)``.
        adapter: adapter name of the BokehNet LoRA.
        noise: explicit initial noise ``(1, 16, H/8, W/8)``, reused for every item (the demo keeps
            the noise across refocus edits).
        options: sampler options.
        on_step: progress callback ``(done, total)``, per image.
        trace: optional dict filled with intermediates (batch 1).

    Returns:
        A :class:`GenerationResult`.

    Raises:
        GenRefocusInputError: bad shapes, sizes or a map outside [0, 1].
    """
    check_bchw("image", image, 3)
    check_finite("image", image)
    _check_size16("image", image)
    check_bchw("defocus", defocus, (1, 3))
    check_finite("defocus", defocus)
    if defocus.shape[-2:] != image.shape[-2:] or defocus.shape[0] not in (1, image.shape[0]):
        raise GenRefocusInputError(
            f"defocus must have shape (1 or {image.shape[0]}, 1 or 3, {image.shape[2]}, {image.shape[3]}), "
            f"got {tuple(defocus.shape)}"
        )
    if float(defocus.min()) < 0 or float(defocus.max()) > 1:
        raise GenRefocusInputError(
            f"defocus must lie in [0, 1] (clamp(|coc| / 100, 0, 1)), got [{float(defocus.min()):g}, "
            f"{float(defocus.max()):g}]"
        )
    device, _ = _model_device_dtype(models)
    run = partial(generate, models, trace=trace)
    return bokeh_batch(run, image, defocus, device, adapter=adapter, noise=noise, options=options,
                       on_step=on_step)


def _check_size16(name: str, x: Tensor) -> None:
    h, w = x.shape[-2:]
    if h % 16 or w % 16:
        raise GenRefocusInputError(
            f"{name} must have height and width that are multiples of 16 px, got {h}x{w}; "
            "use resize_for_generation() first"
        )
