"""RetNetForCausalLM: the three forms, the cache, generate() (greedy, sampling, beams, padding), save/load, errors."""

from __future__ import annotations

import json
import logging as std_logging
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from retentive import MultiScaleRetention, RetNetConfig, RetNetForCausalLM
from retentive.models import CACHE_NAME, RetNetCache, cache_of

logging.disable_progress_bar()
V = 64  # vocabulary of the test models


def small_config(**overrides) -> RetNetConfig:
    fields = dict(vocab_size=V, dim_model=32, num_layers=2, num_heads=4, ffn_dim=64, chunk_size=4)
    return RetNetConfig(**{**fields, **overrides})


def small_model(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> RetNetForCausalLM:
    torch.manual_seed(seed)
    return RetNetForCausalLM(small_config(**overrides)).to(dtype).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one thread is faster, and far faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> RetNetForCausalLM:
    return small_model()


def prompts(lengths: list[int], seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (1, n), generator=g) for n in lengths]


def left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, each row padded on the left."""
    T = max(r.shape[1] for r in rows)
    ids = torch.stack([F.pad(r[0], (T - r.shape[1], 0), value=pad) for r in rows])
    mask = torch.stack([F.pad(torch.ones(r.shape[1], dtype=torch.long), (T - r.shape[1], 0)) for r in rows])
    return ids, mask


# --- initialization ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_head_start_at_std_d_to_the_minus_half_and_logits_near_unit_variance(tied: bool) -> None:
    cfg = RetNetConfig.from_preset("retnet-tiny", vocab_size=2048, dim_model=128, tie_word_embeddings=tied)
    model = RetNetForCausalLM(cfg)
    for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
        assert weight.std().item() == pytest.approx(128**-0.5, rel=0.02)
    assert model.model.retnet.blocks[0].ffn.up.weight.std().item() == pytest.approx(cfg.initializer_range, rel=0.05)
    with torch.no_grad():
        logits = model(torch.randint(0, 2048, (2, 64))).logits
    assert 0.5 < logits.std().item() < 2  # the final LayerNorm's unit features against a d^-1/2 head
    custom = RetNetForCausalLM(RetNetConfig.from_preset("retnet-tiny", vocab_size=512, embedding_init_std=0.02))
    assert custom.get_input_embeddings().weight.std().item() == pytest.approx(0.02, rel=0.05)
    with pytest.raises(ValueError, match="embedding_init_std"):
        RetNetConfig(embedding_init_std=0.0)


# --- forward: loss and the three forms --------------------------------------------------------------------------


def test_loss_is_the_shifted_cross_entropy_ignoring_minus_100(model: RetNetForCausalLM) -> None:
    ids = prompts([9])[0].repeat(2, 1)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    assert cache_of(out) is None  # scoring needs no state
    logp = out.logits.log_softmax(-1)[:, :-1]  # (B, T-1, V): position t predicts t + 1
    keep = labels[:, 1:] != -100
    nll = -logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    torch.testing.assert_close(out.loss, nll[keep].mean())


def test_training_mode_loss_skips_the_logits_and_keeps_loss_and_gradients() -> None:
    """In training mode with labels, the output layer and the loss run block by block (linear_cross_entropy):
    no logits come back, and the loss and every parameter's gradient are those of the logits path."""
    ids = prompts([13])[0].repeat(3, 1)
    labels = ids.clone()
    labels[1, :5] = -100
    losses, grads = {}, {}
    for skip in (False, True):
        model = small_model().train()  # dropout 0: training mode changes nothing else
        out = model(ids, labels=labels, skip_logits=None if skip else False)
        assert (out.logits is None) == skip
        out.loss.backward()
        losses[skip], grads[skip] = out.loss, {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-12, atol=1e-12)
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    with pytest.raises(ValueError, match="skip_logits=True leaves only the loss"):
        small_model()(ids, skip_logits=True)


