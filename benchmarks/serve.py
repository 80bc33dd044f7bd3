"""Serving, measured as serving engines measure it (vLLM's ``vllm bench serve``): RetNet behind ``retentive serve``
against its Transformer twin behind transformers' own continuous batching, both behind the same OpenAI front end.

    python benchmarks/serve.py            # the full plan; writes the "Serving" section of docs/benchmarks.md
    python benchmarks/serve.py --quick    # a micro model and tiny cells (what the test runs)

Servers (one ``retentive serve`` process on 127.0.0.1 per server and shape, so that each one's peak memory and
its key-value pool belong to that shape): ``retnet-tiny`` on retentive's engine with the prompt-state cache off
and on, and ``transformer-tiny`` (its parameter-matched Llama twin) on transformers' ``ContinuousBatchingManager``
(``--engine transformers``: paged cache, SDPA, its prefix sharing on as by default). Random weights, byte
tokenizer, float32, ``--max-batch`` = the concurrency, prompts read 512 tokens per forward by both engines.

Workload, as vLLM's random dataset: ``--num-prompts`` prompts of exactly ``input_len`` random byte tokens (the
first ``--prefix-len`` of them shared by every prompt of a cell), sent as token ids to ``/v1/completions``
(streamed, greedy, ``ignore_eos``: every request generates ``output_len`` tokens). Requests arrive all at once
(request rate inf) or as a Poisson process of ``--request-rates`` requests per second, with at most
``--max-concurrency`` in flight. The client runs in this process (asyncio + httpx) on the same CPU.

Metrics per cell, as vLLM defines them: request and output-token throughput (over the cell's duration, from the
first request sent to the last one done); TTFT (time to first token); TPOT per request, (E2E - TTFT) / (output
tokens - 1); ITL (every gap between two tokens of a request); E2E (a request's latency); mean, p50 and p99. The
server's peak resident memory during the cell (its high-water mark, reset before the cell; the server runs with
glibc's mmap threshold at 64 KiB so that freed tensors leave the resident set), and the peak bytes its running
requests' states or key-value blocks held (``/health``, over the server's life at this shape).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from retentive.baselines import count_parameters, model_from_preset
from retentive.data import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (
    DOCS,
    TRACKED_MEMORY_ENV,
    MiB,
    environment,
    markdown_table,
    peak_rss_bytes,
    require_proc,
    reset_peak_rss,
    save_figure,
    subplots,
    write_section,
)

# label: (preset, engine, prompt cache); the first RetNet and the Transformer are the target's pair
SERVERS = {
    "RetNet": ("retnet-tiny", "retentive", False),
    "RetNet, prompt cache": ("retnet-tiny", "retentive", True),
    "Transformer": ("transformer-tiny", "transformers", True),
}
FULL = {
    "overrides": {},  # the presets as they are: d 256, 4 layers, 4 heads, vocabulary 4096
    "shapes": [[1024, 128], [4096, 256]],  # (input, output) tokens per request
    "num_prompts": 32,
    "max_concurrency": 16,
    "request_rates": ["inf", 1.0],  # requests per second; inf: all at once
    "prefix_len": 0,
    "prefill_chunk": 512,
    "threads": 1,  # the server's torch threads: on 2 cores the client uses the other one
    "decode_implementation": "native",  # RetNet's decoding step: serve's default
    "target": {"shape": [4096, 256], "ratio": 5.0},  # RetNet's output throughput over the Transformer's, rate inf
    "seed": 0,
}
QUICK = FULL | {
    "overrides": {"dim_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64, "vocab_size": 257},
    "shapes": [[96, 8]],  # one shape: a server start per server
    "num_prompts": 6,
    "max_concurrency": 3,
    "request_rates": ["inf", 50.0],
    "decode_implementation": "eager",  # no compile: the test stays fast
    "target": {"shape": [96, 8], "ratio": 5.0},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_checkpoint(preset: str, overrides: dict, folder: Path) -> int:
    """A randomly initialised model of ``preset`` with a byte tokenizer, saved for ``retentive serve``."""
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = model_from_preset(preset, **overrides)
    model.save_pretrained(folder)
    ByteTokenizer().save(folder)
    return count_parameters(model)


@contextmanager
def server(checkpoint: Path, engine: str, cache: bool, shape: list[int], plan: dict):
    """``retentive serve`` for one shape in a subprocess on a free loopback port; yields (base URL, process id)."""
    port, (input_len, output_len) = free_port(), shape
    command = [
        sys.executable, "-m", "retentive.cli", "serve", str(checkpoint), "--port", str(port), "--model-name", "m",
        "--engine", engine, "--max-batch", str(plan["max_concurrency"]), "--max-n", "1",
        "--max-queue", str(plan["num_prompts"]),
        "--prefill-chunk", str(plan["prefill_chunk"]), "--max-prompt-tokens", str(input_len),
        "--max-tokens", str(output_len), "--default-max-tokens", str(output_len),
        "--prompt-cache-mib", "2048" if cache else "0", "--threads", str(plan["threads"]),
        "--decode-implementation", plan["decode_implementation"],
    ]  # fmt: skip
    env = os.environ | TRACKED_MEMORY_ENV
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 600
        try:
            while True:
                try:
                    httpx.get(f"{url}/health").raise_for_status()
                    break
                except httpx.TransportError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        log.seek(0)
                        raise RuntimeError(f"the server did not start: {log.read()[-2000:]}") from None
                    time.sleep(0.2)
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def random_prompts(count: int, length: int, prefix_len: int, seed: int) -> list[list[int]]:
    """``count`` prompts of ``length`` random byte tokens, the first ``prefix_len`` of them shared (vLLM's random
    dataset with ``--random-prefix-len``)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(256) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(256) for _ in range(length - prefix_len)] for _ in range(count)]


