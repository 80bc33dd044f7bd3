"""The backends decode as generate() does: slots at different positions in one batch, joining and leaving."""

from __future__ import annotations

import pytest
import torch
from servekit import greedy, tiny_model

from retentive.ops import cpu_kernels
from retentive.serving import KVCacheBackend, RetNetBackend, backend_for


@pytest.mark.parametrize("kind", ["retnet", "retnet-native", "transformer"])
def test_batched_decode_with_joins_and_leaves_equals_generate(kind):
    """The native step writes the new states over the pool's rows where they are contiguous, and into gathered
    copies where they are not: both must reach the pool."""
    if kind == "retnet-native" and not cpu_kernels.available():
        pytest.skip("no C++ compiler to build the kernels")
    model = tiny_model(kind.removesuffix("-native"))
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (1, 15, 40, 63, 7)]
    want = [greedy(model, p, 10) for p in prompts]  # by the eager step
    if kind == "retnet-native":
        model.config.decode_implementation = "native"
    backend = backend_for(model, max_batch=6)
    assert isinstance(backend, KVCacheBackend if kind == "transformer" else RetNetBackend)
    slots = [4, 0, 2, 5, 1]  # not contiguous: the RetNet pool gathers and scatters rows
    got: dict[int, list[int]] = {}
    with torch.inference_mode():
        for i in range(3):  # three requests start together, in prefill pieces of 9 tokens
            logits = None
            for start in range(0, len(prompts[i]), 9):
                logits = backend.prefill(slots[i], prompts[i][start : start + 9])
            got[i] = [int(logits.argmax())]
        for step in range(9):
            if step == 3:  # request 0 leaves early; 3 and 4 join mid-flight
                del got[0]
                backend.release(slots[0])
                for i in (3, 4):
                    got[i] = [int(backend.prefill(slots[i], prompts[i]).argmax())]
            running = [i for i in got if len(got[i]) < 10]
            logits = backend.decode([slots[i] for i in running], [got[i][-1] for i in running])
            for i, row in zip(running, logits, strict=True):
                got[i].append(int(row.argmax()))
        for i in (3, 4):  # finish the late ones
            while len(got[i]) < 10:
                got[i].append(int(backend.decode([slots[i]], [got[i][-1]])[0].argmax()))
    for i in (1, 2, 3, 4):
        assert got[i] == want[i], f"request {i}"


@pytest.mark.parametrize("kind", ["retnet", "transformer"])
def test_snapshot_restore_and_fork_continue_exactly(kind):
    model = tiny_model(kind)
    prompt = list(range(30, 80))
    backend = backend_for(model, max_batch=3)
    with torch.inference_mode():
        backend.prefill(0, prompt[:20])
        saved = backend.snapshot(0)
        whole = backend.prefill(0, prompt[20:])
        backend.restore(1, saved, 20)
        resumed = backend.prefill(1, prompt[20:])
        backend.fork(1, 2)
        both = backend.decode([1, 2], [7, 7])
    torch.testing.assert_close(resumed, whole, rtol=0, atol=0)
    # the two forked rows sit at different rows of one batched decode: a GEMM may round the rows of a batch
    # differently (edge tiles), which a KV cache's attention shows at the last ulp; RetNet's rows stay bitwise equal
    tolerance = 0 if kind == "retnet" else 1e-5
    torch.testing.assert_close(both[0], both[1], rtol=tolerance, atol=tolerance)
    assert backend.seen == [50, 51, 51]


def test_retnet_state_bytes_do_not_grow_with_the_context():
    backend = backend_for(tiny_model("retnet"), max_batch=2)
    with torch.inference_mode():
        backend.prefill(0, [1] * 10)
        short = backend.state_bytes()
        backend.prefill(0, [1] * 500)
    assert backend.state_bytes() == short == backend.slot_bytes()
