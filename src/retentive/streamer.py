"""Print generated text as the tokens come: a ``transformers`` streamer over any :class:`retentive.data.Tokenizer`."""

from __future__ import annotations

import sys
from typing import TextIO

import torch
from transformers.generation.streamers import BaseStreamer

from .data import Tokenizer


class TokenStreamer(BaseStreamer):
    """Writes each new piece of text to ``stream`` as soon as it decodes to whole characters.

    Args:
        tokenizer: decodes the ids.
        skip_prompt: do not echo the prompt (``generate()`` passes it first).
        stream: where to write (default ``sys.stdout``).
    """

    def __init__(self, tokenizer: Tokenizer, skip_prompt: bool = True, stream: TextIO | None = None) -> None:
        self.tokenizer, self.skip_prompt = tokenizer, skip_prompt
        self.stream = stream or sys.stdout
        self.ids: list[int] = []
        self.printed = 0  # characters of decode(ids) already written
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        """Take the next token(s): (1, T) for the prompt, then (1,) per step."""
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("TokenStreamer streams one sequence: use batch size 1 and num_beams 1")
        if self.skip_prompt and not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a character cut between tokens: wait for its other bytes
            return
        self._write(text)

    def end(self) -> None:
        """Flush what is left and end the line."""
        self._write(self.tokenizer.decode(self.ids))
        self.stream.write("\n")
        self.stream.flush()
        self.ids, self.printed, self.prompt_seen = [], 0, False

    def _write(self, text: str) -> None:
        self.stream.write(text[self.printed :])
        self.stream.flush()
        self.printed = len(text)
