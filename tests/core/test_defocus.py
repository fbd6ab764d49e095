"""Tier 1: optics — disparity, focus picking, CoC and the official conditioning map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genrefocus_core.defocus import (
    FocusTarget,
    coc_preview,
    defocus_condition_map,
    defocus_map,
    disparity_from_depth,
    focus_disparity_center,
    focus_disparity_from_mask,
    focus_disparity_from_point,
    resize_like,
    signed_coc,
)
from genrefocus_core.errors import GenRefocusInputError


def test_coc_zero_on_focal_plane_and_sign_convention():
    d = torch.rand(2, 1, 8, 9)
    fd = d[:, 0, 3, 4]
    coc = signed_coc(d, fd, 12.0)
    assert torch.all(coc[:, 0, 3, 4] == 0)
    assert torch.all((coc > 0) == (d > fd.view(-1, 1, 1, 1)))  # nearer than focus -> positive


def test_disparity_from_depth_policy():
    depth = torch.tensor([2.0, 0.0, -1.0, float("inf"), float("nan")]).view(1, 1, 1, 5)
    assert disparity_from_depth(depth).flatten().tolist() == [0.5, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(GenRefocusInputError, match=r"depth_m must be finite and > 0, got 4 of 5"):
        disparity_from_depth(depth, invalid="error")


def test_focus_point_scaling_matches_official_rule():
    d = torch.arange(12 * 16, dtype=torch.float32).view(1, 1, 12, 16)
    # a point picked in a 160x120 original: tx = int(100 * 16 / 160) = 10, ty = int(60 * 12 / 120) = 6
    assert focus_disparity_from_point(d, 100, 60, image_size=(160, 120)).item() == d[0, 0, 6, 10].item()
    assert focus_disparity_from_point(d, 160, 120, image_size=(160, 120)).item() == d[0, 0, 11, 15].item()
    with pytest.raises(GenRefocusInputError, match="inside the 160x120 image"):
        focus_disparity_from_point(d, 161, 0, image_size=(160, 120))


def test_focus_mask_median_and_empty():
    d = torch.tensor([1.0, 2.0, 3.0, 10.0]).view(1, 1, 2, 2)
    m = torch.tensor([1.0, 1.0, 1.0, 1.0]).view(1, 1, 2, 2)
    assert focus_disparity_from_mask(d, m).item() == pytest.approx(2.5)  # numpy-style median of 4
    with pytest.raises(GenRefocusInputError, match="mask must contain at least one pixel"):
        focus_disparity_from_mask(d, torch.zeros(1, 1, 2, 2))
    assert focus_disparity_from_mask(d, torch.zeros(1, 1, 2, 2), empty="all").item() == pytest.approx(2.5)
    big = torch.zeros(1, 1, 4, 4)
    big[..., :2, :2] = 1  # NEAREST-resized to 2x2 -> only the top-left pixel
    assert focus_disparity_from_mask(d, big).item() == 1.0
    with pytest.raises(GenRefocusInputError, match="mask must have batch size 1 or 1"):
        focus_disparity_from_mask(d, torch.ones(3, 1, 2, 2))


def test_centre_focus_and_target_resolution():
    d = torch.rand(3, 1, 7, 10)
    torch.testing.assert_close(focus_disparity_center(d), d[:, 0, 3, 5])
    torch.testing.assert_close(FocusTarget().resolve(d), d[:, 0, 3, 5])
    torch.testing.assert_close(FocusTarget("point", x=1.0, y=0.0).resolve(d), d[:, 0, 0, 9])
    assert FocusTarget("disparity", value=0.25).resolve(d).tolist() == [0.25] * 3
    with pytest.raises(GenRefocusInputError, match=r"x must be <= 1\.0"):
        FocusTarget("point", x=1.5)


def test_condition_map_and_preview():
    coc = torch.tensor([-150.0, -50.0, 0.0, 20.0]).view(1, 1, 1, 4)
    assert defocus_condition_map(coc).flatten().tolist() == pytest.approx([1.0, 0.5, 0.0, 0.2])
    p = coc_preview(coc)
    assert p.shape == (1, 3, 1, 4) and float(p[..., 2].abs().sum()) == 0.0  # in focus = black
    assert p[0, 2, 0, 0] > p[0, 0, 0, 0]  # behind: blue
    assert p[0, 0, 0, 3] > p[0, 2, 0, 3]  # in front: orange


def test_input_errors():
    with pytest.raises(GenRefocusInputError, match=r"disparity must have 1 channel\(s\)"):
        signed_coc(torch.zeros(1, 3, 4, 4), 0.0, 1.0)
    with pytest.raises(GenRefocusInputError, match=r"k must be >= 0\.0, got -1"):
        signed_coc(torch.zeros(1, 1, 4, 4), 0.0, -1.0)
    with pytest.raises(GenRefocusInputError, match="disparity must be finite everywhere"):
        defocus_map(torch.full((1, 1, 2, 2), float("nan")), FocusTarget(), 1.0, metric=True)


def test_official_defocus_map_of_parity_case(shared_dir):
    """The D_def map of the official ``bokeh_mask`` run: .npy depth resized bilinear, mask median, K=15."""
    from PIL import Image

    fx = shared_dir / "fixtures" / "genfocus-parity"
    depth = torch.from_numpy(np.load(fx / "inputs" / "depth_64x96.npy"))[None, None]
    mask = torch.from_numpy(np.asarray(Image.open(fx / "inputs" / "mask_128x192.png").convert("L")) / 255.0)
    disp = disparity_from_depth(resize_like(depth, (128, 192)))
    dm = defocus_map(
        disp, FocusTarget("mask", mask=mask[None, None].float(), threshold=0.0), 15.0, metric=True
    )
    ours = defocus_condition_map(dm.coc)[0, 0].numpy()
    official = np.load(fx / "cases" / "bokeh_mask" / "cond1_input_ch0.npy")
    assert ours.shape == official.shape
    np.testing.assert_allclose(ours, official, atol=1e-6)


def test_official_point_focus_of_parity_case(shared_dir):
    """``bokeh_point_longside``: the point is scaled from the original image size, ignoring the crop."""
    import json

    fx = shared_dir / "fixtures" / "genfocus-parity"
    case = fx / "cases" / "bokeh_point_longside"
    meta = json.loads((case / "meta.json").read_text())
    argv = meta["argv"]
    px, py = (float(v) for v in argv[argv.index("--point") + 1].split(","))
    k = float(argv[argv.index("--k_value") + 1])
    official = np.load(case / "cond1_input_ch0.npy")
    h, w = official.shape
    depth = torch.from_numpy(np.load(fx / "inputs" / "depth_64x96.npy"))[None, None]
    disp = disparity_from_depth(resize_like(depth, (h, w)))
    fd = focus_disparity_from_point(disp, px, py, image_size=(192, 128))  # aif_128x192 is the original
    ours = defocus_condition_map(signed_coc(disp, fd, k))[0, 0].numpy()
    np.testing.assert_allclose(ours, official, atol=1e-6)
