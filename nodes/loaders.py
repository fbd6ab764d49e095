"""Loader nodes: the only module that touches ComfyUI's model folders (``folder_paths``).

Depth models are ``transformers``-format folders under the ``depth`` model key (default
``models/depth/<name>/``; more folders via ``extra_model_paths.yaml``). The key is registered here
if ComfyUI or another pack has not done so.

The Genfocus weights (comfyui.md section 6): FLUX.1-dev from ``diffusion_models`` (also
``models/unet``; single files, fp8 included) or a ``diffusers`` folder; the FLUX VAE from ``vae``
(``ae.safetensors``) or a ``diffusers`` folder; the LoRAs from ``loras`` (e.g. ``loras/genfocus/``)
or our own key ``genrefocus`` (``models/genrefocus/``), which also holds the cached prompt
embeddings. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import folder_paths
import torch
from comfy_api.latest import io

from ..genrefocus_core.camera import camera_from_exif, read_exif
from ..genrefocus_core.condition_cache import CONDITION_CACHE_MODES
from ..genrefocus_core.depth_models import DEPTH_MODEL_FOLDER_HINT, load_depth_model
from ..genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from ..genrefocus_core.memory import MEMORY_MODES, MemoryMode
from ..genrefocus_core.models import load_genfocus_models
from ._glue import check_combo, user_errors
from .sockets import Camera, DepthModel, Pipe

if "depth" not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path("depth", os.path.join(folder_paths.models_dir, "depth"))
if "genrefocus" not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path("genrefocus", os.path.join(folder_paths.models_dir, "genrefocus"))

DEPTH_LOADER = "Load Depth Model"
DTYPES = ("auto", "fp32", "fp16", "bf16")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MAX_DEPTH = 4  # folder levels searched below each depth folder (e.g. depth/apple/DepthPro-hf)


def depth_model_folders() -> list[str]:
    """Model folders (holding a ``config.json``) under every ``depth`` folder, as ``/``-separated names."""
    found: set[str] = set()
    for root in folder_paths.get_folder_paths("depth"):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            level = 0 if rel == "." else rel.count(os.sep) + 1
            if level and "config.json" in filenames:
                found.add(rel.replace(os.sep, "/"))
                dirnames[:] = []  # a model folder's subfolders are not models
            else:
                dirnames[:] = [] if level >= _MAX_DEPTH else [d for d in dirnames if not d.startswith(".")]
    return sorted(found)


def _depth_model_path(model_name: str) -> str:
    """Path of ``model_name`` in the first ``depth`` folder holding it; checked against the listing."""
    options = depth_model_folders()
    if model_name not in options:
        where = ", ".join(folder_paths.get_folder_paths("depth"))
        listed = ", ".join(options) if options else "none found"
        raise GenRefocusInputError(
            f"[{DEPTH_LOADER}] model_name must be a depth model folder in {where} ({listed}), got "
            f"{model_name!r}; {DEPTH_MODEL_FOLDER_HINT}"
        )
    for root in folder_paths.get_folder_paths("depth"):
        path = os.path.join(root, *model_name.split("/"))
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise GenRefocusInputError(f"[{DEPTH_LOADER}] model_name {model_name!r} disappeared while loading")


def _torch_dtype(dtype: str) -> torch.dtype:
    """``auto``: fp16 when ComfyUI computes on CUDA (as Depth Pro's reference code), else fp32."""
    if dtype != "auto":
        return _TORCH_DTYPES[dtype]
    import comfy.model_management as mm

    return torch.float16 if mm.get_torch_device().type == "cuda" else torch.float32


class DepthModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_DepthModelLoader",
            display_name=DEPTH_LOADER,
            category="GenRefocus/loaders",
            description=(
                "Load Depth Pro (metric depth and focal length) or Depth Anything V2 (relative disparity; "
                "metric variants in metres) from a transformers-format folder in models/depth/ "
                "(config.json + model.safetensors + preprocessor_config.json). Nothing is downloaded."
            ),
            inputs=[
                io.Combo.Input(
                    "model_name",
                    options=depth_model_folders(),
                    tooltip="A folder under models/depth/ holding config.json and model.safetensors, e.g. "
                    "DepthPro (apple/DepthPro-hf) or Depth-Anything-V2-Large-hf.",
                ),
                io.Combo.Input(
                    "dtype",
                    options=list(DTYPES),
                    default="auto",
                    tooltip="Weights precision on the GPU; auto = fp16 on CUDA. The CPU always uses fp32.",
                ),
            ],
            outputs=[DepthModel.Output(display_name="depth_model")],
        )

    @classmethod
    def execute(cls, model_name: str, dtype: str) -> io.NodeOutput:
        import comfy.model_management as mm

        check_combo(DEPTH_LOADER, "dtype", dtype, DTYPES)
        path = _depth_model_path(model_name)
        try:
            model = load_depth_model(path, dtype=_torch_dtype(dtype), device=mm.unet_offload_device())
        except GenRefocusModelError as e:
            raise GenRefocusModelError(f"[{DEPTH_LOADER}] {e}") from e
        return io.NodeOutput(model)


