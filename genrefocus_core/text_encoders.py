"""Build the cached prompt embeddings once from local T5-XXL and CLIP-L folders.

Genfocus conditions FLUX on two fixed prompts only (:data:`~genrefocus_core.prompts.PROMPTS`), so
their text embeddings are constants: this module encodes them exactly as the official pipeline
(diffusers' ``FluxPipeline.encode_prompt``, official-pipeline.md §2) and writes the file
:func:`~genrefocus_core.prompts.load_prompt_embeddings` reads. T5 (~9.5 GB) never has to be
loaded again (performance.md §4).

* CLIP-L: ``padding="max_length"`` to 77 tokens, truncation, ``pooler_output`` → ``(1, 768)``.
* T5-XXL: ``padding="max_length"`` to 512 tokens, truncation, **no attention mask**, last hidden
  state → ``(1, 512, 4096)``. FLUX attends to the pad tokens, so the pad length changes the result
  (ComfyUI's own FLUX T5 pads to 256 tokens; official-pipeline.md §15).

Folders are read with ``from_pretrained(dir, local_files_only=True)``; nothing is downloaded.
Accepted layouts: a folder with the model (``config.json`` + weights) and its tokenizer files; a
model folder whose tokenizer sits beside it (``text_encoder_2/`` + ``tokenizer_2/``); or the
FLUX.1-dev diffusers folder itself (``text_encoder/``, ``tokenizer/``, ``text_encoder_2/``,
``tokenizer_2/``).
"""

from __future__ import annotations

import gc
import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .errors import GenRefocusInputError, GenRefocusModelError
from .prompts import PROMPTS, PromptEmbedding, save_prompt_embeddings

__all__ = [
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "build_prompt_cache",
    "encode_clip_pooled",
    "encode_t5",
    "encoder_hash",
    "resolve_text_encoder",
]

logger = logging.getLogger(__name__)

#: CLIP-L context length (``tokenizer.model_max_length`` of FLUX.1-dev's ``tokenizer/``).
CLIP_MAX_LENGTH = 77
#: T5 length of the official pipeline (``max_sequence_length=512``, padded to it).
T5_MAX_LENGTH = 512

_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json")
# per kind: (pipeline subfolder of the model, of its tokenizer, expected files for messages)
_LAYOUT = {
    "t5": ("text_encoder_2", "tokenizer_2",
           "config.json + model*.safetensors (T5EncoderModel) and tokenizer_config.json + tokenizer.json "
           "or spiece.model"),
    "clip": ("text_encoder", "tokenizer",
             "config.json + model.safetensors (CLIPTextModel) and tokenizer_config.json + vocab.json + "
             "merges.txt (or tokenizer.json)"),
}


def _has_model(d: Path) -> bool:
    return (d / "config.json").is_file() and any(
        f.suffix in _WEIGHT_SUFFIXES for f in d.iterdir() if f.is_file()
    )


def _has_tokenizer(d: Path) -> bool:
    return d.is_dir() and any((d / n).is_file() for n in _TOKENIZER_FILES)


def resolve_text_encoder(path: str | Path, kind: str) -> tuple[Path, Path]:
    """The model folder and the tokenizer folder of a T5 or CLIP text encoder.

    Args:
        path: a folder holding model and tokenizer; a model folder with its tokenizer beside it
            (``text_encoder_2`` → ``tokenizer_2``); or a FLUX.1-dev diffusers folder.
        kind: ``"t5"`` or ``"clip"``.

    Returns:
        ``(model_dir, tokenizer_dir)``.

    Raises:
        GenRefocusInputError: ``kind`` is not ``"t5"`` or ``"clip"``.
        GenRefocusModelError: the folder or one of the expected files is missing (the message lists
            them).

    Example:
        >>> [p.name for p in resolve_text_encoder("models/diffusers/FLUX.1-dev", "t5")]  # doctest: +SKIP
        ['text_encoder_2', 'tokenizer_2']
    """
    if kind not in _LAYOUT:
        raise GenRefocusInputError(f"kind must be 't5' or 'clip', got {kind!r}")
    sub_model, sub_tok, expected = _LAYOUT[kind]
    p = Path(path)
    hint = (f"the {kind.upper()} folder must hold {expected}, or be a FLUX.1-dev diffusers folder with "
            f"{sub_model}/ and {sub_tok}/")
    if not p.is_dir():
        raise GenRefocusModelError(f"{kind} folder {str(p)!r} not found; {hint}")
    if (p / sub_model).is_dir():  # a pipeline folder
        model, tok = p / sub_model, p / sub_tok
    else:
        model = p
        tok = p if _has_tokenizer(p) else p.parent / sub_tok if p.name == sub_model else p
    if not _has_model(model):
        found = sorted(f.name for f in model.iterdir())[:10] if model.is_dir() else "no folder"
        raise GenRefocusModelError(f"{kind} model files missing in {str(model)!r} (found: {found}); {hint}")
    if not _has_tokenizer(tok):
        found = sorted(f.name for f in tok.iterdir())[:10] if tok.is_dir() else "no folder"
        raise GenRefocusModelError(f"{kind} tokenizer files missing in {str(tok)!r} (found: {found}); {hint}")
    return model, tok


