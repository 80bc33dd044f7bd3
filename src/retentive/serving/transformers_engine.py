"""transformers' own continuous batching behind the same front end: ``retentive serve --engine transformers``.

The Transformer twin is then served by the library it comes from, as its authors batch it (a paged key-value cache,
chunked prefill, their scheduler, SDPA attention), not by this package's engine: what a serving comparison with
the RetNet should measure against. :class:`TransformersEngine` takes the front end's :class:`Request` objects as
:class:`~retentive.serving.engine.Engine` does and gives back the same events:

1. ``submit`` refuses what the manager cannot do per request (:class:`Unsupported`: sampling, ``n`` > 1,
   log-probabilities), then queues the request here;
2. at most ``max_batch`` requests run in transformers' ``ContinuousBatchingManager`` at once (its cache holds
   ``max_batch`` contexts of ``max_context`` tokens); the others wait, ``max_queue`` of them at most;
3. one thread reads the manager's outputs (one per generated token: ``streaming=True``) and turns each new token
   into a :class:`Delta`, its text decoded with stop strings held back, then :class:`Done` or :class:`Failed`;
4. a request that ends here (a stop string) or whose client went away is cancelled in the manager, which frees its
   cache blocks, and the next waiting request goes in.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections import deque
from dataclasses import dataclass, field

from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import RequestStatus

from ..data import Tokenizer
from ..models import RetNetForCausalLM
from .engine import Delta, Done, Failed, QueueFull, Request, TextStream, Unsupported

logger = logging.getLogger(__name__)

PAGE_SIZE = 256  # tokens per cache page (transformers' default)
POLL = 0.05  # seconds between two looks at cancelled requests while no output comes


@dataclass(eq=False)
class _Running:
    """A request inside the manager, under its id there: the tokens and text given out so far."""

    request: Request
    text: TextStream
    tokens: list[int] = field(default_factory=list)


class TransformersEngine:
    """A :class:`~retentive.serving.engine.ServingEngine` over transformers' ``ContinuousBatchingManager``.

    Args:
        model: a transformers causal LM (the Llama twin of ``retentive.baselines``); its attention must be one that
            continuous batching runs ("sdpa", "paged|eager" or a flash one).
        tokenizer: decodes the generated tokens.
        eos_token_id: ends a sequence (unless ``ignore_eos``); None: only stop strings and max_tokens do.
        max_batch: requests running at once.
        max_queue: requests waiting beyond them before :meth:`submit` raises :class:`QueueFull`.
        prefill_chunk: tokens per forward (transformers' ``max_batch_tokens``): prompts are read in pieces of it.
        max_context: the longest prompt + completion; the paged cache holds ``max_batch`` of them.
        prefix_sharing: let requests share the cache blocks of a common prompt prefix (transformers' prefix cache).
    """

    kind = "transformers"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        eos_token_id: int | None,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = 512,
        max_context: int = 4096,
        prefix_sharing: bool = True,
    ) -> None:
        if isinstance(model, RetNetForCausalLM):
            raise ValueError(
                "transformers' continuous batching pages an attention key-value cache, which a RetNet has none of: "
                "serve it with the retentive engine (--engine retentive)"
            )
        for name, value, low in (
            ("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("prefill_chunk", prefill_chunk, 1),
            ("max_context", max_context, 1),
        ):  # fmt: skip
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.tokenizer, self.eos_token_id = tokenizer, eos_token_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self.vocab_size = model.config.vocab_size
        config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=max_batch * math.ceil(max_context / PAGE_SIZE),
            max_batch_tokens=prefill_chunk,
            max_requests_per_batch=max_batch,
            allow_block_sharing=prefix_sharing,
        )
        generation = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0)  # eos: per request
        self.manager = model.eval().init_continuous_batching(generation, config)
        self.ids = itertools.count()
        self.lock = threading.Lock()  # guards waiting and running, shared by submit (the event loop) and the thread
        self.waiting: deque[Request] = deque()
        self.running: dict[str, _Running] = {}
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.prefill_tokens = self.generated_tokens = self.peak_state_bytes = 0

    # --- the caller's side (any thread) ---

    def start(self) -> None:
        self.manager.start()
        self.thread = threading.Thread(target=self._run, name="retentive-transformers-engine", daemon=True)
        self.thread.start()

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop the manager at once and this engine's thread; the requests still held get a :class:`Failed` event."""
        self.stopping = True
        self.manager.stop(block=True, timeout=timeout, hard_stop=True)
        if self.thread is not None:
            self.thread.join(timeout)
        self._fail_all("the server is shutting down")

    def submit(self, *requests: Request) -> None:
        """Queue requests, all or none (a batch of prompts); raises :class:`Unsupported` for what the manager cannot
        do per request, and :class:`QueueFull` when the queue cannot take them all: ``max_queue`` requests may wait."""
        for request in requests:
            p = request.params
            refused = (
                ("temperature", p.temperature != 0, "decodes greedily: send temperature 0"),
                ("n", request.n != 1, "gives one choice per request: send n=1 (or several requests)"),
                ("logprobs", p.logprobs is not None, "gives no log-probabilities: leave logprobs unset"),
                ("max_tokens", p.max_tokens < 1, "generates at least one token: send max_tokens >= 1"),
            )
            for param, bad, what in refused:
                if bad:
                    raise Unsupported(param, f"this server (transformers' continuous batching) {what}")
        with self.lock:
            waiting = sum(not r.cancelled for r in self.waiting)
            free = max(self.max_batch - len(self.running), 0)  # admitted at once, without waiting
            if waiting + len(requests) > self.max_queue + free:
                raise QueueFull(f"{waiting} requests are waiting for a slot, of at most {self.max_queue}: retry later")
            self.waiting.extend(requests)
            self._admit()

    def stats(self) -> dict:
        """Requests, queue, counters and the cache blocks in use (a snapshot, read without the lock)."""
        running = len(self.running)
        return {
            "kind": self.kind,
            "max_batch": self.max_batch,
            "free_slots": self.max_batch - running,
            "running": running,
            "waiting": len(self.waiting),
            "steps": getattr(self.manager, "current_batch", 0),
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "state_bytes": self._cache_bytes_in_use(),
            "peak_state_bytes": self.peak_state_bytes,
        }

    def _cache_bytes_in_use(self) -> int:
        """Bytes of the paged cache's sectors held by requests (the cache itself is allocated whole at start)."""
        processor = self.manager.batch_processor
        if processor is None:
            return 0
        cache = processor.cache
        return cache.num_sectors * cache.bytes_per_sector - int(cache.compute_free_capacity(relative=False))

    def _admit(self) -> None:
        """Hand waiting requests to the manager while fewer than ``max_batch`` run (the caller holds the lock)."""
        while self.waiting and len(self.running) < self.max_batch:
            request = self.waiting.popleft()
            if request.cancelled:
                request.emit(Failed("cancelled"))
                continue
            rid = f"request-{next(self.ids)}"
            self.running[rid] = _Running(request, TextStream(self.tokenizer, request.params.stop))
            no_eos = request.params.ignore_eos or self.eos_token_id is None
            self.manager.add_request(
                request.prompt, request_id=rid, max_new_tokens=request.params.max_tokens, streaming=True,
                eos_token_id=-1 if no_eos else self.eos_token_id,
            )  # fmt: skip

    # --- the engine's thread ---

    def _run(self) -> None:
        while not self.stopping:
            output = self.manager.get_result(timeout=POLL)
            if output is not None:
                self._deliver(output)
            elif not self.manager.is_running():  # transformers' loop died: its requests failed, nothing comes
                self._fail_all("transformers' generation loop stopped")
                return
            self._drop_cancelled()
            self.peak_state_bytes = max(self.peak_state_bytes, self._cache_bytes_in_use())

    def _deliver(self, output) -> None:
        """Give out the tokens of ``output`` (the manager's ``GenerationOutput``) that its request has not had."""
        with self.lock:
            running = self.running.get(output.request_id)
        if running is None:  # ended here already (a stop string, a cancellation)
            return
        request = running.request
        try:
            if output.status == RequestStatus.FAILED:
                raise RuntimeError(output.error or "transformers failed the request")
            if not running.tokens:
                self.prefill_tokens += len(request.prompt)
            for token in output.generated_tokens[len(running.tokens) :]:
                running.tokens.append(token)
                self.generated_tokens += 1
                count = len(running.tokens)
                text, reason = running.text.take(token, count, request.params, self.eos_token_id)
                request.emit(Delta(0, text, reason))
                if reason is not None:
                    self._end(output.request_id, cancel=not output.is_finished())
                    request.emit(Done(len(request.prompt), count))
                    return
        except Exception as e:
            logger.error("request failed", exc_info=e)
            self._end(output.request_id, cancel=not output.is_finished())
            request.emit(Failed(f"{type(e).__name__}: {e}"))

    def _end(self, rid: str, cancel: bool) -> None:
        """Take ``rid`` off the running requests (cancelled in the manager if it still runs there: its blocks are
        freed) and let the next waiting request in."""
        if cancel:
            self.manager.cancel_request(rid)
        with self.lock:
            self.running.pop(rid, None)
            self._admit()

    def _drop_cancelled(self) -> None:
        """End the requests whose client went away; each gets a last :class:`Failed` event, so no waiter hangs."""
        with self.lock:
            gone = [(rid, r.request) for rid, r in self.running.items() if r.request.cancelled]
            dropped = [r for r in self.waiting if r.cancelled]
            self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for request in dropped:
            request.emit(Failed("cancelled"))
        for rid, request in gone:
            self._end(rid, cancel=True)
            request.emit(Failed("cancelled"))

    def _fail_all(self, message: str) -> None:
        with self.lock:
            requests = [*self.waiting, *(r.request for r in self.running.values())]
            self.waiting.clear()
            self.running.clear()
        for request in requests:
            request.emit(Failed(message))
