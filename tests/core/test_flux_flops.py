"""Tier 1: FLOPs of our multi-stream forward at the real FLUX.1-dev config (meta device, no weights)
equal the official forward's exact counts of docs/performance.md §6, up to the one documented
difference: the conditions share one timestep embedding (the official code embeds t per stream).
Catches condition-to-condition attention, per-tile text recomputation, LoRA on the wrong tokens."""

from __future__ import annotations

import pytest
import torch

from genrefocus_core.conditions import ConditionTokens, latent_image_ids
from genrefocus_core.flux_lora import flux_forward
from genrefocus_core.loading import FLUX_DEV_CONFIG

diffusers = pytest.importorskip("diffusers")

#: performance.md §6: the official forward at 1024² untiled (deblur: 1 condition, bokeh: 2).
OFFICIAL = {1: 165_463_334_584_320, 2: 256_539_799_584_768}
#: one ``time_text_embed`` at FLUX.1-dev's sizes: timestep and guidance MLPs (256 -> 3072 -> 3072)
#: and the pooled-text MLP (768 -> 3072 -> 3072), 2 FLOP per multiply-add.
TEMB = 2 * (2 * (256 * 3072 + 3072 * 3072) + (768 * 3072 + 3072 * 3072))


@pytest.mark.slow
@pytest.mark.parametrize("n_cond", [1, 2])
def test_flops_equal_the_official_forward(n_cond):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = {k: v for k, v in FLUX_DEV_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel.from_config(cfg)
    dev, dt, h = torch.device("meta"), torch.float32, 64
    ids = latent_image_ids(h, h, device=dev)
    conds = [ConditionTokens(torch.empty(1, h * h, 64, device=dev, dtype=dt), ids, None)
             for _ in range(n_cond)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        flux_forward(model, torch.empty(1, h * h, 64, device=dev, dtype=dt), ids, torch.ones(1, device=dev),
                     prompt_embeds=torch.empty(1, 512, 4096, device=dev, dtype=dt),
                     pooled=torch.empty(1, 768, device=dev, dtype=dt), guidance=3.5, conditions=conds)
    assert counter.get_total_flops() + n_cond * TEMB == OFFICIAL[n_cond]
