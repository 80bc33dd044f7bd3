"""The server compiles a RetNet's decoding step before the first request, and serves the eager step where
compiling fails."""

from __future__ import annotations

import logging

import pytest
import torch

from retentive import RetNetConfig, RetNetForCausalLM, cache_of
from retentive.models import native_step
from retentive.serving import backend_for, compile_decoding


def tiny() -> RetNetForCausalLM:
    torch.manual_seed(0)
    return RetNetForCausalLM(RetNetConfig(vocab_size=64, dim_model=32, num_layers=1, num_heads=2)).eval()


def test_the_server_compiles_the_step_and_decodes_as_the_eager_one():
    torch._dynamo.reset()
    model = tiny()
    ids = torch.randint(0, 64, (3, 6))
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True))
        eager = model(ids[:, -1:], cache=cache, use_cache=True).logits
        assert compile_decoding(model, max_batch=16) > 0
        assert model.config.decode_implementation == "compiled"
        cache = cache_of(model(ids, use_cache=True))
        with torch._dynamo.config.patch(error_on_recompile=True):  # batch 3 re-uses what batch 1 and 2 compiled
            compiled = model(ids[:, -1:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_where_compiling_fails_the_eager_step_serves(monkeypatch, caplog):
    model = tiny()

    def broken(batch_sizes):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(model, "warm_up_decoding", broken)
    with caplog.at_level(logging.WARNING):
        assert compile_decoding(model, max_batch=4) is None
    assert model.config.decode_implementation == "eager"
    assert "no C++ compiler" in caplog.text and "serving the eager one" in caplog.text


@pytest.mark.parametrize("implementation", ["compiled", "aot", "native"])
def test_the_engines_decoding_steps_compile_nothing_after_the_warm_up(implementation, monkeypatch):
    """The engine decodes in inference mode, gathering slots of its pool (contiguous runs are views, others
    copies), for batches of every size: none of that compiles the step again, and it decodes as the eager step."""
    torch._dynamo.reset()
    model = tiny()
    backend = backend_for(model, max_batch=6)
    assert compile_decoding(model, max_batch=6, implementation=implementation) > 0
    prompts = [torch.randint(0, 64, (5 + slot,)).tolist() for slot in range(6)]

    def refuse(*args, **kwargs):
        raise AssertionError("the aot step was compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.inference_mode():
        for slot, ids in enumerate(prompts):
            backend.prefill(slot, ids)
        for slots in ([0, 1, 2], [4], [0, 2, 5], [1, 2, 3, 4, 5]):
            compiled = backend.decode(slots, [7] * len(slots))
            model.config.decode_implementation = "eager"
            for slot in slots:  # the slots' states moved one token on: read them again from the prompts
                backend.release(slot)
                backend.prefill(slot, prompts[slot])
            eager = backend.decode(slots, [7] * len(slots))
            model.config.decode_implementation = implementation
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
            for slot in slots:
                backend.release(slot)
                backend.prefill(slot, prompts[slot])


@pytest.mark.native_kernels
def test_the_native_step_writes_each_slots_new_state_over_its_old_one():
    """The engine's native step writes the new states into the pool itself (no buffer of its own, no copy back),
    for a contiguous run of slots and for gathered ones; step after step, the pool holds what the eager step's
    would."""
    model = tiny()
    native, eager = backend_for(model, max_batch=6), backend_for(model, max_batch=6)
    pool = [S.data_ptr() for S in native.S]
    prompts = [torch.randint(0, 64, (5 + slot,)).tolist() for slot in range(6)]
    with torch.inference_mode():
        for backend in (native, eager):
            for slot, ids in enumerate(prompts):
                backend.prefill(slot, ids)
        for slots in ([0, 1, 2], [0, 2, 5], [1, 2, 3, 4, 5], [0, 1, 2]):
            tokens = torch.randint(0, 64, (len(slots),)).tolist()
            model.config.decode_implementation = "native"
            got = native.decode(slots, tokens)
            model.config.decode_implementation = "eager"
            torch.testing.assert_close(got, eager.decode(slots, tokens), rtol=1e-5, atol=1e-5)
            for field in ("S", "z", "offset"):
                for mine, theirs in zip(getattr(native, field), getattr(eager, field), strict=True):
                    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert [S.data_ptr() for S in native.S] == pool
    assert native_step._NATIVE[model].buffers.sets == []  # every new S went over the old one
