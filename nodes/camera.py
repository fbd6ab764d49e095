"""Camera-language nodes: a lens setting (manual or from EXIF) and the blur strength K it gives.

"Shoot at f/1.4 instead of f/8": Read Camera EXIF (``loaders.py``, it reads the input folder) gives
the photo's focal length and sensor, Camera Settings sets the aperture to render, and K from Camera
turns them and the metric depth at the focus into the Defocus Map's ``k`` (thin-lens Eq. 3,
``genrefocus_core.camera``).
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..genrefocus_core.camera import SENSOR_WIDTHS_MM
from ..genrefocus_core.camera import Camera as CoreCamera
from ..genrefocus_core.errors import GenRefocusInputError
from ._glue import check_combo, user_errors
from .sockets import Camera, Depth, Focus

logger = logging.getLogger(__name__)

SETTINGS = "Camera Settings"
K_FROM_CAMERA = "K from Camera"
FROM_CAMERA = "from camera input"
CUSTOM = "custom"
SENSORS = (FROM_CAMERA, *SENSOR_WIDTHS_MM, CUSTOM)


class CameraSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_CameraSettings",
            display_name=SETTINGS,
            category="GenRefocus/camera",
            description=(
                "A lens setting to render with. Connect Read Camera EXIF to keep the photo's focal length "
                "and sensor and choose a new aperture (same photo, f/1.4 instead of f/8)."
            ),
            inputs=[
                io.Float.Input("f_number", default=1.8, min=0.5, max=64.0, step=0.1,
                               tooltip="Aperture to render (f-number). Smaller = more blur."),
                io.Float.Input("focal_length_mm", default=0.0, min=0.0, max=2000.0, step=0.1,
                               tooltip="Real (not 35 mm-equivalent) focal length in mm; "
                                       "0 = from the camera input."),
                io.Combo.Input("sensor", options=list(SENSORS), default=FROM_CAMERA,
                               tooltip="Sensor width; 'from camera input' uses the EXIF crop factor."),
                io.Float.Input("sensor_width_mm", default=36.0, min=1.0, max=100.0, step=0.1,
                               tooltip="Sensor width in mm when sensor is 'custom'."),
                Camera.Input("camera", optional=True,
                             tooltip="From Read Camera EXIF: focal length and sensor."),
            ],
            outputs=[Camera.Output(display_name="camera"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, f_number: float, focal_length_mm: float, sensor: str, sensor_width_mm: float,
                camera: CoreCamera | None = None) -> io.NodeOutput:
        with user_errors(SETTINGS):
            check_combo(SETTINGS, "sensor", sensor, SENSORS)
            if (focal_length_mm <= 0 or sensor == FROM_CAMERA) and camera is None:
                missing = "focal_length_mm is 0" if focal_length_mm <= 0 else "sensor is 'from camera input'"
                raise GenRefocusInputError(
                    f"camera must be connected when {missing}, got nothing; connect Read Camera EXIF or "
                    "enter the focal length and pick a sensor"
                )
            focal = focal_length_mm if focal_length_mm > 0 else camera.focal_length_mm
            width = (camera.sensor_width_mm if sensor == FROM_CAMERA else
                     sensor_width_mm if sensor == CUSTOM else SENSOR_WIDTHS_MM[sensor])
            source = "manual" if camera is None else f"{camera.source}+manual"
            shot = None if camera is None else camera.shot_f_number
            out = CoreCamera(focal, f_number, width, shot_f_number=shot, source=source)
            return io.NodeOutput(out, out.describe())


class KFromCamera(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_KFromCamera",
            display_name=K_FROM_CAMERA,
            category="GenRefocus/camera",
            description=(
                "Blur strength K (px*m) of a real lens: K = f^2 z_f / (2 N (z_f - f)) x image width / sensor "
                "width, the focus distance z_f read from the metric depth at the focus. Wire 'k' into the "
                "Defocus Map's k input. Needs metric depth (Depth Pro, or a depth image in metres)."
            ),
            inputs=[
                Camera.Input("camera"),
                Depth.Input("depth", tooltip="Metric depth (Depth Pro or Depth from Image as metric_depth)."),
                Focus.Input("focus"),
            ],
            outputs=[io.Float.Output(display_name="k"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, camera: CoreCamera, depth, focus) -> io.NodeOutput:
        with user_errors(K_FROM_CAMERA):
            if not depth.metric:
                raise GenRefocusInputError(
                    f"depth must be metric (metres) for a K from camera settings, got a {depth.source} map "
                    "in relative units; use Estimate Depth with Depth Pro or Depth from Image "
                    "as metric_depth, or set K by hand on the Defocus Map"
                )
            disp_f = focus.resolve(depth.disparity)  # (B,) 1/m
            if not bool(torch.all(disp_f > 0)):
                raise GenRefocusInputError(
                    f"focus must be on something at a finite distance, got focus disparity "
                    f"{float(disp_f.min()):g} 1/m (infinitely far); move the focus point"
                )
            width = depth.size[1]
            ks = [camera.k(1.0 / float(d), width) for d in disp_f]
            k = ks[0]
            lines = [camera.describe(), f"image width {width} px"]
            lines += [f"frame {i}: focus at {1.0 / float(d):.3g} m -> K = {kk:.4g} px*m"
                      for i, (d, kk) in enumerate(zip(disp_f, ks, strict=True))]
            if len(ks) > 1 and max(ks) > 1.01 * min(ks):
                logger.warning("[%s] frames focus at different distances; K of frame 0 (%.4g) is used",
                               K_FROM_CAMERA, k)
                lines.append(f"frames differ: K of frame 0 ({k:.4g}) is the output")
            return io.NodeOutput(float(k), "\n".join(lines))
