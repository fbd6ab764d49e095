"""Tier 1: the multi-stream FLUX forward and branch-selective LoRA on a tiny random FLUX."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import save_file

from genrefocus_core.conditions import ConditionTokens, latent_image_ids
from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.flux_lora import (
    adapter_scales,
    flux_forward,
    load_lora,
    lora_target_modules,
)

# Same size class as diffusers' own Flux tests: 1+1 blocks, 2 heads x 16, rope axes summing to 16.
TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                 num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                 axes_dims_rope=(4, 4, 8))
TXT, IMG, COND = 8, 16, 12  # distinct token counts, so a hook can tell the streams apart


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_flux():
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX).eval()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,  # non-zero B: the LoRA acts
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="bokeh")
    return model


def _forward(model, seq=16, txt=8):
    g = torch.Generator().manual_seed(0)
    return model(hidden_states=torch.randn(1, seq, 4, generator=g),
                 encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
                 pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
                 img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(txt, 3), return_dict=False)[0]


@torch.no_grad()
def test_zero_scale_equals_disabled_adapter_and_scale_is_restored(tiny_flux):
    with adapter_scales(tiny_flux, {"bokeh": 0.0}):
        scaled_off = _forward(tiny_flux)
    tiny_flux.disable_adapters()
    base = _forward(tiny_flux)
    tiny_flux.enable_adapters()
    torch.testing.assert_close(scaled_off, base)
    assert not torch.allclose(_forward(tiny_flux), base)  # the context restored the scale


# ------------------------------------------------------------------------------------------------
# Models with the full Genfocus LoRA target set (x_embedder, modulation, attention, MLP linears)
# ------------------------------------------------------------------------------------------------


def _genfocus_model(guidance_embeds=True, num_layers=1, num_single_layers=1, adapters=("bokeh",)):
    torch.manual_seed(0)
    cfg = dict(TINY_FLUX, guidance_embeds=guidance_embeds, num_layers=num_layers,
               num_single_layers=num_single_layers)
    model = FluxTransformer2DModel(**cfg).eval()
    for i, name in enumerate(adapters):
        torch.manual_seed(100 + i)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=lora_target_modules(model)), adapter_name=name)
    return model


def _inputs(b=1, n_cond=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, IMG, 4, generator=g)
    conds = [ConditionTokens(torch.randn(b, COND, 4, generator=g), latent_image_ids(3, 4, delta=(0, 4 * i)),
                             "bokeh") for i in range(n_cond)]
    emb = torch.randn(1, TXT, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    return x, latent_image_ids(4, 4), conds, emb, pooled


def _ours(model, x, ids, conds, emb, pooled, t=0.7, guidance=3.5, **kw):
    return flux_forward(model, x, ids, torch.tensor([t]), prompt_embeds=emb, pooled=pooled,
                        guidance=guidance, conditions=conds, **kw)


@torch.no_grad()
@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_without_conditions_equals_stock_flux_at_base_weights(guidance_embeds):
    """Sanity property of §6.5; the loaded LoRA must not touch the text/image streams."""
    model = _genfocus_model(guidance_embeds)
    x, ids, _, emb, pooled = _inputs()
    g = 3.5 if guidance_embeds else None
    ours = _ours(model, x, ids, [], emb, pooled, guidance=g)
    model.disable_adapters()
    stock = model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                  timestep=torch.tensor([0.7]), img_ids=ids, txt_ids=torch.zeros(TXT, 3),
                  guidance=torch.tensor([g]) if guidance_embeds else None, return_dict=False)[0]
    model.enable_adapters()
    with_lora = model(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                      timestep=torch.tensor([0.7]), img_ids=ids, txt_ids=torch.zeros(TXT, 3),
                      guidance=torch.tensor([g]) if guidance_embeds else None, return_dict=False)[0]
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    assert (with_lora - stock).abs().max() > 1e-2  # the adapter is real; ours ignored it on the main streams


@torch.no_grad()
def test_lora_runs_only_on_condition_tokens():
    """Every LoRA matmul sees condition tokens only (token-count hooks), never text or image tokens."""
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs(n_cond=2)
    seen = []
    hooks = [m.lora_A["bokeh"].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
             for m in model.modules() if hasattr(m, "lora_A") and "bokeh" in m.lora_A]
    _ours(model, x, ids, conds, emb, pooled)
    for h in hooks:
        h.remove()
    n_mod = len(lora_target_modules(model))
    assert len(seen) == 2 * n_mod  # every wrapped module, once per condition stream
    token_calls = [s for s in seen if len(s) == 3]
    assert token_calls and all(s[1] == COND for s in token_calls)
    assert all(len(s) == 2 for s in seen if len(s) != 3)  # modulation linears: one temb row


@torch.no_grad()
def test_lora_changes_condition_streams_and_scale_zero_equals_no_adapter():
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs()
    v_on, s_on = _ours(model, x, ids, conds, emb, pooled, return_streams=True)
    plain = [ConditionTokens(c.tokens, c.ids, None) for c in conds]
    v_off, s_off = _ours(model, x, ids, plain, emb, pooled, return_streams=True)
    assert (s_on[2] - s_off[2]).abs().max() > 1e-2  # the condition stream uses the LoRA
    assert (v_on - v_off).abs().max() > 1e-3  # ... and the image sees it through attention
    with adapter_scales(model, {"bokeh": 0.0}):
        _, s_zero = _ours(model, x, ids, conds, emb, pooled, return_streams=True)
    for a, b in zip(s_zero, s_off, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(_ours(model, x, ids, conds, emb, pooled), v_on, rtol=0, atol=0)  # restored
    model.disable_adapters()  # PEFT's global switch is honoured too
    torch.testing.assert_close(_ours(model, x, ids, conds, emb, pooled), v_off, rtol=0, atol=0)


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_two_resident_adapters_are_selected_per_stream():
    model = _genfocus_model(adapters=("bokeh", "deblurring"))
    x, ids, conds, emb, pooled = _inputs(n_cond=2)
    mixed = [conds[0], ConditionTokens(conds[1].tokens, conds[1].ids, "deblurring")]
    v_mixed = _ours(model, x, ids, mixed, emb, pooled)
    v_bokeh = _ours(model, x, ids, conds, emb, pooled)
    assert (v_mixed - v_bokeh).abs().max() > 1e-3
    only_first = [conds[0], ConditionTokens(conds[1].tokens, conds[1].ids, None)]
    with adapter_scales(model, {"deblurring": 0.0}):
        torch.testing.assert_close(_ours(model, x, ids, mixed, emb, pooled),
                                   _ours(model, x, ids, only_first, emb, pooled), rtol=0, atol=0)


@torch.no_grad()
def test_conditions_do_not_attend_to_each_other():
    """One double block: condition 1's output ignores condition 2, but the image sees both (§6.3)."""
    model = _genfocus_model(num_layers=1, num_single_layers=0)
    x, ids, conds, emb, pooled = _inputs(n_cond=2)
    _, s = _ours(model, x, ids, conds, emb, pooled, return_streams=True)
    other = [conds[0], ConditionTokens(conds[1].tokens + 1.0, conds[1].ids, "bokeh")]
    _, s2 = _ours(model, x, ids, other, emb, pooled, return_streams=True)
    torch.testing.assert_close(s2[2], s[2], rtol=0, atol=0)  # cond 1 unchanged
    assert (s2[1] - s[1]).abs().max() > 1e-3  # image changed
    assert (s2[0] - s[0]).abs().max() > 1e-3  # text changed
    _, s3 = _ours(model, x + 1.0, ids, conds, emb, pooled, return_streams=True)
    assert (s3[2] - s[2]).abs().max() > 1e-3  # a condition does attend to the image


