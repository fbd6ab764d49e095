"""Tier 1: flow-matching sigmas, tile layout, tiled denoising and seeded generation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from peft import LoraConfig

from genrefocus_core.conditions import ConditionTokens, latent_image_ids
from genrefocus_core.errors import GenRefocusInputError
from genrefocus_core.flux_lora import flux_forward, lora_target_modules
from genrefocus_core.genpipe import GenerationOptions, GenfocusModels, bokeh, deblur
from genrefocus_core.prompts import BOKEH_PROMPT, DEBLUR_PROMPT, PromptEmbedding
from genrefocus_core.sampler import (
    FlowShift,
    TileLayout,
    denoise,
    euler_step,
    flow_sigmas,
    flux_mu,
    should_tile,
)

FLUX_DEV_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                          num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("steps", "tokens"), [(28, 54), (28, 1024), (8, 4096), (50, 12288), (1, 1440)])
def test_sigmas_equal_diffusers_scheduler(steps, tokens):
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=flux_mu(tokens))
    ours = flow_sigmas(steps, tokens)
    assert torch.equal(ours, sched.sigmas)
    assert torch.equal(ours[:-1] * 1000, sched.timesteps)


def test_mu_and_schedule_examples_of_the_spec():
    assert flux_mu(32 * 32) == pytest.approx(0.63)
    assert flux_mu(64 * 64) == pytest.approx(1.15)
    assert flux_mu(96 * 128) == pytest.approx(2.537, abs=1e-3)  # 1536x2048: extrapolated, not clamped
    s = flow_sigmas(28, 96 * 128)
    assert float(s[-2]) == pytest.approx(0.319, abs=1e-3) and float(s[-1]) == 0.0
    assert torch.all(s[1:] < s[:-1])
    cfg = FlowShift.from_scheduler_config(dict(FLUX_DEV_SCHEDULER, time_shift_type="exponential"))
    assert cfg == FlowShift()
    with pytest.raises(GenRefocusInputError, match="dynamic exponential"):
        FlowShift.from_scheduler_config(dict(FLUX_DEV_SCHEDULER, use_dynamic_shifting=False))
    with pytest.raises(GenRefocusInputError, match="num_steps"):
        flow_sigmas(0, 16)


def test_euler_step_accumulates_in_float32():
    x = torch.full((1, 1, 1), 1.0, dtype=torch.bfloat16)
    v = torch.full((1, 1, 1), 1e-3, dtype=torch.bfloat16)
    out = euler_step(x, v, torch.tensor(1.0), torch.tensor(0.0))
    assert out.dtype == torch.bfloat16
    assert float(out) == float(torch.tensor(1.0 - float(v), dtype=torch.float32).to(torch.bfloat16))


def _official_starts(n, tile=32):
    """The upstream formula, written independently (numpy arange + flush)."""
    starts = np.arange(0, max(1, n - tile + 1), tile - tile // 8)
    if starts[-1] + tile < n:
        starts = np.append(starts, n - tile)
    return starts.tolist()


@pytest.mark.parametrize(("h", "w", "n_tiles"), [(36, 40, 4), (64, 64, 9), (96, 128, 20), (135, 240, 45),
                                                 (32, 32, 1)])
def test_tile_layout_matches_the_official_plan(h, w, n_tiles):
    lay = TileLayout(h, w)
    assert len(lay) == n_tiles
    rows, cols = _official_starts(h), _official_starts(w)
    assert lay.row_starts == rows and lay.col_starts == cols
    rr, cc = np.meshgrid(rows, cols)  # upstream: meshgrid('xy') + ravel -> column start outer
    assert lay.tiles == list(zip(rr.ravel().tolist(), cc.ravel().tolist(), strict=True))
    covered = torch.zeros(h * w, dtype=torch.bool)
    for r, c in lay.tiles:
        idx = lay.indices(r, c)
        assert idx.numel() == 1024
        covered[idx] = True
    assert covered.all()


def test_tile_weights_and_thin_grids():
    w = TileLayout(32, 32).weights()
    assert float(w.max()) < 1 and float(w.min()) == pytest.approx(math.exp(-8), rel=1e-5)
    thin = TileLayout(10, 100)  # one side shorter than a tile: upstream would crash
    assert thin.tile_shape == (10, 32) and thin.row_starts == [0]
    assert thin.ids().shape == (320, 3) and float(thin.ids()[:, 1].max()) == 9
    with pytest.raises(GenRefocusInputError, match="overlap"):
        TileLayout(40, 40, tile=32, overlap=32)


def test_should_tile_rule():
    assert should_tile(512, 512) and should_tile(576, 640)
    assert not should_tile(496, 4096)  # min side < 512 px
    assert not should_tile(96, 144)
    assert should_tile(96, 144, tiling="on") and not should_tile(1024, 1024, tiling="off")
    with pytest.raises(GenRefocusInputError, match="tiling"):
        should_tile(512, 512, tiling="yes")


def _per_token(x, ids, conds, t):
    """A velocity field that depends on each token only: tiling must not change it."""
    out = torch.tanh(x) * (1 + t.view(-1, 1, 1))
    for c in conds:
        out = out + 0.1 * c.tokens
    return out


@pytest.mark.parametrize("grid", [(36, 40), (10, 70)])
def test_blend_weights_normalise_to_one(grid):
    h, w = grid
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, h * w, 8, generator=g)
    cond = ConditionTokens.on_grid(torch.randn(1, h * w, 8, generator=g), h, w, "bokeh")
    s = flow_sigmas(3, h * w)
    untiled = denoise(_per_token, x, grid, s, conditions=[cond])
    tiled = denoise(_per_token, x, grid, s, conditions=[cond], tiles=TileLayout(h, w), tile_batch=3)
    torch.testing.assert_close(tiled, untiled, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def gen_flux():
    """A tiny FLUX with 64 input channels (16 latent channels, as FLUX) and a Genfocus-style LoRA."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True,
                                   axes_dims_rope=(4, 6, 6)).eval()
    for name in ("bokeh", "deblurring"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                         target_modules=lora_target_modules(model)), adapter_name=name)
    return model


