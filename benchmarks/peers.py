"""One interface over every model the benchmarks compare, built at identical dimensions.

Each adapter exposes what a benchmark needs and nothing else:

- ``prefill(tokens)`` (B, T) -> the decode state after reading the tokens (no grad);
- ``synthetic_state(batch_size, context)``: the state a prefill of ``context`` tokens leaves, filled with
  random values (a decode step costs the same whatever the values, and this skips a long prefill);
- ``decode_step(token, state)`` (B, 1) -> (logits (B, V), state): one token with the cache;
- ``train_loss(tokens)`` (B, T) -> next-token cross-entropy, for forward+backward timings: the library's own
  training loss where it has one (``model(tokens, labels=tokens).loss``), else logits + :func:`shift_loss`;
- ``cache_bytes(state)``: bytes the decode state holds.

Models: ``retentive`` (this library, recurrent decode, parallel or chunkwise training), ``transformer``
(Hugging Face Llama with SDPA and a KV cache, :mod:`retentive.baselines`), and the peers ``torchscale``
(Microsoft's RetNet) and ``yet-another-retnet``. Peers live only in the benchmark environment
(``make bench-env``); :func:`available` says which can be built here and why not.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retentive import RetentionState
from retentive.baselines import count_parameters, llama_config_matching
from retentive.models import CACHE_NAME, RetNetCache, RetNetConfig, RetNetForCausalLM, cache_of


@dataclass(frozen=True)
class Dims:
    """The shared size of every compared model (4 layers, d=256, 4 heads, vocab 4096)."""

    num_layers: int = 4
    dim_model: int = 256
    num_heads: int = 4
    vocab_size: int = 4096


def solve_width(build, target: int) -> int:
    """The width w for which ``count_parameters(build(w))`` is closest to ``target`` (counts are affine in w)."""
    p1, p2 = count_parameters(build(8)), count_parameters(build(16))
    return max(1, round(8 + (target - p1) * 8 / (p2 - p1)))


def shift_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy: logits (B, T, V) predict tokens[:, 1:]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def retnet_config(dims: Dims, **overrides) -> RetNetConfig:
    """retentive's RetNetConfig at ``dims`` (FFN 2d, value factor 2: 12d² per layer); the head is untied,
    as the peers' heads are, so that every model holds the same embedding parameters."""
    return RetNetConfig(
        vocab_size=dims.vocab_size,
        dim_model=dims.dim_model,
        num_layers=dims.num_layers,
        num_heads=dims.num_heads,
        tie_word_embeddings=False,
        **overrides,
    )


class Retentive:
    """This library's RetNetForCausalLM: chunkwise prefill, recurrent decode; training in ``mode``.

    ``loss="fused"`` trains as the library does (labels in training mode: the output layer and the loss run
    block by block, :func:`retentive.ops.linear_cross_entropy`); ``loss="logits"`` takes the logits and
    :func:`shift_loss`, as the peers are measured, to show what the loss alone is worth.
    """

    name = "retentive"

    def __init__(self, dims: Dims, mode: str = "chunkwise", chunk_size: int = 256, loss: str = "fused") -> None:
        if loss not in ("fused", "logits"):
            raise ValueError(f"loss must be 'fused' or 'logits', got {loss!r}")
        self.dims, self.mode, self.chunk_size, self.loss = dims, mode, chunk_size, loss
        self.model = RetNetForCausalLM(retnet_config(dims, chunk_size=chunk_size))

    def prefill(self, tokens: Tensor) -> RetNetCache:
        return cache_of(self.model(tokens, use_cache=True, mode="chunkwise", logits_to_keep=1))

    def synthetic_state(self, batch_size: int, context: int) -> RetNetCache:
        cfg = self.model.config
        dk, dv = cfg.head_dims
        states = [
            RetentionState(
                torch.randn(batch_size, cfg.num_heads, dk, dv),
                torch.randn(batch_size, cfg.num_heads, dk),
                torch.full((batch_size,), context),
            )
            for _ in range(cfg.num_layers)
        ]
        return RetNetCache(states, seen_tokens=context)

    def decode_step(self, token: Tensor, state: RetNetCache) -> tuple[Tensor, RetNetCache]:
        out = self.model(token, cache=state, use_cache=True)
        return out.logits[:, -1], cache_of(out)

    def train_loss(self, tokens: Tensor) -> Tensor:
        if self.loss == "fused":
            return self.model(tokens, labels=tokens, mode=self.mode, use_cache=False).loss
        return shift_loss(self.model(tokens, mode=self.mode, use_cache=False).logits, tokens)

    @staticmethod
    def cache_bytes(state: RetNetCache) -> int:
        return state.nbytes()