async def one_request(http: httpx.AsyncClient, url: str, prompt: list[int], output_len: int) -> dict:
    """A streamed completion: the time of every token's chunk after the request was sent, and its token counts."""
    body = {
        "model": "m", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    times, usage, sent = [], None, time.perf_counter()
    async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"]:  # one chunk per token, its text possibly empty (part of a character)
                times.append(time.perf_counter() - sent)
            else:
                usage = chunk["usage"]
    if usage is None or usage["completion_tokens"] != output_len or len(times) != output_len:
        raise RuntimeError(f"expected {output_len} tokens, got {len(times)} chunks and usage {usage}")
    return {"times": times, "output_tokens": usage["completion_tokens"]}


async def run_requests(url: str, prompts: list[list[int]], output_len: int, rate: float, concurrency: int, seed: int):
    """Send ``prompts`` at ``rate`` per second (Poisson arrivals; inf: all at once), at most ``concurrency`` in
    flight; returns every request's record and the duration from the first sent to the last done."""
    gaps = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(3600), limits=httpx.Limits(max_connections=concurrency + 4)
    ) as http:

        async def limited(prompt: list[int]) -> dict:
            async with limit:
                return await one_request(http, url, prompt, output_len)

        start, tasks = time.perf_counter(), []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(rate):
                await asyncio.sleep(gaps.expovariate(rate))
        records = await asyncio.gather(*tasks)
        return records, time.perf_counter() - start


def summarize(records: list[dict], duration: float, input_len: int) -> dict:
    """vLLM's metrics of one cell: throughputs, and the mean, p50 and p99 of each latency (seconds)."""
    output = sum(r["output_tokens"] for r in records)
    latencies = {
        "ttft": [r["times"][0] for r in records],
        "tpot": [(r["times"][-1] - r["times"][0]) / (r["output_tokens"] - 1) for r in records],  # >= 2 tokens each
        "itl": [b - a for r in records for a, b in itertools.pairwise(r["times"])],
        "e2e": [r["times"][-1] for r in records],
    }
    cell = {
        "completed": len(records),
        "duration_s": duration,
        "request_throughput": len(records) / duration,
        "output_throughput": output / duration,
        "total_token_throughput": (output + input_len * len(records)) / duration,
    }
    for name, values in latencies.items():
        cell[f"{name}_mean"] = float(np.mean(values))
        cell[f"{name}_p50"], cell[f"{name}_p99"] = (float(v) for v in np.percentile(values, [50, 99]))
    return cell


