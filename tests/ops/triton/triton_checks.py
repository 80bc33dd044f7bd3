"""What the kernel tests share: the device, the error measure, the SPEC §7 tolerances.

Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux: pip install triton)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}  # relative to float64


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64."""
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-30)).item()
