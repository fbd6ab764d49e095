"""Classical bokeh render node."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..genrefocus_core.errors import GenRefocusInputError
from ..genrefocus_core.renderer import RENDER_MODES, render_bokeh
from ._glue import bchw_to_image, check_combo, compute_device, frame_progress, image_to_bchw, user_errors
from .sockets import ApertureSocket, Defocus

NAME = "Classical Bokeh"


class ClassicalBokeh(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_ClassicalBokeh",
            display_name=NAME,
            category="GenRefocus/render",
            description=(
                "Render depth of field without neural weights. physical: layered and occlusion-aware (sharp "
                "subjects never bleed, blurred foregrounds turn see-through), any aperture, fast at 4K. "
                "bokehme: BokehMe's classical renderer, for comparisons and training data. Every frame of "
                "a batch is rendered."
            ),
            inputs=[
                io.Image.Input("image", tooltip="All-in-focus image (a batch of frames is fine)."),
                Defocus.Input("defocus", tooltip="From Defocus Map; same size as the image."),
                io.Combo.Input("mode", options=list(RENDER_MODES), default="physical"),
                io.Float.Input(
                    "gamma",
                    default=2.2,
                    min=1.0,
                    max=5.0,
                    step=0.1,
                    tooltip="Blur in linear light: image^gamma. 2.2 ~ sRGB; BokehMe's demo uses 4.",
                ),
                io.Boolean.Input(
                    "highlight",
                    default=False,
                    tooltip="Restore clipped highlights so light sources make bright bokeh balls.",
                ),
                ApertureSocket.Input("aperture", optional=True, tooltip="Aperture shape; default a disc."),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(
        cls, image, defocus, mode: str, gamma: float, highlight: bool, aperture=None
    ) -> io.NodeOutput:
        check_combo(NAME, "mode", mode, RENDER_MODES)
        with user_errors(NAME):
            img = image_to_bchw(image, node=NAME)
            disp = defocus.disparity
            n, nd = img.shape[0], disp.shape[0]
            if nd not in (1, n):
                raise GenRefocusInputError(
                    f"defocus must have 1 or {n} frames (as image), got {nd}; batch the depth like the images"
                )
            if disp.shape[-2:] != img.shape[-2:]:
                raise GenRefocusInputError(
                    f"defocus must match the image size: image is {img.shape[-1]}x{img.shape[-2]}, defocus "
                    f"map is {disp.shape[-1]}x{disp.shape[-2]} (WxH); set width and height on Defocus Map"
                )
            device = compute_device()
            for_frame = frame_progress(n)
            frames = []
            for f in range(n):
                j = f if nd == n else 0
                out = render_bokeh(
                    img[f : f + 1].to(device),
                    disp[j : j + 1].to(device),
                    k=defocus.k,
                    disp_focus=float(defocus.focus_disparity[j]),
                    gamma=gamma,
                    aperture=aperture,
                    mode=mode,
                    highlight=highlight,
                    on_step=for_frame(f),
                )
                frames.append(bchw_to_image(out))
        return io.NodeOutput(torch.cat(frames))
