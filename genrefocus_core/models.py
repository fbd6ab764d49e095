"""Loading the Genfocus weights: FLUX transformer, VAE, the three LoRAs as named adapters, prompts.

Local files only. The LoRAs stay resident together on one transformer under the adapter names
below, and each condition stream picks its adapter (official-pipeline.md §6.2, fix #10 of §14).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import GenRefocusInputError
from .genpipe import GenfocusModels
from .sampler import FLUX_DEV_SHIFT, FlowShift

__all__ = [
    "ADAPTER_BOKEH",
    "ADAPTER_DEBLUR",
    "ADAPTER_PRE_DEBLUR",
    "LORA_FILES",
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
    prompts: str | Path,
    *,
    deblur_lora: str | Path | None = None,
    bokeh_lora: str | Path | None = None,
    pre_deblur_lora: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    transformer_config: dict | str | Path | None = None,
) -> GenfocusModels:
    """Load everything a Genfocus run needs, from local files only; LoRAs stay resident together.

    Args:
        transformer: FLUX.1-dev as a diffusers folder (or pipeline folder) or a single
            ``.safetensors`` file (BFL/ComfyUI layout, fp8 included).
        vae: the FLUX VAE as a diffusers folder (``vae/`` or a pipeline folder holding it).
        prompts: the cached prompt embeddings (``.safetensors``, see :mod:`~genrefocus_core.prompts`).
        deblur_lora: ``deblurNet.safetensors`` → adapter :data:`ADAPTER_DEBLUR`.
        bokeh_lora: ``bokehNet.safetensors`` → adapter :data:`ADAPTER_BOKEH`.
        pre_deblur_lora: ``deblurNet_with_pre_deblur.safetensors`` → :data:`ADAPTER_PRE_DEBLUR`.
        dtype: compute dtype (official: bf16 on CUDA, float32 on the CPU).
        device: where to put the weights.
        transformer_config: config for single files that are not FLUX.1-dev sized.

    Returns:
        A :class:`~genrefocus_core.genpipe.GenfocusModels` (scheduler constants from a
        ``scheduler/`` folder beside a diffusers transformer, else FLUX.1-dev's).

    Raises:
        GenRefocusModelError: missing or incompatible files (the message says what to put where).
    """
    from .conditions import load_vae
    from .flux_lora import load_lora, load_transformer
    from .prompts import load_prompt_embeddings

    if deblur_lora is None and bokeh_lora is None and pre_deblur_lora is None:
        raise GenRefocusInputError(
            "at least one of deblur_lora, bokeh_lora and pre_deblur_lora must be given, got none"
        )
    tpath = Path(transformer)
    model = load_transformer(tpath, device=device, dtype=dtype, config=transformer_config)
    for path, adapter in ((deblur_lora, ADAPTER_DEBLUR), (pre_deblur_lora, ADAPTER_PRE_DEBLUR),
                          (bokeh_lora, ADAPTER_BOKEH)):
        if path is not None:
            load_lora(model, path, adapter)
    vpath = Path(vae)
    if vpath.is_dir() and not (vpath / "config.json").is_file() and (vpath / "vae" / "config.json").is_file():
        vpath = vpath / "vae"
    vae_model = load_vae(vpath, device=device, dtype=dtype)
    cfg = model.config
    embeds = load_prompt_embeddings(
        prompts,
        joint_attention_dim=cfg.joint_attention_dim,
        pooled_projection_dim=cfg.pooled_projection_dim,
        device=device,
        dtype=dtype,
    )
    return GenfocusModels(model, vae_model, embeds, _scheduler_shift(tpath))
