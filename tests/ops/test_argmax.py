"""The greedy choice of the CPU kernels (ops/cpu/decode_step.cpp, ``argmax``) against torch.argmax."""

from __future__ import annotations

import pytest
import torch

from retentive.models.decoding import greedy
from retentive.ops import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler to build the kernels")


@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 1, 7), (5, 64), (17,)])
def test_argmax_equals_torch_argmax_with_ties_infinities_and_nan(shape: tuple[int, ...]) -> None:
    """The greedy choice (ops/cpu/decode_step.cpp) against torch.argmax: the first of tied maxima, -inf rows, and
    NaN taken above every number (the first NaN)."""
    torch.manual_seed(0)
    x = torch.randn(shape).round()  # integers: ties in every row
    cases = [x, torch.full(shape, -float("inf")), x.clone()]
    cases[2].view(-1, shape[-1])[:, -1] = float("nan")
    if shape[-1] > 2:
        cases[2].view(-1, shape[-1])[0, 1] = float("nan")  # the first row: two NaNs, the first one wins
    for logits in cases:
        assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(-1))
    assert torch.equal(cpu_kernels.argmax(x.transpose(0, -1)), x.transpose(0, -1).argmax(-1))  # not contiguous
    with pytest.raises(RuntimeError, match="argmax: logits must be a float32 CPU tensor"):
        cpu_kernels.argmax(x.double())
    assert torch.equal(greedy(x.double()), x.double().argmax(-1))  # other dtypes: torch's argmax
