"""Tier 2: Load Genfocus Models, Tiled Denoise Settings, DeblurNet, BokehNet and Refocus on the tiny
fixture FLUX of ``../shared/fixtures/genfocus-parity``, placed in a temp models tree registered
through ``folder_paths`` (the stub's, or the real one with ``COMFYUI_PATH``) and unregistered
afterwards. The node outputs must equal the core calls on the same inputs."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

from .conftest import COMFY_KIND, PACK_NAME

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
LOADER, TILED = "GenRefocus_ModelLoader", "GenRefocus_TiledDenoise"
DEBLUR, BOKEH, REFOCUS = "GenRefocus_DeblurNet", "GenRefocus_BokehNet", "GenRefocus_Refocus"
SAMPLER = dict(steps=2, seed=0, noise="reference", long_side=0, restore_size=True)


def _core(name):
    return importlib.import_module(f"{PACK_NAME}.genrefocus_core.{name}")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    """``<tmp>/models`` laid out as a user would: a diffusers folder, LoRAs in loras/genfocus, prompts."""
    if not (FIXTURE / "model").is_dir():
        pytest.skip("../shared/fixtures/genfocus-parity is not present beside the checkout")
    root = tmp_path_factory.mktemp("comfy") / "models"
    (root / "diffusers").mkdir(parents=True)
    os.symlink(FIXTURE / "model", root / "diffusers" / "tiny-flux", target_is_directory=True)
    (root / "loras" / "genfocus").mkdir(parents=True)
    for name in ("deblurNet", "bokehNet", "deblurNet_with_pre_deblur"):
        os.symlink(
            FIXTURE / "lora" / f"{name}.safetensors", root / "loras" / "genfocus" / f"{name}.safetensors"
        )
    (root / "genrefocus").mkdir()
    os.symlink(
        FIXTURE / "inputs" / "prompt_embeds.safetensors", root / "genrefocus" / "genfocus_prompts.safetensors"
    )
    return root


@pytest.fixture(scope="module")
def registered(comfy_pack, models_root):
    folder_paths = importlib.import_module("folder_paths")
    added = [(key, str(models_root / key)) for key in ("diffusers", "loras", "genrefocus")]
    for key, path in added:
        folder_paths.add_model_folder_path(key, path)
    try:
        yield models_root
    finally:
        for key, path in added:
            folder_paths.folder_names_and_paths[key][0].remove(path)


LOADER_ARGS = dict(
    transformer="diffusers/tiny-flux",
    vae="diffusers/tiny-flux",
    deblur_lora="genfocus/deblurNet.safetensors",
    bokeh_lora="genfocus/bokehNet.safetensors",
    pre_deblur_lora="none",
    prompts="genfocus_prompts.safetensors",
    dtype="auto",
    keep_loaded=False,
)


@pytest.fixture(scope="module")
def pipe(nodes, registered):
    return nodes[LOADER].execute(**LOADER_ARGS).result[0]


def _photo(b=1, h=30, w=40, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _options(**kw):
    return _core("genpipe").GenerationOptions(steps=2, **kw)


def test_genrefocus_key_is_registered_under_models(comfy_pack):
    folder_paths = importlib.import_module("folder_paths")
    assert os.path.join(folder_paths.models_dir, "genrefocus") in folder_paths.get_folder_paths("genrefocus")


def test_loader_without_files_says_where_to_put_them(nodes, comfy_pack, errors):
    """Runs before the temp models tree is registered (module order)."""
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[Load Genfocus Models\] transformer must be one of "
        r"the files found \(none found\).*models/diffusion_models/",
    ):
        nodes[LOADER].execute(**(LOADER_ARGS | {"transformer": "flux1-dev.safetensors"}))


def test_loader_lists_files_and_diffusers_folders(nodes, registered):
    inputs = {i.id: i for i in nodes[LOADER].define_schema().inputs}
    assert "diffusers/tiny-flux" in inputs["transformer"].options
    assert "diffusers/tiny-flux" in inputs["vae"].options
    assert {"genfocus/deblurNet.safetensors", "genfocus/bokehNet.safetensors"} <= set(
        inputs["bokeh_lora"].options
    )
    assert inputs["bokeh_lora"].default == "genfocus/bokehNet.safetensors"
    assert inputs["pre_deblur_lora"].options[0] == "none" and inputs["pre_deblur_lora"].default == "none"
    assert inputs["prompts"].options == ["none", "genfocus_prompts.safetensors"]
    assert inputs["prompts"].default == "genfocus_prompts.safetensors"


def test_loader_loads_both_loras_resident(pipe, nodes, registered):
    adapters = _core("models")
    assert set(pipe.models.transformer.peft_config) == {adapters.ADAPTER_DEBLUR, adapters.ADAPTER_BOKEH}
    assert pipe.device.type == "cpu" and not pipe.keep_loaded
    three = (
        nodes[LOADER]
        .execute(
            **(
                LOADER_ARGS
                | {"pre_deblur_lora": "genfocus/deblurNet_with_pre_deblur.safetensors", "dtype": "fp32"}
            )
        )
        .result[0]
    )
    assert adapters.ADAPTER_PRE_DEBLUR in three.models.transformer.peft_config


def test_loader_errors_say_which_file_goes_where(nodes, registered, errors):
    loader = nodes[LOADER]
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[Load Genfocus Models\] bokeh_lora must be one of the files found .*got "
        r"'bokehNet\.safetensors'; put bokehNet\.safetensors .* in models/loras/genfocus/",
    ):
        loader.execute(**(LOADER_ARGS | {"bokeh_lora": "bokehNet.safetensors"}))
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[Load Genfocus Models\] transformer .*"
        r"models/diffusion_models/",
    ):
        loader.execute(**(LOADER_ARGS | {"transformer": "flux1-dev.safetensors"}))
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[Load Genfocus Models\] dtype must be one of"):
        loader.execute(**(LOADER_ARGS | {"dtype": "fp8"}))
    with pytest.raises(
        errors.GenRefocusModelError, match=r"^\[Load Genfocus Models\] LoRA file .*does not match"
    ):
        loader.execute(**(LOADER_ARGS | {"bokeh_lora": "genfocus_prompts.safetensors"}))


def test_deblur_node_equals_the_core_call(nodes, pipe):
    utils = importlib.import_module("comfy.utils")
    photo = _photo()
    if COMFY_KIND == "stub":
        utils.UPDATES.clear()
    (out,) = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result
    core = _core("pipeline").deblur_image(
        photo.permute(0, 3, 1, 2), models=pipe.models, options=_options(), restore_size=True
    )
    assert out.shape == (1, 30, 40, 3)
    torch.testing.assert_close(out, core.image.permute(0, 2, 3, 1), rtol=0, atol=0)
    if COMFY_KIND == "stub":
        assert utils.UPDATES[-1] == (2, 2)  # per step (untiled): 2 of 2
    assert pipe.device.type == "cpu"


def test_tiling_socket_reaches_the_sampler(nodes, pipe, errors):
    (tiling,) = nodes[TILED].execute(tiling="on", tile_size=16, tile_overlap=0.0, tile_batch=3).result
    photo = _photo(h=32, w=48)
    (out,) = (
        nodes[DEBLUR].execute(pipe=pipe, image=photo, tiling=tiling, **(SAMPLER | {"noise": "seeded"})).result
    )
    opts = _options(tiling="on", tile_size=16, tile_overlap=0.0, tile_batch=3, noise="seeded")
    core = _core("pipeline").deblur_image(photo.permute(0, 3, 1, 2), models=pipe.models, options=opts)
    torch.testing.assert_close(out, core.image.permute(0, 2, 3, 1), rtol=0, atol=0)
    (untiled,) = nodes[DEBLUR].execute(pipe=pipe, image=photo, **(SAMPLER | {"noise": "seeded"})).result
    assert not torch.equal(out, untiled)  # 1-token tiles really change the result
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Tiled Denoise Settings\] tile_size must be a multiple"
    ):
        nodes[TILED].execute(tiling="on", tile_size=100, tile_overlap=0.1, tile_batch=1)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Tiled Denoise Settings\] tiling must be one of"
    ):
        nodes[TILED].execute(tiling="sometimes", tile_size=512, tile_overlap=0.1, tile_batch=1)


def test_bokeh_node_equals_the_core_call(nodes, pipe):
    defocus = _core("defocus")
    depth = _core("depth").DepthMap(
        torch.linspace(0.1, 0.6, 40).view(1, 1, 1, 40).expand(1, 1, 30, 40).clone(), metric=True
    )
    dm = defocus.defocus_map(depth.disparity, defocus.FocusTarget("point", x=0.2, y=0.5), 30.0, metric=True)
    photo = _photo(seed=1)
    (out,) = nodes[BOKEH].execute(pipe=pipe, image=photo, defocus=dm, **SAMPLER).result
    core = _core("pipeline").bokeh_image(
        photo.permute(0, 3, 1, 2), models=pipe.models, defocus=dm, options=_options(), restore_size=True
    )
    torch.testing.assert_close(out, core.image.permute(0, 2, 3, 1), rtol=0, atol=0)
    assert not torch.allclose(out, photo, atol=1e-3)


def test_refocus_node_equals_the_core_call(nodes, pipe):
    defocus = _core("defocus")
    depth = _core("depth").DepthMap(
        torch.linspace(0.1, 0.6, 40).view(1, 1, 1, 40).expand(2, 1, 30, 40).clone(), metric=True
    )
    focus = nodes["GenRefocus_FocusPoint"].execute(x=0.25, y=0.5).result[0]
    photo = _photo(b=2, seed=2)
    img, aif, cond = (
        nodes[REFOCUS].execute(pipe=pipe, image=photo, k=25.0, depth=depth, focus=focus, **SAMPLER).result
    )
    core = _core("pipeline").refocus(
        photo.permute(0, 3, 1, 2),
        models=pipe.models,
        depth=depth,
        focus=focus,
        k=25.0,
        options=_options(),
        restore_size=True,
    )
    torch.testing.assert_close(img, core.image.permute(0, 2, 3, 1), rtol=0, atol=0)
    torch.testing.assert_close(aif, core.aif.permute(0, 2, 3, 1), rtol=0, atol=0)
    assert img.shape == aif.shape == (2, 30, 40, 3) and cond.shape == (2, 32, 48, 3)
    assert float(cond.min()) >= 0 and float(cond.max()) > 0
    assert isinstance(focus, defocus.FocusTarget)
    k0, aif0, cond0 = nodes[REFOCUS].execute(pipe=pipe, image=photo[:1], k=0.0, **SAMPLER).result
    torch.testing.assert_close(k0, aif0, rtol=0, atol=0)
    assert float(cond0.abs().max()) == 0.0


def test_errors_carry_the_node_name(nodes, pipe, errors):
    photo = _photo()
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[DeblurNet \(Genfocus\)\] noise must be one of"
    ):
        nodes[DEBLUR].execute(pipe=pipe, image=photo, **(SAMPLER | {"noise": "random"}))
    with pytest.raises(errors.GenRefocusInputError, match=r"^\[DeblurNet \(Genfocus\)\] pipe must come from"):
        nodes[DEBLUR].execute(pipe="not a pipe", image=photo, **SAMPLER)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[DeblurNet \(Genfocus\)\] image must be at least 16x16"
    ):
        nodes[DEBLUR].execute(pipe=pipe, image=_photo(h=8, w=40), **SAMPLER)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[DeblurNet \(Genfocus\)\] steps must be in 1\.\.100"
    ):
        nodes[DEBLUR].execute(pipe=pipe, image=photo, **(SAMPLER | {"steps": 101}))
    with pytest.raises(
        errors.GenRefocusModelError,
        match=r"^\[DeblurNet \(Genfocus\)\] the LoRA adapter 'deblurring_pre' is not loaded",
    ):
        nodes[DEBLUR].execute(pipe=pipe, image=photo, pre_deblurred=photo, **SAMPLER)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Refocus \(Genfocus\)\] depth_model or depth must"
    ):
        nodes[REFOCUS].execute(pipe=pipe, image=photo, k=20.0, **SAMPLER)
    small = _core("defocus").defocus_map(
        torch.rand(1, 1, 8, 8), _core("defocus").FocusTarget(), 20.0, metric=True
    )
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[BokehNet \(Genfocus\)\] defocus must have the size of the all-in-focus image",
    ):
        nodes[BOKEH].execute(pipe=pipe, image=photo, defocus=small, **SAMPLER)
    assert pipe.device.type == "cpu"  # offloaded after the failures too


def test_interrupt_stops_the_run_and_leaves_the_pipe_usable(nodes, pipe):
    mm = importlib.import_module("comfy.model_management")
    photo = _photo(seed=4)
    clean = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER)
    finally:
        mm.interrupt_current_processing(False)
    again = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0]
    torch.testing.assert_close(again, clean, rtol=0, atol=0)


def _cond(emb):
    """A ComfyUI CONDITIONING holding one prompt embedding (copies, on the CPU)."""
    return [[emb.prompt_embeds.clone(), {"pooled_output": emb.pooled.clone()}]]


def test_conditioning_equals_the_cached_prompts(nodes, pipe):
    p = pipe.models.prompts
    photo = _photo(seed=5)
    cached = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0]
    given = nodes[DEBLUR].execute(pipe=pipe, image=photo, conditioning=_cond(p["deblur"]),
                                  **SAMPLER).result[0]
    torch.testing.assert_close(given, cached, rtol=0, atol=0)
    other = nodes[DEBLUR].execute(pipe=pipe, image=photo, conditioning=_cond(p["bokeh"]), **SAMPLER).result[0]
    assert not torch.allclose(other, cached)  # the connected embedding really replaces the cached one
    assert set(pipe.models.prompts) == {"deblur", "bokeh"} and pipe.models.prompts["deblur"] is p["deblur"]

    depth = _core("depth").DepthMap(
        torch.linspace(0.1, 0.6, 40).view(1, 1, 1, 40).expand(1, 1, 30, 40).clone(), metric=True
    )
    dm = _core("defocus").defocus_map(depth.disparity, _core("defocus").FocusTarget(), 30.0, metric=True)
    cached = nodes[BOKEH].execute(pipe=pipe, image=photo, defocus=dm, **SAMPLER).result[0]
    given = nodes[BOKEH].execute(pipe=pipe, image=photo, defocus=dm, conditioning=_cond(p["bokeh"]),
                                 **SAMPLER).result[0]
    torch.testing.assert_close(given, cached, rtol=0, atol=0)

    cached = nodes[REFOCUS].execute(pipe=pipe, image=photo, k=25.0, depth=depth, **SAMPLER).result
    given = nodes[REFOCUS].execute(pipe=pipe, image=photo, k=25.0, depth=depth, **SAMPLER,
                                   deblur_conditioning=_cond(p["deblur"]),
                                   bokeh_conditioning=_cond(p["bokeh"])).result
    for g, c in zip(given, cached, strict=True):
        torch.testing.assert_close(g, c, rtol=0, atol=0)


def test_loader_without_prompt_file_runs_on_conditioning(nodes, pipe, errors):
    bare = nodes[LOADER].execute(**(LOADER_ARGS | {"prompts": "none"})).result[0]
    assert dict(bare.models.prompts) == {}
    photo = _photo(seed=6)
    with pytest.raises(
        errors.GenRefocusModelError,
        match=r"^\[DeblurNet \(Genfocus\)\] no text embedding for the deblur prompt: pick the cached "
        r"prompt file .*build-prompts.* in Load Genfocus Models, or connect conditioning",
    ):
        nodes[DEBLUR].execute(pipe=bare, image=photo, **SAMPLER)
    p = pipe.models.prompts
    with pytest.raises(errors.GenRefocusModelError, match=r"^\[Refocus \(Genfocus\)\] .*bokeh_conditioning"):
        nodes[REFOCUS].execute(pipe=bare, image=photo, k=20.0, depth=_core("depth").DepthMap(
            torch.rand(1, 1, 30, 40) + 0.1, metric=True), deblur_conditioning=_cond(p["deblur"]), **SAMPLER)
    out = nodes[DEBLUR].execute(pipe=bare, image=photo, conditioning=_cond(p["deblur"]), **SAMPLER).result[0]
    torch.testing.assert_close(out, nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0],
                               rtol=0, atol=0)
    k0 = nodes[REFOCUS].execute(pipe=bare, image=photo, k=0.0, deblur_conditioning=_cond(p["deblur"]),
                                **SAMPLER).result[0]  # k = 0 needs no bokeh prompt
    torch.testing.assert_close(k0, out, rtol=0, atol=0)


def test_conditioning_with_wrong_dims_names_node_and_parameter(nodes, pipe, errors):
    e = pipe.models.prompts["deblur"]
    photo = _photo()
    d_txt = pipe.models.transformer.config.joint_attention_dim
    with pytest.raises(
        errors.GenRefocusInputError,
        match=rf"^\[DeblurNet \(Genfocus\)\] conditioning must hold text embeddings of shape "
        rf"\(1, L, {d_txt}\).*got \(1, 256, 4096\)",
    ):
        wide = [[torch.zeros(1, 256, 4096), {"pooled_output": e.pooled}]]
        nodes[DEBLUR].execute(pipe=pipe, image=photo, conditioning=wide, **SAMPLER)
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[Refocus \(Genfocus\)\] bokeh_conditioning must carry a pooled_output of shape .*got none",
    ):
        nodes[REFOCUS].execute(pipe=pipe, image=photo, k=0.0, bokeh_conditioning=[[e.prompt_embeds, {}]],
                               **SAMPLER)
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[BokehNet \(Genfocus\)\] conditioning must carry a pooled_output",
    ):
        bad = [[e.prompt_embeds, {"pooled_output": torch.zeros(1, 768)}]]
        nodes[BOKEH].execute(pipe=pipe, image=photo, defocus=None, conditioning=bad, **SAMPLER)
    with pytest.raises(errors.GenRefocusInputError, match=r"conditioning must be a ComfyUI CONDITIONING"):
        nodes[DEBLUR].execute(pipe=pipe, image=photo, conditioning=e.prompt_embeds, **SAMPLER)
