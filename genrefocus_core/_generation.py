"""One image at the processed size, shared by both generative backends.

:mod:`~genrefocus_core.genpipe` (diffusers FLUX + PEFT adapters) and
:mod:`~genrefocus_core.native_pipeline` (a BFL-layout FLUX, e.g. ComfyUI's) run the same recipe
(official-pipeline.md §3-§9) and differ only in how they run the transformer and the VAE. What
they share lives here: the official noise recipe (seeds, draw order), the DeblurNet and BokehNet
condition lists, one image per frame of a batch, the token-grid checks and the sampling schedule.
A backend passes its own ``generate`` (conditions → :class:`GenerationResult`) to
:func:`deblur_batch` and :func:`bokeh_batch`, and its own VAE encode to :func:`condition_tokens`.

The public names are re-exported by :mod:`~genrefocus_core.genpipe`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .conditions import ConditionTokens, _pil_resize, pack_latents, vae_input_from_image
from .errors import GenRefocusInputError
from .sampler import FlowShift, TileLayout, denoise, flow_sigmas, flux_mu, should_tile

if TYPE_CHECKING:
    from .genpipe import GenerationOptions

DEBLUR_GUIDANCE = 3.5
BOKEH_GUIDANCE = 1.0
#: ``seed_everything(42)`` of the official scripts: DeblurNet noise and every posterior sample.
CONDITION_SEED = 42
#: ``torch.Generator().manual_seed(1234)`` of the official BokehNet script: its initial noise.
BOKEH_NOISE_SEED = 1234
#: Position offset (rows, columns in tokens) of the pre-deblurred condition.
PRE_DEBLUR_DELTA = (0, 32)

OnStep = Callable[[int, int], None]


@dataclass(frozen=True)
class ConditionInput:
    """A condition before encoding.

    Attributes:
        pixels: ``(1, 3, H, W)`` in [0, 1] at the processed size.
        adapter: LoRA adapter of this stream.
        position_delta: ``(d_row, d_col)`` id offset in tokens.
        preprocess: ``True`` = images (``2x - 1``, channels-last like upstream's PIL path);
            ``False`` = ``No_preprocess`` (the D_def map, fed to the VAE in [0, 1]).
    """

    pixels: Tensor
    adapter: str
    position_delta: tuple[int, int] = (0, 0)
    preprocess: bool = True


@dataclass(frozen=True)
class GenerationResult:
    """Output of a stage.

    Attributes:
        image: ``(B, 3, H, W)`` in [0, 1], rounded to 8-bit levels like the official PNG.
        decoded: ``(B, 3, H, W)`` raw VAE output (about [-1, 1]).
        latents: ``(B, N, 64)`` final packed latents.
    """

    image: Tensor
    decoded: Tensor
    latents: Tensor


#: ``generate(conditions, *, prompt, guidance, noise_generator, condition_generator, noise, options,
#: on_step)``: one image from its conditions (``genpipe.generate`` or ``native_generate`` bound to
#: the models).
GenerateFn = Callable[..., GenerationResult]


def randn(
    shape: tuple[int, ...], generator: torch.Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Normal draws made on ``generator``'s device, then moved to ``device``/``dtype``.

    parity: the official recipe draws on the generator's device (CPU or CUDA), whatever runs the model.

    Example:
        >>> randn((2,), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64).dtype
        torch.float64
    """
    if generator.device.type == device.type:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device).to(device=device, dtype=dtype)


def generators(
    options: GenerationOptions, device: torch.device, *, shared: bool, noise_seed: int
) -> tuple[torch.Generator, torch.Generator]:
    """``(noise, condition)`` RNGs of one image: the official seeds on ``device`` (the same object when
    ``shared``, as DeblurNet), or CPU generators seeded ``seed`` and ``seed + 1``."""
    if options.noise == "seeded":
        return (
            torch.Generator("cpu").manual_seed(options.seed),
            torch.Generator("cpu").manual_seed(options.seed + 1),
        )
    g_cond = torch.Generator(device).manual_seed(CONDITION_SEED)
    g_noise = g_cond if shared else torch.Generator(device).manual_seed(noise_seed)
    return g_noise, g_cond


def per_image(fn: Callable[[int], GenerationResult], batch: int) -> GenerationResult:
    """``fn(i)`` for every frame, concatenated along the batch."""
    results = [fn(i) for i in range(batch)]
    if batch == 1:
        return results[0]
    return GenerationResult(
        *(torch.cat([getattr(r, f) for r in results]) for f in ("image", "decoded", "latents"))
    )


