"""Tier 2: Load Genfocus Models' memory modes and fast mode, and its registration with ComfyUI's model
manager (free_memory / unload_all_models), on the tiny fixture FLUX (stub or real ComfyUI)."""

from __future__ import annotations

import gc
import importlib

import pytest
import torch

from .test_generative_nodes import DEBLUR, LOADER, LOADER_ARGS, SAMPLER, _photo, models_root, registered  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(nodes, **kw):
    return nodes[LOADER].execute(**(LOADER_ARGS | {"dtype": "fp32"} | kw)).result[0]


def _held(pipe):
    mm = importlib.import_module("comfy.model_management")
    return [m for m in mm.current_loaded_models if getattr(m, "real_model", lambda: None)() is
            pipe.models.transformer]


def test_loader_lists_memory_modes_with_costs(nodes):
    inputs = {i.id: i for i in nodes[LOADER].define_schema().inputs}
    assert inputs["memory_mode"].options == ["auto", "full", "fp8", "nf4", "offload", "fp8_offload"]
    assert inputs["memory_mode"].default == "auto"
    assert "23.8" in inputs["memory_mode"].tooltip and "11.9" in inputs["memory_mode"].tooltip
    assert inputs["condition_cache"].options == ["off", "on", "cpu"]
    assert inputs["condition_cache"].default == "off" and "0.23x" in inputs["condition_cache"].tooltip


def test_streamed_mode_equals_full_through_the_node(nodes, registered):  # noqa: F811
    full, streamed = _load(nodes, memory_mode="full"), _load(nodes, memory_mode="offload")
    mem = importlib.import_module("genrefocus_pack.genrefocus_core.memory")
    assert mem.memory_state(streamed.models.transformer).mode.value == "offload"
    assert mem.memory_state(full.models.transformer) is None  # full = the parity path, untouched
    photo = _photo(seed=7)
    a = nodes[DEBLUR].execute(pipe=full, image=photo, **SAMPLER).result[0]
    b = nodes[DEBLUR].execute(pipe=streamed, image=photo, **SAMPLER).result[0]
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    fast = _load(nodes, condition_cache="on")
    assert fast.models.condition_cache == "on"
    c = nodes[DEBLUR].execute(pipe=fast, image=photo, **SAMPLER).result[0]
    assert not torch.equal(c, a) and float((c - a).abs().max()) < 0.1  # the approximation, small


def test_pipe_is_registered_and_answers_unload_all_models(nodes, registered):  # noqa: F811
    mm = importlib.import_module("comfy.model_management")
    pipe = _load(nodes)  # auto: full on the CPU
    (held,) = _held(pipe)
    assert held.model_memory() == pipe.memory_bytes() > 0
    assert held.model_loaded_memory() == held.model_memory()  # compute device = CPU here
    assert held.model.model is pipe.models.transformer and not held.currently_used and not held.is_dead()
    mm.unload_all_models()
    assert held.unloads == 1  # ComfyUI asked, the weights went to the offload device
    assert _held(pipe) == [held]  # still registered: the next run may bring them back
    out = nodes[DEBLUR].execute(pipe=pipe, image=_photo(), **SAMPLER).result[0]
    assert out.shape == (1, 30, 40, 3)
    del pipe, held, out
    gc.collect()
    assert not any(type(m).__name__ == "_HeldByGenRefocus" and m.real_model() is None
                   for m in mm.current_loaded_models)


def test_memory_combo_errors_name_the_node(nodes, registered, errors):  # noqa: F811
    with pytest.raises(errors.GenRefocusInputError,
                       match=r"^\[Load Genfocus Models\] memory_mode must be one of"):
        _load(nodes, memory_mode="fp4")
    with pytest.raises(errors.GenRefocusInputError,
                       match=r"^\[Load Genfocus Models\] condition_cache must be one of"):
        _load(nodes, condition_cache="fast")


def test_a_run_asks_room_only_for_what_it_brings_and_keeps_its_own_entry(nodes, registered, monkeypatch):  # noqa: F811
    mm = importlib.import_module("comfy.model_management")
    calls = []
    real = mm.free_memory

    def spy(memory_required, device, keep_loaded=()):
        calls.append((memory_required, list(keep_loaded)))
        return real(memory_required, device, keep_loaded=keep_loaded)

    monkeypatch.setattr(mm, "free_memory", spy)
    full, streamed = _load(nodes, memory_mode="full"), _load(nodes, memory_mode="offload")
    assert full.held is _held(full)[0] and streamed.held is _held(streamed)[0]
    cpu = torch.device("cpu")
    assert streamed.streamed and not full.streamed
    # resident weights already on the device bring nothing; streamed blocks two at a time, never all
    assert full.bytes_to_bring(cpu) == 0
    meta = torch.device("meta")
    assert full.bytes_to_bring(meta) == full.memory_bytes()
    assert 0 < streamed.bytes_to_bring(meta) < streamed.memory_bytes()
    calls.clear()
    nodes[DEBLUR].execute(pipe=streamed, image=_photo(seed=3), **SAMPLER)
    assert calls and all(keep == [streamed.held] for _, keep in calls)
    assert streamed.held.unloads == 0  # not evicted by its own run
