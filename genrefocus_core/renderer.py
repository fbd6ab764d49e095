"""Classical (weight-free) bokeh renderer: public entry point ``render_bokeh``.

Two modes share one signature:

* ``"physical"`` (default): layered, occlusion-aware, any aperture shape, cost independent of the
  blur radius (see ``_render_physical``).
* ``"bokehme"``: BokehMe's classical scatter renderer reproduced for parity (``_render_bokehme``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import check_render_inputs
from ._malloc import render_memory
from .aperture import Aperture
from .errors import GenRefocusInputError

__all__ = ["MAX_PIXELS", "RENDER_MODES", "render_bokeh"]

RENDER_MODES = ("physical", "bokehme")

#: Largest image the classical renderer accepts, in pixels (about 8K x 8K); larger inputs should be
#: rendered in tiles by the caller or downscaled.
MAX_PIXELS = 8192 * 8192


def render_bokeh(
    image: Tensor,
    disparity: Tensor,
    *,
    k: float,
    disp_focus: float,
    gamma: float = 2.2,
    aperture: Aperture | None = None,
    mode: str = "physical",
    highlight: bool = False,
    on_step: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Render depth of field into an all-in-focus image.

    The signed circle-of-confusion radius in pixels is ``coc = k * (disparity - disp_focus)``:
    positive in front of the focal plane, negative behind it.

    Args:
        image: ``(B, 3, H, W)`` all-in-focus image in [0, 1] (display-referred, e.g. sRGB).
        disparity: ``(B, 1, H, W)`` (or batch 1, broadcast) disparity, larger = nearer. In
            ``"bokehme"`` mode it means what BokehMe's demo means: min-max normalised to [0, 1].
            Metric disparity (1/m) works too; ``k`` then has units px*m.
        k: blur strength, ``>= 0``; radius in pixels per unit of disparity.
        disp_focus: disparity rendered sharp, in the unit of ``disparity``.
        gamma: power used to move to (approximately) linear light before blurring, in [1, 5];
            the result is raised to ``1/gamma``. BokehMe's demo uses 4.
        aperture: aperture shape; ``None`` = a disc.
        mode: ``"physical"`` or ``"bokehme"``.
        highlight: restore clipped highlights before blurring (BokehMe's boost rule in
            ``"bokehme"`` mode, a smooth inverse tone curve in ``"physical"`` mode).
        on_step: optional ``on_step(i, total)`` progress/interrupt callback, called in long loops.

    Returns:
        ``(B, 3, H, W)`` rendered image in [0, 1], device and dtype of ``image``.

    Raises:
        GenRefocusInputError: on bad shapes, non-finite values, out-of-range scalars, a blur radius
            larger than the image, or an image over :data:`MAX_PIXELS`.

    Example:
        >>> img = torch.full((1, 3, 16, 16), 0.5)
        >>> disp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
        >>> out = render_bokeh(img, disp, k=8.0, disp_focus=0.5)
        >>> bool(torch.allclose(out, img, atol=1e-4))  # a constant image stays constant
        True
    """
    k, disp_focus, gamma = check_render_inputs(image, disparity, k, disp_focus, gamma)
    if mode not in RENDER_MODES:
        raise GenRefocusInputError(f"mode must be one of {', '.join(RENDER_MODES)}, got {mode!r}")
    if aperture is not None and not isinstance(aperture, Aperture):
        raise GenRefocusInputError(f"aperture must be an Aperture or None, got {type(aperture).__name__}")
    if float(image.min()) < 0.0 or float(image.max()) > 1.0:
        raise GenRefocusInputError(
            f"image must be in [0, 1], got values in [{float(image.min()):.4g}, {float(image.max()):.4g}]"
        )
    h, w = image.shape[-2:]
    if h * w > MAX_PIXELS:
        raise GenRefocusInputError(
            f"image must have at most {MAX_PIXELS // 1_000_000} MP for the classical renderer, got {w}x{h}; "
            "downscale it first"
        )
    max_radius = k * float((disparity - disp_focus).abs().max())
    if max_radius > max(h, w):
        raise GenRefocusInputError(
            f"k must give blur radii no larger than the image: k={k:g} makes a radius of {max_radius:.1f} "
            f"px on a {w}x{h} image; lower k or move the focus (disp_focus={disp_focus:g})"
        )
    disparity = disparity.to(image.dtype).expand(image.shape[0], -1, -1, -1)
    with torch.no_grad(), render_memory(image):
        if mode == "bokehme":
            from ._render_bokehme import render_bokehme

            return render_bokehme(image, disparity, k=k, disp_focus=disp_focus, gamma=gamma,
                                  aperture=aperture, highlight=highlight, on_step=on_step)
        from ._render_physical import render_physical

        return render_physical(image, disparity, k=k, disp_focus=disp_focus, gamma=gamma,
                               aperture=aperture, highlight=highlight, on_step=on_step)
