"""A built-in synthetic scene for the demo and for smoke tests (no files, no weights).

The scene is an all-in-focus pinhole image with an exact relative disparity map (near = 1): a
night sky full of point lights far away, a checkered ground plane receding to the horizon, a
shaded ball in the middle distance (the default focus) and out-of-focus bars in the foreground.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_number

__all__ = ["demo_scene"]


def demo_scene(
    height: int = 400, width: int = 640, *, seed: int = 0
) -> tuple[Tensor, Tensor, tuple[float, float]]:
    """Build the demo scene.

    Args:
        height: image height in px, ``>= 32``.
        width: image width in px, ``>= 32``.
        seed: seed of the point-light layout.

    Returns:
        ``(image, disparity, focus_xy)``: image ``(1, 3, H, W)`` in [0, 1]; relative disparity
        ``(1, 1, H, W)`` in [0, 1] (near = 1); the ball's centre ``(x, y)`` in px, a good focus point.

    Example:
        >>> img, disp, (fx, fy) = demo_scene(64, 96)
        >>> img.shape, disp.shape, 0 < fx < 96
        (torch.Size([1, 3, 64, 96]), torch.Size([1, 1, 64, 96]), True)
    """
    height = int(check_number("height", height, lo=32, hi=8192))
    width = int(check_number("width", width, lo=32, hi=8192))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width)
    x = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width)
    horizon = 0.55 * height

    # Far background: a dark blue gradient with point lights (they become bokeh balls).
    t = (y / height).clamp(0, 1)
    img = torch.stack([0.05 + 0.05 * t, 0.07 + 0.08 * t, 0.18 + 0.12 * t])
    disp = torch.full((height, width), 0.02)
    n_lights = max(8, (height * width) // 8000)
    ly = torch.rand(n_lights, generator=g) * horizon * 0.95
    lx = torch.rand(n_lights, generator=g) * width
    hue = torch.rand(n_lights, generator=g)
    colours = torch.stack([0.9 + 0.1 * torch.cos(6.28 * hue), 0.75 + 0.25 * torch.cos(6.28 * (hue - 0.33)),
                           0.6 + 0.4 * torch.cos(6.28 * (hue - 0.66))], dim=1).clamp(0, 1)
    for i in range(n_lights):
        rr = (x - lx[i]) ** 2 + (y - ly[i]) ** 2
        a = (2.5 + 1.5 * hue[i] - rr.sqrt()).clamp(0, 1)  # lamps 2.5-4 px: bright bokeh balls
        img = img * (1 - a) + colours[i].view(3, 1, 1) * a

    # Ground plane: disparity grows linearly below the horizon (a plane seen by a pinhole camera).
    below = y >= horizon
    gd = ((y - horizon) / (height - horizon)).clamp(0, 1)
    ground_disp = 0.02 + 0.93 * gd
    depth = 1.0 / ground_disp.clamp_min(1e-3)
    u = (x - width / 2) / width * depth * 4.0
    checker = ((torch.floor(u) + torch.floor(depth * 1.5)) % 2).float()
    ground = torch.stack([0.35 + 0.35 * checker, 0.30 + 0.25 * checker, 0.22 + 0.12 * checker])
    ground = ground * (0.5 + 0.5 * gd)
    img = torch.where(below, ground, img)
    disp = torch.where(below, ground_disp, disp)

    # The subject: a shaded ball standing on the ground in the middle distance.
    cx, cy, r = 0.5 * width, 0.62 * height, 0.16 * min(height, width)
    d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r**2
    ball = d2 <= 1.0
    nz = (1 - d2).clamp_min(0).sqrt()
    shade = (0.25 + 0.75 * (nz * 0.8 + (cx - x) / r * 0.3 + (cy - y) / r * 0.3).clamp(0, 1))
    stripes = 0.5 + 0.5 * torch.sign(torch.sin((x - cx) / r * 9.0))
    ball_rgb = torch.stack([0.85 * shade, (0.25 + 0.35 * stripes) * shade, 0.15 * shade])
    img = torch.where(ball, ball_rgb, img)
    ball_disp = 0.45 + 0.02 * nz
    disp = torch.where(ball, ball_disp, disp)

    # Foreground: two leaning bars close to the camera.
    for x0, slope, col in ((0.12 * width, 0.25, (0.2, 0.55, 0.25)), (0.86 * width, -0.2, (0.55, 0.35, 0.7))):
        xc = x0 + slope * (y - height / 2)
        bar = (x - xc).abs() <= 0.035 * width
        img = torch.where(bar, torch.tensor(col).view(3, 1, 1) * (0.7 + 0.3 * (y / height)), img)
        disp = torch.where(bar, torch.full_like(disp, 0.97), disp)

    return img.clamp(0, 1)[None], disp[None, None], (float(cx), float(cy))
