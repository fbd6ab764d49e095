"""Tier 1: the native pipeline (``native_pipeline``) against the reference pipeline, end to end.

The reference backend (diffusers FLUX + PEFT adapters) and the native one (the same weights in
the BFL layout, ``bfl_flux.py``; the adapters mapped onto the fused layout) share a diffusers VAE
through :class:`DiffusersVaeCodec`, so with the same options they must give the same latents and
images: same noise recipe, conditions, sampler, tiling and decode. Against the official Genfocus
tensors: the fixture test at the end (Level A of ``../shared/fixtures/genfocus-parity``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from peft import LoraConfig

from genrefocus_core.conditions import ConditionTokens
from genrefocus_core.defocus import FocusTarget, defocus_map
from genrefocus_core.depth import DepthMap
from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.flux_convert import diffusers_to_bfl
from genrefocus_core.flux_lora import lora_target_modules
from genrefocus_core.genpipe import GenerationOptions, GenfocusModels, bokeh, deblur, generate_from_tokens
from genrefocus_core.models import ADAPTER_BOKEH, ADAPTER_DEBLUR, ADAPTER_PRE_DEBLUR, load_genfocus_models
from genrefocus_core.native_flux import load_native_lora, native_lora_from_state_dict
from genrefocus_core.native_pipeline import (
    DiffusersVaeCodec,
    NativeModels,
    native_bokeh,
    native_bokeh_image,
    native_deblur,
    native_deblur_image,
    native_generate_from_tokens,
    native_refocus,
)
from genrefocus_core.pipeline import bokeh_image, deblur_image, refocus
from genrefocus_core.prompts import BOKEH_PROMPT, DEBLUR_PROMPT, PromptEmbedding

_spec = importlib.util.spec_from_file_location("_native_bfl_flux", Path(__file__).with_name("bfl_flux.py"))
bfl_flux = sys.modules.setdefault("_native_bfl_flux", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bfl_flux)

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
ADAPTERS = (ADAPTER_DEBLUR, ADAPTER_PRE_DEBLUR, ADAPTER_BOKEH)
LATENT_TOL = dict(rtol=0, atol=2e-5)
LEVEL = 1 / 255 + 1e-6  # the 8-bit output may round one level differently

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backends() -> tuple[GenfocusModels, NativeModels]:
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(20 + i)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            cfg = LoraConfig(
                r=4, lora_alpha=4, init_lora_weights=False, target_modules=lora_target_modules(flux)
            )
            flux.add_adapter(cfg, adapter_name=name)
    torch.manual_seed(1)
    vae = AutoencoderKL(
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    g = torch.Generator().manual_seed(3)
    prompts = {
        n: PromptEmbedding(p, torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g))
        for n, p in (("deblur", DEBLUR_PROMPT), ("bokeh", BOKEH_PROMPT))
    }
    twin = bfl_flux.bfl_twin(flux, diffusers_to_bfl)
    loras = {
        a: native_lora_from_state_dict(
            bfl_flux.adapter_state_dict(flux, a, lora_target_modules(flux)), twin, a
        )
        for a in ADAPTERS
    }
    return GenfocusModels(flux, vae, prompts), NativeModels(twin, loras, DiffusersVaeCodec(vae), prompts)


def _photo(b=1, h=32, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options",
    [
        GenerationOptions(steps=2),  # official recipe: seed 42, posterior sample
        GenerationOptions(steps=2, noise="seeded", seed=7, condition_latent="mean"),
        GenerationOptions(steps=2, tiling="on", tile_size=32, tile_overlap=0.25, tile_batch=3),
    ],
    ids=["reference", "seeded-mean", "tiled"],
)
def test_deblur_equals_the_reference(backends, options):
    ref, nat = backends
    img = _photo(b=2)
    a = deblur(ref, img, options=options)
    b = native_deblur(nat, img, options=options)
    torch.testing.assert_close(b.latents, a.latents, **LATENT_TOL)
    torch.testing.assert_close(b.image, a.image, rtol=0, atol=LEVEL)
    assert (b.latents[0] - b.latents[1]).abs().max() > 1e-3  # two different photos, two results


def test_pre_deblur_variant_equals_the_reference(backends):
    ref, nat = backends
    img, pre = _photo(seed=1), _photo(h=20, w=30, seed=2)
    opts = GenerationOptions(steps=2)
    a = deblur(ref, img, adapter=ADAPTER_PRE_DEBLUR, pre_deblurred=pre, options=opts)
    b = native_deblur(nat, img, adapter=ADAPTER_PRE_DEBLUR, pre_deblurred=pre, options=opts)
    torch.testing.assert_close(b.latents, a.latents, **LATENT_TOL)
    plain = native_deblur(nat, img, adapter=ADAPTER_PRE_DEBLUR, options=opts)
    assert (plain.latents - b.latents).abs().max() > 1e-3  # the pre-deblurred condition matters


def test_bokeh_equals_the_reference(backends):
    ref, nat = backends
    img = _photo(seed=3)
    dmap = torch.rand(1, 1, 32, 48, generator=torch.Generator().manual_seed(4)) * 0.2
    noise = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    opts = GenerationOptions(steps=3)
    a = bokeh(ref, img, dmap, noise=noise, options=opts)
    b = native_bokeh(nat, img, dmap, noise=noise, options=opts)
    torch.testing.assert_close(b.latents, a.latents, **LATENT_TOL)
    torch.testing.assert_close(b.image, a.image, rtol=0, atol=LEVEL)


def test_photo_level_stages_equal_the_reference_pipeline(backends):
    """Resize, frames, D_def from a depth map or a CoC map, restore size: as pipeline.py."""
    ref, nat = backends
    photo = _photo(b=2, h=30, w=44, seed=6)
    depth = DepthMap(torch.linspace(0.2, 0.9, 44).view(1, 1, 1, 44).expand(2, 1, 30, 44).clone(), metric=True)
    focus = FocusTarget("point", x=0.3, y=0.5)
    opts = GenerationOptions(steps=2)
    steps: list = []
    a = refocus(photo, models=ref, depth=depth, focus=focus, k=25.0, options=opts, restore_size=True)
    b = native_refocus(
        photo,
        models=nat,
        depth=depth,
        focus=focus,
        k=25.0,
        options=opts,
        restore_size=True,
        on_step=lambda i, n: steps.append((i, n)),
    )
    assert b.image.shape == (2, 3, 30, 44) and steps[-1] == (8, 8)  # 2 frames x 2 stages x 2 steps
    for name in ("image", "aif", "defocus"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=2 * LEVEL)
    torch.testing.assert_close(b.coc.coc, a.coc.coc, rtol=0, atol=0)
    dm = defocus_map(depth.disparity, focus, 25.0, metric=True)
    a = bokeh_image(photo, models=ref, defocus=dm, options=opts)
    b = native_bokeh_image(photo, models=nat, defocus=dm, options=opts)
    torch.testing.assert_close(b.image, a.image, rtol=0, atol=LEVEL)
    a = deblur_image(photo[:1], models=ref, options=opts, long_side=32)
    b = native_deblur_image(photo[:1], models=nat, options=opts, long_side=32)
    assert b.image.shape == (1, 3, 16, 32)
    torch.testing.assert_close(b.image, a.image, rtol=0, atol=LEVEL)
    k0 = native_refocus(photo[:1], models=nat, k=0.0, options=opts)
    torch.testing.assert_close(k0.image, k0.aif, rtol=0, atol=0)


class _MeanOnly(DiffusersVaeCodec):
    """Like ComfyUI's VAE: the posterior mean only."""

    def encode(self, pixels, noise=None):
        if noise is not None:
            raise GenRefocusModelError("this VAE gives the posterior mean only")
        return super().encode(pixels)


