"""RETENTIVE_TRITON_LAUNCHES: the launches (warps, stages) the chunk kernels are tuned over, a way round a launch a
compiler gets wrong on some GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from retentive.ops.triton.common import DEFAULT_LAUNCHES, LAUNCHES_ENV, launches_from

SRC = Path(__file__).resolve().parents[3] / "src"


@pytest.mark.parametrize("text", [None, ""])
def test_unset_gives_the_defaults(text):
    assert launches_from(text) == DEFAULT_LAUNCHES


def test_launches_are_read_in_order():
    assert launches_from("8x2, 4x3,16x1") == ((8, 2), (4, 3), (16, 1))


@pytest.mark.parametrize("text", ["8", "3x2", "8x0", "fast", "8x2,", "8x2x1"])
def test_a_bad_value_is_refused_by_name(text):
    with pytest.raises(ValueError, match=LAUNCHES_ENV) as e:
        launches_from(text)
    assert repr(text) in str(e.value) and "e.g. 8x2,8x3" in str(e.value)


def test_the_kernels_are_tuned_over_the_launches_of_the_environment():
    """In a fresh process (the launches are read on import), compiled rather than interpreted: every tuned kernel
    has exactly the launches given."""
    code = (
        "from retentive.ops.triton import chunk_grad, chunk_output, chunk_state, chunk_state_grad\n"
        "kernels = [chunk_grad.chunk_grad_qk_kernel, chunk_grad.chunk_grad_v_kernel, chunk_output.chunk_output_kernel,"
        " chunk_state.chunk_state_kernel, chunk_state_grad.chunk_state_grad_kernel]\n"
        "print({tuple((c.num_warps, c.num_stages) for c in k.configs) for k in kernels})"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": str(SRC)}
    env[LAUNCHES_ENV] = "4x3,8x1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{((4, 3), (8, 1))}"
