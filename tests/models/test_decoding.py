"""The fast decoding steps (``config.decode_implementation`` "compiled": torch.compile; "aot": exported and compiled
ahead of time; "native": the hand-written C++ step) against the eager one, their reference: the same logits and
states (float32, within 1e-5) for every option of the config that changes the step, the same greedy tokens for 256
steps, with LoRA adapters too, and no compiling again when the batch size changes; for "aot" and "native", the
weights read from the model at every call; for "aot", the library found on disk by a new process's model; for
"native", every batch size and the fallback where the kernel does not apply."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive import RetNetConfig, RetNetForCausalLM, cache_of
from retentive.layers import ACTIVATIONS, GATES, HEAD_NORMS
from retentive.models import decoding, native_step
from retentive.models.cache_retnet import RetNetCache
from retentive.models.decoding import decode_logits
from retentive.ops import RetentionState, cpu_kernels
from retentive.ops.decay import _cached_log_gamma
from retentive.ops.rotary import rotary_angles

V = 64
# the options that change the decoding step, spread over three models
CONFIGS = {
    "paper": {},  # gamma 1 - 2^(-5-h), interleaved xPos rotation, GroupNorm heads, swish gate, LayerNorm blocks
    "fla": dict(
        decay="linspace",
        rotary_layout="halves",
        rotary_angles="rope",
        head_norm="rmsnorm",
        head_norm_weight=True,
        normalize_decay=True,
        normalize_retention=True,
        norm="rmsnorm",
        ffn_activation="swiglu",
    ),
    "plain": dict(
        decay=[0.9, 0.995],
        rotary=False,
        gate_fn="none",
        head_norm="none",
        msr_bias=True,
        value_factor=1,
        ffn_norm="layernorm",
        scale_embedding=True,
        embed_norm=True,
        tie_word_embeddings=False,
    ),
}


def small_model(**overrides) -> RetNetForCausalLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=V, dim_model=32, num_layers=2, num_heads=2, chunk_size=4)
    return RetNetForCausalLM(RetNetConfig(**{**fields, **overrides})).eval()


def prompt(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, two of them left-padded: the states start at different (and negative) offsets; or the last
    ``rows`` of them (one row: the "aot" step's library for a single row)."""
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :7] = 0
    return ids[-rows:], mask[-rows:]


def greedy(model: RetNetForCausalLM, implementation: str, tokens: int, rows: int = 3) -> torch.Tensor:
    model.config.decode_implementation = implementation
    ids, mask = prompt(rows)
    return model.generate(ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, pad_token_id=0)


COMPILED = ("compiled", "aot", "native")


