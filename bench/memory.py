"""Memory of the Genfocus stages per memory mode at FLUX.1-dev size, without weights (performance.md §2).

Usage::

    python bench/memory.py [--json OUT.json] [--lora-rank 8] [--tile-batch 4]

1. Resident bytes: ``FluxTransformer2DModel`` with the real FLUX.1-dev config (shipped in
   ``genrefocus_core/configs``) is built on the ``meta`` device; bytes per mode follow from each
   tensor's element count and storage format (:func:`resident_bytes`): ``full`` bf16; ``fp8`` the
   Linear weights/biases that :func:`genrefocus_core.memory.fp8_targets` names in fp8, the rest bf16;
   ``nf4`` those weights at 4 bits + double-quantised absmax (bitsandbytes), biases bf16; GGUF Q8_0 /
   Q4_K the 2-D Linear weights at 34/32 and 144/256 bytes per value, the rest bf16 (as
   performance.md); streamed modes keep on the GPU only the stem (embedders, final layer) and two
   blocks (the running one and the prefetched next one). Plus the FLUX VAE (bf16), the active
   LoRA (rank ``--lora-rank``) and the two cached prompts.
2. Activation peaks: :class:`LiveBytes`, a dispatch-mode tracker of live tensor storages, runs
   :func:`genrefocus_core.flux_lora.flux_forward` on meta tensors (bf16) with a flash-style
   attention stand-in (output only, no N x N buffer); weights are excluded, except the bf16 copy of
   one Linear that fp8 layerwise casting makes while the layer runs (measured by applying the real
   hooks on the meta model). Layouts: 1 MP untiled, 1 MP and 4K tiled (512 px tiles, ``tile_batch``
   per forward; every tile chunk is alike, the image size only adds the latent accumulators), the
   VAE decode at 1 MP untiled and 4K in 1024 px tiles. The fast mode's condition cache (0.70 MB per
   condition token) is listed apart.
3. Peak = transformer + VAE + LoRA + prompts resident, + the larger of the transformer's and the
   VAE's activation peak, + 0.5 GB for the CUDA context and cuBLAS workspaces (an assumption). Targets
   (issue 5): <= 16 GB at 1 MP in fp8 mode, <= 10 GB with NF4/Q4_K or streamed offload.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genrefocus_core.conditions import ConditionTokens, latent_image_ids  # noqa: E402
from genrefocus_core.flux_lora import flux_forward, lora_target_modules  # noqa: E402
from genrefocus_core.loading import FLUX_DEV_CONFIG  # noqa: E402
from genrefocus_core.memory import FP8_SKIP_PATTERNS, fp8_targets  # noqa: E402
from genrefocus_core.models import FLUX_VAE_CONFIG  # noqa: E402
from genrefocus_core.sampler import TileLayout  # noqa: E402

GB, GIB = 1e9, 2**30
CONTEXT_BYTES = 0.5e9  # CUDA context + cuBLAS workspaces (assumption, performance.md §2)
PROMPT_BYTES = 2 * 512 * 4096 * 2  # both cached T5 embeddings in bf16 (CLIP pooled: negligible)
TEXT_TOKENS = 512
SIZES = {"1 MP": (1024, 1024), "4K": (3840, 2160)}  # (width, height) px
#: bytes per value of the 2-D Linear weights in each storage format
PER_VALUE = {"bf16": 2.0, "fp8": 1.0, "q8_0": 34 / 32, "q4_k": 144 / 256,
             "nf4": 0.5 + 1 / 64 + 4 / (64 * 256)}  # 4 bit + 8-bit absmax per 64 + fp32 per 256 blocks
MODES = ("full", "fp8", "gguf_q8_0", "gguf_q4_k", "nf4", "offload", "fp8_offload")


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def flux_meta(config: dict | None = None, dtype: torch.dtype = torch.bfloat16):
    """``FluxTransformer2DModel`` with FLUX.1-dev's (or ``config``'s) sizes on the meta device."""
    from diffusers import FluxTransformer2DModel

    cfg = {k: v for k, v in (config or FLUX_DEV_CONFIG).items() if not k.startswith("_")}
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(cfg).to(dtype)


def _nbytes(t: torch.Tensor, per_value: float) -> float:
    return t.numel() * per_value


def resident_bytes(model, mode: str) -> float:
    """Bytes of the transformer's weights on the compute device in ``mode`` (see the module doc)."""
    targets = set(fp8_targets(model, FP8_SKIP_PATTERNS))
    storage = {"full": "bf16", "fp8": "fp8", "gguf_q8_0": "q8_0", "gguf_q4_k": "q4_k", "nf4": "nf4",
               "offload": "bf16", "fp8_offload": "fp8"}[mode]

    def module_bytes(mod, prefix: str = "") -> float:
        total = 0.0
        for name, p in mod.named_parameters():
            full = f"{prefix}{name}"
            owner, kind = full.rsplit(".", 1)
            if storage in ("fp8",) and owner in targets:
                total += _nbytes(p, 1.0)
            elif storage in ("nf4", "q8_0", "q4_k") and owner in targets and kind == "weight" and p.ndim == 2:
                total += _nbytes(p, PER_VALUE[storage])
            else:
                total += _nbytes(p, 2.0)
        return total

    if not mode.endswith("offload"):
        return module_bytes(model)
    blocks = [(f"transformer_blocks.{i}.", b) for i, b in enumerate(model.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}.", b) for i, b in enumerate(model.single_transformer_blocks)]
    sizes = [module_bytes(b, p) for p, b in blocks]
    stem = module_bytes(model) - sum(sizes)
    return stem + max(a + b for a, b in itertools.pairwise(sizes))  # running + prefetched block


def lora_bytes(model, rank: int) -> float:
    """One Genfocus LoRA of rank ``rank`` in bf16 (``r (in + out)`` values per target Linear)."""
    mods = dict(model.named_modules())
    return sum(rank * (mods[m].in_features + mods[m].out_features) * 2 for m in lora_target_modules(model))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and alive at the same time.

    Storages that exist before (weights, inputs) are not counted; views share their storage's count.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, list[int]] = {}
        self._excluded = {t.untyped_storage()._cdata for t in exclude}

    def _release(self, key: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        res = func(*args, **(kwargs or {}))
        for t in tree_flatten(res)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in self._excluded:
                continue
            if key in self._refs:
                self._refs[key][1] += 1
            else:
                self._refs[key] = [t.untyped_storage().nbytes(), 1]
                self.live += self._refs[key][0]
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._release, key)
        return res


@contextmanager
def flash_attention_stand_in():
    """``F.scaled_dot_product_attention`` that allocates only its output (a flash kernel's footprint)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def forward_peak(model, h: int, w: int, n_cond: int, batch: int = 1) -> int:
    """Activation peak (bytes) of one multi-stream forward: ``batch`` images of ``h x w`` tokens."""
    dev, dt = torch.device("meta"), torch.bfloat16
    ids = latent_image_ids(h, w, device=dev)
    inputs = [torch.empty(batch, h * w, 64, device=dev, dtype=dt) for _ in range(n_cond + 1)]
    emb = torch.empty(1, TEXT_TOKENS, 4096, device=dev, dtype=dt)
    pooled = torch.empty(1, 768, device=dev, dtype=dt)
    conds = [ConditionTokens(t, ids, None) for t in inputs[1:]]
    weights = [*model.parameters(), *model.buffers()]
    with flash_attention_stand_in(), torch.no_grad(), LiveBytes([*weights, *inputs, emb, pooled, ids]) as lb:
        flux_forward(model, inputs[0], ids, torch.ones(1, device=dev), prompt_embeds=emb, pooled=pooled,
                     guidance=3.5, conditions=conds)
    return lb.peak


def vae_decode_peak(width: int, height: int, tile: int | None) -> int:
    """Activation peak of the FLUX VAE decoding a ``width x height`` image (bf16), untiled or tiled."""
    from diffusers import AutoencoderKL

    from genrefocus_core.memory import vae_tiling

    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in FLUX_VAE_CONFIG.items() if not k.startswith("_")})
    vae = vae.to(torch.bfloat16)
    z = torch.empty(1, 16, height // 8, width // 8, device="meta", dtype=torch.bfloat16)
    with flash_attention_stand_in(), torch.no_grad(), vae_tiling(vae, tile is not None, tile or 1024), \
            LiveBytes([*vae.parameters(), z]) as lb:
        vae.decode(z)
    return lb.peak


def cast_transient(model) -> int:
    """Bytes of the largest fp8 target Linear in bf16: what layerwise casting adds while it runs."""
    return max(model.get_submodule(n).weight.numel() * 2 for n in fp8_targets(model))


def tables(lora_rank: int = 8, tile_batch: int = 4) -> dict:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting meta models to bf16 warns about fp32 modules: none
    model = flux_meta()
    n_params = sum(p.numel() for p in model.parameters())
    res = {m: resident_bytes(model, m) for m in MODES}
    lora = lora_bytes(model, lora_rank)
    with torch.device("meta"):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config({k: v for k, v in FLUX_VAE_CONFIG.items() if not k.startswith("_")})
    vae_bytes = sum(p.numel() for p in vae.parameters()) * 2
    out(f"## Resident weights on the GPU (GB = 1e9 B), FLUX.1-dev {n_params / 1e9:.3f} B parameters")
    out()
    out(f"| mode | transformer | + VAE, active LoRA (r = {lora_rank}), prompts | performance.md |")
    out("|---|---|---|---|")
    doc = {"full": "23.80", "fp8": "11.90", "gguf_q8_0": "12.65", "gguf_q4_k": "6.70",
           "nf4": "6.70 (6.14 dq)", "offload": "0.53 (diffusers, leaf)", "fp8_offload": "-"}
    extra = vae_bytes + lora + PROMPT_BYTES
    for m in MODES:
        out(f"| {m} | {res[m] / GB:.2f} | {(res[m] + extra) / GB:.2f} | {doc[m]} |")
    out()
    # activation peaks
    acts = {}
    for stage, n_cond in (("deblur", 1), ("bokeh", 2)):
        acts[("1 MP untiled", stage)] = forward_peak(model, 64, 64, n_cond)
        acts[("tile x1", stage)] = forward_peak(model, 32, 32, n_cond)
        acts[(f"tile x{tile_batch}", stage)] = forward_peak(model, 32, 32, n_cond, batch=tile_batch)
    vae_peaks = {"1 MP untiled": vae_decode_peak(1024, 1024, None),
                 "4K tiled": vae_decode_peak(3840, 2160, 1024)}
    model_fp8 = flux_meta()
    transient = cast_transient(model_fp8)
    out("## Activation peaks (GiB), bf16, flash-style attention, weights excluded")
    out()
    out("| layout | deblur | bokeh | performance.md (deblur / bokeh) |")
    out("|---|---|---|---|")
    ref = {"1 MP untiled": "0.94 / 1.28", "tile x1": "0.30 / 0.36", f"tile x{tile_batch}": "-"}
    for lay in ("1 MP untiled", "tile x1", f"tile x{tile_batch}"):
        out(f"| {lay} | {acts[(lay, 'deblur')] / GIB:.2f} | {acts[(lay, 'bokeh')] / GIB:.2f} | {ref[lay]} |")
    out(f"| VAE decode 1 MP untiled | {vae_peaks['1 MP untiled'] / GIB:.2f} | | |")
    out(f"| VAE decode 4K, 1024 px tiles | {vae_peaks['4K tiled'] / GIB:.2f} | | |")
    out(f"| fp8 layerwise cast (largest Linear in bf16) | {transient / GIB:.3f} | | |")
    out()
    # peaks per mode and layout
    rows = []
    out(f"## Peak GPU memory per image (GB): BokehNet (the larger stage), tiles batched by {tile_batch}")
    out()
    out("| mode | 1 MP tiled | 1 MP untiled | 4K tiled | 1 MP tiled + fast cache on the GPU | target |")
    out("|---|---|---|---|---|---|")
    cache_per_tile = 57 * 2 * 3072 * 2 * 1024 * 2  # bf16 K+V, 57 layers, 2 conditions x 1024 tokens
    for m in MODES:
        base = res[m] + extra + CONTEXT_BYTES + (transient if "fp8" in m else 0)
        tiled = base + max(acts[(f"tile x{tile_batch}", "bokeh")], vae_peaks["1 MP untiled"])
        untiled = base + max(acts[("1 MP untiled", "bokeh")], vae_peaks["1 MP untiled"])
        lay4k = TileLayout(2160 // 16, 3840 // 16)
        latents_4k = 4 * lay4k.height * lay4k.width * 64 * 4  # latents, accumulators, 2 condition token maps
        k4 = base + max(acts[(f"tile x{tile_batch}", "bokeh")], vae_peaks["4K tiled"]) + latents_4k
        tiled_cache = tiled + 9 * cache_per_tile
        target = {"fp8": "<= 16 (1 MP)", "gguf_q4_k": "<= 10", "nf4": "<= 10", "offload": "<= 10",
                  "fp8_offload": "<= 10"}.get(m, "")
        out(f"| {m} | {tiled / GB:.1f} | {untiled / GB:.1f} | {k4 / GB:.1f} | {tiled_cache / GB:.1f} | "
            f"{target} |")
        rows.append({"mode": m, "resident": res[m], "peak_1mp_tiled": tiled, "peak_1mp_untiled": untiled,
                     "peak_4k_tiled": k4, "peak_1mp_tiled_cache": tiled_cache})
    out()
    n4k = len(TileLayout(135, 240))
    out(f"Fast-mode condition cache: {cache_per_tile / 2 / 1024 / 1e6:.2f} MB per condition token; "
        f"{cache_per_tile / GB:.2f} GB per 512 px BokehNet tile; 1 MP (9 tiles) "
        f"{9 * cache_per_tile / GB:.1f} GB, 4K ({n4k} tiles) {n4k * cache_per_tile / GB:.1f} GB: "
        "use condition_cache=cpu (host memory, streamed per layer) below 24 GB.")
    return {"params": n_params, "resident": res, "lora": lora, "vae": vae_bytes,
            "activations": {f"{k[0]}|{k[1]}": v for k, v in acts.items()}, "vae_peaks": vae_peaks,
            "fp8_cast_transient": transient, "peaks": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the resident Genfocus LoRA")
    p.add_argument("--tile-batch", type=int, default=4, help="tiles per forward")
    a = p.parse_args(argv)
    results = tables(a.lora_rank, a.tile_batch)
    if a.json is not None:
        a.json.write_text(json.dumps(results, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
