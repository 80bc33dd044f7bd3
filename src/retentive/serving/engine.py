"""Continuous batching: one scheduler thread runs the model; requests join and leave the batch at every step.

Each running sequence (one choice of a request) holds one state slot of the backend. Every iteration of the loop:

1. drops cancelled requests (a client that went away) and frees their slots;
2. admits waiting requests while there are free slots for all their choices: the oldest request of the client that
   holds the fewest slots first, so that one client's requests cannot keep every slot from the others;
3. reads one piece of at most ``prefill_chunk`` prompt tokens of the oldest request still in prefill (the chunkwise
   form), so that a long prompt never stalls the requests already decoding for more than one piece; a prompt whose
   prefix the prompt-state cache holds starts from that state (looked up when its prefill begins);
4. decodes one token for every decoding sequence, all in one batch, and samples each with its own generator.

A sequence ends on its end-of-text token, a stop string or ``max_tokens``; its slot is free for the next request at
once. Events go back to the caller through the request's ``emit`` callback (called on this thread).

Whatever fails while serving one request (its seed, its prefill, a cached state that does not fit, sampling, its
``emit``) fails that request alone: it gets a :class:`Failed` event and its slots are freed, and the others go on.
Only a failure of the batched decode step itself fails every request in that batch.
"""

from __future__ import annotations

import ctypes
import heapq
import logging
import os
import secrets
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..data import Tokenizer
from ..models.decoding import greedy
from .backends import Backend
from .prefix_cache import LOGITS, PrefixCache

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its limit: the caller answers 429."""


class Unsupported(ValueError):
    """A request asks for what this engine cannot do: the caller answers 400, naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How one request samples. ``temperature == 0`` is greedy; ``top_k`` 0 or less and ``top_p == 1`` are off."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # report each token's log-probability and this many of the likeliest; None: no
    echo: bool = False  # with logprobs: report the prompt's tokens too (one :class:`PromptLogprobs` event)


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model (log-softmax of the logits, before temperature, top-k and
    top-p), with the ``top`` likeliest tokens and theirs."""

    token: int
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: list[tuple[int, float]]


@dataclass
class Delta:
    """The text one new token of choice ``index`` adds (``""`` while it is held back: part of a character or of a
    possible stop string); ``finish_reason`` ("stop" | "length") on the last one; the token's ``logprob`` when the
    request asked for them."""

    index: int
    text: str
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


@dataclass
class PromptLogprobs:
    """The prompt's tokens with their log-probabilities, before the first :class:`Delta` of a request that asked
    for ``echo`` and ``logprobs``; the first token has none (nothing precedes it)."""

    tokens: list[TokenLogprob]


@dataclass
class Done:
    """The request is complete: its token counts (``cached_tokens``: prompt tokens read from the prompt cache)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Failed:
    """The request failed inside the engine."""

    message: str


Event = Delta | PromptLogprobs | Done | Failed