@torch.no_grad()
def test_removing_a_condition_changes_the_output():
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs(n_cond=2)
    both = _ours(model, x, ids, conds, emb, pooled)
    assert (both - _ours(model, x, ids, conds[:1], emb, pooled)).abs().max() > 1e-3


@torch.no_grad()
def test_batch_items_are_independent():
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs(b=3, n_cond=2)
    batched = _ours(model, x, ids, conds, emb, pooled)
    for i in range(3):
        ci = [c.with_tokens(c.tokens[i:i + 1], c.ids) for c in conds]
        torch.testing.assert_close(batched[i:i + 1], _ours(model, x[i:i + 1], ids, ci, emb, pooled),
                                   rtol=1e-5, atol=1e-5)


def test_forward_input_errors():
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs()
    with pytest.raises(GenRefocusInputError, match="latents must have shape"):
        _ours(model, x[..., :3], ids, conds, emb, pooled)
    with pytest.raises(GenRefocusInputError, match="latent_ids must have shape"):
        _ours(model, x, ids[:3], conds, emb, pooled)
    with pytest.raises(GenRefocusInputError, match="prompt_embeds must have shape"):
        _ours(model, x, ids, conds, emb[..., :8], pooled)
    with pytest.raises(GenRefocusInputError, match="guidance must be a number"):
        _ours(model, x, ids, conds, emb, pooled, guidance=None)
    with pytest.raises(GenRefocusInputError, match=r"conditions\[0\] must be a ConditionTokens"):
        _ours(model, x, ids, [conds[0].tokens], emb, pooled)


def test_merged_adapter_is_refused():
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs()
    model.transformer_blocks[0].attn.to_q.merge(adapter_names=["bokeh"])
    with pytest.raises(GenRefocusModelError, match="merged"):
        _ours(model, x, ids, conds, emb, pooled)


# ------------------------------------------------------------------------------------------------
# LoRA files
# ------------------------------------------------------------------------------------------------


