"""The server over HTTP on 127.0.0.1, through the official ``openai`` client (and raw HTTP for malformed input)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from servekit import greedy, running, tiny_model

from retentive.cli import main
from retentive.data import ByteTokenizer
from retentive.serving import ServeConfig, ServerLimits, build_app, load_checkpoint

TOKENIZER = ByteTokenizer()
LIMITS = ServerLimits(max_prompt_tokens=600, max_tokens=4000, default_max_tokens=16)
PROMPTS = ["Once upon a time", "x", "The server batches requests of different lengths " * 3, "ünïcödé ✓ " * 4]


def config(**kw) -> ServeConfig:
    return ServeConfig(**{"max_batch": 32, "prefill_chunk": 16, "limits": LIMITS, **kw})


@pytest.fixture(scope="module", params=["retnet", "transformer"])
def served(request):
    """(model, base URL): a tiny model of each kind behind a running server."""
    model = tiny_model(request.param)
    with running(build_app(model, TOKENIZER, "tiny", config())) as url:
        yield model, url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(model, prompt: str, n: int) -> str:
    return TOKENIZER.decode(greedy(model, TOKENIZER.encode(prompt), n))


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def complete(url: str, prompt: str, n: int, **kw) -> str:
    out = client(url).completions.create(
        model="tiny", prompt=prompt, max_tokens=n, temperature=0, extra_body={"ignore_eos": True}, **kw
    )
    return out.choices[0].text


def test_greedy_completions_equal_generate_alone_and_among_16_others(served):
    model, url = served
    assert complete(url, PROMPTS[0], 20) == expected(model, PROMPTS[0], 20)
    prompts = [PROMPTS[i % len(PROMPTS)] + str(i) for i in range(17)]
    with ThreadPoolExecutor(17) as pool:
        texts = list(pool.map(lambda i: complete(url, prompts[i], 8 + i), range(17)))
    assert texts == [expected(model, p, 8 + i) for i, p in enumerate(prompts)]
    h = health(url)
    assert h["free_slots"] == h["max_batch"] and h["waiting"] == 0


def test_streaming_gives_the_same_text(served):
    model, url = served
    for prompt in PROMPTS:
        stream = client(url).completions.create(
            model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = list(stream)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected(model, prompt, 24)
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 24
        assert chunks[-1].usage.prompt_tokens == len(TOKENIZER.encode(prompt))


def test_chat_streamed_and_not_and_the_cached_prefix_gives_the_same_tokens(served):
    model, url = served
    system = {"role": "system", "content": "You are a tiny model with random weights. " * 3}
    questions = ["Hello?", "What is retention?", "Hello?"]
    before, cached = health(url)["prompt_cache"], []
    for question in questions:
        messages = [system, {"role": "user", "content": question}]
        rendered = f"system: {system['content']}\nuser: {question}\nassistant:"
        want = expected(model, rendered, 12)
        args = dict(model="tiny", messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        reply = client(url).chat.completions.create(**args)
        assert reply.choices[0].message.content == want and reply.choices[0].message.role == "assistant"
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        streamed = client(url).chat.completions.create(stream=True, **args)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == want
    # nothing, then the system message, then the whole repeated prompt came from the cache
    assert cached == [0, len(f"system: {system['content']}\n"), len(rendered)]
    after = health(url)["prompt_cache"]
    # the first call missed; every later one found the system prompt or, repeated, the whole prompt
    assert after["hits"] - before["hits"] == 5 and after["misses"] - before["misses"] == 1


def test_stop_strings_seeds_and_n(served):
    model, url = served
    full = expected(model, PROMPTS[0], 30)
    stop = full[10:13]
    out = client(url).completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    sampled = dict(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0.9, top_p=0.9, seed=3)
    first = client(url).completions.create(n=3, **sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert client(url).completions.create(**sampled).choices[0].text == first.choices[0].text


def test_models_and_health(served):
    _, url = served
    assert [m.id for m in client(url).models.list()] == ["tiny"]
    assert health(url)["status"] == "ok"


@pytest.fixture(scope="module")
def retnet_url():
    # a prompt-state cache of 1 MiB fills up during the load test's warm-up: what grows after is a leak
    with running(build_app(tiny_model("retnet"), TOKENIZER, "tiny", config(max_batch=4, prompt_cache_mib=1))) as url:
        yield url


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "model"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "x" * 601}, 400, "prompt"),
        ({"model": "tiny", "prompt": [1, 2, 999]}, 400, "prompt"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt"),
        ({"model": "tiny", "prompt": "hi", "temperature": 2.5}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ({"model": "tiny", "prompt": "hi", "top_k": -2}, 400, "top_k"),
        ({"model": "tiny", "prompt": "hi", "n": 5}, 400, "n"),
        ({"model": "tiny", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "tiny", "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
        ({"model": "tiny", "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
        ({"model": "tiny"}, 400, "prompt"),
        ({"model": "tiny", "prompt": []}, 400, "prompt"),
        ({"model": "tiny", "prompt": ["hi", ""]}, 400, "prompt"),
        ({"model": "tiny", "prompt": [[1, 2], []]}, 400, "prompt"),
        ({"model": "tiny", "prompt": ["hi", [1, 2]]}, 400, "prompt"),
        ({"model": "tiny", "prompt": [[1, 2], [3, 999]]}, 400, "prompt"),
        ({"model": "tiny", "prompt": ["hi", "x" * 601]}, 400, "prompt"),
        ({"model": "tiny", "prompt": ["hi"] * 65}, 400, "prompt"),  # over the queue (64): it could never be queued
    ],
)
def test_bad_input_gets_an_openai_error_body(retnet_url, body, status, param):
    response = httpx.post(f"{retnet_url}/v1/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param


def test_malformed_json_unknown_routes_and_the_openai_client_errors(retnet_url):
    response = httpx.post(
        f"{retnet_url}/v1/chat/completions",
        content=b'{"model": "tiny", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert httpx.get(f"{retnet_url}/v1/nothing").json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        client(retnet_url).completions.create(model="gpt-4", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client(retnet_url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 700}])


def wait_for_free_slots(url: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["free_slots"] == h["max_batch"] and h["running"] == 0 and h["waiting"] == 0:
            return h
        assert time.monotonic() < deadline, f"slots not freed: {h}"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_its_slot(retnet_url):
    stream = client(retnet_url).completions.create(
        model="tiny", prompt="go on", max_tokens=4000, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for _, _ in zip(range(3), stream, strict=False):
        pass
    assert health(retnet_url)["running"] == 1
    stream.close()  # mid-stream
    wait_for_free_slots(retnet_url)
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(
            f"{retnet_url}/v1/completions",
            json={"model": "tiny", "prompt": "go on", "max_tokens": 4000, "ignore_eos": True},
            timeout=0.5,
        )
    wait_for_free_slots(retnet_url)


def test_a_full_queue_answers_429():
    app = build_app(tiny_model("retnet"), TOKENIZER, "tiny", config(max_batch=1, max_queue=1))
    with running(app) as url:
        args = dict(model="tiny", prompt="go", max_tokens=4000, stream=True, extra_body={"ignore_eos": True})
        first = client(url).completions.create(**args)
        next(iter(first))
        second = client(url).completions.create(**args)  # waits for the slot
        deadline = time.monotonic() + 10
        while health(url)["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError):
            client(url).completions.create(model="tiny", prompt="go", max_tokens=2)
        first.close()
        second.close()
        wait_for_free_slots(url)


@pytest.mark.slow
def test_a_thousand_requests_leak_no_slot_and_no_memory(retnet_url):
    """1,000 short requests from 16 threads: every slot free after, resident memory within 24 MiB of the start."""
    process = psutil.Process(os.getpid())
    http = client(retnet_url)

    def one(i: int) -> int:
        out = http.completions.create(model="tiny", prompt=f"request {i}", max_tokens=3, temperature=0.8, seed=i)
        return out.usage.completion_tokens

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(200)))  # warm up: allocator pools, connections, caches reach their size
        gc.collect()
        before, start = process.memory_info().rss, time.monotonic()
        tokens = list(pool.map(one, range(1000)))
    elapsed = time.monotonic() - start
    gc.collect()
    grown = process.memory_info().rss - before
    assert len(tokens) == 1000 and all(1 <= t <= 3 for t in tokens)
    assert elapsed < 240
    assert grown < 24 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB over 1,000 requests"
    wait_for_free_slots(retnet_url)


def test_retentive_serve_command(tmp_path):
    """The command line serves a saved checkpoint; load_checkpoint also reads a Transformer one."""
    for kind in ("retnet", "transformer"):
        tiny_model(kind).save_pretrained(tmp_path / kind)
        TOKENIZER.save(tmp_path / kind)
    model, tokenizer = load_checkpoint(tmp_path / "transformer")
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.kind == "bytes"
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        tiny_model("retnet").save_pretrained(tmp_path / "bare")
        load_checkpoint(tmp_path / "bare")
    port = free_port()
    command = [sys.executable, "-m", "retentive.cli", "serve", str(tmp_path / "retnet"), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                assert health(url)["kind"] == "retnet"
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        out = client(url).completions.create(model="retnet", prompt="hi", max_tokens=5, temperature=0)
        assert out.usage.completion_tokens <= 5
    finally:
        server.terminate()
        server.wait(timeout=30)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(folder, *options: str) -> tuple[subprocess.Popen, str]:
    """``retentive serve FOLDER OPTIONS`` in a subprocess, once it answers ``/health``: (process, base URL)."""
    port = free_port()
    command = [sys.executable, "-m", "retentive.cli", "serve", str(folder), "--port", str(port), *options]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    while True:
        try:
            health(url)
            return server, url
        except httpx.TransportError:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.2)


def test_sigterm_drains_for_the_shutdown_timeout_then_exits(tmp_path):
    """A stream that would run for minutes is cut after --shutdown-timeout; the process exits."""
    tiny_model("retnet").save_pretrained(tmp_path)
    TOKENIZER.save(tmp_path)
    options = ["--max-tokens", "1000000", "--default-max-tokens", "16", "--shutdown-timeout", "1"]
    server, url = serve_process(tmp_path, *options)
    try:
        stream = client(url).completions.create(
            model=tmp_path.name, prompt="go", max_tokens=1_000_000, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        start = time.monotonic()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert time.monotonic() - start < 10
        assert "Traceback" not in server.stdout.read()
    finally:
        server.kill()
        server.wait()


def test_serve_verifies_a_checkpoint_folders_manifest(tmp_path):
    from retentive.training.checkpoint import CheckpointError, save_checkpoint

    def write(folder):
        tiny_model("retnet").save_pretrained(folder)
        TOKENIZER.save(folder)

    ckpt = save_checkpoint(tmp_path / "run", 1, write)
    assert type(load_checkpoint(ckpt)[0]).__name__ == "RetNetForCausalLM"
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    for folder in (ckpt, tmp_path / "run"):
        with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt"):
            load_checkpoint(folder)
    with pytest.raises(SystemExit, match=r"^error: checkpoint file .*model.safetensors is corrupt"):
        main(["serve", str(ckpt)])


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "99999", r"--port must lie in \[0, 65535\]"),
        ("--max-tokens", "0", "--max-tokens must be >= 1"),
        ("--default-max-tokens", "5000", r"--default-max-tokens must lie in \[1, --max-tokens=4096\]"),
        ("--max-batch", "0", "--max-batch must be >= 1"),
        ("--max-n", "17", r"--max-n must lie in \[1, --max-batch=16\]"),
        ("--max-body-mib", "0", "--max-body-mib must be > 0"),
        ("--shutdown-timeout", "-1", "--shutdown-timeout must be >= 0"),
        ("--device", "nonsense", "--device nonsense is not a device"),
    ],
)
def test_serve_options_are_refused_in_one_line(tmp_path, option, value, message):
    with pytest.raises(SystemExit, match=rf"^error: {message}") as err:
        main(["serve", str(tmp_path / "not-read"), option, value])
    assert "\n" not in str(err.value.code)
