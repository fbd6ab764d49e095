"""Tier 2: camera nodes — Read Camera EXIF (a real JPEG with EXIF in the input folder), Camera Settings
and K from Camera, wired as in a graph (stub or real ComfyUI)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from PIL import Image

EXIF = "GenRefocus_ReadCameraEXIF"
SETTINGS = "GenRefocus_CameraSettings"
K_NODE = "GenRefocus_KFromCamera"
DEPTH = "GenRefocus_DepthFromImage"
POINT = "GenRefocus_FocusPoint"
DEFOCUS = "GenRefocus_DefocusMap"


@pytest.fixture
def input_dir(tmp_path):
    """ComfyUI's input folder pointed at a temp dir for one test (restored afterwards)."""
    fp = importlib.import_module("folder_paths")
    old = fp.get_input_directory()
    fp.set_input_directory(str(tmp_path))
    yield tmp_path
    fp.set_input_directory(old)


def _photo(folder, name: str, *, focal=85.0, f_number=8.0, focal_35=85, size=(64, 48)) -> str:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", "EOS R5"
    ifd = exif.get_ifd(0x8769)
    for tag, value in ((0x920A, focal), (0x829D, f_number), (0xA405, focal_35)):
        if value is not None:
            ifd[tag] = value
    Image.new("RGB", size, (120, 90, 60)).save(folder / name, exif=exif)
    return name


def _metric_depth(nodes, width=1024, height=8, metres=2.0):
    """A depth map in metres: ``metres`` everywhere but the left quarter (4 m)."""
    img = torch.full((1, height, width, 3), metres)
    img[:, :, : width // 4] = 4.0
    return nodes[DEPTH].execute(image=img, interpretation="metric_depth", invert=False,
                                metric_scale=1.0).result[0]


def test_same_photo_new_aperture_worked_example(nodes, input_dir):
    name = _photo(input_dir, "portrait.jpg")  # shot with an 85 mm at f/8 on full frame
    cam, summary = nodes[EXIF].execute(image=name, sensor_width_mm=0.0).result
    assert (cam.focal_length_mm, cam.f_number, cam.sensor_width_mm) == (85.0, 8.0, 36.0)
    assert "Canon EOS R5" in summary and "f/8" in summary
    new, _ = nodes[SETTINGS].execute(camera=cam, f_number=1.8, focal_length_mm=0.0,
                                     sensor="from camera input", sensor_width_mm=36.0).result
    assert (new.focal_length_mm, new.f_number, new.sensor_width_mm) == (85.0, 1.8, 36.0)
    assert new.shot_f_number == 8.0
    depth = _metric_depth(nodes)
    focus = nodes[POINT].execute(x=0.75, y=0.5).result[0]  # on the subject at 2 m
    k, text = nodes[K_NODE].execute(camera=new, depth=depth, focus=focus).result
    # By hand, in metres: f = 0.085, N = 1.8, z_f = 2, sensor 0.036, image 1024 px wide.
    # blur-circle radius on the sensor per unit of |1/z - 1/z_f|: f^2 z_f / (2 N (z_f - f))
    #   = 0.007225 * 2 / (3.6 * 1.915) = 0.0020961 m^2; in px: * 1024 / 0.036 = 59.62 px*m
    assert k == pytest.approx(59.62, abs=0.01)
    assert "2 m" in text and "59.62" in text
    # the background at 4 m (disparity 0.25 vs 0.5 1/m) then blurs by 59.62 * 0.25 = 14.9 px
    dm = nodes[DEFOCUS].execute(depth=depth, k=k, focus=focus).result[0]
    assert float(dm.coc[..., :4].abs().mean()) == pytest.approx(k * 0.25, rel=1e-4)
    # the old aperture: f/8 blurs 8 / 1.8 times less
    k8, _ = nodes[K_NODE].execute(camera=cam, depth=depth, focus=focus).result
    assert k8 == pytest.approx(k * 1.8 / 8.0, rel=1e-9)


def test_sensor_from_crop_factor_or_from_the_user(nodes, input_dir, errors):
    aps = _photo(input_dir, "aps.jpg", focal=35.0, f_number=2.0, focal_35=52)  # crop ~1.49
    cam = nodes[EXIF].execute(image=aps, sensor_width_mm=0.0).result[0]
    assert cam.sensor_width_mm == pytest.approx(36.0 * 35.0 / 52.0)
    bare = _photo(input_dir, "bare.jpg", focal=35.0, f_number=2.0, focal_35=None)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Read Camera EXIF\] sensor_width_mm must be"):
        nodes[EXIF].execute(image=bare, sensor_width_mm=0.0)
    assert nodes[EXIF].execute(image=bare, sensor_width_mm=23.5).result[0].sensor_width_mm == 23.5


def test_missing_exif_and_bad_settings_name_node_parameter_and_fix(nodes, input_dir, errors):
    nofocal = _photo(input_dir, "nofocal.jpg", focal=None)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Read Camera EXIF\] .*FocalLength.*Camera Set"):
        nodes[EXIF].execute(image=nofocal, sensor_width_mm=0.0)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Read Camera EXIF\] image must be a file"):
        nodes[EXIF].execute(image="missing.jpg", sensor_width_mm=0.0)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Camera Settings\] f_number must be"):
        nodes[SETTINGS].execute(f_number=0.0, focal_length_mm=50.0, sensor="full frame (36 mm)",
                                sensor_width_mm=36.0)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Camera Settings\] camera must be connected"):
        nodes[SETTINGS].execute(f_number=2.0, focal_length_mm=0.0, sensor="full frame (36 mm)",
                                sensor_width_mm=36.0)


def test_k_from_camera_needs_metric_depth(nodes, errors):
    cam = nodes[SETTINGS].execute(f_number=2.8, focal_length_mm=50.0, sensor="custom",
                                  sensor_width_mm=23.5).result[0]
    assert cam.sensor_width_mm == 23.5 and cam.source == "manual"
    grey = torch.rand(1, 8, 8, 1).expand(1, 8, 8, 3)
    rel = nodes[DEPTH].execute(image=grey, interpretation="relative_disparity", invert=False,
                               metric_scale=1.0).result[0]
    focus = nodes[POINT].execute(x=0.5, y=0.5).result[0]
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[K from Camera\] depth must be metric"):
        nodes[K_NODE].execute(camera=cam, depth=rel, focus=focus)
    far = nodes[DEPTH].execute(image=torch.zeros(1, 8, 8, 3), interpretation="metric_depth", invert=False,
                               metric_scale=1.0).result[0]  # depth 0 = invalid = infinitely far
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[K from Camera\] focus must be on something"):
        nodes[K_NODE].execute(camera=cam, depth=far, focus=focus)
    assert math.isfinite(nodes[K_NODE].execute(camera=cam, depth=_metric_depth(nodes), focus=focus).result[0])


def test_defocus_map_k_widget_admits_real_long_fast_lenses(nodes):
    """A 135 mm f/1.8 portrait focused at 1.5 m on a 4K frame needs K ~ 590 px*m: typeable by hand."""
    from genrefocus_core.camera import bokeh_k

    k = bokeh_k(135.0, 1.8, 1.5, sensor_width_mm=36.0, image_width_px=3840)
    assert k > 500.0  # the old slider limit
    k_input = next(i for i in nodes["GenRefocus_DefocusMap"].define_schema().inputs if i.id == "k")
    assert k_input.max >= k
