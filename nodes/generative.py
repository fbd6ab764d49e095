"""Generative Genfocus nodes: tiling settings, DeblurNet, BokehNet and the one-node Refocus.

The FLUX weights live outside ComfyUI's model manager (diffusers + peft, branch-selective LoRA),
so these nodes follow comfyui.md section 5: room is made on the compute device with
``free_memory`` (evicting resident ComfyUI models) before the weights move there, and afterwards
they go back to the offload device and the cache is emptied, unless the loader's ``keep_loaded``
is on. Batches are processed frame by frame; progress advances per denoise step and tile, and an
interrupt stops the run between two of them.

The fixed prompts' text embeddings come from the loader's cached file or, when connected, from
ComfyUI ``CONDITIONING`` inputs (first entry: T5 ``(1, L, 4096)`` + ``pooled_output`` ``(1, 768)``).
ComfyUI's FLUX T5 pads to at least 256 tokens where the official pipeline pads to 512 without a
mask, so CONDITIONING gives slightly different images (official-pipeline.md §15).

The pipe comes from either backend: Load Genfocus Models (diffusers + peft, the reference) or
Genfocus LoRAs on ComfyUI Model (``nodes/native.py``: ComfyUI's own FLUX MODEL and VAE, managed by
ComfyUI; conditions are encoded to the VAE posterior mean there). The nodes run the same stages
on both (``genrefocus_core.pipeline`` / ``genrefocus_core.native_pipeline``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain
from types import SimpleNamespace

import torch
from comfy_api.latest import io

from ..genrefocus_core.defocus import FocusTarget
from ..genrefocus_core.depth_models import DepthModel as CoreDepthModel
from ..genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from ..genrefocus_core.genpipe import GenerationOptions, GenfocusModels
from ..genrefocus_core.memory import execution_device_dtype, is_group_offloaded
from ..genrefocus_core.native_pipeline import native_bokeh_image, native_deblur_image, native_refocus
from ..genrefocus_core.pipeline import MAX_STEPS, bokeh_image, deblur_image, refocus
from ..genrefocus_core.prompts import PROMPTS, PromptEmbedding
from ._glue import bchw_to_image, check_combo, image_to_bchw, progress, user_errors
from .loaders import PIPE_LOADER
from .native import NATIVE_LOADER, NativePipe
from .sockets import Defocus, Depth, DepthModel, Focus, Pipe, Tiling

TILED = "Tiled Denoise Settings"
DEBLUR = "DeblurNet (Genfocus)"
BOKEH = "BokehNet (Genfocus)"
REFOCUS = "Refocus (Genfocus)"
TILING_MODES = ("auto", "on", "off")
NOISE_MODES = ("reference", "seeded")

# Working memory asked of ComfyUI besides the weights: activations of one 512 px tile batch and
# the VAE at a few megapixels, in half precision (a heuristic).
_WORKSPACE_BYTES = 6 * 1024**3


@dataclass
class GenerativePipe:
    """What travels on a ``GENREFOCUS_PIPE`` socket: the loaded weights and how to treat them.

    Attributes:
        models: transformer (all loaded LoRAs resident), VAE, prompt embeddings.
        keep_loaded: keep the weights on the compute device between runs.
        files: parameter name → file the loader read (for messages).
    """

    models: GenfocusModels
    keep_loaded: bool = False
    files: dict[str, str] = field(default_factory=dict)
    #: the loader's entry in ComfyUI's model manager (kept out of a run's own ``free_memory``)
    held: object | None = field(default=None, repr=False, compare=False)

    @property
    def streamed(self) -> bool:
        """Whether the transformer's blocks stream from the offload device (memory modes ``*offload``)."""
        return is_group_offloaded(self.models.transformer)

    @property
    def device(self) -> torch.device:
        """The device the transformer computes on (for streamed weights: where blocks are brought)."""
        return execution_device_dtype(self.models.transformer)[0]

    def memory_bytes(self) -> int:
        """Bytes of the transformer (with LoRAs) and the VAE."""
        mods = (self.models.transformer, self.models.vae)
        return sum(t.numel() * t.element_size() for m in mods for t in chain(m.parameters(), m.buffers()))

    def bytes_to_bring(self, device: torch.device) -> int:
        """Bytes a run brings onto ``device``: weights not there yet; streamed blocks two at a time."""

        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors if t.device != device)

        vae = size(chain(self.models.vae.parameters(), self.models.vae.buffers()))
        tr = self.models.transformer
        if not self.streamed:
            return vae + size(chain(tr.parameters(), tr.buffers()))
        blocks = [*tr.transformer_blocks, *tr.single_transformer_blocks]
        largest = max((sum(t.numel() * t.element_size() for t in b.parameters()) for b in blocks), default=0)
        return vae + 2 * largest

    def to(self, device: torch.device) -> GenerativePipe:
        if not self.streamed:  # streamed blocks are placed by their offload hooks
            self.models.transformer.to(device)
        self.models.vae.to(device)
        return self