def test_mean_codec_needs_condition_latent_mean(backends):
    ref, nat = backends
    mean_only = NativeModels(nat.flux, nat.loras, _MeanOnly(ref.vae), nat.prompts)
    img = _photo(seed=8)
    with pytest.raises(GenRefocusModelError, match="posterior mean only"):
        native_deblur(mean_only, img, options=GenerationOptions(steps=1))
    opts = GenerationOptions(steps=1, condition_latent="mean")
    torch.testing.assert_close(
        native_deblur(mean_only, img, options=opts).latents,
        deblur(ref, img, options=opts).latents,
        **LATENT_TOL,
    )


def test_missing_adapters_and_prompts_are_named(backends):
    _, nat = backends
    img = _photo()
    bare = NativeModels(nat.flux, {ADAPTER_BOKEH: nat.loras[ADAPTER_BOKEH]}, nat.codec, {})
    with pytest.raises(
        GenRefocusModelError,
        match=r"adapter 'deblurring' is not loaded \(loaded: bokeh\); load "
        r"deblurNet\.safetensors",
    ):
        native_deblur_image(img, models=bare)
    with pytest.raises(GenRefocusModelError, match=r"prompt embedding 'bokeh' is missing"):
        native_bokeh(bare, img, torch.zeros(1, 1, 32, 48), options=GenerationOptions(steps=1))
    with pytest.raises(GenRefocusInputError, match=r"depth_model and depth must be given"):
        native_refocus(img, models=nat, k=10.0)
    with pytest.raises(GenRefocusInputError, match=r"models must be a NativeModels"):
        native_deblur_image(img, models=object())
    with pytest.raises(GenRefocusInputError, match=r"latents must have shape \(B, 6, C\)"):
        native_generate_from_tokens(nat, torch.zeros(1, 5, 64), [], 32, 48, prompt="deblur", guidance=3.5)


