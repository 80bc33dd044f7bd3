"""Helpers of the serving tests: tiny random models, generate()'s greedy tokens, a server on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn
from fastapi import FastAPI

import retentive as rt
from retentive.baselines import transformer_from_preset

SIZE = dict(vocab_size=257, dim_model=64, num_layers=2, num_heads=2)
# a wider initialisation than training's 0.02 gives peaked logits: greedy choices without near-ties, so that the
# float rounding of a different batch size or prefill piece cannot flip a token
INIT = 0.2


def tiny_model(kind: str) -> torch.nn.Module:
    """A random ``retnet`` (RetNetForCausalLM) or ``transformer`` (its Llama twin) of SIZE, seeded."""
    torch.manual_seed(0)
    if kind == "retnet":
        return rt.RetNetForCausalLM(rt.RetNetConfig.from_preset("retnet-tiny", initializer_range=INIT, **SIZE)).eval()
    model = transformer_from_preset("transformer-tiny", **SIZE)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # embeddings and projections
                p.normal_(0.0, INIT)
    return model.eval()


def greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """What ``model.generate()`` picks greedily after ``prompt`` (end-of-text ignored)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
        eos_token_id=None, min_new_tokens=max_new_tokens,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 at a free port in a thread; yields the base URL ``http://127.0.0.1:PORT``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
