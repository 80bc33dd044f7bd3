"""The 2-D Manhattan log-decay of RMT: its definition, its 1-D parts and their Kronecker sum."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from retentive.ops.decay2d import log_decay_1d, manhattan_log_decay, rmt_log_gamma

grids = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 5))  # height, width, heads


def test_rmt_gamma_schedule_follows_the_formula():
    for heads, init, rng in ((4, 2.0, 4.0), (8, 2.0, 6.0), (1, 3.0, 0.0), (20, 2.0, 6.0)):
        got = rmt_log_gamma(heads, init, rng).exp()
        want = [1 - 2 ** -(init + rng * h / heads) for h in range(heads)]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    assert bool((rmt_log_gamma(16, 2.0, 6.0).diff() > 0).all()), "later heads decay more slowly"


@settings(max_examples=30, deadline=None)
@given(grids)
def test_manhattan_log_decay_is_the_definition(grid):
    height, width, heads = grid
    log_g = rmt_log_gamma(heads, 2.0, 4.0)
    got = manhattan_log_decay(log_g, height, width)
    assert got.shape == (heads, height * width, height * width)
    for n in range(height * width):
        for m in range(height * width):
            (yn, xn), (ym, xm) = divmod(n, width), divmod(m, width)
            want = log_g * (abs(xn - xm) + abs(yn - ym))
            torch.testing.assert_close(got[:, n, m], want, rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(grids)
def test_2d_log_decay_is_the_kronecker_sum_of_the_1d_ones(grid):
    height, width, heads = grid
    log_g = rmt_log_gamma(heads, 2.0, 5.0)
    rows, cols = log_decay_1d(log_g, height), log_decay_1d(log_g, width)  # along y, along x
    for h in range(heads):
        kron_sum = torch.kron(rows[h], torch.ones(width, width, dtype=torch.float64)) + torch.kron(
            torch.ones(height, height, dtype=torch.float64), cols[h]
        )
        torch.testing.assert_close(manhattan_log_decay(log_g, height, width)[h], kron_sum, rtol=0, atol=1e-12)


def test_1d_log_decay_is_symmetric_with_zero_diagonal_and_linear_in_distance():
    log_g = rmt_log_gamma(3)
    D = log_decay_1d(log_g, 9)
    torch.testing.assert_close(D, D.transpose(-1, -2))
    assert bool((D.diagonal(dim1=-2, dim2=-1) == 0).all())
    torch.testing.assert_close(D[:, 0, 8], 8 * log_g)
    assert math.isclose(D[0, 2, 5].exp().item(), math.exp(log_g[0].item()) ** 3, rel_tol=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_heads"):
        rmt_log_gamma(0)
    with pytest.raises(ValueError, match="initial_value"):
        rmt_log_gamma(4, 0.0)
    with pytest.raises(ValueError, match="grid"):
        manhattan_log_decay(rmt_log_gamma(2), 0, 3)
    with pytest.raises(ValueError, match="length"):
        log_decay_1d(rmt_log_gamma(2), 0)
