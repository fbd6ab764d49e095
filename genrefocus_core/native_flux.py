"""The Genfocus multi-stream forward over FLUX in Black Forest Labs' module layout (ComfyUI's ``Flux``).

Same maths as :func:`genrefocus_core.flux_lora.flux_forward` (official-pipeline.md §6), run on the
module tree that ComfyUI (and the BFL reference code) builds for FLUX.1: ``img_in``, ``txt_in``,
``time_in`` / ``guidance_in`` / ``vector_in`` (``in_layer``, ``out_layer``), ``pe_embedder``
(``theta``, ``axes_dim``), ``double_blocks[i]`` (``img_mod.lin``, ``img_norm1``, ``img_attn.qkv`` /
``.norm`` / ``.proj``, ``img_norm2``, ``img_mlp``, and the ``txt_*`` twins), ``single_blocks[i]``
(``modulation.lin``, ``pre_norm``, ``linear1``, ``norm``, ``mlp_act``, ``linear2``) and
``final_layer`` (``adaLN_modulation``, ``norm_final``, ``linear``). Nothing here imports ComfyUI:
the modules are only *called* (so ComfyUI's casting operations, fp8/GGUF weights and lowvram
partial loading keep working) and a few size attributes are read.

* Streams ``[text, image, cond_1..k]``; image and conditions share the image weights, so their
  tokens go through every Linear in **one** call (weights are read once per layer, which matters
  when ComfyUI streams them from the CPU); each stream keeps its own modulation (conditions:
  t = 0, guidance 1), RoPE ids and attention group (a condition attends to text, image and
  itself; text and image to everything), never with an attention mask.
* Genfocus LoRAs (diffusers/PEFT files, §12) are mapped onto the fused layout — ``to_q|to_k|to_v``
  onto row blocks of ``img_attn.qkv``, ``to_q|to_k|to_v|proj_mlp`` onto ``linear1`` … — and added
  as a side path ``B(A x)`` on condition-token rows only, at scale 1 (what upstream's
  ``specify_lora`` forces). They are never merged into the weights. The module-tree sizes and
  that mapping live in :mod:`~genrefocus_core._fused_lora` (re-exported here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._fused_lora import (
    FusedLora,
    NativeLora,
    check_flux_module,
    features,
    flux_dims,
    native_lora_from_state_dict,
)
from .conditions import ConditionTokens
from .errors import GenRefocusModelError
from .flux_lora import check_forward_inputs, check_guidance

__all__ = [
    "AttentionFn",
    "FusedLora",
    "NativeLora",
    "check_flux_module",
    "flux_dims",
    "load_native_lora",
    "native_flux_forward",
    "native_lora_from_state_dict",
    "rope_tables",
]

logger = logging.getLogger(__name__)

#: ``attention(q, k, v) -> (B, Lq, H*D)`` for ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)``, no mask.
AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------------
# LoRA files (the mapping onto the fused layout: _fused_lora.native_lora_from_state_dict)
# ------------------------------------------------------------------------------------------------


def load_native_lora(path: str | Path, flux: Any, adapter: str) -> NativeLora:
    """Read a Genfocus LoRA file and map it onto ``flux`` (see :func:`native_lora_from_state_dict`).

    Args:
        path: ``.safetensors`` file (``deblurNet.safetensors``, ``bokehNet.safetensors`` ...).
        flux: BFL-layout FLUX module tree.
        adapter: adapter name.

    Returns:
        A :class:`NativeLora` on the CPU, float32.

    Raises:
        GenRefocusModelError: missing or unreadable file, wrong keys or shapes.

    Example:
        >>> path = "models/loras/genfocus/bokehNet.safetensors"
        >>> lora = load_native_lora(path, flux, "bokeh")  # doctest: +SKIP
        >>> lora.modules["double_blocks.0.img_attn.qkv"].a.shape  # doctest: +SKIP
        torch.Size([12, 3072])
    """
    p = Path(path)
    if not p.is_file():
        raise GenRefocusModelError(
            f"LoRA file {str(p)!r} not found; download the Genfocus LoRA (deblurNet.safetensors / "
            "bokehNet.safetensors) into models/loras/genfocus or models/genrefocus"
        )
    from .loading import read_safetensors

    sd = read_safetensors(p)
    lora = native_lora_from_state_dict(sd, flux, adapter, name=p.name)
    logger.info(
        "mapped LoRA %s onto the FLUX layout as adapter %r: rank %d, %d fused modules, %.1f M weights",
        p.name,
        adapter,
        lora.rank,
        len(lora.modules),
        lora.parameters / 1e6,
    )
    return lora


# ------------------------------------------------------------------------------------------------
# Embeddings
# ------------------------------------------------------------------------------------------------


def _timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """FLUX's sinusoidal embedding of ``t`` (already times 1000): ``[cos(t f), sin(t f)]``, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(ids: Tensor, axes_dim: Sequence[int], theta: float) -> tuple[Tensor, Tensor]:
    """FLUX RoPE angles for position ids: ``(cos, sin)``, each ``(N, sum(axes_dim)/2)`` float32.

    Frequencies ``theta ** (-2j/d)`` per axis in float64 (as both reference implementations), for
    the interleaved-pairs convention: feature pair ``(2j, 2j+1)`` is rotated by angle ``[.., j]``.

    Example:
        >>> cos, sin = rope_tables(torch.tensor([[0.0, 1.0, 2.0]]), (2, 2, 4), 10000)
        >>> cos.shape, round(float(sin[0, 1]), 4)
        (torch.Size([1, 4]), 0.8415)
    """
    pos = ids.to(torch.float64)
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
        angles.append(pos[:, i, None] * omega[None])
    a = torch.cat(angles, dim=-1)
    return torch.cos(a).float(), torch.sin(a).float()