@dataclass(frozen=True)
class TileSettings:
    """What travels on a ``GENREFOCUS_TILING`` socket (the tiling fields of ``GenerationOptions``)."""

    tiling: str = "auto"
    tile_size: int = 512
    tile_overlap: float = 0.125
    tile_batch: int = 4


@contextlib.contextmanager
def _on_compute_device(pipe: GenerativePipe | None,
                       depth_model: CoreDepthModel | None = None) -> Iterator[None]:
    """The reference pipe (if given) and the depth model on the compute device for one run."""
    import comfy.model_management as mm

    device = mm.get_torch_device()
    need = _WORKSPACE_BYTES if pipe is not None else 0
    if pipe is not None:
        need += pipe.bytes_to_bring(device)
    if depth_model is not None:
        need += depth_model.memory_bytes(device)
    if need:  # our own registered entry is not asked to leave just before the run uses it
        keep = [pipe.held] if pipe is not None and pipe.held is not None else []
        mm.free_memory(need, device, keep_loaded=keep)
    if pipe is not None:
        pipe.to(device)
    if depth_model is not None:
        depth_model.to(device)
    try:
        yield
    finally:
        offload = mm.unet_offload_device()
        if depth_model is not None:
            depth_model.to(offload)
        if pipe is not None and not pipe.keep_loaded:
            pipe.to(offload)
        mm.soft_empty_cache()


_REFERENCE = SimpleNamespace(deblur_image=deblur_image, bokeh_image=bokeh_image, refocus=refocus)
_NATIVE = SimpleNamespace(deblur_image=native_deblur_image, bokeh_image=native_bokeh_image,
                          refocus=native_refocus)


@contextlib.contextmanager
def _backend(pipe: GenerativePipe | NativePipe, prompts: Mapping[str, PromptEmbedding],
             depth_model: CoreDepthModel | None = None) -> Iterator[tuple[object, SimpleNamespace]]:
    """``(models, stages)`` of the pipe's backend, ready to run (weights placed, prompts chosen)."""
    if isinstance(pipe, NativePipe):
        with _on_compute_device(None, depth_model), pipe.loaded(prompts) as models:
            yield models, _NATIVE
    else:
        with _on_compute_device(pipe, depth_model):
            yield dataclasses.replace(pipe.models, prompts=dict(prompts)), _REFERENCE


def _backend_options(pipe: GenerativePipe | NativePipe, options: GenerationOptions) -> GenerationOptions:
    # ComfyUI's VAE gives the posterior mean (official: a sample), README "Which backend?"
    return dataclasses.replace(options, condition_latent="mean") if isinstance(pipe, NativePipe) else options


@contextlib.contextmanager
def _errors(node: str) -> Iterator[None]:
    """Prefix input and model errors with the node's display name (interrupts and OOM pass through)."""
    try:
        with user_errors(node):
            yield
    except GenRefocusModelError as e:
        if str(e).startswith(f"[{node}]"):
            raise
        raise GenRefocusModelError(f"[{node}] {e}") from e


