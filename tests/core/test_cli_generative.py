"""Tier 1: ``python -m genrefocus_core deblur|bokeh|refocus`` on the tiny fixture FLUX (official argv)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from genrefocus_core.cli import main
from genrefocus_core.defocus import FocusTarget, disparity_from_depth
from genrefocus_core.depth import DepthMap
from genrefocus_core.genpipe import GenerationOptions
from genrefocus_core.imageio import load_depth_file, load_image
from genrefocus_core.models import load_genfocus_models
from genrefocus_core.pipeline import refocus

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"


pytestmark = pytest.mark.usefixtures("one_thread")


def _model_args(fx: Path, *loras: str) -> list[str]:
    files = {"deblur": "deblurNet.safetensors", "pre-deblur": "deblurNet_with_pre_deblur.safetensors",
             "bokeh": "bokehNet.safetensors"}
    args = ["--transformer", str(fx / "model" / "transformer"), "--vae", str(fx / "model" / "vae"),
            "--prompts", str(fx / "inputs" / "prompt_embeds.safetensors")]
    for name in loras:
        args += [f"--lora-{name}", str(fx / "lora" / files[name])]
    return args


def _official_argv(fx: Path, case: str) -> list[str]:
    meta = json.loads((fx / "cases" / case / "meta.json").read_text())
    return [a.replace("{in}", str(fx / "inputs")) for a in meta["argv"]]


def _diff(path: Path, ref: Path) -> np.ndarray:
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    b = np.asarray(Image.open(ref).convert("RGB")).astype(np.int16)
    assert a.shape == b.shape
    return np.abs(a - b)


def test_deblur_small_reproduces_the_official_png(fx, tmp_path):
    out = tmp_path / "deblur.png"
    argv = ["deblur", *_official_argv(fx, "deblur_small"), "--steps", "28", "-o", str(out),
            *_model_args(fx, "deblur")]
    assert main(argv) == 0
    assert _diff(out, fx / "cases" / "deblur_small" / "output.png").max() <= 1


def test_official_bokeh_argv_with_official_geometry(fx, tmp_path):
    out = tmp_path / "bokeh.png"
    argv = ["bokeh", *_official_argv(fx, "bokeh_point_longside"), "--geometry", "official",
            "--output", str(out), *_model_args(fx, "bokeh")]
    assert main(argv) == 0
    d = _diff(out, fx / "cases" / "bokeh_point_longside" / "output.png")
    assert d.max() <= 2 and (d > 0).mean() < 1e-3


def test_official_pre_deblur_argv(fx, tmp_path):
    out = tmp_path / "pre.png"
    argv = ["deblur", *_official_argv(fx, "deblur_pre_small"), "-o", str(out), *_model_args(fx, "pre-deblur")]
    assert main(argv) == 0
    d = _diff(out, fx / "cases" / "deblur_pre_small" / "output.png")
    assert d.max() <= 2 and (d > 0).mean() < 1e-3


def test_refocus_writes_what_the_pipeline_computes(fx, tmp_path):
    out, aif = tmp_path / "refocus.png", tmp_path / "aif.png"
    blurry, depth = fx / "inputs" / "blurry_90x140.png", fx / "inputs" / "depth_64x96.npy"
    argv = ["refocus", "-i", str(blurry), "--depth", str(depth), "--point", "40,30", "-k", "30",
            "--steps", "2", "--noise", "seeded", "--seed", "5", "-o", str(out), "--aif-output", str(aif),
            *_model_args(fx, "deblur", "bokeh")]
    assert main(argv) == 0
    models = load_genfocus_models(fx / "model" / "transformer", fx / "model" / "vae",
                                  fx / "inputs" / "prompt_embeds.safetensors",
                                  deblur_lora=fx / "lora" / "deblurNet.safetensors",
                                  bokeh_lora=fx / "lora" / "bokehNet.safetensors")
    depth_m = load_depth_file(depth)
    given = DepthMap(disparity_from_depth(depth_m), True, depth_m)
    ref = refocus(load_image(blurry), models=models, depth=given,
                  focus=FocusTarget("point", x=40 / 140, y=30 / 90), k=30.0,
                  options=GenerationOptions(steps=2, noise="seeded", seed=5))
    torch.testing.assert_close(load_image(out), ref.image, rtol=0, atol=0)
    torch.testing.assert_close(load_image(aif), ref.aif, rtol=0, atol=0)


def test_restore_size_and_k_zero_needs_no_depth(fx, tmp_path):
    out = tmp_path / "aif.png"
    argv = ["refocus", "-i", str(fx / "inputs" / "blurry_90x140.png"), "-k", "0", "--steps", "1",
            "--restore-size", "-o", str(out), *_model_args(fx, "deblur", "bokeh")]
    assert main(argv) == 0
    assert load_image(out).shape == (1, 3, 90, 140)


def test_bad_arguments_exit_2_with_a_message(fx, tmp_path, caplog):
    blurry = str(fx / "inputs" / "blurry_90x140.png")
    out = str(tmp_path / "x.png")
    cases = [
        (["deblur", "-i", blurry, "-o", out, *_model_args(fx)], "--lora-deblur must be given"),
        (["deblur", "-i", blurry, "-o", out, "--pre-deblur", blurry, *_model_args(fx, "deblur")],
         "--lora-pre-deblur must be given"),
        (["deblur", "-i", blurry, "-o", out, "--steps", "101", *_model_args(fx, "deblur")],
         "steps must be in 1..100, got 101"),
        (["bokeh", "-i", blurry, "-o", out, "--point", "500,10", "--depth",
          str(fx / "inputs" / "depth_64x96.npy"), *_model_args(fx, "bokeh")],
         "--point must lie inside the 140x90 input image"),
        (["bokeh", "-i", blurry, "-o", out, *_model_args(fx, "bokeh")],
         "--depth or --depth-model must be given"),
        (["deblur", "-i", blurry, "-o", out, "--transformer", str(tmp_path / "missing.safetensors"),
          "--vae", str(fx / "model" / "vae"), "--prompts", str(fx / "inputs" / "prompt_embeds.safetensors"),
          "--lora-deblur", str(fx / "lora" / "deblurNet.safetensors")], "missing.safetensors' not found"),
    ]
    for argv, msg in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="genrefocus_core.cli"):
            assert main(argv) == 2, argv
        messages = [r.getMessage() for r in caplog.records]
        assert any(msg in m for m in messages), (msg, messages)
    assert not Path(out).exists()
