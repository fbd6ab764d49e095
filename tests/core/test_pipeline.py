"""Tier 1: the staged Genfocus pipeline (resize → DeblurNet → depth → D_def → BokehNet) on the tiny
fixture FLUX of ``../shared/fixtures/genfocus-parity`` (skipped cleanly when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from genrefocus_core.conditions import resize_for_generation
from genrefocus_core.defocus import (
    FocusTarget,
    defocus_condition_map,
    defocus_map,
    disparity_from_depth,
    resize_like,
)
from genrefocus_core.depth import DepthMap
from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.genpipe import GenerationOptions, GenfocusModels, bokeh, deblur
from genrefocus_core.imageio import load_depth_file, load_image, load_mask
from genrefocus_core.models import ADAPTER_BOKEH, ADAPTER_DEBLUR, load_genfocus_models
from genrefocus_core.pipeline import bokeh_image, check_inputs, deblur_image, refocus

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
STEPS = GenerationOptions(steps=3)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(fx) -> GenfocusModels:
    return load_genfocus_models(
        fx / "model" / "transformer",
        fx / "model" / "vae",
        fx / "inputs" / "prompt_embeds.safetensors",
        deblur_lora=fx / "lora" / "deblurNet.safetensors",
        bokeh_lora=fx / "lora" / "bokehNet.safetensors",
        pre_deblur_lora=fx / "lora" / "deblurNet_with_pre_deblur.safetensors",
    )


@pytest.fixture(scope="module")
def blurry(fx) -> torch.Tensor:
    return load_image(fx / "inputs" / "blurry_90x140.png")


@pytest.fixture(scope="module")
def depth(fx) -> DepthMap:
    depth_m = load_depth_file(fx / "inputs" / "depth_64x96.npy")
    return DepthMap(disparity_from_depth(depth_m), metric=True, depth_m=depth_m, source="npy")


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _levels(image: torch.Tensor) -> np.ndarray:
    return np.round(image[0].permute(1, 2, 0).numpy() * 255.0).astype(np.int16)


def test_refocus_equals_deblur_then_bokeh_by_hand(models, blurry, depth):
    focus = FocusTarget("point", x=0.3, y=0.6)
    out = refocus(blurry, models=models, depth=depth, focus=focus, k=30.0, options=STEPS)
    # by hand: the official CLI order of operations
    img, info = resize_for_generation(blurry)
    aif = deblur(models, img, adapter=ADAPTER_DEBLUR, options=STEPS).image
    disp = disparity_from_depth(resize_like(depth.depth_m, tuple(img.shape[-2:])))
    d_def = defocus_condition_map(defocus_map(disp, focus, 30.0, metric=True).coc)
    ref = bokeh(models, aif, d_def, adapter=ADAPTER_BOKEH, options=STEPS).image
    assert out.info == info and out.image.shape == (1, 3, 96, 144)
    torch.testing.assert_close(out.aif, aif, rtol=0, atol=0)
    torch.testing.assert_close(out.defocus, d_def, rtol=0, atol=0)
    torch.testing.assert_close(out.image, ref, rtol=0, atol=0)
    assert not torch.equal(out.image, out.aif)  # BokehNet really ran
    assert float(out.defocus.max()) > 0


def test_k_zero_returns_the_deblurred_image_and_skips_bokeh(models, blurry, depth):
    calls = []
    out = refocus(blurry, models=models, depth=depth, k=0.0, options=STEPS,
                  on_step=lambda i, n: calls.append(n))
    ref = deblur_image(blurry, models=models, options=STEPS)
    torch.testing.assert_close(out.image, ref.image, rtol=0, atol=0)
    assert out.image is out.aif and out.defocus is None and out.coc is None and out.depth is None
    assert calls and set(calls) == {STEPS.steps}  # one denoise only


def test_k_zero_needs_no_depth(models, blurry):
    out = refocus(blurry, models=models, k=0.0, options=GenerationOptions(steps=1))
    assert out.image.shape == (1, 3, 96, 144)


def test_restore_size_gives_the_input_size(models, blurry, depth):
    out = refocus(blurry, models=models, depth=depth, k=20.0, options=STEPS, restore_size=True)
    assert out.image.shape == (1, 3, 90, 140) and out.aif.shape == (1, 3, 90, 140)
    assert out.defocus.shape == (1, 1, 96, 144)  # maps stay at the processed size
    cropped = deblur_image(blurry, models=models, options=STEPS, long_side=120, restore_size=True)
    assert cropped.info.size == (112, 64) and cropped.image.shape == (1, 3, 90, 140)
    assert float(cropped.image.min()) >= 0 and float(cropped.image.max()) <= 1


def test_interrupt_leaves_models_usable(models, blurry, depth):
    clean = refocus(blurry, models=models, depth=depth, k=25.0, options=STEPS)

    class Stop(Exception):
        pass

    def stop_in_bokeh(i, n):
        if i == STEPS.steps + 2:
            raise Stop

    with pytest.raises(Stop):
        refocus(blurry, models=models, depth=depth, k=25.0, options=STEPS, on_step=stop_in_bokeh)
    again = refocus(blurry, models=models, depth=depth, k=25.0, options=STEPS)
    torch.testing.assert_close(again.image, clean.image, rtol=0, atol=0)


def test_batch_is_processed_frame_by_frame_with_one_progress(models, blurry, depth):
    frames = torch.cat([blurry, blurry.flip(-1)])
    seen = []
    out = refocus(frames, models=models, depth=depth, k=25.0, options=STEPS,
                  on_step=lambda i, n: seen.append((i, n)))
    second = refocus(frames[1:], models=models, depth=depth, k=25.0, options=STEPS)
    torch.testing.assert_close(out.image[1:], second.image, rtol=0, atol=0)
    total = 2 * 2 * STEPS.steps  # two frames, two denoises each, untiled
    assert [i for i, _ in seen] == list(range(1, total + 1)) and {n for _, n in seen} == {total}
    assert out.depth.disparity.shape == (2, 1, 96, 144) and out.coc.focus_disparity.shape == (2,)


def test_tiled_progress_counts_every_tile(models):
    img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    seen = []
    opts = GenerationOptions(steps=2, tiling="on", tile_size=16, tile_batch=2, noise="seeded", seed=3)
    deblur_image(img, models=models, options=opts, on_step=lambda i, n: seen.append((i, n)))
    assert seen[-1] == (seen[-1][1], 2 * 6)  # 2 steps x (2 rows x 3 columns of 1-token tiles)


def test_depth_model_runs_on_the_deblurred_image(models, blurry):
    transformers = pytest.importorskip("transformers")
    from genrefocus_core.depth_models import load_depth_model

    torch.manual_seed(0)
    backbone = dict(model_type="dinov2", image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4,
                    num_attention_heads=2, intermediate_size=32, out_indices=[1, 2, 3, 4],
                    reshape_hidden_states=False)
    cfg = transformers.DepthAnythingConfig(backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
                                           neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=16,
                                           head_hidden_size=8)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        transformers.DepthAnythingForDepthEstimation(cfg).eval().save_pretrained(d)
        dm = load_depth_model(d)
        seen = []
        out = refocus(blurry, models=models, depth_model=dm, k=40.0, options=STEPS,
                      on_step=lambda i, n: seen.append((i, n)))
        expected_depth = dm.estimate(out.aif)
    torch.testing.assert_close(out.depth.disparity, expected_depth.disparity)
    assert not out.depth.metric
    assert seen[-1] == (2 * STEPS.steps + 1, 2 * STEPS.steps + 1)  # + one depth frame
    given = refocus(blurry, models=models, depth=expected_depth, k=40.0, options=STEPS)
    torch.testing.assert_close(given.image, out.image, rtol=0, atol=0)


def test_bokeh_image_reproduces_the_official_mask_case(models, fx, depth):
    """bokeh_mask through the pipeline with official geometry: the fixture PNG within README tolerances."""
    meta = json.loads((fx / "cases" / "bokeh_mask" / "meta.json").read_text())
    assert meta["case"]["argv"][-1] == "28"
    mask = load_mask(fx / "inputs" / "mask_128x192.png")
    out = bokeh_image(load_image(fx / "inputs" / "aif_128x192.png"), models=models, depth=depth,
                      focus=FocusTarget("mask", mask=mask, threshold=0.0), k=15.0,
                      options=GenerationOptions(steps=28), geometry="official")
    ref = _png(fx / "cases" / "bokeh_mask" / "output.png")
    d = np.abs(_levels(out.image) - ref)
    assert d.max() <= 2 and (d > 0).mean() < 1e-3
    ref_def = np.load(fx / "cases" / "bokeh_mask" / "cond1_input_ch0.npy")
    np.testing.assert_allclose(out.defocus[0, 0].numpy(), ref_def, atol=1e-6)


def test_aligned_geometry_follows_the_crop_and_official_ignores_it(models, fx, depth):
    aif = load_image(fx / "inputs" / "aif_128x192.png")
    focus = FocusTarget("point", x=58 / 192, y=74 / 128)
    kw = dict(models=models, depth=depth, focus=focus, k=30.0, options=GenerationOptions(steps=28),
              long_side=160)
    official = bokeh_image(aif, geometry="official", **kw)
    ref_def = np.load(fx / "cases" / "bokeh_point_longside" / "cond1_input_ch0.npy")
    np.testing.assert_allclose(official.defocus[0, 0].numpy(), ref_def, atol=1e-6)
    d = np.abs(_levels(official.image) - _png(fx / "cases" / "bokeh_point_longside" / "output.png"))
    assert d.max() <= 2 and (d > 0).mean() < 1e-3
    aligned = bokeh_image(aif, geometry="aligned", **kw)
    # the crop (rows 5..100 of the 160x106 scaled image) moves the map by 5 rows: not the stretched one
    assert not torch.allclose(aligned.defocus, official.defocus)
    # the aligned focus lies on the clicked scene point: CoC there is 0 on the depth of that pixel
    sw, sh = aligned.info.scaled_size
    tx, ty = int(58 / 192 * sw), int(74 / 128 * sh) - aligned.info.crop[1]
    assert abs(float(aligned.coc.coc[0, 0, ty, tx])) < 1e-4


def test_pre_deblur_variant_reproduces_the_official_case(models, fx):
    out = deblur_image(load_image(fx / "inputs" / "blurry_90x140.png"), models=models,
                       pre_deblurred=load_image(fx / "inputs" / "pre_deblur_90x140.png"),
                       options=GenerationOptions(steps=28))
    d = np.abs(_levels(out.image) - _png(fx / "cases" / "deblur_pre_small" / "output.png"))
    assert d.max() <= 2 and (d > 0).mean() < 1e-3


def test_check_inputs_names_the_parameter(models, blurry, depth):
    cases = [
        (dict(image=torch.rand(1, 3, 8, 40)), r"image must be at least 16x16 px, got 8x40"),
        (dict(image=torch.rand(1, 4, 32, 32)), r"image must be RGB with 3 channels"),
        (dict(image=torch.rand(1, 3, 32, 32) * 255), r"image must hold values in \[0, 1\]"),
        (dict(options=GenerationOptions(steps=101)), r"steps must be in 1\.\.100, got 101"),
        (dict(long_side=8), r"long_side must be 0"),
        (dict(geometry="stretch"), r"geometry must be one of aligned, official"),
        (dict(k=-1.0), r"k must be >= 0"),
        (dict(depth=None), r"exactly one of depth_model and depth .* got neither"),
        (dict(depth=depth.disparity), r"depth must be a DepthMap"),
        (dict(pre_deblurred=torch.rand(3, 3, 20, 20)), r"pre_deblurred must have batch size 1 or 1"),
        (dict(focus=FocusTarget("mask", mask=torch.ones(2, 1, 4, 4))), r"focus.mask must have batch size 1"),
    ]
    for change, msg in cases:
        kw = dict(image=blurry, models=models, depth=depth, k=20.0) | change
        with pytest.raises(GenRefocusInputError, match=msg):
            check_inputs(kw.pop("image"), **kw)
    with pytest.raises(GenRefocusInputError, match=r"steps must be in 1\.\.100"):  # before any compute
        refocus(blurry, models=models, depth=depth, options=GenerationOptions(steps=500))


def test_defocus_map_must_match_the_aif(models, fx, depth):
    aif = load_image(fx / "inputs" / "aif_128x192.png")
    dm = defocus_map(depth.disparity, FocusTarget(), 20.0, metric=True)  # 64x96: neither size
    with pytest.raises(GenRefocusInputError, match=r"defocus must have the size of the all-in-focus image"):
        bokeh_image(aif, models=models, defocus=dm)
    at_size = defocus_map(resize_like(depth.disparity, (128, 192)), FocusTarget(), 20.0, metric=True)
    out = bokeh_image(aif, models=models, defocus=at_size, options=STEPS)
    ref = bokeh_image(aif, models=models, depth=DepthMap(at_size.disparity, metric=True), k=20.0,
                      options=STEPS)
    torch.testing.assert_close(out.image, ref.image, rtol=0, atol=0)


def test_missing_lora_is_a_model_error_saying_which_file(fx, blurry, depth):
    only_deblur = load_genfocus_models(
        fx / "model" / "transformer",
        fx / "model" / "vae",
        fx / "inputs" / "prompt_embeds.safetensors",
        deblur_lora=fx / "lora" / "deblurNet.safetensors",
    )
    with pytest.raises(GenRefocusModelError, match=r"'bokeh' is not loaded .*bokehNet\.safetensors"):
        refocus(blurry, models=only_deblur, depth=depth, k=20.0, options=STEPS)
    with pytest.raises(GenRefocusModelError, match=r"'deblurring_pre' is not loaded"):
        deblur_image(blurry, models=only_deblur, pre_deblurred=blurry, options=STEPS)
    assert deblur_image(blurry, models=only_deblur, options=STEPS).image.shape == (1, 3, 96, 144)
