"""Tier 1: depth estimators through transformers, on tiny random Depth Pro / Depth Anything V2 models.

The tiny models are built from configs in code, saved with ``save_pretrained`` into a temp folder and
read back through ``load_depth_model``, the way a user's downloaded folder is read. Expected values
come from the raw ``transformers`` forward pass plus the upstream post-processing formulas
(apple/ml-depth-pro ``infer``; transformers' DPT/Depth Pro post-processing), never from our output.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from genrefocus_core.depth_models import load_depth_model
from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]

# Depth Pro: 2 scales (ratios 0.5, 1) of a 16 px "patch", so the network input is 16 / 0.5 = 32 px;
# ViTs of 2 layers, width 16, ViT patch 4. Same structure as the released model, ~80k parameters.
_VIT = dict(model_type="dinov2", image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=32)
TINY_DEPTH_PRO = dict(patch_size=16, fusion_hidden_size=16, intermediate_hook_ids=[1, 0],
                      intermediate_feature_dims=[8, 8], scaled_images_ratios=[0.5, 1.0],
                      scaled_images_overlap_ratios=[0.0, 0.25], scaled_images_feature_dims=[8, 8],
                      num_fov_head_layers=2)
DEPTH_PRO_FOV_DEG = 60.0  # the fov head's last conv is set to output exactly this
DEPTH_PRO_SIDE = 32

# Depth Anything V2: DINOv2 backbone of 4 layers (4 hooked stages, as the real model), width 16, patch 14.
_BACKBONE = dict(model_type="dinov2", image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4,
                 num_attention_heads=2, intermediate_size=32, out_indices=[1, 2, 3, 4],
                 reshape_hidden_states=False)
TINY_DA = dict(patch_size=14, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
               fusion_hidden_size=16, head_hidden_size=8)
DA_MEAN = [0.485, 0.456, 0.406]
DA_STD = [0.229, 0.224, 0.225]
DA_PROC = {"do_resize": True, "size": {"height": 28, "width": 28}, "keep_aspect_ratio": True,
           "ensure_multiple_of": 14, "resample": 3, "do_normalize": True, "image_mean": DA_MEAN,
           "image_std": DA_STD, "do_pad": False, "image_processor_type": "DPTImageProcessor"}
DP_PROC = {"do_resize": True, "size": {"height": DEPTH_PRO_SIDE, "width": DEPTH_PRO_SIDE}, "resample": 2,
           "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
           "image_processor_type": "DepthProImageProcessor"}


def _save(model, folder: Path, proc: dict | None) -> Path:
    model.save_pretrained(folder)
    if proc is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(proc))
    return folder


def _depth_pro(use_fov: bool = True):
    torch.manual_seed(0)
    cfg = transformers.DepthProConfig(**TINY_DEPTH_PRO, use_fov_model=use_fov, image_model_config=dict(_VIT),
                                      patch_model_config=dict(_VIT), fov_model_config=dict(_VIT))
    model = transformers.DepthProForDepthEstimation(cfg).eval()
    if use_fov:
        last = model.fov_model.head.layers[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.fill_(DEPTH_PRO_FOV_DEG)
    with torch.no_grad():  # keep the depth head off its ReLU floor: depths stay finite, never clamped
        model.head.layers[-2].weight.abs_().mul_(0.05)  # inputs are post-ReLU: output >= bias
        model.head.layers[-2].bias.fill_(1.0)
    return model


def _depth_anything(metric: bool = False):
    torch.manual_seed(1)
    extra = dict(depth_estimation_type="metric", max_depth=20) if metric else {}
    cfg = transformers.DepthAnythingConfig(backbone_config=dict(_BACKBONE), **TINY_DA, **extra)
    return transformers.DepthAnythingForDepthEstimation(cfg).eval()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("depth")
    _save(_depth_pro(), root / "DepthPro", DP_PROC)
    _save(_depth_pro(use_fov=False), root / "DepthProNoFov", DP_PROC)
    _save(_depth_anything(), root / "DA2", DA_PROC)
    _save(_depth_anything(metric=True), root / "DA2Metric", DA_PROC)
    return root


@pytest.fixture(scope="module")
def depth_pro(models_dir):
    return load_depth_model(models_dir / "DepthPro")


@pytest.fixture(scope="module")
def da2(models_dir):
    return load_depth_model(models_dir / "DA2")


def _img(b=1, h=32, w=32, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- smoke / cardinality -----------------------------------------------------------------------------


def test_kind_is_inferred_from_config(models_dir, depth_pro, da2):
    assert depth_pro.kind == "depth_pro" and depth_pro.metric
    assert da2.kind == "depth_anything_v2" and not da2.metric
    metric = load_depth_model(models_dir / "DA2Metric", kind="depth_anything_v2")
    assert metric.metric and metric.source == "depth_anything_v2_metric"
    assert depth_pro.device == torch.device("cpu") and depth_pro.dtype == torch.float32


@pytest.mark.parametrize("size", [(37, 45), (30, 19), (DEPTH_PRO_SIDE, DEPTH_PRO_SIDE)])
def test_output_is_resized_back_to_the_input(depth_pro, da2, size):
    image = _img(h=size[0], w=size[1])
    for model in (depth_pro, da2):
        dm = model.estimate(image)
        assert dm.disparity.shape == (1, 1, *size), model.kind
        assert dm.size == size
        assert torch.isfinite(dm.disparity).all()
    dm = depth_pro.estimate(image)
    assert dm.depth_m.shape == (1, 1, *size)


def test_batch_of_two_equals_two_singles_and_reports_progress(depth_pro, da2):
    image = torch.cat([_img(h=29, w=41, seed=1), _img(h=29, w=41, seed=2)])
    for model in (depth_pro, da2):
        steps: list[tuple[int, int]] = []
        both = model.estimate(image, on_step=lambda i, n, steps=steps: steps.append((i, n)))
        assert steps == [(1, 2), (2, 2)]
        singles = torch.cat([model.estimate(image[i : i + 1]).disparity for i in range(2)])
        torch.testing.assert_close(both.disparity, singles)
        assert not torch.allclose(both.disparity[0], both.disparity[1])  # per-frame, not one map copied


# --- feature: conventions against the raw transformers output -------------------------------------


def test_depth_pro_metric_depth_and_focal_follow_upstream(depth_pro):
    image = _img(seed=3)  # at the network size: no resize of the input
    dm = depth_pro.estimate(image)
    pixel = (image - 0.5) / 0.5
    with torch.no_grad():
        raw = depth_pro.module(pixel_values=pixel)
    assert float(raw.field_of_view[0]) == pytest.approx(DEPTH_PRO_FOV_DEG)
    f_px = 0.5 * DEPTH_PRO_SIDE / math.tan(math.radians(DEPTH_PRO_FOV_DEG / 2))
    inverse = raw.predicted_depth[:, None] * DEPTH_PRO_SIDE / f_px  # canonical inverse depth -> 1/m
    inverse = F.interpolate(inverse, size=(DEPTH_PRO_SIDE,) * 2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(dm.depth_m, 1.0 / inverse.clamp(1e-4, 1e4))
    assert dm.metric and dm.unit == "1/m" and dm.source == "depth_pro"
    assert dm.focal_px == pytest.approx(f_px)
    torch.testing.assert_close(dm.disparity, 1.0 / dm.depth_m, rtol=0, atol=0)  # exactly 1/depth


def test_depth_pro_focal_is_in_pixels_of_the_input_width(depth_pro):
    wide = depth_pro.estimate(_img(h=40, w=90))
    expected = 0.5 * 90 / math.tan(math.radians(DEPTH_PRO_FOV_DEG / 2))
    assert wide.focal_px == pytest.approx(expected)


def test_depth_pro_given_focal_scales_depth(depth_pro):
    image = _img(h=36, w=48, seed=4)
    predicted = depth_pro.estimate(image)
    given = depth_pro.estimate(image, focal_px=2.0 * predicted.focal_px)
    assert given.focal_px == pytest.approx(2.0 * predicted.focal_px)
    # depth = f_px / (W * canonical): doubling the focal length doubles every (unclamped) depth
    torch.testing.assert_close(given.depth_m, 2.0 * predicted.depth_m)


def test_depth_pro_without_fov_head(models_dir, caplog):
    model = load_depth_model(models_dir / "DepthProNoFov")
    image = _img(seed=5)
    dm = model.estimate(image)
    assert dm.metric and dm.focal_px is None
    assert "no field-of-view head" in caplog.text
    with torch.no_grad():
        raw = model.module(pixel_values=(image - 0.5) / 0.5).predicted_depth[:, None]
    inverse = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(dm.depth_m, 1.0 / inverse.clamp(1e-4, 1e4))
    assert model.estimate(image, focal_px=64.0).focal_px == 64.0


def test_relative_disparity_keeps_model_order_and_is_normalised(da2):
    image = _img(h=28, w=28, seed=6)  # at the processor size: no resize of the input
    dm = da2.estimate(image)
    mean = torch.tensor(DA_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DA_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = da2.module(pixel_values=(image - mean) / std).predicted_depth[:, None]
    lo, hi = raw.amin(), raw.amax()
    torch.testing.assert_close(dm.disparity, (raw - lo) / (hi - lo))  # near = larger, as the model says
    assert not dm.metric and dm.depth_m is None and dm.source == "depth_anything_v2"
    assert float(dm.disparity.min()) == 0.0 and float(dm.disparity.max()) == 1.0
    assert int(dm.disparity.argmax()) == int(raw.argmax()) and int(dm.disparity.argmin()) == int(raw.argmin())


def test_relative_map_on_other_sizes_is_in_unit_range(da2):
    dm = da2.estimate(_img(b=2, h=33, w=47, seed=7))
    for b in range(2):
        assert float(dm.disparity[b].min()) == 0.0 and float(dm.disparity[b].max()) == 1.0


def test_depth_anything_keeps_aspect_ratio_in_multiples_of_the_patch(da2):
    seen = []
    hook = da2.module.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True
    )
    try:
        da2.estimate(_img(h=56, w=112))  # 28 / 56 is closer to 1 than 28 / 112: fit the height
    finally:
        hook.remove()
    assert tuple(seen[0][-2:]) == (28, 56)


def test_preprocessing_matches_the_transformers_image_processors(models_dir, depth_pro, da2):
    pytest.importorskip("torchvision")  # transformers' processors need it (ComfyUI's venv has it)
    image = _img(h=37, w=45, seed=9)
    for model, cls_name, folder in ((da2, "DPTImageProcessor", "DA2"),
                                    (depth_pro, "DepthProImageProcessor", "DepthPro")):
        proc = getattr(transformers, cls_name).from_pretrained(models_dir / folder, local_files_only=True)
        ref = proc(images=image[0], return_tensors="pt", do_rescale=False)["pixel_values"]
        seen = []
        hook = model.module.register_forward_pre_hook(
            lambda m, args, kwargs, seen=seen: seen.append(kwargs["pixel_values"]), with_kwargs=True
        )
        try:
            model.estimate(image)
        finally:
            hook.remove()
        torch.testing.assert_close(seen[0], ref, atol=1e-5, rtol=1e-5)


def test_metric_depth_anything_outputs_metres(models_dir):
    model = load_depth_model(models_dir / "DA2Metric")
    image = _img(h=28, w=28, seed=8)
    dm = model.estimate(image)
    mean = torch.tensor(DA_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(DA_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = model.module(pixel_values=(image - mean) / std).predicted_depth[:, None]
    torch.testing.assert_close(dm.depth_m, raw)  # sigmoid * max_depth: metres
    assert dm.metric and float(dm.depth_m.max()) <= 20.0
    torch.testing.assert_close(dm.disparity, 1.0 / dm.depth_m, rtol=0, atol=0)


def test_half_precision_is_refused_on_cpu_but_kept_for_accelerators(models_dir):
    model = load_depth_model(models_dir / "DA2", dtype=torch.float16)
    assert model.dtype == torch.float32  # the CPU computes in float32
    assert model.memory_bytes("cpu") == 2 * model.memory_bytes(torch.device("cuda"))  # fp16 there


def test_results_follow_the_input_device_and_dtype(da2):
    dm = da2.estimate(_img(h=20, w=20).double())
    assert dm.disparity.dtype == torch.float64 and dm.disparity.device.type == "cpu"
    dm.disparity.mul_(1.0)  # ordinary tensors, not inference-mode ones: in-place updates work later


# --- exception --------------------------------------------------------------------------------------


def test_missing_folder_and_hub_ids_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GenRefocusModelError, match=r"does not exist.*nothing is downloaded") as e:
        load_depth_model("apple/DepthPro-hf")
    assert "models/depth/DepthPro/" in str(e.value) and "model.safetensors" in str(e.value)
    with pytest.raises(GenRefocusModelError, match="does not exist"):
        load_depth_model(tmp_path / "nowhere")


def test_folder_without_config_or_weights_says_what_to_put_where(tmp_path, models_dir):
    empty = tmp_path / "DepthPro"
    empty.mkdir()
    with pytest.raises(GenRefocusModelError, match=r"config\.json is missing.*models/depth/DepthPro/"):
        load_depth_model(empty)
    (empty / "config.json").write_text((models_dir / "DepthPro" / "config.json").read_text())
    hint = r"no weights .*model\.safetensors.*models/depth/DepthPro/"
    with pytest.raises(GenRefocusModelError, match=hint):
        load_depth_model(empty)
    with pytest.raises(GenRefocusModelError, match="is a file"):
        load_depth_model(models_dir / "DepthPro" / "model.safetensors")


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, models_dir):
    folder = tmp_path / "DA2Bigger"
    folder.mkdir()
    cfg = json.loads((models_dir / "DA2" / "config.json").read_text())
    cfg["backbone_config"]["num_hidden_layers"] = 5  # a layer the weights do not have
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((models_dir / "DA2" / "model.safetensors").read_bytes())
    with pytest.raises(GenRefocusModelError, match=r"do not fit its config\.json: \d+ parameter\(s\) miss"):
        load_depth_model(folder)
    cfg = json.loads((models_dir / "DA2" / "config.json").read_text())
    cfg["fusion_hidden_size"] = 32  # same keys, other shapes
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GenRefocusModelError, match=r"do not fit its config\.json: 0 .* \d+ of another shape"):
        load_depth_model(folder)


def test_unsupported_model_type_and_wrong_kind(tmp_path, models_dir):
    with pytest.raises(GenRefocusModelError, match="holds a depth_anything_v2 model"):
        load_depth_model(models_dir / "DA2", kind="depth_pro")
    with pytest.raises(GenRefocusInputError, match="kind must be one of"):
        load_depth_model(models_dir / "DA2", kind="midas")
    with pytest.raises(GenRefocusInputError, match="dtype must be"):
        load_depth_model(models_dir / "DA2", dtype=torch.int8)
    other = tmp_path / "dpt"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "dpt"}))
    with pytest.raises(GenRefocusModelError, match="model_type 'dpt'"):
        load_depth_model(other)


def test_bad_images_are_refused(da2):
    with pytest.raises(GenRefocusInputError, match=r"image must have 3 channel"):
        da2.estimate(torch.rand(1, 4, 16, 16))
    with pytest.raises(GenRefocusInputError, match=r"\[0, 1\].*255"):
        da2.estimate(torch.rand(1, 3, 16, 16) * 255)
    with pytest.raises(GenRefocusInputError, match="finite"):
        da2.estimate(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(GenRefocusInputError, match="focal_px must be >"):
        da2.estimate(torch.rand(1, 3, 16, 16), focal_px=0.0)


def test_module_import_does_not_import_transformers():
    code = ("import sys; import genrefocus_core.depth_models as m; "
            "assert 'transformers' not in sys.modules, 'eager transformers import'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
