"""Loading a diffusers FLUX transformer and the Genfocus LoRA files onto it (strict, named adapters).

The forward that uses them is :mod:`genrefocus_core.flux_lora`; these names are re-exported there.
diffusers and peft are imported lazily.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import GenRefocusInputError, GenRefocusModelError
from .flux_lora import _is_lora_layer, lora_target_modules
from .memory import execution_device_dtype, is_group_offloaded

__all__ = ["LoraInfo", "check_lora_keys", "load_lora", "load_transformer"]

logger = logging.getLogger(__name__)




def load_transformer(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    config: dict[str, Any] | str | Path | None = None,
) -> nn.Module:
    """Load a FLUX transformer from a local diffusers folder or a single ``.safetensors`` file.

    A thin alias of :func:`genrefocus_core.loading.load_flux_transformer` (the one loader: diffusers
    folders, pipeline folders with ``transformer/``, and single files in BFL/ComfyUI or diffusers
    layout, fp8 included) with the official CPU default dtype, float32. Nothing is downloaded.

    Args:
        path: folder or ``.safetensors`` file.
        device: where to put the model.
        dtype: compute dtype.
        config: for single files that are not FLUX.1-dev sized: a config dict or ``config.json``.

    Returns:
        The model in eval mode.

    Raises:
        GenRefocusModelError: missing/corrupt files, pickled formats, or tensors that do not fit.

    Example:
        >>> import tempfile
        >>> from diffusers import FluxTransformer2DModel
        >>> d = tempfile.mkdtemp()
        >>> FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        ...     num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
        ...     axes_dims_rope=(2, 2, 4)).save_pretrained(d)
        >>> load_transformer(d).config.num_layers
        1
    """
    from .loading import load_flux_transformer

    return load_flux_transformer(path, config=config, dtype=dtype, device=device)


@dataclass(frozen=True)
class LoraInfo:
    """What :func:`load_lora` loaded.

    Attributes:
        adapter: adapter name.
        rank: most common rank (``lora_A.shape[0]``).
        modules: number of wrapped Linear modules.
        parameters: LoRA parameter count.
    """

    adapter: str
    rank: int
    modules: int
    parameters: int


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_lora_keys(sd: Mapping[str, Tensor], targets: Sequence[str], file_name: str, model: str) -> None:
    """Strict key check of a Genfocus LoRA file: ``transformer.<m>.lora_A/B.weight`` per target, no more.

    Args:
        sd: the file's state dict.
        targets: the OminiControl target modules (:func:`~.flux_lora.lora_target_modules`).
        file_name: for the message.
        model: what the targets belong to, for the message (``"transformer"``, ``"FLUX"``).

    Raises:
        GenRefocusModelError: listing a few unexpected and missing keys.

    Example:
        >>> try:
        ...     check_lora_keys({}, ["x_embedder"], "a.safetensors", "transformer")
        ... except GenRefocusModelError as e:
        ...     str(e).endswith("2 missing key(s): transformer.x_embedder.lora_A.weight, "
        ...                     "transformer.x_embedder.lora_B.weight")
        True
    """
    expected = {f"transformer.{m}.lora_{ab}.weight" for m in targets for ab in "AB"}
    unexpected, missing = set(sd) - expected, expected - set(sd)
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_few(list(unexpected))}")
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_few(list(missing))}")
        raise GenRefocusModelError(
            f"LoRA file {file_name!r} does not match the Genfocus format (keys "
            f"transformer.<module>.lora_A/B.weight for the {len(targets)} OminiControl target modules "
            f"of this {model}): " + "; ".join(parts)
        )


def load_lora(transformer: nn.Module, path: str | Path, adapter: str, *, replace: bool = False) -> LoraInfo:
    """Load an official Genfocus LoRA file as the named PEFT adapter ``adapter``, strictly.

    Expected format (OminiControl's trainer, diffusers/PEFT keys): exactly the keys
    ``transformer.<module>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` for every
    module of :func:`lora_target_modules`, no alpha. The adapter gets ``lora_alpha = r`` (scaling
    exactly 1, the per-branch scale upstream forces). Several adapters stay resident at once; each
    condition stream picks its adapter by name.

    Args:
        transformer: diffusers ``FluxTransformer2DModel``.
        path: ``.safetensors`` file.
        adapter: adapter name, e.g. ``"deblurring"`` or ``"bokeh"``.
        replace: replace an adapter of that name instead of raising.

    Returns:
        A :class:`LoraInfo`.

    Raises:
        GenRefocusModelError: missing file, unexpected/missing keys (a few listed), bad shapes, or
            an adapter of that name already loaded (without ``replace``).

    Example:
        >>> import tempfile, os
        >>> from diffusers import FluxTransformer2DModel
        >>> from safetensors.torch import save_file
        >>> m = FluxTransformer2DModel(in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        ...     num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
        ...     axes_dims_rope=(2, 2, 4))
        >>> mods = dict(m.named_modules())
        >>> sd = {}
        >>> for name in lora_target_modules(m):
        ...     sd[f"transformer.{name}.lora_A.weight"] = torch.zeros(2, mods[name].in_features)
        ...     sd[f"transformer.{name}.lora_B.weight"] = torch.zeros(mods[name].out_features, 2)
        >>> path = os.path.join(tempfile.mkdtemp(), "bokehNet.safetensors")
        >>> save_file(sd, path)
        >>> load_lora(m, path, "bokeh")
        LoraInfo(adapter='bokeh', rank=2, modules=13, parameters=1352)
    """
    if is_group_offloaded(transformer):
        raise GenRefocusModelError(
            "load the LoRAs before applying a streamed memory mode (offload), not after"
        )
    p = Path(path)
    if not p.is_file():
        raise GenRefocusModelError(
            f"LoRA file {str(p)!r} not found; download the Genfocus LoRA (deblurNet.safetensors / "
            "bokehNet.safetensors) into models/loras/genfocus or models/genrefocus"
        )
    if not isinstance(adapter, str) or not adapter.isidentifier():
        raise GenRefocusInputError(f"adapter must be a name like 'bokeh', got {adapter!r}")
    from safetensors.torch import load_file

    try:
        sd = load_file(str(p))
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise GenRefocusModelError(f"LoRA file {str(p)!r} is not a readable safetensors file: {e}") from e
    targets = lora_target_modules(transformer)
    check_lora_keys(sd, targets, p.name, "transformer")
    modules = dict(transformer.named_modules())
    ranks: dict[str, int] = {}
    for m in targets:
        a, b_ = sd[f"transformer.{m}.lora_A.weight"], sd[f"transformer.{m}.lora_B.weight"]
        lin = modules[m].base_layer if _is_lora_layer(modules[m]) else modules[m]
        r = a.shape[0]
        if a.ndim != 2 or b_.ndim != 2 or a.shape[1] != lin.in_features or b_.shape != (lin.out_features, r):
            raise GenRefocusModelError(
                f"LoRA file {p.name!r}: {m} must have lora_A [r, {lin.in_features}] and lora_B "
                f"[{lin.out_features}, r], got {tuple(a.shape)} and {tuple(b_.shape)}"
            )
        ranks[m] = r
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    pattern = {m: r for m, r in ranks.items() if r != rank}

    from peft import LoraConfig

    peft_config = getattr(transformer, "peft_config", None) or {}
    if adapter in peft_config:
        if not replace:
            raise GenRefocusModelError(
                f"a LoRA adapter named {adapter!r} is already loaded; pass replace=True"
            )
        transformer.delete_adapters(adapter)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=targets,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        init_lora_weights=True,
    )
    # PEFT's init draws from the global RNG; several resident adapters are the design, not a mistake
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=adapter)
    modules = dict(transformer.named_modules())
    n_params = 0
    _, compute = execution_device_dtype(transformer)
    with torch.no_grad():
        for m in targets:
            layer = modules[m]
            if not _is_lora_layer(layer) or adapter not in layer.lora_A:
                raise GenRefocusModelError(f"PEFT did not wrap {m} for adapter {adapter!r}")
            for sub in (layer.lora_A[adapter], layer.lora_B[adapter]):
                if sub.weight.dtype != compute:  # fp8 / quantised base weights: the LoRA stays precise
                    sub.to(dtype=compute)
            wa, wb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            wa.copy_(sd[f"transformer.{m}.lora_A.weight"])
            wb.copy_(sd[f"transformer.{m}.lora_B.weight"])
            n_params += wa.numel() + wb.numel()
            if layer.scaling[adapter] != 1.0:
                raise GenRefocusModelError(
                    f"{m}: adapter {adapter!r} scaling is {layer.scaling[adapter]}, not 1"
                )
    logger.info(
        "loaded LoRA %s as adapter %r: rank %d, %d modules, %.1f M parameters",
        p.name,
        adapter,
        rank,
        len(targets),
        n_params / 1e6,
    )
    return LoraInfo(adapter, rank, len(targets), n_params)