def assert_steps_agree(model: RetNetForCausalLM, implementation: str, steps: int = 12, rows: int = 3) -> None:
    """Logits and every state tensor of the compiled steps equal the eager steps', step after step."""
    ids, mask = prompt(rows)

    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, use_cache=True)
    token = prefill.logits[:, -1:].argmax(-1)
    states = cache_of(prefill).states
    eager_states = compiled_states = states
    for _ in range(steps):
        model.config.decode_implementation = "eager"
        with torch.inference_mode():
            eager, eager_states = decode_logits(model, token, eager_states)
        model.config.decode_implementation = implementation
        with torch.no_grad():
            out = model(token, cache=RetNetCache(compiled_states, ids.shape[1]), use_cache=True)
        compiled_states = cache_of(out).states
        torch.testing.assert_close(out.logits, eager, rtol=1e-5, atol=1e-5)
        for e, c in zip(eager_states, compiled_states, strict=True):
            torch.testing.assert_close(c.S, e.S, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(c.z, e.z, rtol=1e-5, atol=1e-5)
            assert torch.equal(c.offset, e.offset)
        token = eager.argmax(-1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """No compiled code, and empty caches of constants: a step traced before they fill must not be compiled
    again once they are (that would stall the first request after a warm-up)."""
    _cached_log_gamma.cache_clear()
    rotary_angles.cache_clear()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("implementation", COMPILED)
@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_step_equals_eager_step(name: str, implementation: str) -> None:
    model = small_model(**CONFIGS[name])
    assert_steps_agree(model, implementation)
    assert torch.equal(greedy(model, implementation, 256), greedy(model, "eager", 256))
    if implementation == "native" and cpu_kernels.available():
        assert native_step._NATIVE[model].reason is None  # the kernel ran, not the fallback
    if implementation != "compiled":  # one row: aot's library of its own (reductions), native's one-row products
        assert_steps_agree(model, implementation, rows=1)
        assert torch.equal(greedy(model, implementation, 256, rows=1), greedy(model, "eager", 256, rows=1))


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_step_equals_eager_step_with_lora_adapters(implementation: str) -> None:
    peft = pytest.importorskip("peft")
    model = small_model()
    targets = ["q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "up", "down"]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets)).eval()
    with torch.no_grad():  # adapters that change the outputs (peft starts B at zero)
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    assert_steps_agree(model, implementation, steps=6)
    assert torch.equal(greedy(model, implementation, 256), greedy(model, "eager", 256))
    if implementation == "native":  # adapters wrap the projections: the native step hands over to "aot"
        assert "peft" in native_step._NATIVE[model].reason
    with lora.disable_adapter():  # a flag of the adapters: the step must see it (the reference changes with it)
        assert_steps_agree(model, implementation, steps=3)


def _no_compiling(monkeypatch: pytest.MonkeyPatch):
    """A context in which compiling either step fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the aot step was compiled again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    return torch._dynamo.config.patch(error_on_recompile=True)


@pytest.mark.parametrize("implementation", COMPILED)
def test_batch_size_changes_after_warm_up_compile_nothing(implementation: str, monkeypatch) -> None:
    model = small_model(decode_implementation=implementation)
    assert model.warm_up_decoding((1, 2)) > 0
    config = model.config
    dk, dv = config.head_dims
    with _no_compiling(monkeypatch), torch.no_grad():
        for batch in (3, 1, 7, 16, 2):
            cache = cache_of(model(torch.randint(0, V, (batch, 5)), use_cache=True))
            for _ in range(2):
                out = model(torch.randint(0, V, (batch, 1)), cache=cache, use_cache=True)
                assert out.logits.shape == (batch, 1, V)
                assert cache_of(out).states[0].S.shape == (batch, config.num_heads, dk, dv)


@pytest.mark.parametrize("implementation", COMPILED)
def test_compiled_step_leaves_the_given_states_unchanged(implementation: str) -> None:
    model = small_model(decode_implementation=implementation)
    ids, mask = prompt()
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
        before = [(s.S.clone(), s.z.clone(), s.offset.clone()) for s in cache.states]
        given = list(cache.states)
        model(ids[:, -1:], cache=cache, use_cache=True)
    assert cache.states is not given and cache.seen_tokens == ids.shape[1] + 1
    for s, (S, z, offset) in zip(given, before, strict=True):
        assert torch.equal(s.S, S) and torch.equal(s.z, z) and torch.equal(s.offset, offset)


def test_an_unknown_decode_implementation_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="decode_implementation must be one of"):
        RetNetConfig(vocab_size=V, dim_model=32, num_layers=1, num_heads=2, decode_implementation="fast").validate()


@pytest.mark.parametrize("implementation", COMPILED)
def test_callers_in_inference_mode_or_under_no_grad_share_one_compiled_step(implementation: str, monkeypatch) -> None:
    """A server's engine decodes in inference mode, generate() under no_grad, a prefill may leave inference
    tensors or an expanded offset: after the warm-up, none of them compiles the step again."""
    model = small_model(decode_implementation=implementation)
    model.warm_up_decoding((1, 2))
    ids, mask = prompt()
    with _no_compiling(monkeypatch):
        with torch.inference_mode():
            cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
            assert cache.states[0].S.is_inference()
            first = model(ids[:, -1:], cache=cache, use_cache=True).logits
        with torch.no_grad():
            cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
            second = model(ids[:, -1:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(first, second)


def test_native_step_reads_the_weights_of_the_model_at_every_call() -> None:
    """Weights changed in place, through ``.data``, and a parameter re-assigned: each step equals the eager step of
    the weights of that moment."""
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler to build the kernels")
    model = small_model(decode_implementation="native")
    model.warm_up_decoding((1,))
    assert native_step._NATIVE[model].reason is None
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert_steps_agree(model, "native", steps=2)
    up = model.model.retnet.blocks[1].ffn.up
    up.weight.data = torch.randn_like(up.weight)  # the same Parameter, new memory
    assert_steps_agree(model, "native", steps=2)
    out = model.model.retnet.blocks[0].retention.out_proj
    out.weight = torch.nn.Parameter(torch.randn_like(out.weight))  # a new tensor: a structural change
    assert_steps_agree(model, "native", steps=2)


@pytest.mark.native_kernels
@pytest.mark.parametrize("rows", [1, 2, 4, 7, 8, 9, 16, 17, 24, 41])
def test_native_step_at_every_batch_size(rows: int) -> None:
    """Rows go through the products in passes of 8 up to 16 rows and through ATen's GEMM past them, and through the
    retention in (row, head) pairs split among the threads: every count up to two passes and past them."""
    model = small_model(decode_implementation="native")
    for got, want in assert_one_native_step_agrees(model, rows, prompt_length=5):
        assert torch.equal(got.offset, want.offset)


def assert_one_native_step_agrees(model: RetNetForCausalLM, rows: int, prompt_length: int) -> list[tuple]:
    """After a random prompt, one native step's logits, S and z equal the eager step's; returns each layer's
    (native, eager) states."""
    with torch.no_grad():
        cache = cache_of(model(torch.randint(0, V, (rows, prompt_length)), use_cache=True))
        token = torch.randint(0, V, (rows, 1))
        want, want_states = decoding.eager_step(model, token, cache.states)
        got, got_states = native_step.native_step(model, token, cache.states)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    pairs = list(zip(got_states, want_states, strict=True))
    for g, w in pairs:
        torch.testing.assert_close(g.S, w.S, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.z, w.z, rtol=1e-5, atol=1e-5)
    return pairs


# the options CONFIGS leave out, and widths that are no multiple of a vector (16 floats): every tail of the kernel
NATIVE_CONFIGS = {
    "seed": dict(gate_fn="gelu", ffn_activation="relu", head_norm="layernorm", head_norm_weight=True),
    "glu": dict(ffn_activation="glu", head_norm="layernorm", ffn_norm="rmsnorm", rotary_angles="rope"),
    "geglu": dict(ffn_activation="geglu", gate_fn="swish", head_norm="rmsnorm", normalize_retention=True),
    "swish": dict(ffn_activation="swish", decay="linspace", normalize_decay=True, msr_bias=True, ffn_bias=False),
    "odd": dict(dim_model=48, num_heads=3, value_dim=72, ffn_dim=40, norm="rmsnorm", rotary_layout="halves"),
}


@pytest.mark.native_kernels
@pytest.mark.parametrize("name", NATIVE_CONFIGS)
def test_native_step_equals_eager_step_for_the_other_options(name: str) -> None:
    model = small_model(**NATIVE_CONFIGS[name])
    assert_steps_agree(model, "native", steps=6)
    assert_steps_agree(model, "native", steps=3, rows=1)
    assert native_step._NATIVE[model].reason is None


@pytest.mark.native_kernels
@settings(max_examples=25, deadline=None)
@given(
    heads=st.integers(1, 3),
    key_dim=st.sampled_from([2, 6, 16, 18]),
    value_dim=st.integers(1, 40),
    ffn_dim=st.integers(1, 70),
    rows=st.integers(1, 20),
    activation=st.sampled_from(list(ACTIVATIONS)),
    gate=st.sampled_from(list(GATES)),
    head_norm=st.sampled_from(list(HEAD_NORMS)),
    norm=st.sampled_from(["layernorm", "rmsnorm"]),
    flags=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_native_step_equals_eager_step_at_any_shape(
    heads, key_dim, value_dim, ffn_dim, rows, activation, gate, head_norm, norm, flags
) -> None:
    """Any widths (no multiple of a vector, down to one), any row count, any combination of the options."""
    rotary, normalize, bias, halves = flags
    model = small_model(
        dim_model=heads * key_dim,
        num_heads=heads,
        value_dim=heads * value_dim,
        ffn_dim=ffn_dim,
        ffn_activation=activation,
        gate_fn=gate,
        head_norm=head_norm,
        norm=norm,
        rotary=rotary,
        rotary_layout="halves" if halves else "interleaved",
        normalize_decay=normalize,
        normalize_retention=normalize,
        msr_bias=bias,
    )
    assert_one_native_step_agrees(model, rows, prompt_length=3)
    assert native_step._NATIVE[model].reason is None


@pytest.mark.native_kernels
def test_native_step_reads_states_of_any_layout() -> None:
    """States given as strided views (every other element of a wider buffer) step as their contiguous copies; asked
    to write over them, the step writes new tensors instead and leaves them as they were."""
    model = small_model(decode_implementation="native")
    with torch.no_grad():
        states = cache_of(model(torch.randint(0, V, (2, 4)), use_cache=True)).states
        token = torch.randint(0, V, (2, 1))
        strided = [
            RetentionState(*(torch.stack((t, torch.full_like(t, torch.nan)), -1)[..., 0] for t in (s.S, s.z)), s.offset)
            for s in states
        ]
        kept = [s.S.clone() for s in strided]
        assert not strided[0].S.is_contiguous()
        want, want_states = native_step.native_step(model, token, states)
        for overwrite in (False, True):
            got, got_states = native_step.native_step(model, token, strided, overwrite=overwrite)
            assert torch.equal(got, want)
            for g, w in zip(got_states, want_states, strict=True):
                assert torch.equal(g.S, w.S) and torch.equal(g.z, w.z) and torch.equal(g.offset, w.offset)
            assert all(torch.equal(s.S, k) for s, k in zip(strided, kept, strict=True))


@pytest.mark.native_kernels
@pytest.mark.parametrize("rows", [3, 20])
def test_native_step_writes_over_the_given_states_only_when_asked(rows: int) -> None:
    """With overwrite, the new S, z and offset go over the given ones (a cache made with ``overwrite=True`` asks
    for it through the model): the same step as without, whose given states stay as they were."""
    model = small_model(decode_implementation="native")
    with torch.no_grad():
        states = cache_of(model(torch.randint(0, V, (rows, 4)), use_cache=True)).states
        kept = [s.S.clone() for s in states]
        token = torch.randint(0, V, (rows, 1))
        want, want_states = native_step.native_step(model, token, states)
        assert all(torch.equal(s.S, k) for s, k in zip(states, kept, strict=True))
        got = model(token, cache=RetNetCache(states, 4, overwrite=True), use_cache=True)
    assert torch.equal(got.logits, want)
    for old, new, w in zip(states, cache_of(got).states, want_states, strict=True):
        for name in ("S", "z", "offset"):
            assert getattr(new, name).data_ptr() == getattr(old, name).data_ptr()
            assert torch.equal(getattr(old, name), getattr(w, name))


def test_native_step_hands_over_to_aot_where_the_kernel_does_not_apply(monkeypatch) -> None:
    """Another dtype, no C++ compiler: the reason is given, and the step runs as "aot" does."""
    calls = []
    monkeypatch.setattr(decoding, "aot_step", lambda lm, ids, states: calls.append(ids.shape) or ("aot", states))
    model = small_model(decode_implementation="native").double()
    assert "float32" in native_step.unsupported(model)
    ids, mask = prompt()
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
    assert native_step.native_step(model, ids[:, -1:], cache.states)[0] == "aot" and calls == [(3, 1)]
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert "no C++ compiler" in native_step.unsupported(small_model())


@pytest.mark.native_kernels
def test_native_kernel_refuses_what_it_cannot_compute_by_name() -> None:
    model = small_model()
    weights, options, scalars = native_step._arguments(model)
    with pytest.raises(RuntimeError, match=r"options and .* scalars expected"):
        cpu_kernels.decode_step(weights, options[:-1], scalars)
    kernel = cpu_kernels.decode_step(weights, options, scalars)
    S = torch.zeros(1, 2, 16, 32)
    z, offset = torch.zeros(1, 2, 16), torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"ids must be \(M, 1\) on the CPU"):
        kernel.step(torch.zeros(1, dtype=torch.long), [S] * 2, [z] * 2, [offset] * 2, [S.clone()] * 2)
    with pytest.raises(RuntimeError, match=r"state must be S \(M, H, dk, dv\)"):
        kernel.step(torch.zeros(1, 1, dtype=torch.long), [S[:, :1]] * 2, [z] * 2, [offset] * 2, [S] * 2)
    with pytest.raises(ValueError, match=r"token id 64, outside the vocabulary \[0, 64\)"):
        kernel.step(torch.full((1, 1), V), [S] * 2, [z] * 2, [offset] * 2, [S.clone()] * 2)
    weights[2 + 8 + 25] = torch.zeros(3)  # the second layer's q weight (index: 8 globals, 25 per layer, q at 2)
    with pytest.raises(RuntimeError, match=r"weights\[35\] must be a contiguous CPU Float tensor of 1024"):
        cpu_kernels.decode_step(weights, options, scalars)


@pytest.mark.parametrize("implementation", ["eager", "aot", "native", "native-float64"])
def test_every_step_checks_token_ids_as_the_forward_does(implementation: str) -> None:
    """Ids outside the vocabulary and ids that are not integers get the forward's errors at a decoding step, whether
    Python checks them or the native kernel does (float64: native's hand-over to aot); int32 ids decode as int64."""
    if implementation == "native" and not cpu_kernels.available():
        pytest.skip("no C++ compiler to build the kernels")
    model = small_model(decode_implementation=implementation.split("-")[0])
    if implementation.endswith("float64"):
        model = model.double()
    ids, mask = prompt()
    with torch.no_grad():
        states = cache_of(model(ids, attention_mask=mask, use_cache=True)).states
        token = ids[:, -1:].clone()

        def step(token: torch.Tensor) -> torch.Tensor:
            return model(token, cache=RetNetCache(states, ids.shape[1]), use_cache=True).logits

        for bad in (-1, V, V + 100):
            token[1] = bad
            with pytest.raises(ValueError, match=rf"token id {bad}, outside the vocabulary \[0, {V}\): encode with"):
                step(token)
        with pytest.raises(TypeError, match="integer token ids"):
            step(ids[:, -1:].float())
        assert torch.equal(step(ids[:, -1:].int()), step(ids[:, -1:]))


def test_aot_step_reads_the_weights_of_the_model_at_every_call(monkeypatch) -> None:
    """Weights changed in place, a parameter re-assigned, and a second model of the same shapes (which loads the
    library from disk rather than compiling it): each step equals the eager step of the weights of that moment."""
    model = small_model(decode_implementation="aot")
    model.warm_up_decoding((2,))
    assert not decoding._AOT[model].peft and decoding._AOT[model].loaders  # a library runs, not a fallback
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    assert_steps_agree(model, "aot", steps=2)
    head = model.model.retnet.blocks[0].retention.out_proj
    head.weight = torch.nn.Parameter(torch.randn_like(head.weight))  # a new tensor: a structural change
    assert_steps_agree(model, "aot", steps=2)
    torch.manual_seed(7)
    other = RetNetForCausalLM(model.config).eval()
    with _no_compiling(monkeypatch):
        assert_steps_agree(other, "aot", steps=2)


def test_aot_step_for_several_rows_takes_its_products_from_the_few_rows_kernel(monkeypatch) -> None:
    """In float32 on a CPU the library for two rows and more calls the few-rows kernel (ops/cpu_kernels.py; its
    exactness: the tests above, which decode three rows)."""
    if not cpu_kernels.available():
        pytest.skip("no C++ compiler to build the kernel")
    shapes, kernel = [], cpu_kernels.linear_rows
    monkeypatch.setattr(cpu_kernels, "linear_rows", lambda x, weight: shapes.append(x.shape) or kernel(x, weight))
    model = small_model(decode_implementation="aot")
    model.warm_up_decoding((2,))  # the export traces every product of the step through it, once per pass
    products = model.config.num_layers * 7 + 1  # q, k, v, g, out and the FFN's two per layer, then the head
    assert shapes and len(shapes) % products == 0


def test_aot_step_of_a_model_with_peft_adapters_is_the_compiled_step() -> None:
    """peft switches its adapters by attributes (merged, disabled) that an exported program cannot see: such a
    model decodes through torch.compile, whose guards do."""
    peft = pytest.importorskip("peft")
    model = small_model(decode_implementation="aot")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    decoding.warm_up(model, (2,))
    assert decoding._AOT[model].peft and not decoding._AOT[model].loaders


@pytest.mark.parametrize("implementation", ["aot", "native"])
def test_step_writes_into_memory_nobody_holds_and_never_into_kept_states(implementation: str) -> None:
    """A step from states a cache was given writes its new S into buffers of the step's own: re-used once the
    states written there are dropped (no page faults at every token), never while a state or any view of it is
    kept, and never into the given states (a prompt's cache continued several times)."""
    model = small_model(decode_implementation=implementation)
    ids, mask = prompt()
    with torch.no_grad():
        given = cache_of(model(ids, attention_mask=mask, use_cache=True)).states
        given_copy = [s.S.clone() for s in given]
        token = ids[:, -1:]

        def step() -> list[RetentionState]:  # one step from the prompt's states, in a cache of its own
            return cache_of(model(token, cache=RetNetCache(given, ids.shape[1]), use_cache=True)).states

        kept = step()[0]  # a state kept whole
        kept_copy = kept.S.clone()
        row = step()[1].S[1]  # a view of one row
        row_copy = row.clone()
        pointers = {step()[0].S.data_ptr() for _ in range(6)}  # their states dropped at once
    assert torch.equal(kept.S, kept_copy) and torch.equal(row, row_copy)
    assert all(torch.equal(s.S, c) for s, c in zip(given, given_copy, strict=True))
    assert len(pointers) == 1  # one buffer set, free again at each step


@pytest.mark.parametrize("implementation", ["eager", "aot", "native"])
def test_a_cache_writes_over_the_states_its_own_steps_made(implementation: str) -> None:
    """A cache's next step writes its new S and z over the states its previous step made (eager, native; aot makes
    new ones), never over those a prefill left: the prefill's states stay as they were, and every step's logits
    equal the eager step's from copies of the states."""
    model = small_model(decode_implementation=implementation)
    ids, mask = prompt()
    with torch.no_grad():
        cache = cache_of(model(ids, attention_mask=mask, use_cache=True))
        prefilled = cache.states
        prefilled_copy = [s.S.clone() for s in prefilled]
        eager_states = [RetentionState(s.S.clone(), s.z.clone(), s.offset.clone()) for s in prefilled]
        token, pointers = ids[:, -1:], []
        for _ in range(5):
            assert cache.writable == (len(pointers) > 0)
            logits = model(token, cache=cache, use_cache=True).logits
            pointers.append([t.data_ptr() for s in cache.states for t in (s.S, s.z)])
            with torch.inference_mode():
                want, eager_states = decode_logits(model, token, eager_states)
            torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
            token = want.argmax(-1)
    assert all(torch.equal(s.S, c) for s, c in zip(prefilled, prefilled_copy, strict=True))
    in_place = [p == pointers[0] for p in pointers[1:]]  # aot: step 2's new states while step 1's are alive
    assert all(in_place) if implementation != "aot" else not in_place[0]


@pytest.mark.parametrize("implementation", ["eager", "aot", "native"])
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_greedy_step_returns_the_argmax_of_the_step_logits(implementation: str, rows: int) -> None:
    """A step asked for the greedy choice returns each row's argmax of the logits the same step returns (native:
    taken inside the kernel, each thread in its share of the vocabulary), at one row, a few, and past 16 (GEMM)."""
    model = small_model(decode_implementation=implementation)
    with torch.no_grad():
        states = cache_of(model(torch.randint(0, V, (rows, 4)), use_cache=True)).states
        token = torch.randint(0, V, (rows, 1))
        logits, want_states = decoding.step_for(implementation)(model, token, states)
        for overwrite in (False, True):
            given = [RetentionState(s.S.clone(), s.z.clone(), s.offset.clone()) for s in states]
            got, got_states = decoding.step_for(implementation, overwrite, greedy=True)(model, token, given)
            assert got.shape == (rows, 1) and got.dtype == torch.long
            assert torch.equal(got, logits.argmax(-1))
            for g, w in zip(got_states, want_states, strict=True):
                torch.testing.assert_close(g.S, w.S, rtol=1e-5, atol=1e-5)


@pytest.mark.native_kernels
def test_native_greedy_choice_breaks_ties_and_takes_nan_as_torch_argmax_does() -> None:
    """Ties across the threads' shares of the vocabulary go to the first index, and a NaN logit wins (the first)."""
    model = small_model(decode_implementation="native")
    with torch.no_grad():
        states = cache_of(model(torch.randint(0, V, (2, 4)), use_cache=True)).states
        token = torch.randint(0, V, (2, 1))
        head = model.lm_head.weight
        for case in ("tie", "nan", "two nans"):
            head.copy_(head[:1].expand_as(head))  # every logit equal: the first index
            if case != "tie":
                head[V - 3] = float("nan")
            if case == "two nans":
                head[5] = float("nan")
            given = [RetentionState(s.S.clone(), s.z.clone(), s.offset.clone()) for s in states]
            got = native_step.native_step(model, token, given, greedy=True)[0]
            logits = native_step.native_step(model, token, states)[0]
            assert torch.equal(got, logits.argmax(-1)), case
            assert got.flatten().tolist() == [{"tie": 0, "nan": V - 3, "two nans": 5}[case]] * 2
