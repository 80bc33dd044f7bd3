"""Activation checkpointing: the blocks recomputed in the backward give the gradients of the plain backward (the
language model in every form, ViR, RMT with MaSA and MaSAD, LoRA), every checkpointed block runs twice and no other,
and what autograd keeps for the backward shrinks to the blocks' inputs.

Recomputation repeats the same float64 operations on the same inputs, so gradients are compared exactly."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from retentive import RetNetConfig, RetNetForCausalLM
from retentive.layers.checkpointing import set_grad_checkpointing
from retentive.models import RMTConfig, RMTForImageClassification, ViRConfig, ViRForImageClassification
from retentive.ops import RetentionState, retention

V, LAYERS = 64, 4


def small_lm(**overrides) -> RetNetForCausalLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=V, dim_model=32, num_layers=LAYERS, num_heads=4, ffn_dim=64, chunk_size=4)
    return RetNetForCausalLM(RetNetConfig(**{**fields, **overrides})).double().train()


IDS = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))


def gradients(model: nn.Module, loss: Callable[[nn.Module], Tensor], seed: int = 1) -> dict[str, Tensor]:
    """Every parameter's gradient after ``loss(model).backward()``, with the RNG (dropout) seeded by ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_language_model_gradients_are_those_of_the_plain_backward_dropout_included(mode: str) -> None:
    model = small_lm(dropout=0.2, rotary=True)
    loss = lambda m: m(input_ids=IDS, labels=IDS, mode=mode).loss
    plain = gradients(model, loss)
    assert any((plain[n] - g).abs().max() > 0 for n, g in gradients(model, loss, seed=2).items()), "dropout acts"
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    assert_same(gradients(model, loss), plain)  # the recomputation drew the same dropout masks
    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing and not model.model.retnet.gradient_checkpointing


