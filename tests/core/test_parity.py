"""Parity with the official Genfocus pipeline on the shared fixtures (tolerances of its README).

Level A injects the fixture's noise and condition tokens (transformer + sampler + decode); level B
runs end to end from ``inputs/`` (resize, D_def map, VAE encode with the official RNG recipe).
Skipped cleanly when ``../shared`` is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.genpipe import processed_size, resize_for_generation
from genrefocus_core.parity import PNG_MAX_FRACTION, PNG_MAX_LEVELS, TOLERANCES, run_case
from genrefocus_core.prompts import PromptEmbedding, load_prompt_embeddings, save_prompt_embeddings

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO.parent / "shared" / "fixtures" / "genfocus-parity"
CASES = sorted(p.name for p in (FIXTURE / "cases").iterdir()) if (FIXTURE / "cases").is_dir() else ["absent"]
SLOW = {"deblur_tiled"}  # 576x640, 4 tiles x 28 steps


pytestmark = pytest.mark.usefixtures("one_thread")


def _params():
    return [pytest.param(c, level, marks=[pytest.mark.slow] if c in SLOW else [])
            for c in CASES for level in ("A", "B")]


@pytest.mark.parametrize(("case", "level"), _params())
def test_case_meets_readme_tolerances(fx, case, level):
    rep = run_case(fx / "cases" / case, fx, level=level)
    assert rep.passed, rep.failures
    d = rep.diffs
    # every tolerance of the level was really measured (nothing silently skipped)
    want = {"scheduler_sigmas", "step_timesteps", "vae_decode_input"}
    if level == "A":
        want.add("step0_model_output")
        if (fx / "cases" / case / "step_latents.npy").is_file():
            want.add("step_latents")
    else:
        n_cond = len(json.loads((fx / "cases" / case / "meta.json").read_text())["generate_calls"][0]
                     ["conditions"])
        want |= {f"cond{i}_tokens" for i in range(n_cond)}
        want |= {"cond1_input_ch0"} if case.startswith("bokeh") else {f"cond{i}_input" for i in range(n_cond)}
        if (fx / "cases" / case / "vae_decode_output.npy").is_file():
            want.add("decoded_image")
    assert want <= set(d), sorted(want - set(d))
    tol = dict(TOLERANCES[level])
    for name in want:
        assert d[name] <= tol[name], (name, d[name])
    if level == "B":
        assert rep.png_max_levels <= PNG_MAX_LEVELS and rep.png_fraction < PNG_MAX_FRACTION
    else:  # injected inputs: the ids, noise and tokens we build are the official ones exactly
        for name in ("init_latents", "latent_image_ids", "cond0_ids", "cond0_tokens"):
            assert d[name] == 0.0, name


def test_cli_writes_the_fixture_files(fx, tmp_path):
    case = fx / "cases" / "deblur_pre_small"
    proc = subprocess.run(
        [sys.executable, "-m", "genrefocus_core.parity", str(case), "--fixture", str(fx),
         "--out", str(tmp_path), "--level", "B", "--threads", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "cond1_tokens" in proc.stdout
    fixture_files = {p.name for p in case.iterdir() if p.suffix in (".npy", ".png")}
    assert fixture_files <= {p.name for p in tmp_path.iterdir()}
    for name in ("step_latents.npy", "cond1_ids.npy"):
        ours, ref = np.load(tmp_path / name), np.load(case / name)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype


def test_resize_rules_reproduce_the_processed_inputs(fx):
    from PIL import Image

    def load(p):
        arr = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()

    for case, src, long_side in (("deblur_small", "blurry_90x140.png", 0),
                                 ("bokeh_point_longside", "aif_128x192.png", 160),
                                 ("bokeh_mask", "aif_128x192.png", 0)):
        img = load(fx / "inputs" / src)
        out, _ = resize_for_generation(img, long_side)
        ref = load(fx / "cases" / case / "cond0_input.png")
        assert out.shape == ref.shape, case
        assert float((out - ref).abs().max()) * 255 < 0.5, case
    assert processed_size(192, 128, 160).crop == (0, 5, 160, 96)
    assert resize_for_generation(img, 0)[0] is img  # multiples of 16: untouched
    with pytest.raises(GenRefocusInputError, match="long_side"):
        processed_size(100, 100, -1)


def test_prompt_embeddings_load_and_verify(fx, tmp_path):
    p = load_prompt_embeddings(fx / "inputs" / "prompt_embeds.safetensors",
                               joint_attention_dim=32, pooled_projection_dim=32)
    assert p["deblur"].prompt == "a sharp photo with everything in focus"
    assert p["bokeh"].prompt_embeds.shape == (1, 32, 32) and p["bokeh"].pooled.shape == (1, 32)
    with pytest.raises(GenRefocusModelError, match=r"deblur.prompt_embeds must have shape \(1, L, 4096\)"):
        load_prompt_embeddings(fx / "inputs" / "prompt_embeds.safetensors", joint_attention_dim=4096)
    with pytest.raises(GenRefocusModelError, match="made by text encoders with hash None"):
        load_prompt_embeddings(fx / "inputs" / "prompt_embeds.safetensors", encoder_hash="abc")
    wrong = {"deblur": PromptEmbedding("a blurry photo", torch.zeros(1, 4, 8), torch.zeros(1, 8))}
    save_prompt_embeddings(tmp_path / "w.safetensors", wrong)
    with pytest.raises(GenRefocusModelError, match="expected the official"):
        load_prompt_embeddings(tmp_path / "w.safetensors", names=("deblur",))
    with pytest.raises(GenRefocusModelError, match=r"must hold 'bokeh\.prompt_embeds'"):
        load_prompt_embeddings(tmp_path / "w.safetensors", names=("bokeh",))
    ok = {"bokeh": PromptEmbedding("an excellent photo with a large aperture", torch.ones(1, 4, 8),
                                   torch.ones(1, 8))}
    save_prompt_embeddings(tmp_path / "h.safetensors", ok, encoder_hash="t5xxl+clipl:1234")
    got = load_prompt_embeddings(tmp_path / "h.safetensors", names=("bokeh",),
                                 encoder_hash="t5xxl+clipl:1234", dtype=torch.bfloat16)
    assert got["bokeh"].prompt_embeds.dtype == torch.bfloat16


def test_runner_rejects_bad_arguments(fx, tmp_path):
    with pytest.raises(GenRefocusInputError, match="level"):
        run_case(fx / "cases" / CASES[0], fx, level="C")
    with pytest.raises(GenRefocusInputError, match=r"meta\.json"):
        run_case(tmp_path, fx)
