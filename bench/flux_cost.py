"""FLUX cost of the Genfocus stages with our multi-stream forward, against docs/performance.md §1.

Usage::

    python bench/flux_cost.py [--json OUT.json] [--skip-flops] [--skip-timing] [--threads 2]

1. FLOPs: ``FluxTransformer2DModel`` with the real FLUX.1-dev config is built on the ``meta``
   device in bf16 (no weights) and :func:`genrefocus_core.flux_lora.flux_forward` runs the
   official token layout (512 text tokens, the image, one stream per condition: DeblurNet 1,
   BokehNet 2) under ``torch.utils.flop_counter.FlopCounterMode``. Untiled: one forward on the
   whole image; tiled: one forward per 512 px tile (the official planner, :class:`TileLayout`),
   all tiles alike. Per step, per stage (28 steps) and per image (deblur + bokeh), for 1024²,
   2048x1536 and 3840x2160, next to the numbers of performance.md. The official code computes
   the timestep embedding once per stream (text, image, each condition); ours once for text and
   image and once for all conditions, i.e. 64,487,424 FLOP (one ``time_text_embed``) less per
   condition. Everything else is the same arithmetic, so adding that back must give the exact
   integers of performance.md §6. The LoRA cost is analytic: our routing applies it to condition
   tokens only.
2. Fast modes: the same per image for 12 steps (the fast mode's step count), the condition K/V
   cache (first step exact, later steps replay the conditions' K/V: text + image streams only;
   counted by running the recording and the replaying forward on meta) and both together
   (``FAST_OPTIONS``), against parity (28 steps, official tiling, exact).
3. Wall time per denoise step on a tiny random FLUX (2 + 2 blocks, width 256, 512 text tokens) on
   the CPU, a 1024² image in 9 tiles, tiles run one by one or batched (``tile_batch``): a
   regression signal for the tile batching, not a GPU prediction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrefocus_core.condition_cache import ConditionCache  # noqa: E402
from genrefocus_core.conditions import ConditionTokens, latent_image_ids  # noqa: E402
from genrefocus_core.flux_lora import flux_forward, lora_target_modules  # noqa: E402
from genrefocus_core.loading import FLUX_DEV_CONFIG  # noqa: E402
from genrefocus_core.sampler import TileLayout, denoise, flow_sigmas, should_tile  # noqa: E402

SIZES = ((1024, 1024), (2048, 1536), (3840, 2160))  # (width, height) in px
STAGES = (("deblur", 1), ("bokeh", 2))  # name, condition streams
STEPS = 28
TEXT_TOKENS = 512
#: performance.md §1: TFLOP per step (untiled, tiled over all tiles) and tile counts.
REFERENCE = {
    ((1024, 1024), "deblur"): (165.5, 339.0, 9),
    ((1024, 1024), "bokeh"): (256.5, 484.5, 9),
    ((2048, 1536), "deblur"): (764.8, 753.3, 20),
    ((2048, 1536), "bokeh"): (1249.5, 1076.6, 20),
    ((3840, 2160), "deblur"): (3831.0, 1695.0, 45),
    ((3840, 2160), "bokeh"): (6478.0, 2422.0, 45),
}
#: performance.md §6: exact counts of the official forward at 1024² untiled.
EXACT_OFFICIAL = {"deblur": 165_463_334_584_320, "bokeh": 256_539_799_584_768}
#: FLOPs of one ``time_text_embed`` call at FLUX.1-dev's sizes (timestep, guidance, pooled text).
TEMB_FLOPS = 2 * (2 * (256 * 3072 + 3072 * 3072) + (768 * 3072 + 3072 * 3072))


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def meta_flux():
    from diffusers import FluxTransformer2DModel

    cfg = {k: v for k, v in FLUX_DEV_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(cfg).to(torch.bfloat16)


def forward_flops(model, h: int, w: int, n_cond: int, cache: ConditionCache | None = None) -> int:
    """FLOPs of one multi-stream forward on an ``h x w`` token grid with ``n_cond`` conditions.

    With ``cache``: an empty one records (the exact forward), a filled one replays the conditions.
    """
    from torch.utils.flop_counter import FlopCounterMode

    dev, dt = torch.device("meta"), torch.bfloat16
    ids = latent_image_ids(h, w, device=dev)
    conds = [ConditionTokens(torch.empty(1, h * w, 64, device=dev, dtype=dt), ids, None)
             for _ in range(n_cond)]
    latents = torch.empty(1, h * w, 64, device=dev, dtype=dt)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        flux_forward(model, latents, ids, torch.ones(1, device=dev),
                     prompt_embeds=torch.empty(1, TEXT_TOKENS, 4096, device=dev, dtype=dt),
                     pooled=torch.empty(1, 768, device=dev, dtype=dt), guidance=3.5, conditions=conds,
                     condition_cache=cache)
    return int(counter.get_total_flops())


FAST_STEPS = 12


def fast_table() -> dict:
    """Per-image PFLOP of parity and the fast modes at the official layout (tiled from 512 px)."""
    model = meta_flux()
    rows = []
    out(f"## Per image, deblur + bokeh (PFLOP): parity vs fast modes ({FAST_STEPS} steps, condition "
        "K/V cache)")
    out()
    out(f"| image | layout | parity (28 steps) | {FAST_STEPS} steps | 28 steps + cache | "
        f"{FAST_STEPS} steps + cache (FAST_OPTIONS) | ratio to parity |")
    out("|---|---|---|---|---|---|---|")
    per_tile: dict[int, tuple[int, int]] = {}
    for (w, h) in SIZES:
        th, tw = h // 16, w // 16
        tiled = should_tile(h, w)
        lay = TileLayout(th, tw, tile=32)
        n_fw = len(lay) if tiled else 1
        totals = [0, 0, 0, 0]
        for _stage, n_cond in STAGES:
            if tiled:
                if n_cond not in per_tile:
                    cache = ConditionCache()
                    per_tile[n_cond] = (forward_flops(model, 32, 32, n_cond, cache),
                                        forward_flops(model, 32, 32, n_cond, cache))
                exact, replay = per_tile[n_cond]
            else:
                cache = ConditionCache()
                exact = forward_flops(model, th, tw, n_cond, cache)
                replay = forward_flops(model, th, tw, n_cond, cache)
            exact, replay = exact * n_fw, replay * n_fw
            totals[0] += STEPS * exact
            totals[1] += FAST_STEPS * exact
            totals[2] += exact + (STEPS - 1) * replay
            totals[3] += exact + (FAST_STEPS - 1) * replay
        layout = f"{len(lay)} tiles" if tiled else "untiled"
        pf = " | ".join(f"{t / 1e15:.1f}" for t in totals)
        ratios = " / ".join(f"{t / totals[0]:.2f}" for t in totals[1:])
        out(f"| {w}x{h} | {layout} | {pf} | {ratios} |")
        rows.append({"width": w, "height": h, "layout": layout, "parity": totals[0], "fewer_steps": totals[1],
                     "cache": totals[2], "fast": totals[3]})
    out()
    out("performance.md: 1024² tiled 23.1 -> 12.1 (cache) -> 5.4 PF (12 steps + cache); 3840x2160 115.3 -> "
        "60.4 -> 27.0 PF. Target (issue 5): a fast mode <= 0.5x parity at 1 MP and 4K.")
    return {"fast_modes": rows}


def lora_flops_per_token(model, rank: int) -> int:
    """FLOPs a rank-``rank`` Genfocus LoRA adds per condition token: ``2 r (in + out)`` per module.

    The adaLN modulation linears (``norm1.linear``, ``norm.linear``) act once per stream on the
    timestep embedding, not per token, so they are left out.
    """
    mods = dict(model.named_modules())
    per_token = [m for m in lora_target_modules(model) if not m.endswith(("norm1.linear", "norm.linear"))]
    return sum(2 * rank * (mods[m].in_features + mods[m].out_features) for m in per_token)


def flops_table() -> dict:
    model = meta_flux()
    results: dict = {"per_step": [], "per_image": [], "exact_1024_untiled": {}}
    tile_cache: dict[int, int] = {}
    out("## FLOPs per step (TFLOP), FLUX.1-dev on meta, bf16")
    out()
    out("| image | stage | img tokens | untiled TF/step | doc | tiles | doc | tiled TF/step | doc | "
        "untiled PF/stage | tiled PF/stage | auto rule |")
    out("|---|---|---|---|---|---|---|---|---|---|---|---|")
    per_image: dict = {}
    for (w, h) in SIZES:
        th, tw = h // 16, w // 16
        lay = TileLayout(th, tw, tile=32)
        for stage, n_cond in STAGES:
            t0 = time.perf_counter()
            untiled = forward_flops(model, th, tw, n_cond)
            if n_cond not in tile_cache:
                tile_cache[n_cond] = forward_flops(model, 32, 32, n_cond)
            tiled = tile_cache[n_cond] * len(lay)
            ref_u, ref_t, ref_n = REFERENCE[((w, h), stage)]
            auto = "tiled" if should_tile(h, w) else "untiled"
            out(f"| {w}x{h} | {stage} | {th * tw} | {untiled / 1e12:.1f} | {ref_u:.1f} | {len(lay)} | "
                f"{ref_n} | {tiled / 1e12:.1f} | {ref_t:.1f} | {STEPS * untiled / 1e15:.2f} | "
                f"{STEPS * tiled / 1e15:.2f} | {auto} |")
            results["per_step"].append({"width": w, "height": h, "stage": stage, "untiled_flops": untiled,
                                        "tile_flops": tile_cache[n_cond], "tiles": len(lay),
                                        "tiled_flops": tiled, "seconds": time.perf_counter() - t0})
            per_image.setdefault((w, h), [0, 0])
            per_image[(w, h)][0] += STEPS * untiled
            per_image[(w, h)][1] += STEPS * tiled
            if (w, h) == (1024, 1024):
                ours = untiled
                official = ours + n_cond * TEMB_FLOPS  # the official code embeds t once per stream
                results["exact_1024_untiled"][stage] = {"ours": ours, "official_equivalent": official,
                                                        "doc": EXACT_OFFICIAL[stage]}
    out()
    out("## Per image, deblur + bokeh, 28 steps each (PFLOP)")
    out()
    out("| image | untiled | tiled (official default at these sizes) |")
    out("|---|---|---|")
    for (w, h), (u, t) in per_image.items():
        out(f"| {w}x{h} | {u / 1e15:.1f} | {t / 1e15:.1f} |")
        results["per_image"].append({"width": w, "height": h, "untiled_flops": u, "tiled_flops": t})
    out()
    for stage, d in results["exact_1024_untiled"].items():
        same = "equal" if d["official_equivalent"] == d["doc"] else "DIFFERENT"
        out(f"1024² untiled {stage}: ours {d['ours']:,} FLOP; + per-stream temb = "
            f"{d['official_equivalent']:,}; performance.md {d['doc']:,} ({same})")
    per_tok = lora_flops_per_token(model, 1)
    out(f"LoRA: {per_tok / 1e6:.2f} r MFLOP per condition token (doc: 5.49 r); r = 128: "
        f"{128 * per_tok / 1e9:.2f} GFLOP per condition token, on condition tokens only")
    results["lora_flops_per_token_per_rank"] = per_tok
    return results


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    cfg = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=64,
               num_attention_heads=4, joint_attention_dim=4096, pooled_projection_dim=768,
               axes_dims_rope=(8, 28, 28), guidance_embeds=True)
    return FluxTransformer2DModel(**cfg).eval()


def timing_table(steps: int = 2) -> dict:
    model = tiny_flux()
    g = torch.Generator().manual_seed(0)
    h = w = 64  # 1024 px: 9 tiles of 32x32 tokens
    latents = torch.randn(1, h * w, 64, generator=g)
    cond = ConditionTokens.on_grid(torch.randn(1, h * w, 64, generator=g), h, w, "none")
    emb, pooled = torch.randn(1, TEXT_TOKENS, 4096, generator=g), torch.randn(1, 768, generator=g)

    def velocity(x, ids, conds, t):
        return flux_forward(model, x, ids, t, prompt_embeds=emb, pooled=pooled, guidance=3.5,
                            conditions=conds)

    lay = TileLayout(h, w, tile=32)
    sigmas = flow_sigmas(steps, h * w)
    rows = []
    out(f"## Tiny FLUX on the CPU ({torch.get_num_threads()} threads): 1024² deblur layout, "
        f"{len(lay)} tiles, {steps} steps")
    out()
    out("| tile_batch | s/step (median) | ms per tile forward | speed-up vs 1 |")
    out("|---|---|---|---|")
    base = None
    for tb in (1, 3, 9):
        times: list[float] = []
        last = [time.perf_counter()]
        per = len(lay)

        def on_step(done: int, total: int, times=times, last=last, per=per) -> None:
            if done % per == 0:  # a step ends after its last tile
                now = time.perf_counter()
                times.append(now - last[0])
                last[0] = now

        with torch.no_grad():
            last[0] = time.perf_counter()
            denoise(velocity, latents, (h, w), sigmas, conditions=[cond], tiles=lay, tile_batch=tb,
                    on_step=on_step)
        med = statistics.median(times)
        base = base or med
        out(f"| {tb} | {med:.2f} | {1000 * med / len(lay):.0f} | {base / med:.2f}x |")
        rows.append({"tile_batch": tb, "seconds_per_step": med, "steps": times})
    return {"tiny_timing": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--skip-flops", action="store_true", help="skip the FLOP table")
    p.add_argument("--skip-timing", action="store_true", help="skip the tiny-model timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for the timing")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    results: dict = {}
    if not a.skip_flops:
        results |= flops_table()
        out()
        results |= fast_table()
        out()
    if not a.skip_timing:
        results |= timing_table()
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
