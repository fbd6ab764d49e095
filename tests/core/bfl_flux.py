"""Test-only: a FLUX.1 transformer in Black Forest Labs' module layout, in plain torch.

The module tree (names, shapes, callables) of ComfyUI's ``comfy.ldm.flux.model.Flux`` — what the
native backend (``genrefocus_core.native_flux``) walks — so the native forward can be checked
against the diffusers reference in CI without ComfyUI. It has no forward of its own; the real
ComfyUI class is exercised by ``tests/nodes/test_native_backend.py`` (with ``COMFYUI_PATH``).
Weights come from a diffusers ``FluxTransformer2DModel`` through ``flux_convert.diffusers_to_bfl``,
passed in by the caller (node tests use the pack's copy of ``genrefocus_core``, core tests the
top-level one; one test run must never import both).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.scale, 1e-6)


class _QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm, self.key_norm = _RMSNorm(dim), _RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv, self.norm, self.proj = nn.Linear(dim, 3 * dim), _QKNorm(dim // heads), nn.Linear(dim, dim)


class _Modulation(nn.Module):
    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, n * dim)


def _ln(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class _Double(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.num_heads, self.hidden_size = heads, dim
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", _Modulation(dim, 6))
            setattr(self, f"{s}_norm1", _ln(dim))
            setattr(self, f"{s}_attn", _SelfAttention(dim, heads))
            setattr(self, f"{s}_norm2", _ln(dim))
            setattr(
                self,
                f"{s}_mlp",
                nn.Sequential(nn.Linear(dim, mlp), nn.GELU(approximate="tanh"), nn.Linear(mlp, dim)),
            )


class _Single(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.num_heads, self.hidden_size, self.mlp_hidden_dim = heads, dim, mlp
        self.linear1, self.linear2 = nn.Linear(dim, 3 * dim + mlp), nn.Linear(dim + mlp, dim)
        self.norm, self.pre_norm, self.mlp_act = _QKNorm(dim // heads), _ln(dim), nn.GELU(approximate="tanh")
        self.modulation = _Modulation(dim, 3)


class _MLPEmbedder(nn.Module):
    def __init__(self, n_in: int, dim: int) -> None:
        super().__init__()
        self.in_layer, self.silu, self.out_layer = nn.Linear(n_in, dim), nn.SiLU(), nn.Linear(dim, dim)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class _LastLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final, self.linear = _ln(dim), nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


class _PosEmbed(nn.Module):
    def __init__(self, theta: int, axes: list[int]) -> None:
        super().__init__()
        self.theta, self.axes_dim = theta, list(axes)


class BflFlux(nn.Module):
    """The FLUX.1 module tree in BFL naming (no forward)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.num_attention_heads * cfg.attention_head_dim
        self.hidden_size, self.num_heads = d, cfg.num_attention_heads
        self.img_in, self.txt_in = nn.Linear(cfg.in_channels, d), nn.Linear(cfg.joint_attention_dim, d)
        self.time_in, self.vector_in = _MLPEmbedder(256, d), _MLPEmbedder(cfg.pooled_projection_dim, d)
        self.guidance_in = _MLPEmbedder(256, d) if cfg.guidance_embeds else nn.Identity()
        self.pe_embedder = _PosEmbed(10000, list(cfg.axes_dims_rope))
        self.double_blocks = nn.ModuleList(_Double(d, self.num_heads, 4 * d) for _ in range(cfg.num_layers))
        self.single_blocks = nn.ModuleList(
            _Single(d, self.num_heads, 4 * d) for _ in range(cfg.num_single_layers)
        )
        self.final_layer = _LastLayer(d, cfg.in_channels)


def bfl_state_dict(model: nn.Module, diffusers_to_bfl) -> dict[str, torch.Tensor]:
    """The base weights of a diffusers FLUX (adapters excluded) in BFL keys."""
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    return diffusers_to_bfl(sd)


def bfl_twin(model: nn.Module, diffusers_to_bfl) -> BflFlux:
    """The BFL-layout twin of a diffusers ``FluxTransformer2DModel`` (base weights, adapters excluded)."""
    twin = BflFlux(model.config)
    twin.load_state_dict(bfl_state_dict(model, diffusers_to_bfl), strict=True)
    return twin.eval()


def adapter_state_dict(model: nn.Module, adapter: str, targets: list[str]) -> dict[str, torch.Tensor]:
    """A PEFT adapter of ``model`` as a Genfocus LoRA file's tensors (``transformer.<m>.lora_A.weight``);
    ``targets`` = ``flux_lora.lora_target_modules(model)``."""
    mods = dict(model.named_modules())
    sd = {}
    for name in targets:
        layer = mods[name]
        sd[f"transformer.{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().clone()
        sd[f"transformer.{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().clone()
    return sd