# ------------------------------------------------------------------------------------------------
# The official tensors (Level A: injected noise, condition tokens and ids)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["deblur_small", "deblur_pre_small", "bokeh_mask"])
def test_native_backend_meets_the_official_level_a_tolerances(fx, case):
    """28 official steps on the fixture FLUX in BFL layout with the fixture LoRA files mapped."""
    models = load_genfocus_models(
        fx / "model" / "transformer",
        fx / "model" / "vae",
        fx / "inputs" / "prompt_embeds.safetensors",
        bokeh_lora=fx / "lora" / "bokehNet.safetensors",
    )
    twin = bfl_flux.bfl_twin(models.transformer, diffusers_to_bfl)
    d = fx / "cases" / case
    meta = json.loads((d / "meta.json").read_text())["generate_calls"][0]
    stage = "bokeh" if case.startswith("bokeh") else "deblur"
    lora_file = {"deblur_small": "deblurNet", "deblur_pre_small": "deblurNet_with_pre_deblur"}.get(
        case, "bokehNet"
    )
    adapter = meta["conditions"][0]["adapter"]
    lora = load_native_lora(fx / "lora" / f"{lora_file}.safetensors", twin, adapter)
    nat = NativeModels(
        twin, {adapter: lora}, DiffusersVaeCodec(models.vae), models.prompts, shift=models.shift
    )

    def npy(name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(d / f"{name}.npy"))

    h, w = meta["height"], meta["width"]
    conds = [
        ConditionTokens(npy(f"cond{i}_tokens"), npy(f"cond{i}_ids"), adapter)
        for i in range(len(meta["conditions"]))
    ]
    guidance = 1.0 if stage == "bokeh" else 3.5
    out = native_generate_from_tokens(
        nat,
        npy("init_latents"),
        conds,
        h,
        w,
        prompt=stage,
        guidance=guidance,
        options=GenerationOptions(steps=28, tiling="off"),
    )
    final = npy("step_latents")[-1]
    z = (
        out.latents.view(1, h // 16, w // 16, 16, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(1, 16, h // 8, w // 8)
    )
    z = z / 0.3611 + 0.1159
    assert (out.latents - final).abs().max() <= 2e-4
    assert (z - npy("vae_decode_input")).abs().max() <= 2e-4
    if case == "deblur_small":  # and the reference backend lands on the same latents
        ref_models = load_genfocus_models(
            fx / "model" / "transformer",
            fx / "model" / "vae",
            fx / "inputs" / "prompt_embeds.safetensors",
            deblur_lora=fx / "lora" / "deblurNet.safetensors",
        )
        ref = generate_from_tokens(
            ref_models,
            npy("init_latents"),
            conds,
            h,
            w,
            prompt=stage,
            guidance=guidance,
            options=GenerationOptions(steps=28, tiling="off"),
        )
        assert (out.latents - ref.latents).abs().max() <= 2e-5