def _apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate feature pairs of ``x (B, H, N, D)`` by the tables ``(N, D/2)``; float32 inside."""
    cos, sin = rope
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])


# ------------------------------------------------------------------------------------------------
# The forward
# ------------------------------------------------------------------------------------------------


@dataclass
class _Segs:
    """Token layout of the image-like tensor ``[image | cond_1 | ... | cond_k]``."""

    n_img: int
    bounds: list[tuple[int, int]]  # per condition, in the image-like tensor
    adapters: list[str | None]
    loras: Mapping[str, NativeLora]

    def runs(self, offset: int = 0) -> list[tuple[int, int, str]]:
        """Contiguous condition token ranges sharing one adapter (shifted by ``offset``)."""
        out: list[tuple[int, int, str]] = []
        for (a, b), ad in zip(self.bounds, self.adapters, strict=True):
            if ad is None:
                continue
            if out and out[-1][2] == ad and out[-1][1] == a + offset:
                out[-1] = (out[-1][0], b + offset, ad)
            else:
                out.append((a + offset, b + offset, ad))
        return out

    def lora(self, adapter: str, path: str) -> FusedLora | None:
        lo = self.loras.get(adapter)
        return None if lo is None else lo.modules.get(path)


def _linear(module: Any, x: Tensor, segs: _Segs, path: str, offset: int = 0) -> Tensor:
    """``module(x)`` once for all tokens, plus each condition adapter's LoRA on its rows only."""
    y = module(x)
    for a, b, ad in segs.runs(offset):
        lo = segs.lora(ad, path)
        if lo is not None:
            y[:, a:b] += lo.delta(x[:, a:b]).to(y.dtype)
    return y


def _mod_rows(
    lin: Any, vec_img: Tensor, vec_cond: Tensor | None, segs: _Segs, path: str
) -> tuple[Tensor, dict]:
    """Modulation rows ``lin(silu(vec))``: the image's ``(Bv, M)``, and ``(1, M)`` per condition adapter."""
    if vec_cond is None:
        return lin(F.silu(vec_img)), {}
    n = vec_img.shape[0]
    s = F.silu(torch.cat([vec_img, vec_cond.to(vec_img.dtype)], dim=0))
    out = lin(s)
    base = out[n:]
    conds: dict[str | None, Tensor] = {}
    for ad in dict.fromkeys(segs.adapters):
        lo = None if ad is None else segs.lora(ad, path)
        conds[ad] = base if lo is None else base + lo.delta(s[n:]).to(base.dtype)
    return out[:n], conds


def _chunks(m: Tensor, n: int) -> list[Tensor]:
    return [c[:, None] for c in m.chunk(n, dim=-1)]


def _per_seg(
    x: Tensor,
    n_img: int,
    bounds: list[tuple[int, int]],
    img_args: list[Tensor],
    cond_args: list[list[Tensor]],
    fn: Callable[..., Tensor],
) -> Tensor:
    """``cat([fn(x[image], *img_args), fn(x[cond_j], *cond_args[j]) ...])`` along tokens."""
    parts = [fn(x[:, :n_img], *img_args)]
    parts += [fn(x[:, a:b], *args) for (a, b), args in zip(bounds, cond_args, strict=True)]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def _gated(x: Tensor, gate: Tensor) -> Tensor:
    return x * gate


