"""The native backend on ComfyUI's own FLUX equals the diffusers reference: per layer and end to end.

Real ComfyUI only (``COMFYUI_PATH``; skipped with the stub). The tiny fixture FLUX of
``../shared/fixtures/genfocus-parity`` is loaded twice: as the reference (diffusers
``FluxTransformer2DModel`` + PEFT adapters from the fixture LoRA files) and, converted with
``flux_convert.diffusers_to_bfl``, as a ComfyUI MODEL (``ModelPatcher`` of
``comfy.ldm.flux.model.Flux``) with the same LoRA files mapped onto its fused layout. Checked, with
the LoRAs on: the streams after every double and single block and the output of one forward;
ComfyUI's own forward without conditions; one denoise and whole sampled latents (tiled and
untiled); the official Level A tensors; lowvram partial loading with a ComfyUI weight patch; bf16.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import COMFY_KIND, PACK_NAME
from .native_models import real_model_patcher

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
TOL = dict(rtol=0, atol=5e-6)  # fp32; measured differences are ~1e-6 (float reassociation only)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(COMFY_KIND != "real", reason="needs a real ComfyUI (COMFYUI_PATH)"),
]


def _core(name):
    return importlib.import_module(f"{PACK_NAME}.genrefocus_core.{name}")


@pytest.fixture(scope="module")
def pair(comfy_pack):
    """(reference GenfocusModels with both adapters, ComfyUI ModelPatcher, {adapter: NativeLora})."""
    if not (FIXTURE / "model").is_dir():
        pytest.skip("../shared/fixtures/genfocus-parity is not present beside the checkout")
    ref = _core("models").load_genfocus_models(
        FIXTURE / "model" / "transformer",
        FIXTURE / "model" / "vae",
        FIXTURE / "inputs" / "prompt_embeds.safetensors",
        deblur_lora=FIXTURE / "lora" / "deblurNet.safetensors",
        bokeh_lora=FIXTURE / "lora" / "bokehNet.safetensors",
    )
    sd = {
        k.replace(".base_layer", ""): v for k, v in ref.transformer.state_dict().items() if "lora_" not in k
    }
    patcher = real_model_patcher(_core("flux_convert").diffusers_to_bfl(sd))
    flux = patcher.model.diffusion_model
    nf = _core("native_flux")
    loras = {
        a: nf.load_native_lora(FIXTURE / "lora" / f"{f}.safetensors", flux, a)
        for a, f in (("deblurring", "deblurNet"), ("bokeh", "bokehNet"))
    }
    return ref, patcher, loras


def _inputs(b=2, seed=0):
    """Fixture-sized streams: 6x9 token image, two conditions (bokeh, deblurring +32 columns)."""
    c = _core("conditions")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 54, 64, generator=g)
    conds = [
        c.ConditionTokens(torch.randn(1, 54, 64, generator=g), c.latent_image_ids(6, 9), "bokeh"),
        c.ConditionTokens(
            torch.randn(b, 54, 64, generator=g), c.latent_image_ids(6, 9, delta=(0, 32)), "deblurring"
        ),
    ]
    emb, pooled = torch.randn(1, 12, 32, generator=g), torch.randn(1, 32, generator=g)
    return x, c.latent_image_ids(6, 9), conds, emb, pooled


def test_every_layer_and_the_output_match_the_reference(pair):
    ref, patcher, loras = pair
    x, ids, conds, emb, pooled = _inputs()
    t = torch.tensor([0.8, 0.3])
    trace: dict = {}
    with torch.no_grad():
        out = _core("native_flux").native_flux_forward(
            patcher.model.diffusion_model,
            x,
            ids,
            t,
            prompt_embeds=emb,
            pooled=pooled,
            guidance=3.5,
            conditions=conds,
            loras=loras,
            trace=trace,
        )
    tr = ref.transformer
    layers = [("embed", 0, 0)] + [(f"double.{i}", i + 1, 0) for i in range(2)]
    layers += [(f"single.{i}", 2, i + 1) for i in range(2)]
    worst = 0.0
    for name, n_double, n_single in layers:
        cut = copy.copy(tr)
        cut._modules = dict(tr._modules)
        cut.transformer_blocks = torch.nn.ModuleList(list(tr.transformer_blocks)[:n_double])
        cut.single_transformer_blocks = torch.nn.ModuleList(list(tr.single_transformer_blocks)[:n_single])
        with torch.no_grad():
            _, streams = _core("flux_lora").flux_forward(
                cut,
                x,
                ids,
                t,
                prompt_embeds=emb,
                pooled=pooled,
                guidance=3.5,
                conditions=conds,
                return_streams=True,
            )
        if name == "embed":  # the forward's embedding is the stream state before any block
            continue
        for stream, (ours, want) in enumerate(zip(trace[name], streams, strict=True)):
            torch.testing.assert_close(
                ours, want, **TOL, msg=lambda m, n=name, s=stream: f"{n} stream {s}: {m}"
            )
            worst = max(worst, float((ours - want).abs().max()))
    with torch.no_grad():
        want = _core("flux_lora").flux_forward(
            tr, x, ids, t, prompt_embeds=emb, pooled=pooled, guidance=3.5, conditions=conds
        )
        no_lora = _core("native_flux").native_flux_forward(
            patcher.model.diffusion_model,
            x,
            ids,
            t,
            prompt_embeds=emb,
            pooled=pooled,
            guidance=3.5,
            conditions=[dataclasses.replace(c, adapter=None) for c in conds],
        )
    torch.testing.assert_close(out, want, **TOL)
    assert (out - no_lora).abs().max() > 1e-2  # the LoRA acts (on the condition streams)


def test_comfyui_own_forward_equals_native_without_conditions(pair):
    """Wiring check against ComfyUI's Flux.forward (its patchify, ids, embeddings, blocks)."""
    _, patcher, loras = pair
    x, ids, _, emb, pooled = _inputs()
    t = torch.tensor([0.8, 0.3])
    flux = patcher.model.diffusion_model
    unpacked = x.view(2, 6, 9, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 16, 12, 18)
    with torch.no_grad():
        stock = flux(
            unpacked, t, emb.expand(2, -1, -1), y=pooled.expand(2, -1), guidance=torch.full((2,), 3.5)
        )
        ours = _core("native_flux").native_flux_forward(
            flux, x, ids, t, prompt_embeds=emb, pooled=pooled, guidance=3.5, loras=loras
        )
    stock = stock.view(2, 16, 6, 2, 9, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 54, 64)
    torch.testing.assert_close(ours, stock, **TOL)


