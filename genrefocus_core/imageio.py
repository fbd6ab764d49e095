"""Reading and writing images, masks and depth files for the CLI (8- and 16-bit PNG, .npy)."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import GenRefocusInputError

__all__ = ["load_depth_file", "load_image", "load_mask", "save_image"]

logger = logging.getLogger(__name__)


def _open(path: str | Path):
    from PIL import Image

    p = Path(path)
    if not p.is_file():
        raise GenRefocusInputError(f"file {str(p)!r} does not exist")
    try:
        img = Image.open(p)
        img.load()
    except OSError as e:
        raise GenRefocusInputError(f"file {str(p)!r} is not a readable image: {e}") from e
    return img


def load_image(path: str | Path) -> Tensor:
    """Load an 8-bit image file as ``(1, 3, H, W)`` float32 in [0, 1].

    Grey images are replicated to RGB; RGBA images are composited over black (logged).
    """
    img = _open(path)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        logger.info("%s has an alpha channel; compositing over black", path)
    if img.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        arr = arr / (65535.0 if img.mode.startswith("I") else max(float(arr.max()), 1e-12))
        t = torch.from_numpy(arr)[None, None].expand(1, 3, -1, -1).clone()
        return t.clamp(0, 1)
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    rgb = rgba[..., :3] * rgba[..., 3:4]
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].contiguous()


def load_mask(path: str | Path) -> Tensor:
    """Load a mask image as ``(1, 1, H, W)`` float32 in [0, 1] (luminance; white = selected)."""
    img = _open(path)
    arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None, None].contiguous()


def load_depth_file(path: str | Path) -> Tensor:
    """Load a depth or disparity file as raw values, ``(1, 1, H, W)`` float32.

    ``.npy``: the array as stored (2-D, or 3-D with one singleton axis). PNG/TIFF: 16-bit files give
    values in 0..65535, 8-bit files 0..255 (colour files must be grey). Interpretation (metres,
    relative disparity, ...) is up to the caller.
    """
    p = Path(path)
    if p.suffix.lower() == ".npy":
        if not p.is_file():
            raise GenRefocusInputError(f"depth file {str(p)!r} does not exist")
        arr = np.load(p, allow_pickle=False)
        arr = np.squeeze(arr)
        if arr.ndim != 2:
            raise GenRefocusInputError(f"depth .npy must hold a 2-D array, got shape {arr.shape}")
        return torch.from_numpy(arr.astype(np.float32))[None, None].contiguous()
    img = _open(p)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float32)
    else:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
        if np.abs(rgb - rgb[..., :1]).max() > 0:
            raise GenRefocusInputError(
                f"depth file {str(p)!r} is a colour image; depth must be grey (a colour-mapped preview "
                "is not monotonic in depth)"
            )
        arr = rgb[..., 0]
    return torch.from_numpy(np.ascontiguousarray(arr))[None, None].contiguous()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def save_image(path: str | Path, image: Tensor, *, bits: int = 8) -> Path:
    """Save a ``(1, 3, H, W)`` or ``(3, H, W)`` image in [0, 1] as an 8- or 16-bit RGB PNG.

    Values are rounded to the nearest level. Parent folders are created.
    """
    if bits not in (8, 16):
        raise GenRefocusInputError(f"bits must be 8 or 16, got {bits!r}")
    t = image.detach().float().cpu()
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise GenRefocusInputError(f"image must hold one picture to save, got batch {t.shape[0]}")
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise GenRefocusInputError(f"image must have shape (3, H, W), got {tuple(t.shape)}")
    hwc = t.clamp(0, 1).permute(1, 2, 0).numpy()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if bits == 8:
        from PIL import Image

        Image.fromarray(np.round(hwc * 255.0).astype(np.uint8)).save(p)
        return p
    # Pillow cannot write 16-bit RGB; a PNG is simple enough to write directly (filter 0 rows).
    h, w, _ = hwc.shape
    rows = np.round(hwc * 65535.0).astype(">u2").reshape(h, w * 3)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(h))
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + _png_chunk(b"IDAT", zlib.compress(raw, 6)) + _png_chunk(b"IEND", b""))
    p.write_bytes(png)
    return p