def measure(url: str, pid: int, key: tuple, plan: dict) -> dict:
    """One cell, key (server, input_len, output_len, request rate), behind the server ``pid`` at ``url``."""
    label, input_len, output_len, rate = key
    # prompts of their own per cell: a cell at rate 1/s must not find the rate-inf cell's prompts in a cache
    seed = hash((plan["seed"], input_len, output_len, plan["request_rates"].index(rate))) % 2**32
    prompts = random_prompts(plan["num_prompts"], input_len, plan["prefix_len"], seed)
    reset_peak_rss(pid)
    before = httpx.get(f"{url}/health").json()
    records, duration = asyncio.run(run_requests(url, prompts, output_len, float(rate), plan["max_concurrency"], seed))
    after = httpx.get(f"{url}/health").json()
    cell = {"server": label, "input_len": input_len, "output_len": output_len, "request_rate": rate}
    cell |= summarize(records, duration, input_len) | {"peak_rss_bytes": peak_rss_bytes(pid)}
    return cell | {"peak_state_bytes": after["peak_state_bytes"], "decode_step_mean": _step_mean(before, after)}


def _step_mean(before: dict, after: dict) -> float | None:
    """The mean seconds of the engine's batched decoding step between two ``/health`` reads (the model's forward,
    what the time between tokens is made of); None where the engine does not report it (transformers')."""
    steps = after["steps"] - before["steps"]
    if "decode_seconds" not in after or steps <= 0:
        return None
    return (after["decode_seconds"] - before["decode_seconds"]) / steps


def run_all(plan: dict, workdir: Path, done: list[dict]) -> dict:
    """Every cell, each server and shape behind its own process; cells found in ``done`` are kept as they are."""
    results = {"plan": plan, "parameters": {}, "cells": []}
    kept = {(c["server"], c["input_len"], c["output_len"], c["request_rate"]): c for c in done}
    for label, (preset, engine, cache) in SERVERS.items():
        folder = workdir / preset
        if not folder.exists():
            results["parameters"][preset] = save_checkpoint(preset, plan["overrides"], folder)
        for shape in plan["shapes"]:
            keys = [(label, *shape, rate) for rate in plan["request_rates"]]
            if all(k in kept for k in keys):
                results["cells"] += [kept[k] for k in keys]
                continue
            with server(folder, engine, cache, shape, plan) as (url, pid):
                warm_up = random_prompts(2, min(16, shape[0]), 0, seed=-1)
                asyncio.run(run_requests(url, warm_up, min(4, shape[1]), math.inf, 2, seed=-1))
                for key in keys:
                    cell = kept.get(key) or measure(url, pid, key, plan)
                    print(json.dumps(cell), flush=True)
                    results["cells"].append(cell)
    return results


def _cell(results: dict, **key) -> dict | None:
    return next((c for c in results["cells"] if all(c[k] == v for k, v in key.items())), None)


def _rate(rate: str | float) -> str:
    return "inf" if rate == "inf" else f"{rate:g}/s"


def verdict(results: dict) -> str:
    """The target's line: RetNet's output throughput over the Transformer's at the target shape, rate inf."""
    plan, target = results["plan"], results["plan"]["target"]
    (input_len, output_len), ratio = target["shape"], target["ratio"]
    where = f"{plan['max_concurrency']} clients x {input_len:,}-token prompts x {output_len} output tokens, rate inf"
    r, t = (
        _cell(results, server=s, input_len=input_len, output_len=output_len, request_rate="inf")
        for s in ("RetNet", "Transformer")
    )
    if r is None or t is None:
        return f"- Target (RetNet >= {ratio:g}x the Transformer's output throughput, {where}): not measured."
    got = r["output_throughput"] / t["output_throughput"]
    return (
        f"- Target: RetNet >= {ratio:g}x the Transformer's output throughput at {where}: RetNet "
        f"{r['output_throughput']:,.1f} vs Transformer {t['output_throughput']:,.1f} tokens/s = {got:.2f}x: "
        f"**{'PASS' if got >= ratio else 'FAIL'}**."
    )


