"""Tier 3 (live, opt-in): our pack inside a real ComfyUI server; every shipped workflow runs.

Needs COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its interpreter), and the marker:
``COMFYUI_PATH=... COMFYUI_PYTHON=... python -m pytest tests/workflows -m comfy``.

The generative workflows name the real model files users have (flux1-dev.safetensors, ...). For
the live run, the tiny FLUX of ``../shared/fixtures/genfocus-parity`` is placed in the server's
models folders (LoRAs and prompt embeddings under the workflows' file names, the transformer and
VAE as a diffusers folder, a tiny Depth Anything as the depth model) and the API twin's file-name
inputs are pointed at them before submitting; those workflows are skipped without the fixture.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("live ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _live_comfy import LiveComfy, PromptRejected  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = json.loads((REPO / "tests" / "data" / "schemas.json").read_text())
# refocus_native runs in test_live_native.py (it needs tiny ComfyUI-format FLUX/VAE files)
TWINS = sorted(p for p in (REPO / "tests" / "data").glob("*.api.json") if p.name != "refocus_native.api.json")
FIXTURE = REPO.parent / "shared" / "fixtures" / "genfocus-parity"
GENERATIVE = {"GenRefocus_ModelLoader", "GenRefocus_DeblurNet", "GenRefocus_BokehNet", "GenRefocus_Refocus"}
TINY_FLUX = "diffusers/tiny-flux"
TINY_DEPTH = "TinyDepthAnything"


def _place_tiny_models(models: Path) -> None:
    """The fixture FLUX, LoRAs and prompts under the workflows' names, and a tiny depth model."""
    (models / "diffusers").mkdir(parents=True, exist_ok=True)
    os.symlink(FIXTURE / "model", models / "diffusers" / "tiny-flux", target_is_directory=True)
    (models / "loras" / "genfocus").mkdir(parents=True, exist_ok=True)
    for name in ("deblurNet", "bokehNet", "deblurNet_with_pre_deblur"):
        target = models / "loras" / "genfocus" / f"{name}.safetensors"
        os.symlink(FIXTURE / "lora" / f"{name}.safetensors", target)
    (models / "genrefocus").mkdir(parents=True, exist_ok=True)
    os.symlink(FIXTURE / "inputs" / "prompt_embeds.safetensors",
               models / "genrefocus" / "genfocus_prompts.safetensors")
    import torch
    import transformers

    torch.manual_seed(0)
    backbone = dict(model_type="dinov2", image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4,
                    num_attention_heads=2, intermediate_size=32, out_indices=[1, 2, 3, 4],
                    reshape_hidden_states=False)
    cfg = transformers.DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
                                           neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                                           head_hidden_size=8)
    transformers.DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(models / "depth" / TINY_DEPTH)