def check_token_grid(
    latents: Tensor, conditions: Sequence[ConditionTokens], height: int, width: int
) -> tuple[int, int]:
    """Raise unless the image size, ``latents`` and every condition fit one token grid; return it.

    Returns:
        ``(H / 16, W / 16)`` in tokens.

    Raises:
        GenRefocusInputError: a size that is not a positive multiple of 16, or a mismatching shape.
    """
    if height % 16 or width % 16 or height < 16 or width < 16:
        raise GenRefocusInputError(
            f"height and width must be positive multiples of 16 px, got {height}x{width}"
        )
    h, w = height // 16, width // 16
    if latents.ndim != 3 or latents.shape[1] != h * w:
        raise GenRefocusInputError(
            f"latents must have shape (B, {h * w}, C) for {height}x{width} px, got {tuple(latents.shape)}"
        )
    for i, c in enumerate(conditions):
        if c.tokens.shape[1] != h * w:
            raise GenRefocusInputError(
                f"conditions[{i}] must have {h * w} tokens (the image's grid), got {c.tokens.shape[1]}"
            )
    return h, w


@dataclass(frozen=True)
class SamplingPlan:
    """One denoise of a ``height x width`` px image: token grid, tiles (None = untiled), shifted sigmas.

    ``str(plan)`` describes it for the log: ``"768x512 px (1536 tokens), 28 steps, untiled"``.
    """

    height: int
    width: int
    tiles: TileLayout | None
    sigmas: Tensor
    options: GenerationOptions

    @property
    def grid(self) -> tuple[int, int]:
        """``(H / 16, W / 16)`` in tokens."""
        return self.height // 16, self.width // 16

    def __str__(self) -> str:
        h, w = self.grid
        tiles = self.tiles if self.tiles is not None else "untiled"
        return f"{self.width}x{self.height} px ({h * w} tokens), {self.options.steps} steps, {tiles}"

    def denoise(
        self,
        velocity: Callable[..., Tensor],
        latents: Tensor,
        latent_ids: Tensor,
        conditions: Sequence[ConditionTokens],
        **extra: Any,
    ) -> Tensor:
        """:func:`~genrefocus_core.sampler.denoise` with this plan (``extra``: ``on_step`` ...)."""
        return denoise(
            velocity,
            latents,
            self.grid,
            self.sigmas,
            conditions=conditions,
            latent_ids=latent_ids,
            tiles=self.tiles,
            tile_batch=self.options.tile_batch,
            keep_condition_deltas=self.options.keep_condition_deltas,
            **extra,
        )


def sampling_plan(
    options: GenerationOptions, shift: FlowShift, height: int, width: int, device: torch.device
) -> SamplingPlan:
    """Tiles and the shifted sigmas (§5; ``options.mu``) of one denoise of a ``height x width`` px image."""
    h, w = height // 16, width // 16
    tiled = should_tile(height, width, tiling=options.tiling, tile_size=options.tile_size)
    tile = options.tile_size // 16
    tiles = TileLayout(h, w, tile=tile, overlap=int(tile * options.tile_overlap)) if tiled else None
    n_mu = h * w
    if options.mu == "clamped":
        n_mu = min(max(n_mu, shift.base_seq_len), shift.max_seq_len)
    elif options.mu == "tile" and tiles is not None:
        n_mu = tiles.tile_shape[0] * tiles.tile_shape[1]
    sigmas = flow_sigmas(options.steps, h * w, shift=shift, mu=flux_mu(n_mu, shift), device=device)
    return SamplingPlan(height, width, tiles, sigmas, options)


def check_condition(i: int, condition: ConditionInput, height: int, width: int) -> None:
    """Raise unless ``conditions[i]`` has the pixels ``(1, 3, height, width)`` of the first one."""
    if tuple(condition.pixels.shape) != (1, 3, height, width):
        raise GenRefocusInputError(
            f"conditions[{i}].pixels must have shape (1, 3, {height}, {width}), "
            f"got {tuple(condition.pixels.shape)}"
        )


