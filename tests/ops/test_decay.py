"""Per-head decay schedules and the decay sums of the normalizations (SPEC §2-3)."""

import math

import pytest
import torch

from retentive.ops import decay_sum, gamma_schedule, log_gamma


@pytest.mark.parametrize("num_heads", [1, 3, 8, 16])
def test_retnet_schedule_is_paper_eq_8(num_heads):
    want = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(num_heads)], dtype=torch.float64)
    torch.testing.assert_close(gamma_schedule("retnet", num_heads), want, rtol=0, atol=0)
    torch.testing.assert_close(log_gamma("retnet", num_heads), want.log(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("num_heads", [2, 5, 12])
def test_linspace_schedule_spans_1_32_to_1_512(num_heads):
    gamma = gamma_schedule("linspace", num_heads)
    assert math.isclose(gamma[0].item(), 1 - 1 / 32, rel_tol=1e-14)
    assert math.isclose(gamma[-1].item(), 1 - 1 / 512, rel_tol=1e-14)
    ratios = (1 - gamma[1:]).log() - (1 - gamma[:-1]).log()  # equal steps in log(1 - gamma)
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_gamma("linspace", num_heads), gamma.log(), rtol=1e-15, atol=0)


def test_gammas_stay_distinct_where_bfloat16_would_collapse_them():
    """log gamma in float32 keeps 1 - 2^-12 apart from 1 (bf16 rounds it to 1.0, SPEC §3)."""
    lg = log_gamma("retnet", 16).float()
    assert (lg < 0).all() and lg.unique().numel() == 16
    assert torch.tensor(1 - 2**-12, dtype=torch.bfloat16).item() == 1.0  # the failure this avoids


def test_given_gammas_are_accepted_as_list_or_tensor():
    want = torch.tensor([0.5, 0.9, 0.999], dtype=torch.float64).log()
    torch.testing.assert_close(log_gamma([0.5, 0.9, 0.999], 3), want, rtol=0, atol=0)
    gamma32 = torch.tensor([0.5, 0.9, 0.999])  # float32 gammas are taken as they are, then logged in float64
    torch.testing.assert_close(log_gamma(gamma32, 3), gamma32.double().log(), rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["retnet", "linspace"])
def test_decay_sum_is_the_row_sum_of_the_decay_matrix(schedule):
    lg = log_gamma(schedule, 4)
    positions = torch.tensor([[0, 1, 2, 50, 999], [-3, -1, 0, 7, 4095]])
    got = decay_sum(lg, positions)  # (2, 4, 5)
    for b, row in enumerate(positions.tolist()):
        for t, n in enumerate(row):
            want = (lg[:, None] * torch.arange(max(n, 0) + 1, dtype=torch.float64)).exp().sum(-1)  # (H,)
            torch.testing.assert_close(got[b, :, t], want, rtol=1e-12, atol=0)


def test_decay_sum_stays_finite_at_long_positions():
    c = decay_sum(log_gamma("retnet", 16).float(), torch.tensor([[0, 2**16, 2**20, 2**30]]))
    assert c.isfinite().all() and (c >= 1).all()
    assert (c[..., -1] <= 2.0 ** (5 + torch.arange(16)) * 1.0001).all()  # bounded by 1 / (1 - gamma)


def test_bad_decay_is_refused_naming_the_argument():
    with pytest.raises(ValueError, match="decay schedule must be one of"):
        gamma_schedule("cosine", 4)
    with pytest.raises(ValueError, match="decay schedule must be one of"):
        log_gamma("cosine", 4)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        gamma_schedule("retnet", 0)
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="decay must be float32 or float64"):
            log_gamma(torch.full((2,), 0.9, dtype=half), 2)
    for bad in ([0.5, 1.0], [0.0, 0.5], [-0.5, 0.5], [0.5, float("nan")]):
        with pytest.raises(ValueError, match=r"every gamma in decay must lie in \(0, 1\)"):
            log_gamma(bad, 2)
    with pytest.raises(ValueError, match=r"decay must have one gamma per head, shape \(3,\)"):
        log_gamma([0.5, 0.9], 3)
