"""RetNetConfig: every option of the RetNet language model, with the paper's sizes and CPU-sized presets.

A ``transformers.PretrainedConfig`` (model_type ``"retnet"``), so it saves to and loads from
``config.json`` and works with ``AutoConfig``. A config that cannot work is refused with a ValueError.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ..layers import ACTIVATIONS, GATES, HEAD_NORMS
from ..layers.feedforward import HIDDEN_NORMS
from ..ops import CHUNK_SIZE, MODES, ROTARY_ANGLES, ROTARY_LAYOUTS, SCHEDULES
from .cache_retnet import CACHE_NAME
from .decoding import DECODE_IMPLEMENTATIONS
from .preset_config import PresetConfig, check_heads, check_positive_int

# The paper (Sun et al. 2023, Table 2) gives d, layers, heads and FFN width, not the vocabulary; it trains on a
# ~100k-token BPE. We use 100,352: a cl100k-sized BPE (100,277 tokens) padded to a multiple of 128.
PAPER_VOCAB_SIZE = 100_352

# name -> the fields that differ from the defaults; ffn_dim = 2d and value_factor = 2 everywhere (the paper's shapes)
PRESETS: dict[str, dict[str, Any]] = {
    "retnet-tiny": dict(vocab_size=4096, dim_model=256, num_layers=4, num_heads=4, ffn_dim=512),
    "retnet-small": dict(vocab_size=16384, dim_model=512, num_layers=6, num_heads=8, ffn_dim=1024),
    "retnet-base": dict(vocab_size=50257, dim_model=768, num_layers=12, num_heads=12, ffn_dim=1536),
    "retnet-1.3b": dict(vocab_size=PAPER_VOCAB_SIZE, dim_model=2048, num_layers=24, num_heads=8, ffn_dim=4096),
    "retnet-2.7b": dict(vocab_size=PAPER_VOCAB_SIZE, dim_model=2560, num_layers=32, num_heads=10, ffn_dim=5120),
    "retnet-6.7b": dict(vocab_size=PAPER_VOCAB_SIZE, dim_model=4096, num_layers=32, num_heads=16, ffn_dim=8192),
}


# The fields RetNet.from_options, RetNetBlock and MultiScaleRetention take under the same names.
BACKBONE_FIELDS = (
    *("num_layers", "num_heads", "dim_model", "ffn_dim", "dropout", "value_factor", "gate_fn", "head_norm", "decay"),
    *("ffn_activation", "ffn_bias", "ffn_norm", "norm", "norm_eps", "rotary", "msr_bias", "value_dim"),
    *("normalize_decay", "normalize_retention", "head_norm_weight", "head_norm_eps"),
    *("rotary_layout", "rotary_angles", "rotary_base"),
)


class RetNetConfig(PresetConfig):
    """Configuration of :class:`RetNetModel` and :class:`RetNetForCausalLM`.

    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads`` and ``intermediate_size`` are aliases of
    ``dim_model``, ``num_layers``, ``num_heads`` and ``ffn_dim``, for Hugging Face utilities; ``normalize_attn`` and
    ``normalize_retn`` (the seed repository's names, which older config.json files carry) of ``normalize_decay`` and
    ``normalize_retention``.
    Build one with ``RetNetConfig(**fields)`` or ``RetNetConfig.from_preset(name, **overrides)``.
    """

    model_type: ClassVar[str] = "retnet"
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS
    derived: ClassVar[dict[str, str]] = {"ffn_dim": "dim_model"}  # ffn_dim None: 2d
    keys_to_ignore_at_inference: ClassVar[list[str]] = [CACHE_NAME]
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "dim_model",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "intermediate_size": "ffn_dim",
        "normalize_attn": "normalize_decay",
        "normalize_retn": "normalize_retention",
    }

    vocab_size: int = 4096
    dim_model: int = 256  # d; each head has dk = d / num_heads
    num_layers: int = 4  # L blocks
    num_heads: int = 4  # H heads per block, each with its own decay gamma
    value_factor: int = 2  # dv = value_factor * d / H (the paper: 2, which keeps 12 d^2 parameters per layer)
    ffn_dim: int | None = None  # FFN hidden width; None means 2 d (the paper)
    ffn_activation: str = "gelu"  # gelu | relu | swish | glu | geglu | swiglu
    ffn_bias: bool = True
    gate_fn: str = "swish"  # the retention output gate: swish (paper) | gelu (seed repository) | none
    head_norm: str = "groupnorm"  # per-head norm of the retention output: groupnorm | rmsnorm | layernorm | none
    decay: str | list[float] = "retnet"  # "retnet" (gamma_h = 1 - 2^(-5-h)), "linspace", or one gamma per head
    rotary: bool = True  # the paper's Theta (xPos-style rotation at absolute positions); needs an even head dim
    msr_bias: bool = False  # biases in the q, k, v, g and output projections
    normalize_decay: bool = False  # decay normalization (docs/math.md, "Normalizations"), exact in every form
    normalize_retention: bool = False  # retention normalization (docs/math.md, "Normalizations"), exact in every form
    dropout: float = 0.0  # on every residual branch and in the FFN
    norm_eps: float = 1e-5  # LayerNorm epsilon
    initializer_range: float = 0.02  # std of the FFN weights; retention keeps Xavier (docs/math.md, "Defaults")
    embedding_init_std: float | None = None  # std of the token embedding and an untied head; None: d^-1/2
    tie_word_embeddings: bool = True  # the output head shares the token embedding
    mode: str = "parallel"  # the form of a forward without cache: parallel | chunkwise | recurrent
    chunk_size: int = CHUNK_SIZE  # chunk length of the chunkwise form: prefill of generate(), long prompts
    prefill_chunk: int = 1024  # a cache is filled this many tokens at a time: prefill memory flat in the prompt length
    use_cache: bool = True
    decode_implementation: str = "eager"  # a decoding step: eager (reference) | compiled | aot | native (decoding.py)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # What the public checkpoints need (torchscale, syncdoth/RetNet, flash-linear-attention; see models/convert);
    # each default keeps the model above unchanged.
    value_dim: int | None = None  # H * dv when it is not value_factor * d (torchscale's decoder_value_embed_dim)
    norm: str = "layernorm"  # the block, final and embedding norms: layernorm | rmsnorm (torchscale from 2023-09-28)
    ffn_norm: str = "none"  # a norm on the FFN's hidden activations: none | layernorm | rmsnorm (torchscale's subln)
    head_norm_weight: bool = False  # a learnable per-channel weight on an rmsnorm or layernorm head norm (fla)
    head_norm_eps: float = 1e-6  # epsilon of the head norm
    rotary_layout: str = "interleaved"  # the rotated pairs: interleaved (x_2i, x_2i+1) | halves (x_i, x_i+dk/2) (fla)
    rotary_angles: str = "retnet"  # retnet: base^(-i/(dk/2-1)) (torchscale) | rope: base^(-2i/dk) (fla)
    rotary_base: float = 10000.0
    scale_embedding: bool = False  # multiply the token embeddings by sqrt(d) (torchscale's no_scale_embedding=False)
    embed_norm: bool = False  # a norm of kind `norm` after the embeddings (torchscale's layernorm_embedding)

    def complete(self) -> None:
        """``ffn_dim`` None means 2d (the paper); a decay given as a tuple of gammas is kept as a list (JSON's)."""
        if self.ffn_dim is None:
            self.ffn_dim = 2 * self.dim_model if isinstance(self.dim_model, int) else None
        if isinstance(self.decay, tuple):
            self.decay = list(self.decay)

    def backbone_options(self) -> dict[str, Any]:
        """The fields that shape the backbone, as :meth:`RetNet.from_options` takes them."""
        return {name: getattr(self, name) for name in BACKBONE_FIELDS}

    @property
    def head_dims(self) -> tuple[int, int]:
        """(dk, dv): the key and value width of one head."""
        value_dim = self.value_factor * self.dim_model if self.value_dim is None else self.value_dim
        return self.dim_model // self.num_heads, value_dim // self.num_heads

    def validate(self) -> None:
        """Raise ValueError naming the field if this config cannot build a working model."""
        positive = ("vocab_size", "dim_model", "num_layers", "num_heads", "value_factor", "ffn_dim", "chunk_size")
        for name in (*positive, "prefill_chunk"):
            check_positive_int(name, getattr(self, name))
        check_heads(self.dim_model, self.num_heads, self.rotary)
        if self.value_dim is not None and (
            not isinstance(self.value_dim, int) or self.value_dim < 1 or self.value_dim % self.num_heads
        ):
            raise ValueError(
                f"value_dim must be None (value_factor * dim_model) or a positive multiple of num_heads "
                f"({self.num_heads}), got {self.value_dim!r}"
            )
        for name, allowed in (
            ("ffn_activation", tuple(ACTIVATIONS)),
            ("gate_fn", tuple(GATES)),
            ("head_norm", HEAD_NORMS),
            ("mode", MODES),
            ("norm", ("layernorm", "rmsnorm")),
            ("ffn_norm", HIDDEN_NORMS),
            ("rotary_layout", ROTARY_LAYOUTS),
            ("rotary_angles", ROTARY_ANGLES),
            ("decode_implementation", DECODE_IMPLEMENTATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.decay, str):
            if self.decay not in SCHEDULES:
                raise ValueError(f"decay must be one of {SCHEDULES} or one gamma per head, got {self.decay!r}")
        elif len(self.decay) != self.num_heads or not all(0 < g < 1 for g in self.decay):
            raise ValueError(f"decay must give one gamma in (0, 1) per head ({self.num_heads}), got {self.decay!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout!r}")
        if self.head_norm_weight and self.head_norm not in ("rmsnorm", "layernorm"):
            raise ValueError(
                f"head_norm_weight=True needs head_norm 'rmsnorm' or 'layernorm', got {self.head_norm!r} "
                "(groupnorm always has its weight and bias)"
            )
        for name in ("norm_eps", "head_norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not self.rotary_base > 1:
            raise ValueError(f"rotary_base must be > 1, got {self.rotary_base!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range must be > 0, got {self.initializer_range!r}")
        if self.embedding_init_std is not None and not self.embedding_init_std > 0:
            raise ValueError(f"embedding_init_std must be None (d^-1/2) or > 0, got {self.embedding_init_std!r}")
        for name in ("pad_token_id", "bos_token_id"):
            self._check_token_id(name, getattr(self, name))
        eos = self.eos_token_id if isinstance(self.eos_token_id, list) else [self.eos_token_id]
        for token in eos:
            self._check_token_id("eos_token_id", token)

    def _check_token_id(self, name: str, token: int | None) -> None:
        if token is not None and not (isinstance(token, int) and 0 <= token < self.vocab_size):
            raise ValueError(f"{name} must be None or a token id in [0, vocab_size={self.vocab_size}), got {token!r}")
