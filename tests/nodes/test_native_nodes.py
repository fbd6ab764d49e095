"""Tier 2: Genfocus LoRAs on ComfyUI Model (the native backend) and the Genfocus nodes running on it.

The tiny fixture FLUX of ``../shared/fixtures/genfocus-parity`` is the MODEL and the fixture LoRAs
the Genfocus files. With ``COMFYUI_PATH`` the MODEL is a real ComfyUI ``ModelPatcher`` of
``comfy.ldm.flux.model.Flux`` (built as ComfyUI's loaders build it, with the tiny sizes) and the
VAE a real ComfyUI ``VAE`` of FLUX.1's architecture (random weights); the reference pipeline runs
the same weights in diffusers (transformer, LoRAs, VAE), with the posterior mean as ComfyUI. With
the stub, stand-ins of the two ComfyUI objects wrap a BFL-layout module tree and the fixture VAE.
Either way every native node output must equal the reference pipeline's on the same inputs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from .conftest import COMFY_KIND, PACK_NAME
from .native_models import real_model_patcher

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
NATIVE, DEBLUR, BOKEH, REFOCUS = (
    "GenRefocus_NativeModelLoader",
    "GenRefocus_DeblurNet",
    "GenRefocus_BokehNet",
    "GenRefocus_Refocus",
)
SAMPLER = dict(steps=2, seed=0, noise="reference", long_side=0, restore_size=True)
LOADER_ARGS = dict(
    deblur_lora="genfocus/deblurNet.safetensors",
    bokeh_lora="genfocus/bokehNet.safetensors",
    pre_deblur_lora="none",
    prompts="genfocus_prompts.safetensors",
)
LEVELS = 2 / 255 + 1e-6  # 8-bit outputs; restore_size resamples, so one level may become two

_spec = importlib.util.spec_from_file_location(
    "_native_bfl_flux", Path(__file__).resolve().parents[1] / "core" / "bfl_flux.py"
)
bfl_flux = sys.modules.setdefault("_native_bfl_flux", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bfl_flux)

pytestmark = pytest.mark.usefixtures("one_thread")


def _core(name):
    return importlib.import_module(f"{PACK_NAME}.genrefocus_core.{name}")


class _StubFluxFormat:
    """ComfyUI's ``latent_formats.Flux`` shift and scale (test stand-in)."""

    def process_in(self, z):
        return (z - 0.1159) * 0.3611

    def process_out(self, z):
        return z / 0.3611 + 0.1159


class _StubVae:
    """ComfyUI's ``VAE`` interface (BHWC pixels in [0, 1], posterior mean, clamped decode) over a
    diffusers VAE (test stand-in for the stub run)."""

    latent_channels = 16

    def __init__(self, vae):
        self.vae = vae

    def encode(self, pixels):
        with torch.no_grad():
            params = self.vae.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.parameters
        return params[:, :16].float()

    def decode(self, z):
        with torch.no_grad():
            out = self.vae.decode(z, return_dict=False)[0]
        return ((out + 1) / 2).clamp(0, 1).movedim(1, -1).float()


@pytest.fixture(scope="module")
def env(comfy_pack, tmp_path_factory):
    """(MODEL, VAE, reference GenfocusModels with the same weights, models root registered)."""
    if not (FIXTURE / "model").is_dir():
        pytest.skip("../shared/fixtures/genfocus-parity is not present beside the checkout")
    convert = importlib.import_module(f"{PACK_NAME}.genrefocus_core.flux_convert")
    root = tmp_path_factory.mktemp("native") / "models"
    (root / "loras" / "genfocus").mkdir(parents=True)
    for name in ("deblurNet", "bokehNet", "deblurNet_with_pre_deblur"):
        os.symlink(
            FIXTURE / "lora" / f"{name}.safetensors", root / "loras" / "genfocus" / f"{name}.safetensors"
        )
    (root / "genrefocus").mkdir()
    os.symlink(
        FIXTURE / "inputs" / "prompt_embeds.safetensors", root / "genrefocus" / "genfocus_prompts.safetensors"
    )
    vae_path = FIXTURE / "model" / "vae"
    if COMFY_KIND == "real":  # a FLUX.1-architecture VAE (ComfyUI detects no other size), random weights
        from diffusers import AutoencoderKL
        from safetensors.torch import save_file

        torch.manual_seed(0)
        cfg = _core("models").FLUX_VAE_CONFIG
        big = AutoencoderKL.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
        vae_path = root / "ae.safetensors"
        save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(vae_path))
    ref = _core("models").load_genfocus_models(
        FIXTURE / "model" / "transformer",
        vae_path,
        FIXTURE / "inputs" / "prompt_embeds.safetensors",
        deblur_lora=FIXTURE / "lora" / "deblurNet.safetensors",
        bokeh_lora=FIXTURE / "lora" / "bokehNet.safetensors",
    )
    bfl_sd = bfl_flux.bfl_state_dict(ref.transformer, convert.diffusers_to_bfl)
    if COMFY_KIND == "real":
        import comfy.sd
        import comfy.utils

        model = real_model_patcher(bfl_sd)
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(vae_path)))
    else:
        twin = bfl_flux.BflFlux(ref.transformer.config)
        twin.load_state_dict(bfl_sd, strict=True)
        base = SimpleNamespace(
            diffusion_model=twin.eval(),
            latent_format=_StubFluxFormat(),
            manual_cast_dtype=None,
            get_dtype=lambda: torch.float32,
            memory_required=lambda shape: 0,
        )
        model = SimpleNamespace(model=base, load_device=torch.device("cpu"))
        vae = _StubVae(ref.vae)
    folder_paths = importlib.import_module("folder_paths")
    added = [(key, str(root / key)) for key in ("loras", "genrefocus")]
    for key, path in added:
        folder_paths.add_model_folder_path(key, path)
    try:
        yield model, vae, ref
    finally:
        for key, path in added:
            folder_paths.folder_names_and_paths[key][0].remove(path)