def _check_pipe(node: str, pipe: object) -> GenerativePipe | NativePipe:
    if not isinstance(pipe, GenerativePipe | NativePipe):
        raise GenRefocusInputError(
            f"[{node}] pipe must come from Load Genfocus Models or Genfocus LoRAs on ComfyUI Model, "
            f"got {type(pipe).__name__}"
        )
    return pipe


def _options(node: str, steps: int, seed: int, noise: str, tiling: TileSettings | None) -> GenerationOptions:
    check_combo(node, "noise", noise, NOISE_MODES)
    t = tiling if tiling is not None else TileSettings()
    if not isinstance(t, TileSettings):
        raise GenRefocusInputError(f"[{node}] tiling must come from {TILED}, got {type(t).__name__}")
    with user_errors(node):
        return GenerationOptions(steps=steps, seed=seed, noise=noise, tiling=t.tiling, tile_size=t.tile_size,
                                 tile_overlap=t.tile_overlap, tile_batch=t.tile_batch)


def _optional_image(node: str, image) -> torch.Tensor | None:
    return None if image is None else image_to_bchw(image, node=node, param="pre_deblurred")


def _sampler_inputs() -> list:
    return [
        io.Int.Input("steps", default=28, min=1, max=MAX_STEPS,
                     tooltip="Denoising steps (official 28; the demo offers 8-50)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Noise seed for noise = seeded. Fixed, so refocus edits keep the same noise."),
        io.Combo.Input("noise", options=list(NOISE_MODES), default="reference",
                       tooltip="reference: the official Genfocus noise (seeds 42/1234, reproduces its "
                       "images); seeded: CPU noise from the seed (the same on every device)."),
        io.Int.Input("long_side", default=0, min=0, max=8192, step=16,
                     tooltip="Resize the longer side to this many px first (then centre-crop to multiples "
                     "of 16). 0 = keep the size (stretched up to multiples of 16 if needed)."),
        io.Boolean.Input("restore_size", default=True,
                         tooltip="Return the result at the input size (undo the resize and crop). Off: "
                         "the processed size, as the official scripts."),
    ]


def _conditioning_input(param: str, prompt: str) -> io.Input:
    return io.Conditioning.Input(
        param, optional=True,
        tooltip=f"Optional: the text embedding of the fixed prompt {PROMPTS[prompt]!r} from CLIP Text Encode "
        "with a FLUX CLIP (DualCLIPLoader, type flux), replacing the loader's cached prompt file. ComfyUI's "
        "T5 pads to 256+ tokens, the official pipeline to 512, so results differ slightly from the "
        "reference; use the cached file for parity.",
    )


def _text_dims(pipe: GenerativePipe | NativePipe) -> tuple[int, int]:
    if isinstance(pipe, NativePipe):
        return pipe.text_dims()
    cfg = pipe.models.transformer.config
    return cfg.joint_attention_dim, cfg.pooled_projection_dim