def _heads(qkv: Tensor, heads: int, parts: int = 3) -> tuple[Tensor, ...]:
    b, n, _ = qkv.shape
    return tuple(qkv.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


def _clip(h: Tensor) -> Tensor:
    return h.clip(-65504, 65504) if h.dtype == torch.float16 else h


def _grouped_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    n_main: int,
    n_txt_img: int,
    bounds: list[tuple[int, int]],
    attention: AttentionFn,
) -> Tensor:
    """Group attention over ``[text | image | cond_1 | ...]`` tokens (all tensors ``(B, H, T, D)``).

    ``n_main`` leading tokens (text and image) attend to everything; condition ``j`` (token range
    ``bounds[j]``, absolute) attends to the first ``n_txt_img`` tokens and itself. Conditions of one
    length are batched into one call.
    """
    outs = [attention(q[:, :, :n_main], k, v)]
    if bounds:
        b = q.shape[0]
        lengths = {e - s for s, e in bounds}

        def kv(t: Tensor, s: int, e: int) -> Tensor:
            return torch.cat([t[:, :, :n_txt_img], t[:, :, s:e]], dim=2)

        if len(lengths) == 1 and len(bounds) > 1:
            qc = torch.cat([q[:, :, s:e] for s, e in bounds], dim=0)
            kc = torch.cat([kv(k, s, e) for s, e in bounds], dim=0)
            vc = torch.cat([kv(v, s, e) for s, e in bounds], dim=0)
            oc = attention(qc, kc, vc)
            outs += list(oc.split(b, dim=0))
        else:
            outs += [attention(q[:, :, s:e], kv(k, s, e), kv(v, s, e)) for s, e in bounds]
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


@dataclass
class _State:
    txt: Tensor  # (B, L, D)
    x: Tensor  # (B, N + sum Nj, D): image, then conditions
    vec_img: Tensor  # (Bv, D)
    vec_cond: Tensor | None  # (1, D)
    rope_txt: tuple[Tensor, Tensor]
    rope_x: tuple[Tensor, Tensor]
    segs: _Segs


def _double_block(i: int, block: Any, st: _State, attention: AttentionFn) -> None:
    heads, segs = block.num_heads, st.segs
    p = f"double_blocks.{i}."
    tm = _chunks(block.txt_mod.lin(F.silu(st.vec_img)), 6)
    m_img, m_cond = _mod_rows(block.img_mod.lin, st.vec_img, st.vec_cond, segs, p + "img_mod.lin")
    mi = _chunks(m_img, 6)
    mc = [_chunks(m_cond[ad], 6) for ad in segs.adapters]

    tn = _modulate(block.txt_norm1(st.txt), tm[0], tm[1])
    tq, tk, tv = _heads(block.txt_attn.qkv(tn), heads)
    tq, tk = block.txt_attn.norm(tq, tk, tv)
    xn = _per_seg(
        block.img_norm1(st.x), segs.n_img, segs.bounds, [mi[0], mi[1]], [[c[0], c[1]] for c in mc], _modulate
    )
    xq, xk, xv = _heads(_linear(block.img_attn.qkv, xn, segs, p + "img_attn.qkv"), heads)
    xq, xk = block.img_attn.norm(xq, xk, xv)

    rope = (torch.cat([st.rope_txt[0], st.rope_x[0]]), torch.cat([st.rope_txt[1], st.rope_x[1]]))
    q = _apply_rope(torch.cat([tq, xq], dim=2), rope)
    k = _apply_rope(torch.cat([tk, xk], dim=2), rope)
    v = torch.cat([tv, xv], dim=2)
    n_txt = st.txt.shape[1]
    n_ti = n_txt + segs.n_img
    bounds = [(a + n_txt, b + n_txt) for a, b in segs.bounds]
    o = _grouped_attention(q, k, v, n_ti, n_ti, bounds, attention)
    to, xo = o[:, :n_txt], o[:, n_txt:]

    txt = st.txt + block.txt_attn.proj(to) * tm[2]
    txt = txt + block.txt_mlp(_modulate(block.txt_norm2(txt), tm[3], tm[4])) * tm[5]
    st.txt = _clip(txt)

    proj = _linear(block.img_attn.proj, xo, segs, p + "img_attn.proj")
    x = st.x + _per_seg(proj, segs.n_img, segs.bounds, [mi[2]], [[c[2]] for c in mc], _gated)
    xn = _per_seg(
        block.img_norm2(x), segs.n_img, segs.bounds, [mi[3], mi[4]], [[c[3], c[4]] for c in mc], _modulate
    )
    mlp = block.img_mlp
    f = _linear(mlp[2], mlp[1](mlp[0](xn)), segs, p + "img_mlp.2")
    st.x = _clip(x + _per_seg(f, segs.n_img, segs.bounds, [mi[5]], [[c[5]] for c in mc], _gated))