class Transformer:
    """Hugging Face ``LlamaForCausalLM`` with SDPA and a KV cache, parameter-matched to ``retentive``."""

    name = "transformer"

    def __init__(self, dims: Dims) -> None:
        from transformers import LlamaForCausalLM

        self.dims = dims
        target = count_parameters(RetNetForCausalLM(retnet_config(dims)))
        config = llama_config_matching(dims.dim_model, dims.num_layers, dims.num_heads, dims.vocab_size, target)
        self.model = LlamaForCausalLM(config)

    def prefill(self, tokens: Tensor):
        return cache_of(self.model(input_ids=tokens, use_cache=True, logits_to_keep=1))

    def synthetic_state(self, batch_size: int, context: int):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        head_dim = self.dims.dim_model // self.dims.num_heads
        for layer in range(self.dims.num_layers):
            k, v = (torch.randn(batch_size, self.dims.num_heads, context, head_dim) for _ in range(2))
            cache.update(k, v, layer)
        return cache

    def decode_step(self, token: Tensor, state):
        out = self.model(input_ids=token, use_cache=True, **{CACHE_NAME: state})
        return out.logits[:, -1], cache_of(out)

    def train_loss(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, labels=tokens, use_cache=False).loss  # Hugging Face's causal LM loss

    @staticmethod
    def cache_bytes(state) -> int:
        return sum(t.numel() * t.element_size() for layer in state.layers for t in (layer.keys, layer.values))


def _stub_timm() -> None:
    """torchscale imports ``timm.models.layers.drop_path`` only; timm 0.6 pulls torchvision, which we don't install.

    The stub is the standard stochastic depth; the benchmarks use drop_path_rate 0, so it is never active.
    """
    if "timm" in sys.modules or importlib.util.find_spec("timm") is not None:
        return

    def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
        if drop_prob == 0.0 or not training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - drop_prob)
        return x * keep / (1 - drop_prob)

    modules = {name: types.ModuleType(name) for name in ("timm", "timm.models", "timm.models.layers")}
    modules["timm.models.layers"].drop_path = drop_path
    sys.modules.update(modules)


class TorchScale:
    """Microsoft torchscale's ``RetNetDecoder`` (value dim 2d, GLU FFN width solved to match parameters).

    Its chunkwise form returns no state, so its prefill reads the prompt token by token.
    """

    name = "torchscale"

    def __init__(self, dims: Dims, chunk_size: int = 512) -> None:
        _stub_timm()
        from torchscale.architecture.config import RetNetConfig
        from torchscale.architecture.retnet import RetNetDecoder

        self.dims, self.chunk_size = dims, chunk_size

        def build(ffn: int, chunkwise: bool = True) -> nn.Module:
            cfg = RetNetConfig(
                decoder_embed_dim=dims.dim_model,
                decoder_value_embed_dim=2 * dims.dim_model,
                decoder_retention_heads=dims.num_heads,
                decoder_ffn_embed_dim=ffn,
                decoder_layers=dims.num_layers,
                vocab_size=dims.vocab_size,
                chunkwise_recurrent=chunkwise,
                recurrent_chunk_size=chunk_size,
            )
            return RetNetDecoder(cfg, embed_tokens=nn.Embedding(dims.vocab_size, dims.dim_model))

        ffn = solve_width(build, count_parameters(RetNetForCausalLM(retnet_config(dims))))
        self.model = build(ffn)
        self.position = 0

    def _step(self, token: Tensor, state: dict, position: int) -> Tensor:
        # torchscale reads the position from the length of the token prefix and embeds only the last token:
        # an expanded view of the last token stands for the prefix without copying it.
        prefix = token[:, -1:].expand(token.shape[0], position + 1)
        self.model.chunkwise_recurrent = False
        try:
            logits, _ = self.model(prefix, incremental_state=state)
        finally:
            self.model.chunkwise_recurrent = True
        return logits[:, -1]

    def prefill(self, tokens: Tensor) -> dict:
        # torchscale's own "is_first_step" path mixes the parallel decay into the recurrent scale: not used.
        state: dict = {"is_first_step": False}
        for t in range(tokens.shape[1]):
            self._step(tokens[:, t : t + 1], state, t)
        state["position"] = tokens.shape[1]
        return state

    def synthetic_state(self, batch_size: int, context: int) -> dict:
        head_dim = 2 * self.dims.dim_model // self.dims.num_heads
        key_dim = self.dims.dim_model // self.dims.num_heads
        state: dict = {"is_first_step": False, "position": context}
        for layer in range(self.dims.num_layers):
            state[layer] = {
                "prev_key_value": torch.randn(batch_size, self.dims.num_heads, head_dim, key_dim),
                "scale": torch.full((self.dims.num_heads,), float(context)),
            }
        return state

    def decode_step(self, token: Tensor, state: dict) -> tuple[Tensor, dict]:
        logits = self._step(token, state, state["position"])
        state["position"] += 1
        return logits, state

    def train_loss(self, tokens: Tensor) -> Tensor:
        return shift_loss(self.model(tokens)[0], tokens)

    @staticmethod
    def cache_bytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for k, s in state.items() if isinstance(k, int) for t in s.values())


