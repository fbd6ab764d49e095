"""The two fixed Genfocus prompts as cached text embeddings (no T5/CLIP at run time).

File format (safetensors): per prompt name ``<name>``, tensors ``<name>.prompt_embeds``
``[1, L, joint_attention_dim]`` (T5-XXL last hidden state, 512-token max-length padding, no mask)
and ``<name>.pooled_prompt_embeds`` ``[1, pooled_projection_dim]`` (CLIP-L pooler output);
metadata ``prompt.<name>`` = the prompt text and, optionally, ``encoder_hash`` = a hash of the
text-encoder weights that produced them (performance.md §4). Names used by the pipeline:
``"deblur"`` and ``"bokeh"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import GenRefocusInputError, GenRefocusModelError

__all__ = [
    "BOKEH_PROMPT",
    "DEBLUR_PROMPT",
    "PROMPTS",
    "PromptEmbedding",
    "load_prompt_embeddings",
    "save_prompt_embeddings",
]

logger = logging.getLogger(__name__)

#: DeblurNet's fixed prompt (official ``Inference_deblurNet.py``).
DEBLUR_PROMPT = "a sharp photo with everything in focus"
#: BokehNet's fixed prompt (official ``Inference_bokehNet.py``).
BOKEH_PROMPT = "an excellent photo with a large aperture"
#: Prompt name → text.
PROMPTS = {"deblur": DEBLUR_PROMPT, "bokeh": BOKEH_PROMPT}


@dataclass(frozen=True)
class PromptEmbedding:
    """One cached prompt.

    Attributes:
        prompt: the prompt text.
        prompt_embeds: ``(1, L, joint_attention_dim)`` T5 embeddings.
        pooled: ``(1, pooled_projection_dim)`` CLIP pooled embedding.
    """

    prompt: str
    prompt_embeds: Tensor
    pooled: Tensor

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> PromptEmbedding:
        """A copy on another device/dtype."""
        return PromptEmbedding(
            self.prompt,
            self.prompt_embeds.to(device=device, dtype=dtype),
            self.pooled.to(device=device, dtype=dtype),
        )


def load_prompt_embeddings(
    path: str | Path,
    *,
    names: tuple[str, ...] = ("deblur", "bokeh"),
    joint_attention_dim: int | None = None,
    pooled_projection_dim: int | None = None,
    encoder_hash: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, PromptEmbedding]:
    """Load and verify cached prompt embeddings.

    Args:
        path: the ``.safetensors`` file.
        names: prompt names that must be present.
        joint_attention_dim: expected T5 width (the transformer's ``joint_attention_dim``; 4096).
        pooled_projection_dim: expected pooled width (``pooled_projection_dim``; 768).
        encoder_hash: if given, the file's ``encoder_hash`` metadata must equal it.
        device: device of the tensors.
        dtype: dtype of the tensors.

    Returns:
        name → :class:`PromptEmbedding`.

    Raises:
        GenRefocusModelError: missing file, missing names, wrong shapes, a prompt text that is not
            the official one, or a hash mismatch.
    """
    p = Path(path)
    if not p.is_file():
        raise GenRefocusModelError(
            f"prompt embeddings file {str(p)!r} not found; put the GenRefocus cached prompt embeddings "
            "into models/genrefocus"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for corrupt headers
        raise GenRefocusModelError(
            f"prompt embeddings file {str(p)!r} is not a readable safetensors file: {e}"
        ) from e
    if encoder_hash is not None and meta.get("encoder_hash") != encoder_hash:
        raise GenRefocusModelError(
            f"prompt embeddings {p.name!r} were made by text encoders with hash "
            f"{meta.get('encoder_hash')!r}, "
            f"expected {encoder_hash!r}; rebuild them with the matching T5/CLIP weights"
        )
    out: dict[str, PromptEmbedding] = {}
    for name in names:
        ke, kp = f"{name}.prompt_embeds", f"{name}.pooled_prompt_embeds"
        if ke not in tensors or kp not in tensors:
            raise GenRefocusModelError(
                f"prompt embeddings {p.name!r} must hold {ke!r} and {kp!r}, found {sorted(tensors)}"
            )
        emb, pooled = tensors[ke], tensors[kp]
        if (
            emb.ndim != 3
            or emb.shape[0] != 1
            or (joint_attention_dim and emb.shape[2] != joint_attention_dim)
        ):
            raise GenRefocusModelError(
                f"{ke} must have shape (1, L, {joint_attention_dim or 'D'}), got {tuple(emb.shape)}"
            )
        if (
            pooled.ndim != 2
            or pooled.shape[0] != 1
            or (pooled_projection_dim and pooled.shape[1] != pooled_projection_dim)
        ):
            raise GenRefocusModelError(
                f"{kp} must have shape (1, {pooled_projection_dim or 'D'}), got {tuple(pooled.shape)}"
            )
        if not (torch.isfinite(emb).all() and torch.isfinite(pooled).all()):
            raise GenRefocusModelError(f"prompt embeddings {name!r} in {p.name!r} hold NaN/inf values")
        text = meta.get(f"prompt.{name}", PROMPTS.get(name, ""))
        if name in PROMPTS and text != PROMPTS[name]:
            raise GenRefocusModelError(
                f"prompt {name!r} in {p.name!r} is {text!r}, expected the official {PROMPTS[name]!r}"
            )
        out[name] = PromptEmbedding(
            text, emb.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
        )
    return out


def save_prompt_embeddings(
    path: str | Path, prompts: Mapping[str, PromptEmbedding], *, encoder_hash: str | None = None
) -> Path:
    """Write cached prompt embeddings in the format :func:`load_prompt_embeddings` reads.

    Example:
        >>> import tempfile, os
        >>> e = PromptEmbedding(DEBLUR_PROMPT, torch.zeros(1, 4, 8), torch.zeros(1, 8))
        >>> d = tempfile.mkdtemp()
        >>> p = save_prompt_embeddings(os.path.join(d, "p.safetensors"), {"deblur": e})
        >>> load_prompt_embeddings(p, names=("deblur",))["deblur"].prompt_embeds.shape
        torch.Size([1, 4, 8])
    """
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    meta: dict[str, str] = {}
    for name, e in prompts.items():
        if not isinstance(e, PromptEmbedding):
            raise GenRefocusInputError(f"prompts[{name!r}] must be a PromptEmbedding, got {type(e).__name__}")
        tensors[f"{name}.prompt_embeds"] = e.prompt_embeds.detach().cpu().contiguous()
        tensors[f"{name}.pooled_prompt_embeds"] = e.pooled.detach().cpu().contiguous()
        meta[f"prompt.{name}"] = e.prompt
    if encoder_hash is not None:
        meta["encoder_hash"] = encoder_hash
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p), metadata=meta)
    return p