@pytest.fixture(scope="module")
def pipe(nodes, env):
    model, vae, _ = env
    return nodes[NATIVE].execute(model=model, vae=vae, **LOADER_ARGS).result[0]


def _photo(b=1, h=30, w=40, seed=0):
    return torch.rand(b, h, w, 3, generator=torch.Generator().manual_seed(seed))


def _mean(**kw):
    return _core("genpipe").GenerationOptions(steps=2, condition_latent="mean", **kw)


def _depth(b=1):
    disp = torch.linspace(0.1, 0.6, 40).view(1, 1, 1, 40).expand(b, 1, 30, 40).clone()
    return _core("depth").DepthMap(disp, metric=True)


def test_loader_maps_the_loras_onto_the_comfy_model(pipe, env, nodes):
    model, _, _ = env
    native = importlib.import_module(f"{PACK_NAME}.nodes.native")
    assert isinstance(pipe, native.NativePipe) and pipe.model is model
    assert set(pipe.loras) == {"deblurring", "bokeh"} and set(pipe.prompts) == {"deblur", "bokeh"}
    assert "double_blocks.1.img_attn.qkv" in pipe.loras["bokeh"].modules
    assert pipe.loras["deblurring"].rank == 8 and pipe.loras["bokeh"].rank == 4  # the fixture files' ranks
    inputs = {i.id: i for i in nodes[NATIVE].define_schema().inputs}
    assert inputs["bokeh_lora"].default == "genfocus/bokehNet.safetensors"
    assert inputs["pre_deblur_lora"].default == "none" and inputs["prompts"].options[0] == "none"
    if COMFY_KIND == "real":
        assert type(model.model.diffusion_model).__module__ == "comfy.ldm.flux.model"


def test_loader_errors_name_the_node(nodes, env, errors):
    model, vae, _ = env
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[Genfocus LoRAs on ComfyUI Model\] bokeh_lora must be one of the files found",
    ):
        nodes[NATIVE].execute(model=model, vae=vae, **(LOADER_ARGS | {"bokeh_lora": "bokehNet.safetensors"}))
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"^\[Genfocus LoRAs on ComfyUI Model\] model and vae "
        r"must be a ComfyUI MODEL and VAE",
    ):
        nodes[NATIVE].execute(model="flux", vae=vae, **LOADER_ARGS)
    with pytest.raises(
        errors.GenRefocusModelError,
        match=r"^\[Genfocus LoRAs on ComfyUI Model\] LoRA file .*does not match the Genfocus format",
    ):
        nodes[NATIVE].execute(
            model=model, vae=vae, **(LOADER_ARGS | {"bokeh_lora": "genfocus_prompts.safetensors"})
        )
    chroma_like = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(errors.GenRefocusModelError, match=r"must be a FLUX\.1 transformer"):
        nodes[NATIVE].execute(model=chroma_like, vae=vae, **LOADER_ARGS)


def test_deblur_node_equals_the_reference_pipeline(nodes, pipe, env):
    _, _, ref = env
    photo = _photo()
    utils = importlib.import_module("comfy.utils")
    if COMFY_KIND == "stub":
        utils.UPDATES.clear()
    (out,) = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result
    want = _core("pipeline").deblur_image(
        photo.permute(0, 3, 1, 2), models=ref, options=_mean(), restore_size=True
    )
    assert out.shape == (1, 30, 40, 3) and float(out.std()) > 0.02
    torch.testing.assert_close(out, want.image.permute(0, 2, 3, 1), rtol=0, atol=LEVELS)
    if COMFY_KIND == "stub":
        assert utils.UPDATES[-1] == (2, 2)
        assert importlib.import_module("comfy.model_management").LOADED[-1][0] == [pipe.model]
    else:
        mm = importlib.import_module("comfy.model_management")
        assert any(m is pipe.model for m in mm.loaded_models())  # ComfyUI's memory management loaded it
    tiled = nodes["GenRefocus_TiledDenoise"].execute(
        tiling="on", tile_size=16, tile_overlap=0.0, tile_batch=3
    )
    (out,) = nodes[DEBLUR].execute(pipe=pipe, image=photo, tiling=tiled.result[0], **SAMPLER).result
    want = _core("pipeline").deblur_image(
        photo.permute(0, 3, 1, 2),
        models=ref,
        restore_size=True,
        options=_mean(tiling="on", tile_size=16, tile_overlap=0.0, tile_batch=3),
    )
    torch.testing.assert_close(out, want.image.permute(0, 2, 3, 1), rtol=0, atol=LEVELS)


