"""Tier 2: Load Depth Model and Estimate Depth on tiny random models in a temp ``models/depth`` folder.

The temp folder is registered through ``folder_paths`` (the stub's, or the real one with
``COMFYUI_PATH``) and unregistered afterwards, so the loader's combo in the committed schema
snapshot stays the empty default listing.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch

from .conftest import COMFY_KIND, PACK_NAME

transformers = pytest.importorskip("transformers")

LOADER = "GenRefocus_DepthModelLoader"
ESTIMATE = "GenRefocus_EstimateDepth"

_BACKBONE = dict(model_type="dinov2", image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4,
                 num_attention_heads=2, intermediate_size=32, out_indices=[1, 2, 3, 4],
                 reshape_hidden_states=False)
_VIT = dict(model_type="dinov2", image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32)


def _tiny_depth_anything():
    torch.manual_seed(0)
    cfg = transformers.DepthAnythingConfig(backbone_config=dict(_BACKBONE), patch_size=14,
                                           reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
                                           fusion_hidden_size=16, head_hidden_size=8)
    return transformers.DepthAnythingForDepthEstimation(cfg).eval()


def _tiny_depth_pro():
    torch.manual_seed(0)
    cfg = transformers.DepthProConfig(patch_size=16, fusion_hidden_size=16, intermediate_hook_ids=[1, 0],
                                      intermediate_feature_dims=[8, 8], scaled_images_ratios=[0.5, 1.0],
                                      scaled_images_overlap_ratios=[0.0, 0.25],
                                      scaled_images_feature_dims=[8, 8],
                                      use_fov_model=True, image_model_config=dict(_VIT),
                                      patch_model_config=dict(_VIT), fov_model_config=dict(_VIT))
    model = transformers.DepthProForDepthEstimation(cfg).eval()
    with torch.no_grad():  # a field of view of 50 degrees, whatever the image
        model.fov_model.head.layers[-1].weight.zero_()
        model.fov_model.head.layers[-1].bias.fill_(50.0)
    return model


@pytest.fixture(scope="module")
def depth_root(tmp_path_factory) -> Path:
    """``<tmp>/models/depth``: two tiny models (one nested), a folder without weights, a stray folder."""
    root = tmp_path_factory.mktemp("comfy") / "models" / "depth"
    _tiny_depth_anything().save_pretrained(root / "TinyDA2")
    (root / "TinyDA2" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 28, "width": 28}, "keep_aspect_ratio": True, "ensure_multiple_of": 14,
         "resample": 3, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    _tiny_depth_pro().save_pretrained(root / "apple" / "TinyDepthPro")
    (root / "NoWeights").mkdir()
    (root / "NoWeights" / "config.json").write_text(json.dumps({"model_type": "depth_anything"}))
    (root / "NotAModel").mkdir()
    (root / "NotAModel" / "readme.txt").write_text("no config here")
    return root


@pytest.fixture
def registered(comfy_pack, depth_root):
    """Register ``depth_root`` under the ``depth`` key for one test, then remove it again."""
    folder_paths = importlib.import_module("folder_paths")
    folder_paths.add_model_folder_path("depth", str(depth_root))
    try:
        yield depth_root
    finally:
        folder_paths.folder_names_and_paths["depth"][0].remove(str(depth_root))


def _frames(b=2, h=30, w=40):
    g = torch.Generator().manual_seed(3)
    return torch.rand(b, h, w, 3, generator=g)


def test_depth_key_is_registered_under_models(comfy_pack):
    folder_paths = importlib.import_module("folder_paths")
    assert "depth" in folder_paths.folder_names_and_paths
    assert os.path.join(folder_paths.models_dir, "depth") in folder_paths.get_folder_paths("depth")


def test_loader_lists_model_folders_only(nodes, registered):
    schema = nodes[LOADER].define_schema()
    options = next(i for i in schema.inputs if i.id == "model_name").options
    assert {"TinyDA2", "apple/TinyDepthPro", "NoWeights"} <= set(options)
    assert "NotAModel" not in options and "apple" not in options


def test_loader_and_estimate_round_trip(nodes, registered):
    utils = importlib.import_module("comfy.utils")
    model = nodes[LOADER].execute(model_name="TinyDA2", dtype="auto").result[0]
    assert model.kind == "depth_anything_v2" and model.device.type == "cpu"
    image = _frames()
    if COMFY_KIND == "stub":
        utils.UPDATES.clear()
    depth, preview = nodes[ESTIMATE].execute(image=image, depth_model=model).result
    assert depth.disparity.shape == (2, 1, 30, 40) and not depth.metric
    assert preview.shape == (2, 30, 40, 3)
    core = model.estimate(image.permute(0, 3, 1, 2))  # the node is the core call on BCHW frames
    torch.testing.assert_close(depth.disparity, core.disparity)
    torch.testing.assert_close(preview[..., 0], depth.disparity[:, 0])  # [0, 1] already: preview = map
    assert model.device.type == "cpu"  # back on the offload device
    if COMFY_KIND == "stub":
        assert utils.UPDATES[-1] == (2, 2)


def test_depth_pro_gives_metric_depth_and_focal(nodes, registered):
    model = nodes[LOADER].execute(model_name="apple/TinyDepthPro", dtype="fp32").result[0]
    depth = nodes[ESTIMATE].execute(image=_frames(b=1, h=24, w=36), depth_model=model).result[0]
    assert depth.metric and depth.source == "depth_pro"
    assert depth.focal_px == pytest.approx(0.5 * 36 / torch.tan(torch.deg2rad(torch.tensor(25.0))).item())
    torch.testing.assert_close(depth.disparity, 1.0 / depth.depth_m)
    # a known focal length (e.g. from EXIF) replaces the estimate: metric depth scales with it
    known = nodes[ESTIMATE].execute(image=_frames(b=1, h=24, w=36), depth_model=model,
                                    focal_px=2.0 * depth.focal_px).result[0]
    assert known.focal_px == pytest.approx(2.0 * depth.focal_px)
    free = (depth.disparity > 2.1e-4) & (depth.disparity < 9e3)  # away from the 1e-4..1e4 clamp
    assert bool(free.any())
    torch.testing.assert_close(known.depth_m[free], 2.0 * depth.depth_m[free], rtol=1e-4, atol=1e-6)


def test_loader_errors_name_the_node(nodes, registered, errors):
    loader = nodes[LOADER]
    with pytest.raises(errors.GenRefocusInputError,
                       match=r"^\[Load Depth Model\] model_name must be a depth model folder .*'Missing'"):
        loader.execute(model_name="Missing", dtype="auto")
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Load Depth Model\] model_name .*'NotAModel'"):
        loader.execute(model_name="NotAModel", dtype="auto")
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Load Depth Model\] dtype must be one of"):
        loader.execute(model_name="TinyDA2", dtype="fp8")
    with pytest.raises(errors.GenRefocusModelError,
                       match=r"^\[Load Depth Model\] no weights .*model\.safetensors.*models/depth/"):
        loader.execute(model_name="NoWeights", dtype="auto")


def test_loader_without_any_model_says_where_to_put_one(nodes, comfy_pack, errors):
    with pytest.raises(errors.GenRefocusInputError, match=r"none found.*models/depth/DepthPro/"):
        nodes[LOADER].execute(model_name="DepthPro", dtype="auto")


def test_estimate_errors_name_the_node(nodes, registered, errors):
    model = nodes[LOADER].execute(model_name="TinyDA2", dtype="auto").result[0]
    node = nodes[ESTIMATE]
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Estimate Depth\] image must hold RGB values"):
        node.execute(image=_frames() * 255, depth_model=model)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Estimate Depth\] image must have 1, 3 or 4"):
        node.execute(image=torch.rand(1, 8, 8, 2), depth_model=model)
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Estimate Depth\] depth_model must come from"):
        node.execute(image=_frames(), depth_model="DepthPro")


def test_estimate_interrupt_still_offloads(nodes, registered):
    mm = importlib.import_module("comfy.model_management")
    model = nodes[LOADER].execute(model_name="TinyDA2", dtype="auto").result[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes[ESTIMATE].execute(image=_frames(), depth_model=model)
    finally:
        mm.interrupt_current_processing(False)
    assert model.device == mm.unet_offload_device()


def test_schema_ids_match_core_names(nodes):
    core = importlib.import_module(f"{PACK_NAME}.genrefocus_core.depth_models")
    ids = [i.id for i in nodes[ESTIMATE].define_schema().inputs]
    assert ids[0] == "image"
    assert "image" in inspect.signature(core.DepthModel.estimate).parameters
