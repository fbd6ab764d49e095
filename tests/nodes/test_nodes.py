"""Tier 2: call the nodes' ``execute`` directly, as ComfyUI's own unit tests do."""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch

from .conftest import COMFY_KIND, PACK_NAME

SCHEMAS = Path(__file__).resolve().parents[1] / "data" / "schemas.json"
EXPECTED_IDS = {
    "GenRefocus_DepthFromImage",
    "GenRefocus_DepthModelLoader",
    "GenRefocus_EstimateDepth",
    "GenRefocus_FocusPoint",
    "GenRefocus_FocusFromMask",
    "GenRefocus_ReadCameraEXIF",
    "GenRefocus_CameraSettings",
    "GenRefocus_KFromCamera",
    "GenRefocus_DefocusMap",
    "GenRefocus_Aperture",
    "GenRefocus_ClassicalBokeh",
    "GenRefocus_ModelLoader",
    "GenRefocus_NativeModelLoader",
    "GenRefocus_TiledDenoise",
    "GenRefocus_DeblurNet",
    "GenRefocus_BokehNet",
    "GenRefocus_Refocus",
}


def _core(name):
    return importlib.import_module(f"{PACK_NAME}.genrefocus_core.{name}")


def _schema_dict(cls) -> dict:
    s = cls.define_schema()
    inputs = []
    for i in s.inputs:
        d = {"id": i.id, "type": str(i.io_type), "optional": bool(i.optional)}
        uploads = getattr(i, "upload", None) is not None  # e.g. a picker of the input folder's images
        file_list = (s.category.endswith("/loaders") or uploads) and str(i.io_type) == "COMBO"
        for attr in ("default", "min", "max", "options"):
            v = getattr(i, attr, None)
            if v is not None and not (file_list and attr in ("options", "default")):
                d[attr] = v
        if file_list:
            d["file_list"] = True  # options are the files found on this machine: not snapshotted
        inputs.append(d)
    return {
        "display_name": s.display_name,
        "category": s.category,
        "inputs": inputs,
        "outputs": [str(o.io_type) for o in s.outputs],
    }


def _img(b=1, h=24, w=32, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, c, generator=g)


def _ramp_depth_image(b=1, h=24, w=32):
    ramp = torch.linspace(0, 1, w).view(1, 1, w, 1).expand(b, h, w, 3).clone()
    return ramp


def test_registry_ids_and_signatures(nodes):
    assert set(nodes) == EXPECTED_IDS
    for node_id, cls in nodes.items():
        schema = cls.define_schema()
        assert schema.category.startswith("GenRefocus/"), node_id
        assert schema.description, node_id
        ids = [i.id for i in schema.inputs]
        params = list(inspect.signature(cls.execute).parameters)
        assert ids == params, f"{node_id}: schema inputs {ids} != execute parameters {params}"


def test_schemas_match_committed_file(nodes):
    """``tests/data/schemas.json`` (used by the workflow checks) must describe the current nodes."""
    current = {nid: _schema_dict(cls) for nid, cls in sorted(nodes.items())}
    if os.environ.get("GENREFOCUS_REGEN_SCHEMAS"):
        SCHEMAS.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    committed = json.loads(SCHEMAS.read_text())
    assert committed == json.loads(json.dumps(current)), (
        "node schemas changed: rerun with GENREFOCUS_REGEN_SCHEMAS=1 and commit tests/data/schemas.json"
    )


def test_depth_from_image_round_trip_and_preview(nodes):
    node = nodes["GenRefocus_DepthFromImage"]
    depth_img = _ramp_depth_image(b=2)
    out = node.execute(image=depth_img, interpretation="relative_disparity", invert=False, metric_scale=1.0)
    depth, preview = out.result
    assert depth.disparity.shape == (2, 1, 24, 32)
    torch.testing.assert_close(depth.disparity[:, 0], depth_img[..., 0])  # BHWC -> BCHW kept values
    assert preview.shape == (2, 24, 32, 3)
    inv = node.execute(image=depth_img, interpretation="relative_disparity", invert=True, metric_scale=1.0)
    torch.testing.assert_close(inv.result[0].disparity, 1 - depth.disparity)


def test_depth_from_image_metric(nodes):
    node = nodes["GenRefocus_DepthFromImage"]
    img = torch.full((1, 8, 8, 3), 4.0)  # 4 m everywhere, as Depth Pro packs emit
    depth = node.execute(image=img, interpretation="metric_depth", invert=False, metric_scale=0.5).result[0]
    assert depth.metric
    torch.testing.assert_close(depth.disparity, torch.full((1, 1, 8, 8), 0.5))  # 1 / (4 * 0.5)