def initial_latents(
    noise: Tensor | None,
    shape: tuple[int, int, int, int],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Packed initial noise: ``noise`` (checked against ``shape``) or a draw from ``generator``.

    Raises:
        GenRefocusInputError: ``noise`` of another shape.
    """
    if noise is None:
        noise = randn(shape, generator, device, dtype)
    elif tuple(noise.shape) != shape:
        raise GenRefocusInputError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
    return pack_latents(noise.to(device=device, dtype=dtype))


def condition_tokens(
    conditions: Sequence[ConditionInput],
    encode: Callable[[Tensor, Tensor | None], Tensor],
    latent_channels: int,
    options: GenerationOptions,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> list[ConditionTokens]:
    """Encode the conditions in list order, each with one posterior eps from ``generator`` (``"sample"``).

    ``encode(x, eps)``: VAE-range pixels (float32, the layout upstream feeds) and the eps (None =
    the posterior mean) → packed ``(1, N, 64)`` tokens.
    """
    height, width = conditions[0].pixels.shape[-2:]
    tokens = []
    for c in conditions:
        # upstream normalises in float32, then casts to the pipeline dtype (layout preserved)
        x = vae_input_from_image(c.pixels.float(), normalize=c.preprocess, channels_last=c.preprocess)
        eps = None
        if options.condition_latent == "sample":
            eps = randn((1, latent_channels, height // 8, width // 8), generator, device, dtype)
        tok = encode(x, eps)
        tokens.append(ConditionTokens.on_grid(tok, height // 16, width // 16, c.adapter, c.position_delta))
    return tokens


def _per_frame(
    generate: GenerateFn,
    n: int,
    conditions_of: Callable[[int], list[ConditionInput]],
    device: torch.device,
    *,
    prompt: str,
    guidance: float,
    shared: bool,
    noise_seed: int,
    noise: Tensor | None,
    options: GenerationOptions,
    on_step: OnStep | None,
) -> GenerationResult:
    """``generate`` on the conditions of each of ``n`` frames, each with fresh RNGs (:func:`generators`)."""

    def one(i: int) -> GenerationResult:
        conds = conditions_of(i)
        g_noise, g_cond = generators(options, device, shared=shared, noise_seed=noise_seed)
        return generate(
            conds,
            prompt=prompt,
            guidance=guidance,
            noise_generator=g_noise,
            condition_generator=g_cond,
            noise=noise,
            options=options,
            on_step=on_step,
        )

    return per_image(one, n)


def deblur_batch(
    generate: GenerateFn,
    image: Tensor,
    device: torch.device,
    *,
    adapter: str,
    pre_deblurred: Tensor | None,
    variant: bool,
    options: GenerationOptions,
    on_step: OnStep | None,
) -> GenerationResult:
    """DeblurNet per frame: ``[blurry]``, or ``[pre-deblurred at column +32, blurry]`` for the variant."""

    def conditions_of(i: int) -> list[ConditionInput]:
        img = image[i : i + 1]
        conds = [ConditionInput(img, adapter, (0, 0))]
        if variant:
            h, w = img.shape[-2:]
            if pre_deblurred is None:
                pre = torch.zeros_like(img)
            else:
                pre = pre_deblurred[min(i, pre_deblurred.shape[0] - 1) :][:1]
                # parity: upstream always LANCZOS-resizes the pre-deblurred image to the processed size
                pre = _pil_resize(pre, (int(w), int(h)))
            conds = [ConditionInput(pre, adapter, PRE_DEBLUR_DELTA), conds[0]]
        return conds

    return _per_frame(generate, image.shape[0], conditions_of, device, prompt="deblur",
                      guidance=DEBLUR_GUIDANCE, shared=True, noise_seed=CONDITION_SEED, noise=None,
                      options=options, on_step=on_step)


def bokeh_batch(
    generate: GenerateFn,
    image: Tensor,
    defocus: Tensor,
    device: torch.device,
    *,
    adapter: str,
    noise: Tensor | None,
    options: GenerationOptions,
    on_step: OnStep | None,
) -> GenerationResult:
    """BokehNet per frame: ``[AIF, D_def]``, the map replicated to 3 channels and not preprocessed."""

    def conditions_of(i: int) -> list[ConditionInput]:
        d = defocus[min(i, defocus.shape[0] - 1) :][:1]
        d = d.expand(-1, 3, -1, -1) if d.shape[1] == 1 else d
        return [
            ConditionInput(image[i : i + 1], adapter, (0, 0)),
            ConditionInput(d.contiguous(), adapter, (0, 0), preprocess=False),
        ]

    return _per_frame(generate, image.shape[0], conditions_of, device, prompt="bokeh",
                      guidance=BOKEH_GUIDANCE, shared=False, noise_seed=BOKEH_NOISE_SEED, noise=noise,
                      options=options, on_step=on_step)
