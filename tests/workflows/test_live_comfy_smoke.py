"""Live smoke test: a real ComfyUI starts with this pack installed and answers /object_info.

Opt-in: set COMFYUI_PATH (and COMFYUI_PYTHON) and select the marker, e.g.

    COMFYUI_PATH=/work/comfyui COMFYUI_PYTHON=/work/comfy-venv/bin/python \\
        python -m pytest tests/workflows/test_live_comfy_smoke.py -m comfy -v
"""

import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfy

if not os.environ.get("COMFYUI_PATH"):
    pytest.skip("live ComfyUI tests need COMFYUI_PATH", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _live_comfy import LiveComfy  # noqa: E402


@pytest.fixture(scope="module")
def live():
    with LiveComfy() as server:
        yield server


def test_object_info_lists_core_and_our_nodes(live):
    info = live.object_info()
    assert isinstance(info, dict)
    assert "LoadImage" in info, sorted(info)[:20]
    ours = {k: v for k, v in info.items() if k.startswith("GenRefocus_")}
    for node_id, entry in ours.items():
        assert "genrefocus" in entry.get("python_module", ""), (node_id, entry.get("python_module"))
