"""Memory modes of the FLUX transformer, VAE tiling and stage offloading (performance.md §2).

A memory mode says how the transformer's weights are stored and where they live:

========================  =====================================================  ==========================
mode                      weights                                                FLUX.1-dev on the GPU
========================  =====================================================  ==========================
``full``                  compute dtype (bf16 on CUDA), resident                 23.8 GB
``fp8``                   float8 e4m3 storage, cast per layer to the compute     11.9 GB (+ 0.1 GB: one
                          dtype (diffusers' layerwise casting)                   Linear in bf16 while it
                                                                                 runs)
``nf4``                   bitsandbytes 4-bit NF4, double quantisation, resident  6.2 GB
``offload``               compute dtype in pinned CPU RAM, one block at a time   1.5 GB (stem + running and
                          streamed to the GPU (diffusers block-level group       prefetched block)
                          offloading, CUDA stream prefetch)
``fp8_offload``           fp8 in pinned CPU RAM, streamed as ``offload``         0.8 GB
========================  =====================================================  ==========================

GGUF files (Q8_0 12.7 GB, Q4_K 6.7 GB for FLUX.1-dev) keep their own quantisation and accept
``full`` (resident) or ``offload`` (streamed). ``bench/memory.py`` computes the numbers above and
the activation peaks from the real configuration. Outputs of every mode stay within measured
bounds of ``full`` (tests/core/test_memory_modes.py).

Only ``nn.Linear`` weights are stored in fp8 / NF4; the final projection (``proj_out``,
``norm_out``), norms and the LoRA adapters (``lora_A``/``lora_B``) keep the compute dtype, so the
per-branch LoRA acts at full precision. Apply a mode after the LoRAs are loaded.

Group offloading is driven by :func:`~genrefocus_core.flux_lora.flux_forward` (our multi-stream
forward does not go through the blocks' ``forward``, so it enters each block's diffusers hooks
itself): weights stream once per forward, i.e. once per denoise step when the tiles of a step are
batched into one forward (``tile_batch``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from .errors import GenRefocusInputError, GenRefocusModelError

__all__ = [
    "FP8_SKIP_PATTERNS",
    "MEMORY_MODES",
    "MemoryMode",
    "MemoryState",
    "apply_memory_mode",
    "execution_device_dtype",
    "fp8_targets",
    "is_group_offloaded",
    "memory_state",
    "offload_hooks",
    "place_adapters",
    "should_tile_vae",
    "vae_tiling",
]

logger = logging.getLogger(__name__)


class MemoryMode(str, Enum):
    """How the FLUX transformer's weights are stored and where they live (see the module table)."""

    FULL = "full"
    FP8 = "fp8"
    NF4 = "nf4"
    OFFLOAD = "offload"
    FP8_OFFLOAD = "fp8_offload"

    @property
    def storage(self) -> str:
        """``"compute"``, ``"fp8"`` or ``"nf4"``."""
        return {"fp8": "fp8", "fp8_offload": "fp8", "nf4": "nf4"}.get(self.value, "compute")

    @property
    def streamed(self) -> bool:
        """Whether the blocks live in CPU RAM and are streamed to the compute device."""
        return self in (MemoryMode.OFFLOAD, MemoryMode.FP8_OFFLOAD)


#: The mode names, in the order a UI lists them.
MEMORY_MODES = tuple(m.value for m in MemoryMode)

#: Module-name patterns (``re.search`` on the dotted path) whose Linear weights keep the compute
#: dtype in the fp8 and NF4 modes: the final projection and its modulation (small, they write the
#: velocity directly) and every LoRA matrix.
FP8_SKIP_PATTERNS = ("pos_embed", r"^proj_out(\.|$)", r"^norm_out(\.|$)", r"lora_")

_FP8 = getattr(torch, "float8_e4m3fn", None)
_GROUP_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading", "layer_execution_tracker")


@dataclass(frozen=True)
class MemoryState:
    """What :func:`apply_memory_mode` did to a transformer (stored on it as ``_genrefocus_memory``).

    Attributes:
        mode: the applied mode.
        compute_dtype: dtype the layers compute in.
        onload_device: where the forward runs (the compute device of streamed modes).
        offload_device: where streamed weights rest.
    """

    mode: MemoryMode
    compute_dtype: torch.dtype
    onload_device: torch.device
    offload_device: torch.device


def _mode(mode: MemoryMode | str) -> MemoryMode:
    try:
        return MemoryMode(mode)
    except ValueError:
        raise GenRefocusInputError(
            f"memory_mode must be one of {', '.join(MEMORY_MODES)}, got {mode!r}"
        ) from None


def memory_state(model: nn.Module) -> MemoryState | None:
    """The :class:`MemoryState` of a transformer, or None if no mode was applied."""
    return getattr(model, "_genrefocus_memory", None)


