"""Tier 3 (live, opt-in): our pack inside a real ComfyUI server; every shipped workflow runs.

Needs COMFYUI_PATH (a ComfyUI checkout) and COMFYUI_PYTHON (its interpreter), and the marker:
``COMFYUI_PATH=... COMFYUI_PYTHON=... python -m pytest tests/workflows -m comfy``.
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
TWINS = sorted((REPO / "tests" / "data").glob("*.api.json"))


@pytest.fixture(scope="module")
def live():
    from genrefocus_core.defocus import disparity_preview
    from genrefocus_core.imageio import save_image
    from genrefocus_core.scenes import demo_scene

    with LiveComfy(extra_args=["--cache-none"]) as server:
        image, disparity, _ = demo_scene(200, 320)
        save_image(server.input_dir / "demo_input.png", image)
        save_image(server.input_dir / "demo_disparity.png", disparity_preview(disparity))
        yield server


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
