"""FLUX transformer with named, branch-selective LoRAs: the OminiControl/Genfocus multi-stream forward.

The forward (official-pipeline.md §6) runs the streams ``[text, image, cond_1..k]`` through the
submodules of a diffusers ``FluxTransformer2DModel`` in our own loop:

* every image-like stream has its own timestep/guidance embedding (conditions: t = 0, g = 1) and
  its own RoPE ids; text uses the image's embedding;
* attention is grouped: text and image attend to every stream, each condition to text, image and
  itself only. K/V are concatenated per query stream and SDPA is called per query stream — never
  with a mask;
* LoRA is switched per stream on the wrapped module set (§6.2 / §12): a condition stream uses its
  adapter's PEFT ``lora_A``/``lora_B`` at the layer's ``scaling`` (exactly 1 for adapters loaded by
  :func:`.lora_loading.load_lora`, alpha = rank, as upstream's ``specify_lora`` forces), text and
  image use the base weights only. Adapters are never merged (the main stream must stay LoRA-free), and LoRA
  matmuls are only computed for tokens that use them.

diffusers and peft are imported lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .condition_cache import ConditionCache
from .conditions import ConditionTokens
from .errors import GenRefocusInputError, GenRefocusModelError
from .memory import offload_hooks

__all__ = [
    "DOUBLE_BLOCK_LORA_MODULES",
    "SINGLE_BLOCK_LORA_MODULES",
    "adapter_scales",
    "check_forward_inputs",
    "check_guidance",
    "flux_forward",
    "lora_target_modules",
]

logger = logging.getLogger(__name__)

#: Linear modules of a double-stream block that a Genfocus LoRA wraps (OminiControl default set).
DOUBLE_BLOCK_LORA_MODULES = (
    "norm1.linear",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "ff.net.2",
)
#: Linear modules of a single-stream block that a Genfocus LoRA wraps.
SINGLE_BLOCK_LORA_MODULES = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")


def lora_target_modules(transformer: nn.Module) -> list[str]:
    """Module paths a Genfocus LoRA must target in ``transformer`` (343 for FLUX.1-dev).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> len(lora_target_modules(NS(transformer_blocks=[0] * 19, single_transformer_blocks=[0] * 38)))
        343
    """
    names = ["x_embedder"]
    names += [
        f"transformer_blocks.{i}.{m}"
        for i in range(len(transformer.transformer_blocks))
        for m in DOUBLE_BLOCK_LORA_MODULES
    ]
    names += [
        f"single_transformer_blocks.{i}.{m}"
        for i in range(len(transformer.single_transformer_blocks))
        for m in SINGLE_BLOCK_LORA_MODULES
    ]
    return names


def _is_lora_layer(layer: nn.Module) -> bool:
    return hasattr(layer, "lora_A") and hasattr(layer, "base_layer") and hasattr(layer, "scaling")


def _lin(layer: nn.Module, x: Tensor, adapter: str | None) -> Tensor:
    """``layer(x)`` with exactly one LoRA adapter (or none) active, PEFT's arithmetic.

    ``base(x) + B(A(dropout(x))) * scaling[adapter]`` as peft's ``lora.Linear.forward`` computes it
    for one adapter; other adapters contribute nothing (upstream sets their scaling to 0, which is
    bitwise the same as not computing them).
    """
    if not _is_lora_layer(layer):
        return layer(x)
    if getattr(layer, "merged", False):
        raise GenRefocusModelError(
            "a LoRA adapter is merged into the FLUX weights; branch-selective LoRA needs unmerged adapters "
            "(call unmerge_adapter() or reload the transformer)"
        )
    result = layer.base_layer(x)
    if adapter is None or adapter not in layer.lora_A or getattr(layer, "disable_adapters", False):
        return result
    if layer.use_dora.get(adapter, False):
        raise GenRefocusModelError(f"adapter {adapter!r} is a DoRA adapter; only plain LoRA is supported")
    lora_a = layer.lora_A[adapter]
    xa = x.to(lora_a.weight.dtype)
    out = result + layer.lora_B[adapter](lora_a(layer.lora_dropout[adapter](xa))) * layer.scaling[adapter]
    return out.to(result.dtype)


@contextmanager
def adapter_scales(model: nn.Module, scales: Mapping[str, float]) -> Iterator[None]:
    """Multiply PEFT ``scaling[name]`` by ``scales[name]`` on every LoRA layer; restore on exit.

    Our tested counterpart of OminiControl's ``specify_lora``: ``{"bokeh": 0.0}`` switches the
    adapter off (for the stock diffusers forward and for :func:`flux_forward` alike).

    Args:
        model: a module holding PEFT tuner layers.
        scales: adapter name → factor.

    Example:
        >>> with adapter_scales(torch.nn.Linear(2, 2), {"bokeh": 0.0}):
        ...     pass
    """
    saved: list[tuple[Any, str, float]] = []
    try:
        for m in model.modules():
            scaling = getattr(m, "scaling", None)
            if not isinstance(scaling, dict) or not hasattr(m, "base_layer"):
                continue
            for name, factor in scales.items():
                if name in scaling:
                    saved.append((m, name, scaling[name]))
                    scaling[name] = scaling[name] * float(factor)
        yield
    finally:
        for m, name, value in reversed(saved):
            m.scaling[name] = value


# ------------------------------------------------------------------------------------------------
# The multi-stream forward
# ------------------------------------------------------------------------------------------------


@dataclass
class _Stream:
    h: Tensor  # hidden states (B, S, D)
    temb: Tensor  # (B or 1, D)
    rope: tuple[Tensor, Tensor]
    adapter: str | None
    group: int  # 0 = text, 1 = image, 2.. = conditions


def _heads(x: Tensor, heads: int) -> Tensor:
    b = x.shape[0]
    return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)


def _rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, rope)


def _attend(
    qs: list[Tensor],
    ks: list[Tensor],
    vs: list[Tensor],
    groups: list[int],
    cached: tuple[Tensor, Tensor] | None = None,
) -> list[Tensor]:
    """Grouped attention: text/image queries see every stream, a condition sees text, image, itself.

    K/V are concatenated in stream order per query stream; SDPA gets no mask (§6.3). ``cached``:
    replayed condition K/V (fast mode), appended after the live streams' for text and image.
    """
    shared_k = shared_v = None
    out = []
    for i, q in enumerate(qs):
        if groups[i] < 2:
            if shared_k is None:
                kk, vv = (ks, vs) if cached is None else ([*ks, cached[0]], [*vs, cached[1]])
                shared_k, shared_v = torch.cat(kk, dim=2), torch.cat(vv, dim=2)
            k, v = shared_k, shared_v
        else:
            sel = [j for j in range(len(qs)) if groups[j] < 2 or j == i]
            k = torch.cat([ks[j] for j in sel], dim=2)
            v = torch.cat([vs[j] for j in sel], dim=2)
        o = F.scaled_dot_product_attention(q, k, v).to(q.dtype)
        out.append(o.transpose(1, 2).reshape(q.shape[0], -1, q.shape[1] * q.shape[3]))
    return out


def _clip(h: Tensor) -> Tensor:
    return h.clip(-65504, 65504) if h.dtype == torch.float16 else h


def _ada_zero(
    norm: nn.Module, x: Tensor, temb: Tensor, adapter: str | None, chunks: int
) -> tuple[Tensor, ...]:
    """diffusers ``AdaLayerNormZero[Single]`` with the modulation Linear routed per stream."""
    emb = _lin(norm.linear, norm.silu(temb), adapter).chunk(chunks, dim=1)
    shift, scale = emb[0], emb[1]
    return (norm.norm(x) * (1 + scale[:, None]) + shift[:, None], *emb[2:])


def _condition_kv(
    streams: list[_Stream], ks: list[Tensor], vs: list[Tensor], cache: _LayerCache | None
) -> tuple[Tensor, Tensor] | None:
    """Record (first step) or fetch (later steps) this layer's condition K/V; None when exact."""
    if cache is None:
        return None
    if cache.read:
        k, v = cache.cache.get(cache.layer, ks[0].device, ks[0].dtype)
        cache.layer += 1
        return k, v
    sel = [j for j, s in enumerate(streams) if s.group >= 2]
    k, v = torch.cat([ks[j] for j in sel], dim=2), torch.cat([vs[j] for j in sel], dim=2)
    cache.cache.store(k, v, batch=k.shape[0], tokens=k.shape[2])
    return None


