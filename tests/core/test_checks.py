"""Tests of the shared input guards in genrefocus_core._checks."""

from __future__ import annotations

import pytest
import torch

from genrefocus_core._checks import check_finite
from genrefocus_core.errors import GenRefocusInputError


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_check_finite_finds_one_bad_value_among_many(bad, dtype):
    x = torch.rand(1, 3, 40, 50).to(dtype)
    check_finite("image", x)  # all finite: no error
    x[0, 2, 17, 33] = bad
    message = r"image must be finite everywhere, got 1 NaN/inf value\(s\) of 6000"
    with pytest.raises(GenRefocusInputError, match=message):
        check_finite("image", x)


def test_check_finite_counts_and_accepts_non_float_and_empty():
    x = torch.zeros(2, 5)
    x[0, 0], x[1, 4] = float("nan"), float("inf")
    with pytest.raises(GenRefocusInputError, match="got 2 NaN/inf"):
        check_finite("depth", x)
    check_finite("mask", torch.ones(3, 3, dtype=torch.uint8))
    check_finite("mask", torch.ones(3, 3, dtype=torch.bool))
    check_finite("empty", torch.empty(0, 3))
    z = torch.zeros(4, dtype=torch.complex64)
    z[1] = complex(float("nan"), 0.0)
    with pytest.raises(GenRefocusInputError, match="got 1 NaN/inf"):
        check_finite("spectrum", z)