def _single_block(i: int, block: Any, st: _State, attention: AttentionFn) -> None:
    heads, segs = block.num_heads, st.segs
    p = f"single_blocks.{i}."
    n_txt = st.txt.shape[1]
    hidden = st.x.shape[2]
    m_img, m_cond = _mod_rows(block.modulation.lin, st.vec_img, st.vec_cond, segs, p + "modulation.lin")
    mi = _chunks(m_img, 3)
    mc = [_chunks(m_cond[ad], 3) for ad in segs.adapters]
    z = torch.cat([st.txt, st.x], dim=1)
    n_ti = n_txt + segs.n_img
    bounds = [(a + n_txt, b + n_txt) for a, b in segs.bounds]
    zn = _per_seg(block.pre_norm(z), n_ti, bounds, [mi[0], mi[1]], [[c[0], c[1]] for c in mc], _modulate)
    h = _linear(block.linear1, zn, segs, p + "linear1", offset=n_txt)
    qkv, mlp = h[..., : 3 * hidden], h[..., 3 * hidden :]
    q, k, v = _heads(qkv.contiguous(), heads)
    q, k = block.norm(q, k, v)
    rope = (torch.cat([st.rope_txt[0], st.rope_x[0]]), torch.cat([st.rope_txt[1], st.rope_x[1]]))
    o = _grouped_attention(_apply_rope(q, rope), _apply_rope(k, rope), v, n_ti, n_ti, bounds, attention)
    out = _linear(block.linear2, torch.cat([o, block.mlp_act(mlp)], dim=2), segs, p + "linear2", offset=n_txt)
    z = _clip(z + _per_seg(out, n_ti, bounds, [mi[2]], [[c[2]] for c in mc], _gated))
    st.txt, st.x = z[:, :n_txt], z[:, n_txt:]


def _check_adapters(conditions: Sequence[ConditionTokens], loras: Mapping[str, NativeLora]) -> None:
    for i, c in enumerate(conditions):
        if c.adapter is not None and c.adapter not in loras:
            raise GenRefocusModelError(
                f"conditions[{i}] uses the LoRA adapter {c.adapter!r}, which is not loaded "
                f"(loaded: {', '.join(sorted(loras)) or 'none'})"
            )


