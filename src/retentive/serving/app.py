"""The HTTP routes (FastAPI): OpenAI's ``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``; ``/health``.

Requests are validated (pydantic), tokenized and checked here, then handed to the :class:`Engine`; its events come
back through an asyncio queue and go out as one JSON body or as server-sent events (``stream: true``). Every error
is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status for bad input.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import psutil
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import Tokenizer
from . import protocol
from .engine import Delta, Done, Engine, Event, QueueFull, SamplingParams
from .engine import Request as EngineRequest


@dataclass
class ServerLimits:
    """What one request may ask for.

    Attributes:
        max_prompt_tokens: the longest prompt, in tokens.
        max_tokens: the most tokens one choice may generate.
        default_max_tokens: what a chat request without ``max_tokens`` gets (completions default to 16, as OpenAI).
        max_context: prompt + generated tokens, for models with a position limit (a Transformer); None: no limit.
    """

    max_prompt_tokens: int = 16384
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_context: int | None = None


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, protocol.error_body(message, type_, param, code)


def _invalid(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, limits: ServerLimits | None = None) -> FastAPI:
    """The server's ASGI app; it starts the engine's thread on startup and stops it on shutdown.

    Args:
        engine: the scheduler over the model's slots.
        tokenizer: encodes prompts (and the engine decodes with the same one).
        model_name: the one model id this server answers to (``/v1/models``).
        limits: what a request may ask for.
    """
    limits = limits or ServerLimits()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="retentive", lifespan=lifespan)

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

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": created, "owned_by": "retentive"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest, http: Request):
        if isinstance(body.prompt, str):
            prompt = tokenizer.encode(body.prompt)
        else:
            prompt = list(body.prompt)
            if any(not 0 <= t < engine.backend.vocab_size for t in prompt):
                raise _invalid(f"prompt holds token ids outside [0, {engine.backend.vocab_size})", "prompt")
        return await _generate(body, prompt, [], http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatCompletionRequest, http: Request):
        prompt, points = [], []
        try:
            for segment in protocol.chat_segments(body.messages):
                prompt += tokenizer.encode(segment)
                points.append(len(prompt))  # the state after each message is worth caching
        except ValueError as e:
            raise _invalid(str(e), "messages") from e
        return await _generate(body, prompt, points[:-1], http, chat=True)

    async def _generate(
        body: protocol.SamplingRequest, prompt: list[int], points: list[int], http: Request, chat: bool
    ):
        if body.model != model_name:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist: this server serves {model_name!r} (GET /v1/models)",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        param = "messages" if chat else "prompt"
        if not prompt:
            raise _invalid("the prompt encodes to no tokens: give some text", param)
        if len(prompt) > limits.max_prompt_tokens:
            raise _invalid(
                f"the prompt has {len(prompt)} tokens, more than this server's limit of {limits.max_prompt_tokens}: "
                "shorten it (or restart the server with a larger --max-prompt-tokens)",
                param,
                "context_length_exceeded",
            )
        max_tokens = body.max_tokens or limits.default_max_tokens
        if max_tokens > limits.max_tokens:
            raise _invalid(f"max_tokens={max_tokens} is over this server's limit of {limits.max_tokens}", "max_tokens")
        if limits.max_context is not None and len(prompt) + max_tokens > limits.max_context:
            raise _invalid(
                f"the prompt ({len(prompt)} tokens) and max_tokens ({max_tokens}) exceed the model's context of "
                f"{limits.max_context} tokens: shorten the prompt or lower max_tokens",
                param,
                "context_length_exceeded",
            )
        if body.n > engine.backend.max_batch:
            raise _invalid(f"n={body.n} is more than this server's {engine.backend.max_batch} slots", "n")
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop,
            seed=body.seed,
            ignore_eos=body.ignore_eos,
        )
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:  # on the engine's thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, event)

        request = EngineRequest(prompt, params, emit, n=body.n, cache_points=points)
        try:
            engine.submit(request)
        except QueueFull as e:
            raise APIError(429, str(e), "rate_limit_error", None, "rate_limit_exceeded") from e
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            stream = _stream(request, events, rid, chat, body.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        return await _collect(request, events, rid, chat, http)

    async def _collect(request: EngineRequest, events: asyncio.Queue, rid: str, chat: bool, http: Request) -> dict:
        texts, reasons = [""] * request.n, [None] * request.n
        watcher = asyncio.create_task(_cancel_on_disconnect(http, request))
        try:
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    texts[event.index] += event.text
                    reasons[event.index] = event.finish_reason or reasons[event.index]
                elif isinstance(event, Done):
                    use = protocol.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                    return protocol.completion_body(rid, model_name, list(zip(texts, reasons, strict=True)), use, chat)
                elif request.cancelled:  # the client went away: nobody reads the answer
                    return {}
                else:
                    raise APIError(500, event.message, "server_error")
        finally:
            watcher.cancel()
            request.cancel()  # a no-op once done

    async def _stream(
        request: EngineRequest, events: asyncio.Queue, rid: str, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            if chat:
                for index in range(request.n):
                    yield _sse(protocol.role_chunk(rid, model_name, index))
            while True:
                event = await events.get()
                if isinstance(event, Delta):
                    yield _sse(protocol.chunk_body(rid, model_name, event.index, event.text, event.finish_reason, chat))
                elif isinstance(event, Done):
                    if include_usage:
                        use = protocol.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                        yield _sse(protocol.usage_chunk(rid, model_name, use, chat))
                    break
                else:
                    yield _sse(protocol.error_body(event.message, "server_error"))
                    break
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()  # the client went away mid-stream (or the stream ended): free the slots

    return app


async def _cancel_on_disconnect(http: Request, request: EngineRequest) -> None:
    """Cancel ``request`` when its client goes away before the answer (the body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    request.cancel()


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body)}\n\n"
