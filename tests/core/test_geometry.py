"""Tier 1: inputs at the photo's geometry on the processed grid, and back to the input size."""

from __future__ import annotations

import pytest
import torch

from genrefocus_core.conditions import processed_size, resize_for_generation
from genrefocus_core.defocus import FocusTarget
from genrefocus_core.depth import DepthMap
from genrefocus_core.errors import GenRefocusInputError
from genrefocus_core.geometry import (
    depth_to_processed,
    focus_to_processed,
    frame_focus,
    restore_input_size,
    to_processed,
)


def _smooth(h: int, w: int) -> torch.Tensor:
    y = torch.linspace(0, 1, h).view(1, 1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, 1, w)
    return torch.cat([0.2 + 0.6 * x * y.new_ones(1, 1, h, 1), 0.2 + 0.6 * y * x.new_ones(1, 1, 1, w),
                      0.5 + 0.3 * torch.sin(3 * x + 2 * y)], dim=1)


@pytest.mark.parametrize(("size", "long_side"), [((90, 140), 0), ((128, 192), 160), ((101, 77), 64)])
def test_restore_undoes_the_resize_and_crop(size, long_side):
    img = _smooth(*size)
    processed, info = resize_for_generation(img, long_side)
    back = restore_input_size(processed, info)
    assert back.shape == img.shape
    # compare where the crop kept content (cropped bands only repeat the edge)
    sw, sh = info.scaled_size
    left, top, fw, fh = info.crop
    h0, w0 = size
    r0, r1 = int((top + 2) * h0 / sh) + 1, int((top + fh - 2) * h0 / sh) - 1
    c0, c1 = int((left + 2) * w0 / sw) + 1, int((left + fw - 2) * w0 / sw) - 1
    err = (back - img)[..., r0:r1, c0:c1].abs().max()
    tol = 0.02 if (sw, sh) == (w0, h0) or max(sw / w0, sh / h0) > 1 else 0.06  # downscaling loses detail
    assert err < tol, float(err)


def test_restore_is_identity_without_resize_and_checks_the_size():
    img = torch.rand(2, 3, 32, 48)
    info = processed_size(48, 32)
    assert restore_input_size(img, info) is img
    with pytest.raises(GenRefocusInputError, match=r"processed size 32x48"):
        restore_input_size(torch.rand(1, 3, 30, 48), info)


def test_to_processed_matches_the_photo_resize():
    img = _smooth(128, 192)
    processed, info = resize_for_generation(img, 160)
    mapped = to_processed(img, info)
    assert mapped.shape == processed.shape
    assert (mapped - processed).abs().max() < 0.02  # bilinear vs LANCZOS on a smooth picture


def test_focus_point_lands_on_the_same_scene_pixel():
    info = processed_size(192, 128, 160)  # 160x106, crop rows 5..100
    xs = torch.arange(192.0).view(1, 1, 1, 192).expand(1, 1, 128, 192)
    ys = torch.arange(128.0).view(1, 1, 128, 1).expand(1, 1, 128, 192)
    coords = to_processed(torch.cat([xs, ys], 1), info, mode="nearest")
    for px, py in ((58, 74), (10, 5), (150, 120)):
        f = focus_to_processed(FocusTarget("point", x=px / 192, y=py / 128), info, "aligned")
        tx, ty = int(f.x * 160), min(int(f.y * 96), 95)
        assert abs(float(coords[0, 0, ty, tx]) - px) <= 2 and abs(float(coords[0, 1, ty, tx]) - py) <= 2
    official = FocusTarget("point", x=0.3, y=0.6)
    assert focus_to_processed(official, info, "official") is official


def test_focus_mask_is_cropped_like_the_photo():
    info = processed_size(192, 128, 160)
    mask = torch.zeros(1, 1, 128, 192)
    mask[..., :6, :] = 1.0  # only the top rows: removed by the crop
    f = focus_to_processed(FocusTarget("mask", mask=mask), info, "aligned")
    assert f.mask.shape == (1, 1, 96, 160) and float(f.mask.max()) == 0.0
    batch = FocusTarget("mask", mask=torch.rand(3, 1, 8, 8))
    assert frame_focus(batch, 2).mask.shape == (1, 1, 8, 8)
    assert frame_focus(FocusTarget("center"), 2) == FocusTarget("center")


def test_metric_depth_is_resized_before_inverting():
    depth_m = torch.tensor([[1.0, 4.0]]).view(1, 1, 1, 2)
    d = DepthMap(1 / depth_m, metric=True, depth_m=depth_m)
    out = depth_to_processed(d, processed_size(4, 1), "official")  # 4x1 is stretched to 16x16
    assert out.size == (16, 16) and out.metric
    torch.testing.assert_close(out.disparity, 1 / out.depth_m)
    rel = DepthMap(torch.rand(1, 1, 16, 16), metric=False)
    assert depth_to_processed(rel, processed_size(16, 16), "aligned") is rel