def encoder_hash(folders: Iterable[str | Path]) -> str:
    """SHA-256 identity of text-encoder folders: configs, tokenizer files and every weight byte.

    The cache is only valid for the encoders and tokenizers that made it (performance.md §4); the
    hash goes into the file's ``encoder_hash`` metadata and
    :func:`~genrefocus_core.prompts.load_prompt_embeddings` can check it. Reads every file once
    (~10 s for T5-XXL bf16 from a warm disk cache).

    Args:
        folders: model and tokenizer folders, in a fixed order.

    Returns:
        ``"sha256:<64 hex digits>"``.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "config.json").write_text("{}")
        >>> encoder_hash([d]) == encoder_hash([d]), encoder_hash([d])[:7]
        (True, 'sha256:')
    """
    h = hashlib.sha256()
    for folder in folders:
        root = Path(folder)
        for f in sorted(x for x in root.iterdir() if x.is_file() and not x.name.startswith(".")):
            if f.suffix not in (*_WEIGHT_SUFFIXES, ".json", ".model", ".txt"):
                continue
            h.update(f"{root.name}/{f.name}\0".encode())
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
    return "sha256:" + h.hexdigest()


def _tokenize(tokenizer, prompt: str, max_length: int) -> Tensor:
    ids = tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    if ids.shape != (1, max_length):
        raise GenRefocusModelError(
            f"the tokenizer must pad {prompt!r} to {max_length} tokens, got shape {tuple(ids.shape)}; "
            "it needs a pad token"
        )
    return ids


@torch.no_grad()
def encode_t5(text_encoder: torch.nn.Module, tokenizer, prompt: str, *,
              max_length: int = T5_MAX_LENGTH) -> Tensor:
    """T5 embeddings of one prompt as the official pipeline: max-length padding, no attention mask.

    Args:
        text_encoder: a transformers ``T5EncoderModel``.
        tokenizer: its tokenizer (with a pad token).
        prompt: the text.
        max_length: padded/truncated token count (official 512), ``>= 1``.

    Returns:
        ``(1, max_length, d_model)`` last hidden state, on the encoder's device and dtype.

    Raises:
        GenRefocusInputError: ``max_length < 1``.
        GenRefocusModelError: the tokenizer cannot pad.

    Example:
        >>> emb = encode_t5(t5, t5_tokenizer, PROMPTS["deblur"])  # doctest: +SKIP
        >>> emb.shape  # doctest: +SKIP
        torch.Size([1, 512, 4096])
    """
    if max_length < 1:
        raise GenRefocusInputError(f"max_length must be >= 1, got {max_length}")
    device = next(text_encoder.parameters()).device
    ids = _tokenize(tokenizer, prompt, max_length).to(device)
    return text_encoder(ids, output_hidden_states=False)[0]