class TextStream:
    """Decodes one sequence's tokens to text as they come, holding back what might still become a stop string.

    Each token decodes only a window of the last tokens: the text of ``ids[prefix:]`` past that of
    ``ids[prefix:read]`` is the text the tokens after ``read`` add (as in vLLM's detokenizer), so a token costs the
    same at any length, where decoding every id at every token would cost O(length). While the window ends in a
    character cut between tokens (U+FFFD), its tokens wait for the character's other bytes.

    Args:
        tokenizer: decodes the ids.
        stop: strings that end the sequence; they are not part of the text.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # the text of ids[:read]
        self.prefix = self.read = 0  # the window decodes ids[prefix:]; its text up to read is in self.text
        self.sent = 0  # characters of the text already given out

    def _read(self, final: bool = False) -> None:
        """Add the text of the tokens after ``read`` to ``self.text`` (unless it ends in a cut character and more
        tokens may come)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") and not final:
            return
        if after.startswith(before):
            self.text += after[len(before) :]
        else:  # a tokenizer whose text of a window depends on what precedes it: the whole text, once
            self.text = self.tokenizer.decode(self.ids)
        self.prefix, self.read = self.read, len(self.ids)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; returns the text that is now safe to give out and whether a stop string was reached."""
        self.ids.append(token)
        self._read()
        text = self.text
        ends = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if ends:
            end = min(ends)
            delta, self.sent = text[self.sent : end], end
            return delta, True
        held = max((_overlap(text, s) for s in self.stop), default=0)
        safe = max(self.sent, len(text) - held)
        delta, self.sent = text[self.sent : safe], safe
        return delta, False

    def flush(self) -> str:
        """The text held back, at the end of the sequence."""
        self._read(final=True)
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta

    def take(self, token: int, count: int, params: SamplingParams, eos_token_id: int | None) -> tuple[str, str | None]:
        """The sequence's ``count``-th token: the text it gives out and the finish reason it brings, None if the
        sequence goes on: "stop" at the end-of-text token (unless ``ignore_eos``; its text is not given out) or a
        stop string, "length" at ``max_tokens``."""
        if token == eos_token_id and not params.ignore_eos:
            return self.flush(), "stop"
        text, stopped = self.push(token)
        reason = "stop" if stopped else "length" if count >= params.max_tokens else None
        return (text + self.flush() if reason == "length" else text), reason


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of ``text`` that begins ``stop`` (a stop string that may be coming)."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


@dataclass(eq=False)  # compared by identity: a sequence is one running thing
class Sequence:
    """One choice of a request: its slot, its sampling generator, its tokens and text."""

    index: int
    slot: int
    generator: torch.Generator
    text: TextStream
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Request:
    """A prompt to continue, with ``n`` choices.

    Args:
        prompt: the prompt's token ids.
        params: how to sample.
        emit: called with each :class:`Delta`, then one :class:`Done` (or :class:`Failed`), on the engine's thread.
        n: the number of choices, each continued from the same prompt state.
        cache_points: prompt lengths (besides the whole prompt) after which the state is worth caching, such as
            the end of each chat message.
        client: who sent it (an address, say): admission shares the slots fairly between clients.
    """

    def __init__(
        self,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        n: int = 1,
        cache_points: list[int] | None = None,
        client: str = "",
    ) -> None:
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        self.prompt, self.params, self.emit, self.n, self.client = prompt, params, emit, n, client
        self.cache_points = sorted({p for p in cache_points or [] if 0 < p < len(prompt)} | {len(prompt)})
        self.prefilled = 0  # prompt tokens read so far
        self.cached_tokens = 0  # prompt tokens taken from the prompt-state cache
        self.looked_up = False  # whether the prompt-state cache was asked for this prompt
        self.sequences: list[Sequence] = []
        self.cancelled = False
        self.failed = False  # the engine failed it: it holds no slot and gets no more events

    def cancel(self) -> None:
        """Stop generating (the client went away); the engine frees the slots at its next iteration."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.finish_reason is not None for s in self.sequences)


def release_openmp_workers() -> bool:
    """Free the calling thread's OpenMP workers (OpenMP 5's ``omp_pause_resource_all``) where torch's runtime is
    libgomp; returns whether it did.

    libgomp spins at a barrier only while it manages no more threads than there are CPUs. The thread that loaded
    the model keeps its workers after its last parallel region; with the engine thread's own they outnumber the
    CPUs, and every barrier of every step then sleeps and wakes: on 2 cores the native step at batch 1 took
    1.05-1.16 ms on the engine's thread against 0.33-0.40 ms on the main one, 1.99 against 1.48 at 16 rows
    (docs/serving.md). The workers come back at the caller's next parallel region."""
    try:
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # torch's own copy, only if it is loaded
        return libgomp.omp_pause_resource_all(1) == 0  # omp_pause_soft
    except (OSError, AttributeError):  # another OpenMP runtime, or a libgomp older than OpenMP 5
        return False


