"""RetentionState: (S, z, offset), float32, a size independent of the tokens read (SPEC §2)."""

import pytest
import torch

from retentive.ops import RetentionState, retention


def test_zeros_has_the_documented_shapes_and_per_row_offsets():
    s = RetentionState.zeros(3, 2, 4, 5, offset=torch.tensor([0, -2, 7]))
    assert s.S.shape == (3, 2, 4, 5) and s.z.shape == (3, 2, 4) and s.offset.tolist() == [0, -2, 7]
    assert s.S.dtype == s.z.dtype == torch.float32 and s.offset.dtype == torch.long
    assert not s.S.any() and not s.z.any()
    assert RetentionState.zeros(2, 1, 1, 1, offset=5).offset.tolist() == [5, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_state_is_float32_and_its_size_does_not_grow_with_tokens(dtype):
    sizes = []
    for T in (10, 1000):
        q, k, v = (torch.randn(2, 3, T, d).to(dtype) for d in (8, 8, 16))
        _, state = retention(q, k, v, mode="chunkwise", chunk_size=64, output_state=True)
        assert state.S.dtype == state.z.dtype == torch.float32 and state.offset.tolist() == [T, T]
        sizes.append(state.nbytes())
    assert sizes[0] == sizes[1] == 2 * 3 * (8 * 16 + 8) * 4 + 2 * 8


def test_index_select_and_detach():
    q, k, v = (torch.randn(3, 2, 6, 4, requires_grad=True) for _ in range(3))
    _, state = retention(q, k, v, output_state=True)
    picked = state.index_select(torch.tensor([2, 0]))
    torch.testing.assert_close(picked.S, state.S[[2, 0]], rtol=0, atol=0)
    torch.testing.assert_close(picked.z, state.z[[2, 0]], rtol=0, atol=0)
    assert picked.offset.tolist() == [6, 6]
    assert state.S.requires_grad and not state.detach().S.requires_grad and not state.detach().z.requires_grad


def test_check_refuses_another_configuration():
    s = RetentionState.zeros(2, 3, 4, 5)
    s.check(2, 3, 4, 5)
    for want in ((1, 3, 4, 5), (2, 2, 4, 5), (2, 3, 8, 5), (2, 3, 4, 6)):
        with pytest.raises(ValueError, match="state has S"):
            s.check(*want)
    with pytest.raises(TypeError, match="state S and z must share one floating dtype"):
        RetentionState(s.S, s.z.double(), s.offset).check(2, 3, 4, 5)
