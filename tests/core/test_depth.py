"""Tier 1: DepthMap and reading external depth images."""

from __future__ import annotations

import pytest
import torch

from genrefocus_core.depth import DepthMap, depth_map_from_image
from genrefocus_core.errors import GenRefocusInputError


def test_relative_interpretations_are_consistent():
    v = torch.rand(2, 1, 6, 7) * 0.8 + 0.1
    disp = depth_map_from_image(v, "relative_disparity").disparity
    depth = depth_map_from_image(v, "relative_depth").disparity
    inv = depth_map_from_image(v, "relative_disparity", invert=True).disparity
    for b in range(2):  # min-max normalised per image
        assert disp[b].min() == 0 and disp[b].max() == 1
    torch.testing.assert_close(depth, 1 - disp)
    torch.testing.assert_close(inv, depth)


def test_metric_depth_keeps_units():
    v = torch.tensor([1.0, 2.0, 8.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    dm = depth_map_from_image(v, "metric_depth", metric_scale=2.0, focal_px=500.0)
    assert dm.metric and dm.unit == "1/m" and dm.focal_px == 500.0
    assert dm.disparity.flatten().tolist() == [0.5, 0.25, 0.0625]
    torch.testing.assert_close(dm.depth_m, torch.tensor([2.0, 4.0, 16.0]).view(1, 1, 1, 3))


def test_flat_map_and_rgba():
    flat = depth_map_from_image(torch.full((1, 4, 5, 5), 0.3), "relative_disparity")
    assert torch.all(flat.disparity == 0)


def test_bad_inputs():
    with pytest.raises(GenRefocusInputError, match="looks colour-mapped"):
        depth_map_from_image(torch.rand(1, 3, 4, 4), "relative_disparity")
    with pytest.raises(GenRefocusInputError, match="image must be finite everywhere"):
        depth_map_from_image(torch.full((1, 1, 2, 2), float("inf")), "metric_depth")
    with pytest.raises(GenRefocusInputError, match=r"image must have 1 or 3 or 4 channel"):
        depth_map_from_image(torch.rand(1, 2, 4, 4), "relative_depth")
    with pytest.raises(GenRefocusInputError, match="disparity must have shape"):
        DepthMap(torch.rand(4, 4), metric=False)
