"""What guards the server: validation at the boundary, the API key, body and prompt limits, the event loop kept free,
``/metrics``, and a request that fails inside the engine answering alone."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from servekit import running, tiny_model

from retentive.data import ByteTokenizer
from retentive.serving import ServeConfig, ServerLimits, build_app
from retentive.serving.protocol import CompletionRequest

TOKENIZER = ByteTokenizer()
LIMITS = dict(max_prompt_tokens=600, max_tokens=4000, default_max_tokens=16)


def app(tokenizer=TOKENIZER, api_key: str | None = None, **limits):
    limits = ServerLimits(**{**LIMITS, **limits})
    config = ServeConfig(max_batch=16, prefill_chunk=16, limits=limits, api_key=api_key)
    return build_app(tiny_model("retnet"), tokenizer, "tiny", config)


@pytest.fixture(scope="module")
def url():
    with running(app(max_body_bytes=20_000)) as base:
        yield base


def post(base: str, body: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json=body, timeout=60, **kw)


def refused(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    return error


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"n": 5}, "n"),  # --max-n 4 by default, though 16 slots are free
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"store": True}, "store"),
        ({"metadata": {"a": "b"}}, "metadata"),
        ({"repetition_penalty": 1.1}, "repetition_penalty"),
        ({"min_tokens": 3}, "min_tokens"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
    ],
)
def test_what_cannot_be_honoured_is_refused_naming_the_parameter(url, extra, param):
    error = refused(post(url, {"model": "tiny", "prompt": "hi", **extra}), 400, param)
    assert param in error["message"]


def test_neutral_values_of_refused_parameters_are_accepted(url):
    neutral = {"echo": False, "store": False, "repetition_penalty": 1.0, "tool_choice": "none"}
    assert post(url, {"model": "tiny", "prompt": "hi", "max_tokens": 2, **neutral}).status_code == 200


def test_completions_max_tokens_null_is_openais_16():
    assert CompletionRequest(model="m", prompt="x", max_tokens=None).max_tokens == 16
    assert CompletionRequest(model="m", prompt="x").max_tokens == 16


def test_a_lone_surrogate_is_a_400_in_openais_shape(url):
    raw = b'{"model": "tiny", "prompt": "hi \\ud800", "max_tokens": 2}'
    refused(post(url, content=raw, headers={"content-type": "application/json"}), 400, "prompt")
    chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\udfff"}]}'
    response = httpx.post(f"{url}/v1/chat/completions", content=chat, headers={"content-type": "application/json"})
    refused(response, 400, "messages")


def test_extreme_sampling_and_seeds_answer_every_choice(url):
    cases = [{"temperature": 1e-40}, {"temperature": 5e-324}, {"top_p": 1e-46}, {"seed": 2**63 - 1}]
    for case in cases:
        response = post(url, {"model": "tiny", "prompt": "hi", "max_tokens": 3, "n": 4, "ignore_eos": True, **case})
        assert response.status_code == 200, (case, response.text)
        assert [c["finish_reason"] for c in response.json()["choices"]] == ["length"] * 4
    health = httpx.get(f"{url}/health").json()
    assert health["free_slots"] == health["max_batch"]


def test_a_body_over_the_limit_is_413_declared_or_chunked(url):
    big = {"model": "tiny", "prompt": "x" * 30_000}
    error = refused(post(url, big), 413, None)
    assert error["code"] == "request_too_large"

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(30):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    refused(response, 413, None)
    assert httpx.get(f"{url}/health").status_code == 200


class SlowTokenizer(ByteTokenizer):
    """Takes a second over a prompt that starts with "slow"; counts what it is asked to encode."""

    encoded = 0

    def encode(self, text: str) -> list[int]:
        SlowTokenizer.encoded += len(text)
        if text.startswith("slow"):
            time.sleep(1.0)
        return super().encode(text)


def test_tokenizing_never_stalls_the_event_loop_and_an_overlong_prompt_is_not_tokenized():
    with running(app(SlowTokenizer())) as base:
        slow = threading.Thread(target=post, args=(base, {"model": "tiny", "prompt": "slow", "max_tokens": 1}))
        slow.start()
        time.sleep(0.2)  # the slow prompt is being tokenized
        start = time.monotonic()
        assert httpx.get(f"{base}/health").status_code == 200
        assert time.monotonic() - start < 0.5
        slow.join()
        SlowTokenizer.encoded = 0
        # 3 bytes per token at most (the byte tokenizer's replacement character): 1,801 characters cannot fit in 600
        refused(post(base, {"model": "tiny", "prompt": "y" * 1801}), 400, "prompt")
        assert SlowTokenizer.encoded == 0


def test_an_api_key_guards_every_route_but_health():
    with running(app(api_key="s3cret")) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json"):
            assert httpx.get(f"{base}{path}").status_code == 401, path
        wrong = {"Authorization": "Bearer s3cre"}
        error = refused(post(base, {"model": "tiny", "prompt": "hi"}, headers=wrong), 401, None)
        assert error["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens <= 2


def test_metrics_speak_prometheus_with_vllms_names(url):
    post(url, {"model": "tiny", "prompt": "metrics", "max_tokens": 4, "ignore_eos": True})
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    label = 'model_name="tiny"'
    assert values[f"vllm:num_requests_running{{{label}}}"] == 0
    assert values[f"vllm:num_requests_waiting{{{label}}}"] == 0
    assert values[f"vllm:time_to_first_token_seconds_count{{{label}}}"] >= 1
    assert values[f"vllm:inter_token_latency_seconds_count{{{label}}}"] >= 3
    assert values[f'vllm:time_to_first_token_seconds_bucket{{{label},le="+Inf"}}'] >= 1
    assert f"vllm:prefix_cache_hits_total{{{label}}}" in values
    assert values[f"retentive:state_bytes{{{label}}}"] == 0
    steps = values[f"retentive:decode_steps_total{{{label}}}"]  # the first token comes from the prefill
    assert steps >= 3 and 0 < values[f"retentive:decode_step_seconds_total{{{label}}}"] < steps
