"""Shared test configuration: paths to the repo and to ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def pytest_collection_modifyitems(config, items):
    """Real-ComfyUI tests (marker ``comfy``) need COMFYUI_PATH; GPU tests need CUDA."""
    skip_comfy = pytest.mark.skip(reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to a ComfyUI checkout")
    for item in items:
        if "comfy" in item.keywords and not os.environ.get("COMFYUI_PATH"):
            item.add_marker(skip_comfy)
        if "gpu" in item.keywords:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout; tests using it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present beside the checkout")
    return SHARED
