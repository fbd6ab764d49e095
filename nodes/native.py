"""The native ComfyUI backend: Genfocus on the FLUX ``MODEL`` and ``VAE`` already loaded in ComfyUI.

``Genfocus LoRAs on ComfyUI Model`` takes a FLUX.1 ``MODEL`` (Load Diffusion Model, a checkpoint
loader, GGUF or fp8 loaders: anything that builds ComfyUI's ``Flux``), its ``VAE`` and the Genfocus
LoRA files, and puts a :class:`NativePipe` on the same ``GENREFOCUS_PIPE`` socket as Load Genfocus
Models, so DeblurNet, BokehNet and Refocus take either. The LoRAs are mapped onto ComfyUI's fused
layout and applied to condition tokens only (``genrefocus_core.native_flux``); the MODEL's weights
are never patched with them.

At run time ComfyUI's model management loads the MODEL (``load_models_gpu``: smart memory,
lowvram partial loading, offloading), ComfyUI's VAE encodes the conditions (posterior **mean**)
and decodes, ComfyUI's attention kernel is used, and progress / interrupts go through the usual
ProgressBar and ``throw_exception_if_processing_interrupted``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from comfy_api.latest import io

from ..genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from ..genrefocus_core.models import ADAPTER_BOKEH, ADAPTER_DEBLUR, ADAPTER_PRE_DEBLUR
from ..genrefocus_core.native_flux import NativeLora, flux_dims, load_native_lora
from ..genrefocus_core.native_pipeline import NativeModels
from ..genrefocus_core.prompts import PromptEmbedding, load_prompt_embeddings
from .loaders import genfocus_combo, genfocus_path
from .sockets import Pipe

logger = logging.getLogger(__name__)

NATIVE_LOADER = "Genfocus LoRAs on ComfyUI Model"
_GENFOCUS_HF = "https://huggingface.co/nycu-cplab/Genfocus-Model"
_ADAPTERS = {
    "deblur_lora": ADAPTER_DEBLUR,
    "pre_deblur_lora": ADAPTER_PRE_DEBLUR,
    "bokeh_lora": ADAPTER_BOKEH,
}


class ComfyVaeCodec:
    """ComfyUI's ``VAE`` object as the core's ``LatentCodec`` (posterior mean, as ComfyUI encodes).

    ``encode`` hands ComfyUI pixels in [0, 1] (it maps them to ``2x - 1`` itself), so VAE-range input
    ``p`` goes in as ``(p + 1) / 2``; that also feeds the D_def map (used as is, ``No_preprocess``)
    unchanged up to float rounding. Latents are shifted and scaled by the MODEL's latent format.
    """

    def __init__(self, vae: Any, latent_format: Any) -> None:
        self.vae, self.latent_format = vae, latent_format
        self.latent_channels = int(getattr(vae, "latent_channels", 16))

    def encode(self, pixels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is not None:
            raise GenRefocusModelError(
                "ComfyUI's VAE encodes to the posterior mean; the native backend needs "
                "condition_latent='mean'"
            )
        z = self.vae.encode(((pixels.float() + 1.0) / 2.0).permute(0, 2, 3, 1))
        return self.latent_format.process_in(z.float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(self.latent_format.process_out(latents.float()))
        return image[..., :3].permute(0, 3, 1, 2).float()


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ComfyUI's attention kernel of this session (pytorch SDPA, sage, flash, xformers ...)."""
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, q.shape[1], skip_reshape=True)