def markdown(results: dict, plot: str) -> str:
    meta, plan = results["meta"], results["plan"]
    params = ", ".join(f"`{k}` {v:,}" for k, v in results["parameters"].items())
    rates = ", ".join(_rate(r) for r in plan["request_rates"])
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}; load average {meta['load']:.1f} at the start.",
        f"Command: `{meta['command']}` (`make bench-serve`).",
        f"Models: {params} parameters, random weights, byte tokenizer, float32. Servers: RetNet on `retentive serve`'s "
        "engine, prompt-state cache off and on; the Transformer on transformers' own continuous batching "
        "(`retentive serve --engine transformers`: `ContinuousBatchingManager`, paged key-value cache, SDPA, "
        f"prefix sharing on), behind the same OpenAI front end; `--max-batch {plan['max_concurrency']} --threads "
        f"{plan['threads']}`, prompts read {plan['prefill_chunk']} tokens per forward, one server process per shape.",
        f"Workload (as `vllm bench serve` with its random dataset): {plan['num_prompts']} prompts per cell of exactly "
        f"the input length in random tokens ({plan['prefix_len']} shared), sent as token ids to `/v1/completions`, "
        f"streamed, greedy, `ignore_eos`; request rate {rates} (Poisson arrivals; inf: all at once), at most "
        f"{plan['max_concurrency']} in flight.",
        "TTFT: time to first token; TPOT: (E2E - TTFT) / (output tokens - 1) per request; ITL: every gap between two "
        "tokens; E2E: a request's latency. Step: the mean time of retentive's batched decoding step in the cell (the "
        "model's forward; `/health`'s `decode_seconds` over `steps`), of which each gap between tokens is made, "
        "beside sampling, the front end and prefills. Peak RSS: the server process during the cell; state: the "
        "running requests' retention states or key-value blocks at their peak (over the server's life at this shape).",
        "",
    ]
    header = ["input / output", "rate", "server", "req/s", "output tok/s", "TTFT p50 / p99 ms", "TPOT p50 / p99 ms"]
    header += ["ITL p50 / p99 ms", "step ms", "E2E p50 / p99 s", "peak RSS MiB", "state MiB"]
    rows = []
    for input_len, output_len in plan["shapes"]:
        for rate in plan["request_rates"]:
            for label in SERVERS:
                c = _cell(results, server=label, input_len=input_len, output_len=output_len, request_rate=rate)
                head = [f"{input_len:,} / {output_len}", _rate(rate), label]
                if c is None:
                    rows.append([*head, "not measured", *[""] * 8])
                    continue
                ms = [f"{1e3 * c[f'{m}_p50']:,.1f} / {1e3 * c[f'{m}_p99']:,.1f}" for m in ("ttft", "tpot", "itl")]
                step = c.get("decode_step_mean")
                rows.append([
                    *head, f"{c['request_throughput']:.2f}", f"{c['output_throughput']:,.1f}", *ms,
                    "" if step is None else f"{1e3 * step:.2f}",
                    f"{c['e2e_p50']:.2f} / {c['e2e_p99']:.2f}", f"{c['peak_rss_bytes'] / MiB:,.0f}",
                    f"{c['peak_state_bytes'] / MiB:,.2f}",
                ])  # fmt: skip
    lines += [markdown_table(header, rows), "", verdict(results), "", f"![serving]({plot})"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Output throughput, TTFT p50 and TPOT p50 of every server, one group of bars per shape and rate."""
    plan = results["plan"]
    groups = [(*shape, rate) for shape in plan["shapes"] for rate in plan["request_rates"]]
    fig, axes = subplots(1, 3, figsize=(15, 4.2))
    width = 0.8 / len(SERVERS)
    for i, label in enumerate(SERVERS):
        cells = [_cell(results, server=label, input_len=a, output_len=b, request_rate=r) for a, b, r in groups]
        x = [g + (i - (len(SERVERS) - 1) / 2) * width for g in range(len(groups))]
        for ax, metric in zip(axes, ("output_throughput", "ttft_p50", "tpot_p50"), strict=True):
            ax.bar(x, [c[metric] if c else 0 for c in cells], width, label=label)
    titles = ("output tokens/s", "TTFT p50 (s)", "TPOT p50 (s)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(groups)), [f"{a:,}/{b}\nrate {_rate(r)}" for a, b, r in groups], fontsize=8)
        ax.set_title(f"{title}, {plan['max_concurrency']} concurrent")
        ax.grid(alpha=0.3, axis="y")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def shape(text: str) -> list[int]:
    """``INPUT:OUTPUT`` token counts, e.g. ``4096:256``."""
    try:
        input_len, output_len = (int(n) for n in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is INPUT:OUTPUT tokens, e.g. 4096:256, got {text!r}") from None
    if input_len < 1 or output_len < 2:
        raise argparse.ArgumentTypeError(f"a shape needs >= 1 input and >= 2 output tokens (TPOT), got {text!r}")
    return [input_len, output_len]


def request_rate(text: str) -> str | float:
    """``inf`` or a positive number of requests per second."""
    if text == "inf":
        return text
    try:
        rate = float(text)
    except ValueError:
        rate = -1.0
    if not 0 < rate < math.inf:
        raise argparse.ArgumentTypeError(f"a request rate is 'inf' or a positive number per second, got {text!r}")
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a micro model, tiny cells")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--shapes", type=shape, nargs="+", help="INPUT:OUTPUT tokens per request, e.g. 4096:256")
    parser.add_argument("--num-prompts", type=int, help="requests per cell")
    parser.add_argument("--max-concurrency", type=int, help="requests in flight at most (and the servers' slots)")
    parser.add_argument("--request-rates", type=request_rate, nargs="+", help="per second (Poisson), or inf")
    parser.add_argument("--prefix-len", type=int, help="leading prompt tokens shared by every prompt of a cell")
    parser.add_argument("--threads", type=int, help="the servers' torch threads (default 1)")
    parser.add_argument(
        "--decode-implementation", choices=("eager", "compiled", "aot", "native"), help="RetNet's decoding step"
    )
    parser.add_argument("--resume", type=Path, help="keep the cells printed (one JSON per line) by an interrupted run")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("shapes", "num_prompts", "max_concurrency", "request_rates", "prefix_len", "threads"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.decode_implementation is not None:
        plan["decode_implementation"] = args.decode_implementation
    for key in ("num_prompts", "max_concurrency"):
        if plan[key] < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {plan[key]}")
    if not 0 <= plan["prefix_len"] <= min(n for n, _ in plan["shapes"]):
        parser.error(f"--prefix-len must lie in [0, the shortest input], got {plan['prefix_len']}")
    require_proc("serve.py")
    started, load = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        done = [json.loads(line) for line in args.resume.read_text().splitlines()] if args.resume else []
        results = run_all(plan, Path(tmp), done)
    argv = sys.argv[1:] if argv is None else argv
    results["meta"] = environment("serve.py", started, quick=args.quick, argv=argv) | {"load": load}
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = "bench_quick_" if args.quick else "bench_"
    (args.out / f"{prefix}serve.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / f"{prefix}serve.png")
    body = markdown(results, f"{prefix}serve.png")
    if args.quick:
        (args.out / "bench_quick_serve.md").write_text(body)
    else:
        heading = "## Serving: RetNet and the Transformer under load"
        write_section(args.out / "benchmarks.md", heading, body, name="serve")
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
