"""retentive.memory and `retentive inspect`: each head's gamma and horizon, and the share of its state by distance,
checked against the model's own state and against a direct computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from retentive import RetNetConfig, RetNetForCausalLM, cache_of
from retentive.cli import main
from retentive.data import ByteTokenizer
from retentive.memory import bucket_names, heads, horizon, state_shares
from retentive.ops import apply_rotary, gamma_schedule

V = 256


def tiny(**overrides) -> RetNetForCausalLM:
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=V, dim_model=32, num_layers=2, num_heads=2, **overrides)
    return RetNetForCausalLM(config).eval()


def test_gamma_and_horizon_of_every_head_follow_the_decay_schedule():
    model = tiny(decay="linspace")
    want = gamma_schedule("linspace", 2).tolist()
    got = heads(model)
    assert [(h.layer, h.head) for h in got] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for h in got:
        assert h.gamma == pytest.approx(want[h.head], rel=1e-12)
        assert h.gamma**h.horizon < 0.01 <= h.gamma ** (h.horizon - 1)
    assert horizon(1 - 2**-5) == 146 and horizon(0.5) == 7  # 0.5^7 = 0.0078 < 1% <= 0.5^6


def test_the_keys_and_values_it_reads_make_the_models_own_state():
    """Σ γ^(T-1-n) rot(k_n)ᵀ v_n over the hooked projections equals the state a chunkwise prefill leaves."""
    model = tiny()
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(1))
    captured = {}
    retention = model.model.retnet.blocks[1].retention
    hooks = [
        retention.k_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("k", out)),
        retention.v_proj.register_forward_hook(lambda m, a, out: captured.__setitem__("v", out)),
    ]
    with torch.no_grad():
        state = cache_of(model(ids, use_cache=True)).states[1]  # also fills the hooks (chunkwise prefill)
    for hook in hooks:
        hook.remove()
    T, H, dk = 40, retention.num_heads, retention.key_dim
    k = captured["k"].view(1, T, H, dk).transpose(1, 2).double()  # (1, H, T, dk)
    v = captured["v"].view(1, T, H, -1).transpose(1, 2).double()
    k = apply_rotary(k, retention.rotary_phase(torch.arange(T)[None], torch.float64), retention.rotary_layout)
    gamma = torch.tensor([h.gamma for h in heads(model) if h.layer == 1], dtype=torch.float64)
    weight = gamma[:, None] ** torch.arange(T - 1, -1, -1, dtype=torch.float64)  # (H, T)
    want = torch.einsum("ht,htk,htv->hkv", weight, k[0], v[0])
    torch.testing.assert_close(state.S[0].double(), want, rtol=1e-4, atol=1e-5)


def test_shares_sum_to_one_and_a_slow_head_reaches_further_back():
    model = tiny(decay=[0.9, 0.999])  # horizons 44 and 4,603 tokens
    ids = torch.randint(0, V, (1, 600), generator=torch.Generator().manual_seed(2))
    shares = state_shares(model, ids)  # (L, H, 4)
    assert shares.shape == (2, 2, 4)
    torch.testing.assert_close(shares.sum(-1), torch.ones(2, 2))
    fast, slow = shares[:, 0], shares[:, 1]
    assert bool((fast[:, 2:].sum(-1) < 1e-9).all())  # 0.9^256: nothing from 256 tokens back
    assert bool((slow[:, 2] > 0.3).all())  # 0.999 keeps most of tokens 256-599 back
    assert bool((slow[:, 0] < fast[:, 0]).all()) and fast[0, 0] > 0.7
    assert bucket_names() == ["0-15", "16-255", "256-4095", "4096+"]
    with pytest.raises(ValueError, match="one text"):
        state_shares(model, ids.expand(2, -1))


def test_inspect_prints_heads_and_shares(tmp_path, capsys):
    model = tiny(decay=[0.9, 0.999])
    model.save_pretrained(tmp_path / "m")
    ByteTokenizer().save(tmp_path / "m")
    main(["inspect", str(tmp_path / "m")])
    table = capsys.readouterr().out
    assert "gamma" in table and "0.999000" in table and "4,603" in table
    main(["inspect", str(tmp_path / "m"), "--text", "To be, or not to be " * 30, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 600 and len(report["heads"]) == 4
    for head in report["heads"]:
        assert math.isclose(sum(head["shares"].values()), 1.0, rel_tol=1e-5)
        assert head["horizon"] == horizon(head["gamma"])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        main(["inspect", str(tmp_path)])