class ServingEngine(Protocol):
    """What the HTTP front end (``app.py``) asks of an engine: :class:`Engine` here, or transformers' continuous
    batching behind :class:`~retentive.serving.transformers_engine.TransformersEngine`.

    ``submit`` raises :class:`QueueFull` when the queue is at its limit and :class:`Unsupported` for what the engine
    cannot do; the request's events (:class:`Delta` ..., then :class:`Done` or :class:`Failed`) go to its ``emit``.
    A cancelled request gets a last ``Failed("cancelled")`` and frees what it holds.
    """

    vocab_size: int
    max_batch: int  # sequences running at once
    max_queue: int  # requests waiting at most

    def start(self) -> None: ...

    def shutdown(self, timeout: float | None = None) -> None: ...

    def submit(self, *requests: Request) -> None:
        """Queue ``requests`` (a batch of prompts), all or none."""
        ...

    def stats(self) -> dict:
        """At least ``kind``, ``max_batch``, ``free_slots``, ``running``, ``waiting``, ``steps``,
        ``prefill_tokens``, ``generated_tokens``, ``state_bytes``, ``peak_state_bytes``."""
        ...


class Engine:
    """The scheduler over a :class:`Backend`'s slots, on its own thread.

    Args:
        backend: the model and its slots (``backend.max_batch`` is the most sequences running at once).
        tokenizer: decodes the generated tokens.
        eos_token_id: ends a sequence (unless ``ignore_eos``); None: only stop strings and max_tokens do.
        max_queue: requests waiting for slots beyond which :meth:`submit` raises :class:`QueueFull`.
        prefill_chunk: prompt tokens read per iteration (one piece of one prompt between two decode steps).
        prefix_cache: the prompt-state cache, or None.
        cache_block: also cache the state every ``cache_block`` prompt tokens (0: only at the request's cache
            points and at the end of the prompt).
    """

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        eos_token_id: int | None,
        *,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        prefix_cache: PrefixCache | None = None,
        cache_block: int = 0,
    ) -> None:
        for name, value, low in (("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.backend, self.tokenizer, self.eos_token_id = backend, tokenizer, eos_token_id
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.prefix_cache, self.cache_block = prefix_cache, cache_block
        self.free = list(range(backend.max_batch))  # a heap: the lowest slots first, so running rows stay contiguous
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.decoding: list[tuple[Request, Sequence]] = []
        self.condition = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = self.prefill_tokens = self.generated_tokens = 0
        self.decode_seconds = 0.0  # in the batched decoding steps' forwards: what the time between tokens is made of
        self.peak_state_bytes = 0

    # --- the caller's side (any thread) ---

    def start(self) -> None:
        release_openmp_workers()  # the model runs on the engine's thread from now on
        self.thread = threading.Thread(target=self._run, name="retentive-engine", daemon=True)
        self.thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the thread after its current iteration; the requests it still holds get a :class:`Failed` event.

        Args:
            timeout: seconds to wait for the thread (None: as long as it takes); it is a daemon, so a thread still
                inside a long model call does not keep the process alive.
        """
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, *requests: Request) -> None:
        """Queue requests, all or none (a batch of prompts); raises :class:`QueueFull` when the queue cannot take
        them all: ``max_queue`` requests may wait."""
        n = max(r.n for r in requests)
        if n > self.backend.max_batch:
            raise ValueError(f"n={n} choices need more slots than the server has ({self.backend.max_batch})")
        with self.condition:
            waiting = sum(not r.cancelled for r in self.waiting)
            if waiting + len(requests) > self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting for a slot, of at most {self.max_queue}: retry later")
            self.waiting.extend(requests)
            self.condition.notify()

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    @property
    def max_batch(self) -> int:
        return self.backend.max_batch

    def stats(self) -> dict:
        """Slots, queue and counters (read without the lock: a snapshot, good enough for /health)."""
        out = {
            "kind": self.backend.kind,
            "max_batch": self.backend.max_batch,
            "free_slots": len(self.free),
            "running": len(self.decoding) + sum(len(r.sequences) for r in self.prefilling),
            "waiting": len(self.waiting),
            "steps": self.steps,
            "decode_seconds": self.decode_seconds,
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "state_bytes": self.backend.state_bytes(),
            "peak_state_bytes": self.peak_state_bytes,
        }
        if self.prefix_cache is not None:
            out["prompt_cache"] = self.prefix_cache.stats()
        return out

    # --- the engine's thread ---

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self.condition:
                    while not (self.stopping or self._has_work()):
                        self.condition.wait()
                    if self.stopping:
                        break
                try:
                    self._iteration()
                except Exception as e:  # the batched decode step (or a bug): fail what runs, keep serving
                    logger.exception("engine iteration failed")
                    self._fail_all(f"{type(e).__name__}: {e}")
                self.peak_state_bytes = max(self.peak_state_bytes, self.backend.state_bytes())
            self._fail_all("the server is shutting down")

    def _iteration(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._prefill_step()
        if self.decoding:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        """Free the slots of cancelled requests; each gets a last :class:`Failed` event, so no waiter hangs."""
        with self.condition:
            dropped = {id(r): r for r in self.waiting if r.cancelled}
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for request in [r for r in self.prefilling if r.cancelled]:
            self.prefilling.remove(request)
            dropped[id(request)] = request
            for seq in request.sequences:
                self._release(seq)
        for request, seq in [(r, s) for r, s in self.decoding if r.cancelled]:
            self.decoding.remove((request, seq))
            dropped[id(request)] = request
            self._release(seq)
        for request in dropped.values():
            request.emit(Failed("cancelled"))

    def _has_work(self) -> bool:
        """Whether an iteration would do anything (the caller holds the lock): a waiting request that cannot be
        admitted yet is no work, so the thread sleeps until a slot is freed instead of spinning."""
        cancelled = any(r.cancelled for r in self.waiting)
        return bool(self.prefilling or self.decoding or cancelled or self._next_waiting())

    def _next_waiting(self) -> Request | None:
        """The waiting request to admit next, if its choices fit in the free slots (the caller holds the lock).

        Fair between clients: the oldest request of the client holding the fewest slots now. It waits for enough
        free slots rather than let later, smaller requests pass it, so that a request with a large ``n`` never
        starves.
        """
        running = {id(r): r for r in (*self.prefilling, *(r for r, _ in self.decoding))}.values()
        held: dict[str, int] = {}
        for request in running:
            held[request.client] = held.get(request.client, 0) + request.n
        candidates = [r for r in self.waiting if not r.cancelled]
        if not candidates:
            return None
        request = min(candidates, key=lambda r: held.get(r.client, 0))  # min() keeps the oldest of equals
        return request if request.n <= len(self.free) else None

    def _admit(self) -> None:
        while True:
            with self.condition:
                request = self._next_waiting()
                if request is None:
                    return
                self.waiting.remove(request)
            try:
                generators = [self._generator(request.params.seed, index) for index in range(request.n)]
            except Exception as e:
                self._fail(request, e)
                continue
            for index, generator in enumerate(generators):  # nothing can fail between taking a slot and keeping it
                text = TextStream(self.tokenizer, request.params.stop)
                request.sequences.append(Sequence(index, heapq.heappop(self.free), generator, text))
            self.prefilling.append(request)

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        """Choice ``index``'s generator: seeded with ``seed + index`` (wrapped to torch's 64 bits), or at random."""
        seed = secrets.randbits(62) if seed is None else (seed + index) % 2**64
        return torch.Generator(device=self.backend.device).manual_seed(seed)

    def _prefill_step(self) -> None:
        """Prefill the oldest request by one piece. Its prompt is looked up in the prompt-state cache only now, when
        the requests before it have filled the cache: concurrent requests with one system prompt read it once."""
        while self.prefilling:
            request = self.prefilling[0]
            try:
                if not request.looked_up:
                    request.looked_up = True
                    if self._resume_from_cache(request):  # the whole prompt was cached: it decodes already
                        continue
                self._prefill_piece(request)
            except Exception as e:
                self._fail(request, e)
                continue
            return

    def _resume_from_cache(self, request: Request) -> bool:
        """Start ``request`` from the state of the longest cached prefix of its prompt; True if that is all of it.

        An entry whose tensors do not fit this model (a file changed on disk) is dropped, and the prompt is read
        from its start; a good one is (back) in memory once restored.
        """
        entry = None if self.prefix_cache is None else self.prefix_cache.lookup(request.prompt)
        if entry is None:
            return False
        prefix = request.prompt[: entry.length]
        tensors = {k: v for k, v in entry.tensors.items() if k != LOGITS}
        try:
            self.backend.check_snapshot(tensors, entry.length)
            logits = entry.tensors.get(LOGITS)
            if logits is None or tuple(logits.shape) != (self.backend.vocab_size,):
                raise ValueError(f"its {LOGITS} are not ({self.backend.vocab_size},)")
        except ValueError as e:
            logger.warning("prompt cache: the state after %d tokens does not fit (%s); dropped", len(prefix), e)
            self.prefix_cache.discard(prefix)
            return False
        self.backend.restore(request.sequences[0].slot, tensors, entry.length)
        self.prefix_cache.insert(prefix, entry.tensors)
        request.prefilled = request.cached_tokens = entry.length
        if entry.length < len(request.prompt):
            return False
        self.prefilling.remove(request)
        self._start_decoding(request, entry.tensors[LOGITS])
        return True

    def _prefill_piece(self, request: Request) -> None:
        """Read the next piece of the prompt: up to ``prefill_chunk`` tokens, cut at the next cache point."""
        start, first = request.prefilled, request.sequences[0]
        end = min(start + self.prefill_chunk, request.cache_points[bisect_right(request.cache_points, start)])
        if self.cache_block:
            end = min(end, (start // self.cache_block + 1) * self.cache_block)
        logits = self.backend.prefill(first.slot, request.prompt[start:end])
        request.prefilled = end
        self.prefill_tokens += end - start
        cache_here = end in request.cache_points or (self.cache_block and end % self.cache_block == 0)
        if self.prefix_cache is not None and cache_here and request.prompt[:end] not in self.prefix_cache:
            self.prefix_cache.insert(request.prompt[:end], {**self.backend.snapshot(first.slot), LOGITS: logits})
        if end == len(request.prompt):
            self.prefilling.remove(request)
            self._start_decoding(request, logits)

    def _start_decoding(self, request: Request, logits: Tensor) -> None:
        """Give every choice the prompt's state, sample its first token from ``logits`` (V,), and let it decode.
        With ``echo`` and ``logprobs``, the prompt's log-probabilities go out first (one forward over it, without
        the state: a prompt read from the prompt cache needs them too); ``max_tokens == 0`` ends the request here."""
        p = request.params
        if p.echo and p.logprobs is not None:
            scored, start = [TokenLogprob(request.prompt[0], None, [])], 0
            for piece in self.backend.prompt_logits(request.prompt):  # (length, V): position t predicts token t + 1
                targets = request.prompt[start + 1 : start + 1 + piece.shape[0]]
                scored += token_logprobs(piece[: len(targets)], targets, p.logprobs)
                start += piece.shape[0]
            request.emit(PromptLogprobs(scored))
        if p.max_tokens == 0:
            for seq in request.sequences:
                seq.finish_reason = "length"
                self._release(seq)
            request.emit(Done(len(request.prompt), 0, request.cached_tokens))
            return
        first = request.sequences[0]
        for seq in request.sequences[1:]:
            self.backend.fork(first.slot, seq.slot)
        running = [(request, s) for s in request.sequences]
        self.decoding += running
        self._take_tokens(logits[None].expand(request.n, -1), running)

    def _decode_step(self) -> None:
        self.decoding.sort(key=lambda rs: rs[1].slot)  # contiguous slots read the pool without a gather
        start = time.perf_counter()
        logits = self.backend.decode([s.slot for _, s in self.decoding], [s.tokens[-1] for _, s in self.decoding])
        self.decode_seconds += time.perf_counter() - start
        self.steps += 1
        self._take_tokens(logits, list(self.decoding))

    def _take_tokens(self, logits: Tensor, running: list[tuple[Request, Sequence]]) -> None:
        """Pick the next token of each row of ``logits`` (B, V), greedy or sampled with the row's own generator, and
        advance its sequence; a row that fails fails its request alone."""
        greedy_tokens = greedy(logits).tolist()
        for row, (request, seq) in enumerate(running):
            if request.failed:  # another of its choices failed earlier in this step
                continue
            p = request.params
            try:
                token = (
                    greedy_tokens[row]
                    if p.temperature == 0
                    else sample_token(logits[row], p.temperature, p.top_k, p.top_p, seq.generator)
                )
                logprob = None if p.logprobs is None else token_logprobs(logits[row, None], [token], p.logprobs)[0]
                self._advance(request, seq, token, logprob)
            except Exception as e:
                self._fail(request, e)

    def _advance(self, request: Request, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        """Take the sampled token: give out its text, and end the sequence if it is done."""
        seq.tokens.append(token)
        self.generated_tokens += 1
        text, reason = seq.text.take(token, len(seq.tokens), request.params, self.eos_token_id)
        request.emit(Delta(seq.index, text, reason, logprob))  # one event per token, its text possibly held back: ""
        if reason is None:
            return
        seq.finish_reason = reason
        self.decoding.remove((request, seq))
        self._release(seq)
        if request.finished:
            completion = sum(len(s.tokens) for s in request.sequences)
            request.emit(Done(len(request.prompt), completion, request.cached_tokens))

    def _release(self, seq: Sequence) -> None:
        self.backend.release(seq.slot)
        heapq.heappush(self.free, seq.slot)
        seq.slot = -1

    def _fail(self, request: Request, error: Exception | str) -> None:
        """End ``request`` alone: out of every list, its slots freed, a :class:`Failed` event to its client."""
        if isinstance(error, Exception):
            logger.error("request failed", exc_info=error)
            error = f"{type(error).__name__}: {error}"
        request.failed = True
        with self.condition:
            if request in self.waiting:
                self.waiting.remove(request)
        if request in self.prefilling:
            self.prefilling.remove(request)
        self.decoding = [(r, s) for r, s in self.decoding if r is not request]
        for seq in request.sequences:
            if seq.slot >= 0:
                self._release(seq)
        try:
            request.emit(Failed(error))
        except Exception:  # its client is gone: nobody to tell
            logger.exception("cannot tell a failed request's client")

    def _fail_all(self, message: str) -> None:
        """Fail every request the engine holds, waiting ones included (the decode step failed, or shutdown)."""
        with self.condition:
            waiting = list(self.waiting)
        running = {id(r): r for r in (*waiting, *self.prefilling, *(r for r, _ in self.decoding))}
        for request in running.values():
            self._fail(request, message)


def token_logprobs(logits: Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """Each row's token with its log-probability (float32 log-softmax of ``logits`` (N, V)) and the ``top``
    likeliest tokens with theirs."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if top == 0:
        return [TokenLogprob(t, lp, []) for t, lp in zip(tokens, chosen, strict=True)]
    values, ids = logprobs.topk(top, dim=-1)
    return [
        TokenLogprob(t, lp, list(zip(i, v, strict=True)))
        for t, lp, i, v in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)
    ]


def sample_token(logits: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token from ``logits`` (V,): scaled by the temperature, cut to the ``top_k`` best (if > 0), then to the
    smallest set whose probability reaches ``top_p`` (the order of Hugging Face's processors)."""
    # the largest logit becomes 0 before the division, so that a tiny temperature gives 0 and -inf (about greedy),
    # never inf - inf = nan; below float32's smallest normal number it would divide by zero
    logits = logits.float()
    logits = (logits - logits.max()) / max(temperature, torch.finfo(torch.float32).tiny)
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # the tokens after the set has reached top_p
        drop[0] = False  # the likeliest token always stays (a top_p below float32's range would drop it too)
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
