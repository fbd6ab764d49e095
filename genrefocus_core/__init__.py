"""GenRefocus core library: depth, focus, apertures and bokeh rendering in plain PyTorch.

Never imports ComfyUI. Heavy optional packages (diffusers, peft, transformers) are imported only by
the modules that need them, so ``import genrefocus_core`` stays fast.
"""

from __future__ import annotations

from .aperture import (
    APERTURE_SHAPES,
    Aperture,
    aperture_from_image,
    aperture_kernel,
    aperture_mask,
    aperture_preview,
)
from .camera import bokeh_k, f_number_for_k, read_exif
from .defocus import (
    MAX_COC,
    DefocusMap,
    FocusTarget,
    defocus_condition_map,
    defocus_map,
    disparity_from_depth,
    focus_disparity_center,
    focus_disparity_from_mask,
    focus_disparity_from_point,
    signed_coc,
)
from .depth import DepthMap, depth_map_from_image
from .depth_models import DepthModel, load_depth_model
from .errors import GenRefocusError, GenRefocusInputError, GenRefocusModelError
from .genpipe import GenerationOptions, GenfocusModels
from .metrics import laplacian_variance, lv_corr, psnr, search_k, ssim
from .models import load_genfocus_models
from .pipeline import bokeh_image, deblur_image, refocus
from .renderer import RENDER_MODES, render_bokeh

__version__ = "0.1.0"

__all__ = [
    "APERTURE_SHAPES",
    "MAX_COC",
    "RENDER_MODES",
    "Aperture",
    "DefocusMap",
    "DepthMap",
    "DepthModel",
    "FocusTarget",
    "GenRefocusError",
    "GenRefocusInputError",
    "GenRefocusModelError",
    "GenerationOptions",
    "GenfocusModels",
    "__version__",
    "aperture_from_image",
    "aperture_kernel",
    "aperture_mask",
    "aperture_preview",
    "bokeh_image",
    "bokeh_k",
    "deblur_image",
    "defocus_condition_map",
    "defocus_map",
    "depth_map_from_image",
    "disparity_from_depth",
    "f_number_for_k",
    "focus_disparity_center",
    "focus_disparity_from_mask",
    "focus_disparity_from_point",
    "laplacian_variance",
    "load_depth_model",
    "load_genfocus_models",
    "lv_corr",
    "psnr",
    "read_exif",
    "refocus",
    "render_bokeh",
    "search_k",
    "signed_coc",
    "ssim",
]