@settings(max_examples=8, deadline=None)
@given(length=st.integers(1, 23), chunk_size=st.integers(1, 9), normalize=st.booleans())
def test_recurrent_chunkwise_parallel_logits_agree(length: int, chunk_size: int, normalize: bool) -> None:
    model = small_model(normalize_attn=normalize, normalize_retn=normalize)
    ids = prompts([length], seed=length)[0]
    parallel = model(ids, mode="parallel", use_cache=False).logits
    chunkwise = model(ids, mode="chunkwise", chunk_size=chunk_size, use_cache=False).logits
    recurrent = model(ids, mode="recurrent", use_cache=False).logits
    torch.testing.assert_close(chunkwise, parallel, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(recurrent, parallel, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_embedding_scale_and_norm_in_every_form_and_in_cached_decoding(norm: str) -> None:
    """torchscale's sqrt(d) embedding scale and embedding norm: x = N(sqrt(d) E[ids]) before the blocks."""
    model = small_model(scale_embedding=True, embed_norm=True, norm=norm, normalize_attn=True, normalize_retn=True)
    ids = prompts([19])[0]
    want = model(ids, mode="parallel", use_cache=False).logits
    for form in ({"mode": "chunkwise", "chunk_size": 5}, {"mode": "recurrent"}):
        torch.testing.assert_close(model(ids, use_cache=False, **form).logits, want, rtol=1e-10, atol=1e-10)
    out = model(ids[:, :11])
    steps = [model(ids[:, t : t + 1], cache=cache_of(out)).logits for t in range(11, 19)]
    torch.testing.assert_close(torch.cat(steps, dim=1), want[:, 11:], rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        x = model.model.embed_norm(model.model.embed_tokens(ids) * 32**0.5)
        hidden = model.model.retnet(x, mode="parallel")
    torch.testing.assert_close(model.lm_head(hidden), want, rtol=1e-12, atol=1e-12)


def test_float32_forms_agree_within_float32_tolerance() -> None:
    model = small_model(torch.float32)
    ids = prompts([50])[0]
    parallel = model(ids, mode="parallel", use_cache=False).logits
    for mode in ("chunkwise", "recurrent"):
        torch.testing.assert_close(model(ids, mode=mode, use_cache=False).logits, parallel, rtol=1e-4, atol=1e-4)


def test_bfloat16_model_keeps_a_float32_state_and_follows_the_float32_model() -> None:
    model = small_model(torch.float32)
    half = small_model(torch.float32).to(torch.bfloat16)
    ids = prompts([40])[0]
    want = model(ids, use_cache=False).logits
    out = half(ids, use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(s.S.dtype == s.z.dtype == torch.float32 for s in cache_of(out).states)
    torch.testing.assert_close(out.logits.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    step = half(ids[:, :1], cache=cache_of(out)).logits
    assert step.dtype == torch.bfloat16 and bool(step.isfinite().all())


def test_prefill_then_cached_steps_equal_the_full_forward_with_left_padding(model: RetNetForCausalLM) -> None:
    rows = prompts([11, 4, 8])
    ids, mask = left_pad(rows)
    cont = prompts([5, 5, 5], seed=7)
    out = model(ids, attention_mask=mask, use_cache=True)
    steps = [out.logits[:, -1]]
    for t in range(5):
        tok = torch.cat([c[:, t] for c in cont])[:, None]  # (B, 1)
        steps.append(model(tok, cache=cache_of(out)).logits[:, -1])
    for b, row in enumerate(rows):
        full = model(torch.cat([row, cont[b]], dim=1), use_cache=False).logits[0, row.shape[1] - 1 :]
        torch.testing.assert_close(torch.stack([s[b] for s in steps]), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_right_padding_changes_no_real_token_and_fills_no_cache(model: RetNetForCausalLM, mode: str) -> None:
    """Right padding, as transformers' collators and TRL's trainers pad by default: no real token's logits change,
    the loss over labels that ignore the padding is the rows' own, and no cache continues from the padding."""
    rows = prompts([6, 11, 3])
    ids = torch.stack([F.pad(r[0], (0, 11 - r.shape[1]), value=0) for r in rows])
    mask = (torch.arange(11) < torch.tensor([[6], [11], [3]])).long()  # (B, T) ones, then zeros
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels, mode=mode)
    assert cache_of(out) is None
    for b, row in enumerate(rows):
        n = row.shape[1]
        torch.testing.assert_close(out.logits[b, :n], model(row).logits[0], rtol=1e-9, atol=1e-9)
    own = [F.cross_entropy(model(r).logits[0, :-1], r[0, 1:], reduction="sum") for r in rows]
    torch.testing.assert_close(out.loss, sum(own) / sum(r.shape[1] - 1 for r in rows))
    with torch.no_grad():
        assert cache_of(model(ids, attention_mask=mask)) is None  # eval: use_cache defaults to False here
        for call in (
            lambda: model(ids, attention_mask=mask, use_cache=True),
            lambda: model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False),
        ):
            with pytest.raises(ValueError, match=r"pads on the right.*padding_side = 'left'"):
                call()


@pytest.mark.parametrize("mode", ["parallel", "chunkwise", "recurrent"])
def test_documents_packed_into_a_row_are_each_read_on_their_own(mode: str) -> None:
    """transformers' DataCollatorWithFlattening packs documents into one row, position_ids restarting at 0 at each:
    every document's logits, loss and gradients are those it has alone, in every form; without the position_ids
    the same row reads one document into the next."""
    from transformers import DataCollatorWithFlattening

    model = small_model().train()
    docs = [row[0].tolist() for row in prompts([5, 9, 3, 7, 1], seed=4)]
    batch = DataCollatorWithFlattening()([{"input_ids": d, "labels": d} for d in docs])
    assert batch["position_ids"].shape == (1, 25) and "attention_mask" not in batch
    packed = model(**batch, mode=mode).loss
    packed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    own = sum(model(torch.tensor([d]), labels=torch.tensor([d]), mode=mode).loss * (len(d) - 1) for d in docs[:-1])
    own = own / sum(len(d) - 1 for d in docs)  # the 1-token document has no target
    own.backward()
    torch.testing.assert_close(packed, own, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)

    model.eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], position_ids=batch["position_ids"], mode=mode).logits[0]
        alone = torch.cat([model(torch.tensor([d]), mode=mode).logits[0] for d in docs])
        torch.testing.assert_close(logits, alone, rtol=1e-9, atol=1e-9)
        read_on = model(batch["input_ids"], mode=mode).logits[0]
        assert not torch.allclose(read_on[5:], alone[5:])  # the second document onwards read the first


@torch.no_grad()
def test_the_collators_other_document_markers_read_as_position_ids(model: RetNetForCausalLM) -> None:
    """DataCollatorWithFlattening's seq_idx (return_seq_idx) and FlashAttention's cu_seq_lens_q/k and max_length_q/k
    (return_flash_attn_kwargs) mark the same documents as its position_ids: each alone, or all together, gives the
    logits of the documents alone."""
    from transformers import DataCollatorWithFlattening

    docs = [row[0].tolist() for row in prompts([5, 9, 3, 7, 1], seed=4)]
    collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)
    batch = collate([{"input_ids": d} for d in docs])
    assert {"position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"} <= set(batch)
    alone = torch.cat([model(torch.tensor([d])).logits[0] for d in docs])
    flash = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    for markers in ({k: v for k, v in batch.items() if k != "input_ids"}, {"seq_idx": batch["seq_idx"]}, flash):
        torch.testing.assert_close(model(batch["input_ids"], **markers).logits[0], alone, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(model(batch["input_ids"]).logits[0], alone)


@torch.no_grad()
def test_document_markers_that_disagree_or_cannot_be_read_are_refused(model: RetNetForCausalLM) -> None:
    ids = torch.cat(prompts([6, 6]))  # (2, 6)
    cu = torch.tensor([0, 3, 6, 12], dtype=torch.int32)  # rows of 3 + 3 and 6 tokens
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, 2]])
    for flash in ({"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, {"cu_seq_lens_q": cu}):
        torch.testing.assert_close(model(ids, **flash).logits, model(ids, seq_idx=seq_idx).logits, rtol=0, atol=0)
    left, mask = left_pad(prompts([3, 6]))
    for kwargs, match in (
        ({"seq_idx": seq_idx, "position_ids": torch.arange(6).expand(2, 6)}, "position_ids and seq_idx mark different"),
        ({"seq_idx": seq_idx[:, :5]}, r"seq_idx must be a \(2, 6\) tensor of each token's document"),
        ({"seq_idx": seq_idx.float()}, "seq_idx must be"),
        ({"cu_seq_lens_k": cu}, "cu_seq_lens_k needs cu_seq_lens_q, and must equal it"),
        ({"cu_seq_lens_q": cu, "cu_seq_lens_k": torch.tensor([0, 6, 12])}, "cu_seq_lens_k needs cu_seq_lens_q"),
        ({"cu_seq_lens_q": cu[:-1], "cu_seq_lens_k": cu[:-1]}, "rise from 0 to batch x length = 12"),
        ({"cu_seq_lens_q": torch.tensor([0, 4, 12]), "cu_seq_lens_k": torch.tensor([0, 4, 12])}, "across two rows"),
    ):
        with pytest.raises(ValueError, match=match):
            model(ids, **kwargs)
    with pytest.raises(ValueError, match="take no cache and no padding"):
        model(left, attention_mask=mask, seq_idx=seq_idx)
    with pytest.raises(ValueError, match=r"seq_idx pack several documents .* use_cache=False"):
        model(ids, seq_idx=seq_idx, use_cache=True)


@torch.no_grad()
def test_position_ids_that_say_anything_but_where_documents_start_are_refused(model: RetNetForCausalLM) -> None:
    ids = torch.cat(prompts([6, 6]))
    torch.testing.assert_close(model(ids, position_ids=torch.arange(6).expand(2, 6)).logits, model(ids).logits)
    left, mask = left_pad(prompts([3, 6]))  # transformers' positions with left padding: the pads' are anything
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    torch.testing.assert_close(
        model(left, attention_mask=mask, position_ids=positions).logits, model(left, attention_mask=mask).logits
    )
    for bad, match in (
        (torch.arange(1, 7).expand(2, 6), "count 0, 1, 2"),  # shifted
        (torch.tensor([[0, 1, 3, 4, 5, 6]] * 2), "count 0, 1, 2"),  # a skip
        (torch.zeros(2, 6), "integer positions"),
        (torch.arange(5).expand(2, 5), "shaped like input_ids"),
    ):
        with pytest.raises(ValueError, match=match):
            model(ids, position_ids=bad)
    with pytest.raises(ValueError, match="take no padding"):
        model(left, attention_mask=mask, position_ids=torch.tensor([[0, 0, 0, 1, 0, 1], [0, 1, 2, 0, 1, 2]]))
    packing = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    with pytest.raises(ValueError, match="a cache holds one stream per row"):
        model(ids, position_ids=packing, use_cache=True)
    assert cache_of(model(ids, position_ids=packing)) is None  # eval: use_cache defaults to False here
    cache = cache_of(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="continue from the cache"):
        model(ids, cache=cache, position_ids=torch.arange(6).expand(2, 6))


@torch.no_grad()
def test_hidden_states_are_every_blocks_input_and_the_final_output_in_every_form() -> None:
    """transformers' convention: num_layers + 1 tensors, the embeddings first, each block's output, the normalized
    output last (what the head reads); the same in every form, filled into a cache piece by piece, and step by step
    through generate()."""
    model = small_model(num_layers=3, prefill_chunk=8)  # a cache fills 8 tokens at a time
    ids = torch.cat(prompts([19, 19]))
    blocks = []
    hooks = [b.register_forward_hook(lambda _m, _a, out: blocks.append(out)) for b in model.model.retnet.blocks]
    out = model(ids, output_hidden_states=True, use_cache=False, mode="parallel")
    for hook in hooks:
        hook.remove()
    hidden = out.hidden_states
    assert len(hidden) == 4 and all(h.shape == (2, 19, 32) for h in hidden)
    torch.testing.assert_close(hidden[0], model.model.embed_tokens(ids))
    for h, block_output in zip(hidden[1:-1], blocks[:-1], strict=True):
        torch.testing.assert_close(h, block_output)
    torch.testing.assert_close(model.lm_head(hidden[-1]), out.logits)
    for mode, use_cache in (("chunkwise", False), ("recurrent", False), (None, True)):
        other = model(ids, output_hidden_states=True, use_cache=use_cache, mode=mode)
        torch.testing.assert_close(other.hidden_states, hidden, rtol=1e-9, atol=1e-9)
    logits, cache, as_tuple = model(ids, output_hidden_states=True, use_cache=True, return_dict=False)
    assert logits.shape == (2, 19, V) and isinstance(cache, RetNetCache)
    torch.testing.assert_close(as_tuple, hidden, rtol=1e-9, atol=1e-9)
    assert model(ids).hidden_states is None  # config.output_hidden_states (False) by default

    prompt, new = ids[:, :12], 7
    gen = model.generate(
        prompt, max_new_tokens=new, do_sample=False, output_hidden_states=True, return_dict_in_generate=True
    )
    assert torch.equal(gen.sequences, model.generate(prompt, max_new_tokens=new, do_sample=False))
    whole = model(gen.sequences[:, :-1], output_hidden_states=True, use_cache=False).hidden_states
    steps = [torch.cat(layer, dim=1) for layer in zip(*gen.hidden_states, strict=True)]  # per layer (B, T - 1, d)
    torch.testing.assert_close(steps, list(whole), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("normalize", [False, True])
def test_long_prompts_are_prefilled_piece_by_piece_with_the_same_result(normalize: bool) -> None:
    """A cache is filled prefill_chunk tokens at a time (whole chunks), padding longer than a piece included: the
    last logits, the states and what generate() picks are those of the prompt in one call."""
    norms = dict(normalize_attn=normalize, normalize_retn=normalize)
    pieces = small_model(prefill_chunk=9, **norms)  # 9 -> pieces of 8 tokens (whole chunks of 4)
    whole = small_model(prefill_chunk=10**6, **norms)
    rows = prompts([30, 7, 19], seed=3)
    ids, mask = left_pad(rows)  # row 1 has 23 pad tokens: three whole pieces of padding
    calls = []
    forward = MultiScaleRetention.forward

    def spy(self, x, *args, **kwargs):
        calls.append(x.shape[1])
        return forward(self, x, *args, **kwargs)

    with mock.patch.object(MultiScaleRetention, "forward", spy):
        got = pieces(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    assert calls == [8, 8] * 3 + [6, 6]  # 2 layers per piece
    want = whole(ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(got.logits[:, -1], want.logits[:, -1], rtol=1e-9, atol=1e-9)
    for a, b in zip(cache_of(got).states, cache_of(want).states, strict=True):
        torch.testing.assert_close((a.S, a.z, a.offset), (b.S, b.z, b.offset), rtol=1e-9, atol=1e-9)
    assert cache_of(got).get_seq_length() == 30
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pieces.generate(ids, **kw), whole.generate(ids, **kw))
    assert pieces.model(ids, use_cache=True, hidden_to_keep=3).last_hidden_state.shape == (3, 3, 32)


@pytest.mark.slow
def test_prefill_memory_does_not_grow_with_the_prompt() -> None:
    """Peak RSS of generate() after 1k and 24k-token prompts (retnet-tiny, a fresh process each): within 10%.
    The prompt in one call needed ~1.35x here (the activations of every token at once)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "prefill_memory.py"
    out = subprocess.run(
        [sys.executable, str(script), "--lengths", "1024", "24576", "--threads", "1", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    short, long = (row["peak_rss_bytes"] for row in json.loads(out))
    assert long < 1.1 * short, f"peak RSS {short / 2**20:.0f} MiB at 1k tokens, {long / 2**20:.0f} MiB at 24k"


# --- the cache --------------------------------------------------------------------------------------------------


def test_cache_size_does_not_depend_on_length() -> None:
    model = small_model(torch.float32)
    ids = prompts([10])[0]
    after_10 = cache_of(model(ids))
    out = model.generate(ids, max_new_tokens=990, min_new_tokens=990, do_sample=False, return_dict_in_generate=True)
    after_1000 = cache_of(out)
    assert out.sequences.shape[1] == after_1000.get_seq_length() + 1 == 1000  # the last token is not read yet
    assert isinstance(after_1000, RetNetCache) and len(after_1000) == 2
    assert after_10.nbytes() == after_1000.nbytes() > 0


def test_cache_rejects_rollback_and_other_caches(model: RetNetForCausalLM) -> None:
    cache = cache_of(model(prompts([3])[0]))
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)
    with pytest.raises(TypeError, match="RetNetCache"):
        model(prompts([3])[0], cache=object())


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_takes_the_cache_under_its_current_and_its_older_name(model: RetNetForCausalLM, name: str) -> None:
    """transformers 5.24 renamed past_key_values to cache; users and older code still pass the old name."""
    ids = prompts([9])[0]
    full = model(ids, use_cache=False).logits[:, -1]
    prefix = cache_of(model(ids[:, :-1], use_cache=True))
    step = model(ids[:, -1:], **{name: prefix})
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-9, atol=1e-9)
    assert cache_of(step) is prefix and prefix.get_seq_length() == 9  # updated in place, returned under CACHE_NAME
    with pytest.raises(TypeError, match="given twice"):
        model(ids[:, -1:], cache=prefix, past_key_values=prefix)


def test_generate_logs_no_deprecation_warning(model: RetNetForCausalLM) -> None:
    """The demo's output stays clean: nothing in the generation path uses a name transformers deprecates."""
    said = []
    record = lambda _logger, *args, **kwargs: said.append(str(args))  # transformers' warning_once is memoized
    with (
        mock.patch.object(std_logging.Logger, "warning_once", record, create=True),
        mock.patch.object(std_logging.Logger, "warning", record),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        out = model.generate(prompts([6])[0], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    said += [str(w.message) for w in caught]
    assert isinstance(cache_of(out), RetNetCache)
    assert not [m for m in said if "deprecat" in m.lower()], said


# --- generate() -------------------------------------------------------------------------------------------------


def test_greedy_generate_equals_the_parallel_argmax_at_every_step(model: RetNetForCausalLM) -> None:
    prompt = prompts([7])[0]
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    seq = out.sequences
    assert seq.shape == (1, 19)
    parallel = model(seq, mode="parallel", use_cache=False).logits[0, 6:-1]  # (12, V): the logits behind each new token
    assert torch.equal(parallel.argmax(-1), seq[0, 7:])
    torch.testing.assert_close(torch.cat(out.logits), parallel.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_decoding_steps_get_the_inputs_transformers_would_prepare(padded: bool) -> None:
    """The short way of prepare_inputs_for_generation builds, at every decoding step of transformers' loop (which
    runs everything but plain greedy search), what transformers' general method builds (the same keys in any order,
    the same tensors with the same strides, the same cache)."""
    model = small_model()
    ids, mask = left_pad(prompts([3, 6])) if padded else (torch.cat(prompts([5, 5])), None)
    short, general, steps = model.prepare_inputs_for_generation, GenerationMixin.prepare_inputs_for_generation, []

    def compare(input_ids: torch.Tensor, next_sequence_length: int | None = None, **kwargs) -> dict:
        got = short(input_ids, next_sequence_length=next_sequence_length, **kwargs)
        want = general(model, input_ids, next_sequence_length=next_sequence_length, **kwargs)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(got[key], value) and got[key].stride() == value.stride(), key
            else:
                assert got[key] is value or got[key] == value, key
        steps.append(next_sequence_length)
        return got

    def counted(self, input_ids: torch.Tensor, **kwargs) -> dict:
        went_general.append(kwargs.get("next_sequence_length"))
        return general(self, input_ids, **kwargs)

    went_general = []
    with (
        mock.patch.object(model, "prepare_inputs_for_generation", compare),
        mock.patch.object(GenerationMixin, "prepare_inputs_for_generation", counted),
    ):
        GenerationMixin.generate(model, ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert steps == [None, 1, 1, 1] and went_general == [None]  # only the prompt goes the general way


def test_a_decoding_step_returns_what_the_output_constructor_builds(model: RetNetForCausalLM) -> None:
    """A decoding step builds its CausalLMOutputWithPast without the constructor (step_output): the same items,
    attributes, tuple, keys and pickled form as the constructor's, for return_dict True and False."""
    with torch.no_grad():
        cache = cache_of(model(prompts([5])[0], use_cache=True))
        token = torch.tensor([[3]])
        got = model(token, cache=RetNetCache(cache.states, 5), use_cache=True)
        plain = model(token, cache=RetNetCache(cache.states, 5), use_cache=True, return_dict=False)
    want = CausalLMOutputWithPast(logits=got.logits, **{CACHE_NAME: cache_of(got)})
    assert type(got) is CausalLMOutputWithPast and list(got.items()) == list(want.items())
    assert vars(got) == vars(want) and got.to_tuple() == want.to_tuple() and got[0] is got["logits"] is got.logits
    assert got.loss is None and got.get(CACHE_NAME) is cache_of(got) and CACHE_NAME in got
    assert list(pickle.loads(pickle.dumps(got)).keys()) == ["logits", CACHE_NAME]
    assert len(plain) == 2 and torch.equal(plain[0], got.logits) and isinstance(plain[1], RetNetCache)


def test_generate_prefills_in_the_chunkwise_form_then_steps_recurrently(model: RetNetForCausalLM) -> None:
    calls = []
    forward, step = MultiScaleRetention.forward, MultiScaleRetention.decode_step

    def spy_forward(self, x, *args, **kwargs):
        calls.append((kwargs["form"].mode, kwargs["form"].chunk_size, x.shape[1]))
        return forward(self, x, *args, **kwargs)

    def spy_step(self, x, *args):
        calls.append(("recurrent step", x.shape[1]))
        return step(self, x, *args)

    with (
        mock.patch.object(MultiScaleRetention, "forward", spy_forward),
        mock.patch.object(MultiScaleRetention, "decode_step", spy_step),
    ):
        model.generate(prompts([10])[0], max_new_tokens=3, do_sample=False)
    chunk = model.config.chunk_size
    assert calls == [("chunkwise", chunk, 10)] * 2 + [("recurrent step", 1)] * 4  # 2 layers; token 3 is never read


def test_generation_continues_from_its_returned_cache(model: RetNetForCausalLM) -> None:
    prompt = prompts([7], seed=5)[0]
    whole = model.generate(prompt, max_new_tokens=12, do_sample=False)
    first = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert cache_of(first).get_seq_length() == 11  # the last generated token is not read yet
    rest = model.generate(first.sequences, **{CACHE_NAME: cache_of(first)}, max_new_tokens=7, do_sample=False)
    assert torch.equal(rest, whole)


def test_generation_stops_at_eos_and_max_length(model: RetNetForCausalLM) -> None:
    prompt = prompts([5])[0]
    free = model.generate(prompt, max_new_tokens=8, do_sample=False)
    eos = int(free[0, 8])  # the 4th generated token
    stopped = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    first = (free[0, 5:] == eos).nonzero()[0, 0]
    assert torch.equal(stopped[0], free[0, : 5 + first + 1])
    assert model.generate(prompt, max_length=9, do_sample=False).shape == (1, 9)


def test_repetition_penalty_picks_the_penalized_parallel_argmax(model: RetNetForCausalLM) -> None:
    """Each token is the argmax of the parallel form's logits with every token seen so far penalized."""
    prompt, penalty = prompts([6])[0], 3.0
    seq = model.generate(prompt, max_new_tokens=12, do_sample=False, repetition_penalty=penalty)[0]
    assert not torch.equal(seq, model.generate(prompt, max_new_tokens=12, do_sample=False)[0])  # it matters here
    logits = model(seq[None], use_cache=False).logits[0]  # (T, V)
    for t in range(6, len(seq)):
        score = logits[t - 1].clone()
        seen = seq[:t].unique()
        score[seen] = torch.where(score[seen] < 0, score[seen] * penalty, score[seen] / penalty)
        assert score.argmax() == seq[t]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model: RetNetForCausalLM) -> None:
    prompt = prompts([6])[0]
    kw = dict(max_new_tokens=15, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    a = model.generate(prompt, **kw)
    torch.manual_seed(3)
    b = model.generate(prompt, **kw)
    assert torch.equal(a, b)
    greedy = model.generate(prompt, max_new_tokens=15, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=1), greedy)


def test_batched_left_padded_greedy_equals_one_by_one(model: RetNetForCausalLM) -> None:
    rows = prompts([3, 9, 6, 1])
    ids, mask = left_pad(rows)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    uncached = model.generate(
        ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False
    )
    assert torch.equal(uncached, batch)  # the parallel form over the whole sequence at every step
    for b, row in enumerate(rows):
        alone = model.generate(row, max_new_tokens=10, do_sample=False)
        assert torch.equal(batch[b, ids.shape[1] :], alone[0, row.shape[1] :])


def test_batched_left_padded_sampling_gives_each_row_its_own_distribution(model: RetNetForCausalLM) -> None:
    """Sampled tokens depend on the batch's random draws, so compare what each row is sampled FROM."""
    rows = prompts([2, 8, 5])
    ids, mask = left_pad(rows)
    torch.manual_seed(0)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=10, temperature=0.7,
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    logits = torch.stack(out.logits, dim=1)  # (B, 8, V)
    for b, row in enumerate(rows):
        seq = torch.cat([row, out.sequences[b : b + 1, ids.shape[1] :]], dim=1)
        alone = model(seq, use_cache=False).logits[0, row.shape[1] - 1 : -1]  # (8, V)
        torch.testing.assert_close(logits[b], alone.float(), rtol=1e-5, atol=1e-5)


def test_beam_search_shapes_and_scores_match_the_parallel_form(model: RetNetForCausalLM) -> None:
    prompt = prompts([2, 5])
    ids, mask = left_pad(prompt)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, num_beams=4, num_return_sequences=3, do_sample=False,
        length_penalty=0.0, pad_token_id=0, return_dict_in_generate=True, output_scores=True,
    )  # fmt: skip
    assert out.sequences.shape == (6, ids.shape[1] + 6)
    assert out.sequences_scores.shape == (6,)
    for i, seq in enumerate(out.sequences):
        row = prompt[i // 3]
        full = torch.cat([row[0], seq[ids.shape[1] :]])[None]
        logp = model(full, use_cache=False).logits.log_softmax(-1)[0, row.shape[1] - 1 : -1]  # (6, V)
        want = logp.gather(-1, full[0, row.shape[1] :, None]).sum()  # the sum of log-probs of the new tokens
        torch.testing.assert_close(out.sequences_scores[i], want.float(), rtol=1e-5, atol=1e-5)
    scores = out.sequences_scores.view(2, 3)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())  # best beam first
    for group in out.sequences.view(2, 3, -1):  # the returned beams of one prompt are distinct
        assert len({tuple(s.tolist()) for s in group}) == 3


# --- training ---------------------------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch() -> None:
    model = small_model(torch.float32, dim_model=64).train()
    ids = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = model(ids, labels=ids).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and loss.item() < 0.05, (first, loss.item())


# --- save / load ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tie: bool) -> None:
    model = small_model(torch.float32, tie_word_embeddings=tie)
    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # differs from a fresh init, and from the embedding when untied
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RetNetForCausalLM)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    ids = prompts([13])[0]
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_missing_or_corrupt_checkpoint_names_the_file(tmp_path) -> None:
    small_model(torch.float32).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=re.escape(str(weights))):
        RetNetForCausalLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(weights))):
        RetNetForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        RetNetForCausalLM.from_pretrained(tmp_path / "no-such-run")


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [5, 300])  # read back whole, and through a reduction (over 256 ids)
@pytest.mark.parametrize("bad_id", [-1, V, V + 100])
def test_token_ids_outside_the_vocabulary_are_refused(model: RetNetForCausalLM, bad_id: int, length: int) -> None:
    ids = prompts([length])[0]
    ids[0, 2] = bad_id
    with pytest.raises(ValueError, match=f"token id {bad_id}, outside the vocabulary"):
        model(ids)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate(ids, max_new_tokens=2)
    with torch.no_grad():  # one decoding step after a cache: the short way checks too
        cache = cache_of(model(ids[:, :2], use_cache=True))
        with pytest.raises(ValueError, match=f"token id {bad_id}, outside the vocabulary"):
            model(ids[:, 2:3], cache=cache, use_cache=True)


def test_empty_and_malformed_input_is_refused(model: RetNetForCausalLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="batch, length"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="left padding"):
        model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 0, 1]]))