# ------------------------------------------------------------------------------------------------
# Genfocus models
# ------------------------------------------------------------------------------------------------

PIPE_LOADER = "Load Genfocus Models"
GEN_DTYPES = ("auto", "bf16", "fp16", "fp32")
NONE = "none"
#: Prefix of combo entries that are diffusers folders rather than single files.
DIFFUSERS_PREFIX = "diffusers/"
_GENFOCUS_HF = "https://huggingface.co/nycu-cplab/Genfocus-Model"
_MAX_FOLDER_DEPTH = 3

# parameter -> (folder keys searched, official file name, where to put it)
_LORA_DIRS = "models/loras/genfocus/ or models/genrefocus/"
_SOURCES = {
    "transformer": (("diffusion_models",), "flux1-dev.safetensors",
                    "put FLUX.1-dev (flux1-dev.safetensors, or an fp8 version) in "
                    "models/diffusion_models/, or its diffusers folder in models/diffusers/"),
    "vae": (("vae",), "ae.safetensors",
            "put FLUX.1's ae.safetensors in models/vae/, or use the vae/ of a diffusers folder in "
            "models/diffusers/"),
    "deblur_lora": (("loras", "genrefocus"), "deblurNet.safetensors",
                    f"put deblurNet.safetensors ({_GENFOCUS_HF}) in {_LORA_DIRS}"),
    "bokeh_lora": (("loras", "genrefocus"), "bokehNet.safetensors",
                   f"put bokehNet.safetensors ({_GENFOCUS_HF}) in {_LORA_DIRS}"),
    "pre_deblur_lora": (("loras", "genrefocus"), "deblurNet_with_pre_deblur.safetensors",
                        f"put deblurNet_with_pre_deblur.safetensors ({_GENFOCUS_HF}) in {_LORA_DIRS}, or "
                        "choose none"),
    "prompts": (("genrefocus",), "genfocus_prompts.safetensors",
                "put the GenRefocus prompt-embedding file genfocus_prompts.safetensors in "
                "models/genrefocus/"),
}


def _safetensors_files(key: str) -> list[str]:
    if key not in folder_paths.folder_names_and_paths:
        return []
    names = folder_paths.get_filename_list(key)
    return [n.replace(os.sep, "/") for n in names if n.lower().endswith(".safetensors")]


