"""The greedy choice of the CPU kernels (ops/cpu/decode_step.cpp, ``argmax``) against torch.argmax."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from retentive.models.decoding import greedy
from retentive.ops import cpu_kernels

pytestmark = pytest.mark.native_kernels


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


@pytest.mark.parametrize("vocab", [1, 15, 16, 17, 31, 4101])
def test_argmax_finds_the_maximum_in_any_lane_and_in_the_tail(vocab: int) -> None:
    """The maximum (a number, +inf, or a NaN) at every kind of place: each lane of a vector, the tail past the last
    whole vector, first and last; rows of random values around it."""
    generator = torch.Generator().manual_seed(vocab)
    places = sorted({0, vocab - 1, *torch.randint(0, vocab, (6,), generator=generator).tolist()})
    for top in (1e4, float("inf"), float("nan")):
        logits = torch.randn(len(places), vocab, generator=generator)
        for row, place in enumerate(places):
            logits[row, place] = top
            logits[row, (place + 1) % vocab] = top if row % 2 else logits[row, (place + 1) % vocab]  # a tie after it
        assert torch.equal(cpu_kernels.argmax(logits), logits.argmax(-1)), (vocab, top)


def test_the_greedy_choice_builds_no_kernels(tmp_path) -> None:
    """Where no step has loaded the kernels, the greedy choice is torch's: a user of the eager step waits for no
    build (a fresh process, an empty kernel cache)."""
    script = (
        "import torch\n"
        "from retentive.models.decoding import greedy\n"
        "from retentive.ops import cpu_kernels\n"
        "x = torch.randn(3, 1, 50)\n"
        "assert torch.equal(greedy(x), x.argmax(-1))\n"
        "built = sorted(p.name for p in cpu_kernels.cache_root().rglob('*'))\n"
        "print(cpu_kernels._module.cache_info().currsize, built)\n"
    )
    env = {**os.environ, "RETENTIVE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "[]"]
