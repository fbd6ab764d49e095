"""Import the repository as one ComfyUI custom-node package, as ComfyUI does.

With ``COMFYUI_PATH`` set, the real ``comfy_api`` / ``comfy`` of that checkout are used; otherwise
the small stand-in in ``tests/_comfy_stub``. The pack is imported under the name ``genrefocus_pack``;
node tests take every class (errors included) from that package, never from top-level
``genrefocus_core``, so exception types are the ones the nodes raise.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "genrefocus_pack"


def _setup_comfy() -> str:
    comfy_path = os.environ.get("COMFYUI_PATH")
    if comfy_path:
        sys.path.insert(0, comfy_path)
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        return "real"
    sys.path.insert(0, str(REPO / "tests" / "_comfy_stub"))
    return "stub"


COMFY_KIND = _setup_comfy()


def _import_pack():
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def comfy_pack():
    """The repository imported as a custom-node package (``genrefocus_pack``)."""
    return _import_pack()


@pytest.fixture(scope="session")
def nodes(comfy_pack):
    """``{node_id: class}`` of every registered node."""
    import asyncio

    ext = asyncio.run(comfy_pack.comfy_entrypoint())
    classes = asyncio.run(ext.get_node_list())
    return {c.define_schema().node_id: c for c in classes}


@pytest.fixture(scope="session")
def errors(comfy_pack):
    """The pack's own ``genrefocus_core.errors`` module."""
    return importlib.import_module(f"{PACK_NAME}.genrefocus_core.errors")