def _config_class(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def diffusers_folders(component: str) -> list[str]:
    """``diffusers/<name>`` for every ``diffusers`` folder holding a FLUX ``transformer`` or ``vae``.

    A folder counts if it is a pipeline folder with ``<component>/config.json`` or is itself that
    component (``config.json`` naming ``FluxTransformer2DModel`` / ``AutoencoderKL``).
    """
    cls_name = {"transformer": "FluxTransformer2DModel", "vae": "AutoencoderKL"}[component]
    found: set[str] = set()
    known = "diffusers" in folder_paths.folder_names_and_paths
    roots = folder_paths.get_folder_paths("diffusers") if known else []
    for root in roots:
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, _files in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            level = 0 if rel == "." else rel.count(os.sep) + 1
            dirnames[:] = [] if level >= _MAX_FOLDER_DEPTH else [d for d in dirnames if not d.startswith(".")]
            if not level:
                continue
            if os.path.isfile(os.path.join(dirpath, component, "config.json")) or (
                _config_class(os.path.join(dirpath, "config.json")) == cls_name
            ):
                found.add(DIFFUSERS_PREFIX + rel.replace(os.sep, "/"))
    return sorted(found)


def genfocus_options(param: str) -> list[str]:
    """Combo entries of a Load Genfocus Models input: single files (+ diffusers folders, + none)."""
    keys = _SOURCES[param][0]
    files = sorted({n for key in keys for n in _safetensors_files(key)})
    if param in ("transformer", "vae"):
        files += diffusers_folders(param)
    if param in ("pre_deblur_lora", "prompts"):  # prompts: none = CONDITIONING inputs of the Genfocus nodes
        files = [NONE, *files]
    return files


def _default(param: str, options: list[str]) -> str | None:
    wanted = _SOURCES[param][1]
    if param == "pre_deblur_lora":
        return NONE
    for name in options:
        if name.rsplit("/", 1)[-1] == wanted:
            return name
    files = [o for o in options if o != NONE]
    return (files or options or [None])[0]


def genfocus_combo(param: str, tooltip: str) -> io.Combo.Input:
    """A Genfocus file combo (current listing, the usual file name preselected) for a loader node."""
    options = genfocus_options(param)
    return io.Combo.Input(param, options=options, default=_default(param, options), tooltip=tooltip)


def genfocus_path(param: str, name: str, node: str = PIPE_LOADER) -> str | None:
    """The file or folder for a combo value; checked against the current listing (errors name ``node``)."""
    keys, _, hint = _SOURCES[param]
    options = genfocus_options(param)
    if name not in options:
        listed = ", ".join(o for o in options[:8] if o != NONE) or "none found"
        more = f" (+{len(options) - 8} more)" if len(options) > 8 else ""
        raise GenRefocusInputError(
            f"[{node}] {param} must be one of the files found ({listed}{more}), got {name!r}; {hint}"
        )
    if name == NONE:
        return None
    if name.startswith(DIFFUSERS_PREFIX):
        rel = name[len(DIFFUSERS_PREFIX):].split("/")
        for root in folder_paths.get_folder_paths("diffusers"):
            if os.path.isdir(os.path.join(root, *rel)):
                return os.path.join(root, *rel)
    for key in keys:
        path = folder_paths.get_full_path(key, name)
        if path is not None:
            return path
    raise GenRefocusInputError(f"[{node}] {param} {name!r} disappeared while loading; {hint}")


def _genfocus_dtype(dtype: str) -> torch.dtype:
    """``auto``: bf16 on CUDA (the official GPU dtype), else fp32 (the official CPU dtype)."""
    if dtype != "auto":
        return _TORCH_DTYPES[dtype]
    import comfy.model_management as mm

    return torch.bfloat16 if mm.get_torch_device().type == "cuda" else torch.float32


#: Loader choices: ``auto`` picks a memory mode from the GPU's size (:func:`auto_memory_mode`).
LOADER_MEMORY_MODES = ("auto", *MEMORY_MODES)
_MEMORY_TOOLTIP = (
    "How FLUX.1-dev's 11.9 B weights are kept (GPU memory for BokehNet at 1 MP, from bench/memory.py: "
    "resident weights / peak). full: bf16 resident, 23.8 / ~26 GB (official, exact). fp8: fp8 e4m3 storage, "
    "bf16 compute, 11.9 / ~14.5 GB (24 and 16 GB cards). nf4: 4-bit, needs bitsandbytes, 6.2 / ~8.5 GB "
    "(12 GB cards). offload: bf16 weights in CPU RAM (24 GB RAM), blocks streamed to the GPU, 1.5 / ~4 GB, "
    "slower on small images. fp8_offload: fp8 in CPU RAM (12 GB RAM), streamed, 0.8 / ~3.3 GB. A .gguf "
    "transformer keeps its quantisation (Q8_0 12.7 GB, Q4_K 6.7 GB) with full or offload. auto: full with "
    ">= 30 GB of VRAM, fp8 with >= 18 GB, else fp8_offload; full on the CPU."
)
_CACHE_TOOLTIP = (
    "Fast mode (off = exact, as the official pipeline): the conditions' keys/values are computed at the "
    "first step of every tile and replayed at later steps, an approximation (measured 2.4 % of the latents "
    "on the test model). Per image: 0.52x the FLOPs at 28 steps, 0.23x with 12 steps (pair with 8-12 steps "
    "on the sampler nodes; 12 steps alone: 0.43x). on: cache on the GPU (1.4 GB per 512 px tile for "
    "BokehNet: 13 GB at 1 MP); cpu: in host memory, streamed back per layer (for <= 24 GB cards)."
)


def auto_memory_mode(device: torch.device) -> str:
    """The loader's ``auto``: full on the CPU or >= 30 GB, fp8 from 18 GB, else streamed fp8."""
    if device.type != "cuda":
        return "full"
    import comfy.model_management as mm

    total = mm.get_total_memory(device)
    return "full" if total >= 30e9 else "fp8" if total >= 18e9 else "fp8_offload"


def _bytes_on(pipe, device: torch.device) -> int:
    """Bytes of the pipe's weights (transformer with LoRAs, VAE) currently on ``device``."""
    mods = (pipe.models.transformer, pipe.models.vae)
    return sum(t.numel() * t.element_size() for m in mods for t in (*m.parameters(), *m.buffers())
               if t.device == device)


class _Weights:
    """``LoadedModel.model`` stand-in: ComfyUI reads ``.model`` (for ``is_clone`` and its log line)."""

    __slots__ = ("model",)

    def __init__(self, model) -> None:
        self.model = model


class _HeldByGenRefocus:
    """What ComfyUI's model manager sees of a Genfocus pipe: a ``LoadedModel`` look-alike.

    The diffusers weights (branch-selective LoRA, memory modes) live outside ComfyUI's
    ``ModelPatcher``; this entry in ``comfy.model_management.current_loaded_models`` tells ComfyUI
    how much of the compute device they hold at any moment, and lets ``free_memory`` /
    ``unload_all_models`` (the "Free model and node cache" button) move them to the offload device.
    It stays registered while the pipe lives (runs may bring the weights back) and removes itself
    when the pipe is garbage-collected.
    """

    def __init__(self, pipe, device: torch.device, offload: torch.device, registry: list) -> None:
        import weakref

        me = weakref.ref(self)

        def drop(_ref) -> None:
            held = me()
            if held is not None and any(x is held for x in registry):
                registry[:] = [x for x in registry if x is not held]

        self._pipe = weakref.ref(pipe, drop)
        self.device, self.offload = device, offload
        self.currently_used = False  # never handed back by loaded_models(only_currently_used=True)
        self.unloads = 0

    @property
    def model(self) -> _Weights | None:
        pipe = self._pipe()
        return None if pipe is None else _Weights(pipe.models.transformer)

    def real_model(self):
        pipe = self._pipe()
        return None if pipe is None else pipe.models.transformer

    def is_dead(self) -> bool:
        return False

    def model_memory(self) -> int:
        pipe = self._pipe()
        return 0 if pipe is None else pipe.memory_bytes()

    def model_loaded_memory(self) -> int:
        pipe = self._pipe()
        return 0 if pipe is None else _bytes_on(pipe, self.device)

    def model_offloaded_memory(self) -> int:
        return self.model_memory() - self.model_loaded_memory()

    def model_memory_required(self, device: torch.device) -> int:
        return self.model_offloaded_memory()

    def model_unload(self, memory_to_free=None, unpatch_weights=True) -> bool:
        """Move the weights to the offload device; stay registered (False) for later runs."""
        pipe = self._pipe()
        if pipe is not None and self.model_loaded_memory() > 0:
            pipe.to(self.offload)
            self.unloads += 1
        return False


def hold_with_comfy(pipe, device: torch.device, offload: torch.device) -> _HeldByGenRefocus | None:
    """Register ``pipe`` with ComfyUI's model manager (see :class:`_HeldByGenRefocus`); None without one."""
    import comfy.model_management as mm

    registry = getattr(mm, "current_loaded_models", None)
    if registry is None:
        return None
    held = _HeldByGenRefocus(pipe, device, offload, registry)
    registry.append(held)
    return held


class GenfocusModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        combo = genfocus_combo
        return io.Schema(
            node_id="GenRefocus_ModelLoader",
            display_name=PIPE_LOADER,
            category="GenRefocus/loaders",
            description=(
                "Load FLUX.1-dev, its VAE, the Genfocus LoRAs (DeblurNet, BokehNet and optionally the "
                "pre-deblur DeblurNet, all resident at once) and the cached prompt embeddings (no T5/CLIP "
                "needed) for the Genfocus nodes. Local files only: models/diffusion_models (or unet), "
                "models/vae, models/loras/genfocus or models/genrefocus, models/diffusers folders."
            ),
            inputs=[
                combo("transformer", "FLUX.1-dev: a single file (bf16/fp16/fp8, BFL or ComfyUI layout) from "
                      "models/diffusion_models, or a diffusers folder from models/diffusers."),
                combo("vae", "FLUX VAE: ae.safetensors from models/vae, or a diffusers folder's vae/."),
                combo("deblur_lora", f"deblurNet.safetensors ({_GENFOCUS_HF})."),
                combo("bokeh_lora", f"bokehNet.safetensors ({_GENFOCUS_HF})."),
                combo("pre_deblur_lora", "deblurNet_with_pre_deblur.safetensors, for DeblurNet with a "
                      "pre-deblurred image; none to save memory."),
                combo("prompts", "Cached embeddings of the two fixed Genfocus prompts "
                      "(genfocus_prompts.safetensors in models/genrefocus; build it once with python -m "
                      "genrefocus_core build-prompts). none: connect CONDITIONING to the Genfocus nodes."),
                io.Combo.Input("dtype", options=list(GEN_DTYPES), default="auto",
                               tooltip="Compute precision; auto = bf16 on CUDA (as the official code), "
                               "fp32 on the CPU."),
                io.Boolean.Input("keep_loaded", default=False,
                                 tooltip="Keep the weights on the GPU between runs (faster refocus "
                                 "edits). Off: they go back to the CPU after each node, freeing VRAM."),
                io.Combo.Input("memory_mode", options=list(LOADER_MEMORY_MODES), default="auto",
                               tooltip=_MEMORY_TOOLTIP),
                io.Combo.Input("condition_cache", options=list(CONDITION_CACHE_MODES), default="off",
                               tooltip=_CACHE_TOOLTIP),
            ],
            outputs=[Pipe.Output(display_name="pipe")],
        )

    @classmethod
    def execute(cls, transformer: str, vae: str, deblur_lora: str, bokeh_lora: str, pre_deblur_lora: str,
                prompts: str, dtype: str, keep_loaded: bool, memory_mode: str = "auto",
                condition_cache: str = "off") -> io.NodeOutput:
        import comfy.model_management as mm

        from .generative import GenerativePipe

        check_combo(PIPE_LOADER, "dtype", dtype, GEN_DTYPES)
        check_combo(PIPE_LOADER, "memory_mode", memory_mode, LOADER_MEMORY_MODES)
        check_combo(PIPE_LOADER, "condition_cache", condition_cache, CONDITION_CACHE_MODES)
        names = dict(transformer=transformer, vae=vae, deblur_lora=deblur_lora, bokeh_lora=bokeh_lora,
                     pre_deblur_lora=pre_deblur_lora, prompts=prompts)
        paths = {param: genfocus_path(param, name) for param, name in names.items()}
        torch_dtype = _genfocus_dtype(dtype)
        compute, offload = mm.get_torch_device(), mm.unet_offload_device()
        mode = MemoryMode(auto_memory_mode(compute) if memory_mode == "auto" else memory_mode)
        if mode.streamed and compute != offload:  # the stem and two blocks only: make that room
            mm.free_memory(int(2e9), compute)
        try:  # built on the offload device; streamed modes onload block by block to the compute device
            models = load_genfocus_models(
                paths["transformer"], paths["vae"], paths["prompts"], deblur_lora=paths["deblur_lora"],
                bokeh_lora=paths["bokeh_lora"], pre_deblur_lora=paths["pre_deblur_lora"], dtype=torch_dtype,
                device=compute if mode.streamed else offload, memory_mode=mode.value, offload_device=offload,
                condition_cache=condition_cache,
            )
        except (GenRefocusModelError, GenRefocusInputError) as e:
            raise type(e)(f"[{PIPE_LOADER}] {e}") from e
        pipe = GenerativePipe(models, keep_loaded=keep_loaded, files=names)
        if keep_loaded and compute != offload:  # make room (ComfyUI's resident models go), then move
            mm.free_memory(_bytes_on(pipe, offload), compute)
            pipe.to(compute)
            mm.soft_empty_cache()
        pipe.held = hold_with_comfy(pipe, compute, offload)
        return io.NodeOutput(pipe)


EXIF = "Read Camera EXIF"


def _input_images() -> list[str]:
    """Image files in ComfyUI's input folder (what core Load Image lists)."""
    folder = folder_paths.get_input_directory()
    if not os.path.isdir(folder):
        return []
    files = [f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f))]
    return sorted(folder_paths.filter_files_content_types(files, ["image"]))


