"""The RetNet language model with Hugging Face conventions: RetNetModel and RetNetForCausalLM.

Token embeddings -> the :class:`~retentive.models.retnet.RetNet` backbone -> a (tied) output head. The cache
is a :class:`RetNetCache`: one retention state per layer, whose size does not depend on the length, so
``generate()`` prefills the prompt in the chunkwise form and then takes one recurrent step per token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import ModelOutput

from ..layers import HeadNorm, MultiScaleRetention, RetNetBlock
from ..layers.checkpointing import TransformersCheckpointing
from ..layers.feedforward import make_norm
from ..layers.retention import left_padding
from ..ops import RetentionState, check_chunk_size, linear_cross_entropy
from .cache_retnet import CACHE_NAME, RetNetCache, take_cache
from .configuration_retnet import RetNetConfig
from .decoding import step_for, warm_up
from .generation import greedy_search
from .remote_code import REMOTE_CODE, REMOTE_CODE_FILE, remote_code_map
from .retnet import RetNet

logger = logging.getLogger(__name__)

# what generate() passes to prepare_inputs_for_generation at a decoding step, besides the tokens
_STEP_INPUTS = frozenset({CACHE_NAME, "attention_mask", "use_cache", "logits_to_keep"})


class RetNetPreTrainedModel(TransformersCheckpointing, PreTrainedModel):
    """Weight init and the Hugging Face plumbing shared by the RetNet models."""

    config_class = RetNetConfig
    config: RetNetConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the backbone's blocks (CheckpointedBlocks)
    _no_split_modules: ClassVar[list[str]] = [RetNetBlock.__name__]
    _is_stateful = True  # the cache cannot be rolled back: no assisted decoding

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        """Load a ``save_pretrained`` folder, a Hugging Face Hub id, or a foreign RetNet checkpoint.

        A Hub id (``"owner/name"`` that is no local path) goes through ``huggingface_hub.snapshot_download``, which
        honours ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and the ``revision``, ``cache_dir``, ``token`` and
        ``local_files_only`` arguments. A folder (or file) in a layout of :mod:`retentive.models.convert`
        (torchscale, syncdoth/RetNet, flash-linear-attention) is converted on load, in ``dtype`` (default: the
        source's). A missing directory or a missing, truncated or corrupt weights file raises OSError naming the path.
        """
        path = Path(pretrained_model_name_or_path)
        if not path.exists() and _is_hub_id(str(pretrained_model_name_or_path)):
            path = _download(str(pretrained_model_name_or_path), kwargs)
        if foreign := _foreign_layout(path):
            return cls._convert_on_load(path, foreign, kwargs)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint directory (write one with model.save_pretrained)")
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path / 'model.safetensors'}: no weights file in the checkpoint directory")
        for file in files:
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as e:
                raise OSError(f"{file}: not a readable safetensors file, truncated or corrupt ({e})") from e
        return super().from_pretrained(path, *args, **kwargs)

    @classmethod
    def _convert_on_load(cls, path: Path, layout: str, kwargs: dict):
        from .convert import build, convert

        dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
        dtype = None if dtype == "auto" else dtype
        source_config = kwargs.pop("source_config", None)
        if unused := sorted(k for k, v in kwargs.items() if v is not None):
            raise TypeError(
                f"{path}: converting a {layout} checkpoint on load takes dtype and source_config, not {unused}"
            )
        config, state, source = convert(path, layout, source_config)
        if not issubclass(cls, RetNetForCausalLM):
            raise TypeError(f"{path}: a {layout} checkpoint converts to RetNetForCausalLM, not {cls.__name__}")
        logger.info("%s: converted from the %s layout", path, layout)
        return build(config, state, source, dtype)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, remote_code: bool = True, is_main_process: bool = True, **kwargs
    ) -> None:
        """``PreTrainedModel.save_pretrained``; with ``remote_code`` (the default), the folder also loads through
        ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` in a process that never imported
        retentive: ``config.json`` gets an ``auto_map`` naming :data:`REMOTE_CODE_FILE`, which imports the classes
        from the installed package (transformers names the package to install when it is missing)."""
        self.config.auto_map = (
            remote_code_map(
                AutoConfig="RetNetConfig",
                AutoModel="RetNetModel",
                AutoModelForCausalLM="RetNetForCausalLM",
                AutoModelForSequenceClassification="RetNetForSequenceClassification",
                AutoModelForTokenClassification="RetNetForTokenClassification",
            )
            if remote_code
            else None
        )
        super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        if remote_code and is_main_process:
            (Path(save_directory) / REMOTE_CODE_FILE).write_text(REMOTE_CODE)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The token embedding and an untied output head ~ N(0, d^-1/2): unit-variance logits at the start, and
        an embedding as large as what the first block adds to it (with 0.02 the blocks' outputs drown the token
        identity; docs/math.md, "Defaults"). FFN weights ~ N(0, initializer_range); retention keeps its own
        (Xavier) init."""
        cfg = self.config
        embedding_std = cfg.dim_model**-0.5 if cfg.embedding_init_std is None else cfg.embedding_init_std
        if isinstance(module, MultiScaleRetention):
            module.reset_parameters()  # runs after its children, so it overrides the Linear init below
        elif isinstance(module, nn.Embedding) or module is getattr(self, "lm_head", None):
            init.normal_(module.weight, mean=0.0, std=embedding_std)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=cfg.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm, HeadNorm)) and getattr(module, "weight", None) is not None:
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)


class RetNetModel(RetNetPreTrainedModel):
    """Token embeddings and the RetNet backbone; returns the final hidden states and the cache."""

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__(config)
        config.validate()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim_model)
        self.embed_scale = math.sqrt(config.dim_model) if config.scale_embedding else None
        self.embed_norm = make_norm(config.norm, config.dim_model, config.norm_eps) if config.embed_norm else None
        self.retnet = RetNet.from_options(**config.backbone_options())
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: RetNetCache | None = None,
        use_cache: bool | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        return_dict: bool | None = None,
        hidden_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Hidden states of ``input_ids`` (B, T), continuing ``past_key_values`` if given.

        Args:
            input_ids: (B, T) token ids in [0, vocab_size); others raise ValueError (on accelerators, only
                without a filled cache: checking every decoded token would cost a host sync per token).
            attention_mask: (B, T) 1 on real tokens, 0 on padding. Padding belongs to the first call of a stream:
                left-padded tokens add nothing to the state and each row's positions start at its first real token.
                Right padding (after a row's last real token) changes no real token's output, so it is allowed
                where no cache is filled (a loss, a classifier); use_cache then defaults to False, and True raises.
                A 0 between real tokens raises. With a cache that already holds a state, the mask is ignored.
            cache: the cache a previous call returned (it is updated in place), or None; ``past_key_values``
                is accepted as the same argument (its name before transformers 5.24).
            use_cache: return the cache; defaults to ``config.use_cache`` in eval mode and False in training.
            mode: ``"parallel"`` | ``"chunkwise"`` | ``"recurrent"``; by default, ``config.mode`` without cache,
                the chunkwise form to fill a cache and the recurrent form for one token after a cache.
            chunk_size: tokens per chunk of the chunkwise form; defaults to ``config.chunk_size``.
            return_dict: a ModelOutput (True) or a tuple (False); None follows ``config.return_dict``.
            hidden_to_keep: if > 0, the hidden states of the last ``hidden_to_keep`` positions only.
            output_hidden_states: also return every block's input and the final output, each (B, T, d);
                None follows ``config.output_hidden_states``.
            position_ids (keyword): (B, T) positions that restart at 0 where a packed document starts (transformers'
                ``DataCollatorWithFlattening``): each document is read as if it had a row of its own, no state
                crossing into the next, at the cost of its own tokens (retention's ``starts``); without a cache
                only. ``seq_idx``, or ``cu_seq_lens_q`` and ``cu_seq_lens_k`` (with ``max_length_q``,
                ``max_length_k``), mark the same documents the collator's other ways (:func:`document_starts`).
        Returns:
            BaseModelOutputWithPast with last_hidden_state (B, T, d) (or (B, hidden_to_keep, d)), the cache (or
            None) and hidden_states (or None): num_layers + 1 tensors (B, T, d), the embeddings first and the final
            (normalized) output last, as transformers' models give them.

        A cache is filled ``config.prefill_chunk`` tokens at a time (rounded down to whole chunks), each piece through
        every layer before the next, so that with ``hidden_to_keep`` memory does not grow with the prompt.
        """
        cache = take_cache(cache, kwargs)
        markers = {name: kwargs.pop(name) for name in DOCUMENT_MARKERS if kwargs.get(name) is not None}
        _reject_unused(kwargs)
        # reading ids back is a host sync; on accelerators the decoding steps after a cache skip it
        check_range = input_ids.device.type == "cpu" or cache is None or cache.states is None
        self._check_input_ids(input_ids, check_range)
        B, T = input_ids.shape
        states = None if cache is None else cache.states
        if states is not None and cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} rows but input_ids has {B}")
        padding_mask, right_padded = (None, False) if states is not None else self._padding_mask(attention_mask, T)
        starts = document_starts(markers, attention_mask, input_ids.shape, states) if markers else None  # (B, T)
        packed = starts is not None
        if use_cache is None:  # a state after right padding or a packed row would continue from the wrong text
            use_cache = cache is not None or (self.config.use_cache and not (self.training or right_padded or packed))
        if use_cache and (right_padded or packed):
            raise ValueError(
                "attention_mask pads on the right, and a cache filled from it would continue after the padding: "
                "pad on the left to fill a cache or generate (tokenizer.padding_side = 'left'), or pass use_cache=False"
                if right_padded
                else f"{' and '.join(markers)} pack several documents into a row, and a cache holds one stream per "
                "row: give each document a row of its own to fill a cache, or pass use_cache=False"
            )
        if mode is None:
            mode = ("recurrent" if T == 1 else "chunkwise") if states is not None or use_cache else self.config.mode

        chunk_size = self.config.chunk_size if chunk_size is None else check_chunk_size(chunk_size)
        keep = T if hidden_to_keep <= 0 else min(hidden_to_keep, T)  # the last `keep` positions are returned
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        x, states, hidden = self._run(
            input_ids, states, padding_mask, mode, chunk_size, use_cache, keep, output_hidden_states, starts
        )
        if use_cache:
            cache = RetNetCache() if cache is None else cache
            cache.update_states(states, T)
        else:
            cache = None
        if return_dict is None:
            return_dict = self.config.return_dict
        if not return_dict:  # as ModelOutput.to_tuple(), without building one: this runs per decoded token
            return tuple(value for value in (x, cache, hidden) if value is not None)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden, **{CACHE_NAME: cache})

    def _run(
        self,
        input_ids: Tensor,
        states: list[RetentionState] | None,
        padding_mask: Tensor | None,
        mode: str,
        chunk_size: int,
        use_cache: bool,
        keep: int,
        output_hidden_states: bool = False,
        starts: Tensor | None = None,
    ) -> tuple[Tensor, list[RetentionState] | None, tuple[Tensor, ...] | None]:
        """The backbone over ``input_ids`` (B, T): the last ``keep`` hidden states (B, keep, d), the new states
        (None without ``use_cache``) and, with ``output_hidden_states``, every block's input and the final output
        (each (B, T, d)). ``starts`` (B, T) bool marks the first token of each packed document. A cache is filled
        ``config.prefill_chunk`` tokens at a time."""
        B, T = input_ids.shape
        piece = T  # tokens per call of the backbone
        if use_cache and mode != "parallel":  # the state carries everything between pieces
            piece = max(self.config.prefill_chunk // chunk_size, 1) * chunk_size
        if piece < T and states is None and padding_mask is not None:  # left padding may outlast the first piece
            (dk, dv), offset = self.config.head_dims, -left_padding(padding_mask, T)
            empty = RetentionState.zeros(B, self.config.num_heads, dk, dv, offset=offset, device=input_ids.device)
            states = [empty] * self.config.num_layers  # states are never modified in place: one serves every layer
        outputs, layers = [], []  # layers: per piece, each block's input and the final output
        for start in range(0, T, piece):
            end = min(start + piece, T)
            inputs = [] if output_hidden_states else None
            x = self.retnet(
                self._embed(input_ids[:, start:end]),  # (B, T_piece, d)
                mode=mode,
                chunk_size=chunk_size,
                state=states,
                padding_mask=None if padding_mask is None else padding_mask[:, start:end],
                starts=None if starts is None else starts[:, start:end],
                return_state=use_cache,
                hidden_states=inputs,
            )
            if use_cache:
                x, states = x
            if output_hidden_states:
                layers.append([*inputs, x])
            if end > T - keep:
                outputs.append(x[:, max(T - keep - start, 0) :])
        x = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)  # (B, keep, d)
        hidden = tuple(p[0] if len(p) == 1 else torch.cat(p, dim=1) for p in zip(*layers, strict=True)) or None
        return x, states if use_cache else None, hidden

    def _embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, d): the embedding, scaled by sqrt(d) and normalized where the config says."""
        x = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        return x if self.embed_norm is None else self.embed_norm(x)

    def _check_input_ids(self, input_ids: Tensor, check_range: bool) -> None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, length) tensor of token ids, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.numel() == 0:
            raise ValueError(
                f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row "
                "(for generate(), a prompt of at least one token, e.g. the BOS token)"
            )
        if not check_range or torch.compiler.is_compiling():  # reading values back would break the graph
            return
        if input_ids.numel() <= 256:  # a decoding step's tokens: one read, no reduction kernels to dispatch
            rows = input_ids.tolist()
            lo, hi = min(map(min, rows)), max(map(max, rows))
        else:
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"input_ids holds token id {bad}, outside the vocabulary [0, {self.config.vocab_size}): "
                "encode with the tokenizer the model was trained with, or raise config.vocab_size"
            )

    @staticmethod
    def _padding_mask(attention_mask: Tensor | None, length: int) -> tuple[Tensor | None, bool]:
        """The backbone's left padding, (B, T) bool, True on real tokens (None without a mask), and whether any row
        is also padded on the right. Right padding is marked real: in a causal model no token before it reads it."""
        if attention_mask is None:
            return None, False
        if attention_mask.dim() != 2 or attention_mask.shape[1] != length:
            raise ValueError(
                f"attention_mask must be (batch, {length}) like input_ids on the first call of a stream, "
                f"got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask.bool()
        right = (mask.flip(-1).cumsum(-1).flip(-1) == 0) & mask.any(-1, keepdim=True)  # after a row's last real token
        return mask | right, bool(right.any())


class RetNetForCausalLM(RetNetPreTrainedModel, GenerationMixin):
    """RetNet with a language-model head: next-token logits, the shifted cross-entropy loss and ``generate()``."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__(config)
        self.model = RetNetModel(config)
        self.lm_head = nn.Linear(config.dim_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not build a key-value cache: forward creates the RetNetCache itself."""
        return False

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: RetNetCache | None = None,
        use_cache: bool | None = None,
        mode: str | None = None,
        chunk_size: int | None = None,
        logits_to_keep: int = 0,
        skip_logits: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: Tensor | int | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Next-token logits, and the loss if ``labels`` are given.

        Args:
            input_ids, attention_mask, cache (or past_key_values), use_cache, mode, chunk_size,
                output_hidden_states: see :meth:`RetNetModel.forward`.
            labels: (B, T) targets aligned with ``input_ids`` (the shift happens here: position t predicts
                labels[t + 1]); -100 is ignored. With labels and no cache, use_cache defaults to False.
            logits_to_keep: if > 0, logits of the last ``logits_to_keep`` positions only (generate() uses 1).
            skip_logits: compute the loss block by block from the hidden states (:func:`linear_cross_entropy`)
                and return no logits. Default: in training mode with labels (Liger's convention), where the
                (B, T, V) logits and their gradient would be the largest tensors of the step. Only for a plain
                ``nn.Linear`` head: a wrapped one (an adapter) runs as a module, on logits.
            return_dict: a ModelOutput (True) or a tuple (False); None follows ``config.return_dict``.
            num_items_in_batch: the targets of the whole optimizer step, as transformers' ``Trainer`` passes it:
                the loss is then this batch's summed over that count rather than its mean, so that gradient
                accumulation weighs every token alike whatever each micro-batch's share of ignored ones.
        Returns:
            CausalLMOutputWithPast with loss (scalar, float32 or wider, or None), logits (B, T', vocab_size) or
            None, the cache and hidden_states (see :meth:`RetNetModel.forward`).
        """
        cache = take_cache(cache, kwargs)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if not output_hidden_states and self._decoding(input_ids, labels, cache, use_cache, mode):  # the short way
            if kwargs:
                _reject_unused(kwargs)
            logits = self._decode(input_ids, cache)
            if not (self.config.return_dict if return_dict is None else return_dict):
                return logits, cache
            return step_output(logits, cache)
        if logits_to_keep and labels is not None:
            raise ValueError("labels need the logits of every position: leave logits_to_keep=0")
        if use_cache is None and labels is not None and cache is None:
            use_cache = False  # a loss needs no state: score in config.mode, as in training
        out = self.model(
            input_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            mode=mode,
            chunk_size=chunk_size,
            hidden_to_keep=logits_to_keep,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        h = out.last_hidden_state  # (B, T, d), or (B, logits_to_keep, d)
        plain_head = type(self.lm_head) is nn.Linear  # the blockwise loss reads lm_head.weight, not the module
        if skip_logits is None:
            skip_logits = self.training and labels is not None and plain_head
        if skip_logits and not plain_head:
            raise ValueError(
                f"skip_logits=True reads lm_head.weight directly and would bypass the {type(self.lm_head).__name__} "
                "wrapping lm_head: leave skip_logits unset (None) to compute the loss from the module's logits"
            )
        if skip_logits and labels is None:
            raise ValueError("skip_logits=True leaves only the loss: pass labels, or skip_logits=False for logits")
        targets = None if labels is None else next_token_targets(labels, h.shape[:2]).to(h.device)
        reduction = "mean" if num_items_in_batch is None else "sum"
        logits = loss = None
        if skip_logits:  # (B * T, d) against (B * T,): the output layer and the loss as one op
            w, b = self.lm_head.weight, self.lm_head.bias
            loss = linear_cross_entropy(h.flatten(0, 1), w, targets, b, reduction=reduction)
        else:
            logits = self.lm_head(h)  # (B, T', V)
            if labels is not None:
                loss = F.cross_entropy(upcast(logits).flatten(0, 1), targets, reduction=reduction)
        if loss is not None and num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_NAME: getattr(out, CACHE_NAME)}
        )
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()

    def generate(
        self, inputs: Tensor | None = None, generation_config: GenerationConfig | None = None, *args, **kwargs
    ) -> Tensor | object:
        """transformers' ``generate()``. Greedy search to ``max_new_tokens`` (with an attention mask, special tokens,
        a minimum length and a streamer) runs as a plain loop over the cached forward, with the same tokens and
        0.1-0.2 ms a token less on a CPU; everything else runs transformers' loop (:mod:`.generation`)."""
        ids = None if args else greedy_search(self, inputs, generation_config, kwargs)
        return super().generate(inputs, generation_config, *args, **kwargs) if ids is None else ids

    def prepare_inputs_for_generation(
        self, input_ids: Tensor, next_sequence_length: int | None = None, **kwargs
    ) -> dict[str, object]:
        """The inputs of generate()'s next forward. A decoding step (one new token per row after a filled cache,
        with nothing but the cache, the mask, ``use_cache`` and ``logits_to_keep`` given) takes a short way to the
        inputs transformers' general method builds: that one costs ~40 µs a token, a fifth of a native step."""
        cache = kwargs.get(CACHE_NAME)
        if (
            next_sequence_length == 1
            and kwargs.keys() <= _STEP_INPUTS
            and isinstance(cache, RetNetCache)
            and cache.states is not None
            and input_ids.device == cache.states[0].S.device
        ):
            last = input_ids[:, -1:].clone(memory_format=torch.contiguous_format)  # one stride for compiled steps
            return {"input_ids": last} | {k: v for k, v in kwargs.items() if v is not None or k != "attention_mask"}
        return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)

    def _decoding(
        self,
        input_ids: Tensor,
        labels: Tensor | None,
        cache: RetNetCache | None,
        use_cache: bool | None,
        mode: str | None,
    ) -> bool:
        """Whether this call is one decoding step: one token per row after a filled cache, for logits only."""
        return (
            cache is not None
            and cache.states is not None
            and isinstance(input_ids, Tensor)
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and labels is None
            and use_cache is not False
            and mode in (None, "recurrent")
            and not (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling())
        )

    def _decode(self, input_ids: Tensor, cache: RetNetCache, greedy: bool = False) -> Tensor:
        """One decoding step by ``config.decode_implementation`` (:mod:`.decoding`): logits (B, 1, V), or with
        ``greedy`` each row's greedy choice (B, 1); the cache takes the new states."""
        implementation = self.config.decode_implementation
        if implementation != "native":  # the native step checks its ids itself
            self.model._check_input_ids(input_ids, input_ids.device.type == "cpu")
        if cache.batch_size != input_ids.shape[0]:
            raise ValueError(f"the cache holds {cache.batch_size} rows but input_ids has {input_ids.shape[0]}")
        out, states = step_for(implementation, cache.writable, greedy)(self, input_ids, cache.states)
        cache.update_states(states, 1, decoded=True)
        return out

    def warm_up_decoding(self, batch_sizes: Sequence[int] = (1, 2)) -> float:
        """Compile the decoding step now (``config.decode_implementation`` ``"compiled"`` or ``"aot"``) rather than
        at the first token: one step at each batch size; returns the seconds it took (see :func:`.decoding.warm_up`)."""
        return warm_up(self, batch_sizes)


class RetNetForClassification(RetNetPreTrainedModel):
    """The backbone and a linear head ``score`` (d -> ``config.num_labels``, Llama's name, which peft's SEQ_CLS and
    TOKEN_CLS train whole): what the two classifiers share. Loaded from a language model's checkpoint, the backbone
    is kept and the head is new."""

    accepts_loss_kwargs = False  # a loss per row or token: transformers' Trainer must not pass num_items_in_batch

    def __init__(self, config: RetNetConfig) -> None:
        super().__init__(config)
        self.model = RetNetModel(config)
        self.score = nn.Linear(config.dim_model, config.num_labels, bias=False)
        self.post_init()

    def _hidden(
        self, input_ids: Tensor, attention_mask: Tensor | None, keep: int, **options
    ) -> BaseModelOutputWithPast:
        """The backbone without a cache: last_hidden_state (B, T, d), or (B, keep, d) with ``keep`` > 0."""
        return self.model(
            input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True, hidden_to_keep=keep, **options
        )

    def _output(
        self,
        output_class: type,
        loss: Tensor | None,
        logits: Tensor,
        out: BaseModelOutputWithPast,
        return_dict: bool | None,
    ) -> ModelOutput | tuple:
        """``output_class`` with the loss, the logits and the backbone's hidden states, or its tuple."""
        result = output_class(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if (self.config.return_dict if return_dict is None else return_dict) else result.to_tuple()


class RetNetForSequenceClassification(RetNetForClassification):
    """RetNet with a classification (or regression) head on each row's last real token, where the causal model has
    read the whole text: ``AutoModelForSequenceClassification``, peft's ``SEQ_CLS``, the text-classification
    pipeline."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **options,
    ) -> SequenceClassifierOutput | tuple:
        """Logits (B, num_labels) of each row's last real token, and the loss if ``labels`` are given.

        Args:
            input_ids, attention_mask, and ``mode`` and ``chunk_size`` among ``options``: see
                :meth:`RetNetModel.forward`; padding on either side.
            labels: (B,) class ids (cross-entropy), (B,) or (B, 1) floats with ``num_labels == 1`` (mean squared
                error), or (B, num_labels) floats in [0, 1] (multi-label, binary cross-entropy): transformers'
                ``problem_type`` rules, through its ``loss_function``.
        The last real token of a row is the last 1 of ``attention_mask``; without a mask, the last token that is
        not ``config.pad_token_id``; without either, the last position. Left padding also needs the mask: without
        it, the pad tokens are read as text.
        """
        last = self._last_real_tokens(input_ids, attention_mask)  # (B,), or None: the last position of every row
        out = self._hidden(input_ids, attention_mask, 1 if last is None else 0, **options)
        h = out.last_hidden_state  # (B, 1 or T, d)
        pooled = h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]  # (B, d)
        logits = self.score(pooled)  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=upcast(logits), config=self.config)
        return self._output(SequenceClassifierOutput, loss, logits, out, return_dict)

    def _last_real_tokens(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """The position of each row's last real token (B,), or None where that is the last position of every row."""
        if attention_mask is not None:
            real = attention_mask.bool()
        elif self.config.pad_token_id is not None and isinstance(input_ids, Tensor):
            real = input_ids != self.config.pad_token_id
        else:
            return None
        if not isinstance(input_ids, Tensor) or real.shape != input_ids.shape:
            return None  # RetNetModel.forward names what is wrong with the shapes
        positions = torch.arange(real.shape[-1], device=real.device)
        last = torch.where(real, positions, -1).amax(-1).clamp(min=0)  # a row without a real token: its first
        return None if bool((last == real.shape[-1] - 1).all()) else last


class RetNetForTokenClassification(RetNetForClassification):
    """RetNet with a classification head on every token (``AutoModelForTokenClassification``, peft's
    ``TOKEN_CLS``); each token's label is read from the text up to it, as in any causal model."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **options,
    ) -> TokenClassifierOutput | tuple:
        """Logits (B, T, num_labels), and the cross-entropy loss over ``labels`` (B, T) if given (-100 ignored).
        input_ids, attention_mask, and ``mode`` and ``chunk_size`` among ``options``: see
        :meth:`RetNetModel.forward`; padding on either side."""
        out = self._hidden(input_ids, attention_mask, 0, **options)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        loss = None
        if labels is not None:  # in float32 or wider (transformers' token loss would round float64 to float32)
            loss = F.cross_entropy(upcast(logits).flatten(0, 1), labels.flatten().to(logits.device))
        return self._output(TokenClassifierOutput, loss, logits, out, return_dict)


def _is_hub_id(name: str) -> bool:
    """``owner/name`` as the Hub spells repository ids (not an absolute, relative or home path)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "~"))


def _download(repo_id: str, kwargs: dict) -> Path:
    """The local snapshot of a Hub repository (weights, configuration and tokenizer files only)."""
    from huggingface_hub import snapshot_download

    hub = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "token", "local_files_only") if k in kwargs}
    patterns = ["*.json", "*.safetensors", "*.bin", "*.pt", "*.model", "*.txt"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, **hub))
    except Exception as e:
        raise OSError(
            f"{repo_id}: neither a local folder nor a Hub repository that could be fetched ({type(e).__name__}: {e}); "
            "check the id, or download it first (with HF_HUB_OFFLINE=1 only cached snapshots are used)"
        ) from e


def _foreign_layout(path: Path) -> str | None:
    """The convertible layout of a checkpoint folder or file, or None for retentive's own folders (and the rest)."""
    from .convert import foreign_layout

    if path.is_file():
        return "torchscale" if path.suffix in (".pt", ".pth") else None
    config_file = path / "config.json"
    if not config_file.is_file():
        return "torchscale" if any(path.glob("*.pt")) else None
    return foreign_layout(json.loads(config_file.read_text()), [])


_OUTPUT_FIELDS = dict.fromkeys(field.name for field in dataclasses.fields(CausalLMOutputWithPast))


def step_output(logits: Tensor, cache: RetNetCache) -> CausalLMOutputWithPast:
    """``CausalLMOutputWithPast(logits=logits, cache=cache)`` as its constructor leaves it (the fields that are not
    None as items, every field as an attribute), built directly: the constructor walks the dataclass's fields at
    each field it sets, ~10 µs a decoded token and more with cold caches (tests compare the two)."""
    output = CausalLMOutputWithPast.__new__(CausalLMOutputWithPast)
    OrderedDict.__setitem__(output, "logits", logits)
    OrderedDict.__setitem__(output, CACHE_NAME, cache)
    vars(output).update(_OUTPUT_FIELDS, logits=logits, **{CACHE_NAME: cache})
    return output


def next_token_targets(labels: Tensor, shape: torch.Size) -> Tensor:
    """The target of every position, flattened (B * T,): position t predicts labels[:, t + 1]; the last
    position of each row, which has no next token, is ignored (-100) like the padding.

    Scoring every position against these targets is the shifted loss without a shifted copy of the logits.
    """
    if labels.shape != shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(shape)}, got {tuple(labels.shape)}")
    return F.pad(labels[:, 1:], (0, 1), value=-100).flatten()


DOCUMENT_MARKERS = ("position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def document_starts(
    markers: dict[str, Any], attention_mask: Tensor | None, shape: torch.Size, states: list[RetentionState] | None
) -> Tensor | None:
    """Where the documents packed into each row start, (B, T) bool, or None if no row packs several.

    ``markers`` holds what of :data:`DOCUMENT_MARKERS` a call carries, as transformers' ``DataCollatorWithFlattening``
    gives them: ``position_ids`` (B, T) counting 0, 1, 2, ... and restarting at 0 where a document starts (its
    default); ``seq_idx`` (B, T), each token's document (``return_seq_idx``, Mamba-2's convention);
    ``cu_seq_lens_q`` and ``cu_seq_lens_k``, the documents' cumulative lengths over the flattened batch, and
    ``max_length_q``, ``max_length_k`` (``return_flash_attn_kwargs``, FlashAttention's varlen arguments; the lengths
    are implied). Markers given together must agree.

    RetNet takes its positions from the order of the tokens (and the cache), so position_ids can only say where
    documents start: positions that repeat what the model computes anyway (0, 1, 2, ... from each row's first real
    token, as transformers builds them with left padding) change nothing. Anything else raises ValueError: shifted
    or skipping positions, markers after a filled cache, documents packed into padded rows, markers that disagree.
    """
    B, T = shape
    found: dict[str, Tensor] = {}  # marker -> the starts it marks
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if markers.keys() - {"position_ids"} and (states is not None or padded):
        raise ValueError(f"{sorted(markers)} mark packed documents, which take no cache and no padding")
    if "position_ids" in markers:
        if states is not None:
            raise ValueError("position_ids after a filled cache: positions continue from the cache, leave them out")
        found["position_ids"] = _position_starts(markers["position_ids"], attention_mask if padded else None, shape)
    if "seq_idx" in markers:
        seq_idx = _integers(markers["seq_idx"], "seq_idx", (B, T), "each token's document")
        found["seq_idx"] = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0), value=True)
    if "cu_seq_lens_q" in markers or "cu_seq_lens_k" in markers:
        cu_q, cu_k = markers.get("cu_seq_lens_q"), markers.get("cu_seq_lens_k", markers.get("cu_seq_lens_q"))
        if not (isinstance(cu_q, Tensor) and isinstance(cu_k, Tensor) and torch.equal(cu_q, cu_k)):
            raise ValueError(
                "cu_seq_lens_k needs cu_seq_lens_q, and must equal it (self-attention: one set of documents)"
            )
        cu = _integers(cu_q, "cu_seq_lens_q", None, "the documents' cumulative lengths").flatten()
        if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != B * T or bool((cu[1:] <= cu[:-1]).any()):
            raise ValueError(
                f"cu_seq_lens_q must rise from 0 to batch x length = {B * T} (the documents' cumulative lengths "
                f"over the flattened batch), got {cu.tolist()}"
            )
        flat = torch.zeros(B * T, dtype=torch.bool, device=cu.device)
        flat[cu[:-1]] = True
        if bool((~flat.view(B, T)[:, 0]).any()):
            raise ValueError("cu_seq_lens_q puts a document across two rows: each row must start one")
        found["cu_seq_lens_q"] = flat.view(B, T)
    if not found:
        return None
    (first, starts), *others = found.items()
    for name, other in others:
        if starts is None or other is None or not torch.equal(starts, other.to(starts.device)):
            raise ValueError(f"{first} and {name} mark different documents: give one, or make them agree")
    return starts if starts is not None and bool(starts[:, 1:].any()) else None


def _position_starts(position_ids: Any, padding: Tensor | None, shape: torch.Size) -> Tensor | None:
    """The starts ``position_ids`` mark, (B, T) bool; None with ``padding`` (the attention mask of padded rows),
    where they may only repeat the positions RetNet computes. See :func:`document_starts`."""
    positions = _integers(position_ids, "position_ids", tuple(shape), "integer positions shaped like input_ids")
    if padding is not None:
        real = padding.bool()
        if bool(((positions != real.long().cumsum(-1) - 1) & real).any()):
            raise ValueError(
                "with padding, position_ids must count 0, 1, 2, ... from each row's first real token (what RetNet "
                "computes anyway); rows that pack documents (position_ids restarting at 0) take no padding"
            )
        return None
    starts = positions == 0
    if bool((~starts[:, 0]).any() or (~starts[:, 1:] & (positions[:, 1:] != positions[:, :-1] + 1)).any()):
        raise ValueError(
            "position_ids must count 0, 1, 2, ... in each row, restarting at 0 where a packed document starts "
            "(transformers' DataCollatorWithFlattening): RetNet takes its positions from the order of the tokens, "
            "so they cannot be shifted or skipped"
        )
    return starts


def _integers(value: Any, name: str, shape: tuple[int, ...] | None, what: str) -> Tensor:
    """``value`` as an int64 tensor if it is an integer tensor (of ``shape``, unless None), else ValueError."""
    if not isinstance(value, Tensor) or value.is_floating_point() or (shape is not None and value.shape != shape):
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        want = f"a {shape} tensor of " if shape is not None else "a tensor of "
        raise ValueError(f"{name} must be {want}{what}, got {got}")
    return value.long()


def upcast(x: Tensor) -> Tensor:
    """x in float32 if it is in a narrower float: losses are summed in float32 or wider."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _reject_unused(kwargs: dict) -> None:
    """Refuse arguments this model cannot honour (it has no attention weights to output)."""
    if unused := {k: v for k, v in kwargs.items() if v not in (None, False)}:
        raise TypeError(f"RetNet forward got unsupported argument(s) {sorted(unused)}")
