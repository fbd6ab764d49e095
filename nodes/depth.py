"""Depth nodes: read any depth IMAGE with an explicit interpretation."""

from __future__ import annotations

from comfy_api.latest import io

from ..genrefocus_core.defocus import disparity_preview
from ..genrefocus_core.depth import DEPTH_INTERPRETATIONS, depth_map_from_image
from ._glue import bchw_to_image, check_combo, image_to_bchw, user_errors
from .sockets import Depth

NAME = "Depth from Image"


class DepthFromImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_DepthFromImage",
            display_name=NAME,
            category="GenRefocus/depth",
            description=(
                "Use a depth map from any depth node or file. Say what its values mean: metric depth in "
                "metres (Depth Pro style; K is then in px*m as in Genfocus), relative disparity (near = "
                "bright, most depth nodes) or relative depth (near = dark). Colour-mapped previews are "
                "refused: they are not monotonic in depth."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Grey depth map (all channels equal)."),
                io.Combo.Input(
                    "interpretation",
                    options=list(DEPTH_INTERPRETATIONS),
                    default="relative_disparity",
                    tooltip="metric_depth: metres; relative_disparity: near = bright; "
                    "relative_depth: near = dark.",
                ),
                io.Boolean.Input(
                    "invert",
                    default=False,
                    tooltip="Flip near and far of a relative map (not allowed for metres).",
                ),
                io.Float.Input(
                    "metric_scale",
                    default=1.0,
                    min=1e-6,
                    max=1e6,
                    step=0.01,
                    tooltip="metric_depth only: metres per unit of the image value.",
                ),
            ],
            outputs=[Depth.Output(display_name="depth"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(cls, image, interpretation: str, invert: bool, metric_scale: float) -> io.NodeOutput:
        check_combo(NAME, "interpretation", interpretation, DEPTH_INTERPRETATIONS)
        with user_errors(NAME):
            depth = depth_map_from_image(
                image_to_bchw(image, node=NAME), interpretation, invert=invert, metric_scale=metric_scale
            )
        return io.NodeOutput(depth, bchw_to_image(disparity_preview(depth.disparity)))
