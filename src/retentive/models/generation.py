"""generate()'s greedy search as a plain loop over the model's decoding step.

transformers' decoding loop is general (logits processors, stopping criteria, model kwargs updated at every
token, a copy of the logits, the growing ids concatenated): on a CPU it costs 0.1-0.2 ms a token, which for a
small RetNet whose step costs 0.4 ms is the difference between decoding at the weight-read bound and not
(docs/benchmarks.md, "Decode step"). The commonest call, greedy search to ``max_new_tokens`` with the special
tokens, an attention mask and a streamer, runs here instead: one decoding step a token, which takes the greedy
choice itself (the native kernel, where it writes the logits), and the output concatenated once at the end.
Everything else (sampling, beams, processors, stopping criteria, outputs as a dict, any other option or model
argument) is transformers' own loop, unchanged. tests/models/test_generation.py holds the two equal, token for
token, over padding, end-of-sequence tokens, lengths, streamers and hooks.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from .cache_retnet import cache_of
from .decoding import argmax_for

if TYPE_CHECKING:
    from .modeling_retnet import RetNetForCausalLM

# generation options the loop honours (any value), and those it honours at transformers' default value only
_HONOURED = {"max_new_tokens", "min_new_tokens", "min_length", "eos_token_id", "pad_token_id", "bos_token_id"}
_AT_DEFAULT = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "use_cache": True}
# set on every model's config, or without effect in greedy search (the sampling parameters)
_IGNORED = {"transformers_version", "_from_model_config", "output_attentions", "output_hidden_states",
            "temperature", "top_k", "top_p"}  # fmt: skip


def greedy_search(
    model: RetNetForCausalLM, inputs: Tensor | None, generation_config: GenerationConfig | None, kwargs: dict
) -> Tensor | None:
    """``model.generate(inputs, generation_config, **kwargs)`` by the plain loop, or None where transformers'
    loop must run (see the module docstring). Returns the ids (B, T + new tokens), as generate() does."""
    kwargs = dict(kwargs)
    ids = kwargs.pop("input_ids", None) if inputs is None else inputs
    mask, streamer = kwargs.pop("attention_mask", None), kwargs.pop("streamer", None)
    if not (isinstance(ids, Tensor) and ids.dim() == 2 and ids.shape[1] > 0 and ids.dtype == torch.long):
        return None
    if set(kwargs) - _HONOURED - _AT_DEFAULT.keys() - _IGNORED or (streamer and not isinstance(streamer, BaseStreamer)):
        return None
    config = copy.deepcopy(model.generation_config if generation_config is None else generation_config)
    config.update(**kwargs)
    options = config.to_diff_dict()
    if (
        options.keys() - _HONOURED - _AT_DEFAULT.keys() - _IGNORED
        or any(options.get(name, default) != default for name, default in _AT_DEFAULT.items())
        or not (isinstance(config.max_new_tokens, int) and config.max_new_tokens >= 1)
    ):
        return None
    config.validate()
    return _greedy(model, ids, mask, streamer, config)


@torch.no_grad()
def _greedy(
    model: RetNetForCausalLM, ids: Tensor, mask: Tensor | None, streamer: BaseStreamer | None, config: GenerationConfig
) -> Tensor:
    """Greedy search as transformers does it: end-of-sequence tokens held back until the minimum length, finished
    rows padded, an attention mask inferred from padding where transformers infers one, stop when every row has
    finished or at ``max_new_tokens``."""
    B, T = ids.shape
    eos = _token_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None or not eos else eos[0]
    if mask is None and pad is not None and pad not in eos and bool((ids == pad).any()):
        mask = ids.ne(pad).long()  # as transformers infers it: pad tokens in the prompt, pad distinct from eos
    min_length = max(config.min_length or 0, T + (config.min_new_tokens or 0))
    eos_ids, ended = torch.tensor(eos, device=ids.device), set(eos)
    finished = [False] * B
    if streamer is not None:
        streamer.put(ids.cpu())
    prefill = model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache = cache_of(prefill)
    cache.overwrite = True  # nobody else holds this call's states: each step writes over the last one's
    argmax, tokens = argmax_for(prefill.logits), []

    def holding_eos() -> bool:  # below the minimum length, the eos ids are not chosen
        return bool(eos) and T + len(tokens) < min_length

    def choose(logits: Tensor) -> Tensor:  # (B, 1, V) -> (B, 1)
        if holding_eos():
            logits = logits.float().index_fill(-1, eos_ids, -float("inf"))
        return argmax(logits)

    # After a step has streamed the weights through the caches, each small op costs ~20 µs, its code and data back
    # from memory. So a token costs the model's decoding step itself, past forward's checks and output object, with
    # the greedy choice taken inside it (unless hooks on the model or training mode ask for the forward); the
    # finished rows are kept in Python, and the output is concatenated once at the end.
    if model.training or model._forward_hooks or model._forward_pre_hooks:

        def next_token(token: Tensor) -> Tensor:
            return choose(model(token, cache=cache, use_cache=True).logits)
    else:

        def next_token(token: Tensor) -> Tensor:
            if holding_eos():
                return choose(model._decode(token, cache))
            return model._decode(token, cache, greedy=True)

    token = choose(prefill.logits)
    while True:
        if eos:
            row_tokens = token.view(-1).tolist()
            if any(finished):  # a finished row takes the pad token
                row_tokens = [pad if done else t for t, done in zip(row_tokens, finished, strict=True)]
                token = torch.tensor(row_tokens, device=ids.device).view(B, 1)
            finished = [done or t in ended for t, done in zip(row_tokens, finished, strict=True)]
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.view(-1).cpu())
        if len(tokens) == config.max_new_tokens or (eos and all(finished)):
            break
        token = next_token(token)
    if streamer is not None:
        streamer.end()
    return torch.cat([ids, *tokens], dim=1)


def _token_list(tokens: int | list[int] | Tensor | None) -> list[int]:
    """The end-of-sequence ids as a list: a generation config holds one id, a list or a tensor of them."""
    if tokens is None:
        return []
    if isinstance(tokens, Tensor):
        return tokens.flatten().tolist()
    return [tokens] if isinstance(tokens, int) else list(tokens)