def is_group_offloaded(model: nn.Module) -> bool:
    """Whether diffusers group offloading hooks are installed on ``model`` (top level)."""
    registry = getattr(model, "_diffusers_hook", None)
    return registry is not None and registry.get_hook("group_offloading") is not None


def execution_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """``(device, dtype)`` a transformer computes in, whatever its storage.

    The first parameter is not enough: fp8 / NF4 / GGUF weights are stored in another dtype, and
    streamed weights rest on the CPU while the forward runs on the onload device.

    Example:
        >>> execution_device_dtype(torch.nn.Linear(2, 2))
        (device(type='cpu'), torch.float32)
    """
    state = memory_state(model)
    if state is not None:
        device = state.onload_device if state.mode.streamed else _first_param(model).device
        return device, state.compute_dtype
    p = _first_param(model)
    dtype = next(
        (t.dtype for t in model.parameters() if t.dtype in (torch.float32, torch.bfloat16, torch.float16)),
        p.dtype,
    )
    return p.device, dtype


def _first_param(model: nn.Module) -> torch.Tensor:
    try:
        return next(model.parameters())
    except StopIteration:
        raise GenRefocusModelError("the model has no parameters") from None


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def fp8_targets(model: nn.Module, patterns: Iterable[str] = FP8_SKIP_PATTERNS) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weights the fp8/NF4 modes store compressed."""
    pats = tuple(patterns)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not _skipped(n, pats)]


def _apply_fp8(model: nn.Module, compute_dtype: torch.dtype) -> None:
    if _FP8 is None:
        raise GenRefocusModelError("this torch has no float8_e4m3fn dtype; fp8 modes need torch >= 2.1")
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(
        model, storage_dtype=_FP8, compute_dtype=compute_dtype, skip_modules_pattern=FP8_SKIP_PATTERNS
    )


def _apply_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise GenRefocusModelError(
            "memory_mode 'nf4' needs the bitsandbytes package (pip install bitsandbytes); or use fp8, a "
            "GGUF Q4_K file, or offload"
        ) from e
    targets = set(fp8_targets(model))
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full not in targets:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, child_name, q.to(device))  # bitsandbytes quantises on the move


def apply_memory_mode(
    model: nn.Module,
    mode: MemoryMode | str,
    *,
    compute_dtype: torch.dtype,
    onload_device: torch.device | str,
    offload_device: torch.device | str = "cpu",
    use_stream: bool | None = None,
) -> nn.Module:
    """Put a (LoRA-loaded) FLUX transformer into a memory mode, in place.

    Args:
        model: diffusers ``FluxTransformer2DModel``, adapters already loaded.
        mode: a :class:`MemoryMode` or its name.
        compute_dtype: dtype of the computation (bf16 on CUDA).
        onload_device: the compute device (streamed modes keep the weights off it).
        offload_device: where streamed weights rest (the CPU).
        use_stream: prefetch the next block on a CUDA stream (default: on CUDA).

    Returns:
        ``model``.

    Raises:
        GenRefocusInputError: an unknown mode.
        GenRefocusModelError: a mode this model or environment cannot take (fp8/NF4 on a GGUF
            file, NF4 without bitsandbytes, a mode applied twice).

    Example:
        >>> from diffusers import FluxTransformer2DModel
        >>> m = FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
        ...     axes_dims_rope=(2, 2, 4))
        >>> _ = apply_memory_mode(m, "fp8", compute_dtype=torch.float32, onload_device="cpu")
        >>> m.transformer_blocks[0].attn.to_q.weight.dtype, execution_device_dtype(m)[1]
        (torch.float8_e4m3fn, torch.float32)
    """
    mode = _mode(mode)
    if memory_state(model) is not None:
        raise GenRefocusModelError(
            f"a memory mode ({memory_state(model).mode.value}) is already applied; reload the transformer"
        )
    onload, offload = torch.device(onload_device), torch.device(offload_device)
    gguf = any(type(p).__name__ == "GGUFParameter" for p in model.parameters())
    if gguf and mode.storage != "compute":
        raise GenRefocusModelError(
            f"memory_mode {mode.value!r} cannot apply to a GGUF file (already quantised); use full or offload"
        )
    if mode.storage == "fp8":
        _apply_fp8(model, compute_dtype)
    elif mode.storage == "nf4":
        target = offload if mode.streamed else onload
        _apply_nf4(model, compute_dtype, target)  # quantised layer by layer on the target device
        model.to(target)
    if mode.streamed:
        from diffusers.hooks import apply_group_offloading

        stream = onload.type == "cuda" if use_stream is None else use_stream
        model.to(offload)
        apply_group_offloading(model, onload_device=onload, offload_device=offload,
                               offload_type="block_level", num_blocks_per_group=1, use_stream=stream,
                               low_cpu_mem_usage=False)
    model._genrefocus_memory = MemoryState(mode, compute_dtype, onload, offload)
    logger.info("FLUX memory mode %s (compute %s, on %s)", mode.value, compute_dtype, onload)
    return model


@contextmanager
def offload_hooks(module: nn.Module) -> Iterator[None]:
    """Run the diffusers group-offloading hooks of ``module`` around a block of code.

    diffusers onloads a group in the ``forward`` of its leader module; our multi-stream forward
    computes blocks from their submodules, so it enters each block (and the transformer for its
    stem) through this context: pre-hooks in the order the wrapped ``forward`` would run them,
    post-hooks after. A no-op for modules without such hooks.

    Example:
        >>> with offload_hooks(torch.nn.Linear(2, 2)):
        ...     pass
    """
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        yield
        return
    hooks = [registry.hooks[name] for name in getattr(registry, "_hook_order", []) if name in _GROUP_HOOKS]
    for hook in reversed(hooks):  # the last registered hook wraps the others
        hook.pre_forward(module)
    try:
        yield
    finally:
        for hook in hooks:
            hook.post_forward(module, None)


def place_adapters(
    model: nn.Module, active: Iterable[str], device: torch.device | str, offload_device: torch.device | str
) -> int:
    """LoRA weights of the ``active`` adapters on ``device``, every other adapter's on ``offload_device``.

    The other stage's LoRA is idle while one stage runs (a rank-128 Genfocus LoRA is 0.93 GB in
    bf16). A no-op for streamed modes, whose blocks (LoRAs included) are offloaded anyway.

    Returns:
        The number of adapter matrices moved off ``device``.

    Example:
        >>> place_adapters(torch.nn.Linear(2, 2), ["bokeh"], "cpu", "cpu")
        0
    """
    if is_group_offloaded(model):
        return 0
    keep, moved = set(active), 0
    dev, off = torch.device(device), torch.device(offload_device)
    for m in model.modules():
        lora_a, lora_b = getattr(m, "lora_A", None), getattr(m, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        for name in lora_a:
            target = dev if name in keep else off
            for sub in (lora_a[name], lora_b[name]):
                if sub.weight.device != target:
                    sub.to(target)
                    moved += int(target == off)
    return moved


#: Images above this many pixels are VAE-encoded/decoded in tiles by default (``vae_tiling="auto"``).
VAE_TILING_PIXELS = 2048 * 1024


def should_tile_vae(height: int, width: int, vae_tiling: str = "auto") -> bool:
    """Whether to run the VAE in tiles: ``"auto"`` above :data:`VAE_TILING_PIXELS`, or ``"on"``/``"off"``.

    Example:
        >>> should_tile_vae(1024, 1024), should_tile_vae(2160, 3840), should_tile_vae(64, 64, "on")
        (False, True, True)
    """
    if vae_tiling not in ("auto", "on", "off"):
        raise GenRefocusInputError(f"vae_tiling must be 'auto', 'on' or 'off', got {vae_tiling!r}")
    if vae_tiling != "auto":
        return vae_tiling == "on"
    return height * width > VAE_TILING_PIXELS


@contextmanager
def vae_tiling(vae: Any, enabled: bool, tile: int = 512, overlap: float = 0.25) -> Iterator[None]:
    """Tiled encode/decode (diffusers' ``AutoencoderKL`` tiling) for the duration of the block.

    Tiles of ``tile`` px (``tile / f`` latents, ``f`` the VAE's downscale), overlapping by
    ``overlap`` and blended linearly. The mid-block attention then sees one tile at a time, so the
    result deviates slightly from an untiled pass (bounded in tests); memory no longer grows with
    the image. The VAE's previous settings are restored on exit.

    Example:
        >>> with vae_tiling(object(), False):  # disabled: nothing is touched
        ...     pass
    """
    if not enabled:
        yield
        return
    if tile < 16 or tile % 16 or not 0.0 <= overlap < 0.5:
        raise GenRefocusInputError(
            f"tile must be a multiple of 16 >= 16 and overlap in [0, 0.5), got {tile} and {overlap}"
        )
    names = ("use_tiling", "tile_sample_min_size", "tile_latent_min_size", "tile_overlap_factor")
    if not all(hasattr(vae, n) for n in names):
        raise GenRefocusModelError(
            f"{type(vae).__name__} has no diffusers tiling; VAE tiling needs an AutoencoderKL"
        )
    saved = {n: getattr(vae, n) for n in names}
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling, vae.tile_sample_min_size = True, tile
    vae.tile_latent_min_size, vae.tile_overlap_factor = tile // factor, overlap
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(vae, n, v)
