"""generate()'s greedy loop (retentive/models/generation.py) against transformers' own loop, token for token, and
the calls it leaves to transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.generation.streamers import BaseStreamer

from retentive import RetNetConfig, RetNetForCausalLM

V = 64


def small_model(implementation: str) -> RetNetForCausalLM:
    torch.manual_seed(0)
    config = RetNetConfig(vocab_size=V, dim_model=32, num_layers=2, num_heads=2, decode_implementation=implementation)
    return RetNetForCausalLM(config).eval()


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows, two of them left-padded (with id 0)."""
    ids = torch.randint(1, V, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


class Recorder(BaseStreamer):
    """Every tensor a generation puts, and whether it ended."""

    def __init__(self) -> None:
        self.puts, self.ended = [], False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.clone())

    def end(self) -> None:
        self.ended = True


def transformers_loop(model: RetNetForCausalLM, *args, **kwargs) -> torch.Tensor:
    return GenerationMixin.generate(model, *args, **kwargs)


def both(model: RetNetForCausalLM, monkeypatch, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loop's ids (transformers' loop made to fail, so that it cannot have run) and transformers'."""
    with monkeypatch.context() as patch:
        patch.setattr(GenerationMixin, "generate", lambda *a, **k: pytest.fail("transformers' loop ran"))
        ours = model.generate(*args, **kwargs)
    return ours, transformers_loop(model, *args, **kwargs)


IMPLEMENTATIONS = ["eager", pytest.param("native", marks=pytest.mark.native_kernels)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_greedy_loop_equals_transformers_loop(implementation: str, monkeypatch) -> None:
    model = small_model(implementation)
    ids, mask = prompt()
    ours, theirs = both(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=40)
    assert ours.shape == (3, 49) and torch.equal(ours, theirs)
    new = ours[:, 9:]

    # end-of-sequence ids: a row's first one ends it, later tokens are padding; all rows ended: the output stops
    eos = [int(new[0, 2]), int(new[1, 5]), int(new[2, 9])]
    for pad in (None, 0):  # None: transformers pads with the first eos id
        for extra in ({}, {"min_new_tokens": 7}):  # the eos ids held back for 7 tokens
            ours, theirs = both(
                model, monkeypatch, ids, attention_mask=mask, max_new_tokens=40, eos_token_id=eos, pad_token_id=pad,
                **extra,
            )  # fmt: skip
            assert torch.equal(ours, theirs), (pad, extra)
            assert extra or ours.shape[1] < 49  # every row ended before max_new_tokens
    # one eos id as an int, through a generation config
    config = GenerationConfig(max_new_tokens=12, eos_token_id=eos[0], pad_token_id=0)
    ours, theirs = both(model, monkeypatch, ids, config, attention_mask=mask)
    assert torch.equal(ours, theirs)


def test_greedy_loop_infers_the_mask_from_padding_as_transformers_does(monkeypatch) -> None:
    """No attention mask, pad tokens in the prompt: masked by pad_token_id unless that is an eos id too."""
    model = small_model("eager")
    ids, mask = prompt()
    for eos in (None, 0, 5):
        ours, theirs = both(model, monkeypatch, ids, max_new_tokens=8, pad_token_id=0, eos_token_id=eos)
        assert torch.equal(ours, theirs), eos
    masked = transformers_loop(model, ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=8, pad_token_id=0), masked)


def test_greedy_loop_streams_what_transformers_streams() -> None:
    model = small_model("eager")
    ids = prompt()[0]
    ours, theirs = Recorder(), Recorder()
    model.generate(ids[:1], max_new_tokens=6, streamer=ours)
    transformers_loop(model, ids[:1], max_new_tokens=6, streamer=theirs)
    assert ours.ended and theirs.ended and len(ours.puts) == len(theirs.puts) == 7
    assert all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts, strict=True))


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": True, "top_k": 5},
        {"num_beams": 2},
        {"return_dict_in_generate": True},
        {"max_length": 14},  # no max_new_tokens: transformers' default length rules
        {"repetition_penalty": 1.3},
        {"logits_processor": []},
        {"output_scores": True, "return_dict_in_generate": True},
    ],
)
def test_everything_else_runs_transformers_loop(options: dict, monkeypatch) -> None:
    model = small_model("eager")
    ids, mask = prompt()
    calls = []
    original = GenerationMixin.generate
    monkeypatch.setattr(GenerationMixin, "generate", lambda *a, **k: calls.append(k) or original(*a, **k))
    options = {"max_new_tokens": 4} | options if "max_length" not in options else options
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=mask, **options)
    assert len(calls) == 1
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    assert sequences.shape[0] == 3


def test_greedy_loop_runs_the_forward_where_hooks_watch_it(monkeypatch) -> None:
    """With a forward hook on the model, every step goes through the forward, as in transformers' loop."""
    model = small_model("eager")
    ids, mask = prompt()
    calls = []
    model.register_forward_hook(lambda module, args, output: calls.append(output.logits.shape))
    ours, theirs = both(model, monkeypatch, ids, attention_mask=mask, max_new_tokens=5)
    assert torch.equal(ours, theirs)
    assert calls[:5] == calls[5:] and len(calls) == 10  # prefill and 4 steps, in each loop
