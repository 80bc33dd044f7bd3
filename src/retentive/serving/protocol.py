"""The OpenAI wire format: pydantic request models (validated on arrival), response bodies and error bodies.

Only what the server honours is accepted with a meaning; OpenAI's (and vLLM's) parameters it cannot honour
(penalties, tools, guided decoding, ...) are refused with a 400 naming them when set, rather
than silently ignored. Other unknown fields are ignored, as OpenAI's clients add new ones over time.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# parameters that this server cannot honour: refused when set to anything but a neutral value, compared with its
# type (``logprobs: 0`` asks for log-probabilities, unlike ``logprobs: false``)
UNSUPPORTED = {
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "reasoning_effort": (None,),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None, {}),
    # vLLM's extensions
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
    "min_p": (None, 0, 0.0),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
}
SEED_RANGE = (-(2**63), 2**63)  # a signed 64-bit integer, as OpenAI's and vLLM's seeds


class SamplingRequest(BaseModel):
    """The fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="tokens to generate per choice")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1: off (an extension, as in vLLM)")
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], lt=SEED_RANGE[1], description="a 64-bit integer")
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = Field(default=False, description="an extension (as in vLLM): generate max_tokens tokens")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return stops

    def unsupported(self) -> tuple[str, str] | None:
        """The first parameter set that this server cannot honour, with the message refusing it; None if none."""
        for name, value in (self.model_extra or {}).items():
            neutral = UNSUPPORTED.get(name)
            if neutral is None or any(type(value) is type(v) and value == v for v in neutral):
                continue
            return name, f"{name}={value!r} is not supported by this server: leave it unset"
        return None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response ends with a chunk carrying the token counts."""
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: a prompt as text or as token ids, or a batch of them (a list of texts or of token-id
    lists; choice ``i * n + j`` of the response is choice ``j`` of prompt ``i``, as OpenAI's). ``logprobs``: report
    each token's log-probability and that many alternatives (0-5); ``echo``: the prompt comes back before the
    completion, with its tokens' log-probabilities when ``logprobs`` is set (``max_tokens: 0`` then scores a text,
    as evaluators do)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @property
    def top_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _default_max_tokens(cls, value: Any) -> Any:
        return 16 if value is None else value  # ``null`` means OpenAI's default for completions, as leaving it out

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        if isinstance(value, list) and len({type(p) for p in value}) > 1:  # else pydantic names a union member
            raise ValueError("give a text, token ids, a list of texts or a list of token-id lists, not a mix")
        return value

    @field_validator("prompt")
    @classmethod
    def _no_empty_prompt(cls, value: Any) -> Any:
        if len(value) == 0:
            raise ValueError("prompt is empty: give a text, token ids, or a list of either")
        if any(len(p) == 0 for p in _batch(value)):
            raise ValueError("a prompt is empty: give each at least one character or token")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one, or the batch it gives."""
        return _batch(self.prompt)


def _batch(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    return prompt if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else [prompt]


class ChatMessage(BaseModel):
    """One message; ``content`` as a string or a list of text parts."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise ValueError("only text content parts are supported")
        return "".join(str(part.get("text", "")) for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs_: int | None = Field(default=None, ge=0, le=20, alias="top_logprobs")

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @property
    def top_logprobs(self) -> int | None:
        """How many alternatives to report per token, None for no log-probabilities."""
        return (self.top_logprobs_ or 0) if self.logprobs else None

    @property
    def echo(self) -> bool:
        return False


def chat_segments(messages: list[ChatMessage]) -> list[str]:
    """The chat template, one segment per message plus the assistant's cue: ``"role: text\\n"`` ... ``"assistant:"``.

    The models trained here have no chat template of their own; segments are tokenized one by one, so that the
    token count at the end of each message is a point where the prompt-state cache can keep the state.
    """
    return [f"{m.role}: {m.text}\n" for m in messages] + ["assistant:"]


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's token counts; ``prompt_tokens_details.cached_tokens``: the prompt tokens the prompt cache skipped."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    rid: str, model: str, choices: list[tuple[str, str | None, dict | None]], use: dict | None, chat: bool
) -> dict:
    """A whole response (``chat=False``: ``text_completion``; True: ``chat.completion``).

    Args:
        choices: (text, finish_reason, logprobs object or None) per choice, in order.
        use: the token counts (:func:`usage`), or None in a streamed chunk that carries none.
    """
    if chat:
        items = [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": lp}
            for i, (text, reason, lp) in enumerate(choices)
        ]
    else:
        items = [
            {"index": i, "text": text, "finish_reason": reason, "logprobs": lp}
            for i, (text, reason, lp) in enumerate(choices)
        ]
    kind = "chat.completion" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": items, "usage": use}


def chunk_body(
    rid: str, model: str, index: int, text: str | None, reason: str | None, chat: bool, logprobs: dict | None = None
) -> dict:
    """One streamed chunk of choice ``index``: a piece of text and/or its finish reason, and the ``logprobs`` of
    its token(s) when asked for."""
    if chat:
        delta = {} if text is None else {"content": text}
        item = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        kind = "chat.completion.chunk"
    else:
        item = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": logprobs}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [item]}


def role_chunk(rid: str, model: str, index: int) -> dict:
    """The first chunk of a streamed chat choice: the assistant's role, no content yet."""
    body = chunk_body(rid, model, index, None, None, chat=True)
    body["choices"][0]["delta"] = {"role": "assistant", "content": ""}
    return body


def usage_chunk(rid: str, model: str, use: dict, chat: bool) -> dict:
    """The last streamed chunk when ``stream_options.include_usage``: no choices, the token counts."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def token_text(tokenizer, token: int) -> str:
    """One token as the logprobs objects name it: its text, or ``token_id:N`` where it is no text on its own (a
    piece of a character), so that two such tokens never share a key of ``top_logprobs``."""
    return _name(tokenizer.decode([token]), token)


def _name(text: str, token: int) -> str:
    return f"token_id:{token}" if "\ufffd" in text else text


def completion_logprobs(entries: list, tokenizer, offset: int = 0) -> dict:
    """A completion's ``logprobs`` object for ``entries`` (:class:`~retentive.serving.engine.TokenLogprob`), whose
    text starts at character ``offset`` of the choice's text."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for entry in entries:
        text = tokenizer.decode([entry.token])
        out["tokens"].append(_name(text, entry.token))
        out["token_logprobs"].append(entry.logprob)
        top = None if entry.logprob is None else {token_text(tokenizer, t): lp for t, lp in entry.top}
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(entries: list, tokenizer) -> dict:
    """A chat choice's ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``; ``bytes``
    is null for a token that is no text on its own."""

    def item(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        raw = None if text.startswith("token_id:") else list(text.encode("utf-8"))
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [item(e.token, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]}
