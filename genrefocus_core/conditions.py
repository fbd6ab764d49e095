"""Image-like FLUX streams: input resizing, 2x2 latent packing, position ids, VAE encoding.

Conventions (official-pipeline.md §4.2, §5):

* ``latents``: packed tokens ``(B, N, C*4)``; ``N = h*w`` with ``h = H/16``, ``w = W/16`` for an
  ``H x W`` image; token index ``row*w + col``; feature index ``c*4 + dy*2 + dx``.
* ids: float ``(N, 3)``: column 0 = 0, column 1 = row + d_row, column 2 = col + d_col.
* The FLUX VAE latent is ``z' = (z - shift) * scale`` (FLUX.1: shift 0.1159, scale 0.3611).

This module never imports diffusers; the VAE is any module with diffusers' ``AutoencoderKL``
``encode``/``decode`` interface and ``config.scaling_factor`` / ``config.shift_factor``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_bchw, check_finite
from .errors import GenRefocusInputError, GenRefocusModelError

__all__ = [
    "ConditionTokens",
    "ResizeInfo",
    "decode_latents",
    "encode_condition",
    "latent_image_ids",
    "load_vae",
    "pack_latents",
    "processed_size",
    "resize_for_generation",
    "unpack_latents",
    "vae_input_from_image",
]

logger = logging.getLogger(__name__)


def pack_latents(latents: Tensor) -> Tensor:
    """Pack a VAE latent ``(B, C, 2h, 2w)`` into FLUX tokens ``(B, h*w, 4C)`` (2x2 patches).

    Args:
        latents: ``(B, C, 2h, 2w)`` with even spatial sizes.

    Returns:
        ``(B, h*w, 4C)``: token ``row*w + col``, feature ``c*4 + dy*2 + dx``.

    Raises:
        GenRefocusInputError: if the tensor is not 4-D with even height and width.

    Example:
        >>> pack_latents(torch.arange(16.0).view(1, 1, 4, 4))[0, 0].tolist()
        [0.0, 1.0, 4.0, 5.0]
    """
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise GenRefocusInputError(
            f"latents must have shape (B, C, 2h, 2w) with even sizes, got {tuple(latents.shape)}"
        )
    b, c, hh, ww = latents.shape
    x = latents.view(b, c, hh // 2, 2, ww // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for an ``height x width`` px image: ``(B, C, H/8, W/8)``.

    Args:
        tokens: ``(B, (H/16)*(W/16), 4C)``.
        height: image height in px, a multiple of 16.
        width: image width in px, a multiple of 16.

    Returns:
        ``(B, C, H/8, W/8)``, contiguous.

    Raises:
        GenRefocusInputError: on sizes that do not match the token count.

    Example:
        >>> x = torch.randn(1, 16, 4, 6)
        >>> torch.equal(unpack_latents(pack_latents(x), 32, 48), x)
        True
    """
    if tokens.ndim != 3 or tokens.shape[2] % 4:
        raise GenRefocusInputError(f"tokens must have shape (B, N, 4C), got {tuple(tokens.shape)}")
    if height % 16 or width % 16 or height < 16 or width < 16:
        raise GenRefocusInputError(f"height and width must be positive multiples of 16, got {height}x{width}")
    h, w = height // 16, width // 16
    b, n, f = tokens.shape
    if n != h * w:
        raise GenRefocusInputError(
            f"tokens must hold {h}*{w} = {h * w} tokens for {height}x{width} px, got {n}"
        )
    x = tokens.view(b, h, w, f // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, f // 4, h * 2, w * 2)


def latent_image_ids(
    height: int,
    width: int,
    *,
    delta: tuple[int, int] = (0, 0),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Position ids ``(height*width, 3)`` of a token grid: ``(0, row + d_row, col + d_col)``.

    Args:
        height: token rows ``h`` (``H/16``).
        width: token columns ``w``.
        delta: ``(d_row, d_col)`` offset (OminiControl ``position_delta``).
        device: device of the result.
        dtype: float dtype; keep float32 (bf16 ids are inexact above 256, official quirk #11).

    Returns:
        ``(h*w, 3)`` ids in token order.

    Example:
        >>> latent_image_ids(2, 2, delta=(0, 32)).tolist()
        [[0.0, 0.0, 32.0], [0.0, 0.0, 33.0], [0.0, 1.0, 32.0], [0.0, 1.0, 33.0]]
    """
    if height < 1 or width < 1:
        raise GenRefocusInputError(f"height and width must be >= 1 tokens, got {height}x{width}")
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    ids = ids.reshape(height * width, 3)
    if delta[0] or delta[1]:
        ids[:, 1] += delta[0]
        ids[:, 2] += delta[1]
    return ids.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class ConditionTokens:
    """One condition stream: packed tokens on the image's token grid, ids and LoRA adapter.

    Attributes:
        tokens: ``(B, N, 4C)`` or ``(1, N, 4C)`` packed latents (batch 1 is shared by every item).
        ids: ``(N, 3)`` position ids (usually ``latent_image_ids(h, w, delta=position_delta)``).
        adapter: name of the LoRA adapter acting on this stream, or ``None`` for base weights.
        position_delta: ``(d_row, d_col)`` the ids were shifted by (kept for tiling).
    """

    tokens: Tensor
    ids: Tensor
    adapter: str | None
    position_delta: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise GenRefocusInputError(f"tokens must have shape (B, N, C), got {tuple(self.tokens.shape)}")
        if self.ids.ndim != 2 or self.ids.shape != (self.tokens.shape[1], 3):
            raise GenRefocusInputError(
                f"ids must have shape ({self.tokens.shape[1]}, 3) to match the tokens, "
                f"got {tuple(self.ids.shape)}"
            )

    @classmethod
    def on_grid(
        cls,
        tokens: Tensor,
        height: int,
        width: int,
        adapter: str | None,
        position_delta: tuple[int, int] | list[int] | None = None,
    ) -> ConditionTokens:
        """Build the record for tokens on an ``height x width`` token grid, ids shifted by the delta.

        Example:
            >>> c = ConditionTokens.on_grid(torch.zeros(1, 6, 64), 2, 3, "bokeh", (0, 32))
            >>> c.ids[-1].tolist()
            [0.0, 1.0, 34.0]
        """
        d = (0, 0) if position_delta is None else (int(position_delta[0]), int(position_delta[1]))
        ids = latent_image_ids(height, width, delta=d, device=tokens.device)
        return cls(tokens, ids, adapter, d)

    def with_tokens(self, tokens: Tensor, ids: Tensor) -> ConditionTokens:
        """A copy with other tokens and ids (e.g. one tile of this condition)."""
        return replace(self, tokens=tokens, ids=ids)


# ------------------------------------------------------------------------------------------------
# Resizing (§3)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeInfo:
    """How :func:`resize_for_generation` changed an image (enough to undo it).

    Attributes:
        original_size: ``(width, height)`` of the input.
        scaled_size: ``(width, height)`` after the LANCZOS resize (= original if none).
        crop: ``(left, top, width, height)`` of the centre crop in the scaled image.
    """

    original_size: tuple[int, int]
    scaled_size: tuple[int, int]
    crop: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        """Processed ``(width, height)``, multiples of 16."""
        return self.crop[2], self.crop[3]


def processed_size(width: int, height: int, long_side: int = 0) -> ResizeInfo:
    """The official processed geometry for a ``width x height`` input (§3), without pixels.

    ``long_side > 0``: scale the longer side to ``long_side`` (the other truncated), then centre-crop
    to multiples of 16 (min 16). ``long_side == 0``: unchanged if both sides are multiples of 16,
    else stretched up to the next multiples of 16 (aspect not kept, nothing cropped).

    Example:
        >>> processed_size(192, 128, 160)
        ResizeInfo(original_size=(192, 128), scaled_size=(160, 106), crop=(0, 5, 160, 96))
        >>> processed_size(140, 90).size
        (144, 96)
    """
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise GenRefocusInputError(f"{name} must be an integer >= 1 px, got {v!r}")
    if isinstance(long_side, bool) or not isinstance(long_side, int) or long_side < 0:
        raise GenRefocusInputError(f"long_side must be an integer >= 0 (0 = keep), got {long_side!r}")
    if long_side > 0:
        if width >= height:
            new_w, new_h = long_side, int(height * (long_side / width))
        else:
            new_w, new_h = int(width * (long_side / height)), long_side
        if new_w < 1 or new_h < 1:
            raise GenRefocusInputError(
                f"long_side {long_side} shrinks the {width}x{height} image to {new_w}x{new_h} px; "
                "use a larger one"
            )
        fw, fh = max((new_w // 16) * 16, 16), max((new_h // 16) * 16, 16)
        return ResizeInfo((width, height), (new_w, new_h), ((new_w - fw) // 2, (new_h - fh) // 2, fw, fh))
    fw, fh = ((width + 15) // 16) * 16, ((height + 15) // 16) * 16
    return ResizeInfo((width, height), (fw, fh), (0, 0, fw, fh))


def _to_uint8(image: Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] → HWC uint8 (exact for images that came from 8-bit files)."""
    return np.round(image[0].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0).astype(
        np.uint8
    )


def _from_uint8(arr: np.ndarray, like: Tensor) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return t.to(device=like.device, dtype=like.dtype)


def _pil_resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL LANCZOS resize of an 8-bit RGB image to ``size = (width, height)`` (what upstream uses)."""
    from PIL import Image

    out = Image.fromarray(_to_uint8(image), "RGB").resize(size, Image.LANCZOS)
    return _from_uint8(np.asarray(out), image)


def resize_for_generation(image: Tensor, long_side: int = 0) -> tuple[Tensor, ResizeInfo]:
    """Resize/crop an image to the official processed size (multiples of 16 px), §3.

    Resizing goes through 8-bit PIL LANCZOS exactly as upstream (so float inputs are rounded to
    8-bit levels when, and only when, a resize happens). The output is never mapped back.

    Args:
        image: ``(B, 3, H, W)`` in [0, 1].
        long_side: target longer side in px, 0 = keep (stretch up to multiples of 16 if needed).

    Returns:
        ``(image, info)``: ``(B, 3, h, w)`` and a :class:`ResizeInfo`.

    Raises:
        GenRefocusInputError: bad image or ``long_side``.

    Example:
        >>> out, info = resize_for_generation(torch.rand(1, 3, 90, 140))
        >>> tuple(out.shape), info.size
        ((1, 3, 96, 144), (144, 96))
    """
    check_bchw("image", image, 3)
    check_finite("image", image)
    h0, w0 = image.shape[-2:]
    info = processed_size(int(w0), int(h0), long_side)
    if info.scaled_size == info.original_size and info.crop == (0, 0, w0, h0):
        return image, info
    left, top, fw, fh = info.crop
    outs = []
    for i in range(image.shape[0]):
        x = (
            _pil_resize(image[i : i + 1], info.scaled_size)
            if info.scaled_size != info.original_size
            else image[i : i + 1]
        )
        outs.append(x[:, :, top : top + fh, left : left + fw])
    return torch.cat(outs), info


def vae_input_from_image(image: Tensor, *, normalize: bool = True, channels_last: bool = True) -> Tensor:
    """Pixels ``(B, 3, H, W)`` in [0, 1] → the VAE input the official pipeline builds.

    ``normalize=True``: ``2x - 1`` (``VaeImageProcessor.preprocess`` of a PIL image); ``False``:
    used as is (``No_preprocess``, the D_def map). Official PIL inputs reach the VAE channels-last
    strided (numpy HWC → NCHW transpose), the D_def tensor contiguous NCHW; on CPU the memory
    layout alone moves encoder outputs by ~1e-5..1e-3, so parity needs the same layout.

    Args:
        image: ``(B, 3, H, W)`` float.
        normalize: map [0, 1] to [-1, 1].
        channels_last: return a channels-last strided tensor (images) instead of contiguous NCHW.

    Returns:
        ``(B, 3, H, W)`` float.

    Example:
        >>> vae_input_from_image(torch.ones(1, 3, 2, 2)).flatten().tolist()[:2]
        [1.0, 1.0]
    """
    check_bchw("image", image, 3)
    if channels_last:
        x = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    else:
        x = image.contiguous()
    return 2.0 * x - 1.0 if normalize else x


def encode_condition(
    vae: Any,
    pixels: Tensor,
    *,
    mode: str = "sample",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """VAE-encode VAE-range pixels into packed, shifted and scaled FLUX tokens ``(B, N, 64)``.

    ``mode="sample"``: the posterior sample ``mean + std * eps`` as the official code (eps from
    ``noise`` if given, else ``torch.randn`` with ``generator``; logvar clamped to [-30, 20]);
    ``mode="mean"``: the posterior mean (deterministic). Then ``(z - shift) * scale`` and packing.

    Args:
        vae: diffusers ``AutoencoderKL``-like module.
        pixels: ``(B, 3, H, W)`` VAE input (see :func:`vae_input_from_image`), H and W multiples of 16.
        mode: ``"sample"`` or ``"mean"``.
        generator: RNG for eps in sample mode (``None`` = torch's global RNG, as upstream).
        noise: explicit eps ``(B, C, H/8, W/8)``; overrides ``generator``.

    Returns:
        ``(B, (H/16)*(W/16), 4*C)`` tokens in the VAE's dtype.

    Raises:
        GenRefocusInputError: bad shapes or mode.

    Example:
        >>> class Vae:  # a stand-in with the diffusers interface: 2x2 average -> mean, logvar
        ...     class config: scaling_factor, shift_factor = 1.0, 0.0
        ...     def encode(self, x):
        ...         m = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 6, 1, 1)[:, :16]
        ...         from types import SimpleNamespace as NS
        ...         return NS(latent_dist=NS(parameters=torch.cat([m, torch.zeros_like(m)], 1)))
        >>> encode_condition(Vae(), torch.zeros(1, 3, 32, 32), mode="mean").shape
        torch.Size([1, 4, 64])
    """
    check_bchw("pixels", pixels, 3)
    if mode not in ("sample", "mean"):
        raise GenRefocusInputError(f"mode must be 'sample' or 'mean', got {mode!r}")
    if pixels.shape[2] % 16 or pixels.shape[3] % 16:
        raise GenRefocusInputError(
            f"pixels must have height and width that are multiples of 16, got {tuple(pixels.shape[-2:])}"
        )
    params = vae.encode(pixels).latent_dist.parameters
    mean, logvar = torch.chunk(params, 2, dim=1)
    if mode == "sample":
        logvar = torch.clamp(logvar, -30.0, 20.0)
        std = torch.exp(0.5 * logvar)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=params.device, dtype=params.dtype)
        elif tuple(noise.shape) != tuple(mean.shape):
            raise GenRefocusInputError(
                f"noise must have the latent shape {tuple(mean.shape)}, got {tuple(noise.shape)}"
            )
        z = mean + std * noise.to(device=params.device, dtype=params.dtype)
    else:
        z = mean
    z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    return pack_latents(z)


def decode_latents(vae: Any, tokens: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Packed latents → VAE output, as the official decode (unpack, ``/scale + shift``, decode).

    Args:
        vae: diffusers ``AutoencoderKL``-like module.
        tokens: ``(B, N, 64)`` final latents.
        height: image height in px.
        width: image width in px.

    Returns:
        ``(decode_input, decoded)``: ``(B, 16, H/8, W/8)`` VAE input and ``(B, 3, H, W)`` raw
        decoder output in about [-1, 1] (the image is ``clamp(decoded / 2 + 0.5, 0, 1)``).

    Example:
        >>> class Vae:
        ...     class config: scaling_factor, shift_factor = 1.0, 0.0
        ...     def decode(self, z, return_dict=False):
        ...         return (torch.nn.functional.interpolate(z[:, :3], scale_factor=8),)
        >>> decode_latents(Vae(), torch.zeros(1, 4, 64), 32, 32)[1].shape
        torch.Size([1, 3, 32, 32])
    """
    z = unpack_latents(tokens, height, width)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    out = vae.decode(z, return_dict=False)[0]
    return z, out


def load_vae(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Any:
    """Load a diffusers ``AutoencoderKL`` from a local folder (no download), in eval mode.

    Raises:
        GenRefocusModelError: if the folder is missing or not a diffusers VAE.

    Example:
        >>> import tempfile
        >>> from diffusers import AutoencoderKL
        >>> d = tempfile.mkdtemp()
        >>> AutoencoderKL(block_out_channels=(4,), norm_num_groups=2, latent_channels=16).save_pretrained(d)
        >>> load_vae(d).config.latent_channels
        16
    """
    p = Path(path)
    if not (p / "config.json").is_file():
        raise GenRefocusModelError(
            f"VAE folder {str(p)!r} has no config.json; point it at the FLUX VAE in diffusers layout (vae/)"
        )
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(p, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise GenRefocusModelError(f"cannot load the VAE from {str(p)!r}: {e}") from e
    return vae.to(device).eval()