def test_the_lora_reaches_the_condition_tokens(nodes, pipe):
    """The same run with the LoRA's B zeroed differs: the adapter really acts through the node."""
    zero = {
        name: dataclasses.replace(
            lo,
            modules={
                k: dataclasses.replace(m, parts=[(*p[:4], torch.zeros_like(p[4])) for p in m.parts])
                for k, m in lo.modules.items()
            },
        )
        for name, lo in pipe.loras.items()
    }
    photo = _photo(seed=1)
    a = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0]
    b = nodes[DEBLUR].execute(pipe=dataclasses.replace(pipe, loras=zero), image=photo, **SAMPLER).result[0]
    assert (a - b).abs().max() > 2 / 255


def test_bokeh_and_refocus_nodes_equal_the_reference_pipeline(nodes, pipe, env):
    _, _, ref = env
    photo = _photo(b=2, seed=2)
    dm = _core("defocus").defocus_map(
        _depth(2).disparity, _core("defocus").FocusTarget("point", x=0.2, y=0.5), 30.0, metric=True
    )
    (out,) = nodes[BOKEH].execute(pipe=pipe, image=photo, defocus=dm, **SAMPLER).result
    want = _core("pipeline").bokeh_image(
        photo.permute(0, 3, 1, 2), models=ref, defocus=dm, options=_mean(), restore_size=True
    )
    torch.testing.assert_close(out, want.image.permute(0, 2, 3, 1), rtol=0, atol=LEVELS)
    focus = nodes["GenRefocus_FocusPoint"].execute(x=0.25, y=0.5).result[0]
    img, aif, cond = (
        nodes[REFOCUS].execute(pipe=pipe, image=photo, k=25.0, depth=_depth(2), focus=focus, **SAMPLER).result
    )
    want = _core("pipeline").refocus(
        photo.permute(0, 3, 1, 2),
        models=ref,
        depth=_depth(2),
        focus=focus,
        k=25.0,
        options=_mean(),
        restore_size=True,
    )
    torch.testing.assert_close(img, want.image.permute(0, 2, 3, 1), rtol=0, atol=LEVELS)
    torch.testing.assert_close(aif, want.aif.permute(0, 2, 3, 1), rtol=0, atol=LEVELS)
    torch.testing.assert_close(cond[..., :1], want.defocus.permute(0, 2, 3, 1), rtol=0, atol=0)


def test_conditioning_replaces_the_cached_prompts(nodes, pipe, env, errors):
    model, vae, _ = env
    p = pipe.prompts
    photo = _photo(seed=3)
    cached = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0]
    cond = [[p["deblur"].prompt_embeds.clone(), {"pooled_output": p["deblur"].pooled.clone()}]]
    bare = nodes[NATIVE].execute(model=model, vae=vae, **(LOADER_ARGS | {"prompts": "none"})).result[0]
    with pytest.raises(
        errors.GenRefocusModelError,
        match=r"^\[DeblurNet \(Genfocus\)\] no text embedding for the "
        r"deblur prompt: .* in Genfocus LoRAs on ComfyUI Model, or connect conditioning",
    ):
        nodes[DEBLUR].execute(pipe=bare, image=photo, **SAMPLER)
    given = nodes[DEBLUR].execute(pipe=bare, image=photo, conditioning=cond, **SAMPLER).result[0]
    torch.testing.assert_close(given, cached, rtol=0, atol=0)
    wide = [[torch.zeros(1, 8, 4096), {"pooled_output": p["deblur"].pooled}]]
    with pytest.raises(
        errors.GenRefocusInputError,
        match=r"conditioning must hold text embeddings of shape "
        r"\(1, L, 32\)",
    ):
        nodes[DEBLUR].execute(pipe=pipe, image=photo, conditioning=wide, **SAMPLER)


def test_errors_and_interrupts(nodes, pipe, errors):
    mm = importlib.import_module("comfy.model_management")
    photo = _photo(seed=4)
    with pytest.raises(
        errors.GenRefocusModelError,
        match=r"^\[DeblurNet \(Genfocus\)\] the LoRA adapter 'deblurring_pre' is not loaded",
    ):
        nodes[DEBLUR].execute(pipe=pipe, image=photo, pre_deblurred=photo, **SAMPLER)
    with pytest.raises(
        errors.GenRefocusInputError, match=r"^\[Refocus \(Genfocus\)\] depth_model or depth must"
    ):
        nodes[REFOCUS].execute(pipe=pipe, image=photo, k=20.0, **SAMPLER)
    clean = nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0]
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER)
    finally:
        mm.interrupt_current_processing(False)
    torch.testing.assert_close(
        nodes[DEBLUR].execute(pipe=pipe, image=photo, **SAMPLER).result[0], clean, rtol=0, atol=0
    )