@dataclass
class _LayerCache:
    cache: ConditionCache
    read: bool
    layer: int = 0


def _double_block(block: nn.Module, streams: list[_Stream], cache: _LayerCache | None = None) -> None:
    attn = block.attn
    heads = attn.heads
    mods, qs, ks, vs = [], [], [], []
    for s in streams:
        if s.group == 0:
            n, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(s.h, emb=s.temb)
            q, k, v = (_heads(p(n), heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q, k = attn.norm_added_q(q), attn.norm_added_k(k)
        else:
            n, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_zero(block.norm1, s.h, s.temb, s.adapter, 6)
            q, k, v = (_heads(_lin(p, n, s.adapter), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
            q, k = attn.norm_q(q), attn.norm_k(k)
        mods.append((gate_msa, shift_mlp, scale_mlp, gate_mlp))
        qs.append(_rope(q, s.rope))
        ks.append(_rope(k, s.rope))
        vs.append(v)
    outs = _attend(qs, ks, vs, [s.group for s in streams], _condition_kv(streams, ks, vs, cache))
    for s, o, (gate_msa, shift_mlp, scale_mlp, gate_mlp) in zip(streams, outs, mods, strict=True):
        if s.group == 0:
            h = s.h + attn.to_add_out(o) * gate_msa.unsqueeze(1)
            n = block.norm2_context(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            s.h = _clip(block.ff_context(n) * gate_mlp.unsqueeze(1) + h)
        else:
            h = (s.h + _lin(attn.to_out[0], o, s.adapter) * gate_msa.unsqueeze(1)).to(s.h.dtype)
            n = block.norm2(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            ff = block.ff.net
            f = _lin(ff[2], ff[1](ff[0](n)), s.adapter)
            s.h = _clip(h + f * gate_mlp.unsqueeze(1))


def _single_block(block: nn.Module, streams: list[_Stream], cache: _LayerCache | None = None) -> None:
    attn = block.attn
    heads = attn.heads
    gates, mlps, qs, ks, vs = [], [], [], [], []
    for s in streams:
        # upstream: text switches with main_adapter (None) here too, and uses to_q/k/v like FLUX
        n, gate = _ada_zero(block.norm, s.h, s.temb, s.adapter, 3)
        mlps.append(block.act_mlp(_lin(block.proj_mlp, n, s.adapter)))
        gates.append(gate)
        q, k, v = (_heads(_lin(p, n, s.adapter), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        qs.append(_rope(q, s.rope))
        ks.append(_rope(k, s.rope))
        vs.append(v)
    outs = _attend(qs, ks, vs, [s.group for s in streams], _condition_kv(streams, ks, vs, cache))
    for s, o, mlp, gate in zip(streams, outs, mlps, gates, strict=True):
        h = torch.cat([o, mlp], dim=2)
        s.h = _clip(gate.unsqueeze(1) * _lin(block.proj_out, h, s.adapter) + s.h)


def check_forward_inputs(
    cfg: Any,
    latents: Tensor,
    latent_ids: Tensor,
    timestep: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    conditions: Sequence[ConditionTokens],
) -> None:
    """Shapes of a FLUX forward's inputs against ``cfg`` (``in_channels``, ``joint_attention_dim``,
    ``pooled_projection_dim``: a diffusers config or the native backend's dims).

    Raises:
        GenRefocusInputError: naming the input, the expected and the actual shape.
    """
    if latents.ndim != 3 or latents.shape[2] != cfg.in_channels:
        raise GenRefocusInputError(
            f"latents must have shape (B, N, {cfg.in_channels}), got {tuple(latents.shape)}"
        )
    if latent_ids.shape != (latents.shape[1], 3):
        raise GenRefocusInputError(
            f"latent_ids must have shape ({latents.shape[1]}, 3), got {tuple(latent_ids.shape)}"
        )
    b = latents.shape[0]
    if timestep.ndim != 1 or timestep.shape[0] not in (1, b):
        raise GenRefocusInputError(f"timestep must have shape (1,) or ({b},), got {tuple(timestep.shape)}")
    if (
        prompt_embeds.ndim != 3
        or prompt_embeds.shape[0] not in (1, b)
        or (prompt_embeds.shape[2] != cfg.joint_attention_dim)
    ):
        raise GenRefocusInputError(
            f"prompt_embeds must have shape (1 or {b}, L, {cfg.joint_attention_dim}), "
            f"got {tuple(prompt_embeds.shape)}"
        )
    if pooled.ndim != 2 or pooled.shape[0] not in (1, b) or pooled.shape[1] != cfg.pooled_projection_dim:
        raise GenRefocusInputError(
            f"pooled must have shape (1 or {b}, {cfg.pooled_projection_dim}), got {tuple(pooled.shape)}"
        )
    for i, c in enumerate(conditions):
        if not isinstance(c, ConditionTokens):
            raise GenRefocusInputError(f"conditions[{i}] must be a ConditionTokens, got {type(c).__name__}")
        if c.tokens.shape[0] not in (1, b) or c.tokens.shape[2] != cfg.in_channels:
            raise GenRefocusInputError(
                f"conditions[{i}].tokens must have shape (1 or {b}, N, {cfg.in_channels}), "
                f"got {tuple(c.tokens.shape)}"
            )


def check_guidance(guidance_embeds: bool, guidance: float | None, *, strict: bool = False) -> None:
    """Raise unless ``guidance`` is a number for a guidance-distilled FLUX (FLUX.1-dev); with ``strict``,
    also unless it is None for a FLUX without guidance embedding (otherwise it is ignored there).

    Raises:
        GenRefocusInputError: naming the guidance given.

    Example:
        >>> check_guidance(True, 3.5); check_guidance(False, None, strict=True)
        >>> check_guidance(False, 3.5, strict=True)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        GenRefocusInputError: guidance must be None for a FLUX without guidance embedding, got 3.5
    """
    if guidance_embeds and guidance is None:
        raise GenRefocusInputError(
            "guidance must be a number for a guidance-distilled FLUX (FLUX.1-dev), got None"
        )
    if strict and not guidance_embeds and guidance is not None:
        raise GenRefocusInputError(
            f"guidance must be None for a FLUX without guidance embedding, got {guidance}"
        )


def flux_forward(
    transformer: nn.Module,
    latents: Tensor,
    latent_ids: Tensor,
    timestep: Tensor,
    *,
    prompt_embeds: Tensor,
    pooled: Tensor,
    guidance: float | None,
    conditions: Sequence[ConditionTokens] = (),
    text_ids: Tensor | None = None,
    return_streams: bool = False,
    condition_cache: ConditionCache | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Velocity of the image stream from the multi-stream (OminiControl) FLUX forward.

    Memory modes (:mod:`~genrefocus_core.memory`) need nothing from the caller: streamed blocks are
    onloaded around their computation, fp8/NF4/GGUF layers cast or dequantise themselves.

    Args:
        transformer: diffusers ``FluxTransformer2DModel`` (adapters from :func:`.lora_loading.load_lora`).
        latents: ``(B, N, in_channels)`` noisy image tokens.
        latent_ids: ``(N, 3)`` image ids.
        timestep: ``(B,)`` or ``(1,)`` model time ``t/1000`` in [0, 1] (times 1000 inside, as upstream).
        prompt_embeds: ``(1 or B, L, joint_attention_dim)`` T5 embeddings.
        pooled: ``(1 or B, pooled_projection_dim)`` CLIP pooled embedding (all streams use it).
        guidance: guidance-embedding value of text and image (3.5 deblur, 1.0 bokeh); conditions
            always use 1.0. Ignored (must be None) for models without guidance embeddings.
        conditions: condition streams (their ``adapter`` selects the LoRA of that stream).
        text_ids: ``(L, 3)`` text ids (default zeros).
        return_streams: also return the final hidden states of every stream (text, image, conds).
        condition_cache: fast mode (an approximation, see :mod:`~genrefocus_core.condition_cache`):
            an empty cache records every layer's condition K/V during this (exact) forward; a filled
            one replays them and the condition streams are not computed. One cache per forward
            layout (tile chunk); ``None`` = exact.

    Returns:
        ``(B, N, out_channels)`` velocity, or ``(velocity, [h_text, h_image, h_cond...])``.

    Raises:
        GenRefocusInputError: bad shapes.
        GenRefocusModelError: merged or DoRA adapters.

    Example:
        >>> from diffusers import FluxTransformer2DModel
        >>> m = FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
        ...     pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
        >>> v = flux_forward(m, torch.zeros(1, 4, 4), torch.zeros(4, 3), torch.ones(1),
        ...                  prompt_embeds=torch.zeros(1, 3, 8), pooled=torch.zeros(1, 8), guidance=None)
        >>> v.shape
        torch.Size([1, 4, 4])
    """
    check_forward_inputs(transformer.config, latents, latent_ids, timestep, prompt_embeds, pooled, conditions)
    check_guidance(bool(transformer.config.guidance_embeds), guidance)
    if condition_cache is not None and not conditions:
        raise GenRefocusInputError("condition_cache needs conditions, got none")
    cache = None
    if condition_cache is not None:
        if condition_cache.filled:
            condition_cache.check(latents.shape[0], sum(c.tokens.shape[1] for c in conditions))
        cache = _LayerCache(condition_cache, read=condition_cache.filled)
    with offload_hooks(transformer):
        out, streams = _forward(transformer, latents, latent_ids, timestep, prompt_embeds, pooled, guidance,
                                conditions, text_ids, cache)
    if cache is not None and not cache.read:
        condition_cache.finish()
    if return_streams:
        return out, [s.h for s in streams]
    return out


def _forward(
    transformer: nn.Module,
    latents: Tensor,
    latent_ids: Tensor,
    timestep: Tensor,
    prompt_embeds: Tensor,
    pooled: Tensor,
    guidance: float | None,
    conditions: Sequence[ConditionTokens],
    text_ids: Tensor | None,
    cache: _LayerCache | None,
) -> tuple[Tensor, list[_Stream]]:
    b = latents.shape[0]
    has_guidance = bool(transformer.config.guidance_embeds)
    if cache is not None and cache.read:
        conditions = ()  # replayed from the cache: the condition streams are not computed

    img = _lin(transformer.x_embedder, latents, None)
    dtype, device = img.dtype, img.device
    conds_h = [_lin(transformer.x_embedder, c.tokens, c.adapter).expand(b, -1, -1) for c in conditions]
    txt = transformer.context_embedder(prompt_embeds).expand(b, -1, -1)

    def temb(t: Tensor, g: Tensor | None) -> Tensor:
        t = t.to(dtype) * 1000
        if g is None:
            return transformer.time_text_embed(t, pooled)
        return transformer.time_text_embed(t, g.to(dtype) * 1000, pooled)

    g_img = torch.tensor([float(guidance)], device=device).expand(timestep.shape[0]) if has_guidance else None
    temb_img = temb(timestep.to(device), g_img)
    if conditions:
        g_cond = torch.ones([1], device=device) if has_guidance else None
        temb_cond = temb(torch.zeros([1], device=device), g_cond)

    if text_ids is None:
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)
    pe = transformer.pos_embed
    rope_img = pe(latent_ids.to(device))
    streams = [
        _Stream(txt, temb_img, pe(text_ids.to(device)), None, 0),
        _Stream(img, temb_img, rope_img, None, 1),
    ]
    rope_cache: dict[int, tuple[Tensor, Tensor]] = {id(latent_ids): rope_img}
    for i, (c, h) in enumerate(zip(conditions, conds_h, strict=True)):
        if id(c.ids) not in rope_cache:
            rope_cache[id(c.ids)] = pe(c.ids.to(device))
        streams.append(_Stream(h, temb_cond, rope_cache[id(c.ids)], c.adapter, 2 + i))

    for block in transformer.transformer_blocks:
        with offload_hooks(block):
            _double_block(block, streams, cache)
    for block in transformer.single_transformer_blocks:
        with offload_hooks(block):
            _single_block(block, streams, cache)

    out = transformer.proj_out(transformer.norm_out(streams[1].h, streams[1].temb))
    return out, streams


def __getattr__(name: str) -> Any:
    """``load_lora``, ``load_transformer`` and ``LoraInfo`` live in :mod:`.lora_loading` (re-exported)."""
    if name in ("LoraInfo", "load_lora", "load_transformer"):
        from . import lora_loading

        return getattr(lora_loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
