"""Focus and defocus-map nodes."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..genrefocus_core.defocus import (
    FocusTarget,
    coc_preview,
    defocus_condition_map,
    defocus_map,
    mark_point,
    resize_like,
)
from ..genrefocus_core.errors import GenRefocusInputError
from ._glue import bchw_to_image, image_to_bchw, mask_to_b1hw, user_errors
from .sockets import Defocus, Depth, Focus

POINT = "Focus Point"
MASK = "Focus from Mask"
DEFOCUS = "Defocus Map"


class _FocusPreview(ui.PreviewImage):
    """The marked photo, plus the point it marks under ``genrefocus_point`` ([x, y], normalised).

    The click-to-focus extension (``web/focus_point.js``) reads the point to tell whether the
    widgets still match the last run ("queue to refocus here"). ComfyUI concatenates ui lists of
    list-mapped runs, so the value is a flat list; the first pair is the point of the first run.
    """

    def __init__(self, image, x: float, y: float, cls=None):
        super().__init__(image, cls=cls)
        self.point = [float(x), float(y)]

    def as_dict(self) -> dict:
        return {**super().as_dict(), "genrefocus_point": list(self.point)}


class FocusPoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_FocusPoint",
            display_name=POINT,
            category="GenRefocus/defocus",
            description=(
                "Focus on the depth under a point, given as fractions of the image width and height. Wire "
                "the photo into 'image' and run once: the node shows the photo with the point marked, and a "
                "click on it sets x and y (click to focus)."
            ),
            inputs=[
                io.Float.Input(
                    "x",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Horizontal position: 0 = left edge, 1 = right edge.",
                ),
                io.Float.Input(
                    "y",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip="Vertical position: 0 = top, 1 = bottom.",
                ),
                io.Image.Input("image", optional=True,
                               tooltip="The photo: shown in the node with the focus point marked; click on "
                               "it to move the point (x, y stay the values used)."),
            ],
            outputs=[Focus.Output(display_name="focus")],
        )

    @classmethod
    def execute(cls, x: float, y: float, image=None) -> io.NodeOutput:
        with user_errors(POINT):
            focus = FocusTarget("point", x=x, y=y)
            if image is None:
                return io.NodeOutput(focus)
            marked = bchw_to_image(mark_point(image_to_bchw(image, node=POINT), x, y))
            return io.NodeOutput(focus, ui=_FocusPreview(marked, x, y, cls=cls))


class FocusFromMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_FocusFromMask",
            display_name=MASK,
            category="GenRefocus/defocus",
            description=(
                "Focus on a subject: the median disparity inside the mask (white = in focus), as the "
                "official Genfocus CLI. Works with masks from any segmentation node; resized to the depth "
                "map with nearest-neighbour sampling."
            ),
            inputs=[
                io.Mask.Input("mask", tooltip="White = the subject to keep sharp."),
                io.Float.Input(
                    "threshold",
                    default=0.5,
                    min=0.0,
                    max=0.99,
                    step=0.01,
                    tooltip="Mask pixels above this value count as the subject.",
                ),
            ],
            outputs=[Focus.Output(display_name="focus")],
        )

    @classmethod
    def execute(cls, mask, threshold: float) -> io.NodeOutput:
        with user_errors(MASK):
            m = mask_to_b1hw(mask, node=MASK)
            if float(m.max()) <= threshold:
                raise GenRefocusInputError(
                    f"mask is empty (no pixel above threshold {threshold:g}); paint the subject in white "
                    "or use a Focus Point node"
                )
            return io.NodeOutput(FocusTarget("mask", mask=m, threshold=threshold))


class DefocusMapNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_DefocusMap",
            display_name=DEFOCUS,
            category="GenRefocus/defocus",
            description=(
                "Blur radius per pixel: K * (disparity - focus disparity) in pixels, positive in front of "
                "the focal plane. Outputs a colour preview (orange = in front, blue = behind, black = "
                "sharp) and the official Genfocus conditioning map clamp(|CoC| / 100, 0, 1)."
            ),
            inputs=[
                Depth.Input("depth"),
                io.Float.Input(
                    "k",
                    default=20.0,
                    min=0.0,
                    max=5000.0,
                    step=0.5,
                    tooltip="Blur strength. Metric depth: px*m, Genfocus' 0-50 slider (20 = demo "
                    "default; real lenses reach hundreds: 135 mm f/1.8 focused at 1.5 m on a 4K frame "
                    "is ~590, see K from Camera). Relative maps: the largest radius in px, as BokehMe (60).",
                ),
                Focus.Input("focus", optional=True, tooltip="Where to focus; default: the image centre."),
                io.Int.Input(
                    "width",
                    default=0,
                    min=0,
                    max=16384,
                    optional=True,
                    tooltip="Resize the map to this width (bilinear) to match your image; 0 = keep.",
                ),
                io.Int.Input(
                    "height",
                    default=0,
                    min=0,
                    max=16384,
                    optional=True,
                    tooltip="Resize the map to this height (bilinear); 0 = keep.",
                ),
            ],
            outputs=[
                Defocus.Output(display_name="defocus"),
                io.Image.Output(display_name="preview"),
                io.Image.Output(display_name="condition_map"),
            ],
        )

    @classmethod
    def execute(cls, depth, k: float, focus=None, width: int = 0, height: int = 0) -> io.NodeOutput:
        with user_errors(DEFOCUS):
            disparity = depth.disparity
            if (width > 0) != (height > 0):
                raise GenRefocusInputError(
                    f"width and height must both be 0 or both set, got {width}x{height}"
                )
            if width > 0:
                disparity = resize_like(disparity, (height, width))
            dm = defocus_map(disparity, focus or FocusTarget("center"), k, metric=depth.metric)
        preview = bchw_to_image(coc_preview(dm.coc))
        cond = bchw_to_image(defocus_condition_map(dm.coc).expand(-1, 3, -1, -1))
        return io.NodeOutput(dm, preview, cond, ui=ui.PreviewImage(preview, cls=cls))