@pytest.mark.parametrize("tiling", ["off", "on"])
def test_one_denoise_and_the_whole_sampled_latent_match_the_reference(pair, tiling):
    ref, patcher, loras = pair
    gp, npl = _core("genpipe"), _core("native_pipeline")
    x, _, conds, _, _ = _inputs(b=1, seed=1)
    conds = [c.with_tokens(c.tokens[:1], c.ids) for c in conds]
    native = npl.NativeModels(
        patcher.model.diffusion_model, loras, npl.DiffusersVaeCodec(ref.vae), ref.prompts, shift=ref.shift
    )
    for steps in (1, 6):  # one denoise (step 0 velocity, Euler step), then a whole run
        opts = gp.GenerationOptions(steps=steps, tiling=tiling, tile_size=64, tile_overlap=0.25, tile_batch=2)
        a = gp.generate_from_tokens(ref, x, conds, 96, 144, prompt="deblur", guidance=3.5, options=opts)
        b = npl.native_generate_from_tokens(
            native, x, conds, 96, 144, prompt="deblur", guidance=3.5, options=opts
        )
        torch.testing.assert_close(b.latents, a.latents, rtol=0, atol=2e-5)
        torch.testing.assert_close(b.decoded, a.decoded.clamp(-1, 1), rtol=0, atol=2 / 255 + 1e-5)


@pytest.mark.parametrize("case", ["deblur_small", "deblur_pre_small", "bokeh_mask"])
def test_official_level_a_tensors_on_comfyui_flux(pair, case):
    """The official Genfocus step latents (28 steps) reproduced on ComfyUI's FLUX module tree."""
    ref, patcher, _ = pair
    flux = patcher.model.diffusion_model
    d = FIXTURE / "cases" / case
    meta = json.loads((d / "meta.json").read_text())["generate_calls"][0]
    adapter = meta["conditions"][0]["adapter"]
    lora_file = {"deblur_small": "deblurNet", "deblur_pre_small": "deblurNet_with_pre_deblur"}.get(
        case, "bokehNet"
    )
    lora = _core("native_flux").load_native_lora(FIXTURE / "lora" / f"{lora_file}.safetensors", flux, adapter)
    npl, c = _core("native_pipeline"), _core("conditions")

    def npy(name):
        return torch.from_numpy(np.load(d / f"{name}.npy"))

    conds = [
        c.ConditionTokens(npy(f"cond{i}_tokens"), npy(f"cond{i}_ids"), adapter)
        for i in range(len(meta["conditions"]))
    ]
    native = npl.NativeModels(
        flux, {adapter: lora}, npl.DiffusersVaeCodec(ref.vae), ref.prompts, shift=ref.shift
    )
    stage = "bokeh" if case.startswith("bokeh") else "deblur"
    out = npl.native_generate_from_tokens(
        native,
        npy("init_latents"),
        conds,
        meta["height"],
        meta["width"],
        prompt=stage,
        guidance=1.0 if stage == "bokeh" else 3.5,
        options=_core("genpipe").GenerationOptions(steps=28, tiling="off"),
    )
    assert float((out.latents - npy("step_latents")[-1]).abs().max()) <= 2e-4  # README Level A tolerance


