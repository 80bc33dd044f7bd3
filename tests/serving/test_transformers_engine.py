"""The same front end on transformers' continuous batching (``--engine transformers``): greedy text equal to
``generate()``, one streamed chunk per token, cancelled and stopped requests free their cache blocks, and what the
manager cannot do is refused naming the parameter."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from servekit import greedy, running, tiny_model

from retentive.cli import main
from retentive.data import ByteTokenizer
from retentive.serving import ServeConfig, ServerLimits, TransformersEngine, build_app

TOKENIZER = ByteTokenizer()
LIMITS = ServerLimits(max_prompt_tokens=300, max_tokens=400, default_max_tokens=16)
PROMPTS = ["Once upon a time", "x", "The manager batches requests of different lengths " * 3, "ünïcödé ✓ " * 4]


@pytest.fixture(scope="module")
def served():
    """(model, base URL): the tiny Transformer behind transformers' manager, 4 requests at once, prompts read 32
    tokens per forward (so that the long prompt is read in pieces)."""
    model = tiny_model("transformer")
    config = ServeConfig(max_batch=4, max_queue=16, prefill_chunk=32, limits=LIMITS, engine="transformers")
    with running(build_app(model, TOKENIZER, "tiny", config)) as url:
        yield model, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def expected(model, prompt: str, n: int) -> str:
    return TOKENIZER.decode(greedy(model, TOKENIZER.encode(prompt), n))


def wait_for_nothing_held(url: str, timeout: float = 30) -> dict:
    """/health once no request runs or waits and no cache block is held."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["running"] == 0 and h["waiting"] == 0 and h["state_bytes"] == 0:
            return h
        assert time.monotonic() < deadline, f"still held: {h}"
        time.sleep(0.05)


def test_greedy_completions_equal_generate_alone_and_among_others(served):
    model, url = served
    args = dict(model="tiny", temperature=0, extra_body={"ignore_eos": True})
    assert client(url).completions.create(prompt=PROMPTS[2], max_tokens=20, **args).choices[0].text == expected(
        model, PROMPTS[2], 20
    )
    prompts = [PROMPTS[i % len(PROMPTS)] + str(i) for i in range(9)]  # more than the 4 running: some wait
    with ThreadPoolExecutor(9) as pool:
        texts = list(
            pool.map(lambda i: client(url).completions.create(prompt=prompts[i], max_tokens=6 + i, **args), range(9))
        )
    assert [t.choices[0].text for t in texts] == [expected(model, p, 6 + i) for i, p in enumerate(prompts)]
    assert [t.usage.completion_tokens for t in texts] == [6 + i for i in range(9)]
    assert health(url)["kind"] == "transformers" and health(url)["peak_state_bytes"] > 0
    metrics = httpx.get(f"{url}/metrics").text
    assert "vllm:generation_tokens_total" in metrics and "vllm:time_to_first_token_seconds_count" in metrics
    wait_for_nothing_held(url)


def test_streaming_gives_one_chunk_per_token_and_the_same_text(served):
    model, url = served
    ids = TOKENIZER.encode(PROMPTS[0])
    stream = client(url).completions.create(
        model="tiny", prompt=ids, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    tokens = [c for c in chunks if c.choices]
    assert len(tokens) == 24 and tokens[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in tokens) == TOKENIZER.decode(greedy(model, ids, 24))
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == len(ids)
    chat = client(url).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello?"}], max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chat) == expected(model, "user: Hello?\nassistant:", 12)


def test_a_stop_string_or_a_client_that_goes_away_frees_the_cache_blocks(served):
    model, url = served
    full = expected(model, PROMPTS[0], 30)
    stop = full[10:13]
    out = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    wait_for_nothing_held(url)
    stream = client(url).completions.create(
        model="tiny", prompt="go on", max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _ in zip(range(3), stream, strict=False):
        pass
    assert health(url)["running"] == 1 and health(url)["state_bytes"] > 0
    stream.close()  # mid-stream
    wait_for_nothing_held(url)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"temperature": 0, "n": 2}, "n"),
        ({"temperature": 0, "logprobs": 1}, "logprobs"),
    ],
)
def test_what_the_manager_cannot_do_is_refused_naming_the_parameter(served, extra, param):
    _, url = served
    response = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", **extra})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert "transformers" in response.json()["error"]["message"]


def test_a_retnet_or_retentive_only_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--engine retentive"):
        TransformersEngine(tiny_model("retnet"), TOKENIZER, None)
    with pytest.raises(ValueError, match="engine must be one of"):
        ServeConfig(engine="vllm")
    with pytest.raises(SystemExit, match=r"^error: --prompt-cache-dir and --cache-block are options of --engine"):
        main(["serve", str(tmp_path / "not-read"), "--engine", "transformers", "--cache-block", "64"])


def test_a_batch_of_prompts_gives_each_prompt_its_own_greedy_text(served):
    model, url = served
    prompts = [TOKENIZER.encode(p) for p in PROMPTS[:3]]  # token ids, as lm-eval sends them
    out = client(url).completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [expected(model, p, 8) for p in PROMPTS[:3]]
    with pytest.raises(openai.BadRequestError, match="prompt"):  # more prompts than the queue holds: never queued
        client(url).completions.create(model="tiny", prompt=[[1, 2]] * 17, max_tokens=1, temperature=0)
    wait_for_nothing_held(url)