def test_errors_carry_node_name(nodes, errors):
    node = nodes["GenRefocus_DepthFromImage"]
    turbo = _img()  # channels differ: looks colour-mapped
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Depth from Image\] image must be a grey"):
        node.execute(image=turbo, interpretation="relative_disparity", invert=False, metric_scale=1.0)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"\[Depth from Image\] interpretation must be one of"
    ):
        node.execute(image=_ramp_depth_image(), interpretation="bogus", invert=False, metric_scale=1.0)
    with pytest.raises(errors.GenRefocusInputError, match=r"\[Depth from Image\] invert must be off"):
        node.execute(image=_ramp_depth_image(), interpretation="metric_depth", invert=True, metric_scale=1.0)


def test_focus_and_defocus_map(nodes):
    depth = (
        nodes["GenRefocus_DepthFromImage"]
        .execute(
            image=_ramp_depth_image(), interpretation="relative_disparity", invert=False, metric_scale=1.0
        )
        .result[0]
    )
    focus = nodes["GenRefocus_FocusPoint"].execute(x=0.25, y=0.5).result[0]
    out = nodes["GenRefocus_DefocusMap"].execute(depth=depth, k=10.0, focus=focus)
    dm, preview, cond = out.result
    fd = float(depth.disparity[0, 0, 12, 8])  # int(0.25 * 32) = 8
    torch.testing.assert_close(dm.coc, 10.0 * (depth.disparity - fd))
    assert preview.shape == (1, 24, 32, 3) and cond.shape == (1, 24, 32, 3)
    torch.testing.assert_close(cond[..., 0], (dm.coc[:, 0].abs() / 100).clamp(0, 1))
    assert out.ui is not None  # a preview shown on the node
    centre = nodes["GenRefocus_DefocusMap"].execute(depth=depth, k=10.0).result[0]
    assert float(centre.coc[0, 0, 12, 16]) == 0.0
    resized = nodes["GenRefocus_DefocusMap"].execute(depth=depth, k=10.0, width=64, height=48).result[0]
    assert resized.coc.shape == (1, 1, 48, 64)


def test_focus_from_mask(nodes, errors):
    depth = (
        nodes["GenRefocus_DepthFromImage"]
        .execute(
            image=_ramp_depth_image(), interpretation="relative_disparity", invert=False, metric_scale=1.0
        )
        .result[0]
    )
    mask = torch.zeros(1, 24, 32)
    mask[:, :, 20:25] = 1.0
    focus = nodes["GenRefocus_FocusFromMask"].execute(mask=mask, threshold=0.5).result[0]
    dm = nodes["GenRefocus_DefocusMap"].execute(depth=depth, k=10.0, focus=focus).result[0]
    expected = depth.disparity[0, 0, 0, 22]  # median of columns 20..24
    torch.testing.assert_close(dm.focus_disparity[0], expected)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Focus from Mask\] mask is empty"):
        nodes["GenRefocus_FocusFromMask"].execute(mask=torch.zeros(1, 24, 32), threshold=0.5)


def test_aperture_node(nodes, errors):
    node = nodes["GenRefocus_Aperture"]
    kwargs = dict(blades=6, rotation_deg=0.0, roundness=0.0, scaling="equal_area", flip_foreground=True)
    ap, preview = node.execute(shape="polygon", **kwargs).result
    assert ap.shape == "polygon" and ap.blades == 6
    assert preview.ndim == 4 and preview.shape[-1] == 3 and float(preview.max()) > 0.5
    heart_mask = torch.zeros(1, 32, 32)
    heart_mask[:, 8:24, 10:22] = 1.0
    ap_img = node.execute(shape="image", aperture_mask=heart_mask, **kwargs).result[0]
    assert ap_img.shape == "image" and ap_img.image is not None
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Aperture Shape\] aperture_image or aperture_mask"
    ):
        node.execute(shape="image", **kwargs)
    with pytest.raises(errors.GenRefocusInputError, match=r"open"):
        node.execute(shape="image", aperture_mask=torch.zeros(1, 16, 16), **kwargs)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Aperture Shape\] shape must be one of"):
        node.execute(shape="hexagon", **kwargs)


