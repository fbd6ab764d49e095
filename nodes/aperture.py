"""Aperture shape node."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..genrefocus_core.aperture import APERTURE_SHAPES, Aperture, aperture_from_image, aperture_preview
from ..genrefocus_core.errors import GenRefocusInputError
from ._glue import bchw_to_image, check_combo, user_errors
from .sockets import ApertureSocket

NAME = "Aperture Shape"
SCALINGS = ("equal_area", "circumscribed")


class ApertureShape(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_Aperture",
            display_name=NAME,
            category="GenRefocus/aperture",
            description=(
                "The shape of out-of-focus highlights: a disc, an n-blade diaphragm, a heart, a star, a "
                "triangle, or any image/mask (white = open). Shows the kernel as a background highlight."
            ),
            inputs=[
                io.Combo.Input(
                    "shape",
                    options=list(APERTURE_SHAPES),
                    default="disc",
                    tooltip="'image' uses the aperture_image or aperture_mask input.",
                ),
                io.Int.Input("blades", default=6, min=3, max=16, tooltip="Diaphragm blades (polygon)."),
                io.Float.Input(
                    "rotation_deg",
                    default=0.0,
                    min=-360.0,
                    max=360.0,
                    step=1.0,
                    tooltip="Rotation in degrees, counter-clockwise.",
                ),
                io.Float.Input(
                    "roundness",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.05,
                    tooltip="Blade curvature: 0 = straight blades, 1 = a circle.",
                ),
                io.Combo.Input(
                    "scaling",
                    options=list(SCALINGS),
                    default="equal_area",
                    tooltip="equal_area: every shape as blurry as a disc of the same radius; "
                    "circumscribed: the farthest open point at the radius (BokehMe).",
                ),
                io.Boolean.Input(
                    "flip_foreground",
                    default=True,
                    tooltip="Rotate the shape 180 degrees in front of the focal plane, as real lenses do.",
                ),
                io.Image.Input("aperture_image", optional=True, tooltip="Custom aperture, white = open."),
                io.Mask.Input("aperture_mask", optional=True, tooltip="Custom aperture as a mask, 1 = open."),
            ],
            outputs=[ApertureSocket.Output(display_name="aperture"), io.Image.Output(display_name="preview")],
        )

    @classmethod
    def execute(
        cls,
        shape: str,
        blades: int,
        rotation_deg: float,
        roundness: float,
        scaling: str,
        flip_foreground: bool,
        aperture_image=None,
        aperture_mask=None,
    ) -> io.NodeOutput:
        check_combo(NAME, "shape", shape, APERTURE_SHAPES)
        check_combo(NAME, "scaling", scaling, SCALINGS)
        with user_errors(NAME):
            raster = None
            if shape == "image":
                src = aperture_image if aperture_image is not None else aperture_mask
                if src is None:
                    raise GenRefocusInputError(
                        "aperture_image or aperture_mask must be connected when shape is 'image'"
                    )
                raster = aperture_from_image(src[:1])
            aperture = Aperture(
                shape=shape,
                blades=blades,
                rotation_deg=rotation_deg,
                roundness=roundness,
                image=raster,
                scaling=scaling,
                flip_foreground=flip_foreground,
            )
            preview = bchw_to_image(aperture_preview(aperture))
        return io.NodeOutput(aperture, preview, ui=ui.PreviewImage(preview, cls=cls))
