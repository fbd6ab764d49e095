"""Genfocus LoRAs mapped onto FLUX in Black Forest Labs' fused module layout (ComfyUI's ``Flux``).

The layout side of :mod:`~genrefocus_core.native_flux`: which modules a BFL-layout FLUX has and their
sizes (:func:`check_flux_module`, :func:`flux_dims`), and how a Genfocus LoRA file (diffusers/PEFT
keys, §12) lands on it: ``to_q|to_k|to_v`` onto row blocks of ``img_attn.qkv``,
``to_q|to_k|to_v|proj_mlp`` onto ``linear1`` …, each fused Linear getting one :class:`FusedLora`
side path ``B(A x)`` (:func:`native_lora_from_state_dict`). Nothing here imports ComfyUI.

The public names are re-exported by :mod:`~genrefocus_core.native_flux`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import GenRefocusInputError, GenRefocusModelError
from .flux_lora import lora_target_modules
from .lora_loading import check_lora_keys

# diffusers module (inside a block) -> (BFL module, part index of the fused rows)
_DOUBLE_MAP = {
    "norm1.linear": ("img_mod.lin", 0),
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", 0),
    "ff.net.2": ("img_mlp.2", 0),
}
_SINGLE_MAP = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", 0),
    "norm.linear": ("modulation.lin", 0),
}
_REQUIRED = (
    "img_in",
    "txt_in",
    "time_in",
    "vector_in",
    "guidance_in",
    "pe_embedder",
    "double_blocks",
    "single_blocks",
    "final_layer",
)


# ------------------------------------------------------------------------------------------------
# The module tree
# ------------------------------------------------------------------------------------------------


def check_flux_module(flux: Any) -> None:
    """Raise unless ``flux`` has the FLUX.1 module layout this backend runs (BFL / ComfyUI ``Flux``).

    Raises:
        GenRefocusModelError: naming the missing parts (e.g. Chroma has no ``vector_in``).

    Example:
        >>> check_flux_module(torch.nn.Linear(2, 2))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        GenRefocusModelError: the model must be a FLUX.1 transformer ...
    """
    missing = [name for name in _REQUIRED if not hasattr(flux, name)]
    if not missing and not hasattr(flux.final_layer, "adaLN_modulation"):
        missing.append("final_layer.adaLN_modulation")
    if missing:
        raise GenRefocusModelError(
            f"the model must be a FLUX.1 transformer (FLUX.1-dev, BFL/ComfyUI layout), got "
            f"{type(flux).__name__} without {', '.join(missing)}"
        )


def features(module: Any, which: str) -> int:
    """``which`` (``"in_features"`` or ``"out_features"``) of a Linear-like module (else from its weight)."""
    n = getattr(module, which, None)
    if isinstance(n, int):
        return n
    w = module.weight  # a plain Linear without the attributes
    return int(w.shape[1] if which == "in_features" else w.shape[0])


def flux_dims(flux: Any) -> SimpleNamespace:
    """Sizes of a BFL-layout FLUX read from its modules.

    Returns:
        ``in_channels`` (token features, 64 for FLUX.1), ``hidden``, ``heads``, ``joint_attention_dim``
        (T5 width), ``pooled_projection_dim`` (CLIP pooled width), ``guidance_embeds``,
        ``num_layers``, ``num_single_layers``, ``mlp_hidden``.

    Raises:
        GenRefocusModelError: not a FLUX.1 module tree.

    Example:
        >>> d = flux_dims(comfy_model.model.diffusion_model)  # doctest: +SKIP
        >>> d.hidden, d.heads, d.joint_attention_dim, d.pooled_projection_dim  # doctest: +SKIP
        (3072, 24, 4096, 768)
    """
    check_flux_module(flux)
    hidden = features(flux.img_in, "out_features")
    singles = list(flux.single_blocks)
    return SimpleNamespace(
        in_channels=features(flux.img_in, "in_features"),
        hidden=hidden,
        heads=int(flux.num_heads),
        joint_attention_dim=features(flux.txt_in, "in_features"),
        pooled_projection_dim=features(flux.vector_in.in_layer, "in_features"),
        guidance_embeds=hasattr(flux.guidance_in, "in_layer"),
        num_layers=len(flux.double_blocks),
        num_single_layers=len(singles),
        mlp_hidden=features(singles[0].linear1, "out_features") - 3 * hidden if singles else 4 * hidden,
    )


# ------------------------------------------------------------------------------------------------
# LoRA in the fused layout
# ------------------------------------------------------------------------------------------------


@dataclass
class FusedLora:
    """LoRA side path of one (possibly fused) Linear: row blocks ``[r0, r1)`` get ``B_i (A_i x)``.

    Attributes:
        a: ``(R, in)`` the parts' ``lora_A`` stacked (``R`` = sum of ranks).
        parts: ``(row0, row1, rank0, rank1, B)`` per part, ``B`` of shape ``(row1 - row0, rank1 - rank0)``.
        out_features: rows of the Linear.

    Example:
        >>> parts = [(0, 2, 0, 1, torch.ones(2, 1)), (4, 5, 1, 2, torch.ones(1, 1))]
        >>> lo = FusedLora(torch.ones(2, 3), parts, 6)
        >>> lo.delta(torch.ones(1, 3)).tolist()
        [[3.0, 3.0, 0.0, 0.0, 3.0, 0.0]]
    """

    a: Tensor
    parts: list[tuple[int, int, int, int, Tensor]]
    out_features: int
    _dense: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        edges = [0] + [e for p in self.parts for e in (p[0], p[1])] + [self.out_features]
        # dense: the parts tile [0, out_features) in order, so the delta is one concatenation
        self._dense = all(edges[i] == edges[i + 1] for i in range(0, len(edges), 2))

    def delta(self, x: Tensor) -> Tensor:
        """``(..., in) -> (..., out_features)``: the LoRA contribution, zero on rows without a part."""
        xa = F.linear(x.to(self.a.dtype), self.a)
        outs = [F.linear(xa[..., r0:r1], b) for _, _, r0, r1, b in self.parts]
        if self._dense:
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        y = xa.new_zeros(*x.shape[:-1], self.out_features)
        for (row0, row1, *_), o in zip(self.parts, outs, strict=True):
            y[..., row0:row1] = o
        return y

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FusedLora:
        """A copy on another device / dtype."""
        return FusedLora(
            self.a.to(device=device, dtype=dtype),
            [(r0, r1, k0, k1, b.to(device=device, dtype=dtype)) for r0, r1, k0, k1, b in self.parts],
            self.out_features,
        )


@dataclass
class NativeLora:
    """One Genfocus adapter mapped onto a BFL-layout FLUX.

    Attributes:
        adapter: adapter name (``"deblurring"``, ``"bokeh"``, ...).
        rank: most common rank.
        modules: BFL module path (``"double_blocks.0.img_attn.qkv"``) → :class:`FusedLora`.
    """

    adapter: str
    rank: int
    modules: dict[str, FusedLora]

    @property
    def parameters(self) -> int:
        """Number of LoRA weights."""
        return sum(m.a.numel() + sum(p[4].numel() for p in m.parts) for m in self.modules.values())

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of the weights (in ``dtype`` if given)."""
        size = dtype.itemsize if dtype is not None else next(iter(self.modules.values())).a.element_size()
        return self.parameters * size

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NativeLora:
        """A copy on another device / dtype (the original stays where it is)."""
        return NativeLora(self.adapter, self.rank, {k: m.to(device, dtype) for k, m in self.modules.items()})


