"""The rotary rotation at absolute positions (SPEC §1)."""

import math

import pytest
import torch

from retentive.ops import apply_rotary, rotary_angles, rotary_phase


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D) rotated at positions (B, T)."""
    return apply_rotary(x, rotary_phase(positions, x.shape[-1]))


@pytest.mark.parametrize("head_dim", [2, 8, 24, 100])
def test_angles_are_10000_to_minus_linspace(head_dim):
    half = head_dim // 2
    want = [10000.0 ** (-i / (half - 1)) if half > 1 else 1.0 for i in range(half)]
    torch.testing.assert_close(rotary_angles(head_dim), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)


@pytest.mark.parametrize("head_dim", [2, 8, 100])
def test_rope_angles_are_base_to_minus_2i_over_d(head_dim):
    want = [500.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    got = rotary_angles(head_dim, None, "rope", 500.0)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)


def test_halves_pair_x_i_with_x_i_plus_half_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    got = apply_rotary(x, rotary_phase(torch.tensor([[3]]), 4, angles="rope"), layout="halves")
    a0, a1 = 3 * 1.0, 3 * 10000.0**-0.5  # pairs (x_0, x_2) and (x_1, x_3) at angles 10000^0, 10000^(-2/4)
    want = [
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        1 * math.sin(a0) + 3 * math.cos(a0),
        2 * math.sin(a1) + 4 * math.cos(a1),
    ]
    torch.testing.assert_close(got.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_halves_is_interleaved_after_a_fixed_permutation():
    """Rotating halves equals rotating interleaved pairs of the features reordered (x_0, x_D/2, x_1, x_D/2+1, ...)."""
    x = torch.randn(2, 3, 7, 16, dtype=torch.float64)
    phase = rotary_phase(torch.randint(0, 1000, (2, 7)), 16)
    order = torch.arange(16).view(2, 8).t().flatten()  # 0, 8, 1, 9, ...
    want = apply_rotary(x[..., order], phase)
    torch.testing.assert_close(apply_rotary(x, phase, layout="halves")[..., order], want, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="rotary layout must be one of"):
        apply_rotary(x, phase, layout="pairs")


def test_rotation_of_one_pair_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    got = rotate(x, torch.tensor([[3]]))
    a0, a1 = 3 * 1.0, 3 * 10000.0**-1  # position 3 times angle_0, angle_1
    want = [
        1 * math.cos(a0) - 2 * math.sin(a0),
        1 * math.sin(a0) + 2 * math.cos(a0),
        3 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.sin(a1) + 4 * math.cos(a1),
    ]
    torch.testing.assert_close(got.flatten(), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)


def test_position_zero_is_identity_and_norms_are_kept():
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, torch.zeros(2, 10, dtype=torch.long)), x, rtol=0, atol=0)
    y = rotate(x, torch.randint(0, 10**6, (2, 10)))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("shift", [1, 37, 2**16, 2**20 + 3])
def test_scores_depend_on_relative_position_only(shift):
    """q_n . k_m after rotation is unchanged when both positions move by the same shift, even far out."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 16, 32, dtype=torch.float64), torch.randn(1, 2, 16, 32, dtype=torch.float64)
    pos = torch.arange(16)[None]
    base = rotate(q, pos) @ rotate(k, pos).transpose(-1, -2)
    moved = rotate(q, pos + shift) @ rotate(k, pos + shift).transpose(-1, -2)
    torch.testing.assert_close(moved, base, rtol=0, atol=1e-9)


def test_far_positions_keep_their_phase_in_float32():
    """Phases are formed in float64: at position 2^24 + 1 float32 positions would round to 2^24."""
    n = 2**24 + 1
    x = torch.tensor([[[[1.0, 0.0]]]])  # float32: the pair (1, 0) rotated by n * angle_0 = n
    got = rotate(x, torch.tensor([[n]])).flatten().tolist()
    assert math.isclose(got[0], math.cos(n), abs_tol=1e-6) and math.isclose(got[1], math.sin(n), abs_tol=1e-6)
    assert rotate(x.to(torch.bfloat16), torch.tensor([[n]])).dtype == torch.bfloat16


def test_a_stream_resumed_at_offset_continues_the_rotation():
    x = torch.randn(2, 2, 30, 8, dtype=torch.float64)
    whole = rotate(x, torch.arange(30).expand(2, 30))
    pieces = [rotate(x[:, :, a:b], torch.arange(a, b).expand(2, b - a)) for a, b in ((0, 11), (11, 12), (12, 30))]
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=0, atol=0)


def test_odd_head_dim_is_refused():
    with pytest.raises(ValueError, match="rotary needs an even head dimension, got 7"):
        rotary_angles(7)


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_real_pairs_rotate_as_the_complex_phase(layout, dtype):
    """The (cos, sin) pairs that rotary_phase gives under torch.compile rotate exactly as its complex phase does,
    eager and compiled."""
    x = torch.randn(2, 3, 5, 16, dtype=dtype)
    positions = torch.randint(-40, 70_000, (2, 5))
    complex_phase = rotary_phase(positions, 16, dtype)
    pairs = torch.view_as_real(complex_phase)  # (B, 1, T, D/2, 2): cos, sin
    tol = {"rtol": 1e-13, "atol": 1e-13} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 2e-6}
    want = apply_rotary(x, complex_phase, layout)
    torch.testing.assert_close(apply_rotary(x, pairs, layout), want, **tol)

    def rotate_compiled(x, positions):
        phase = rotary_phase(positions, 16, dtype)
        assert not phase.is_complex() and phase.shape == (2, 1, 5, 8, 2)  # checked while tracing
        return apply_rotary(x, phase, layout)

    torch.testing.assert_close(torch.compile(rotate_compiled, fullgraph=True)(x, positions), want, **tol)