class ReadCameraExif(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GenRefocus_ReadCameraEXIF",
            display_name=EXIF,
            category="GenRefocus/camera",
            description=(
                "Focal length, f-number and sensor (from the 35 mm-equivalent focal length) of a photo in "
                "the input folder, read from its EXIF. Feed Camera Settings to render it at another aperture."
            ),
            inputs=[
                io.Combo.Input("image", options=_input_images(), upload=io.UploadType.image,
                               tooltip="A photo in ComfyUI's input folder (the same file as Load Image)."),
                io.Float.Input("sensor_width_mm", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Used only when the file has no 35 mm-equivalent focal length: "
                                       "36 full frame, 23.5 APS-C, 17.3 Micro Four Thirds. 0 = none."),
            ],
            outputs=[Camera.Output(display_name="camera"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def execute(cls, image: str, sensor_width_mm: float) -> io.NodeOutput:
        with user_errors(EXIF):
            if not isinstance(image, str) or not folder_paths.exists_annotated_filepath(image):
                raise GenRefocusInputError(
                    f"image must be a file in ComfyUI's input folder, got {image!r}; upload it or pick "
                    "another"
                )
            lens = read_exif(folder_paths.get_annotated_filepath(image))
            camera = camera_from_exif(lens, sensor_width_mm or None)
            who = " ".join(x for x in (lens.make, lens.model) if x) or "unknown camera"
            size = f"{lens.width_px} x {lens.height_px} px"
            return io.NodeOutput(camera, f"{who}, {size}: {camera.describe()}")

    @classmethod
    def fingerprint_inputs(cls, image: str, sensor_width_mm: float) -> str:
        """Re-run when the file changes (as core Load Image does)."""
        path = folder_paths.get_annotated_filepath(image) if isinstance(image, str) else ""
        return f"{path}:{os.path.getmtime(path)}" if path and os.path.isfile(path) else str(image)
