"""Tier 1: building the cached prompt embeddings from local T5/CLIP folders (text_encoders.py).

Tiny random ``T5EncoderModel`` / ``CLIPTextModel`` (width 32, the fixture FLUX's
``joint_attention_dim`` and ``pooled_projection_dim``) with word-level tokenizers built in code and
saved with ``save_pretrained``, in the layouts a user has: one folder per encoder, or a FLUX.1-dev
diffusers folder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genrefocus_core.cli import main
from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.prompts import PROMPTS, load_prompt_embeddings
from genrefocus_core.text_encoders import (
    build_prompt_cache,
    encode_clip_pooled,
    encode_t5,
    encoder_hash,
    resolve_text_encoder,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "genfocus-parity"
WIDTH = 32
WORDS = sorted({w for text in PROMPTS.values() for w in text.split()} | {"photo", "blurry"})


def _tokenizer(specials: list[str], template: str, pad: str, eos: str, bos: str | None = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template]
    )
    kw = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, unk_token="<unk>",
                                   **kw)


def _save_t5(model_dir: Path, tok_dir: Path) -> None:
    from transformers import T5Config, T5EncoderModel

    tok = _tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", pad="<pad>", eos="</s>")
    torch.manual_seed(1)
    cfg = T5Config(vocab_size=len(tok), d_model=WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    T5EncoderModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(tok_dir)


def _save_clip(model_dir: Path, tok_dir: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    # eos = the highest id, so pooling at the first eos works with CLIP's legacy argmax rule as well
    words = ["<unk>", "<|startoftext|>"]
    tok = _tokenizer([*words, "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", pad="<|endoftext|>",
                     eos="<|endoftext|>", bos="<|startoftext|>")
    torch.manual_seed(2)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    CLIPTextModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(tok_dir)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    """A FLUX.1-dev-style diffusers folder holding only the four text parts."""
    root = tmp_path_factory.mktemp("flux")
    _save_t5(root / "text_encoder_2", root / "tokenizer_2")
    _save_clip(root / "text_encoder", root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def cache(flux_dir, tmp_path_factory) -> Path:
    return build_prompt_cache(flux_dir, flux_dir, tmp_path_factory.mktemp("out") / "p.safetensors")


def _direct(flux_dir: Path, name: str, t5_len: int = 512):
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2").eval()
    t5_tok = AutoTokenizer.from_pretrained(flux_dir / "tokenizer_2")
    clip = CLIPTextModel.from_pretrained(flux_dir / "text_encoder").eval()
    clip_tok = AutoTokenizer.from_pretrained(flux_dir / "tokenizer")
    with torch.no_grad():
        ids = t5_tok(PROMPTS[name], padding="max_length", max_length=t5_len, truncation=True,
                     return_tensors="pt").input_ids
        emb = t5(ids).last_hidden_state
        cids = clip_tok(PROMPTS[name], padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        pooled = clip(cids).pooler_output
    return emb, pooled, ids, cids


def test_cache_shapes_loads_and_equals_direct_encoder_calls(flux_dir, cache):
    loaded = load_prompt_embeddings(cache, joint_attention_dim=WIDTH, pooled_projection_dim=WIDTH)
    for name in ("deblur", "bokeh"):
        e = loaded[name]
        assert e.prompt == PROMPTS[name]
        assert e.prompt_embeds.shape == (1, 512, WIDTH) and e.pooled.shape == (1, WIDTH)
        emb, pooled, ids, cids = _direct(flux_dir, name)
        assert ids.shape == (1, 512) and cids.shape == (1, 77)
        assert (ids[0, len(PROMPTS[name].split()) + 1:] == 0).all()  # padded with <pad> up to 512
        torch.testing.assert_close(e.prompt_embeds, emb)
        torch.testing.assert_close(e.pooled, pooled)
    assert not torch.equal(loaded["deblur"].prompt_embeds, loaded["bokeh"].prompt_embeds)


def test_t5_pad_length_matters_and_512_is_used(flux_dir, cache):
    """No attention mask: the real tokens' states depend on the padding (why ComfyUI's 256 differs)."""
    short, *_ = _direct(flux_dir, "deblur", t5_len=256)
    cached = load_prompt_embeddings(cache)["deblur"].prompt_embeds
    n = len(PROMPTS["deblur"].split()) + 1
    assert not torch.allclose(cached[:, :n], short[:, :n], atol=1e-6)


def test_encoder_hash_is_stored_and_checked(flux_dir, cache):
    folders = [flux_dir / d for d in ("text_encoder_2", "tokenizer_2", "text_encoder", "tokenizer")]
    h = encoder_hash(folders)
    assert load_prompt_embeddings(cache, encoder_hash=h)["bokeh"].pooled.shape == (1, WIDTH)
    with pytest.raises(GenRefocusModelError, match="rebuild them"):
        load_prompt_embeddings(cache, encoder_hash="sha256:" + "0" * 64)
    assert encoder_hash(folders[:2]) != h


def test_separate_folders_and_sibling_tokenizer_give_the_same_file(flux_dir, cache, tmp_path):
    t5_dir, clip_dir = tmp_path / "t5", tmp_path / "clip"
    _save_t5(t5_dir, t5_dir)  # same seeds: same weights, tokenizer inside the model folder
    _save_clip(clip_dir, clip_dir)
    out = build_prompt_cache(t5_dir, flux_dir / "text_encoder", tmp_path / "q.safetensors")
    a, b = load_prompt_embeddings(out), load_prompt_embeddings(cache)
    torch.testing.assert_close(a["deblur"].prompt_embeds, b["deblur"].prompt_embeds)
    torch.testing.assert_close(a["bokeh"].pooled, b["bokeh"].pooled)
    assert resolve_text_encoder(flux_dir / "text_encoder", "clip") == (
        flux_dir / "text_encoder", flux_dir / "tokenizer")


def test_missing_files_list_what_is_expected(tmp_path, flux_dir):
    with pytest.raises(GenRefocusModelError, match=r"t5 folder .* not found.*config\.json.*tokenizer"):
        build_prompt_cache(tmp_path / "nope", flux_dir, tmp_path / "p.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(GenRefocusModelError, match=r"clip model files missing.*CLIPTextModel.*merges\.txt"):
        build_prompt_cache(flux_dir, tmp_path / "empty", tmp_path / "p.safetensors")
    with pytest.raises(GenRefocusInputError, match=r"out_path must end in \.safetensors"):
        build_prompt_cache(flux_dir, flux_dir, tmp_path / "p.pt")
    with pytest.raises(GenRefocusInputError, match="kind must be"):
        resolve_text_encoder(flux_dir, "umt5")


def test_cli_build_prompts(flux_dir, cache, tmp_path):
    out = tmp_path / "cli.safetensors"
    assert main(["build-prompts", "--flux", str(flux_dir), "-o", str(out)]) == 0
    torch.testing.assert_close(load_prompt_embeddings(out)["bokeh"].prompt_embeds,
                               load_prompt_embeddings(cache)["bokeh"].prompt_embeds)
    assert main(["build-prompts", "--t5", str(flux_dir), "-o", str(out)]) == 2  # no CLIP given


def test_encoders_run_on_direct_modules(flux_dir):
    from transformers import AutoTokenizer, T5EncoderModel

    t5 = T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2").eval()
    tok = AutoTokenizer.from_pretrained(flux_dir / "tokenizer_2")
    assert encode_t5(t5, tok, "a photo", max_length=16).shape == (1, 16, WIDTH)
    with pytest.raises(GenRefocusInputError, match="max_length must be >= 1"):
        encode_clip_pooled(t5, tok, "a photo", max_length=0)


@pytest.mark.slow
def test_cache_plugs_into_the_fixture_flux_pipeline(cache):
    if not (FIXTURE / "model").is_dir():
        pytest.skip("../shared/fixtures/genfocus-parity is not present beside the checkout")
    from genrefocus_core.genpipe import GenerationOptions
    from genrefocus_core.models import load_genfocus_models
    from genrefocus_core.pipeline import deblur_image

    def run(prompts: Path) -> torch.Tensor:
        models = load_genfocus_models(FIXTURE / "model" / "transformer", FIXTURE / "model" / "vae", prompts,
                                      deblur_lora=FIXTURE / "lora" / "deblurNet.safetensors")
        img = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
        return deblur_image(img, models=models, options=GenerationOptions(steps=2)).image

    ours = run(cache)
    assert ours.shape == (1, 3, 32, 48) and torch.isfinite(ours).all()
    # the text tokens really enter: the fixture's own (random) embeddings give another image
    assert not torch.allclose(ours, run(FIXTURE / "inputs" / "prompt_embeds.safetensors"))
