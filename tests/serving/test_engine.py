"""The scheduler without HTTP: continuous batching gives each request what generate() gives it alone."""

from __future__ import annotations

import io
import os
import queue
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from servekit import greedy, tiny_model

from retentive.data import ByteTokenizer, train_bpe
from retentive.serving import Engine, PrefixCache, Request, SamplingParams, backend_for
from retentive.serving.engine import Delta, Done, Failed, QueueFull, TextStream, release_openmp_workers, sample_token


class Collector:
    """The ``emit`` of a request: keeps its events for the test thread."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()

    def __call__(self, event) -> None:
        self.events.put(event)

    def wait(self, timeout: float = 60) -> tuple[list[Delta], Done]:
        deltas = []
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, Done):
                return deltas, event
            assert isinstance(event, Delta), event
            deltas.append(event)


def wait_for(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def make_engine(kind: str = "retnet", max_batch: int = 32, **kw) -> Engine:
    model = tiny_model(kind)
    return Engine(backend_for(model, max_batch), ByteTokenizer(), eos_token_id=None, **kw)


def submit(engine: Engine, prompt: list[int], max_tokens: int, **params) -> tuple[Request, Collector]:
    collector = Collector()
    request = Request(prompt, SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **params}), collector)
    engine.submit(request)
    return request, collector


@pytest.mark.parametrize("kind", ["retnet", "transformer"])
def test_greedy_alone_and_among_16_others_equals_generate(kind):
    engine = make_engine(kind, max_batch=32, prefill_chunk=24)
    torch.manual_seed(2)
    prompts = [torch.randint(0, 256, (int(n),)).tolist() for n in torch.randint(1, 120, (17,))]
    lengths = [int(n) for n in torch.randint(4, 20, (17,))]
    want = [greedy(engine.backend.model, p, n) for p, n in zip(prompts, lengths, strict=True)]
    engine.start()
    try:
        request, collector = submit(engine, prompts[0], lengths[0])  # alone
        collector.wait()
        assert request.sequences[0].tokens == want[0]
        running = [submit(engine, p, n) for p, n in zip(prompts, lengths, strict=True)]  # 17 at once
        for (request, collector), tokens in zip(running, want, strict=True):
            _, done = collector.wait()
            assert request.sequences[0].tokens == tokens
            assert done.completion_tokens == len(tokens)
    finally:
        engine.shutdown()
    assert len(engine.free) == 32 and not engine.decoding and not engine.prefilling


def test_a_long_prompt_is_prefilled_in_pieces_between_decode_steps():
    engine = make_engine(prefill_chunk=32)
    engine.start()
    try:
        short = Request([1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0), Collector())
        engine.submit(short)
        wait_for(lambda: short.sequences and short.sequences[0].tokens)
        decoded: list[int] = []  # the short request's token count when the long one is submitted and answered

        def on_long(event):
            if not decoded[1:]:
                decoded.append(len(short.sequences[0].tokens))

        long = Request(list(range(256)) * 4, SamplingParams(max_tokens=2, temperature=0.0), on_long)
        decoded.append(len(short.sequences[0].tokens))
        engine.submit(long)
        wait_for(lambda: long.finished)
        # 1,024 prompt tokens in 32 pieces of 32: the short request decoded a token after each of the first 31
        assert decoded[1] - decoded[0] >= 31
    finally:
        engine.shutdown()


def test_prompt_state_cache_resumes_exactly():
    cache = PrefixCache("test", max_bytes=2**30)
    engine = make_engine(prefix_cache=cache, prefill_chunk=16)
    header = list(b"system: you are a tiny random model.\n")
    prompts = [header + list(b"user: hello\n"), header + list(b"user: something else\n")]
    want = [greedy(engine.backend.model, p, 12) for p in prompts]
    engine.start()
    try:
        for prompt, tokens in zip(prompts + prompts, want + want, strict=True):
            request = Request(
                prompt, SamplingParams(max_tokens=12, temperature=0.0), (c := Collector()), cache_points=[len(header)]
            )
            engine.submit(request)
            c.wait()
            assert request.sequences[0].tokens == tokens
            last_cached = request.cached_tokens
        assert last_cached == len(prompts[1])  # the repeat skipped its whole prefill
    finally:
        engine.shutdown()
    assert cache.hits == 3 and cache.misses == 1  # the second prompt resumed after the header


def test_sampling_is_reproducible_per_request_and_top_k_1_is_greedy():
    engine = make_engine()
    engine.start()
    try:
        prompt = list(b"The quick brown fox")

        def run(**params):
            request, collector = submit(engine, prompt, 16, **params)
            collector.wait()
            return [s.tokens for s in request.sequences]

        params = dict(temperature=1.0, seed=5)
        a, b = run(**params), run(**params)
        assert a == b
        assert run(temperature=1.0, seed=6) != a
        assert run(temperature=1.0, top_k=1, seed=7) == run()
        assert run(temperature=0.7, top_p=1e-6, seed=8) == run()
        request = Request(prompt, SamplingParams(max_tokens=16, temperature=1.0, seed=5), (c := Collector()), n=3)
        engine.submit(request)
        c.wait()
        assert request.sequences[0].tokens == a[0]  # choice i samples with seed + i
        assert len({tuple(s.tokens) for s in request.sequences}) == 3
    finally:
        engine.shutdown()


def test_sample_token_keeps_only_the_top_p_set():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    seen = {sample_token(logits, 1.0, 0, 0.7, g) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    seen = {sample_token(logits, 1.0, 3, 1.0, g) for _ in range(300)}
    assert seen == {0, 1, 2}


def test_text_stream_holds_back_a_possible_stop_string():
    stream = TextStream(ByteTokenizer(), stop=["END"])
    out = [stream.push(t) for t in b"abcEN"]
    assert "".join(t for t, _ in out) == "abc"  # "EN" may begin "END"
    assert stream.push(ord("X")) == ("ENX", False)
    assert stream.push(ord("E")) == ("", False)
    assert stream.push(ord("N")) == ("", False)
    assert stream.push(ord("D")) == ("", True)
    euro = TextStream(ByteTokenizer(), stop=[])
    assert [euro.push(t)[0] for t in "a€".encode()] == ["a", "", "", "€"]


BPE = train_bpe(["Retention decays: γ per head, θ per pair. Ünïcödé — €uro, 漢字, emoji 🙂 and plain ascii."], 300)


@settings(max_examples=150, deadline=None)
@given(
    tokenizer=st.sampled_from([ByteTokenizer(), BPE]),
    data=st.data(),
    stop=st.sampled_from(["", "ab", "€", " θ"]),
)
def test_text_stream_gives_out_the_text_of_all_its_tokens_up_to_a_stop_string(tokenizer, data, stop) -> None:
    """Token by token, then flushed, a stream gives out what decoding every id at once gives, cut before the
    first stop string: the window it decodes (a few tokens, not all) loses and doubles nothing, with characters
    cut between tokens (high bytes) and with ids that decode to nothing (end of text)."""
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=60))
    stream, out = TextStream(tokenizer, [stop] if stop else []), []
    for token in ids:
        text, stopped = stream.push(token)
        out.append(text)
        if stopped:
            break
    else:
        out.append(stream.flush())
    full = tokenizer.decode(ids)
    assert "".join(out) == (full[: full.find(stop)] if stop and stop in full else full)


def test_queue_limit_and_cancelled_requests_free_their_slots():
    engine = make_engine(max_batch=1, max_queue=1)
    engine.start()
    try:
        first, _ = submit(engine, [1, 2], 4000, ignore_eos=True)
        wait_for(lambda: first.sequences)
        second, _ = submit(engine, [3, 4], 4000)
        with pytest.raises(Exception, match="waiting"):
            submit(engine, [5], 4)
        first.cancel()
        second.cancel()
        _, collector = submit(engine, [6, 7], 3)
        collector.wait()
    finally:
        engine.shutdown()
    assert engine.free == [0] and not engine.waiting


def test_a_batch_of_requests_is_queued_whole_or_not_at_all():
    engine = make_engine(max_batch=1, max_queue=2)  # not started: whatever is submitted waits
    batch = [Request([i + 1], SamplingParams(max_tokens=1), Collector()) for i in range(3)]
    with pytest.raises(QueueFull, match="at most 2"):
        engine.submit(*batch)
    assert not engine.waiting
    engine.submit(*batch[:2])
    assert list(engine.waiting) == batch[:2]
    with pytest.raises(QueueFull):
        engine.submit(batch[2])


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-40, 1.0), (5e-324, 1.0), (1.0, 1e-46), (1e-40, 1e-46)])
def test_a_tiny_temperature_or_top_p_samples_the_likeliest_token(temperature, top_p):
    logits = torch.tensor([0.5, 3.0, -2.0, 2.999])
    assert sample_token(logits, temperature, 0, top_p, torch.Generator().manual_seed(0)) == 1


def test_extreme_sampling_parameters_and_huge_seeds_answer_and_free_their_slots():
    engine = make_engine(max_batch=16)
    prompt = list(b"The quick brown fox")
    want = greedy(engine.backend.model, prompt, 6)
    engine.start()
    try:
        cases = [dict(temperature=1e-40), dict(temperature=5e-324), dict(temperature=1.0, top_p=1e-46)]
        cases += [dict(temperature=1.0, seed=2**64 + 3), dict(temperature=1.0, seed=2**64 - 1)]
        for params in cases:
            request, collector = submit(engine, prompt, 6, ignore_eos=True, **params)
            _, done = collector.wait()
            assert done.completion_tokens == 6
            if params.get("seed") is None:
                assert request.sequences[0].tokens == want
    finally:
        engine.shutdown()
    assert len(engine.free) == 16


def test_a_failure_in_one_request_fails_it_alone_and_frees_its_slots(monkeypatch):
    """Sampling raises for the request at temperature 0.5 (3 choices), mid-decode: the others are untouched."""
    from retentive.serving import engine as engine_module

    calls = {"n": 0}

    def failing(logits, temperature, top_k, top_p, generator):
        if temperature == 0.5:
            calls["n"] += 1
            if calls["n"] > 6:  # two tokens each, then a failure
                raise RuntimeError("injected")
        return sample_token(logits, temperature, top_k, top_p, generator)

    monkeypatch.setattr(engine_module, "sample_token", failing)
    engine = make_engine(max_batch=8)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 256, (int(n),)).tolist() for n in (5, 40, 17, 9)]
    want = [greedy(engine.backend.model, p, 30) for p in prompts]
    engine.start()
    try:
        running = [submit(engine, p, 30, ignore_eos=True) for p in prompts[:2]]
        bad = Request(prompts[2], SamplingParams(max_tokens=30, temperature=0.5), (bad_events := Collector()), n=3)
        engine.submit(bad)
        running += [submit(engine, p, 30, ignore_eos=True) for p in prompts[2:]]
        for (request, collector), tokens in zip(running, want, strict=True):
            collector.wait()
            assert request.sequences[0].tokens == tokens
        events = []
        while not events or isinstance(events[-1], Delta):
            events.append(bad_events.events.get(timeout=60))
        assert isinstance(events[-1], Failed) and "injected" in events[-1].message
        assert bad.failed and all(s.slot == -1 for s in bad.sequences)
        _, collector = submit(engine, prompts[0], 4)  # the engine still serves
        collector.wait()
    finally:
        engine.shutdown()
    assert sorted(engine.free) == list(range(8)) and not engine.decoding and not engine.prefilling


def test_a_freed_slot_goes_to_the_client_holding_the_fewest():
    """Client a holds both slots and waits for a third; b's later request gets the first slot freed, not a's."""
    engine = make_engine(max_batch=2)
    endless = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    engine.start()
    try:
        held = [Request([i + 1], endless, Collector(), client="a") for i in range(2)]
        for request in held:
            engine.submit(request)
        wait_for(lambda: all(r.sequences and r.sequences[0].tokens for r in held))
        older = Request([3], endless, Collector(), client="a")
        engine.submit(older)
        other = Request([4], endless, Collector(), client="b")
        engine.submit(other)
        held[0].cancel()
        wait_for(lambda: other.sequences and other.sequences[0].tokens, timeout=10)
        assert not older.sequences  # still waiting: a holds a slot, b held none
        for request in (held[1], older, other):
            request.cancel()
    finally:
        engine.shutdown()
    assert sorted(engine.free) == [0, 1]


def test_a_cached_state_of_the_wrong_shape_is_dropped_and_the_prompt_read_afresh(tmp_path):
    """A file with a valid checksum but tensors of the wrong shape (another model's, say) fails nobody."""
    from retentive.serving.prefix_cache import LOGITS

    prompt = list(b"a prompt whose state was damaged")
    wrong = PrefixCache("fp", max_bytes=10_000, directory=tmp_path, max_disk_bytes=2**20)
    wrong.insert(prompt, {"S.0": torch.zeros(3, 3), LOGITS: torch.zeros(257)})
    wrong.insert([1], {"S.0": torch.zeros(2400)})  # evicts the first to disk
    assert prompt in wrong and len(wrong.disk) == 1
    cache = PrefixCache("fp", max_bytes=2**30, directory=tmp_path, max_disk_bytes=2**20)
    engine = make_engine(prefix_cache=cache, prefill_chunk=8)
    want = greedy(engine.backend.model, prompt, 5)
    engine.start()
    try:
        for _ in range(2):
            request, collector = submit(engine, prompt, 5)
            collector.wait()
            assert request.sequences[0].tokens == want
        assert request.cached_tokens == len(prompt)  # the second read the good state the first one cached
    finally:
        engine.shutdown()


def test_starting_an_engine_frees_the_callers_openmp_workers_which_come_back_when_needed():
    """Engine.start frees the calling thread's OpenMP workers (with libgomp, torch's runtime on Linux, so that the
    engine's thread keeps libgomp's spinning barriers); a later parallel op on the caller computes as before."""
    x = torch.randn(2_000_000, dtype=torch.float64)
    want = x.sum()
    with open("/proc/self/maps") if os.path.exists("/proc/self/maps") else io.StringIO() as maps:
        libgomp = "libgomp" in maps.read()
    assert release_openmp_workers() == libgomp
    assert torch.equal(x.sum(), want)  # the workers come back
