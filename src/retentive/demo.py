"""``retentive demo``: train retnet-tiny on Shakespeare in a few CPU minutes, then show what retention buys.

1. train a byte-level BPE (4,096 tokens) and ``retnet-tiny`` on the Shakespeare corpus, within a time budget;
2. report validation perplexity beside the unigram perplexity of the same tokens;
3. sample from the model: the prompt is prefilled in the chunkwise form, each new token is one recurrent step;
4. check that the parallel, chunkwise and recurrent forms pick the same greedy tokens;
5. time one recurrent decode step at growing context: it stays flat, and the state keeps one size.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .models import RetNetConfig, RetNetForCausalLM, cache_of
from .streamer import TokenStreamer
from .training import TrainConfig
from .training.lm import LMConfig, train_language_model, unigram_perplexity

PROMPT = "ROMEO.\n"


def calibrate_steps(lm: LMConfig, seconds: float, probe_steps: int = 3) -> tuple[int, float]:
    """How many optimizer steps of ``lm``'s model fit in ``seconds`` on this machine (timed on random tokens).

    Returns:
        (steps, seconds per step).
    """
    model = RetNetForCausalLM(RetNetConfig.from_preset(lm.preset, vocab_size=lm.vocab_size))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, lm.vocab_size, (lm.batch_size, lm.seq_len + 1))
    model(x, labels=x).loss.backward()  # the first step pays one-time costs: not timed
    t0 = time.perf_counter()
    for _ in range(probe_steps):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    per_step = (time.perf_counter() - t0) / probe_steps
    return max(20, int(seconds / per_step)), per_step


@torch.no_grad()
def greedy_by_form(model: RetNetForCausalLM, prompt: torch.Tensor, new_tokens: int, chunk_size: int = 16):
    """Greedy continuations of ``prompt`` (1, T0) computed three ways.

    - parallel: the whole sequence re-encoded in the parallel form for every new token;
    - chunkwise: the same in the chunkwise form (``chunk_size``);
    - recurrent: the prompt fed one token at a time into the state, then one recurrent step per token.

    Returns:
        {form: list of new token ids}, and the largest |logit difference| from the parallel form.
    """
    out: dict[str, list[int]] = {}
    last_logits: dict[str, list[torch.Tensor]] = {}
    for mode in ("parallel", "chunkwise"):
        ids = prompt
        out[mode], last_logits[mode] = [], []
        for _ in range(new_tokens):
            logits = model(ids, mode=mode, chunk_size=chunk_size, use_cache=False).logits[:, -1]  # (1, V)
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
            out[mode].append(int(nxt))
            last_logits[mode].append(logits)
            ids = torch.cat([ids, nxt], dim=1)
    cache, logits = None, None
    for t in range(prompt.shape[1]):
        step = model(prompt[:, t : t + 1], cache=cache, use_cache=True, mode="recurrent")
        cache, logits = cache_of(step), step.logits[:, -1]
    out["recurrent"], last_logits["recurrent"] = [], []
    for _ in range(new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        out["recurrent"].append(int(nxt))
        last_logits["recurrent"].append(logits)
        step = model(nxt, cache=cache, use_cache=True, mode="recurrent")
        cache, logits = cache_of(step), step.logits[:, -1]
    ref = torch.cat(last_logits["parallel"])
    diff = max((torch.cat(last_logits[m]) - ref).abs().max().item() for m in ("chunkwise", "recurrent"))
    return out, diff


@torch.no_grad()
def decode_timings(model: RetNetForCausalLM, contexts: list[int], steps: int = 30, chunk_size: int = 256):
    """Median time of one recurrent decode step after a chunkwise prefill of each context length.

    Returns:
        [(context, seconds per token, cache bytes)].
    """
    rows = []
    gen = torch.Generator().manual_seed(0)
    for context in contexts:
        prompt = torch.randint(0, model.config.vocab_size, (1, context), generator=gen)
        out = model(prompt, use_cache=True, mode="chunkwise", chunk_size=chunk_size)
        cache, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)  # (1, 1)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(nxt, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t0)
            cache, nxt = cache_of(out), out.logits[:, -1:].argmax(-1)
        times.sort()
        rows.append((context, times[len(times) // 2], cache.nbytes()))
    return rows


def run_demo(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    lm = LMConfig(
        preset="retnet-tiny", data=args.data, tokenizer="bpe", vocab_size=4096, seq_len=args.seq_len,
        batch_size=args.batch_size, eval_batches=args.eval_batches, seed=args.seed,
    )  # fmt: skip
    print(f"retentive demo: {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    steps, budget = args.steps, None
    if steps is None:  # a first estimate (it sets the warm-up); the trainer fits the count to the budget
        steps, _ = calibrate_steps(lm, args.train_seconds)
        budget = args.train_seconds
    plan = f"~{steps} steps (fitted to a {budget:.0f} s budget while training)" if budget else f"{steps} steps"
    print(f"1. training retnet-tiny on {args.data!r}, {plan} of {lm.batch_size}x{lm.seq_len} tokens")
    train = TrainConfig(
        steps=steps, time_budget=budget, lr=args.lr, warmup=max(1, steps // 20), eval_interval=0, ckpt_interval=0,
        log_interval=5, keep_last=1, device="cpu",
    )  # fmt: skip
    run = train_language_model(lm, train, args.out, overwrite=True)
    model, tok, splits = run.model.eval(), run.tokenizer, run.splits
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"   {n_params / 1e6:.1f}M parameters, BPE vocabulary {tok.vocab_size}, {len(splits.train):,} training "
        f"and {len(splits.val):,} validation tokens; trained {run.trainer.step} steps in {run.result.seconds:.0f} s; "
        f"run saved in {args.out}"
    )

    val_ppl = run.result.eval["val_ppl"]
    uni_ppl = unigram_perplexity(splits.train, splits.val, tok.vocab_size)
    print(f"2. validation perplexity {val_ppl:.1f}   (unigram perplexity of the same tokens: {uni_ppl:.1f})")

    print("3. sample (chunkwise prefill, then one recurrent step per token):")
    prompt = torch.tensor([tok.encode(PROMPT)])
    torch.manual_seed(args.seed)
    print(PROMPT, end="", flush=True)
    model.generate(
        prompt, max_new_tokens=args.sample_tokens, do_sample=True, temperature=0.8, top_k=50,
        streamer=TokenStreamer(tok), pad_token_id=tok.eos_id,
    )  # fmt: skip

    tokens, diff = greedy_by_form(model, prompt, args.greedy_tokens)
    same = tokens["parallel"] == tokens["chunkwise"] == tokens["recurrent"]
    print(
        f"4. greedy tokens, {args.greedy_tokens} steps: parallel, chunkwise and recurrent forms "
        f"{'pick the SAME tokens' if same else 'DIFFER'} (max |logit difference| {diff:.1e}): "
        f"{tok.decode(tokens['recurrent'])!r}"
    )

    print("5. recurrent decode, one token after a chunkwise prefill of the context:")
    for context, seconds, nbytes in decode_timings(model, args.contexts):
        print(f"   context {context:>6,}: {1e3 * seconds:6.2f} ms/token, state {nbytes / 1024:,.0f} KiB")
    print(f"done in {time.perf_counter() - start:.0f} s (see {Path(args.out) / 'loss.png'})")