def _use_tiny_models(graph: dict) -> dict:
    """Point the API twin's model inputs at the tiny files; fewer steps keep the run short."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "GenRefocus_ModelLoader":
            inputs["transformer"] = inputs["vae"] = TINY_FLUX
        elif node["class_type"] == "GenRefocus_DepthModelLoader":
            inputs["model_name"] = TINY_DEPTH
        if node["class_type"] in GENERATIVE and "steps" in inputs:
            inputs["steps"] = 4
    return graph


@pytest.fixture(scope="module")
def live():
    from genrefocus_core.defocus import disparity_preview
    from genrefocus_core.imageio import save_image
    from genrefocus_core.scenes import demo_scene

    with LiveComfy(extra_args=["--cache-none"]) as server:
        image, disparity, _ = demo_scene(200, 320)
        save_image(server.input_dir / "demo_input.png", image)
        save_image(server.input_dir / "demo_disparity.png", disparity_preview(disparity))
        _write_camera_inputs(server.input_dir, image, disparity)
        if (FIXTURE / "model").is_dir():
            _place_tiny_models(server.models_dir)
        yield server


def _write_camera_inputs(folder: Path, image, disparity) -> None:
    """camera_refocus' inputs: the demo photo as a JPEG with EXIF (85 mm f/8, full frame) and a
    metric depth PNG (grey x 10 = metres, about 1 to 8.5 m)."""
    from PIL import Image

    def pil(t):
        return Image.fromarray((t[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "GenRefocus", "demo camera"
    ifd = exif.get_ifd(0x8769)
    ifd[0x920A], ifd[0x829D], ifd[0xA405] = 85.0, 8.0, 85
    pil(image).save(folder / "camera_photo.jpg", quality=95, exif=exif)
    depth_m = 1.0 / (0.1 + 0.9 * disparity)
    pil((depth_m / 10.0).expand(-1, 3, -1, -1)).save(folder / "camera_depth.png")


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    return struct.unpack(">II", data[16:24])


def test_our_nodes_are_registered_with_their_schemas(live):
    info = live.object_info()
    for node_id, schema in SCHEMAS.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        entry = info[node_id]
        assert entry["python_module"] == "custom_nodes.genrefocus"
        order = entry["input_order"]
        names = order.get("required", []) + order.get("optional", [])
        assert names == [i["id"] for i in schema["inputs"]], node_id
        assert entry["output"] == schema["outputs"], node_id


@pytest.mark.parametrize("twin", TWINS, ids=lambda p: p.name)
def test_workflow_runs_end_to_end(live, twin):
    graph = json.loads(twin.read_text())
    if any(n["class_type"] in GENERATIVE for n in graph.values()):
        if not (FIXTURE / "model").is_dir():
            pytest.skip("generative workflows need ../shared/fixtures/genfocus-parity (the tiny FLUX)")
        graph = _use_tiny_models(graph)
    entry = live.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = [
        img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"
    ]
    assert saved, entry["outputs"]
    for img in saved:
        path = live.output_dir / img["subfolder"] / img["filename"]
        assert _png_size(path) == (320, 200)


def test_bad_combo_value_is_reported_by_our_node(live):
    graph = json.loads((REPO / "tests" / "data" / "classical_refocus.api.json").read_text())
    bad = copy.deepcopy(graph)
    node_id = next(k for k, v in bad.items() if v["class_type"] == "GenRefocus_ClassicalBokeh")
    bad[node_id]["inputs"]["mode"] = "fancy"
    entry = live.run(bad)
    assert entry["status"]["status_str"] == "error"
    errors = live.status_messages(entry, "execution_error")
    assert errors and errors[0]["node_type"] == "GenRefocus_ClassicalBokeh"
    assert errors[0]["exception_message"].startswith("[Classical Bokeh] mode must be one of")
    assert errors[0]["exception_type"].endswith("GenRefocusInputError")


def test_out_of_range_widget_is_rejected_by_the_server(live):
    graph = json.loads((REPO / "tests" / "data" / "classical_refocus.api.json").read_text())
    node_id = next(k for k, v in graph.items() if v["class_type"] == "GenRefocus_DefocusMap")
    graph[node_id]["inputs"]["k"] = -5.0
    with pytest.raises(PromptRejected) as exc:
        live.submit(graph)
    assert exc.value.error_type == "prompt_outputs_failed_validation"
    assert node_id in exc.value.node_errors


def test_missing_model_file_is_reported_with_its_folder(live):
    if not (FIXTURE / "model").is_dir():
        pytest.skip("needs ../shared/fixtures/genfocus-parity")
    graph = json.loads((REPO / "tests" / "data" / "deblur.api.json").read_text())
    entry = live.run(graph)  # names flux1-dev.safetensors, which this server does not have
    assert entry["status"]["status_str"] == "error"
    errors = live.status_messages(entry, "execution_error")
    assert errors and errors[0]["node_type"] == "GenRefocus_ModelLoader"
    msg = errors[0]["exception_message"]
    assert msg.startswith("[Load Genfocus Models] transformer must be one of the files found")
    assert "'flux1-dev.safetensors'" in msg and "models/diffusion_models/" in msg


def test_refocus_previews_reach_the_client(live):
    if not (FIXTURE / "model").is_dir():
        pytest.skip("needs ../shared/fixtures/genfocus-parity")
    graph = _use_tiny_models(json.loads((REPO / "tests" / "data" / "refocus.api.json").read_text()))
    entry = live.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    previews = [k for k, v in graph.items() if v["class_type"] == "PreviewImage"]
    assert len(previews) == 2  # all-in-focus image and conditioning map
    for node_id in previews:
        images = entry["outputs"][node_id]["images"]
        assert images and images[0]["type"] == "temp"


def test_camera_k_feeds_the_defocus_map(live):
    """Read Camera EXIF -> Camera Settings (f/1.4) -> K from Camera -> Defocus Map's k, in a real server."""
    from PIL import Image

    exif = Image.Exif()
    ifd = exif.get_ifd(0x8769)
    ifd[0x920A], ifd[0x829D], ifd[0xA405] = 50.0, 8.0, 75  # 50 mm f/8 on APS-C (crop 1.5)
    Image.new("RGB", (320, 200), (90, 120, 150)).save(live.input_dir / "camera.jpg", exif=exif)
    graph = json.loads((REPO / "tests" / "data" / "classical_refocus.api.json").read_text())
    ids = {v["class_type"]: k for k, v in graph.items()}
    graph[ids["GenRefocus_DepthFromImage"]]["inputs"].update(interpretation="metric_depth", metric_scale=5.0)
    graph["100"] = {"class_type": "GenRefocus_ReadCameraEXIF", "inputs": {"image": "camera.jpg",
                                                                          "sensor_width_mm": 0.0}}
    graph["101"] = {"class_type": "GenRefocus_CameraSettings",
                    "inputs": {"camera": ["100", 0], "f_number": 1.4, "focal_length_mm": 0.0,
                               "sensor": "from camera input", "sensor_width_mm": 36.0}}
    graph["102"] = {"class_type": "GenRefocus_KFromCamera",
                    "inputs": {"camera": ["101", 0], "depth": [ids["GenRefocus_DepthFromImage"], 0],
                               "focus": [ids["GenRefocus_FocusPoint"], 0]}}
    graph[ids["GenRefocus_DefocusMap"]]["inputs"]["k"] = ["102", 0]  # a FLOAT output into the k widget
    entry = live.run(graph, timeout=600)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert any(img["type"] == "output" for out in entry["outputs"].values() for img in out.get("images", []))
