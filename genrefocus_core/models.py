"""Loading the Genfocus weights: FLUX transformer, VAE, the three LoRAs as named adapters, prompts.

Local files only. The LoRAs stay resident together on one transformer under the adapter names
below, and each condition stream picks its adapter (official-pipeline.md §6.2, fix #10 of §14).
The VAE is read from a diffusers folder or from a single file such as ComfyUI's ``ae.safetensors``
(original/BFL key layout, converted with diffusers' own key map; FLUX.1's configuration ships in
``configs/flux1-dev-vae.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import GenRefocusInputError, GenRefocusModelError
from .genpipe import GenfocusModels
from .sampler import FLUX_DEV_SHIFT, FlowShift

__all__ = [
    "ADAPTER_BOKEH",
    "ADAPTER_DEBLUR",
    "ADAPTER_PRE_DEBLUR",
    "FLUX_VAE_CONFIG",
    "LORA_FILES",
    "load_flux_vae",
    "load_genfocus_models",
]

#: Adapter name of the DeblurNet LoRA (``deblurNet.safetensors``), as the official scripts.
ADAPTER_DEBLUR = "deblurring"
#: Adapter name of the pre-deblur DeblurNet LoRA (``deblurNet_with_pre_deblur.safetensors``); the
#: official script also calls it "deblurring", but here both can be resident at once.
ADAPTER_PRE_DEBLUR = "deblurring_pre"
#: Adapter name of the BokehNet LoRA (``bokehNet.safetensors``).
ADAPTER_BOKEH = "bokeh"
#: The official file name of each adapter's LoRA.
LORA_FILES = {
    ADAPTER_DEBLUR: "deblurNet.safetensors",
    ADAPTER_PRE_DEBLUR: "deblurNet_with_pre_deblur.safetensors",
    ADAPTER_BOKEH: "bokehNet.safetensors",
}

#: The FLUX.1 VAE configuration (diffusers ``AutoencoderKL``), for single-file VAEs.
FLUX_VAE_CONFIG: dict = json.loads((Path(__file__).parent / "configs" / "flux1-dev-vae.json").read_text())


def load_flux_vae(
    path: str | Path,
    *,
    config: dict | str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
):
    """Load the FLUX VAE from a diffusers folder or a single ``.safetensors`` file.

    Folders: a ``vae/`` folder (``config.json`` + weights) or a pipeline folder holding one. Single
    files: the original (BFL / ComfyUI ``ae.safetensors``) key layout, converted with diffusers'
    ``convert_ldm_vae_checkpoint``, or diffusers keys; loaded strictly.

    Args:
        path: folder or file.
        config: for single files: a config dict or ``config.json`` path (default: FLUX.1's).
        dtype: compute dtype.
        device: where to put it.

    Returns:
        A diffusers ``AutoencoderKL`` in eval mode.

    Raises:
        GenRefocusModelError: missing/corrupt files or tensors that do not fit the config.

    Example:
        >>> vae = load_flux_vae("models/vae/ae.safetensors", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> vae.config.latent_channels  # doctest: +SKIP
        16
    """
    from .conditions import load_vae

    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
            p = p / "vae"
        return load_vae(p, device=device, dtype=dtype)
    from diffusers import AutoencoderKL

    from .loading import read_safetensors

    sd = read_safetensors(p)
    cfg = dict(FLUX_VAE_CONFIG if config is None else config if isinstance(config, dict) else
               json.loads(Path(config).read_text()))
    if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in sd):
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        sd = convert_ldm_vae_checkpoint(sd, cfg)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    expected = set(vae.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise GenRefocusModelError(
            f"{p.name} is not a FLUX VAE: {len(missing)} missing tensor(s) "
            f"({', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected "
            f"({', '.join(unexpected[:3]) or '-'}); use FLUX.1's ae.safetensors"
        )
    try:
        vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise GenRefocusModelError(f"{p.name} does not fit the FLUX VAE: {str(e)[:400]}") from e
    return vae.to(device=device, dtype=dtype).eval()


def _scheduler_shift(transformer: Path) -> FlowShift:
    """FLUX.1-dev's constants, or those of a ``scheduler/`` folder beside a diffusers transformer."""
    if transformer.is_dir():
        for cand in (transformer / "scheduler", transformer.parent / "scheduler"):
            cfg = cand / "scheduler_config.json"
            if cfg.is_file():
                return FlowShift.from_scheduler_config(json.loads(cfg.read_text()))
    return FLUX_DEV_SHIFT


def load_genfocus_models(
    transformer: str | Path,
    vae: str | Path,
    prompts: str | Path | None,
    *,
    deblur_lora: str | Path | None = None,
    bokeh_lora: str | Path | None = None,
    pre_deblur_lora: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    transformer_config: dict | str | Path | None = None,
    vae_config: dict | str | Path | None = None,
    memory_mode: str = "full",
    offload_device: torch.device | str | None = None,
    condition_cache: str = "off",
) -> GenfocusModels:
    """Load everything a Genfocus run needs, from local files only; LoRAs stay resident together.

    Args:
        transformer: FLUX.1-dev as a diffusers folder (or pipeline folder) or a single
            ``.safetensors`` file (BFL/ComfyUI layout, fp8 included).
        vae: the FLUX VAE: a diffusers folder (``vae/`` or a pipeline folder holding it) or a single
            ``.safetensors`` file (e.g. ComfyUI's ``ae.safetensors``).
        prompts: the cached prompt embeddings (``.safetensors``, see :mod:`~genrefocus_core.prompts`),
            or None (no cached prompts: the caller supplies embeddings, e.g. from ComfyUI CONDITIONING).
        deblur_lora: ``deblurNet.safetensors`` → adapter :data:`ADAPTER_DEBLUR`.
        bokeh_lora: ``bokehNet.safetensors`` → adapter :data:`ADAPTER_BOKEH`.
        pre_deblur_lora: ``deblurNet_with_pre_deblur.safetensors`` → :data:`ADAPTER_PRE_DEBLUR`.
        dtype: compute dtype (official: bf16 on CUDA, float32 on the CPU).
        device: where to put the weights.
        transformer_config: config for single files that are not FLUX.1-dev sized.
        vae_config: config for a single-file VAE that is not FLUX.1's.
        memory_mode: how the transformer is stored and placed (:mod:`~genrefocus_core.memory`):
            ``full``, ``fp8``, ``nf4``, ``offload`` or ``fp8_offload``; ``device`` is the compute
            device (streamed modes keep the blocks on ``offload_device``).
        offload_device: where idle and streamed weights wait (default: the CPU for streamed modes,
            else idle weights are not moved).
        condition_cache: default fast-mode condition cache of the runs (``off``, ``on``, ``cpu``).

    Returns:
        A :class:`~genrefocus_core.genpipe.GenfocusModels` (scheduler constants from a
        ``scheduler/`` folder beside a diffusers transformer, else FLUX.1-dev's).

    Raises:
        GenRefocusInputError: no LoRA given.
        GenRefocusModelError: missing or incompatible files (the message says what to put where).

    Example:
        >>> models = load_genfocus_models(
        ...     "models/diffusion_models/flux1-dev.safetensors", "models/vae/ae.safetensors",
        ...     "models/genrefocus/genfocus_prompts.safetensors",
        ...     deblur_lora="models/loras/genfocus/deblurNet.safetensors",
        ...     bokeh_lora="models/loras/genfocus/bokehNet.safetensors",
        ...     dtype=torch.bfloat16, device="cuda")  # doctest: +SKIP
        >>> sorted(models.transformer.peft_config)  # doctest: +SKIP
        ['bokeh', 'deblurring']
    """
    from .lora_loading import load_lora
    from .prompts import load_prompt_embeddings

    if deblur_lora is None and bokeh_lora is None and pre_deblur_lora is None:
        raise GenRefocusInputError(
            "at least one of deblur_lora, bokeh_lora and pre_deblur_lora must be given, got none"
        )
    from .loading import load_flux_transformer
    from .memory import MemoryMode, apply_memory_mode

    try:
        mode = MemoryMode(memory_mode)
    except ValueError:
        raise GenRefocusInputError(
            f"memory_mode must be one of {', '.join(m.value for m in MemoryMode)}, got {memory_mode!r}"
        ) from None
    tpath = Path(transformer)
    offload = torch.device(offload_device) if offload_device is not None else None
    # quantised and streamed modes are built on the host, so the compute device never holds bf16 weights
    load_device = device if mode in (MemoryMode.FULL, MemoryMode.FP8) else (offload or "cpu")
    storage = getattr(torch, "float8_e4m3fn", None) if mode.storage == "fp8" else None
    model = load_flux_transformer(tpath, device=load_device, dtype=dtype, config=transformer_config,
                                  storage_dtype=storage)
    for path, adapter in ((deblur_lora, ADAPTER_DEBLUR), (pre_deblur_lora, ADAPTER_PRE_DEBLUR),
                          (bokeh_lora, ADAPTER_BOKEH)):
        if path is not None:
            load_lora(model, path, adapter)
    if mode is not MemoryMode.FULL:
        apply_memory_mode(model, mode, compute_dtype=dtype, onload_device=device,
                          offload_device=offload or "cpu")
    vae_model = load_flux_vae(vae, config=vae_config, device=device, dtype=dtype)
    cfg = model.config
    embeds = {} if prompts is None else load_prompt_embeddings(
        prompts,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        device=device,
        dtype=dtype,
    )
    return GenfocusModels(model, vae_model, embeds, _scheduler_shift(tpath), condition_cache=condition_cache,
                          offload_device=offload)