def native_flux_forward(
    flux: Any,
    latents: Tensor,
    latent_ids: Tensor,
    timestep: Tensor,
    *,
    prompt_embeds: Tensor,
    pooled: Tensor,
    guidance: float | None,
    conditions: Sequence[ConditionTokens] = (),
    loras: Mapping[str, NativeLora] | None = None,
    text_ids: Tensor | None = None,
    attention: AttentionFn | None = None,
    trace: dict[str, list[Tensor]] | None = None,
) -> Tensor:
    """Velocity of the image stream: the multi-stream Genfocus forward on a BFL-layout FLUX.

    Same inputs and semantics as :func:`genrefocus_core.flux_lora.flux_forward`; the LoRAs come
    from :func:`load_native_lora` (on the activations' device and dtype).

    Args:
        flux: BFL / ComfyUI FLUX module tree (see the module docstring), on the compute device or
            managed by ComfyUI (partially loaded models work: modules are only called).
        latents: ``(B, N, in_channels)`` noisy image tokens in the compute dtype.
        latent_ids: ``(N, 3)`` image ids.
        timestep: ``(B,)`` or ``(1,)`` model time ``t/1000`` in [0, 1].
        prompt_embeds: ``(1 or B, L, joint_attention_dim)`` T5 embeddings.
        pooled: ``(1 or B, pooled_projection_dim)`` CLIP pooled embedding.
        guidance: guidance embedding of text and image (3.5 deblur, 1.0 bokeh); conditions use 1.0.
            Must be None for a FLUX without guidance embedding (schnell).
        conditions: condition streams; ``adapter`` names a key of ``loras`` (or None = base weights).
        loras: adapter name → :class:`NativeLora`.
        text_ids: ``(L, 3)`` text ids (default zeros).
        attention: attention kernel ``(q, k, v) -> (B, Lq, H*D)`` (default: torch SDPA).
        trace: if a dict, filled with the streams ``[text, image, cond...]`` after the embedding
            (``"embed"``), after every block (``"double.i"``, ``"single.i"``) and the output (``"final"``).

    Returns:
        ``(B, N, in_channels)`` velocity.

    Raises:
        GenRefocusInputError: bad shapes or guidance.
        GenRefocusModelError: not a FLUX.1 module tree, or a condition's adapter is not loaded.

    Example:
        >>> v = native_flux_forward(comfy_model.model.diffusion_model, x, ids, t, prompt_embeds=emb,
        ...                         pooled=pooled, guidance=3.5, conditions=conds,
        ...                         loras={"deblurring": lora})  # doctest: +SKIP
    """
    loras = {} if loras is None else dict(loras)
    dims = flux_dims(flux)
    check_forward_inputs(dims, latents, latent_ids, timestep, prompt_embeds, pooled, conditions)
    _check_adapters(conditions, loras)
    check_guidance(dims.guidance_embeds, guidance, strict=True)
    attention = _sdpa if attention is None else attention
    b, n_img = latents.shape[0], latents.shape[1]
    dtype, device = latents.dtype, latents.device

    toks = [latents] + [c.tokens.to(device=device, dtype=dtype).expand(b, -1, -1) for c in conditions]
    bounds, start = [], n_img
    for c in conditions:
        bounds.append((start, start + c.tokens.shape[1]))
        start += c.tokens.shape[1]
    segs = _Segs(n_img, bounds, [c.adapter for c in conditions], loras)
    x = _linear(flux.img_in, torch.cat(toks, dim=1) if conditions else latents, segs, "img_in")
    txt = flux.txt_in(prompt_embeds.to(device=device, dtype=dtype)).expand(b, -1, -1)

    n_freq = features(flux.time_in.in_layer, "in_features")
    pooled = pooled.to(device=device, dtype=dtype)

    def vec(t: Tensor, g: Tensor | None) -> Tensor:
        v = flux.time_in(_timestep_embedding(t.to(dtype) * 1000, n_freq).to(dtype))
        if g is not None:
            v = v + flux.guidance_in(_timestep_embedding(g.to(dtype) * 1000, n_freq).to(dtype))
        return v + flux.vector_in(pooled)

    t_img = timestep.to(device)
    g_img = torch.full((t_img.shape[0],), float(guidance), device=device) if dims.guidance_embeds else None
    vec_img = vec(t_img, g_img)
    vec_cond = None
    if conditions:
        vec_cond = vec(
            torch.zeros(1, device=device), torch.ones(1, device=device) if dims.guidance_embeds else None
        )

    pe = flux.pe_embedder
    axes, theta = list(pe.axes_dim), pe.theta
    if text_ids is None:
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)
    cache: dict[int, tuple[Tensor, Tensor]] = {}

    def tables(ids: Tensor) -> tuple[Tensor, Tensor]:
        if id(ids) not in cache:
            cache[id(ids)] = rope_tables(ids.to(device), axes, theta)
        return cache[id(ids)]

    rx = [tables(latent_ids)] + [tables(c.ids) for c in conditions]
    rope_x = (torch.cat([r[0] for r in rx]), torch.cat([r[1] for r in rx]))
    st = _State(txt, x, vec_img, vec_cond, rope_tables(text_ids.to(device), axes, theta), rope_x, segs)

    def record(name: str) -> None:
        if trace is not None:
            trace[name] = [st.txt, st.x[:, :n_img]] + [st.x[:, a:e] for a, e in bounds]

    record("embed")
    for i, block in enumerate(flux.double_blocks):
        _double_block(i, block, st, attention)
        record(f"double.{i}")
    for i, block in enumerate(flux.single_blocks):
        _single_block(i, block, st, attention)
        record(f"single.{i}")

    fl = flux.final_layer
    shift, scale = fl.adaLN_modulation(st.vec_img).chunk(2, dim=-1)
    out = fl.linear(_modulate(fl.norm_final(st.x[:, :n_img]), shift[:, None], scale[:, None]))
    if trace is not None:
        trace["final"] = [out]
    return out
