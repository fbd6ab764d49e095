"""The core library never imports ComfyUI, and stays light to import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "genrefocus_core"
FORBIDDEN = {"comfy", "comfy_api", "comfy_execution", "folder_paths", "server", "nodes", "execution"}


def test_core_imports_nothing_from_comfyui():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders, offenders


def test_renderer_import_does_not_pull_heavy_packages():
    code = (
        "import sys; import genrefocus_core.renderer, genrefocus_core.defocus, genrefocus_core.depth; "
        "bad = [m for m in ('diffusers', 'peft', 'transformers', 'comfy', 'comfy_api') if m in sys.modules]; "
        "print(bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=CORE.parent
    ).stdout.strip()
    assert out == "[]"
