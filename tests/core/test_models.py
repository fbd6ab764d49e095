"""Tier 1: loading the Genfocus weights (folders and single files, resident adapters)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.flux_convert import diffusers_to_bfl
from genrefocus_core.models import (
    ADAPTER_BOKEH,
    ADAPTER_DEBLUR,
    ADAPTER_PRE_DEBLUR,
    FLUX_VAE_CONFIG,
    load_flux_vae,
    load_genfocus_models,
)

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
diffusers = pytest.importorskip("diffusers")


def _to_ldm(sd: dict[str, torch.Tensor], n_up: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> the original (BFL ``ae.safetensors``) layout; test-only."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k2 = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k2)
        k2 = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k2)
        k2 = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_up - 1 - int(m[1])}.block.", k2)
        k2 = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{n_up - 1 - int(m[1])}.upsample.",
                    k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k2)
        if "mid_block.attentions.0." in k2:
            k2 = k2.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            for new, old in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                k2 = k2.replace(new, old)
            if v.ndim == 2:
                v = v[:, :, None, None]  # the original stores 1x1 convolutions
        out[k2] = v.contiguous()
    return out


def test_flux_vae_config_is_flux1():
    assert FLUX_VAE_CONFIG["latent_channels"] == 16
    assert (FLUX_VAE_CONFIG["scaling_factor"], FLUX_VAE_CONFIG["shift_factor"]) == (0.3611, 0.1159)
    assert not FLUX_VAE_CONFIG["use_quant_conv"] and not FLUX_VAE_CONFIG["use_post_quant_conv"]
    with torch.device("meta"):
        vae = diffusers.AutoencoderKL.from_config(FLUX_VAE_CONFIG)
    n = sum(p.numel() for p in vae.parameters())
    assert 83e6 < n < 84e6  # FLUX.1 ae.safetensors holds 83.8 M parameters


def test_single_file_vae_in_the_original_layout_equals_the_folder(fx, tmp_path):
    folder = load_flux_vae(fx / "model" / "vae")
    cfg = json.loads((fx / "model" / "vae" / "config.json").read_text())
    ldm = _to_ldm(folder.state_dict(), len(cfg["up_block_types"]))
    assert "encoder.mid.attn_1.q.weight" in ldm and "decoder.up.0.block.0.conv1.weight" in ldm
    save_file(ldm, str(tmp_path / "ae.safetensors"))
    single = load_flux_vae(tmp_path / "ae.safetensors", config=cfg)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(single.encode(x).latent_dist.mean, folder.encode(x).latent_dist.mean)
        z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(single.decode(z).sample, folder.decode(z).sample)
    with pytest.raises(GenRefocusModelError, match=r"ae\.safetensors is not a FLUX VAE: .*missing"):
        load_flux_vae(tmp_path / "ae.safetensors")  # FLUX.1's config: tensors of another model


def test_pipeline_folder_and_single_file_transformer(fx, tmp_path):
    from diffusers import FluxTransformer2DModel

    ref = FluxTransformer2DModel.from_pretrained(fx / "model" / "transformer")
    bfl = diffusers_to_bfl(ref.state_dict())
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()},
              str(tmp_path / "tiny-flux.safetensors"))
    cfg = fx / "model" / "transformer" / "config.json"
    models = load_genfocus_models(tmp_path / "tiny-flux.safetensors", fx / "model",
                                  fx / "inputs" / "prompt_embeds.safetensors",
                                  bokeh_lora=fx / "lora" / "bokehNet.safetensors", transformer_config=cfg)
    assert set(models.transformer.peft_config) == {ADAPTER_BOKEH}
    got, want = models.transformer.state_dict(), ref.state_dict()
    assert torch.equal(got["context_embedder.weight"], want["context_embedder.weight"])
    # LoRA-wrapped linears keep the base weights under base_layer
    assert torch.equal(got["transformer_blocks.1.attn.to_q.base_layer.weight"],
                       want["transformer_blocks.1.attn.to_q.weight"])
    assert torch.equal(got["single_transformer_blocks.0.proj_mlp.base_layer.bias"],
                       want["single_transformer_blocks.0.proj_mlp.bias"])
    assert models.vae.config.latent_channels == 16  # the pipeline folder's vae/ was found


def test_all_three_loras_resident_and_errors(fx):
    models = load_genfocus_models(fx / "model" / "transformer", fx / "model" / "vae",
                                  fx / "inputs" / "prompt_embeds.safetensors",
                                  deblur_lora=fx / "lora" / "deblurNet.safetensors",
                                  pre_deblur_lora=fx / "lora" / "deblurNet_with_pre_deblur.safetensors",
                                  bokeh_lora=fx / "lora" / "bokehNet.safetensors")
    assert set(models.transformer.peft_config) == {ADAPTER_DEBLUR, ADAPTER_PRE_DEBLUR, ADAPTER_BOKEH}
    assert set(models.prompts) == {"deblur", "bokeh"}
    assert models.shift.max_shift == 1.15
    with pytest.raises(GenRefocusInputError, match="at least one of deblur_lora"):
        load_genfocus_models(fx / "model" / "transformer", fx / "model" / "vae",
                             fx / "inputs" / "prompt_embeds.safetensors")
    with pytest.raises(GenRefocusModelError, match=r"LoRA file .*nope\.safetensors' not found"):
        load_genfocus_models(fx / "model" / "transformer", fx / "model" / "vae",
                             fx / "inputs" / "prompt_embeds.safetensors",
                             bokeh_lora=fx / "lora" / "nope.safetensors")
