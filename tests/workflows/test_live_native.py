"""Tier 3 (live, opt-in): the native workflow (``workflows/refocus_native.json``) in a real ComfyUI.

ComfyUI's standard loaders read the model files the workflow names, written by this test into
the isolated server's model folders with random weights: ``diffusion_models/flux1-dev.safetensors``
(a FLUX with FLUX.1-dev's widths — ComfyUI's detection fixes them — but 1 double and 1 single
block, bf16, ~1 GB), ``vae/ae.safetensors`` (FLUX.1's VAE architecture), rank-2 Genfocus LoRAs
for that model under ``loras/genfocus/``, cached prompt embeddings (8 tokens) and a tiny Depth
Anything. Needs COMFYUI_PATH (and COMFYUI_PYTHON) and ``-m comfy``.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.comfy, pytest.mark.slow]

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("live ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _live_comfy import LiveComfy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TWIN = REPO / "tests" / "data" / "refocus_native.api.json"
TINY_DEPTH = "TinyDepthAnything"
WIDTH, HEIGHT = 64, 48


def _flux_files(models: Path) -> None:
    """FLUX.1-dev-wide random FLUX (1 + 1 blocks) in BFL keys, and rank-2 LoRAs for it."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    from genrefocus_core.flux_convert import diffusers_to_bfl
    from genrefocus_core.flux_lora import lora_target_modules
    from genrefocus_core.loading import FLUX_DEV_CONFIG

    cfg = {k: v for k, v in FLUX_DEV_CONFIG.items() if not k.startswith("_")} | {
        "num_layers": 1,
        "num_single_layers": 1,
    }
    with torch.device("meta"):
        meta = FluxTransformer2DModel.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, p in meta.state_dict().items():
        if name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
            t = torch.ones(p.shape)
        elif name.endswith(".bias"):
            t = torch.zeros(p.shape)
        else:  # fan-in scaled, so activations keep a unit scale through the blocks
            t = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        sd[name] = t.to(torch.bfloat16)
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    save_file(diffusers_to_bfl(sd), str(models / "diffusion_models" / "flux1-dev.safetensors"))
    mods = {n: m for n, m in meta.named_modules() if isinstance(m, torch.nn.Linear)}
    (models / "loras" / "genfocus").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("deblurNet", "bokehNet")):
        g = torch.Generator().manual_seed(10 + i)
        lora = {}
        for m in lora_target_modules(meta):
            lin = mods[m]
            lora[f"transformer.{m}.lora_A.weight"] = torch.randn(2, lin.in_features, generator=g) * 0.02
            lora[f"transformer.{m}.lora_B.weight"] = torch.randn(lin.out_features, 2, generator=g) * 0.02
        save_file(lora, str(models / "loras" / "genfocus" / f"{name}.safetensors"))


def _other_files(models: Path) -> None:
    import torch
    import transformers
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from genrefocus_core.models import FLUX_VAE_CONFIG
    from genrefocus_core.prompts import BOKEH_PROMPT, DEBLUR_PROMPT, PromptEmbedding, save_prompt_embeddings

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config({k: v for k, v in FLUX_VAE_CONFIG.items() if not k.startswith("_")})
    (models / "vae").mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()},
        str(models / "vae" / "ae.safetensors"),
    )
    g = torch.Generator().manual_seed(1)
    prompts = {
        n: PromptEmbedding(p, torch.randn(1, 8, 4096, generator=g), torch.randn(1, 768, generator=g))
        for n, p in (("deblur", DEBLUR_PROMPT), ("bokeh", BOKEH_PROMPT))
    }
    save_prompt_embeddings(models / "genrefocus" / "genfocus_prompts.safetensors", prompts)
    backbone = dict(
        model_type="dinov2",
        image_size=28,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    cfg = transformers.DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    transformers.DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(models / "depth" / TINY_DEPTH)


@pytest.fixture(scope="module")
def live():
    from genrefocus_core.imageio import save_image
    from genrefocus_core.scenes import demo_scene

    with LiveComfy(extra_args=["--cache-none"]) as server:
        save_image(server.input_dir / "demo_input.png", demo_scene(HEIGHT, WIDTH)[0])
        _flux_files(server.models_dir)
        _other_files(server.models_dir)
        yield server


def _graph(**refocus) -> dict:
    graph = json.loads(TWIN.read_text())
    graph = copy.deepcopy(graph)
    for node in graph.values():
        if node["class_type"] == "GenRefocus_DepthModelLoader":
            node["inputs"]["model_name"] = TINY_DEPTH
        if node["class_type"] == "GenRefocus_Refocus":
            node["inputs"].update({"steps": 2, **refocus})
    return graph


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def test_native_workflow_runs_end_to_end(live):
    """Standard loaders → Genfocus LoRAs on ComfyUI Model → Refocus, on the files the workflow names."""
    graph = _graph()
    assert {n["class_type"] for n in graph.values()} >= {
        "UNETLoader",
        "VAELoader",
        "GenRefocus_NativeModelLoader",
    }
    entry = live.run(graph, timeout=900)
    assert entry["status"]["status_str"] == "success", (entry["status"], live.log_tail(60))
    saved = [
        img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"
    ]
    assert len(saved) == 1 and _png_size(live.output_dir / saved[0]["subfolder"] / saved[0]["filename"]) == (
        WIDTH,
        HEIGHT,
    )
    previews = [k for k, v in graph.items() if v["class_type"] == "PreviewImage"]
    assert all(entry["outputs"][k]["images"] for k in previews)
    log = live.log_text()
    assert "Requested to load Flux" in log  # ComfyUI's model management loaded the MODEL


def test_missing_lora_file_is_reported_by_the_native_loader(live):
    graph = _graph()
    node_id = next(k for k, v in graph.items() if v["class_type"] == "GenRefocus_NativeModelLoader")
    graph[node_id]["inputs"]["bokeh_lora"] = "bokehNet.safetensors"  # not under genfocus/
    entry = live.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "error"
    errors = live.status_messages(entry, "execution_error")
    assert errors and errors[0]["node_type"] == "GenRefocus_NativeModelLoader"
    assert errors[0]["exception_message"].startswith(
        "[Genfocus LoRAs on ComfyUI Model] bokeh_lora must be one of the files found"
    )
