"""LoRA adapters (peft) on every projection: trained, then the same in the parallel, chunkwise and recurrent forms
(decoding included), and merged without changing the outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from retentive import RetNetConfig, RetNetForCausalLM, cache_of

peft = pytest.importorskip("peft")

V = 64
# every Linear of a RetNet block: W_Q, W_K, W_V, W_G, W_O of retention; the FFN's up (and gate) and down
TARGETS = ["q_proj", "k_proj", "v_proj", "g_proj", "out_proj", "up", "down"]


def small_model(**overrides) -> RetNetForCausalLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=V, dim_model=32, num_layers=2, num_heads=4, ffn_dim=64, chunk_size=4)
    return RetNetForCausalLM(RetNetConfig(**{**fields, **overrides})).double()


def trained_adapter(model: RetNetForCausalLM, targets: list[str], steps: int = 4) -> nn.Module:
    """A LoRA model trained ``steps`` AdamW steps on random tokens; every adapter weight must get a gradient."""
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    lora.train()
    params = [p for p in lora.parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n), "every adapter moved"
    return lora.eval()


@torch.no_grad()
def decode_logits(model: nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of every position: a chunkwise prefill, then one cached recurrent step per token (the decode path)."""
    out = model(input_ids=ids[:, :prefill], use_cache=True)
    logits, cache = [out.logits], cache_of(out)
    for t in range(prefill, ids.shape[1]):
        out = model(input_ids=ids[:, t : t + 1], cache=cache)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


def test_lora_on_every_projection_trains_decodes_in_every_form_and_merges() -> None:
    base = small_model()
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    lora = trained_adapter(base, TARGETS)
    with torch.no_grad():
        parallel = lora(input_ids=ids, mode="parallel").logits
        chunkwise = lora(input_ids=ids, mode="chunkwise", chunk_size=4).logits
        recurrent = lora(input_ids=ids, mode="recurrent").logits
    decoded = decode_logits(lora, ids, prefill=5)
    assert (parallel - before).abs().max() > 1e-2, "the adapter changes the outputs"
    for other in (chunkwise, recurrent, decoded):
        torch.testing.assert_close(other, parallel, rtol=1e-9, atol=1e-9)  # float64
    greedy = lora.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        rescored = lora(input_ids=greedy[:, :-1]).logits[0, 3:].argmax(-1)
    assert torch.equal(greedy[0, 4:], rescored), "generate() follows the adapted parallel argmax"

    merged = lora.merge_and_unload()
    assert all(type(m) is nn.Linear for name, m in merged.named_modules() if name.endswith(tuple(TARGETS)))
    assert set(merged.state_dict()) == set(small_model().state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, parallel, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(decode_logits(merged, ids, prefill=5), parallel, rtol=1e-9, atol=1e-9)


def test_lora_on_the_output_head_is_trained_through_the_logits() -> None:
    """The blockwise loss reads lm_head.weight; a wrapped head falls back to its logits, so its adapter trains."""
    lora = trained_adapter(small_model(tie_word_embeddings=False), ["lm_head"], steps=2)
    ids = torch.randint(0, V, (1, 7))
    with pytest.raises(ValueError, match=r"skip_logits=True reads lm_head\.weight"):
        lora(input_ids=ids, labels=ids, skip_logits=True)


def test_return_dict_none_follows_the_config() -> None:
    model = small_model().eval()
    ids = torch.randint(0, V, (1, 5))
    assert model(ids, labels=ids, return_dict=None).loss is not None
    assert model.model(ids, return_dict=None).last_hidden_state.shape == (1, 5, 32)
    model.config.return_dict = False
    assert isinstance(model(ids, labels=ids, return_dict=None), tuple)
    assert isinstance(model.model(ids, return_dict=None), tuple)
    assert model(ids, return_dict=True).logits.shape == (1, 5, V)