def _lora_layout(flux: Any) -> dict[str, tuple[str, int, int]]:
    """diffusers LoRA module name → (BFL module path, row0, row1) for every Genfocus target."""
    dims = flux_dims(flux)
    d = dims.hidden
    out: dict[str, tuple[str, int, int]] = {"x_embedder": ("img_in", 0, d)}
    for i, block in enumerate(flux.double_blocks):
        for name, (bfl, part) in _DOUBLE_MAP.items():
            module = _get(block, bfl)
            n = features(module, "out_features")
            rows = (part * d, (part + 1) * d) if bfl == "img_attn.qkv" else (0, n)
            out[f"transformer_blocks.{i}.{name}"] = (f"double_blocks.{i}.{bfl}", *rows)
    for i, block in enumerate(flux.single_blocks):
        for name, (bfl, part) in _SINGLE_MAP.items():
            module = _get(block, bfl)
            n = features(module, "out_features")
            if bfl == "linear1":
                rows = (part * d, (part + 1) * d) if part < 3 else (3 * d, n)
            else:
                rows = (0, n)
            out[f"single_transformer_blocks.{i}.{name}"] = (f"single_blocks.{i}.{bfl}", *rows)
    return out


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def native_lora_from_state_dict(
    sd: Mapping[str, Tensor], flux: Any, adapter: str, *, name: str = "LoRA"
) -> NativeLora:
    """Map a Genfocus LoRA state dict (diffusers/PEFT keys) onto ``flux``'s fused layout, strictly.

    Expected keys: exactly ``transformer.<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight``
    ``[out, r]`` for the 343 OminiControl target modules of FLUX.1-dev (the same check as
    :func:`genrefocus_core.flux_lora.load_lora`); the mapped parts live on the CPU in float32.

    Args:
        sd: the file's tensors.
        flux: BFL-layout FLUX module tree (block counts and sizes are read from it).
        adapter: adapter name.
        name: file name for messages.

    Returns:
        A :class:`NativeLora`.

    Raises:
        GenRefocusModelError: unexpected or missing keys (a few listed) or shapes that do not fit.
        GenRefocusInputError: a bad adapter name.

    Example:
        >>> from safetensors.torch import load_file
        >>> sd = load_file("models/loras/genfocus/deblurNet.safetensors")  # doctest: +SKIP
        >>> lora = native_lora_from_state_dict(sd, flux, "deblurring")  # doctest: +SKIP
        >>> len(lora.modules)  # img_in, 4 per double and 3 per single block  # doctest: +SKIP
        191
    """
    if not isinstance(adapter, str) or not adapter.isidentifier():
        raise GenRefocusInputError(f"adapter must be a name like 'bokeh', got {adapter!r}")
    layout = _lora_layout(flux)
    shim = SimpleNamespace(
        transformer_blocks=list(flux.double_blocks), single_transformer_blocks=list(flux.single_blocks)
    )
    targets = lora_target_modules(shim)
    check_lora_keys(sd, targets, name, "FLUX")
    grouped: dict[str, list[tuple[int, int, Tensor, Tensor]]] = {}
    ranks: list[int] = []
    for m in targets:
        bfl, row0, row1 = layout[m]
        a, b = sd[f"transformer.{m}.lora_A.weight"], sd[f"transformer.{m}.lora_B.weight"]
        n_in = features(_get(flux, bfl), "in_features")
        r = a.shape[0] if a.ndim == 2 else -1
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != n_in or tuple(b.shape) != (row1 - row0, r):
            raise GenRefocusModelError(
                f"LoRA file {name!r}: {m} must have lora_A [r, {n_in}] and lora_B [{row1 - row0}, r] "
                f"(rows {row0}..{row1} of {bfl}), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        ranks.append(r)
        grouped.setdefault(bfl, []).append((row0, row1, a.float(), b.float()))
    modules: dict[str, FusedLora] = {}
    for bfl, parts in grouped.items():
        parts.sort(key=lambda p: p[0])
        a_cat = torch.cat([p[2] for p in parts], dim=0)
        offsets = [0]
        for p in parts:
            offsets.append(offsets[-1] + p[2].shape[0])
        modules[bfl] = FusedLora(
            a_cat,
            [(p[0], p[1], offsets[i], offsets[i + 1], p[3]) for i, p in enumerate(parts)],
            features(_get(flux, bfl), "out_features"),
        )
    rank = max(set(ranks), key=ranks.count)
    return NativeLora(adapter, rank, modules)
