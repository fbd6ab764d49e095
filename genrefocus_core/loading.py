"""Loading FLUX transformers from local files only: diffusers folders or single files.

Single files are what ComfyUI users keep in ``models/diffusion_models`` / ``models/unet``: BFL or
ComfyUI key layout, bf16/fp16/fp32 or fp8 (e4m3fn / e5m2) storage ``.safetensors``, or GGUF
(``.gguf``, e.g. Q8_0 / Q4_K as city96 publishes them; needs the ``gguf`` package). The FLUX.1-dev
configuration ships with the package, so nothing is fetched; for other sizes (tiny test models)
the configuration is inferred from the tensor shapes plus ``axes_dims_rope``.

``storage_dtype=torch.float8_e4m3fn`` keeps the Linear weights in fp8 while loading (an fp8 file
is never upcast; a bf16 file is cast tensor by tensor), for the fp8 memory modes of
:mod:`~genrefocus_core.memory`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import GenRefocusModelError
from .flux_convert import bfl_to_diffusers, is_bfl_layout, strip_prefix

__all__ = ["FLUX_DEV_CONFIG", "infer_flux_config", "load_flux_transformer", "read_safetensors"]

logger = logging.getLogger(__name__)

FLUX_DEV_CONFIG: dict[str, Any] = json.loads(
    (Path(__file__).parent / "configs" / "flux1-dev-transformer.json").read_text()
)
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` file to CPU tensors; other formats are refused (no pickles)."""
    p = Path(path)
    if not p.is_file():
        raise GenRefocusModelError(f"model file {str(p)!r} not found")
    if p.suffix != ".safetensors":
        raise GenRefocusModelError(
            f"model file {p.name!r} must be a .safetensors file (pickled .ckpt/.pt/.bin files are not loaded "
            "for safety); convert it or download the safetensors version"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise GenRefocusModelError(f"model file {p.name!r} is not a valid safetensors file: {e}") from e


def infer_flux_config(sd: dict[str, Tensor], axes_dims_rope: tuple[int, ...] | None = None) -> dict[str, Any]:
    """A ``FluxTransformer2DModel`` config from a diffusers-layout state dict's shapes.

    FLUX.1-dev's own sizes give its shipped config (RoPE axes 16, 56, 56). Other sizes need
    ``axes_dims_rope`` (summing to the head dimension), which weights cannot tell.
    """

    def n_blocks(prefix: str) -> int:
        idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
        return max(idx) + 1 if idx else 0

    try:
        inner, in_ch = sd["x_embedder.weight"].shape
        head_dim = sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        cfg = {
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": int(head_dim),
            "guidance_embeds": "time_text_embed.guidance_embedder.linear_1.weight" in sd,
            "in_channels": int(in_ch),
            "joint_attention_dim": int(sd["context_embedder.weight"].shape[1]),
            "num_attention_heads": int(inner // head_dim),
            "num_layers": n_blocks("transformer_blocks."),
            "num_single_layers": n_blocks("single_transformer_blocks."),
            "out_channels": None,
            "patch_size": 1,
            "pooled_projection_dim": int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        }
    except KeyError as e:
        raise GenRefocusModelError(f"not a FLUX transformer state dict: missing {e}") from e
    same = {k: v for k, v in FLUX_DEV_CONFIG.items() if k not in ("axes_dims_rope", "guidance_embeds")}
    if all(cfg[k] == v for k, v in same.items()) and axes_dims_rope is None:
        cfg["axes_dims_rope"] = list(FLUX_DEV_CONFIG["axes_dims_rope"])
    elif axes_dims_rope is not None:
        if sum(axes_dims_rope) != head_dim:
            raise GenRefocusModelError(
                f"axes_dims_rope must sum to the head dim {head_dim}, got {axes_dims_rope}"
            )
        cfg["axes_dims_rope"] = list(axes_dims_rope)
    else:
        raise GenRefocusModelError(
            "this transformer is not FLUX.1-dev sized; pass its config (axes_dims_rope) explicitly"
        )
    return cfg


def _logical_shapes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Meta tensors with the unquantised shapes of a GGUF state dict (for config inference)."""
    import gguf

    out = {}
    for k, t in sd.items():
        shape = tuple(t.shape)
        qt = getattr(t, "quant_type", None)
        if qt is not None and qt in gguf.GGML_QUANT_SIZES:
            block, size = gguf.GGML_QUANT_SIZES[qt]
            shape = (*shape[:-1], shape[-1] // size * block)
        out[k] = torch.empty(shape, device="meta")
    return out


def _config_for(
    sd: dict[str, Tensor], config: dict[str, Any] | str | Path | None, name: str
) -> dict[str, Any]:
    if isinstance(config, str | Path):
        config = json.loads(Path(config).read_text())
    if config is None:
        return infer_flux_config(sd)
    cfg = dict(config)
    if "axes_dims_rope" not in cfg:
        raise GenRefocusModelError("config must include axes_dims_rope")
    inferred = infer_flux_config(sd, tuple(cfg["axes_dims_rope"]))
    keys = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels")
    for key in keys:
        if key in cfg and cfg[key] != inferred[key]:
            raise GenRefocusModelError(
                f"config {key}={cfg[key]} does not match the file ({inferred[key]}); wrong config for {name}"
            )
    return cfg


def _load_gguf(p: Path, config: dict[str, Any] | str | Path | None, dtype: torch.dtype):
    """A GGUF single file via diffusers' GGUF quantizer (weights stay quantised, dequantised per layer)."""
    try:
        import gguf  # noqa: F401
    except ImportError as e:
        raise GenRefocusModelError(
            f"{p.name} is a GGUF file; reading it needs the gguf package (pip install gguf), or use a "
            ".safetensors FLUX file"
        ) from e
    import tempfile

    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        sd = load_gguf_checkpoint(str(p))
    except (ValueError, OSError, KeyError) as e:
        raise GenRefocusModelError(f"{p.name} is not a readable GGUF file: {str(e)[:300]}") from e
    sd = bfl_to_diffusers(sd) if is_bfl_layout(sd) else strip_prefix(sd)
    cfg = _config_for(_logical_shapes(sd), config, p.name)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_text(json.dumps(cfg))
        try:
            model = FluxTransformer2DModel.from_single_file(
                sd, config=d, local_files_only=True, torch_dtype=dtype,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            )
        except (ValueError, RuntimeError, KeyError) as e:
            raise GenRefocusModelError(f"{p.name} does not fit a FLUX transformer: {str(e)[:500]}") from e
    n_q = sum(1 for t in sd.values() if getattr(t, "quant_type", None) is not None)
    logger.info("%s: GGUF with %d quantised tensors, compute dtype %s", p.name, n_q, dtype)
    return model


def _storage_keys(cfg: dict[str, Any]) -> set[str]:
    """State-dict keys whose tensors the fp8 modes store in fp8 (the fp8 target Linears)."""
    from diffusers import FluxTransformer2DModel

    from .memory import fp8_targets

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    return {f"{m}.{w}" for m in fp8_targets(model) for w in ("weight", "bias")}


def load_flux_transformer(
    path: str | Path,
    *,
    config: dict[str, Any] | str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    storage_dtype: torch.dtype | None = None,
):
    """Load a ``FluxTransformer2DModel`` from a local diffusers folder or a single safetensors file.

    Args:
        path: a diffusers folder (``config.json`` + weights, or a pipeline folder with a
            ``transformer/`` subfolder) or a single ``.safetensors`` file in BFL/ComfyUI or diffusers
            layout, in any float or fp8 storage dtype (cast to ``dtype``), or a ``.gguf`` file
            (quantised weights kept, dequantised per layer in ``dtype``).
        config: for single files: a config dict or ``config.json`` path; default: FLUX.1-dev's
            (shipped) when the shapes match, else inferred from the file (then ``axes_dims_rope``
            must come from ``config``).
        dtype: compute dtype of the returned model.
        device: where to put it.
        storage_dtype: ``torch.float8_e4m3fn`` to keep the Linear weights in fp8 (single files:
            no upcast at any point; folders are read in ``dtype`` first). Other tensors use
            ``dtype``. Not for GGUF files.

    Returns:
        The model in eval mode.

    Raises:
        GenRefocusModelError: missing/corrupt files, pickled formats, or tensors that do not fit.
    """
    from diffusers import FluxTransformer2DModel

    p = Path(path)
    if storage_dtype is not None and storage_dtype not in _FP8:
        raise GenRefocusModelError(f"storage_dtype must be an fp8 dtype, got {storage_dtype}")
    if p.suffix.lower() == ".gguf" and p.is_file():
        if storage_dtype is not None:
            raise GenRefocusModelError(f"{p.name} is a GGUF file (already quantised); no fp8 storage for it")
        return _load_gguf(p, config, dtype).to(device).eval()
    if p.is_dir():
        folder = p / "transformer" if (p / "transformer" / "config.json").is_file() else p
        if not (folder / "config.json").is_file():
            raise GenRefocusModelError(
                f"folder {str(p)!r} is not a diffusers transformer folder (no config.json); point to the "
                "FLUX.1-dev folder or to a single .safetensors file"
            )
        try:
            model = FluxTransformer2DModel.from_pretrained(
                str(folder), torch_dtype=dtype, local_files_only=True
            )
        except (OSError, ValueError, RuntimeError) as e:
            raise GenRefocusModelError(f"could not load the transformer from {str(folder)!r}: {e}") from e
        if storage_dtype is not None:
            with torch.no_grad():
                for key in _storage_keys(dict(model.config)):
                    mod_name, attr = key.rsplit(".", 1)
                    t = getattr(model.get_submodule(mod_name), attr, None)
                    if t is not None:
                        t.data = t.data.to(storage_dtype)
        return model.to(device).eval()

    sd = read_safetensors(p)
    sd = bfl_to_diffusers(sd) if is_bfl_layout(sd) else strip_prefix(sd)
    cfg = _config_for(sd, config, p.name)
    n_fp8 = sum(1 for t in sd.values() if t.dtype in _FP8)
    keep = _storage_keys(cfg) if storage_dtype is not None else set()
    if n_fp8:
        logger.info("%s stores %d tensors in fp8; %s", p.name, n_fp8,
                    f"kept in {storage_dtype}" if keep else f"casting to {dtype}")
    for k in list(sd):  # in place, tensor by tensor: never two full copies of the weights
        sd[k] = sd[k].to(storage_dtype if k in keep else dtype)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise GenRefocusModelError(f"{p.name} does not fit a FLUX transformer: {str(e)[:500]}") from e
    return model.to(device=device).eval()
