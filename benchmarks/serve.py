"""Serving under load: RetNet and its Transformer twin behind the same server, N concurrent clients on loopback.

    python benchmarks/serve.py            # the tiny presets; writes the "Serving" section of docs/benchmarks.md
    python benchmarks/serve.py --quick    # a micro model and two small cells (what the test runs)

For each model (``retnet-tiny`` and ``transformer-tiny``, parameter-matched, random weights, byte tokenizer) and
with the prompt-state cache off and on, one ``retentive serve`` process is started on 127.0.0.1; for each prompt
length and number of clients, every client sends ``--requests`` streamed chat requests one after the other. A
request's system message is the prompt length less the tokens of the template and the user message (58), shared
by every request of the cell (a new one per cell); its user message is unique. Every request generates
``--max-tokens`` tokens (``ignore_eos``).

Measured per cell: output tokens per second (all generated tokens over the cell's wall time), time to first token
and inter-token latency (p50 and p99 over every request and every token gap), the server's peak resident memory
during the cell (sampled every 20 ms; the server runs with glibc's mmap threshold at 64 KiB so that freed tensors
leave the resident set) and the peak bytes held by the running requests' states or key-value caches (from
``/health``). Cells whose prompt tokens (clients x requests x length) exceed ``--max-cell-tokens`` are skipped.
The clients run in this process (asyncio + httpx) on the same CPU as the server.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from retentive.baselines import count_parameters, model_from_preset
from retentive.data import ByteTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import (
    DOCS,
    TRACKED_MEMORY_ENV,
    MiB,
    environment,
    markdown_table,
    rss_bytes,
    save_figure,
    subplots,
    write_section,
)

MODELS = {"RetNet": "retnet-tiny", "Transformer": "transformer-tiny"}
# sized for a shared 2-core CPU; on a larger machine: --prompts 128 1024 4096 8192 --clients 1 4 16 64 --requests 2
FULL = {
    "overrides": {},  # the presets as they are: d 256, 4 layers, 4 heads, vocabulary 4096
    "prompts": [128, 1024, 4096],
    "clients": [1, 4, 16],
    "requests": 1,
    "max_tokens": 16,
    "max_batch": 64,
    "max_cell_tokens": 65536,
    "threads": 1,  # the server's torch threads: on 2 cores the clients use the other one
    "decode_implementation": "compiled",  # RetNet's decoding step (retentive serve's default)
}
QUICK = FULL | {
    "overrides": {"dim_model": 32, "num_layers": 2, "num_heads": 2, "ffn_dim": 64, "vocab_size": 257},
    "prompts": [64, 128],
    "clients": [1, 3],
    "requests": 1,
    "max_tokens": 4,
    "max_batch": 4,
}


def text_of(n: int, rng: random.Random) -> str:
    """``n`` printable ASCII characters: ``n`` tokens of the byte tokenizer."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(n))


def user_message(client: int, request: int, rng: random.Random) -> str:
    """A request's own message, of a fixed length."""
    return f"client {client:03d} request {request:03d}: " + text_of(8, rng)


# the tokens of a request besides its system message: the chat template and the user message
SUFFIX = len("system: \nuser: \nassistant:") + len(user_message(0, 0, random.Random(0)))


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
def server(checkpoint: Path, cache: bool, plan: dict):
    """``retentive serve`` in a subprocess on a free loopback port; yields (base URL, process)."""
    port = free_port()
    command = [
        sys.executable, "-m", "retentive.cli", "serve", str(checkpoint), "--port", str(port), "--model-name", "m",
        "--max-batch", str(plan["max_batch"]), "--max-queue", "1024", "--max-prompt-tokens", str(max(plan["prompts"])),
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
            yield url, proc
        finally:
            proc.terminate()
            proc.wait(timeout=60)


async def one_request(http: httpx.AsyncClient, url: str, messages: list[dict], max_tokens: int) -> dict:
    """A streamed chat request: the time of every token's chunk after the request was sent."""
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    sent, times = time.perf_counter(), []
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line and '"role"' not in line:
                times.append(time.perf_counter() - sent)
    if len(times) != max_tokens:
        raise RuntimeError(f"expected {max_tokens} token chunks, got {len(times)}")
    return {"ttft": times[0], "gaps": [b - a for a, b in itertools.pairwise(times)]}


async def run_clients(url: str, clients: int, requests: int, prompt: int, max_tokens: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    system = text_of(prompt - SUFFIX, rng)  # shared by every request of the cell; the whole prompt: `prompt` tokens
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600), limits=limits) as http:

        async def client(c: int) -> list[dict]:
            out = []
            for r in range(requests):
                user = user_message(c, r, rng)
                messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
                out.append(await one_request(http, url, messages, max_tokens))
            return out

        return [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]