class YetAnotherRetNet:
    """fkodom's ``yet-another-retnet`` (value dim d, FFN width solved to match parameters).

    Its chunkwise form takes one chunk and the previous state, so training and prefill loop over chunks.
    """

    name = "yet-another-retnet"

    def __init__(self, dims: Dims, chunk_size: int = 512) -> None:
        from yet_another_retnet.retnet import RetNet as YARetNet

        self.dims, self.chunk_size = dims, chunk_size

        def build(ffn: int) -> nn.Module:
            return YARetNet(
                dims.vocab_size, dims.dim_model, dims.num_heads, dims.num_layers, dropout=0.0, dim_feedforward=ffn
            )

        self.model = build(solve_width(build, count_parameters(RetNetForCausalLM(retnet_config(dims)))))

    def _chunks(self, tokens: Tensor) -> tuple[Tensor, list[Tensor]]:
        states: list[Tensor] = []
        logits = []
        for start in range(0, tokens.shape[1], self.chunk_size):
            out, states = self.model.forward_chunkwise(tokens[:, start : start + self.chunk_size], start, states)
            logits.append(out)
        return torch.cat(logits, dim=1), states

    def prefill(self, tokens: Tensor) -> dict:
        _, states = self._chunks(tokens)
        return {"states": states, "position": tokens.shape[1]}

    def synthetic_state(self, batch_size: int, context: int) -> dict:
        head_dim = self.dims.dim_model // self.dims.num_heads
        shape = (batch_size, self.dims.num_heads, head_dim, head_dim)
        return {"states": [torch.randn(shape) for _ in range(self.dims.num_layers)], "position": context}

    def decode_step(self, token: Tensor, state: dict) -> tuple[Tensor, dict]:
        logits, states = self.model.forward_recurrent(token[:, -1], state["position"], state["states"])
        return logits, {"states": states, "position": state["position"] + 1}

    def train_loss(self, tokens: Tensor) -> Tensor:
        return shift_loss(self._chunks(tokens)[0], tokens)

    @staticmethod
    def cache_bytes(state: dict) -> int:
        return sum(t.numel() * t.element_size() for t in state["states"])


class PeerLM(nn.Module):
    """A peer's network as a causal LM for :class:`retentive.training.Trainer` (the quality benchmark):
    ``forward(input_ids, labels=None)`` returns ``.loss`` (:func:`shift_loss`) and ``.logits``.

    ``torchscale``: its ``RetNetDecoder`` (value dim 2d, swish GLU FFN, RMSNorm), the head tied to the embedding,
    the embedding ~ N(0, d^-1/2) as fairseq's language models build it. ``yet-another-retnet``: its ``RetNet`` as the
    library builds it (its own embedding and untied output layer). The FFN width is solved so that the parameter
    count matches ``target_params``.
    """

    def __init__(self, name: str, vocab_size: int, dim_model: int, num_layers: int, num_heads: int, target_params: int):
        super().__init__()
        self.name = name
        if name == "torchscale":
            _stub_timm()
            from torchscale.architecture.config import RetNetConfig as TorchScaleConfig
            from torchscale.architecture.retnet import RetNetDecoder

            def build(ffn: int) -> nn.Module:
                cfg = TorchScaleConfig(
                    decoder_embed_dim=dim_model,
                    decoder_value_embed_dim=2 * dim_model,
                    decoder_retention_heads=num_heads,
                    decoder_ffn_embed_dim=ffn,
                    decoder_layers=num_layers,
                    vocab_size=vocab_size,
                    share_decoder_input_output_embed=True,
                )
                embedding = nn.Embedding(vocab_size, dim_model)
                nn.init.normal_(embedding.weight, std=dim_model**-0.5)
                return RetNetDecoder(cfg, embed_tokens=embedding)

        elif name == "yet-another-retnet":
            from yet_another_retnet.retnet import RetNet as YARetNet

            def build(ffn: int) -> nn.Module:
                return YARetNet(vocab_size, dim_model, num_heads, num_layers, dropout=0.0, dim_feedforward=ffn)

        else:
            raise ValueError(f"unknown peer {name!r}; choose from {PEERS}")
        self.net = build(solve_width(build, target_params))

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> types.SimpleNamespace:
        torchscale = self.name == "torchscale"
        logits = self.net(input_ids)[0] if torchscale else self.net.forward_parallel(input_ids)  # (B, T, V), parallel
        loss = None if labels is None else shift_loss(logits, labels)
        return types.SimpleNamespace(loss=loss, logits=logits)


ADAPTERS = {a.name: a for a in (Retentive, Transformer, TorchScale, YetAnotherRetNet)}
PEERS = ("torchscale", "yet-another-retnet")
PEER_MODULES = {"torchscale": "torchscale", "yet-another-retnet": "yet_another_retnet"}


def available(name: str) -> str | None:
    """None if model ``name`` can be built here, else why not (a peer missing from this environment)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(ADAPTERS)}")
    module = PEER_MODULES.get(name)
    if module is not None and importlib.util.find_spec(module) is None:
        return f"{name} is not installed in {sys.prefix} (run `make bench-env` and bench with .venv-peers)"
    return None


def build(name: str, dims: Dims = Dims(), **kwargs):
    """The adapter for model ``name`` at ``dims``; kwargs (mode, chunk_size) go to its constructor."""
    reason = available(name)
    if reason:
        raise RuntimeError(reason)
    torch.manual_seed(0)
    adapter = ADAPTERS[name](dims, **kwargs)
    adapter.model.eval()
    return adapter
