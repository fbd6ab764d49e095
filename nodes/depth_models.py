"""Depth estimation node: a loaded Depth Pro / Depth Anything V2 model on an IMAGE batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from comfy_api.latest import io

from ..genrefocus_core.defocus import disparity_preview
from ..genrefocus_core.depth_models import DepthModel as CoreDepthModel
from ..genrefocus_core.errors import GenRefocusInputError
from ._glue import bchw_to_image, image_to_bchw, progress, user_errors
from .sockets import Depth, DepthModel

NAME = "Estimate Depth"

# Working memory asked of ComfyUI besides the weights (activations of one frame); a heuristic
# sized for Depth Pro's 1536 px input in half precision.
_WORKSPACE_BYTES = 1024**3


@contextlib.contextmanager
def _on_compute_device(model: CoreDepthModel) -> Iterator[None]:
    """Run ``model`` on ComfyUI's device, following comfyui.md section 5.

    The model lives outside ComfyUI's model manager, so room is made first (``free_memory`` evicts
    resident ComfyUI models such as a FLUX), and afterwards the weights go back to the offload
    device and the cache is emptied, also when the run fails or is interrupted.
    """
    import comfy.model_management as mm

    device = mm.get_torch_device()
    mm.free_memory(2 * model.memory_bytes(device) + _WORKSPACE_BYTES, device)
    model.to(device)
    try:
        yield
    finally:
        model.to(mm.unet_offload_device())
        mm.soft_empty_cache()


class EstimateDepth(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_EstimateDepth",
            display_name=NAME,
            category="GenRefocus/depth",
            description=(
                "Estimate depth for every frame with a loaded depth model. Depth Pro gives metric depth "
                "(disparity in 1/m, as Genfocus' K expects) and the focal length in px; Depth Anything V2 "
                "gives relative disparity in [0, 1] (near = 1). The preview is the disparity, near = white."
            ),
            inputs=[
                io.Image.Input("image", tooltip="RGB frames in [0, 1]; each frame is estimated on its own."),
                DepthModel.Input("depth_model", tooltip="From Load Depth Model."),
                io.Float.Input("focal_px", default=0.0, min=0.0, max=1e6, step=1.0, optional=True,
                               tooltip="Focal length of the photo in px when known (focal mm x image "
                                       "width px / sensor width mm): Depth Pro uses it for the metric "
                                       "scale instead of its own estimate. 0 = estimate it."),
            ],
            outputs=[Depth.Output(display_name="depth"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, image, depth_model: CoreDepthModel, focal_px: float = 0.0) -> io.NodeOutput:
        if not isinstance(depth_model, CoreDepthModel):
            raise GenRefocusInputError(
                f"[{NAME}] depth_model must come from Load Depth Model, got {type(depth_model).__name__}"
            )
        frames = image_to_bchw(image, node=NAME)
        with user_errors(NAME), _on_compute_device(depth_model):
            depth = depth_model.estimate(frames, focal_px=focal_px or None, on_step=progress(frames.shape[0]))
        return io.NodeOutput(depth, bchw_to_image(disparity_preview(depth.disparity)))
