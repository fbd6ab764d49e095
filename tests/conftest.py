"""Shared test configuration: paths to the repo and to ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GENFOCUS_FIXTURE = SHARED / "fixtures" / "genfocus-parity"


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


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread for a module: tiny models are all thread synchronisation, and on a busy
    2-core machine two threads run them ~30x slower. Use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def fx() -> Path:
    """``../shared/fixtures/genfocus-parity`` (tiny random FLUX, LoRAs, official cases); skip when absent."""
    if not (GENFOCUS_FIXTURE / "model").is_dir():
        pytest.skip("../shared/fixtures/genfocus-parity is not present beside the checkout")
    return GENFOCUS_FIXTURE