def _lora_file(path, model, rank=3, seed=0, drop=(), extra=()):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    sd = {}
    for m in lora_target_modules(model):
        if m in drop:
            continue
        lin = mods[m]
        sd[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g)
        sd[f"transformer.{m}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g)
    for k in extra:
        sd[k] = torch.zeros(1)
    save_file(sd, str(path), metadata={"format": "pt"})
    return sd


@torch.no_grad()
def test_load_lora_official_format_two_adapters_resident(tmp_path):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX).eval()
    sd_b = _lora_file(tmp_path / "bokehNet.safetensors", model, rank=4, seed=1)
    _lora_file(tmp_path / "deblurNet.safetensors", model, rank=8, seed=2)
    rng = torch.get_rng_state()
    info = load_lora(model, tmp_path / "bokehNet.safetensors", "bokeh")
    load_lora(model, tmp_path / "deblurNet.safetensors", "deblurring")
    assert torch.equal(torch.get_rng_state(), rng)  # loading does not disturb the global RNG
    assert (info.rank, info.modules) == (4, len(lora_target_modules(model)))
    to_q = model.transformer_blocks[0].attn.to_q
    want_a = sd_b["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert torch.equal(to_q.lora_A["bokeh"].weight, want_a)
    assert to_q.lora_A["deblurring"].weight.shape[0] == 8
    assert to_q.scaling == {"bokeh": 1.0, "deblurring": 1.0}  # per-branch scale exactly 1 (alpha = r)
    # the condition stream's x_embedder output is W x + b + B A x, nothing else
    x = torch.randn(1, 5, 4)
    c = ConditionTokens(x, torch.zeros(5, 3), "bokeh")
    emb_in = model.x_embedder
    want = emb_in.base_layer(x) + x @ sd_b["transformer.x_embedder.lora_A.weight"].T @ (
        sd_b["transformer.x_embedder.lora_B.weight"].T)
    seen = []
    h = emb_in.lora_B["bokeh"].register_forward_hook(lambda m, i, o: seen.append(o))
    flux_forward(model, torch.randn(1, 4, 4), torch.zeros(4, 3), torch.ones(1),
                 prompt_embeds=torch.zeros(1, 2, 32), pooled=torch.zeros(1, 32), guidance=1.0, conditions=[c])
    h.remove()
    torch.testing.assert_close(emb_in.base_layer(x) + seen[0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(GenRefocusModelError, match="already loaded"):
        load_lora(model, tmp_path / "bokehNet.safetensors", "bokeh")
    assert load_lora(model, tmp_path / "deblurNet.safetensors", "bokeh", replace=True).rank == 8


def test_load_lora_is_strict(tmp_path):
    model = FluxTransformer2DModel(**TINY_FLUX).eval()
    _lora_file(tmp_path / "missing.safetensors", model, drop=("transformer_blocks.0.ff.net.2",))
    with pytest.raises(GenRefocusModelError, match=r"missing key\(s\): transformer\.transformer_blocks\.0"):
        load_lora(model, tmp_path / "missing.safetensors", "bokeh")
    _lora_file(tmp_path / "extra.safetensors", model, extra=("transformer.context_embedder.lora_A.weight",
                                                              "transformer.x_embedder.alpha"))
    with pytest.raises(GenRefocusModelError, match=r"2 unexpected key\(s\): transformer\.context_embedder"):
        load_lora(model, tmp_path / "extra.safetensors", "bokeh")
    sd = _lora_file(tmp_path / "shape.safetensors", model)
    sd["transformer.x_embedder.lora_A.weight"] = torch.zeros(3, 7)
    save_file(sd, str(tmp_path / "shape.safetensors"))
    with pytest.raises(GenRefocusModelError, match=r"x_embedder must have lora_A \[r, 4\]"):
        load_lora(model, tmp_path / "shape.safetensors", "bokeh")
    with pytest.raises(GenRefocusModelError, match="not found"):
        load_lora(model, tmp_path / "nope.safetensors", "bokeh")
    assert not getattr(model, "peft_config", None)  # nothing half-loaded


def test_target_modules_match_the_flux_dev_count():
    from types import SimpleNamespace

    flux_dev = SimpleNamespace(transformer_blocks=[0] * 19, single_transformer_blocks=[0] * 38)
    names = lora_target_modules(flux_dev)
    assert len(names) == 343 and len(set(names)) == 343
    assert "transformer_blocks.18.ff.net.2" in names and "single_transformer_blocks.37.proj_out" in names
    assert not any("ff.net.0" in n or "context" in n or "add_" in n for n in names)


@torch.no_grad()
def test_bfloat16_forward_follows_the_model_dtype():
    model = _genfocus_model()
    x, ids, conds, emb, pooled = _inputs()
    ref = _ours(model, x, ids, conds, emb, pooled)
    model.to(torch.bfloat16)
    bf = [c.with_tokens(c.tokens.bfloat16(), c.ids) for c in conds]
    out = _ours(model, x.bfloat16(), ids, bf, emb.bfloat16(), pooled.bfloat16())
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max()) < 0.05 * float(ref.abs().max())
