"""Loading FLUX transformers from local files only: diffusers folders or single files.

Single files are what ComfyUI users keep in ``models/diffusion_models`` / ``models/unet``: BFL or
ComfyUI key layout, bf16/fp16/fp32 or fp8 (e4m3fn / e5m2) storage. The FLUX.1-dev configuration
ships with the package, so nothing is fetched; for other sizes (tiny test models) the
configuration is inferred from the tensor shapes plus ``axes_dims_rope``.
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


def load_flux_transformer(
    path: str | Path,
    *,
    config: dict[str, Any] | str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
):
    """Load a ``FluxTransformer2DModel`` from a local diffusers folder or a single safetensors file.

    Args:
        path: a diffusers folder (``config.json`` + weights, or a pipeline folder with a
            ``transformer/`` subfolder) or a single ``.safetensors`` file in BFL/ComfyUI or diffusers
            layout, in any float or fp8 storage dtype (cast to ``dtype``).
        config: for single files: a config dict or ``config.json`` path; default: FLUX.1-dev's
            (shipped) when the shapes match, else inferred from the file (then ``axes_dims_rope``
            must come from ``config``).
        dtype: compute dtype of the returned model.
        device: where to put it.

    Returns:
        The model in eval mode.

    Raises:
        GenRefocusModelError: missing/corrupt files, pickled formats, or tensors that do not fit.
    """
    from diffusers import FluxTransformer2DModel

    p = Path(path)
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
        return model.to(device).eval()

    sd = read_safetensors(p)
    sd = bfl_to_diffusers(sd) if is_bfl_layout(sd) else strip_prefix(sd)
    if isinstance(config, str | Path):
        config = json.loads(Path(config).read_text())
    if config is None:
        cfg = infer_flux_config(sd)
    else:
        cfg = dict(config)
        if "axes_dims_rope" not in cfg:
            raise GenRefocusModelError("config must include axes_dims_rope")
        inferred = infer_flux_config(sd, tuple(cfg["axes_dims_rope"]))
        for key in (
            "num_layers",
            "num_single_layers",
            "num_attention_heads",
            "attention_head_dim",
            "in_channels",
        ):
            if key in cfg and cfg[key] != inferred[key]:
                raise GenRefocusModelError(
                    f"config {key}={cfg[key]} does not match the file ({inferred[key]}); wrong config for "
                    f"{p.name}"
                )
    n_fp8 = sum(1 for t in sd.values() if t.dtype in _FP8)
    if n_fp8:
        logger.info("%s stores %d tensors in fp8; casting to %s", p.name, n_fp8, dtype)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise GenRefocusModelError(f"{p.name} does not fit a FLUX transformer: {str(e)[:500]}") from e
    return model.to(device=device, dtype=dtype).eval()