def test_lowvram_partial_loading_and_comfy_weight_patches_keep_working(pair):
    """A MODEL partially loaded (weights cast per call, ComfyUI's LowVramPatch applying a patch added
    with add_patches, as a regular LoRA would be) gives what the fully loaded patched MODEL gives."""
    ref, _, loras = pair
    sd = {
        k.replace(".base_layer", ""): v for k, v in ref.transformer.state_dict().items() if "lora_" not in k
    }
    patcher = real_model_patcher(_core("flux_convert").diffusers_to_bfl(sd))
    x, ids, conds, emb, pooled = _inputs(b=1, seed=2)
    conds = [c.with_tokens(c.tokens[:1], c.ids) for c in conds]
    t = torch.tensor([0.6])

    def run():
        with torch.no_grad():
            return _core("native_flux").native_flux_forward(
                patcher.model.diffusion_model,
                x,
                ids,
                t,
                prompt_embeds=emb,
                pooled=pooled,
                guidance=3.5,
                conditions=conds,
                loras=loras,
            )

    plain = run()
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    delta = torch.randn(96, 32, generator=torch.Generator().manual_seed(3)) * 0.05
    patcher.add_patches({key: ("diff", (delta,))})
    device = torch.device("cpu")
    patcher.patch_model(device_to=device, lowvram_model_memory=0)  # full load, patch merged
    full = run()
    patcher.unpatch_model(device_to=device)
    patcher.patch_model(device_to=device, lowvram_model_memory=1024)  # ~nothing resident: lowvram
    qkv = patcher.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert qkv.comfy_cast_weights and qkv.weight_function  # the patch is applied on the fly
    low = run()
    patcher.unpatch_model(device_to=device)
    torch.testing.assert_close(low, full, **TOL)
    assert (full - plain).abs().max() > 1e-3  # the ComfyUI patch really changed the model


def test_bf16_model_matches_the_bf16_reference(pair):
    """bf16 weights and activations on both sides (the official GPU dtype): the same roundings."""
    ref = _core("models").load_genfocus_models(
        FIXTURE / "model" / "transformer",
        FIXTURE / "model" / "vae",
        FIXTURE / "inputs" / "prompt_embeds.safetensors",
        deblur_lora=FIXTURE / "lora" / "deblurNet.safetensors",
        bokeh_lora=FIXTURE / "lora" / "bokehNet.safetensors",
        dtype=torch.bfloat16,
    )
    sd = {
        k.replace(".base_layer", ""): v for k, v in ref.transformer.state_dict().items() if "lora_" not in k
    }
    patcher = real_model_patcher(_core("flux_convert").diffusers_to_bfl(sd), torch.bfloat16)
    flux = patcher.model.diffusion_model
    nf = _core("native_flux")
    loras = {
        a: nf.load_native_lora(FIXTURE / "lora" / f"{f}.safetensors", flux, a).to(dtype=torch.bfloat16)
        for a, f in (("deblurring", "deblurNet"), ("bokeh", "bokehNet"))
    }
    x, ids, conds, emb, pooled = _inputs(b=1, seed=4)
    x, emb, pooled = x.bfloat16(), emb.bfloat16(), pooled.bfloat16()
    conds = [c.with_tokens(c.tokens[:1].bfloat16(), c.ids) for c in conds]
    kw = dict(prompt_embeds=emb, pooled=pooled, guidance=3.5, conditions=conds)
    with torch.no_grad():
        ours = nf.native_flux_forward(flux, x, ids, torch.tensor([0.5]), loras=loras, **kw)
        want = _core("flux_lora").flux_forward(ref.transformer, x, ids, torch.tensor([0.5]), **kw)
    assert ours.dtype == want.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours.float(), want.float(), rtol=0, atol=1e-2 * float(want.abs().max()))
