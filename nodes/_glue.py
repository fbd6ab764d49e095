"""The only layout boundary between ComfyUI and the core: tensors, errors, progress, devices, combos."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ..genrefocus_core.errors import GenRefocusInputError

logger = logging.getLogger(__name__)


def image_to_bchw(image: Tensor, *, node: str, param: str = "image") -> Tensor:
    """ComfyUI IMAGE ``(B, H, W, C)`` -> core ``(B, 3, H, W)`` float32.

    Grey (C = 1) is replicated to RGB; RGBA (C = 4) drops its alpha channel (the classical
    renderer works on opaque photographs); any other channel count is an error.
    """
    if not isinstance(image, Tensor) or image.ndim != 4:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise GenRefocusInputError(f"[{node}] {param} must be an IMAGE of shape (B, H, W, C), got {shape}")
    c = image.shape[-1]
    if c == 1:
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        logger.info("[%s] %s has 4 channels; using RGB and ignoring alpha", node, param)
        image = image[..., :3]
    elif c != 3:
        raise GenRefocusInputError(f"[{node}] {param} must have 1, 3 or 4 channels, got {c}")
    return image.permute(0, 3, 1, 2).float().contiguous()


def bchw_to_image(x: Tensor) -> Tensor:
    """Core ``(B, C, H, W)`` -> ComfyUI IMAGE ``(B, H, W, C)`` float32 in [0, 1], intermediate device."""
    import comfy.model_management as mm

    return x.detach().permute(0, 2, 3, 1).float().clamp(0, 1).contiguous().to(mm.intermediate_device())


def mask_to_b1hw(mask: Tensor, *, node: str, param: str = "mask") -> Tensor:
    """ComfyUI MASK ``(B, H, W)`` (or ``(H, W)``) -> ``(B, 1, H, W)`` float32."""
    if not isinstance(mask, Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise GenRefocusInputError(f"[{node}] {param} must be a MASK of shape (B, H, W), got {shape}")
    if mask.ndim == 2:
        mask = mask[None]
    return mask[:, None].float()


@contextlib.contextmanager
def user_errors(node: str) -> Iterator[None]:
    """Prefix core input errors with the node's display name: ``[Classical Bokeh] k must be ...``."""
    try:
        yield
    except GenRefocusInputError as e:
        msg = str(e)
        if msg.startswith(f"[{node}]"):
            raise
        raise GenRefocusInputError(f"[{node}] {msg}") from e


def check_combo(node: str, param: str, value: object, options: Sequence[str]) -> str:
    """Validate a combo value ourselves: the server does not validate V3 combos."""
    if value not in options:
        raise GenRefocusInputError(
            f"[{node}] {param} must be one of {', '.join(map(str, options))}, got {value!r}"
        )
    return str(value)


def progress(total: int) -> Callable[[int, int], None]:
    """An ``on_step(i, total)`` closure that advances a ComfyUI progress bar and honours interrupts."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(max(int(total), 1))

    def on_step(i: int, n: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(min(int(i), int(n)), int(n))

    return on_step


def frame_progress(frames: int) -> Callable[[int], Callable[[int, int], None]]:
    """Progress over a batch of frames: ``for_frame(f)`` gives the ``on_step`` for frame ``f``.

    The bar runs from 0 to 1000 across all frames, so inner loops of any length map onto it.
    """
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(1000)

    def for_frame(f: int) -> Callable[[int, int], None]:
        def on_step(i: int, n: int) -> None:
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(int(1000 * (f + min(i, n) / max(n, 1)) / frames), 1000)

        return on_step

    return for_frame


def compute_device() -> torch.device:
    """The device ComfyUI computes on."""
    import comfy.model_management as mm

    return mm.get_torch_device()