def test_training_after_inference_mode_generation():
    """Decoding under torch.inference_mode first fills the decay and rotary caches; a training step after it must
    find tensors that autograd can save (inference tensors cannot be)."""
    from retentive.ops.decay import _cached_log_gamma
    from retentive.ops.rotary import rotary_angles

    _cached_log_gamma.cache_clear()
    rotary_angles.cache_clear()
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=64, dim_model=32, num_layers=1, num_heads=2))
    ids = torch.randint(0, 64, (1, 12))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2)
    model.train()
    model(ids, labels=ids, mode="chunkwise").loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("skip_logits", [True, False])
def test_num_items_in_batch_weighs_every_token_of_an_accumulated_step_alike(skip_logits: bool) -> None:
    """transformers' Trainer passes the targets of the whole optimizer step (``num_items_in_batch``): micro-batches
    with different shares of ignored labels, each loss summed over that count, add up to the loss and gradients of
    the whole batch's mean; a micro-batch with every label ignored adds nothing (not NaN)."""
    torch.manual_seed(0)
    model = RetNetForCausalLM(RetNetConfig(vocab_size=V, dim_model=16, num_layers=2, num_heads=2)).double().train()
    ids = torch.randint(0, V, (6, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :9] = labels[2, 4:] = -100
    labels[4:] = -100  # the last micro-batch: nothing to score
    params = list(model.parameters())
    whole = model(input_ids=ids, labels=labels, skip_logits=skip_logits).loss
    want = torch.autograd.grad(whole, params)
    count = (labels[:, 1:] != -100).sum()
    losses, got = [], [torch.zeros_like(p) for p in params]
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6)):
        loss = model(input_ids=ids[rows], labels=labels[rows], skip_logits=skip_logits, num_items_in_batch=count).loss
        losses.append(loss)
        for total, g in zip(got, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            total += 0 if g is None else g
    assert losses[-1] == 0
    torch.testing.assert_close(sum(losses), whole, rtol=1e-12, atol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
