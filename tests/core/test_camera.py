"""Tier 1: camera settings -> K (paper Eq. 3) and EXIF."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from genrefocus_core.camera import bokeh_k, f_number_for_k, read_exif
from genrefocus_core.errors import GenRefocusInputError


def test_worked_example_checked_by_hand():
    """85 mm f/1.8 focused at 2 m on full frame (36 mm), image 1024 px wide, background at infinity.

    By hand: aperture diameter A = 85/1.8 = 47.22 mm; image distance v = f z/(z - f) = 85*2000/1915
    = 88.77 mm; a point at infinity focuses at f = 85 mm, so its blur-disc diameter on the sensor is
    A (v - f)/f = 47.22 * 3.773/85 = 2.096 mm, radius 1.048 mm = 1.048/36*1024 = 29.81 px. Its
    disparity differs from the focus by |0 - 1/2| = 0.5 1/m, so K = 29.81/0.5 = 59.62 px*m.
    """
    k = bokeh_k(85, 1.8, 2.0, 36, 1024)
    assert k == pytest.approx(59.62, abs=0.01)
    assert k * abs(0.0 - 1 / 2.0) == pytest.approx(29.81, abs=0.01)


def test_thin_lens_for_a_finite_background():
    f, n, zf, z = 0.050, 2.8, 3.0, 10.0
    aperture = f / n
    v_f, v_z = f * zf / (zf - f), f * z / (z - f)
    blur_diameter = aperture * abs(v_f - v_z) / v_z  # similar triangles behind the lens
    px = blur_diameter / 2 / 0.0235 * 4000  # APS-C 23.5 mm, 4000 px
    assert bokeh_k(50, 2.8, 3.0, 23.5, 4000) * abs(1 / z - 1 / zf) == pytest.approx(px, rel=1e-9)


def test_inverse_and_scaling():
    k = bokeh_k(35, 4.0, 1.5, 36, 2048)
    assert f_number_for_k(k, 35, 1.5, 36, 2048) == pytest.approx(4.0)
    assert bokeh_k(35, 2.0, 1.5, 36, 2048) == pytest.approx(2 * k)  # two stops wider: twice K
    assert bokeh_k(35, 4.0, 1.5, 36, 4096) == pytest.approx(2 * k)  # K scales with resolution


def test_bad_values():
    with pytest.raises(GenRefocusInputError, match=r"f_number must be > 0\.0"):
        bokeh_k(50, 0, 2, 36, 1000)
    with pytest.raises(GenRefocusInputError, match="focus_distance_m must be beyond the focal length"):
        bokeh_k(50, 2, 0.04, 36, 1000)
    with pytest.raises(GenRefocusInputError, match="focal_length_mm must be finite"):
        bokeh_k(math.inf, 2, 2, 36, 1000)


def test_read_exif(tmp_path):
    img = Image.new("RGB", (64, 48))
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "EOS R6"
    ifd = exif.get_ifd(0x8769)
    ifd[0x920A] = 85.0
    ifd[0x829D] = 1.8
    ifd[0xA405] = 85
    img.save(tmp_path / "a.jpg", exif=exif)
    lens = read_exif(tmp_path / "a.jpg")
    assert (lens.focal_length_mm, lens.f_number, lens.make, lens.model) == (85.0, 1.8, "Canon", "EOS R6")
    assert lens.crop_factor == 1.0 and lens.sensor_width_mm == 36.0
    assert (lens.width_px, lens.height_px) == (64, 48)
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    assert read_exif(tmp_path / "b.png").f_number is None
    with pytest.raises(GenRefocusInputError, match="does not exist"):
        read_exif(tmp_path / "nope.jpg")
