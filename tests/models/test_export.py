"""torch.export of one decoding step: RetNetCache and RetentionState are pytrees; one program serves every step."""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree

from retentive import RetentionState, RetNetConfig, RetNetForCausalLM, cache_of
from retentive.models import RetNetCache, export_decode_step

V = 64


def small_model() -> RetNetForCausalLM:
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=V, dim_model=32, num_layers=2, num_heads=4, ffn_dim=64, chunk_size=4)
    return RetNetForCausalLM(config).eval()


def test_the_cache_is_a_pytree_of_its_states_and_token_count() -> None:
    model = small_model()
    with torch.no_grad():
        cache = cache_of(model(torch.randint(0, V, (2, 5)), use_cache=True))
    leaves, spec = pytree.tree_flatten(cache)
    assert len(leaves) == 2 * 3 + 1 and leaves[-1] == 5  # (S, z, offset) per layer, then seen_tokens
    again = pytree.tree_unflatten(leaves, spec)
    assert isinstance(again, RetNetCache) and again.seen_tokens == 5
    assert all(isinstance(s, RetentionState) and s.S is t.S for s, t in zip(again.states, cache.states, strict=True))


def test_one_exported_decode_step_serves_every_position_and_matches_eager() -> None:
    model = small_model()
    prompt, tokens = torch.randint(0, V, (2, 9)), torch.randint(0, V, (2, 6))
    with torch.no_grad():
        step = export_decode_step(model, cache_of(model(prompt, use_cache=True))).module()
        exported, eager = (cache_of(model(prompt, use_cache=True)) for _ in range(2))
        for t in range(tokens.shape[1]):  # the token count grows: the same program at every position
            got = step(tokens[:, t : t + 1], cache=exported, use_cache=True)
            want = model(tokens[:, t : t + 1], cache=eager)
            exported = cache_of(got)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert exported.seen_tokens == eager.seen_tokens == 10 + t
            for a, b in zip(exported.states, eager.states, strict=True):
                torch.testing.assert_close((a.S, a.z, a.offset), (b.S, b.z, b.offset), rtol=1e-5, atol=1e-5)
        full = model(torch.cat([prompt, tokens], dim=1)).logits[:, -1]
    torch.testing.assert_close(got.logits[:, -1], full, rtol=1e-4, atol=1e-4)
