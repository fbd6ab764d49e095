"""FLUX transformer state-dict layouts: BFL / ComfyUI single files <-> diffusers.

Single-file FLUX checkpoints as ComfyUI users keep them (``models/diffusion_models``,
``models/unet``) use Black Forest Labs' layout: fused ``qkv`` / ``linear1`` projections,
``img_mod`` / ``modulation`` names, optionally prefixed ``model.diffusion_model.`` (ComfyUI saves),
and the final modulation stored as (shift, scale) where diffusers stores (scale, shift). This module
maps both ways for any model size (the split sizes come from the tensors, not from FLUX.1-dev's
constants), so tiny test models convert exactly like the real one.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .errors import GenRefocusModelError

__all__ = ["bfl_to_diffusers", "diffusers_to_bfl", "is_bfl_layout", "strip_prefix"]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")

# (diffusers name, BFL name) for tensors that are renamed only; "{i}" is the block index.
_GLOBAL = [
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
    ("proj_out", "final_layer.linear"),
]
_DOUBLE = [
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
]
_DOUBLE_NORMS = [
    ("attn.norm_q.weight", "img_attn.norm.query_norm.scale"),
    ("attn.norm_k.weight", "img_attn.norm.key_norm.scale"),
    ("attn.norm_added_q.weight", "txt_attn.norm.query_norm.scale"),
    ("attn.norm_added_k.weight", "txt_attn.norm.key_norm.scale"),
]
_SINGLE = [("proj_out", "linear2"), ("norm.linear", "modulation.lin")]
_SINGLE_NORMS = [
    ("attn.norm_q.weight", "norm.query_norm.scale"),
    ("attn.norm_k.weight", "norm.key_norm.scale"),
]
# Fused projections: BFL name -> the diffusers linears concatenated along the output dimension.
_DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_FINAL_MOD = ("norm_out.linear", "final_layer.adaLN_modulation.1")


def strip_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove a common ComfyUI/diffusers wrapper prefix (``model.diffusion_model.`` ...) from every key."""
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p) :]: v for k, v in sd.items()}
    return dict(sd)


def is_bfl_layout(sd: dict[str, Tensor]) -> bool:
    """True when the (prefix-stripped) keys are BFL's (``double_blocks.*``), not diffusers'."""
    return any(k.startswith(("double_blocks.", "img_in.")) for k in strip_prefix(sd))


def _count(sd: dict[str, Tensor], pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def _swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def bfl_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Convert a BFL/ComfyUI FLUX transformer state dict to diffusers' ``FluxTransformer2DModel`` keys.

    Raises:
        GenRefocusModelError: if a tensor the layout needs is missing or left over (not a FLUX
            transformer, or a different architecture), naming a few keys.
    """
    src = strip_prefix(sd)
    if not is_bfl_layout(src):
        raise GenRefocusModelError("state dict is not in BFL/ComfyUI FLUX layout (no double_blocks.* keys)")
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(name: str) -> Tensor:
        if name not in src:
            raise GenRefocusModelError(
                f"FLUX checkpoint lacks tensor {name!r}; is this a FLUX.1 transformer?"
            )
        used.add(name)
        return src[name]

    def rename(d_name: str, b_name: str) -> None:
        for suffix in (".weight", ".bias"):
            if b_name + suffix in src:
                out[d_name + suffix] = take(b_name + suffix)

    inner = take("img_in.weight").shape[0]
    for d, b in _GLOBAL:
        rename(d, b)
    for suffix in (".weight", ".bias"):
        if _FINAL_MOD[1] + suffix in src:
            out[_FINAL_MOD[0] + suffix] = _swap_halves(take(_FINAL_MOD[1] + suffix))
    for i in range(_count(src, r"double_blocks\.(\d+)\.")):
        bp, dp = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for d, b in _DOUBLE:
            rename(dp + d, bp + b)
        for d, b in _DOUBLE_NORMS:
            out[dp + d] = take(bp + b)
        for b, parts in _DOUBLE_FUSED.items():
            for suffix in (".weight", ".bias"):
                if bp + b + suffix in src:
                    for d, t in zip(parts, take(bp + b + suffix).split(inner, dim=0), strict=True):
                        out[dp + d + suffix] = t
    for i in range(_count(src, r"single_blocks\.(\d+)\.")):
        bp, dp = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for d, b in _SINGLE:
            rename(dp + d, bp + b)
        for d, b in _SINGLE_NORMS:
            out[dp + d] = take(bp + b)
        for suffix in (".weight", ".bias"):
            if bp + "linear1" + suffix in src:
                fused = take(bp + "linear1" + suffix)
                sizes = [inner, inner, inner, fused.shape[0] - 3 * inner]
                for d, t in zip(_SINGLE_FUSED["linear1"], fused.split(sizes, dim=0), strict=True):
                    out[dp + d + suffix] = t
    left = sorted(set(src) - used)
    if left:
        raise GenRefocusModelError(
            f"FLUX checkpoint has {len(left)} unexpected tensor(s), e.g. {left[:4]}; it is not a FLUX.1 "
            "transformer in the layout GenRefocus knows"
        )
    return out


def diffusers_to_bfl(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`bfl_to_diffusers` (used to write test checkpoints and by the native backend)."""
    src = strip_prefix(sd)
    out: dict[str, Tensor] = {}
    inner = src["x_embedder.weight"].shape[0]
    del inner  # sizes are implied by the concatenation

    def rename(d_name: str, b_name: str) -> None:
        for suffix in (".weight", ".bias"):
            if d_name + suffix in src:
                out[b_name + suffix] = src[d_name + suffix]

    for d, b in _GLOBAL:
        rename(d, b)
    for suffix in (".weight", ".bias"):
        if _FINAL_MOD[0] + suffix in src:
            out[_FINAL_MOD[1] + suffix] = _swap_halves(src[_FINAL_MOD[0] + suffix])
    for i in range(_count(src, r"transformer_blocks\.(\d+)\.")):
        bp, dp = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for d, b in _DOUBLE:
            rename(dp + d, bp + b)
        for d, b in _DOUBLE_NORMS:
            out[bp + b] = src[dp + d]
        for b, parts in _DOUBLE_FUSED.items():
            for suffix in (".weight", ".bias"):
                if dp + parts[0] + suffix in src:
                    out[bp + b + suffix] = torch.cat([src[dp + p + suffix] for p in parts], dim=0)
    for i in range(_count(src, r"single_transformer_blocks\.(\d+)\.")):
        bp, dp = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for d, b in _SINGLE:
            rename(dp + d, bp + b)
        for d, b in _SINGLE_NORMS:
            out[bp + b] = src[dp + d]
        for suffix in (".weight", ".bias"):
            parts = _SINGLE_FUSED["linear1"]
            if dp + parts[0] + suffix in src:
                out[bp + "linear1" + suffix] = torch.cat([src[dp + p + suffix] for p in parts], dim=0)
    return out
