"""Test helper: tiny ComfyUI FLUX MODELs for the native-backend tests (real ComfyUI only)."""

from __future__ import annotations

import torch


def real_model_patcher(
    bfl_sd: dict,
    dtype: torch.dtype = torch.float32,
    *,
    hidden: int = 32,
    heads: int = 2,
    context: int = 32,
    axes: tuple[int, ...] = (4, 6, 6),
):
    """A ComfyUI ``ModelPatcher`` of ``comfy.ldm.flux.model.Flux`` holding ``bfl_sd`` (BFL keys), built the
    way ``comfy.sd.load_diffusion_model_state_dict`` builds one. ComfyUI's detection fixes FLUX.1-dev's
    width, heads, T5 width and RoPE axes, so the tiny sizes are set on the detected config."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher

    unet_config = comfy.model_detection.detect_unet_config(bfl_sd, "")
    unet_config.update(hidden_size=hidden, num_heads=heads, context_in_dim=context, axes_dim=list(axes))
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, bfl_sd)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model(bfl_sd, "")
    model.load_model_weights(bfl_sd, "")
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
