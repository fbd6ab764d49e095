"""Tier 1: file IO (8/16-bit PNG) and the command line."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from genrefocus_core.cli import main
from genrefocus_core.errors import GenRefocusInputError
from genrefocus_core.imageio import load_depth_file, load_image, save_image


def _read_png16_rgb(path):
    """Independent minimal decoder for the 16-bit RGB PNGs we write (filter type 0 rows)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, hdr = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert zlib.crc32(tag + body) & 0xFFFFFFFF == struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0]
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour = hdr[:4]
    assert (depth, colour) == (16, 2)
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(h, 1 + w * 6)
    assert np.all(raw[:, 0] == 0)
    return raw[:, 1:].copy().view(">u2").reshape(h, w, 3).astype(np.float64) / 65535.0


def test_png16_round_trip(tmp_path):
    img = torch.rand(1, 3, 5, 7, dtype=torch.float64)
    p = save_image(tmp_path / "a" / "x.png", img, bits=16)
    back = _read_png16_rgb(p)
    np.testing.assert_allclose(back, img[0].permute(1, 2, 0).numpy(), atol=0.5 / 65535 + 1e-12)
    with Image.open(p) as im:  # a valid PNG for other readers too
        assert im.size == (7, 5)


def test_png8_and_loaders(tmp_path):
    img = torch.rand(1, 3, 4, 6)
    p = save_image(tmp_path / "x.png", img)
    torch.testing.assert_close(load_image(p), img, atol=0.5 / 255 + 1e-6, rtol=0)
    grey16 = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2000).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "d.png")
    assert load_depth_file(tmp_path / "d.png").flatten().tolist() == grey16.flatten().astype(float).tolist()
    np.save(tmp_path / "d.npy", grey16.astype(np.float32)[None])
    assert load_depth_file(tmp_path / "d.npy").shape == (1, 1, 4, 6)
    Image.fromarray((np.random.rand(4, 6, 3) * 255).astype(np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(GenRefocusInputError, match="is a colour image"):
        load_depth_file(tmp_path / "c.png")
    with pytest.raises(GenRefocusInputError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_cli_render_and_errors(tmp_path):
    img = torch.rand(1, 3, 32, 48)
    save_image(tmp_path / "in.png", img)
    depth = np.linspace(1.0, 10.0, 16 * 24, dtype=np.float32).reshape(16, 24)  # half resolution, metres
    np.save(tmp_path / "depth.npy", depth)
    out = tmp_path / "out.png"
    assert (
        main(
            [
                "render",
                str(tmp_path / "in.png"),
                "--depth",
                str(tmp_path / "depth.npy"),
                "--k",
                "20",
                "--focus-point",
                "10",
                "10",
                "--bits",
                "16",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out).size == (48, 32)
    assert (
        main(
            [
                "render",
                str(tmp_path / "in.png"),
                "--depth",
                str(tmp_path / "depth.npy"),
                "--k",
                "-1",
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert (
        main(["render", str(tmp_path / "in.png"), "--depth", str(tmp_path / "nope.npy"), "-o", str(out)]) == 2
    )


def test_cli_demo(tmp_path):
    assert main(["demo", "-o", str(tmp_path), "--width", "96", "--height", "64"]) == 0
    for name in ("demo_input", "demo_disparity", "demo_coc", "demo_bokeh_physical", "demo_bokeh_bokehme"):
        assert (tmp_path / f"{name}.png").is_file(), name
    sharp = load_image(tmp_path / "demo_input.png")
    blurred = load_image(tmp_path / "demo_bokeh_physical.png")
    assert not torch.allclose(sharp, blurred, atol=0.02)
