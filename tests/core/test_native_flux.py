"""Tier 1: the native (BFL / ComfyUI layout) multi-stream FLUX forward against the diffusers reference.

A tiny random diffusers FLUX with named PEFT adapters is the reference (``flux_lora.flux_forward``);
its weights, converted with ``flux_convert.diffusers_to_bfl``, fill a BFL-layout module tree
(``bfl_flux.py``, the names ComfyUI uses), and its adapters become Genfocus LoRA files mapped onto
the fused layout. Against the real ``comfy.ldm.flux.model.Flux``: ``tests/nodes/test_native_backend.py``.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import save_file

from genrefocus_core.conditions import ConditionTokens, latent_image_ids
from genrefocus_core.errors import GenRefocusInputError, GenRefocusModelError
from genrefocus_core.flux_convert import diffusers_to_bfl
from genrefocus_core.flux_lora import flux_forward, load_lora, lora_target_modules
from genrefocus_core.native_flux import (
    FusedLora,
    check_flux_module,
    flux_dims,
    load_native_lora,
    native_flux_forward,
    native_lora_from_state_dict,
    rope_tables,
)

_spec = importlib.util.spec_from_file_location("_native_bfl_flux", Path(__file__).with_name("bfl_flux.py"))
bfl_flux = sys.modules.setdefault("_native_bfl_flux", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(bfl_flux)

# 2+2 blocks, 2 heads x 16, distinct text / pooled widths so a swapped projection cannot pass.
TINY = dict(
    patch_size=1,
    in_channels=8,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
ADAPTERS = ("bokeh", "deblurring")
TOL = dict(rtol=0, atol=2e-6)

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(guidance_embeds: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval()
    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(10 + i)
        model.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights=False,  # non-zero B: the LoRA acts
                target_modules=lora_target_modules(model),
            ),
            adapter_name=name,
        )
    return model


@pytest.fixture(scope="module")
def pair():
    """(reference with both adapters, BFL twin, {adapter: NativeLora})."""
    ref = _reference()
    twin = bfl_flux.bfl_twin(ref, diffusers_to_bfl)
    loras = {
        a: native_lora_from_state_dict(bfl_flux.adapter_state_dict(ref, a, lora_target_modules(ref)), twin, a)
        for a in ADAPTERS
    }
    return ref, twin, loras


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 8, generator=g)
    conds = [
        ConditionTokens(torch.randn(1, 16, 8, generator=g), latent_image_ids(4, 4), "bokeh"),
        ConditionTokens(
            torch.randn(b, 16, 8, generator=g), latent_image_ids(4, 4, delta=(0, 32)), "deblurring"
        ),
        ConditionTokens(torch.randn(b, 6, 8, generator=g), latent_image_ids(2, 3), "bokeh"),
    ]
    emb, pooled = torch.randn(1, 7, 32, generator=g), torch.randn(1, 24, generator=g)
    return x, latent_image_ids(4, 4), conds, emb, pooled


def _both(pair, x, ids, conds, emb, pooled, t=(0.7, 0.3), guidance=3.5, **kw):
    ref, twin, loras = pair
    t = torch.tensor(t)
    with torch.no_grad():
        a = flux_forward(
            ref, x, ids, t, prompt_embeds=emb, pooled=pooled, guidance=guidance, conditions=conds
        )
        b = native_flux_forward(
            twin,
            x,
            ids,
            t,
            prompt_embeds=emb,
            pooled=pooled,
            guidance=guidance,
            conditions=conds,
            loras=loras,
            **kw,
        )
    return a, b


# ------------------------------------------------------------------------------------------------
# LoRA mapping onto the fused layout
# ------------------------------------------------------------------------------------------------


def test_fused_lora_rows_equal_the_separate_projections(pair):
    """to_q|to_k|to_v land on row blocks of img_attn.qkv; to_q|to_k|to_v|proj_mlp on linear1."""
    ref, _, loras = pair
    mods = dict(ref.named_modules())
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))

    def peft_delta(name, adapter="bokeh"):
        layer = mods[name]
        return layer.lora_B[adapter](layer.lora_A[adapter](x))

    qkv = loras["bokeh"].modules["double_blocks.1.img_attn.qkv"].delta(x)
    want = torch.cat([peft_delta(f"transformer_blocks.1.attn.to_{p}") for p in "qkv"], dim=-1)
    torch.testing.assert_close(qkv, want, **TOL)
    lin1 = loras["bokeh"].modules["single_blocks.0.linear1"].delta(x)
    parts = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
    torch.testing.assert_close(
        lin1, torch.cat([peft_delta(f"single_transformer_blocks.0.{p}") for p in parts], -1), **TOL
    )
    mod = loras["deblurring"].modules["single_blocks.1.modulation.lin"].delta(x)
    torch.testing.assert_close(
        mod, peft_delta("single_transformer_blocks.1.norm.linear", "deblurring"), **TOL
    )
    assert set(loras["bokeh"].modules) == {
        "img_in",
        *(
            f"double_blocks.{i}.{m}"
            for i in range(2)
            for m in ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.2")
        ),
        *(f"single_blocks.{i}.{m}" for i in range(2) for m in ("linear1", "linear2", "modulation.lin")),
    }
    assert loras["bokeh"].rank == 4


def test_sparse_parts_leave_other_rows_zero():
    lo = FusedLora(torch.ones(1, 2), [(2, 3, 0, 1, torch.full((1, 1), 2.0))], 4)
    assert lo.delta(torch.ones(3, 2)).tolist() == [[0.0, 0.0, 4.0, 0.0]] * 3


def test_loading_is_strict_and_names_the_problem(pair, tmp_path):
    ref, twin, _ = pair
    sd = bfl_flux.adapter_state_dict(ref, "bokeh", lora_target_modules(ref))
    key = "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"
    with pytest.raises(GenRefocusModelError, match=r"1 missing key\(s\): " + key.replace(".", r"\.")):
        native_lora_from_state_dict({k: v for k, v in sd.items() if k != key}, twin, "bokeh")
    extra = dict(sd, **{"transformer.context_embedder.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(GenRefocusModelError, match=r"1 unexpected key\(s\): transformer\.context_embedder"):
        native_lora_from_state_dict(extra, twin, "bokeh")
    bad = dict(sd, **{key: torch.zeros(4, 31)})
    with pytest.raises(
        GenRefocusModelError,
        match=r"to_k must have lora_A \[r, 32\] .*rows 32\.\.64 of double_blocks\.0\.img_attn\.qkv",
    ):
        native_lora_from_state_dict(bad, twin, "bokeh")
    with pytest.raises(GenRefocusInputError, match="adapter must be a name"):
        native_lora_from_state_dict(sd, twin, "no name")
    with pytest.raises(GenRefocusModelError, match="not found"):
        load_native_lora(tmp_path / "bokehNet.safetensors", twin, "bokeh")


def test_a_file_loads_the_same_in_both_backends(pair, tmp_path):
    """One LoRA file: load_lora on the diffusers model and load_native_lora on the BFL twin agree."""
    ref, twin, _ = pair
    path = tmp_path / "bokehNet.safetensors"
    save_file(
        {
            k: v.contiguous()
            for k, v in bfl_flux.adapter_state_dict(ref, "deblurring", lora_target_modules(ref)).items()
        },
        str(path),
    )
    fresh = copy.deepcopy(ref)
    fresh.delete_adapters(list(ADAPTERS))
    load_lora(fresh, path, "bokeh")
    native = {"bokeh": load_native_lora(path, twin, "bokeh")}
    x, ids, conds, emb, pooled = _inputs()
    conds = [c.with_tokens(c.tokens, c.ids) for c in conds[:1]]
    with torch.no_grad():
        a = flux_forward(
            fresh,
            x,
            ids,
            torch.tensor([0.5]),
            prompt_embeds=emb,
            pooled=pooled,
            guidance=3.5,
            conditions=conds,
        )
        b = native_flux_forward(
            twin,
            x,
            ids,
            torch.tensor([0.5]),
            prompt_embeds=emb,
            pooled=pooled,
            guidance=3.5,
            conditions=conds,
            loras=native,
        )
    torch.testing.assert_close(b, a, **TOL)
    assert native["bokeh"].parameters == sum(
        v.numel() for v in bfl_flux.adapter_state_dict(ref, "bokeh", lora_target_modules(ref)).values()
    )


# ------------------------------------------------------------------------------------------------
# The forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_cond", [0, 1, 2, 3])
def test_forward_equals_the_reference(pair, n_cond):
    """Batch 2, per-item timesteps, two adapters, conditions of batch 1 and B, unequal lengths."""
    x, ids, conds, emb, pooled = _inputs()
    a, b = _both(pair, x, ids, conds[:n_cond], emb, pooled)
    torch.testing.assert_close(b, a, **TOL)
    if n_cond:
        a0, _ = _both(pair, x, ids, [], emb, pooled)
        assert (a - a0).abs().max() > 1e-2  # the conditions really reach the image stream


def test_without_guidance_embedding_equals_the_reference():
    ref = _reference(guidance_embeds=False)
    twin = bfl_flux.bfl_twin(ref, diffusers_to_bfl)
    loras = {
        a: native_lora_from_state_dict(bfl_flux.adapter_state_dict(ref, a, lora_target_modules(ref)), twin, a)
        for a in ADAPTERS
    }
    x, ids, conds, emb, pooled = _inputs()
    a, b = _both((ref, twin, loras), x, ids, conds, emb, pooled, guidance=None)
    torch.testing.assert_close(b, a, **TOL)
    with pytest.raises(GenRefocusInputError, match="guidance must be None"):
        native_flux_forward(twin, x, ids, torch.ones(1), prompt_embeds=emb, pooled=pooled, guidance=1.0)


def test_every_layer_matches_the_reference(pair):
    """Streams after each double block, each single block and the output: the reference truncated."""
    ref, twin, loras = pair
    x, ids, conds, emb, pooled = _inputs(b=1)
    conds = conds[:2]
    trace: dict = {}
    with torch.no_grad():
        native_flux_forward(
            twin,
            x,
            ids,
            torch.tensor([0.4]),
            prompt_embeds=emb,
            pooled=pooled,
            guidance=3.5,
            conditions=conds,
            loras=loras,
            trace=trace,
        )
    layers = [(f"double.{i}", i + 1, 0) for i in range(2)] + [(f"single.{i}", 2, i + 1) for i in range(2)]
    for name, n_double, n_single in layers:
        cut = copy.copy(ref)
        cut._modules = dict(ref._modules)
        cut.transformer_blocks = torch.nn.ModuleList(list(ref.transformer_blocks)[:n_double])
        cut.single_transformer_blocks = torch.nn.ModuleList(list(ref.single_transformer_blocks)[:n_single])
        with torch.no_grad():
            _, streams = flux_forward(
                cut,
                x,
                ids,
                torch.tensor([0.4]),
                prompt_embeds=emb,
                pooled=pooled,
                guidance=3.5,
                conditions=conds,
                return_streams=True,
            )
        assert len(trace[name]) == len(streams) == 4
        for ours, want in zip(trace[name], streams, strict=True):
            torch.testing.assert_close(ours, want, **TOL, msg=lambda m, n=name: f"{n}: {m}")
    with torch.no_grad():
        out = flux_forward(
            ref, x, ids, torch.tensor([0.4]), prompt_embeds=emb, pooled=pooled, guidance=3.5, conditions=conds
        )
    torch.testing.assert_close(trace["final"][0], out, **TOL)


def test_lora_runs_only_on_condition_tokens(pair, monkeypatch):
    """Every LoRA matmul sees condition tokens (or the condition modulation row), never text/image."""
    _, twin, loras = pair
    x, ids, conds, emb, pooled = _inputs(b=1)
    seen = []
    original = FusedLora.delta

    def spy(self, inp):
        seen.append(tuple(inp.shape))
        return original(self, inp)

    monkeypatch.setattr(FusedLora, "delta", spy)
    with torch.no_grad():
        native_flux_forward(
            twin,
            x,
            ids,
            torch.tensor([0.5]),
            prompt_embeds=emb,
            pooled=pooled,
            guidance=3.5,
            conditions=conds,
            loras=loras,
        )
    # conditions 0 (bokeh, 16), 1 (deblurring, 16), 2 (bokeh, 6): runs of one adapter, never image tokens
    token_counts = {s[1] for s in seen if len(s) == 3}
    assert token_counts == {16, 6}
    assert all(s[0] == 1 for s in seen if len(s) == 2)  # modulation: the single condition row
    per_linear = 1 + 2 * 3 + 2 * 2  # img_in; 3 token linears per double block; 2 per single block
    per_mod = 2 + 2  # img_mod.lin / modulation.lin, once per adapter
    assert len(seen) == per_linear * 3 + per_mod * 2


def test_loaded_loras_do_not_touch_a_run_without_conditions(pair):
    _, twin, loras = pair
    x, ids, _, emb, pooled = _inputs()
    kw = dict(prompt_embeds=emb, pooled=pooled, guidance=3.5)
    with torch.no_grad():
        a = native_flux_forward(twin, x, ids, torch.tensor([0.5]), loras=loras, **kw)
        b = native_flux_forward(twin, x, ids, torch.tensor([0.5]), **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_custom_attention_kernel_is_used(pair):
    _, twin, loras = pair
    x, ids, conds, emb, pooled = _inputs()
    calls = []

    def attention(q, k, v):
        calls.append((q.shape[2], k.shape[2]))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).flatten(2)

    kw = dict(prompt_embeds=emb, pooled=pooled, guidance=3.5, conditions=conds[:2], loras=loras)
    with torch.no_grad():
        a = native_flux_forward(twin, x, ids, torch.tensor([0.5]), attention=attention, **kw)
        b = native_flux_forward(twin, x, ids, torch.tensor([0.5]), **kw)
    torch.testing.assert_close(a, b, **TOL)
    # per block: text+image queries see all 7+16+32 tokens; both conditions (equal length) in one call
    assert calls[0] == (7 + 16, 7 + 16 + 32) and calls[1] == (16, 7 + 16 + 16) and len(calls) == 2 * 4


def test_rope_tables_rotate_pairs_like_the_reference(pair):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = latent_image_ids(3, 5, delta=(0, 32))
    cos, sin = rope_tables(ids, (4, 6, 6), 10000)
    ref_cos, ref_sin = FluxPosEmbed(10000, [4, 6, 6])(ids)
    torch.testing.assert_close(cos.repeat_interleave(2, dim=1), ref_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin.repeat_interleave(2, dim=1), ref_sin, rtol=0, atol=1e-6)


def test_dims_and_module_checks(pair):
    _, twin, _ = pair
    d = flux_dims(twin)
    assert (d.in_channels, d.hidden, d.heads, d.joint_attention_dim, d.pooled_projection_dim) == (
        8,
        32,
        2,
        32,
        24,
    )
    assert d.guidance_embeds and (d.num_layers, d.num_single_layers, d.mlp_hidden) == (2, 2, 128)
    with pytest.raises(GenRefocusModelError, match=r"must be a FLUX\.1 transformer .*without vector_in"):
        bare = copy.copy(twin)
        bare._modules = {k: v for k, v in twin._modules.items() if k != "vector_in"}
        check_flux_module(bare)


def test_input_errors_name_the_parameter(pair):
    _, twin, loras = pair
    x, ids, conds, emb, pooled = _inputs()
    kw = dict(prompt_embeds=emb, pooled=pooled, guidance=3.5, loras=loras)
    t = torch.ones(1)
    with pytest.raises(GenRefocusInputError, match=r"latents must have shape \(B, N, 8\)"):
        native_flux_forward(twin, x[..., :4], ids, t, **kw)
    with pytest.raises(GenRefocusInputError, match=r"latent_ids must have shape \(16, 3\)"):
        native_flux_forward(twin, x, ids[:3], t, **kw)
    with pytest.raises(GenRefocusInputError, match=r"timestep must have shape"):
        native_flux_forward(twin, x, ids, torch.ones(3), **kw)
    with pytest.raises(GenRefocusInputError, match=r"prompt_embeds must have shape \(1 or 2, L, 32\)"):
        native_flux_forward(twin, x, ids, t, **(kw | {"prompt_embeds": torch.zeros(1, 7, 24)}))
    with pytest.raises(GenRefocusInputError, match=r"pooled must have shape"):
        native_flux_forward(twin, x, ids, t, **(kw | {"pooled": torch.zeros(1, 32)}))
    with pytest.raises(GenRefocusInputError, match="guidance must be a number"):
        native_flux_forward(twin, x, ids, t, **(kw | {"guidance": None}))
    with pytest.raises(
        GenRefocusModelError, match=r"conditions\[0\] uses the LoRA adapter 'bokeh', which is not loaded"
    ):
        native_flux_forward(twin, x, ids, t, **(kw | {"conditions": conds, "loras": {}}))
    with pytest.raises(GenRefocusInputError, match=r"conditions\[0\] must be a ConditionTokens"):
        native_flux_forward(twin, x, ids, t, **(kw | {"conditions": [x]}))