def _conditioning(node: str, param: str, cond, pipe: GenerativePipe | NativePipe,
                  prompt: str) -> PromptEmbedding | None:
    """The first entry of a ComfyUI CONDITIONING as a prompt embedding, checked against the transformer."""
    if cond is None:
        return None
    d_txt, d_pool = _text_dims(pipe)
    entry = cond[0] if isinstance(cond, (list, tuple)) and cond else None
    if not (isinstance(entry, (list, tuple)) and len(entry) >= 2 and isinstance(entry[1], dict)):
        raise GenRefocusInputError(
            f"[{node}] {param} must be a ComfyUI CONDITIONING (a list of [tensor, dict]), "
            f"got {type(cond).__name__}"
        )
    emb, pooled = entry[0], entry[1].get("pooled_output")
    if not (isinstance(emb, torch.Tensor) and emb.ndim == 3 and emb.shape[0] == 1 and emb.shape[2] == d_txt):
        got = tuple(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
        raise GenRefocusInputError(
            f"[{node}] {param} must hold text embeddings of shape (1, L, {d_txt}) (T5-XXL for FLUX), "
            f"got {got}; encode with a FLUX CLIP (DualCLIPLoader, type flux)"
        )
    if not (isinstance(pooled, torch.Tensor) and pooled.shape == (1, d_pool)):
        got = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else "none"
        raise GenRefocusInputError(
            f"[{node}] {param} must carry a pooled_output of shape (1, {d_pool}) (CLIP-L), got {got}; "
            "encode with a FLUX CLIP (DualCLIPLoader, type flux)"
        )
    return PromptEmbedding(PROMPTS[prompt], emb, pooled)


def _prompts(node: str, pipe: GenerativePipe | NativePipe,
             given: dict[str, tuple[str, PromptEmbedding | None]],
             needed: tuple[str, ...]) -> dict[str, PromptEmbedding]:
    """The pipe's cached prompts, connected CONDITIONING replacing them; each needed prompt present."""
    native = isinstance(pipe, NativePipe)
    prompts = dict(pipe.prompts if native else pipe.models.prompts)
    prompts.update({name: emb for name, (_, emb) in given.items() if emb is not None})
    loader = NATIVE_LOADER if native else PIPE_LOADER
    for name in needed:
        if name not in prompts:
            raise GenRefocusModelError(
                f"[{node}] no text embedding for the {name} prompt: pick the cached prompt file "
                "(genfocus_prompts.safetensors in models/genrefocus; build it once with python -m "
                f"genrefocus_core build-prompts) in {loader}, or connect {given[name][0]} "
                f"(CLIP Text Encode of {PROMPTS[name]!r} with a FLUX CLIP)"
            )
    return prompts


def _tiling_input() -> io.Input:
    return Tiling.Input("tiling", optional=True,
                        tooltip=f"From {TILED}; default: official tiling (512 px tiles from 512 px on).")


class TiledDenoise(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_TiledDenoise",
            display_name=TILED,
            category="GenRefocus/generative",
            description=(
                "How DeblurNet and BokehNet denoise large images: in overlapping tiles blended with "
                "Gaussian weights (the official MultiDiffusion-style tiling), every condition cropped "
                "with its tile. Without this node the official settings apply."
            ),
            inputs=[
                io.Combo.Input("tiling", options=list(TILING_MODES), default="auto",
                               tooltip="auto: tiles when both sides are >= 512 px and the image holds at "
                               "least one tile (official); on / off: always / never."),
                io.Int.Input("tile_size", default=512, min=16, max=4096, step=16,
                             tooltip="Tile side in px, a multiple of 16 (official 512, what FLUX saw in "
                             "training)."),
                io.Float.Input("tile_overlap", default=0.125, min=0.0, max=0.49, step=0.005,
                               tooltip="Overlap of neighbouring tiles as a fraction of the tile side "
                               "(official 1/8 = 64 px)."),
                io.Int.Input("tile_batch", default=4, min=1, max=64,
                             tooltip="Tiles per transformer call: more is faster and needs more memory."),
            ],
            outputs=[Tiling.Output(display_name="tiling")],
        )

    @classmethod
    def execute(cls, tiling: str, tile_size: int, tile_overlap: float, tile_batch: int) -> io.NodeOutput:
        check_combo(TILED, "tiling", tiling, TILING_MODES)
        settings = TileSettings(tiling, tile_size, tile_overlap, tile_batch)
        with user_errors(TILED):  # the core's range checks, before any model runs
            GenerationOptions(tiling=tiling, tile_size=tile_size, tile_overlap=tile_overlap,
                              tile_batch=tile_batch)
        return io.NodeOutput(settings)


class DeblurNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_DeblurNet",
            display_name=DEBLUR,
            category="GenRefocus/generative",
            description=(
                "Genfocus DeblurNet: an all-in-focus image from a blurry photo (FLUX.1-dev + the "
                "DeblurNet LoRA, guidance 3.5, as the official pipeline). With a pre-deblurred image, the "
                "pre-deblur DeblurNet is used (load its LoRA). Frames are processed one by one."
            ),
            inputs=[
                Pipe.Input("pipe", tooltip="From Load Genfocus Models."),
                io.Image.Input("image", tooltip="The blurry photo(s)."),
                *_sampler_inputs(),
                io.Image.Input("pre_deblurred", optional=True,
                               tooltip="The same photo deblurred by another method (any size); uses the "
                               "pre-deblur DeblurNet LoRA."),
                _tiling_input(),
                _conditioning_input("conditioning", "deblur"),
            ],
            outputs=[io.Image.Output(display_name="all_in_focus")],
        )

    @classmethod
    def execute(cls, pipe, image, steps: int, seed: int, noise: str, long_side: int, restore_size: bool,
                pre_deblurred=None, tiling=None, conditioning=None) -> io.NodeOutput:
        pipe = _check_pipe(DEBLUR, pipe)
        options = _options(DEBLUR, steps, seed, noise, tiling)
        frames = image_to_bchw(image, node=DEBLUR)
        pre = _optional_image(DEBLUR, pre_deblurred)
        cond = _conditioning(DEBLUR, "conditioning", conditioning, pipe, "deblur")
        prompts = _prompts(DEBLUR, pipe, {"deblur": ("conditioning", cond)}, ("deblur",))
        with _errors(DEBLUR), _backend(pipe, prompts) as (models, stages):
            out = stages.deblur_image(frames, models=models, options=_backend_options(pipe, options),
                                      pre_deblurred=pre, long_side=long_side, restore_size=restore_size,
                                      on_step=progress(1))
        return io.NodeOutput(bchw_to_image(out.image))


class BokehNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_BokehNet",
            display_name=BOKEH,
            category="GenRefocus/generative",
            description=(
                "Genfocus BokehNet: refocus an all-in-focus image with a defocus map (FLUX.1-dev + the "
                "BokehNet LoRA, guidance 1.0). The map's K, focus and disparity give the conditioning map "
                "clamp(|CoC| / 100, 0, 1); compute it from a depth map of this image (same size)."
            ),
            inputs=[
                Pipe.Input("pipe", tooltip="From Load Genfocus Models (with the BokehNet LoRA)."),
                io.Image.Input("image", tooltip="The all-in-focus image (e.g. from DeblurNet)."),
                Defocus.Input("defocus", tooltip="From Defocus Map, computed on this image's depth "
                              "(metric depth: K in px*m as Genfocus; 20 = demo default)."),
                *_sampler_inputs(),
                _tiling_input(),
                _conditioning_input("conditioning", "bokeh"),
            ],
            outputs=[io.Image.Output(display_name="image")],
        )

    @classmethod
    def execute(cls, pipe, image, defocus, steps: int, seed: int, noise: str, long_side: int,
                restore_size: bool, tiling=None, conditioning=None) -> io.NodeOutput:
        pipe = _check_pipe(BOKEH, pipe)
        options = _options(BOKEH, steps, seed, noise, tiling)
        frames = image_to_bchw(image, node=BOKEH)
        cond = _conditioning(BOKEH, "conditioning", conditioning, pipe, "bokeh")
        prompts = _prompts(BOKEH, pipe, {"bokeh": ("conditioning", cond)}, ("bokeh",))
        with _errors(BOKEH), _backend(pipe, prompts) as (models, stages):
            out = stages.bokeh_image(frames, models=models, defocus=defocus,
                                     options=_backend_options(pipe, options), long_side=long_side,
                                     restore_size=restore_size, on_step=progress(1))
        return io.NodeOutput(bchw_to_image(out.image))


