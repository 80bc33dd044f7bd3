"""The HTTP routes (FastAPI): OpenAI's ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``; ``/health``
and ``/metrics``.

Requests are validated (pydantic), tokenized and checked here, then handed to the engine (:class:`Engine`, or
transformers' continuous batching: any :class:`ServingEngine`); its events come back through an asyncio queue and
go out as one JSON body or as server-sent events (``stream: true``). Every error is a JSON body in OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for bad input.

Before a route runs, :class:`Guard` checks the API key (when the server has one) and the body's size, so that an
unauthorized or oversized request costs nothing. Prompts are tokenized on a worker thread, after a check of their
length in characters, so that a long prompt never stalls the event loop (``/health``, the open streams).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import resource
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..data import Tokenizer
from . import protocol
from .engine import Delta, Done, Event, PromptLogprobs, QueueFull, SamplingParams, ServingEngine, Unsupported
from .engine import Request as EngineRequest
from .metrics import Metrics

OPEN_PATHS = ("/health",)  # answered without the API key: a load balancer's health check has none


@dataclass
class ServerLimits:
    """What one request may ask for.

    Attributes:
        max_prompt_tokens: the longest prompt, in tokens.
        max_tokens: the most tokens one choice may generate.
        default_max_tokens: what a chat request without ``max_tokens`` gets (completions default to 16, as OpenAI).
        max_context: prompt + generated tokens, for models with a position limit (a Transformer); None: no limit.
        max_n: the most choices (``n``) one request may ask for: each holds a state slot.
        max_body_bytes: the largest request body; a larger one is refused (413) before it is read.
    """

    max_prompt_tokens: int = 16384
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_context: int | None = None
    max_n: int = 4
    max_body_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} is over max_tokens={self.max_tokens}")


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


def _invalid(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


class Guard:
    """ASGI middleware run before any route: the API key (``Authorization: Bearer KEY``, compared in constant time;
    ``/health`` stays open) and the body's size (413 beyond ``max_body_bytes``, counted as it arrives).

    Args:
        app: the app it guards.
        api_key: the key every request must carry; None: no key needed.
        max_body_bytes: the largest body accepted.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            body = protocol.error_body(
                "missing or wrong API key: send the header Authorization: Bearer <key>",
                "invalid_request_error",
                code="invalid_api_key",
            )
            return await JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        declared = headers.get("content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:  # read the body here, counting: a chunked body declares no length
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _authorized(self, headers: dict[str, bytes]) -> bool:
        scheme, _, key = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key.encode())

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is over this server's limit of {self.max_body_bytes} bytes (--max-body-mib)"
        body = protocol.error_body(message, "invalid_request_error", code="request_too_large")
        await JSONResponse(body, 413, {"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read, then what the client sends next (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class Outbox:
    """Events from the engine's thread to the event loop's queues, handed over in batches.

    ``loop.call_soon_threadsafe`` writes to the loop's self-pipe at every call: one call per event costs a step of
    16 streams 16 system calls on the engine's thread, and the loop up to 16 wake-ups. Here the first event puts one
    delivery on the loop, and every event put before that delivery runs goes with it: about one per engine step.

    Args:
        loop: the event loop the queues belong to.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: deque[tuple[asyncio.Queue, object]] = deque()
        self.scheduled = False

    def put(self, queue: asyncio.Queue, item: object) -> None:
        """Deliver ``item`` to ``queue`` on the loop (called from any thread)."""
        self.pending.append((queue, item))
        if not self.scheduled and not self.loop.is_closed():
            self.scheduled = True
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        self.scheduled = False  # first: an item put from now on schedules the next delivery, or goes with this one
        while self.pending:
            queue, item = self.pending.popleft()
            queue.put_nowait(item)


def max_token_bytes(tokenizer: Tokenizer) -> int:
    """An upper bound on the UTF-8 bytes one token stands for: a text of more characters than ``max_prompt_tokens``
    times this cannot fit in the prompt limit, and is refused without tokenizing it."""
    return max(len(tokenizer.decode([i]).encode()) for i in range(tokenizer.vocab_size)) or 1


def create_app(
    engine: ServingEngine,
    tokenizer: Tokenizer,
    model_name: str,
    limits: ServerLimits | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The server's ASGI app; it starts the engine's thread on startup and stops it on shutdown.

    Args:
        engine: the scheduler over the model's slots (:class:`Engine`, or any :class:`ServingEngine`).
        tokenizer: encodes prompts (and the engine decodes with the same one).
        model_name: the one model id this server answers to (``/v1/models``).
        limits: what a request may ask for.
        api_key: the key every request but ``/health`` must carry as ``Authorization: Bearer KEY``; None: none.
    """
    limits = limits or ServerLimits()
    created = int(time.time())
    metrics = Metrics(model_name)
    outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = weakref.WeakKeyDictionary()
    max_prompt_chars = limits.max_prompt_tokens * max_token_bytes(tokenizer)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown(timeout=5)  # uvicorn has drained the requests it could (--shutdown-timeout)

    app = FastAPI(title="retentive", lifespan=lifespan)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: still OpenAI's error shape
        body = protocol.error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error")
        return JSONResponse(body, status_code=500)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            body = protocol.error_body(f"the body is not valid JSON: {err.get('msg')}", "invalid_request_error")
            return JSONResponse(body, status_code=400)
        param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
        return JSONResponse(protocol.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = protocol.error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")
        return JSONResponse(body, status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict:
        rss = psutil.Process().memory_info().rss
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"status": "ok", "model": model_name, "rss_bytes": rss, "peak_rss_bytes": peak, **engine.stats()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "retentive"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, http: Request):
        _check_request(body)
        if body.max_tokens == 0 and not body.echo:
            raise _invalid("max_tokens=0 generates nothing: set echo=true to score the prompt", "max_tokens")
        texts = body.prompts
        if len(texts) > engine.max_queue:  # the prompts of a batch are queued together, or not at all
            raise _invalid(
                f"a batch of {len(texts)} prompts is over this server's queue of {engine.max_queue} requests: send "
                "smaller batches (or restart the server with a larger --max-queue)",
                "prompt",
            )
        if isinstance(texts[0], str):
            _check_chars(max(map(len, texts)), "prompt")
            prompts = await _tokenize(texts, "prompt")
        else:
            prompts = [list(p) for p in texts]
            for prompt in prompts:
                _check_length(len(prompt), "prompt")
                if any(not 0 <= t < engine.vocab_size for t in prompt):
                    raise _invalid(f"prompt holds token ids outside [0, {engine.vocab_size})", "prompt")
        echoes = None
        if body.echo:
            echoes = [t if isinstance(t, str) else tokenizer.decode(p) for t, p in zip(texts, prompts, strict=True)]
        return await _generate(body, prompts, [], http, chat=False, echoes=echoes)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, http: Request):
        _check_request(body)
        if body.top_logprobs_ is not None and not body.logprobs:
            raise _invalid("top_logprobs needs logprobs=true", "top_logprobs")
        try:
            segments = protocol.chat_segments(body.messages)
        except ValueError as e:
            raise _invalid(str(e), "messages") from e
        _check_chars(sum(map(len, segments)), "messages")
        pieces = await _tokenize(segments, "messages")
        ends = list(itertools.accumulate(map(len, pieces)))  # the state after each message: worth caching
        return await _generate(body, [list(itertools.chain(*pieces))], ends[:-1], http, chat=True)

    def _check_request(body: protocol.SamplingRequest) -> None:
        """What is wrong with the request before its prompt is read: the model, parameters this server refuses."""
        if body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist: this server serves {model_name!r} (GET /v1/models)",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        refused = body.unsupported()
        if refused is not None:
            raise _invalid(refused[1], refused[0])
        if body.n > min(limits.max_n, engine.max_batch):
            raise _invalid(
                f"n={body.n} is over this server's limit of {min(limits.max_n, engine.max_batch)} choices "
                "per request (--max-n): send several requests",
                "n",
            )

    def _check_chars(chars: int, param: str) -> None:
        """Refuse a prompt of more characters than the limit's tokens can hold, without tokenizing it."""
        if chars > max_prompt_chars:
            _check_length(limits.max_prompt_tokens + 1, param)

    async def _tokenize(texts: list[str], param: str) -> list[list[int]]:
        """The tokens of each of ``texts``, encoded on a worker thread (not the event loop)."""
        try:
            return await asyncio.to_thread(tokenizer.encode_batch, texts)
        except UnicodeError as e:  # a lone surrogate ("\ud800"): valid JSON, but no text
            raise _invalid(f"{param} is not valid Unicode text: {e}", param) from e

    def _check_length(tokens: int, param: str) -> None:
        if tokens > limits.max_prompt_tokens:
            raise _invalid(
                f"the prompt has more than {limits.max_prompt_tokens} tokens, this server's limit: shorten it "
                "(or restart the server with a larger --max-prompt-tokens)",
                param,
                "context_length_exceeded",
            )

    async def _generate(
        body: protocol.SamplingRequest,
        prompts: list[list[int]],
        points: list[int],
        http: Request,
        chat: bool,
        echoes: list[str] | None = None,
    ):
        """Queue one engine request per prompt (all or none), and answer with their choices in prompt order.

        Args:
            points: prompt lengths after which the state is worth caching (a chat's message ends).
            echoes: the text each prompt's choices start with (``echo``); None: none.
        """
        param = "messages" if chat else "prompt"
        max_tokens = limits.default_max_tokens if body.max_tokens is None else body.max_tokens
        if max_tokens > limits.max_tokens:
            raise _invalid(f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens")
        for prompt in prompts:
            if not prompt:
                raise _invalid("the prompt encodes to no tokens: give some text", param)
            _check_length(len(prompt), param)
            if limits.max_context is not None and len(prompt) + max_tokens > limits.max_context:
                raise _invalid(
                    f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed the model's context of "
                    f"{limits.max_context} tokens: shorten the prompt or lower max_tokens",
                    param,
                    "context_length_exceeded",
                )
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            logprobs=body.top_logprobs,
            echo=body.echo,
        )
        events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        client = http.client.host if http.client else ""
        requests = [
            EngineRequest(prompt, params, _emitter(events, i, body.n), n=body.n, cache_points=points, client=client)
            for i, prompt in enumerate(prompts)
        ]
        try:
            engine.submit(*requests)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", None, "rate_limit_exceeded") from e
        except Unsupported as e:
            raise _invalid(str(e), e.param) from e
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        echoes = echoes or [""] * len(prompts)
        if body.stream:
            stream = _stream(requests, events, rid, chat, body.include_usage, echoes)
            return StreamingResponse(stream, media_type="text/event-stream")
        return await _collect(requests, events, rid, chat, http, echoes)

    def _emitter(events: asyncio.Queue, index: int, n: int) -> Callable[[Event], None]:
        """What prompt ``index``'s engine request calls with each event, on the engine's thread: the event goes to
        ``events`` as ``(index, event)`` (through the loop's :class:`Outbox`), the time to its first token and
        between tokens to the metrics."""
        loop = asyncio.get_running_loop()
        outbox = outboxes.get(loop) or outboxes.setdefault(loop, Outbox(loop))
        last = [time.perf_counter()] + [None] * n  # [arrival, then each choice's latest token time]

        def emit(event: Event) -> None:
            if isinstance(event, Delta):
                now, before = time.perf_counter(), last[event.index + 1]
                if before is None:
                    metrics.ttft.observe(now - last[0])
                else:
                    metrics.itl.observe(now - before)
                last[event.index + 1] = now
            outbox.put(events, (index, event))

        return emit

    def _logprobs(entries: list, chat: bool, offset: int = 0) -> dict:
        if chat:
            return protocol.chat_logprobs(entries, tokenizer)
        return protocol.completion_logprobs(entries, tokenizer, offset)

    async def _collect(
        requests: list[EngineRequest], events: asyncio.Queue, rid: str, chat: bool, http: Request, echoes: list[str]
    ) -> dict:
        n = requests[0].n
        texts = [echo for echo in echoes for _ in range(n)]  # choice i * n + j: choice j of prompt i
        reasons: list[str | None] = [None] * len(texts)
        entries: list[list] = [[] for _ in texts]
        asked = requests[0].params.logprobs is not None
        done: list[Done] = []
        watcher = asyncio.create_task(_cancel_on_disconnect(http, requests))
        try:
            while True:
                i, event = await events.get()
                if isinstance(event, Delta):
                    choice = i * n + event.index
                    texts[choice] += event.text
                    reasons[choice] = event.finish_reason or reasons[choice]
                    if event.logprob is not None:
                        entries[choice].append(event.logprob)
                elif isinstance(event, PromptLogprobs):
                    entries[i * n : (i + 1) * n] = [list(event.tokens) for _ in range(n)]
                elif isinstance(event, Done):
                    done.append(event)
                    if len(done) == len(requests):
                        logprobs = [_logprobs(e, chat) if asked else None for e in entries]
                        choices = list(zip(texts, reasons, logprobs, strict=True))
                        return protocol.completion_body(rid, model_name, choices, _usage(done), chat)
                elif any(r.cancelled for r in requests):  # the client went away: nobody reads the answer
                    return {}
                else:
                    raise APIError(500, event.message, "server_error")
        finally:
            watcher.cancel()
            for request in requests:
                request.cancel()  # a no-op once done; the others of a batch that failed: free their slots

    async def _stream(
        requests: list[EngineRequest],
        events: asyncio.Queue,
        rid: str,
        chat: bool,
        include_usage: bool,
        echoes: list[str],
    ) -> AsyncIterator[str]:
        n = requests[0].n
        offsets = [0] * (len(requests) * n)  # characters of each choice's text sent so far (for text_offset)
        done: list[Done] = []
        try:
            if chat:
                for choice in range(len(offsets)):
                    yield _sse(protocol.role_chunk(rid, model_name, choice))
            if requests[0].params.logprobs is None:  # with logprobs, an echoed prompt goes out with its own
                for choice, echo in enumerate(e for e in echoes for _ in range(n)):
                    if echo:
                        yield _sse(protocol.chunk_body(rid, model_name, choice, echo, None, chat))
                        offsets[choice] = len(echo)
            while True:
                i, event = await events.get()
                if isinstance(event, Delta):
                    choice = i * n + event.index
                    lp = None if event.logprob is None else _logprobs([event.logprob], chat, offsets[choice])
                    body = protocol.chunk_body(rid, model_name, choice, event.text, event.finish_reason, chat, lp)
                    offsets[choice] += len(tokenizer.decode([event.logprob.token])) if lp else 0
                    yield _sse(body)
                elif isinstance(event, PromptLogprobs):
                    lp = _logprobs(event.tokens, chat)
                    for choice in range(i * n, (i + 1) * n):
                        yield _sse(protocol.chunk_body(rid, model_name, choice, echoes[i], None, chat, lp))
                        offsets[choice] = len(tokenizer.decode(e.token for e in event.tokens))
                elif isinstance(event, Done):
                    done.append(event)
                    if len(done) == len(requests):
                        if include_usage:
                            yield _sse(protocol.usage_chunk(rid, model_name, _usage(done), chat))
                        break
                else:
                    yield _sse(protocol.error_body(event.message, "server_error"))
                    break
            yield "data: [DONE]\n\n"
        finally:
            for request in requests:
                request.cancel()  # the client went away mid-stream (or the stream ended): free the slots

    return app


def _usage(done: list[Done]) -> dict:
    """The token counts of a response: the sums over its prompts' requests."""
    return protocol.usage(
        sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done), sum(d.cached_tokens for d in done)
    )


async def _cancel_on_disconnect(http: Request, requests: list[EngineRequest]) -> None:
    """Cancel ``requests`` when their client goes away before the answer (the body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    for request in requests:
        request.cancel()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