def _defocus(nodes, b=1, k=8.0):
    depth = (
        nodes["GenRefocus_DepthFromImage"]
        .execute(
            image=_ramp_depth_image(b=b), interpretation="relative_disparity", invert=False, metric_scale=1.0
        )
        .result[0]
    )
    return nodes["GenRefocus_DefocusMap"].execute(depth=depth, k=k).result[0]


def test_classical_bokeh_batch_progress_and_equivalence(nodes):
    utils = importlib.import_module("comfy.utils")
    render_bokeh = _core("renderer").render_bokeh
    node = nodes["GenRefocus_ClassicalBokeh"]
    frames = torch.cat([_img(seed=1), _img(seed=2)])
    dm = _defocus(nodes, b=1)
    if COMFY_KIND == "stub":
        utils.UPDATES.clear()
    out = node.execute(image=frames, defocus=dm, mode="physical", gamma=2.2, highlight=False).result[0]
    assert out.shape == frames.shape
    for f in range(2):  # every frame rendered, each equal to the core call
        ref = render_bokeh(
            frames[f : f + 1].permute(0, 3, 1, 2),
            dm.disparity,
            k=dm.k,
            disp_focus=float(dm.focus_disparity[0]),
            gamma=2.2,
        )
        torch.testing.assert_close(out[f : f + 1], ref.permute(0, 2, 3, 1))
    assert not torch.allclose(out[0], out[1])
    if COMFY_KIND == "stub":
        assert utils.UPDATES and utils.UPDATES[-1] == (1000, 1000)


def test_classical_bokeh_errors(nodes, errors):
    node = nodes["GenRefocus_ClassicalBokeh"]
    dm = _defocus(nodes)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Classical Bokeh\] defocus must match the image size"
    ):
        node.execute(image=_img(h=20), defocus=dm, mode="physical", gamma=2.2, highlight=False)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Classical Bokeh\] mode must be one of"):
        node.execute(image=_img(), defocus=dm, mode="fancy", gamma=2.2, highlight=False)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Classical Bokeh\] defocus must have 1 or 3 frames"
    ):
        node.execute(
            image=_img(b=3), defocus=_defocus(nodes, b=2), mode="physical", gamma=2.2, highlight=False
        )


def test_classical_bokeh_interrupt(nodes):
    mm = importlib.import_module("comfy.model_management")
    node = nodes["GenRefocus_ClassicalBokeh"]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            node.execute(image=_img(), defocus=_defocus(nodes), mode="physical", gamma=2.2, highlight=False)
    finally:
        mm.interrupt_current_processing(False)


def test_grey_and_rgba_images_accepted(nodes):
    node = nodes["GenRefocus_ClassicalBokeh"]
    dm = _defocus(nodes)
    rgb = _img()
    rgba = torch.cat([rgb, torch.rand(1, 24, 32, 1)], dim=-1)
    a = node.execute(image=rgb, defocus=dm, mode="bokehme", gamma=2.2, highlight=False).result[0]
    b = node.execute(image=rgba, defocus=dm, mode="bokehme", gamma=2.2, highlight=False).result[0]
    torch.testing.assert_close(a, b)  # alpha ignored, documented
    grey = node.execute(image=rgb[..., :1], defocus=dm, mode="bokehme", gamma=2.2, highlight=False).result[0]
    assert grey.shape == (1, 24, 32, 3)


def test_focus_point_marks_the_point_on_the_photo(nodes):
    photo = torch.full((2, 30, 40, 3), 0.5)
    plain = nodes["GenRefocus_FocusPoint"].execute(x=0.25, y=0.5)
    assert plain.ui is None
    out = nodes["GenRefocus_FocusPoint"].execute(x=0.25, y=0.5, image=photo)
    assert out.result[0] == plain.result[0]  # the same focus whether or not the photo is shown
    shown = out.ui.image if hasattr(out.ui, "image") else None
    if shown is None:  # real ComfyUI saves the preview to its temp folder: check the core drawing instead
        core = importlib.import_module(f"{PACK_NAME}.genrefocus_core.defocus")
        shown = core.mark_point(photo.permute(0, 3, 1, 2), 0.25, 0.5).permute(0, 2, 3, 1)
    assert shown.shape == photo.shape
    changed = (shown != photo).any(dim=-1)[0]
    ys, xs = torch.nonzero(changed, as_tuple=True)
    assert int(ys.float().mean().round()) == 15 and int(xs.float().mean().round()) == 10  # centred on it
    assert float(shown[0, 15, 10, 0]) == 0.5  # the focused pixel itself is left visible