def test_gradients_reach_a_carried_state_through_a_checkpointed_block() -> None:
    model = small_lm()
    with torch.no_grad():
        prefix = model(input_ids=IDS[:, :6], use_cache=True).past_key_values.states
    states = [RetentionState(s.S.clone().requires_grad_(), s.z.clone(), s.offset.clone()) for s in prefix]
    hidden = model.model.embed_tokens(IDS[:, 6:]).detach()  # (B, 7, d)

    def state_gradients() -> list[Tensor]:
        for s in states:
            s.S.grad = None
        model.model.retnet(hidden, mode="chunkwise", chunk_size=4, state=states).sum().backward()
        return [s.S.grad.clone() for s in states]

    plain = state_gradients()
    model.model.retnet.set_grad_checkpointing()
    for got, want in zip(state_gradients(), plain, strict=True):
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def block_runs(blocks: nn.ModuleList, run: Callable[[], None]) -> Counter:
    """How many times each block's forward ran during ``run()``."""
    calls: Counter = Counter()
    hooks = [b.register_forward_pre_hook(lambda *_, i=i: calls.update([i])) for i, b in enumerate(blocks)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def test_every_nth_block_runs_again_in_the_backward_and_none_without_gradients() -> None:
    model = small_lm()
    blocks = model.model.retnet.blocks
    model.activation_checkpointing_enable(every_n_layers=2)
    step = lambda: model(input_ids=IDS, labels=IDS).loss.backward()
    assert block_runs(blocks, step) == {0: 2, 1: 1, 2: 2, 3: 1}
    with torch.no_grad():
        assert block_runs(blocks, lambda: model(input_ids=IDS)) == dict.fromkeys(range(LAYERS), 1)
    model.eval()
    assert block_runs(blocks, lambda: model(input_ids=IDS).logits.sum().backward()) == dict.fromkeys(range(LAYERS), 1)


def kept_bytes(model: nn.Module, loss: Callable[[nn.Module], Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of ``loss(model)``, parameters aside, one count per
    storage. A checkpointed block's own saves go to the checkpoint, which keeps the block's input instead: the
    caller adds those."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss(model)
    return sum(kept.values())


def test_what_is_kept_for_the_backward_shrinks_to_the_blocks_inputs() -> None:
    model = small_lm(dim_model=64, ffn_dim=256)
    ids = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(3))
    loss = lambda m: m(input_ids=ids, labels=ids, mode="chunkwise").loss
    plain = kept_bytes(model, loss)
    model.activation_checkpointing_enable()
    inputs = LAYERS * ids.numel() * 64 * 8  # each block's input (B, T, d), float64
    checkpointed = kept_bytes(model, loss) + inputs
    assert checkpointed < plain / 4, (checkpointed, plain)


def small_vir(**options) -> ViRForImageClassification:
    torch.manual_seed(0)
    config = ViRConfig(image_size=12, patch_size=3, in_channels=2, num_classes=5, dim=32, depth=3, num_heads=4,
                       dropout=0.1, **options)  # fmt: skip
    return ViRForImageClassification(config).double().train()


def small_rmt() -> RMTForImageClassification:
    torch.manual_seed(0)
    config = RMTConfig(in_channels=2, num_classes=7, dims=(16, 32, 64), depths=(2, 2, 1), num_heads=(2, 2, 4),
                       heads_ranges=(4, 4, 6), mlp_ratios=(2, 2, 2), decomposed=(True, False, False),
                       layer_scales=(False, True, True), projection=48)  # fmt: skip
    return RMTForImageClassification(config).double().train()


@pytest.mark.parametrize("build", [small_vir, lambda: small_vir(rotary=True, layer_scale=None), small_rmt])
def test_vision_models_checkpoint_by_timms_switch(build: Callable[[], nn.Module]) -> None:
    model = build()
    images = torch.randn(4, 2, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3])
    loss = lambda m: m(images, labels).loss
    state = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm's running statistics move
    plain = gradients(model, loss)
    model.load_state_dict(state)
    model.set_grad_checkpointing()
    stacks = [m for m in model.modules() if hasattr(m, "run_block")]
    assert stacks and all(m.gradient_checkpointing for m in stacks)
    assert_same(gradients(model, loss), plain)
    model.set_grad_checkpointing(False)
    assert not any(m.gradient_checkpointing for m in stacks)


def test_the_pretrained_vision_wrapper_takes_transformers_switch() -> None:
    from retentive.models.rmt import PreTrainedRMT

    wrapper = PreTrainedRMT(small_rmt().config, small_rmt())
    wrapper.activation_checkpointing_enable()
    assert all(stage.gradient_checkpointing for stage in wrapper.classifier.stages)


def test_lora_adapters_get_the_gradients_of_the_plain_backward() -> None:
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(small_lm(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    loss = lambda m: m(input_ids=IDS, labels=IDS).loss
    plain = gradients(lora, loss)
    assert all("lora_" in name for name in plain)
    lora.base_model.model.activation_checkpointing_enable()
    assert_same(gradients(lora, loss), plain)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_chunkwise_kernels_recompute_inside_a_checkpoint(backend: str) -> None:
    """The autograd Functions of the chunkwise form (PyTorch's and Triton's, in its interpreter here) run again
    under a non-reentrant checkpoint and give the same gradients, a carried state's included."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 37, d, generator=gen, requires_grad=True) for d in (16, 16, 32))
    S0 = torch.randn(2, 2, 16, 32, generator=gen, requires_grad=True)

    def run(recompute: bool) -> list[Tensor]:
        def f(q: Tensor) -> Tensor:
            state = RetentionState(S0, torch.zeros(2, 2, 16), torch.zeros(2, dtype=torch.long))
            return retention(q, k, v, mode="chunkwise", chunk_size=16, state=state, backend=backend)[0]

        o = torch.utils.checkpoint.checkpoint(f, q, use_reentrant=False) if recompute else f(q)
        grads = torch.autograd.grad((o * torch.linspace(-1, 1, 32)).sum(), (q, k, v, S0))
        return list(grads)

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bad_every_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        small_lm().model.retnet.set_grad_checkpointing(every=0)
    with pytest.raises(ValueError, match="holds no stack of blocks"):
        set_grad_checkpointing(nn.Linear(2, 2))


def test_a_compiled_model_recomputes_its_checkpointed_blocks() -> None:
    """torch.compile traces the checkpoint (aot_eager: its graphs and autograd, no code generation) and gives the
    eager gradients; float32, where the traced decompositions round differently (5.6e-7 measured)."""
    model = small_lm().float()
    loss = lambda m: m(input_ids=IDS, labels=IDS).loss
    plain = gradients(model, loss)
    model.activation_checkpointing_enable()
    compiled = gradients(torch.compile(model, backend="aot_eager"), loss)
    assert compiled.keys() == {f"_orig_mod.{name}" for name in plain}
    for name, want in plain.items():
        torch.testing.assert_close(compiled[f"_orig_mod.{name}"], want, rtol=1e-5, atol=1e-6, msg=name)