class Sampler:
    """Polls the server's resident memory (/proc) and its states' bytes (``/health``) while a cell runs."""

    def __init__(self, pid: int, url: str) -> None:
        self.pid, self.url = pid, url
        self.peak_rss = self.peak_state = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            self.peak_state = max(self.peak_state, httpx.get(f"{self.url}/health").json()["state_bytes"])
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def run_cell(url: str, pid: int, clients: int, prompt: int, plan: dict, seed: int) -> dict:
    with Sampler(pid, url) as sampler:
        start = time.perf_counter()
        records = asyncio.run(run_clients(url, clients, plan["requests"], prompt, plan["max_tokens"], seed))
        seconds = time.perf_counter() - start
    ttft = [r["ttft"] for r in records]
    gaps = [g for r in records for g in r["gaps"]]
    return {
        "seconds": seconds,
        "tokens_per_s": len(records) * plan["max_tokens"] / seconds,
        "ttft_p50": percentile(ttft, 50),
        "ttft_p99": percentile(ttft, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
        "peak_rss_bytes": sampler.peak_rss,
        "peak_state_bytes": sampler.peak_state,
    }


def run_all(plan: dict, workdir: Path, done: list[dict]) -> dict:
    """Every cell, each model and cache setting behind its own server; cells found in ``done`` are kept as they are."""
    results = {"plan": plan, "parameters": {}, "cells": []}
    kept = {(c["model"], c["cache"], c["prompt"], c["clients"]): c for c in done}
    for label, preset in MODELS.items():
        folder = workdir / preset
        results["parameters"][label] = save_checkpoint(preset, plan["overrides"], folder)
        for cache in (False, True):
            keys = [(label, cache, prompt, clients) for prompt in plan["prompts"] for clients in plan["clients"]]
            if all(k in kept for k in keys):
                results["cells"] += [kept[k] for k in keys]
                continue
            with server(folder, cache, plan) as (url, proc):
                asyncio.run(run_clients(url, 2, 2, min(plan["prompts"]), 4, seed=-1))  # warm up
                for k in keys:
                    cell = kept.get(k) or measure(url, proc.pid, k, plan)
                    print(json.dumps(cell), flush=True)
                    results["cells"].append(cell)
    return results


def measure(url: str, pid: int, key: tuple, plan: dict) -> dict:
    """One cell: (model, cache, prompt, clients), or its reason to be skipped."""
    model, cache, prompt, clients = key
    cell = {"model": model, "cache": cache, "prompt": prompt, "clients": clients}
    tokens = clients * plan["requests"] * prompt
    if tokens > plan["max_cell_tokens"]:
        return cell | {"skipped": f"{tokens:,} prompt tokens > --max-cell-tokens"}
    return cell | run_cell(url, pid, clients, prompt, plan, seed=prompt * 1000 + clients)


def _cell(results: dict, **key) -> dict | None:
    for cell in results["cells"]:
        if all(cell[k] == v for k, v in key.items()):
            return cell
    return None


def markdown(results: dict, plot: str) -> str:
    meta, plan = results["meta"], results["plan"]
    params = ", ".join(f"{k} {v:,}" for k, v in results["parameters"].items())
    lines = [
        f"Measured {meta['date']} on {meta['cpu']} ({meta['cores']} cores), torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}; load average {meta['load']:.1f} at the start "
        "(the machine is shared: absolute figures are pessimistic, both models ran under the same load).",
        f"Command: `{meta['command']}` (`make bench-serve`).",
        f"Models: `retnet-tiny` and `transformer-tiny` (its Llama twin), random weights, byte tokenizer, float32; "
        f"parameters: {params}. One `retentive serve` process per model and cache setting, `--max-batch "
        f"{plan['max_batch']} --threads {plan['threads']}`, prefill in pieces of 512 tokens. Each of N clients sends "
        f"{plan['requests']} streamed chat request(s) in turn; each generates {plan['max_tokens']} tokens. The system "
        "message (prompt length "
        f"- {SUFFIX} tokens) is shared by the requests of a cell, the user message is unique. The RetNet decodes all "
        "running requests in one batched recurrent step; the Transformer in one batched forward over its key-value "
        "caches, left-padded to the longest in a preallocated `StaticCache` (rebuilt when a request joins or leaves).",
        "TTFT: time to first token; ITL: inter-token latency (every gap between two tokens of a request). Peak RSS: "
        "the server process; state: the running requests' retention states or key-value caches.",
        "",
    ]
    header = ["prompt", "clients", "model", "cache", "tokens/s", "TTFT p50 / p99 s", "ITL p50 / p99 ms"]
    header += ["peak RSS MiB", "state MiB"]
    rows = []
    for prompt in plan["prompts"]:
        for clients in plan["clients"]:
            for cache in (False, True):
                for model in MODELS:
                    c = _cell(results, model=model, cache=cache, prompt=prompt, clients=clients)
                    head = [f"{prompt:,}", str(clients), model, "on" if cache else "off"]
                    if c is None:
                        rows.append([*head, "not measured", "", "", "", ""])
                        continue
                    if "skipped" in c:
                        rows.append([*head, "skipped", "", "", "", ""])
                        continue
                    rows.append([
                        *head, f"{c['tokens_per_s']:,.1f}", f"{c['ttft_p50']:.2f} / {c['ttft_p99']:.2f}",
                        f"{1e3 * c['itl_p50']:.1f} / {1e3 * c['itl_p99']:.1f}", f"{c['peak_rss_bytes'] / MiB:,.0f}",
                        f"{c['peak_state_bytes'] / MiB:,.2f}",
                    ])  # fmt: skip
    lines += [markdown_table(header, rows), "", *headline(results), "", f"![serving]({plot})"]
    return "\n".join(lines)


def headline(results: dict) -> list[str]:
    """RetNet against the Transformer at 16 clients and the longest prompt measured there (up to 4k tokens)."""
    out = []
    for cache in (False, True):
        cells = [c for c in results["cells"] if c["clients"] == 16 and c["cache"] == cache and "skipped" not in c]
        if not cells:
            continue
        prompt = max(c["prompt"] for c in cells)
        r = _cell(results, model="RetNet", cache=cache, prompt=prompt, clients=16)
        t = _cell(results, model="Transformer", cache=cache, prompt=prompt, clients=16)
        if r is None or t is None or "skipped" in r or "skipped" in t:
            continue
        out.append(
            f"- 16 clients, {prompt:,}-token prompts, cache {'on' if cache else 'off'}: RetNet "
            f"{r['tokens_per_s']:,.1f} vs Transformer {t['tokens_per_s']:,.1f} tokens/s "
            f"({r['tokens_per_s'] / t['tokens_per_s']:.2f}x); TTFT p50 {r['ttft_p50']:.2f} vs {t['ttft_p50']:.2f} s; "
            f"ITL p50 {1e3 * r['itl_p50']:.1f} vs {1e3 * t['itl_p50']:.1f} ms; peak RSS "
            f"{r['peak_rss_bytes'] / MiB:,.0f} vs {t['peak_rss_bytes'] / MiB:,.0f} MiB; state "
            f"{r['peak_state_bytes'] / MiB:,.2f} vs {t['peak_state_bytes'] / MiB:,.2f} MiB."
        )
    return out


def plot(results: dict, path: Path) -> None:
    plan = results["plan"]
    fig, axes = subplots(1, 3, figsize=(15, 4.2))
    clients = max(c for c in plan["clients"] if any(x["clients"] == c and "skipped" not in x for x in results["cells"]))
    clients = 16 if 16 in plan["clients"] else clients
    for model in MODELS:
        for cache, style in ((False, "-"), (True, "--")):
            label = f"{model}, cache {'on' if cache else 'off'}"
            cells = [_cell(results, model=model, cache=cache, prompt=p, clients=clients) for p in plan["prompts"]]
            cells = [c for c in cells if c and "skipped" not in c]
            x = [c["prompt"] for c in cells]
            axes[0].plot(x, [c["tokens_per_s"] for c in cells], style, marker="o", label=label)
            axes[1].plot(x, [c["ttft_p50"] for c in cells], style, marker="o", label=label)
            axes[2].plot(x, [c["peak_state_bytes"] / MiB for c in cells], style, marker="o", label=label)
    titles = (f"output tokens/s, {clients} clients", f"TTFT p50 (s), {clients} clients", "peak state / KV (MiB)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a micro model, two small cells per setting")
    parser.add_argument("--out", type=Path, default=DOCS)
    parser.add_argument("--prompts", type=int, nargs="+", help="prompt lengths in tokens")
    parser.add_argument("--clients", type=int, nargs="+", help="numbers of concurrent clients")
    parser.add_argument("--requests", type=int, help="requests per client, one after the other")
    parser.add_argument("--max-tokens", type=int, help="tokens generated per request")
    parser.add_argument("--max-cell-tokens", type=int, help="skip cells with more prompt tokens than this")
    parser.add_argument("--threads", type=int, help="the server's torch threads (default 1)")
    parser.add_argument("--resume", type=Path, help="keep the cells printed (one JSON per line) by an interrupted run")
    parser.add_argument("--decode-implementation", choices=("eager", "compiled"), help="RetNet's decoding step")
    args = parser.parse_args(argv)
    plan = dict(QUICK if args.quick else FULL)
    for key in ("prompts", "clients", "requests", "max_tokens", "max_cell_tokens", "threads", "decode_implementation"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if min(plan["prompts"]) <= SUFFIX:
        parser.error(f"--prompts must be longer than the {SUFFIX} tokens of each request's own message")
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