def _velocity(model, guidance=3.5):
    g = torch.Generator().manual_seed(5)
    emb, pooled = torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g)
    return lambda x, ids, conds, t: flux_forward(model, x, ids, t, prompt_embeds=emb, pooled=pooled,
                                                 guidance=guidance, conditions=conds)


@torch.no_grad()
def test_tiled_batched_equals_sequential_and_reports_progress(gen_flux):
    h, w = 36, 20  # 2 x 1 tiles of 32 x 20 (short side below a tile)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, h * w, 64, generator=g)
    conds = [ConditionTokens.on_grid(torch.randn(1, h * w, 64, generator=g), h, w, "bokeh", d)
             for d in ((0, 0), (0, 32))]
    lay = TileLayout(h, w)
    assert len(lay) == 2
    s = flow_sigmas(2, h * w)
    calls = []
    seq = denoise(_velocity(gen_flux), x, (h, w), s, conditions=conds, tiles=lay, tile_batch=1,
                  on_step=lambda i, n: calls.append((i, n)))
    bat = denoise(_velocity(gen_flux), x, (h, w), s, conditions=conds, tiles=lay, tile_batch=8)
    torch.testing.assert_close(bat, seq, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]  # per tile, per step
    kept = denoise(_velocity(gen_flux), x, (h, w), s, conditions=conds, tiles=lay, keep_condition_deltas=True)
    assert (kept - seq).abs().max() > 1e-4  # the +32 offset is dropped in tiles unless asked to keep it


@torch.no_grad()
def test_single_tile_equals_untiled(gen_flux):
    h, w = 32, 32
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, h * w, 64, generator=g)
    conds = [ConditionTokens.on_grid(torch.randn(1, h * w, 64, generator=g), h, w, "deblurring")]
    s = flow_sigmas(2, h * w)
    untiled = denoise(_velocity(gen_flux), x, (h, w), s, conditions=conds, latent_ids=latent_image_ids(h, w))
    tiled = denoise(_velocity(gen_flux), x, (h, w), s, conditions=conds, tiles=TileLayout(h, w))
    torch.testing.assert_close(tiled, untiled, rtol=1e-5, atol=1e-5)