@torch.no_grad()
def encode_clip_pooled(text_encoder: torch.nn.Module, tokenizer, prompt: str, *,
                       max_length: int = CLIP_MAX_LENGTH) -> Tensor:
    """CLIP pooled embedding of one prompt as the official pipeline (``pooler_output``, 77 tokens).

    Args:
        text_encoder: a transformers ``CLIPTextModel``.
        tokenizer: its tokenizer.
        prompt: the text.
        max_length: padded/truncated token count (official 77), ``>= 1``.

    Returns:
        ``(1, hidden_size)`` pooled output (768 for CLIP-L), on the encoder's device and dtype.

    Raises:
        GenRefocusInputError: ``max_length < 1``.
        GenRefocusModelError: the tokenizer cannot pad.

    Example:
        >>> encode_clip_pooled(clip, clip_tokenizer, PROMPTS["bokeh"]).shape  # doctest: +SKIP
        torch.Size([1, 768])
    """
    if max_length < 1:
        raise GenRefocusInputError(f"max_length must be >= 1, got {max_length}")
    device = next(text_encoder.parameters()).device
    ids = _tokenize(tokenizer, prompt, max_length).to(device)
    return text_encoder(ids, output_hidden_states=False).pooler_output


def _dtype_kwarg() -> str:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56


def _load(kind: str, model_dir: Path, tok_dir: Path, device: torch.device | str, dtype: torch.dtype):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    cls = T5EncoderModel if kind == "t5" else CLIPTextModel
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        model = cls.from_pretrained(str(model_dir), local_files_only=True, **{_dtype_kwarg(): dtype})
    except (OSError, ValueError, KeyError) as e:
        raise GenRefocusModelError(
            f"cannot load the {kind} text encoder from {str(model_dir)!r} / tokenizer {str(tok_dir)!r}: "
            f"{str(e)[:300]}; expected {_LAYOUT[kind][2]}"
        ) from e
    return model.to(device=device).eval(), tokenizer


def build_prompt_cache(
    t5_path: str | Path,
    clip_path: str | Path,
    out_path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Encode the two fixed Genfocus prompts with local T5/CLIP folders and write the cache file.

    One encoder is resident at a time; each is freed after use. The file holds, per prompt name
    (``"deblur"``, ``"bokeh"``), the T5 ``(1, 512, d_t5)`` and CLIP pooled ``(1, d_clip)`` tensors
    in ``dtype``, the prompt texts and ``encoder_hash`` (:func:`encoder_hash` of the four folders).

    Args:
        t5_path: T5-XXL folder (model + tokenizer, ``text_encoder_2/`` with ``tokenizer_2/`` beside
            it, or the FLUX.1-dev diffusers folder).
        clip_path: CLIP-L folder (same layouts, ``text_encoder/`` + ``tokenizer/``).
        out_path: the ``.safetensors`` file to write (folders are created).
        device: where to run the encoders.
        dtype: encoder dtype, also the stored dtype (official: bf16 on CUDA, fp32 on the CPU).

    Returns:
        The written path.

    Raises:
        GenRefocusInputError: ``out_path`` does not end in ``.safetensors``.
        GenRefocusModelError: missing or unloadable encoder files (the message lists the expected
            ones).

    Example:
        >>> build_prompt_cache("models/diffusers/FLUX.1-dev", "models/diffusers/FLUX.1-dev",
        ...                    "models/genrefocus/genfocus_prompts.safetensors")  # doctest: +SKIP
        PosixPath('models/genrefocus/genfocus_prompts.safetensors')
    """
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise GenRefocusInputError(f"out_path must end in .safetensors, got {str(out)!r}")
    t5_model, t5_tok = resolve_text_encoder(t5_path, "t5")
    clip_model, clip_tok = resolve_text_encoder(clip_path, "clip")
    ident = encoder_hash([t5_model, t5_tok, clip_model, clip_tok])

    embeds: dict[str, Tensor] = {}
    model, tokenizer = _load("t5", t5_model, t5_tok, device, dtype)
    for name, text in PROMPTS.items():
        embeds[name] = encode_t5(model, tokenizer, text).cpu()
    del model, tokenizer
    _free(device)

    pooled: dict[str, Tensor] = {}
    model, tokenizer = _load("clip", clip_model, clip_tok, device, dtype)
    for name, text in PROMPTS.items():
        pooled[name] = encode_clip_pooled(model, tokenizer, text).cpu()
    del model, tokenizer
    _free(device)

    prompts = {name: PromptEmbedding(text, embeds[name], pooled[name]) for name, text in PROMPTS.items()}
    path = save_prompt_embeddings(out, prompts, encoder_hash=ident)
    logger.info("wrote %s: T5 %s, CLIP pooled %s, %s, encoders %s", path,
                tuple(embeds["deblur"].shape), tuple(pooled["deblur"].shape), dtype, ident[:19])
    return path


def _free(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