class Refocus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_Refocus",
            display_name=REFOCUS,
            category="GenRefocus/generative",
            description=(
                "The whole Genfocus pipeline in one node: DeblurNet makes the photo all-in-focus, the "
                "depth model (or a given depth map) gives the disparity, and BokehNet renders the new focus "
                "with blur strength K. K = 0 returns the all-in-focus image."
            ),
            inputs=[
                Pipe.Input("pipe", tooltip="From Load Genfocus Models (DeblurNet and BokehNet LoRAs)."),
                io.Image.Input("image", tooltip="The photo(s) to refocus."),
                io.Float.Input("k", default=20.0, min=0.0, max=200.0, step=0.5,
                               tooltip="Blur strength K (px*m with metric depth, as Genfocus' 0-50 slider; "
                               "20 = demo default). 0 = all in focus."),
                *_sampler_inputs(),
                DepthModel.Input("depth_model", optional=True,
                                 tooltip="From Load Depth Model (Depth Pro, as the official demo); run on "
                                 "the all-in-focus image."),
                Depth.Input("depth", optional=True,
                            tooltip="A depth map of the photo instead of a depth model (any size)."),
                Focus.Input("focus", optional=True,
                            tooltip="Where to focus, on the input photo (default: the centre)."),
                io.Image.Input("pre_deblurred", optional=True,
                               tooltip="The photo deblurred by another method; uses the pre-deblur "
                               "DeblurNet."),
                _tiling_input(),
                _conditioning_input("deblur_conditioning", "deblur"),
                _conditioning_input("bokeh_conditioning", "bokeh"),
            ],
            outputs=[
                io.Image.Output(display_name="image"),
                io.Image.Output(display_name="all_in_focus"),
                io.Image.Output(display_name="condition_map"),
            ],
        )

    @classmethod
    def execute(cls, pipe, image, k: float, steps: int, seed: int, noise: str, long_side: int,
                restore_size: bool, depth_model=None, depth=None, focus=None, pre_deblurred=None,
                tiling=None, deblur_conditioning=None, bokeh_conditioning=None) -> io.NodeOutput:
        pipe = _check_pipe(REFOCUS, pipe)
        options = _options(REFOCUS, steps, seed, noise, tiling)
        frames = image_to_bchw(image, node=REFOCUS)
        pre = _optional_image(REFOCUS, pre_deblurred)
        if k > 0 and depth is not None and depth_model is not None:
            raise GenRefocusInputError(f"[{REFOCUS}] connect either depth_model or depth, not both")
        if k > 0 and depth is None and depth_model is None:
            raise GenRefocusInputError(
                f"[{REFOCUS}] depth_model or depth must be connected when k > 0 (e.g. Load Depth Model with "
                "Depth Pro); k = 0 needs neither"
            )
        given = {
            "deblur": ("deblur_conditioning",
                       _conditioning(REFOCUS, "deblur_conditioning", deblur_conditioning, pipe, "deblur")),
            "bokeh": ("bokeh_conditioning",
                      _conditioning(REFOCUS, "bokeh_conditioning", bokeh_conditioning, pipe, "bokeh")),
        }
        prompts = _prompts(REFOCUS, pipe, given, ("deblur", "bokeh") if k > 0 else ("deblur",))
        model = depth_model if k > 0 and depth is None else None
        with _errors(REFOCUS), _backend(pipe, prompts, model) as (models, stages):
            out = stages.refocus(frames, models=models, depth_model=model, depth=depth if k > 0 else None,
                                 focus=focus or FocusTarget("center"), k=k,
                                 options=_backend_options(pipe, options), pre_deblurred=pre,
                                 long_side=long_side, restore_size=restore_size, on_step=progress(1))
        cond = out.defocus if out.defocus is not None else torch.zeros_like(out.aif[:, :1])
        return io.NodeOutput(bchw_to_image(out.image), bchw_to_image(out.aif),
                             bchw_to_image(cond.expand(-1, 3, -1, -1)))
