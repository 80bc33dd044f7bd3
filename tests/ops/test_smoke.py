"""A first check that the three forms agree with the definition (the full suite lives beside it)."""

import pytest
import torch

from retentive.ops import log_gamma, retention
from retentive.ops.reference import naive


@pytest.mark.parametrize("mode,chunk_size", [("parallel", 64), ("chunkwise", 1), ("chunkwise", 5), ("recurrent", 1)])
@pytest.mark.parametrize("normalize", [False, True])
def test_forms_match_definition_float64(mode: str, chunk_size: int, normalize: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, d, dtype=torch.float64) for d in (8, 8, 12))
    want = naive(q * 8**-0.5, k, v, log_gamma("retnet", 3), normalize_decay=normalize, normalize_retention=normalize)
    got, _ = retention(
        q, k, v, mode=mode, chunk_size=chunk_size, normalize_decay=normalize, normalize_retention=normalize
    )
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
