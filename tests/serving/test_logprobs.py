"""Log-probabilities as OpenAI's API reports them: ``logprobs`` (+ ``echo``) on completions, ``logprobs`` and
``top_logprobs`` on chat, whole and streamed, each equal to the log-softmax of the model's own logits; and the
request lm-evaluation-harness's ``local-completions`` sends to score a continuation."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from servekit import greedy, running, tiny_model

from retentive.data import ByteTokenizer
from retentive.serving import ServeConfig, ServerLimits, build_app

TOKENIZER = ByteTokenizer()
LIMITS = ServerLimits(max_prompt_tokens=600, max_tokens=64, default_max_tokens=8)


@pytest.fixture(scope="module", params=["retnet", "transformer"])
def served(request):
    model = tiny_model(request.param)
    config = ServeConfig(max_batch=8, prefill_chunk=16, limits=LIMITS)
    with running(build_app(model, TOKENIZER, "tiny", config)) as url:
        yield model, url


def model_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at every position of ``ids``: (T, V), float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    return logits.double().log_softmax(-1)


def post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/{path}", json={"model": "tiny", **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_logprobs_are_the_models(served):
    model, url = served
    prompt = TOKENIZER.encode("To be, or not")
    body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    choice = post(url, "completions", body)["choices"][0]
    lp = choice["logprobs"]
    ids = prompt + greedy(model, prompt, 6)
    want = model_logprobs(model, ids[:-1])[len(prompt) - 1 :]  # the distribution before each generated token
    for row, token in enumerate(ids[len(prompt) :]):
        got, top = lp["token_logprobs"][row], lp["top_logprobs"][row]
        assert got == pytest.approx(want[row, token].item(), abs=1e-4)
        assert len(top) == 3 and got == pytest.approx(max(top.values()), abs=1e-6)  # greedy: the likeliest
        assert list(top.values()) == sorted(top.values(), reverse=True)
        text = TOKENIZER.decode([token])
        assert lp["tokens"][row] == (text if "\ufffd" not in text else f"token_id:{token}")
    assert lp["text_offset"] == list(range(0, len(lp["tokens"])))  # one character per byte token here


def test_echo_scores_the_prompt_as_lm_eval_asks(served):
    """lm-eval's loglikelihood request: echo, logprobs 1, temperature 0, max_tokens 1 (or 0), token-id prompt; it
    sums token_logprobs over the continuation's positions."""
    model, url = served
    context, continuation = TOKENIZER.encode("The cat sat on the"), TOKENIZER.encode(" mat")
    ids = context + continuation
    want = model_logprobs(model, ids)
    for max_tokens in (1, 0):
        body = {"prompt": ids, "echo": True, "logprobs": 1, "temperature": 0, "max_tokens": max_tokens, "seed": 1234}
        choice = post(url, "completions", body)["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens and lp["token_logprobs"][0] is None
        assert choice["text"].startswith("The cat sat on the mat")
        scored = lp["token_logprobs"][len(context) : len(ids)]
        expected = [want[t - 1, ids[t]].item() for t in range(len(context), len(ids))]
        assert scored == pytest.approx(expected, abs=1e-4)
        greedy = all(lp["token_logprobs"][t] >= max(lp["top_logprobs"][t].values()) - 1e-6 for t in range(1, len(ids)))
        assert greedy == all(want[t - 1].argmax().item() == ids[t] for t in range(1, len(ids)))


@pytest.mark.parametrize("as_ids", [True, False])
def test_a_batch_of_prompts_is_answered_as_each_alone(served, as_ids):
    """OpenAI's batch, a list of texts or of token-id lists (what lm-eval's local-completions sends with batch_size
    > 1): choice i * n + j is choice j of prompt i, as that prompt alone gets it; the usage sums the prompts'."""
    _, url = served
    texts = ["The cat sat on the mat", "x", "ünïcödé ✓"]
    prompts = [TOKENIZER.encode(t) for t in texts] if as_ids else texts
    body = {"echo": True, "logprobs": 1, "temperature": 0, "max_tokens": 3, "n": 2, "ignore_eos": True}
    whole = post(url, "completions", body | {"prompt": prompts})
    alone = [post(url, "completions", body | {"prompt": p}) for p in prompts]
    assert [c["index"] for c in whole["choices"]] == list(range(2 * len(prompts)))
    for i, single in enumerate(alone):
        for j, want in enumerate(single["choices"]):
            got = whole["choices"][2 * i + j]
            assert got["text"] == want["text"] and got["text"].startswith(texts[i])
            assert got["finish_reason"] == want["finish_reason"]
            assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
            assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)
    for key in ("prompt_tokens", "completion_tokens"):
        assert whole["usage"][key] == sum(single["usage"][key] for single in alone)


def test_a_streamed_batch_sends_each_choice_under_its_index(served):
    _, url = served
    body = {"prompt": ["abc", "de"], "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "echo": True}
    whole = post(url, "completions", body)
    stream = body | {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    texts = ["", "", "", ""]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12


def test_chat_logprobs_and_top_logprobs(served):
    _, url = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    choice = post(url, "chat/completions", body | {"logprobs": True, "top_logprobs": 2})["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"} and len(item["top_logprobs"]) == 2
        assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"], abs=1e-6)
        if item["bytes"] is not None:  # null for a piece of a character (named token_id:N)
            assert item["bytes"] == list(item["token"].encode())
    assert post(url, "chat/completions", body)["choices"][0]["logprobs"] is None  # not asked: none computed


def test_streamed_chunks_carry_their_tokens_logprobs(served):
    _, url = served
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "logprobs": 2, "stream": True}
    whole = post(url, "completions", {k: v for k, v in body.items() if k not in ("stream", "model")})
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = [c["choices"][0]["logprobs"] for c in chunks]
    assert [t for lp in streamed for t in lp["token_logprobs"]] == pytest.approx(
        whole["choices"][0]["logprobs"]["token_logprobs"], abs=1e-6
    )
    assert [lp["text_offset"][0] for lp in streamed] == list(range(5))


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
        ("completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_logprob_requests_are_refused_naming_the_parameter(served, path, extra, param):
    _, url = served
    response = httpx.post(f"{url}/v1/{path}", json={"model": "tiny", **extra}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_streamed_echo_sends_the_prompt_and_its_logprobs_first(served):
    _, url = served
    # greedy and past eos: sampled, an eos (about 1 in 257 a step here) would end it after one token
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 2, "logprobs": 1, "echo": True, "stream": True}
    body |= {"temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    first = chunks[0]["choices"][0]
    assert first["text"] == "abc" and first["logprobs"]["tokens"] == ["a", "b", "c"]
    assert first["logprobs"]["token_logprobs"][0] is None and first["logprobs"]["text_offset"] == [0, 1, 2]
    assert [c["choices"][0]["logprobs"]["text_offset"][0] for c in chunks[1:]] == [3, 4]


@pytest.mark.parametrize("kind", ["retnet", "transformer"])
def test_the_prompt_is_scored_piece_by_piece_as_in_one_forward(kind):
    """An echoed prompt's logits come in pieces (memory flat in the prompt's length), each continuing the last."""
    from retentive.serving import backend_for

    model = tiny_model(kind)
    ids = TOKENIZER.encode("pieces of a longer prompt, cut every five tokens")
    pieces = list(backend_for(model, max_batch=2).prompt_logits(ids, piece=5))
    assert [p.shape[0] for p in pieces] == [5] * (len(ids) // 5) + [len(ids) % 5]
    with torch.no_grad():
        whole = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-4, atol=1e-4)