@dataclass
class NativePipe:
    """What travels on a ``GENREFOCUS_PIPE`` socket for the native backend.

    Attributes:
        model: ComfyUI ``ModelPatcher`` of a FLUX.1 model.
        vae: ComfyUI ``VAE``.
        loras: adapter name → LoRA in the fused layout (CPU, float32; moved per run).
        prompts: cached prompt embeddings (CPU), possibly none (CONDITIONING inputs then).
        files: parameter name → file the loader read.
    """

    model: Any
    vae: Any
    loras: Mapping[str, NativeLora]
    prompts: Mapping[str, PromptEmbedding] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def flux(self) -> Any:
        return self.model.model.diffusion_model

    def text_dims(self) -> tuple[int, int]:
        """(T5 width, CLIP pooled width) the MODEL expects."""
        d = flux_dims(self.flux)
        return d.joint_attention_dim, d.pooled_projection_dim

    def has_adapter(self, adapter: str) -> bool:
        return adapter in self.loras

    def compute_dtype(self) -> torch.dtype:
        """The dtype ComfyUI computes this MODEL in (manual cast, else its weight dtype)."""
        base = self.model.model
        dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
        if not dtype.is_floating_point or dtype.itemsize < 2:  # fp8 / quantised storage without a cast dtype
            return torch.bfloat16 if torch.device(self.model.load_device).type == "cuda" else torch.float32
        return dtype

    @contextlib.contextmanager
    def loaded(self, prompts: Mapping[str, PromptEmbedding] | None = None) -> Iterator[NativeModels]:
        """The core's :class:`NativeModels` for one run; the MODEL is (re)loaded by ComfyUI before
        every denoise (after the VAE encoded the conditions), the LoRAs sit on its device meanwhile."""
        import comfy.model_management as mm

        device, dtype = torch.device(self.model.load_device), self.compute_dtype()
        lora_bytes = sum(lo.nbytes(dtype) for lo in self.loras.values())

        def prepare(tokens: int) -> None:
            need = self.model.model.memory_required([1, 16, 2, 2 * max(int(tokens), 1)])
            mm.load_models_gpu([self.model], memory_required=need + lora_bytes)

        loras = {name: lo.to(device, dtype) for name, lo in self.loras.items()}
        try:
            yield NativeModels(
                self.flux,
                loras,
                ComfyVaeCodec(self.vae, self.model.model.latent_format),
                dict(self.prompts if prompts is None else prompts),
                device=device,
                dtype=dtype,
                attention=_attention,
                prepare=prepare,
            )
        finally:
            loras.clear()
            mm.soft_empty_cache()

    def with_prompts(self, prompts: Mapping[str, PromptEmbedding]) -> NativePipe:
        return dataclasses.replace(self, prompts=dict(prompts))


class NativeModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        combo = genfocus_combo
        return io.Schema(
            node_id="GenRefocus_NativeModelLoader",
            display_name=NATIVE_LOADER,
            category="GenRefocus/loaders",
            description=(
                "Run Genfocus on the FLUX.1-dev MODEL and VAE you already use in ComfyUI (Load Diffusion "
                "Model, checkpoint, fp8 or GGUF loaders) instead of a second diffusers copy. The Genfocus "
                "LoRAs act on the condition tokens only (never merged into the MODEL); ComfyUI's memory "
                "management loads and offloads the MODEL. Connect the pipe to DeblurNet, BokehNet or Refocus."
            ),
            inputs=[
                io.Model.Input(
                    "model", tooltip="FLUX.1-dev (bf16, fp8 or GGUF), e.g. from Load Diffusion Model."
                ),
                io.Vae.Input("vae", tooltip="The FLUX VAE (ae.safetensors), e.g. from Load VAE."),
                combo("deblur_lora", f"deblurNet.safetensors ({_GENFOCUS_HF})."),
                combo("bokeh_lora", f"bokehNet.safetensors ({_GENFOCUS_HF})."),
                combo(
                    "pre_deblur_lora",
                    "deblurNet_with_pre_deblur.safetensors, for DeblurNet with a "
                    "pre-deblurred image; none to save memory.",
                ),
                combo(
                    "prompts",
                    "Cached embeddings of the two fixed Genfocus prompts (the official 512-token "
                    "T5 padding; no T5/CLIP needed). none: connect CONDITIONING (CLIP Text Encode with a "
                    "FLUX CLIP) to the Genfocus nodes.",
                ),
            ],
            outputs=[Pipe.Output(display_name="pipe")],
        )

    @classmethod
    def execute(
        cls, model, vae, deblur_lora: str, bokeh_lora: str, pre_deblur_lora: str, prompts: str
    ) -> io.NodeOutput:
        names = dict(
            deblur_lora=deblur_lora, bokeh_lora=bokeh_lora, pre_deblur_lora=pre_deblur_lora, prompts=prompts
        )
        paths = {param: genfocus_path(param, name, NATIVE_LOADER) for param, name in names.items()}
        flux = getattr(getattr(model, "model", None), "diffusion_model", None)
        if flux is None or not hasattr(vae, "encode") or not hasattr(vae, "decode"):
            raise GenRefocusInputError(
                f"[{NATIVE_LOADER}] model and vae must be a ComfyUI MODEL and VAE, got "
                f"{type(model).__name__} and {type(vae).__name__}"
            )
        try:
            dims = flux_dims(flux)
            loras = {
                _ADAPTERS[p]: load_native_lora(paths[p], flux, _ADAPTERS[p])
                for p in _ADAPTERS
                if paths[p] is not None
            }
            embeds = (
                {}
                if paths["prompts"] is None
                else load_prompt_embeddings(
                    paths["prompts"],
                    joint_attention_dim=dims.joint_attention_dim,
                    pooled_projection_dim=dims.pooled_projection_dim,
                )
            )
        except (GenRefocusModelError, GenRefocusInputError) as e:
            raise type(e)(f"[{NATIVE_LOADER}] {e}") from e
        return io.NodeOutput(NativePipe(model, vae, loras, embeds, names))
