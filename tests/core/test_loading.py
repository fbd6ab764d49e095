"""Tier 1: FLUX transformer loading from folders and single files (BFL/ComfyUI layout, fp8)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from genrefocus_core.errors import GenRefocusModelError
from genrefocus_core.flux_convert import bfl_to_diffusers, diffusers_to_bfl
from genrefocus_core.loading import FLUX_DEV_CONFIG, load_flux_transformer

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 6, 6],
    guidance_embeds=True,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(**TINY).eval()


def _forward(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 12, 16, generator=g),
            encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
            pooled_projections=torch.randn(1, 32, generator=g),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([3.5]),
            img_ids=torch.rand(12, 3, generator=g) * 4,
            txt_ids=torch.zeros(5, 3),
            return_dict=False,
        )[0]


def test_bfl_round_trip_is_exact(tiny):
    sd = tiny.state_dict()
    back = bfl_to_diffusers({"model.diffusion_model." + k: v for k, v in diffusers_to_bfl(sd).items()})
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_bfl_keys_match_the_real_flux_dev_layout():
    """Our BFL names/shapes for the FLUX.1-dev config agree with diffusers' own converter (meta tensors)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    cfg = {k: v for k, v in FLUX_DEV_CONFIG.items() if not k.startswith("_")}
    cfg.update(num_layers=1, num_single_layers=1)
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(**cfg)
    ours = diffusers_to_bfl(model.state_dict())
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(ours))  # pops every BFL key it knows
    assert {k: tuple(v.shape) for k, v in theirs.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


def test_single_file_bf16_and_fp8_and_folder(tmp_path, tiny):
    ref = _forward(tiny)
    bfl = {
        "model.diffusion_model." + k: v.contiguous() for k, v in diffusers_to_bfl(tiny.state_dict()).items()
    }
    save_file(bfl, tmp_path / "tiny_flux.safetensors")
    cfg = dict(TINY)
    m = load_flux_transformer(tmp_path / "tiny_flux.safetensors", config=cfg, dtype=torch.float32)
    torch.testing.assert_close(_forward(m), ref)
    if hasattr(torch, "float8_e4m3fn"):
        save_file({k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}, tmp_path / "tiny_fp8.safetensors")
        m8 = load_flux_transformer(tmp_path / "tiny_fp8.safetensors", config=cfg, dtype=torch.float32)
        out8 = _forward(m8)
        assert not torch.equal(out8, ref)  # really the quantised weights
        assert (out8 - ref).abs().max() < 0.25 * ref.abs().max()
    tiny.save_pretrained(tmp_path / "folder" / "transformer")
    mf = load_flux_transformer(tmp_path / "folder", dtype=torch.float32)
    torch.testing.assert_close(_forward(mf), ref)


def test_bad_files(tmp_path, tiny):
    with pytest.raises(GenRefocusModelError, match="not found"):
        load_flux_transformer(tmp_path / "missing.safetensors")
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x04")
    with pytest.raises(GenRefocusModelError, match=r"must be a \.safetensors file"):
        load_flux_transformer(tmp_path / "x.ckpt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(GenRefocusModelError, match="not a valid safetensors file"):
        load_flux_transformer(tmp_path / "bad.safetensors")
    bfl = {k: v.contiguous() for k, v in diffusers_to_bfl(tiny.state_dict()).items()}
    save_file({**bfl, "double_blocks.0.extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(GenRefocusModelError, match="unexpected tensor"):
        load_flux_transformer(tmp_path / "extra.safetensors", config=dict(TINY))
    save_file(bfl, tmp_path / "tiny.safetensors")
    with pytest.raises(GenRefocusModelError, match=r"not FLUX\.1-dev sized"):
        load_flux_transformer(tmp_path / "tiny.safetensors")
    with pytest.raises(GenRefocusModelError, match="num_layers=3 does not match"):
        load_flux_transformer(tmp_path / "tiny.safetensors", config={**TINY, "num_layers": 3})
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenRefocusModelError, match="not a diffusers transformer folder"):
        load_flux_transformer(tmp_path / "empty")
