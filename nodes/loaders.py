"""Loader nodes: the only module that touches ComfyUI's model folders (``folder_paths``).

Depth models are ``transformers``-format folders under the ``depth`` model key (default
``models/depth/<name>/``; more folders via ``extra_model_paths.yaml``). The key is registered here
if ComfyUI or another pack has not done so.
"""

from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from ..genrefocus_core.depth_models import DEPTH_MODEL_FOLDER_HINT, load_depth_model
from ..genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from ._glue import check_combo
from .sockets import DepthModel

if "depth" not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path("depth", os.path.join(folder_paths.models_dir, "depth"))

DEPTH_LOADER = "Load Depth Model"
DTYPES = ("auto", "fp32", "fp16", "bf16")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MAX_DEPTH = 4  # folder levels searched below each depth folder (e.g. depth/apple/DepthPro-hf)


def depth_model_folders() -> list[str]:
    """Model folders (holding a ``config.json``) under every ``depth`` folder, as ``/``-separated names."""
    found: set[str] = set()
    for root in folder_paths.get_folder_paths("depth"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            level = 0 if rel == "." else rel.count(os.sep) + 1
            if level and "config.json" in filenames:
                found.add(rel.replace(os.sep, "/"))
                dirnames[:] = []  # a model folder's subfolders are not models
            else:
                dirnames[:] = [] if level >= _MAX_DEPTH else [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def _depth_model_path(model_name: str) -> str:
    """Path of ``model_name`` in the first ``depth`` folder holding it; checked against the listing."""
    options = depth_model_folders()
    if model_name not in options:
        where = ", ".join(folder_paths.get_folder_paths("depth"))
        listed = ", ".join(options) if options else "none found"
        raise GenRefocusInputError(
            f"[{DEPTH_LOADER}] model_name must be a depth model folder in {where} ({listed}), got "
            f"{model_name!r}; {DEPTH_MODEL_FOLDER_HINT}"
        )
    for root in folder_paths.get_folder_paths("depth"):
        path = os.path.join(root, *model_name.split("/"))
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise GenRefocusInputError(f"[{DEPTH_LOADER}] model_name {model_name!r} disappeared while loading")


def _torch_dtype(dtype: str) -> torch.dtype:
    """``auto``: fp16 when ComfyUI computes on CUDA (as Depth Pro's reference code), else fp32."""
    if dtype != "auto":
        return _TORCH_DTYPES[dtype]
    import comfy.model_management as mm

    return torch.float16 if mm.get_torch_device().type == "cuda" else torch.float32


class DepthModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_DepthModelLoader",
            display_name=DEPTH_LOADER,
            category="GenRefocus/loaders",
            description=(
                "Load Depth Pro (metric depth and focal length) or Depth Anything V2 (relative disparity; "
                "metric variants in metres) from a transformers-format folder in models/depth/ "
                "(config.json + model.safetensors + preprocessor_config.json). Nothing is downloaded."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=depth_model_folders(),
                    tooltip="A folder under models/depth/ holding config.json and model.safetensors, e.g. "
                    "DepthPro (apple/DepthPro-hf) or Depth-Anything-V2-Large-hf.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="auto",
                    tooltip="Weights precision on the GPU; auto = fp16 on CUDA. The CPU always uses fp32.",
                ),
            ],
            outputs=[DepthModel.Output(display_name="depth_model")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str) -> io.NodeOutput:
        import comfy.model_management as mm

        check_combo(DEPTH_LOADER, "dtype", dtype, DTYPES)
        path = _depth_model_path(model_name)
        try:
            model = load_depth_model(path, dtype=_torch_dtype(dtype), device=mm.unet_offload_device())
        except GenRefocusModelError as e:
            raise GenRefocusModelError(f"[{DEPTH_LOADER}] {e}") from e
        return io.NodeOutput(model)