def test_denoise_input_errors():
    x = torch.zeros(1, 6, 4)
    with pytest.raises(GenRefocusInputError, match="grid"):
        denoise(_per_token, x, (2, 2), flow_sigmas(1, 6))
    with pytest.raises(GenRefocusInputError, match="tile_batch"):
        denoise(_per_token, x, (2, 3), flow_sigmas(1, 6), tile_batch=0)
    with pytest.raises(GenRefocusInputError, match=r"conditions\[0\]\.tokens"):
        denoise(_per_token, x, (2, 3), flow_sigmas(1, 6),
                conditions=[ConditionTokens.on_grid(torch.zeros(1, 6, 5), 2, 3, None)])
    with pytest.raises(GenRefocusInputError, match="tiles must cover"):
        denoise(_per_token, x, (2, 3), flow_sigmas(1, 6), tiles=TileLayout(3, 2))


@pytest.fixture(scope="module")
def gen_models(gen_flux):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.3611, shift_factor=0.1159,
                        use_quant_conv=False, use_post_quant_conv=False).eval()
    g = torch.Generator().manual_seed(3)
    prompts = {n: PromptEmbedding(p, torch.randn(1, 8, 32, generator=g), torch.randn(1, 32, generator=g))
               for n, p in (("deblur", DEBLUR_PROMPT), ("bokeh", BOKEH_PROMPT))}
    return GenfocusModels(gen_flux, vae, prompts)


def test_two_steps_are_deterministic_under_a_seed(gen_models):
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    opts = GenerationOptions(steps=2, noise="seeded", seed=7)
    a = deblur(gen_models, img, options=opts)
    b = deblur(gen_models, img, options=opts)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.image, b.image)
    c = deblur(gen_models, img, options=GenerationOptions(steps=2, noise="seeded", seed=8))
    assert (c.latents - a.latents).abs().max() > 1e-3
    assert a.image.shape == (1, 3, 32, 48)
    assert torch.equal(a.image, torch.round(a.image * 255) / 255)  # 8-bit levels like the official PNG
    # the reference recipe does not touch torch's global RNG and is reproducible too
    state = torch.get_rng_state()
    r1 = deblur(gen_models, img, options=GenerationOptions(steps=2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.latents, deblur(gen_models, img, options=GenerationOptions(steps=2)).latents)


def test_bokeh_stage_and_its_checks(gen_models):
    g = torch.Generator().manual_seed(6)
    img = torch.rand(2, 3, 32, 32, generator=g)
    dmap = torch.rand(1, 1, 32, 32, generator=g) * 0.1
    steps = []
    out = bokeh(gen_models, img, dmap, options=GenerationOptions(steps=2, condition_latent="mean"),
                on_step=lambda i, n: steps.append((i, n)))
    assert out.image.shape == (2, 3, 32, 32) and steps == [(1, 2), (2, 2)] * 2
    one = bokeh(gen_models, img[1:], dmap, options=GenerationOptions(steps=2, condition_latent="mean"))
    torch.testing.assert_close(out.latents[1:], one.latents, rtol=1e-5, atol=1e-5)  # per-image loop
    flat = bokeh(gen_models, img[:1], torch.zeros(1, 1, 32, 32), options=GenerationOptions(steps=2))
    mapped = bokeh(gen_models, img[:1], dmap, options=GenerationOptions(steps=2))
    assert (flat.latents - mapped.latents).abs().max() > 1e-4  # the defocus map matters
    with pytest.raises(GenRefocusInputError, match=r"defocus must lie in \[0, 1\]"):
        bokeh(gen_models, img, dmap * 20, options=GenerationOptions(steps=1))
    with pytest.raises(GenRefocusInputError, match="multiples of 16"):
        bokeh(gen_models, img[..., :30], dmap[..., :30], options=GenerationOptions(steps=1))
    with pytest.raises(GenRefocusInputError, match="noise must have shape"):
        bokeh(gen_models, img, dmap, noise=torch.zeros(1, 16, 2, 2), options=GenerationOptions(steps=1))
    with pytest.raises(GenRefocusInputError, match="steps"):
        GenerationOptions(steps=0)
