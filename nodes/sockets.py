"""Custom socket types of GenRefocus (values are core dataclasses)."""

from comfy_api.latest import io

Depth = io.Custom("GENREFOCUS_DEPTH")  # genrefocus_core.depth.DepthMap
Focus = io.Custom("GENREFOCUS_FOCUS")  # genrefocus_core.defocus.FocusTarget
Defocus = io.Custom("GENREFOCUS_DEFOCUS")  # genrefocus_core.defocus.DefocusMap
ApertureSocket = io.Custom("GENREFOCUS_APERTURE")  # genrefocus_core.aperture.Aperture
DepthModel = io.Custom("GENREFOCUS_DEPTH_MODEL")  # genrefocus_core.depth_models.DepthModel
Pipe = io.Custom("GENREFOCUS_PIPE")  # nodes.generative.GenerativePipe or nodes.native.NativePipe
Tiling = io.Custom("GENREFOCUS_TILING")  # nodes.generative.TileSettings
Camera = io.Custom("GENREFOCUS_CAMERA")  # genrefocus_core.camera.Camera
